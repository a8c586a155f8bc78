//! Opening block nodes: `--blockdev` and `blockdev-add` both end here.
//!
//! QAPI arguments are first turned into plain [`NodeOptions`] (in `qapi.rs`),
//! then opened bottom-up: an inline child (`file.driver=file,...`) becomes an
//! implicit node with a generated name, as in QEMU.

use std::path::PathBuf;
use std::sync::Arc;

use block::drivers::blkdebug::BlkdebugDriver;
use block::drivers::cbw::{self, CbwDriver, CbwOptions, SnapshotAccessDriver, SnapshotSource};
use block::drivers::file::{AioMode, FileDriver, FileOptions, LockingMode};
use block::drivers::null::NullDriver;
use block::drivers::qcow2::{Qcow2Driver, Qcow2Options};
use block::drivers::raw::RawDriver;
use block::drivers::throttle::ThrottleDriver;
use block::throttle::ThrottleMember;
use block::{BlockError, BlockNode, Driver};
use nbd_client::{NbdDriver, NbdOptions, ServerAddr};
use rbd::RbdDriver;

use super::{FormatInfo, NodeEntry, NodeTable, Reopenable};
use crate::config::{
    is_well_formed_id, BackingSpec, CbwSpec, ChildRef, NbdClientSpec, NodeOptions, NodeSpec,
    Qcow2Cache,
};
use crate::error::NodeError;

/// Opens a node (and its inline children) and registers it; returns its name.
pub fn open(nodes: &NodeTable, options: NodeOptions, implicit: bool) -> Result<String, NodeError> {
    let before = nodes.names();
    let opened = open_node(nodes, options, implicit);
    if opened.is_err() {
        // Implicit children made for a node that then failed to open (a bad
        // backing reference, a duplicate name) go too, as in QEMU: left
        // behind, they would hold their image files open and locked.
        nodes.remove_orphans_since(&before);
    }
    opened
}

fn open_node(nodes: &NodeTable, options: NodeOptions, implicit: bool) -> Result<String, NodeError> {
    let name = match &options.node_name {
        Some(n) => {
            if !is_well_formed_id(n) {
                return Err(NodeError::InvalidName(n.clone()));
            }
            if nodes.find(n).is_some() {
                return Err(NodeError::Duplicate(n.clone()));
            }
            n.clone()
        }
        None => nodes.generate_name(),
    };
    let Opened {
        driver,
        children,
        filename,
        format,
        throttle,
        reopen,
        cbw,
    } = open_driver(nodes, &options)?;
    let read_only = options.read_only || !driver.capabilities().can_write;
    let mut node =
        BlockNode::new(name.clone(), driver, read_only).with_detect_zeroes(options.detect_zeroes);
    if let Some(member) = throttle {
        node = node.with_throttle(member);
    }
    if let Some(observer) = nodes.observer() {
        node = node.with_observer(observer);
    }
    let node = Arc::new(node);
    let mut entry = NodeEntry::new(node, children, implicit, filename, format);
    entry.options = Some(options);
    entry.reopen = reopen;
    entry.cbw = cbw;
    nodes.insert(entry)?;
    tracing::info!(node = %name, "block node added");
    Ok(name)
}

/// A driver and what the node table records about it.
struct Opened {
    driver: Arc<dyn Driver>,
    children: Vec<String>,
    filename: String,
    format: Option<FormatInfo>,
    /// A throttle node's membership of its group.
    throttle: Option<ThrottleMember>,
    /// Where `blockdev-reopen` replaces the `file` child (raw, qcow2).
    reopen: Option<Reopenable>,
    /// A copy-before-write node's snapshot, for `snapshot-access` above it.
    cbw: Option<Arc<CbwDriver>>,
}

impl Opened {
    fn plain(driver: Arc<dyn Driver>, children: Vec<String>, filename: String) -> Self {
        Self {
            driver,
            children,
            filename,
            format: None,
            throttle: None,
            reopen: None,
            cbw: None,
        }
    }
}

