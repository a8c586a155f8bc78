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

/// Opens the image as node `name` (the node the export serves).
pub fn open(daemon: &Arc<Daemon>, plan: &ImagePlan, name: &str) -> Result<(), String> {
    if plan.snapshot {
        return Err(
            "-s/--snapshot is not supported by bexd serve: it cannot create the temporary overlay"
                .into(),
        );
    }
    let format = format_node(plan)?;
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
    if plan.offset == 0 {
        let node = NodeOptions {
            node_name: Some(name.into()),
            detect_zeroes,
            ..format
        };
        crate::nodes::open(&daemon.nodes, node, false).map_err(opened)?;
        return Ok(());
    }
    // -o: a raw window over the format node, as qemu-nbd layers it.
    let below = format!("{name}-image");
    let node = NodeOptions {
        node_name: Some(below.clone()),
        ..format
    };
    crate::nodes::open(&daemon.nodes, node, false).map_err(opened)?;
    let size = daemon.nodes.find(&below).map_or(0, |n| n.size());
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
            file: ChildRef::Name(below),
            offset: plan.offset,
            size: None,
        },
        ..NodeOptions::default()
    };
    crate::nodes::open(&daemon.nodes, window, false).map_err(opened)?;
    Ok(())
}

/// The format node's options (unnamed: the caller names it).
fn format_node(plan: &ImagePlan) -> Result<NodeOptions, String> {
    if plan.image_opts {
        return image_opts(plan);
    }
    let file = NodeOptions {
        read_only: plan.read_only,
        discard: plan.discard_unmap,
        cache_direct: plan.cache.direct,
        cache_no_flush: plan.cache.no_flush,
        spec: NodeSpec::File {
            filename: plan.image.clone().into(),
            aio: match plan.aio.as_str() {
                "io_uring" => AioMode::IoUring,
                "native" => AioMode::Native,
                _ => AioMode::Threads,
            },
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
        read_only: plan.read_only,
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
fn image_opts(plan: &ImagePlan) -> Result<NodeOptions, String> {
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
        default("read-only", plan.read_only);
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
