//! Opening block nodes: `--blockdev` and `blockdev-add` both end here.
//!
//! QAPI arguments are first turned into [`NodeOptions`] (in `qapi.rs`), then
//! opened bottom-up: an inline child (`file.driver=file,...`) becomes an
//! implicit node with a generated name, as in QEMU.

use std::path::PathBuf;
use std::sync::Arc;

use block::drivers::blkdebug::{BlkdebugDriver, InjectError};
use block::drivers::file::{AioMode, FileDriver, FileOptions, LockingMode};
use block::drivers::null::NullDriver;
use block::drivers::qcow2::{Qcow2Driver, Qcow2Info, Qcow2Options};
use block::drivers::raw::RawDriver;
use block::{BlockError, BlockNode, Driver};
use qmp::visitor::InputMode;
use qmp::QmpError;
use serde_json::Value;

use crate::daemon::{Daemon, NodeEntry};

/// What a format node shows beyond the common fields (qcow2's image info and backing).
#[derive(Clone, Debug)]
pub struct FormatInfo {
    pub qcow2: Qcow2Info,
    pub backing_node: Option<String>,
    /// The backing file's path as opened (QEMU's full-backing-filename).
    pub full_backing_filename: Option<String>,
}

/// Options common to every node, with QEMU's defaults.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    pub node_name: Option<String>,
    pub read_only: bool,
    pub auto_read_only: bool,
    /// `discard=unmap` (QEMU's default is `ignore`).
    pub discard: bool,
    pub cache_direct: bool,
    pub cache_no_flush: bool,
    pub spec: NodeSpec,
}

/// The driver-specific part.
#[derive(Clone, Debug)]
pub enum NodeSpec {
    Blkdebug {
        image: ChildRef,
        rules: Vec<InjectError>,
    },
    File {
        filename: PathBuf,
        aio: AioMode,
        locking: LockingMode,
    },
    Raw {
        file: ChildRef,
        offset: u64,
        size: Option<u64>,
    },
    Null {
        size: u64,
        read_zeroes: bool,
        latency_ns: u64,
    },
    Qcow2 {
        file: ChildRef,
        backing: BackingSpec,
        cache: Qcow2Cache,
        lazy_refcounts: Option<bool>,
    },
}

/// qcow2's `backing`: absent (open what the header names), `null`, or a node.
#[derive(Clone, Debug)]
pub enum BackingSpec {
    FromHeader,
    None,
    Node(ChildRef),
}

/// qcow2 cache options, in bytes and seconds; `None` takes QEMU's default.
#[derive(Clone, Copy, Debug, Default)]
pub struct Qcow2Cache {
    pub cache_size: Option<u64>,
    pub l2_cache_size: Option<u64>,
    pub refcount_cache_size: Option<u64>,
    pub cache_clean_interval: Option<u64>,
}

impl Default for NodeSpec {
    fn default() -> Self {
        Self::Null {
            size: 1 << 30,
            read_zeroes: false,
            latency_ns: 0,
        }
    }
}

/// A child given by node name, or described inline.
#[derive(Clone, Debug)]
pub enum ChildRef {
    Name(String),
    Inline(Box<NodeOptions>),
}

/// `blockdev-add`: typed arguments from JSON or keyval, then [`open`].
pub fn add(daemon: &Arc<Daemon>, value: Value, mode: InputMode) -> Result<String, QmpError> {
    let options = crate::qapi::node_options(value, mode)?;
    if options.node_name.is_none() {
        return Err(QmpError::generic(
            "'node-name' must be specified for the root node",
        ));
    }
    open(daemon, options, false)
}

/// Opens a node (and its inline children) and registers it; returns its name.
pub fn open(
    daemon: &Arc<Daemon>,
    options: NodeOptions,
    implicit: bool,
) -> Result<String, QmpError> {
    let before = daemon.node_names();
    let opened = open_node(daemon, options, implicit);
    if opened.is_err() {
        // Implicit children made for a node that then failed to open (a bad
        // backing reference, a duplicate name) go too, as in QEMU: left
        // behind, they would hold their image files open and locked.
        daemon.remove_orphans_since(&before);
    }
    opened
}