fn open_driver(nodes: &NodeTable, options: &NodeOptions) -> Result<Opened, NodeError> {
    let (driver, children, filename) = match &options.spec {
        NodeSpec::Qcow2 {
            file,
            backing,
            cache,
            lazy_refcounts,
        } => return open_qcow2(nodes, options, file, backing, cache, *lazy_refcounts),
        NodeSpec::Throttle { file, group } => return open_throttle(nodes, options, file, group),
        NodeSpec::CopyBeforeWrite(spec) => return open_cbw(nodes, options, spec),
        NodeSpec::SnapshotAccess { file } => return open_snapshot_access(nodes, options, file),
        NodeSpec::Raw { file, offset, size } => {
            let (child, child_name, filename) = open_child(nodes, options, file)?;
            let driver = Arc::new(
                RawDriver::new(child, *offset, *size, options.discard).map_err(block_error)?,
            );
            let mut opened = Opened::plain(driver.clone(), vec![child_name], filename);
            opened.reopen = Some(Reopenable::Raw(driver));
            return Ok(opened);
        }
        spec => open_plain(nodes, options, spec)?,
    };
    Ok(Opened::plain(driver, children, filename))
}

type Plain = (Arc<dyn Driver>, Vec<String>, String);

fn open_plain(
    nodes: &NodeTable,
    options: &NodeOptions,
    spec: &NodeSpec,
) -> Result<Plain, NodeError> {
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
                force_share: options.force_share,
            };
            let driver = FileDriver::open(&file_options).map_err(block_error)?;
            Ok((Arc::new(driver), Vec::new(), filename.display().to_string()))
        }
        NodeSpec::Nbd(spec) => open_nbd(options, spec),
        NodeSpec::Blkdebug {
            image,
            options: debug,
        } => {
            let (child, child_name, filename) = open_child(nodes, options, image)?;
            let driver = BlkdebugDriver::open(child, debug).map_err(block_error)?;
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
        NodeSpec::Rbd { options: rbd, .. } => {
            let driver = open_rbd(options, rbd)?;
            // QEMU's legacy filename: rbd:POOL[/NAMESPACE]/IMAGE[@SNAP].
            let mut filename = format!("rbd:{}/", rbd.pool);
            if let Some(ns) = &rbd.namespace {
                filename += &format!("{ns}/");
            }
            filename += &rbd.image;
            if let Some(snap) = &rbd.snapshot {
                filename += &format!("@{snap}");
            }
            Ok((Arc::new(driver), Vec::new(), filename))
        }
        NodeSpec::Qcow2 { .. }
        | NodeSpec::Throttle { .. }
        | NodeSpec::Raw { .. }
        | NodeSpec::CopyBeforeWrite(_)
        | NodeSpec::SnapshotAccess { .. } => Err(NodeError::Open(
            "this driver's nodes are opened by their own function".into(),
        )),
    }
}

/// A client of a remote NBD export. Opening connects and negotiates, so
/// `blockdev-add` fails as QEMU's does when the server or export is not there.
fn open_nbd(options: &NodeOptions, spec: &NbdClientSpec) -> Result<Plain, NodeError> {
    if spec.tls_creds.is_some() && spec.tls.is_none() {
        return Err(NodeError::Open(
            "tls-creds: the credentials object was not looked up before the node was opened".into(),
        ));
    }
    let nbd_options = NbdOptions {
        server: spec.server.clone(),
        export: spec.export.clone().unwrap_or_default(),
        tls: spec.tls.clone(),
        dirty_bitmap: spec.dirty_bitmap.clone(),
        reconnect_delay: spec.reconnect_delay,
        open_timeout: spec.open_timeout,
    };
    let driver = NbdDriver::open(nbd_options).map_err(|e| NodeError::Open(e.to_string()))?;
    // A read-only export opens only for a read-only node (or auto-read-only), as in QEMU.
    if !driver.capabilities().can_write && !options.read_only && !options.auto_read_only {
        return Err(NodeError::Open(
            "Could not open image: Permission denied".into(),
        ));
    }
    Ok((Arc::new(driver), Vec::new(), nbd_filename(spec)))
}

