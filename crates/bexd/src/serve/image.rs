//! The node graph qemu-nbd would open for the image: `file` + format (probed
//! or `-f`), or the `--image-opts` description, with `-o` as a `raw` window
//! on top; the cache, aio, discard and read-only options go where QEMU puts
//! them.

use std::path::Path;
use std::sync::Arc;

use block::drivers::file::{AioMode, LockingMode};
use block::DetectZeroes;
use qmp::visitor::InputMode;
use serde_json::Value;

use super::args::ImagePlan;
use crate::config::{BackingSpec, ChildRef, NodeOptions, NodeSpec, Qcow2Cache};
use crate::daemon::Daemon;

/// Opens the image as node `name` (the node the export serves): the format
/// node, with `-s` a throwaway qcow2 overlay on it, with `-o` a raw window on
/// top, as qemu-nbd layers them.
pub fn open(daemon: &Arc<Daemon>, plan: &ImagePlan, name: &str) -> Result<(), String> {
    // With -s the image itself is only read (QEMU opens a snapshot's backing
    // read-only); the overlay takes the writes.
    let format = format_node(plan, plan.read_only || plan.snapshot)?;
    if let Some(spec) = &plan.load_snapshot {
        let driver = match &format.spec {
            NodeSpec::Qcow2 { .. } => "qcow2",
            _ => "raw",
        };
        return Err(match driver {
            "raw" => "Failed to load snapshot: Block format 'raw' used by device '' does not support temporarily loading internal snapshots".into(),
            _ => format!("Failed to load snapshot '{spec}': bexd does not read qcow2 internal snapshots"),
        });
    }
    let opened = |e: crate::error::NodeError| format!("Failed to open '{}': {e}", plan.image);
    // qemu-nbd sets --detect-zeroes on the node it exports, whatever the
    // image options said.
    let detect_zeroes = match plan.detect_zeroes.as_str() {
        "on" => DetectZeroes::On,
        "unmap" => DetectZeroes::Unmap,
        _ => DetectZeroes::Off,
    };
    let layered = plan.snapshot || plan.offset != 0;
    let image = if layered {
        format!("{name}-image")
    } else {
        name.to_string()
    };
    let node = NodeOptions {
        node_name: Some(image.clone()),
        detect_zeroes: if layered {
            DetectZeroes::Off
        } else {
            detect_zeroes
        },
        ..format
    };
    crate::nodes::open(&daemon.nodes, node, false).map_err(opened)?;
    let mut top = image;
    if plan.snapshot {
        let overlay = if plan.offset != 0 {
            format!("{name}-snapshot")
        } else {
            name.to_string()
        };
        open_snapshot(daemon, plan, &top, &overlay, detect_zeroes)?;
        top = overlay;
    }
    if plan.offset == 0 {
        return Ok(());
    }
    // -o: a raw window over what is below, as qemu-nbd layers it.
    let size = daemon.nodes.find(&top).map_or(0, |n| n.size());
    if plan.offset > size {
        return Err(format!(
            "Offset ({}) cannot be greater than size of the containing file ({size})",
            plan.offset
        ));
    }
    let window = NodeOptions {
        node_name: Some(name.into()),
        read_only: plan.read_only,
        discard: plan.discard_unmap,
        detect_zeroes,
        spec: NodeSpec::Raw {
            file: ChildRef::Name(top),
            offset: plan.offset,
            size: None,
        },
        ..NodeOptions::default()
    };
    crate::nodes::open(&daemon.nodes, window, false).map_err(opened)?;
    Ok(())
}