fn open_node(
    daemon: &Arc<Daemon>,
    options: NodeOptions,
    implicit: bool,
) -> Result<String, QmpError> {
    let name = match &options.node_name {
        Some(n) => {
            check_node_name(n)?;
            if daemon.find_node(n).is_some() {
                return Err(QmpError::generic(format!(
                    "Duplicate nodes with node-name='{n}'"
                )));
            }
            n.clone()
        }
        None => daemon.generate_node_name(),
    };
    let Opened {
        driver,
        children,
        filename,
        format,
    } = open_driver(daemon, &options)?;
    let read_only = options.read_only || !driver.capabilities().can_write;
    let node = Arc::new(BlockNode::new(name.clone(), driver, read_only));
    daemon.insert_node(NodeEntry {
        node,
        children,
        parents: 0,
        implicit,
        filename,
        format,
    })?;
    tracing::info!(node = %name, "block node added");
    Ok(name)
}

/// A driver and what the node table records about it.
struct Opened {
    driver: Arc<dyn Driver>,
    children: Vec<String>,
    filename: String,
    format: Option<FormatInfo>,
}

impl Opened {
    fn plain(driver: Arc<dyn Driver>, children: Vec<String>, filename: String) -> Self {
        Self {
            driver,
            children,
            filename,
            format: None,
        }
    }
}

fn open_driver(daemon: &Arc<Daemon>, options: &NodeOptions) -> Result<Opened, QmpError> {
    let (driver, children, filename) = match &options.spec {
        NodeSpec::Qcow2 {
            file,
            backing,
            cache,
            lazy_refcounts,
        } => return open_qcow2(daemon, options, file, backing, cache, *lazy_refcounts),
        spec => open_plain(daemon, options, spec)?,
    };
    Ok(Opened::plain(driver, children, filename))
}

type Plain = (Arc<dyn Driver>, Vec<String>, String);

fn open_plain(
    daemon: &Arc<Daemon>,
    options: &NodeOptions,
    spec: &NodeSpec,
) -> Result<Plain, QmpError> {
    match spec {
        NodeSpec::File {
            filename,
            aio,
            locking,
        } => {
            let file_options = FileOptions {
                filename: filename.clone(),
                read_only: options.read_only,
                auto_read_only: options.auto_read_only,
                cache_direct: options.cache_direct,
                cache_no_flush: options.cache_no_flush,
                aio: *aio,
                locking: *locking,
                discard: options.discard,
            };
            let driver = FileDriver::open(&file_options).map_err(block_error)?;
            Ok((Arc::new(driver), Vec::new(), filename.display().to_string()))
        }
        NodeSpec::Raw { file, offset, size } => {
            let (child, child_name, filename) = open_child(daemon, options, file)?;
            let driver =
                RawDriver::new(child, *offset, *size, options.discard).map_err(block_error)?;
            Ok((Arc::new(driver), vec![child_name], filename))
        }
        NodeSpec::Blkdebug { image, rules } => {
            let (child, child_name, filename) = open_child(daemon, options, image)?;
            let driver = BlkdebugDriver::new(child, rules.clone());
            Ok((Arc::new(driver), vec![child_name], filename))
        }
        NodeSpec::Null {
            size,
            read_zeroes,
            latency_ns,
        } => {
            let latency = std::time::Duration::from_nanos(*latency_ns);
            let driver = NullDriver::with_latency(*size, *read_zeroes, latency);
            Ok((Arc::new(driver), Vec::new(), "null-co://".to_string()))
        }
        NodeSpec::Qcow2 { .. } => Err(QmpError::generic("qcow2 is opened by open_qcow2")),
    }
}

fn open_qcow2(
    daemon: &Arc<Daemon>,
    options: &NodeOptions,
    file: &ChildRef,
    backing: &BackingSpec,
    cache: &Qcow2Cache,
    lazy_refcounts: Option<bool>,
) -> Result<Opened, QmpError> {
    let (child, child_name, filename) = open_child(daemon, options, file)?;
    let q = Qcow2Options {
        read_only: options.read_only,
        discard: options.discard,
        l2_cache_size: cache.l2_cache_size,
        refcount_cache_size: cache.refcount_cache_size,
        cache_size: cache.cache_size,
        cache_clean_interval: cache.cache_clean_interval,
        lazy_refcounts,
    };
    let driver = Qcow2Driver::open(child, &q).map_err(block_error)?;
    let mut children = vec![child_name];
    let header_backing = driver
        .backing_file()
        .map(|(name, fmt)| (name.to_string(), fmt.map(str::to_string)));
    let backing_ref = match backing {
        BackingSpec::None => None,
        BackingSpec::Node(r) => Some(r.clone()),
        BackingSpec::FromHeader => match &header_backing {
            Some((name, fmt)) => Some(backing_from_header(&filename, name, fmt.as_deref())?),
            None => None,
        },
    };
    let (backing_node, backing_name, backing_file) = match backing_ref {
        None => (None, None, None),
        Some(r) => {
            let mut ro = options.clone();
            ro.read_only = true;
            let (node, name, file) = open_child(daemon, &ro, &r).map_err(|e| {
                QmpError::generic(format!("Could not open backing file: {}", e.desc))
            })?;
            children.push(name.clone());
            (Some(node), Some(name), Some(file))
        }
    };
    let info = driver.info();
    let driver = driver.with_backing(backing_node);
    Ok(Opened {
        driver: Arc::new(driver),
        children,
        filename,
        format: Some(FormatInfo {
            qcow2: info,
            backing_node: backing_name,
            full_backing_filename: backing_file,
        }),
    })
}