/// The node's filename as QEMU shows it: an NBD URI.
fn nbd_filename(spec: &NbdClientSpec) -> String {
    let export = spec.export.as_deref().unwrap_or_default();
    match &spec.server {
        ServerAddr::Inet { host, port } => format!("nbd://{host}:{port}/{export}"),
        ServerAddr::Unix(path) => format!("nbd+unix:///{export}?socket={}", path.display()),
    }
}

/// Connects to the cluster and opens the image, as QEMU's rbd driver: the
/// open's own errors first, then a snapshot opened writable is refused (or,
/// with `auto-read-only`, made read-only). Connecting waits on monitors
/// (bounded by librados timeouts, see `rbd::CONNECT_TIMEOUT_SECS`), so the
/// wait leaves the runtime's other tasks (other monitors, exports) to the
/// other worker threads.
fn open_rbd(options: &NodeOptions, rbd: &rbd::RbdOptions) -> Result<RbdDriver, NodeError> {
    let snapshot = rbd.snapshot.is_some();
    let read_only = options.read_only || (snapshot && options.auto_read_only);
    let open = || rbd::Image::open(rbd, read_only || snapshot);
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    let image = match multi_thread {
        true => tokio::task::block_in_place(open),
        false => open(),
    }
    .map_err(|e| NodeError::Open(e.to_string()))?;
    if snapshot && !read_only {
        return Err(NodeError::Open("rbd snapshots are read-only".into()));
    }
    Ok(RbdDriver::new(image, read_only, options.discard))
}

/// A throttle filter over `file`, joining the group `group` (which must
/// exist: QEMU's throttle node no longer creates groups by itself).
fn open_throttle(
    nodes: &NodeTable,
    options: &NodeOptions,
    file: &ChildRef,
    group: &str,
) -> Result<Opened, NodeError> {
    let group = nodes
        .throttle_groups()
        .get(group)
        .ok_or_else(|| NodeError::NoThrottleGroup(group.to_string()))?;
    let (child, child_name, filename) = open_child(nodes, options, file)?;
    let mut opened = Opened::plain(
        Arc::new(ThrottleDriver::new(child, options.discard)),
        vec![child_name],
        filename,
    );
    opened.throttle = Some(group.join());
    Ok(opened)
}

/// A copy-before-write filter (QEMU's cbw_open): `file`, then `target`,
/// then the bitmap; the copy granularity is block-copy's.
fn open_cbw(nodes: &NodeTable, options: &NodeOptions, spec: &CbwSpec) -> Result<Opened, NodeError> {
    let (file, file_name, filename) = open_child(nodes, options, &spec.file)?;
    let (target, target_name, _) = open_child(nodes, options, &spec.target)?;
    let cluster = copy_cluster_size(nodes, &target_name, spec.min_cluster_size)
        .map_err(|e| NodeError::Open(format!("Cannot create block-copy-state: {e}")))?;
    let dirty = match &spec.bitmap {
        None => None,
        Some((node, name)) => Some(bitmap_clusters(nodes, node, name, file.size(), cluster)?),
    };
    let driver = Arc::new(CbwDriver::new(
        file,
        target,
        CbwOptions {
            cluster,
            on_error: spec.on_error,
            timeout: (spec.timeout_secs > 0)
                .then(|| std::time::Duration::from_secs(spec.timeout_secs.into())),
            dirty,
        },
    ));
    let mut opened = Opened::plain(driver.clone(), vec![file_name, target_name], filename);
    opened.cbw = Some(driver);
    Ok(opened)
}

/// block-copy's cluster size: 64 KiB, or the target's cluster, or
/// `min-cluster-size` (a power of 2), whichever is largest.
fn copy_cluster_size(nodes: &NodeTable, target: &str, min: u64) -> Result<u64, String> {
    if min > i64::MAX as u64 {
        return Err(format!("min-cluster-size too large: {min} > {}", i64::MAX));
    }
    if min != 0 && !min.is_power_of_two() {
        return Err("min-cluster-size needs to be a power of 2".into());
    }
    let target_cluster = nodes
        .lock()
        .get(target)
        .and_then(|e| e.format.as_ref().map(|f| f.qcow2.cluster_size))
        .unwrap_or(0);
    Ok(min.max(cbw::DEFAULT_CLUSTER).max(target_cluster))
}