/// `-s`: a new empty qcow2 image in `$TMPDIR` (else /var/tmp, as QEMU puts
/// it) whose backing is the `below` node; the export's writes land there and
/// vanish with the process. The file is unlinked as soon as it is open, so
/// not even a crash leaves it behind (QEMU deletes it at close).
fn open_snapshot(
    daemon: &Arc<Daemon>,
    plan: &ImagePlan,
    below: &str,
    name: &str,
    detect_zeroes: DetectZeroes,
) -> Result<(), String> {
    let failed = |e: String| format!("Failed to create the temporary snapshot: {e}");
    let size = daemon.nodes.find(below).map_or(0, |n| n.size());
    // As QEMU makes it: no backing file name in the header, the backing is
    // attached as a node.
    let bytes =
        block::drivers::qcow2::empty_image(size, None).map_err(|e| failed(e.to_string()))?;
    let dir = std::env::var_os("TMPDIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/tmp".into());
    let mut file = tempfile::Builder::new()
        .prefix("bexd-snapshot.")
        .tempfile_in(&dir)
        .map_err(|e| failed(format!("{}: {e}", dir.display())))?;
    std::io::Write::write_all(&mut file, &bytes).map_err(|e| failed(e.to_string()))?;
    let overlay_file = NodeOptions {
        read_only: plan.read_only,
        discard: plan.discard_unmap,
        cache_direct: plan.cache.direct,
        cache_no_flush: plan.cache.no_flush,
        spec: NodeSpec::File {
            filename: file.path().to_path_buf(),
            aio: aio_mode(&plan.aio),
            locking: LockingMode::Auto,
        },
        ..NodeOptions::default()
    };
    let overlay = NodeOptions {
        node_name: Some(name.into()),
        read_only: plan.read_only,
        discard: plan.discard_unmap,
        cache_direct: plan.cache.direct,
        cache_no_flush: plan.cache.no_flush,
        detect_zeroes,
        spec: NodeSpec::Qcow2 {
            file: ChildRef::Inline(Box::new(overlay_file)),
            backing: BackingSpec::Node(ChildRef::Name(below.into())),
            cache: Qcow2Cache::default(),
            lazy_refcounts: None,
        },
        ..NodeOptions::default()
    };
    crate::nodes::open(&daemon.nodes, overlay, false).map_err(|e| failed(e.to_string()))?;
    // Open: the name can go (dropping the temporary file unlinks it).
    drop(file);
    Ok(())
}

fn aio_mode(aio: &str) -> AioMode {
    match aio {
        "io_uring" => AioMode::IoUring,
        "native" => AioMode::Native,
        _ => AioMode::Threads,
    }
}

/// The format node's options (unnamed: the caller names it).
fn format_node(plan: &ImagePlan, read_only: bool) -> Result<NodeOptions, String> {
    if plan.image_opts {
        return image_opts(plan, read_only);
    }
    let file = NodeOptions {
        read_only,
        discard: plan.discard_unmap,
        cache_direct: plan.cache.direct,
        cache_no_flush: plan.cache.no_flush,
        spec: NodeSpec::File {
            filename: plan.image.clone().into(),
            aio: aio_mode(&plan.aio),
            locking: LockingMode::Auto,
        },
        ..NodeOptions::default()
    };
    let file = ChildRef::Inline(Box::new(file));
    let format = match &plan.format {
        Some(f) => f.clone(),
        None => probe_format(Path::new(&plan.image)).to_string(),
    };
    let spec = match format.as_str() {
        "raw" => NodeSpec::Raw {
            file,
            offset: 0,
            size: None,
        },
        "qcow2" => NodeSpec::Qcow2 {
            file,
            backing: BackingSpec::FromHeader,
            cache: Qcow2Cache::default(),
            lazy_refcounts: None,
        },
        other => {
            return Err(format!(
                "unsupported format '{other}' (supported: raw, qcow2)"
            ))
        }
    };
    Ok(NodeOptions {
        read_only,
        discard: plan.discard_unmap,
        cache_direct: plan.cache.direct,
        cache_no_flush: plan.cache.no_flush,
        spec,
        ..NodeOptions::default()
    })
}

/// `--image-opts`: IMAGE is a block-device description in keyval form
/// (`driver=qcow2,file.driver=file,file.filename=d.qcow2`). As in qemu-nbd,
/// a `file` child given only by `filename` is a `file` node, and the command
/// line's read-only, cache, aio and discard options apply unless it sets them.
fn image_opts(plan: &ImagePlan, read_only: bool) -> Result<NodeOptions, String> {
    let mut value =
        qmp::keyval::parse_keyval(&plan.image, Some("driver")).map_err(|e| e.to_string())?;
    if let Some(Value::Object(file)) = value.get_mut("file") {
        if file.contains_key("filename") && !file.contains_key("driver") {
            file.insert("driver".into(), Value::String("file".into()));
        }
    }
    if let Value::Object(map) = &mut value {
        let mut default = |key: &str, on: bool| {
            if on && !map.contains_key(key) {
                map.insert(key.into(), Value::String("on".into()));
            }
        };
        default("read-only", read_only);
        if plan.discard_unmap && !map.contains_key("discard") {
            map.insert("discard".into(), Value::String("unmap".into()));
        }
    }
    crate::qapi::node_options(value, InputMode::Keyval).map_err(|e| e.desc)
}

/// qcow2 if the image starts with qcow2's magic ("QFI\xfb"), else raw: what
/// qemu-nbd picks without `-f` for these two formats. An image that cannot
/// be read is left to the open that follows, which names the error.
fn probe_format(image: &Path) -> &'static str {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(image)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"QFI\xfb";
    if is_qcow2 {
        "qcow2"
    } else {
        "raw"
    }
}