/// The node options for the backing file a header names: relative names
/// are resolved against the image's directory, the format comes from the
/// backing-format extension or, without one, from the file's first bytes.
fn backing_from_header(
    image: &str,
    name: &str,
    format: Option<&str>,
) -> Result<ChildRef, QmpError> {
    let path = match std::path::Path::new(name).is_absolute() {
        true => PathBuf::from(name),
        false => std::path::Path::new(image)
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join(name),
    };
    let format = match format {
        Some(f) => f.to_string(),
        None => probe_format(&path),
    };
    let file = NodeOptions {
        read_only: true,
        spec: NodeSpec::File {
            filename: path.clone(),
            aio: AioMode::default(),
            locking: LockingMode::default(),
        },
        ..Default::default()
    };
    let file = ChildRef::Inline(Box::new(file));
    let spec = match format.as_str() {
        "qcow2" => NodeSpec::Qcow2 {
            file,
            backing: BackingSpec::FromHeader,
            cache: Qcow2Cache::default(),
            lazy_refcounts: None,
        },
        "raw" => NodeSpec::Raw {
            file,
            offset: 0,
            size: None,
        },
        other => {
            return Err(QmpError::generic(format!(
                "Unknown driver '{other}' for backing file '{}'",
                path.display()
            )))
        }
    };
    Ok(ChildRef::Inline(Box::new(NodeOptions {
        read_only: true,
        spec,
        ..Default::default()
    })))
}

/// qcow2 if the file starts with its magic, else raw (as QEMU probes).
fn probe_format(path: &std::path::Path) -> String {
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"QFI\xfb";
    if is_qcow2 { "qcow2" } else { "raw" }.to_string()
}

/// Resolves a child given by name or opens an inline one; returns the node,
/// its name and the filename it shows.
fn open_child(
    daemon: &Arc<Daemon>,
    parent: &NodeOptions,
    child: &ChildRef,
) -> Result<(Arc<BlockNode>, String, String), QmpError> {
    let child_name = match child {
        ChildRef::Name(n) => n.clone(),
        ChildRef::Inline(child) => {
            let mut child = (**child).clone();
            // An implicit child inherits read-only from its parent, as in QEMU.
            child.read_only |= parent.read_only;
            child.auto_read_only |= parent.auto_read_only;
            open(daemon, child, true)?
        }
    };
    let entry = {
        let state = daemon.state();
        state
            .nodes
            .get(&child_name)
            .map(|e| (e.node.clone(), e.filename.clone()))
    };
    let (node, filename) = entry.ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{child_name}' nor node-name='{child_name}'"
        ))
    })?;
    Ok((node, child_name, filename))
}

fn block_error(e: BlockError) -> QmpError {
    QmpError::generic(e.to_string())
}

/// QEMU's rule for ids: a letter first, then letters, digits, `-`, `.`, `_`.
pub fn check_node_name(name: &str) -> Result<(), QmpError> {
    if is_well_formed_id(name) {
        Ok(())
    } else {
        Err(QmpError::generic(format!("Invalid node-name: '{name}'")))
    }
}

pub fn is_well_formed_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_is_well_formed_id_rejects_leading_digit() {
        assert!(!is_well_formed_id("1a"));
    }

    #[test]
    fn test_is_well_formed_id_accepts_qemu_punctuation() {
        assert!(is_well_formed_id("disk-0.raw_a"));
    }

    #[test]
    fn test_is_well_formed_id_rejects_empty() {
        assert!(!is_well_formed_id(""));
    }
}