/// Which copy clusters the bitmap `node`/`name` marks (any bit in them).
fn bitmap_clusters(
    nodes: &NodeTable,
    node: &str,
    name: &str,
    size: u64,
    cluster: u64,
) -> Result<Vec<bool>, NodeError> {
    let (_, bitmap) =
        super::bitmaps::lookup(nodes, node, name).map_err(|e| NodeError::Open(e.desc))?;
    if bitmap.size() != size {
        return Err(NodeError::Open(format!(
            "Cannot create block-copy-state: Failed to merge bitmap '{name}' to internal copy-bitmap: Bitmaps are of different sizes (destination size is {size}, source size is {}) and can't be merged",
            bitmap.size()
        )));
    }
    let mut dirty = vec![false; size.div_ceil(cluster) as usize];
    let mut at = 0;
    for (len, set) in bitmap.extents(0, size, usize::MAX) {
        if set {
            let first = (at / cluster) as usize;
            let end = ((at + len).div_ceil(cluster) as usize).min(dirty.len());
            dirty[first..end].iter_mut().for_each(|d| *d = true);
        }
        at += len;
    }
    Ok(dirty)
}

/// `snapshot-access` over `file`: its snapshot if it is a copy-before-write
/// node; over anything else every request fails (QEMU's ENOTSUP).
fn open_snapshot_access(
    nodes: &NodeTable,
    options: &NodeOptions,
    file: &ChildRef,
) -> Result<Opened, NodeError> {
    let (child, child_name, filename) = open_child(nodes, options, file)?;
    let source = nodes
        .lock()
        .get(&child_name)
        .and_then(|e| e.cbw.clone())
        .map(|c| c as Arc<dyn SnapshotSource>);
    let driver = Arc::new(SnapshotAccessDriver::new(child, source, options.discard));
    Ok(Opened::plain(driver, vec![child_name], filename))
}

fn open_qcow2(
    nodes: &NodeTable,
    options: &NodeOptions,
    file: &ChildRef,
    backing: &BackingSpec,
    cache: &Qcow2Cache,
    lazy_refcounts: Option<bool>,
) -> Result<Opened, NodeError> {
    let (child, child_name, filename) = open_child(nodes, options, file)?;
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
            let (node, name, file) = open_child(nodes, &ro, &r)
                .map_err(|e| NodeError::Open(format!("Could not open backing file: {e}")))?;
            children.push(name.clone());
            (Some(node), Some(name), Some(file))
        }
    };
    let info = driver.info();
    let driver = Arc::new(driver.with_backing(backing_node));
    Ok(Opened {
        driver: driver.clone(),
        children,
        filename,
        throttle: None,
        reopen: Some(Reopenable::Qcow2(driver)),
        cbw: None,
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
) -> Result<ChildRef, NodeError> {
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
            return Err(NodeError::Open(format!(
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
    nodes: &NodeTable,
    parent: &NodeOptions,
    child: &ChildRef,
) -> Result<(Arc<BlockNode>, String, String), NodeError> {
    let child_name = match child {
        ChildRef::Name(n) => n.clone(),
        ChildRef::Inline(child) => {
            let mut child = (**child).clone();
            // An implicit child inherits read-only from its parent, as in QEMU.
            child.read_only |= parent.read_only;
            child.auto_read_only |= parent.auto_read_only;
            child.force_share |= parent.force_share;
            open(nodes, child, true)?
        }
    };
    let (node, filename) = nodes
        .find_with_filename(&child_name)
        .ok_or_else(|| NodeError::NoSuchNode(child_name.clone()))?;
    Ok((node, child_name, filename))
}

fn block_error(e: BlockError) -> NodeError {
    NodeError::Open(e.to_string())
}
