//! `--blockdev` / `blockdev-add`: a node and its inline children.
//!
//! The driver-level option types (`BlkdebugOptions`, `AioMode`, `LockingMode`) are
//! the block crate's own plain enums, so the node table hands them straight on.

use std::path::PathBuf;
use std::time::Duration;

use block::drivers::blkdebug::BlkdebugOptions;
use block::drivers::cbw::OnCbwError;
use block::drivers::file::{AioMode, LockingMode};
use block::DetectZeroes;

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
    /// `force-share=on` (read-only nodes only): the image is opened sharing
    /// every permission, so others may write and resize it. Inline children
    /// inherit it, as in QEMU.
    pub force_share: bool,
    /// `detect-zeroes`; not inherited by inline children (QEMU's rule).
    pub detect_zeroes: DetectZeroes,
    pub spec: NodeSpec,
}

/// The driver-specific part.
#[derive(Clone, Debug)]
pub enum NodeSpec {
    Blkdebug {
        image: ChildRef,
        /// Rules, limits and the configuration file (read when the node opens).
        options: BlkdebugOptions,
    },
    /// The copy-before-write filter over `file`, saving old data to `target`.
    CopyBeforeWrite(CbwSpec),
    File {
        filename: PathBuf,
        aio: AioMode,
        locking: LockingMode,
    },
    /// A client of a remote NBD export (`driver=nbd`).
    Nbd(NbdClientSpec),
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
    /// A Ceph RBD image. `key_secret` names the `secret` object holding the
    /// cephx key; the command layer (which sees objects) copies its base64
    /// into `options.key` before the node table opens the image.
    Rbd {
        options: rbd::RbdOptions,
        key_secret: Option<String>,
    },
    /// The point-in-time view of a copy-before-write node.
    SnapshotAccess { file: ChildRef },
    /// The I/O limits filter over `file`, a member of the throttle group
    /// with that id (looked up when the node opens).
    Throttle { file: ChildRef, group: String },
}

/// `driver=copy-before-write`'s members.
#[derive(Clone, Debug)]
pub struct CbwSpec {
    pub file: ChildRef,
    pub target: ChildRef,
    /// (node, name) of the bitmap whose dirty clusters alone are copied.
    pub bitmap: Option<(String, String)>,
    pub on_error: OnCbwError,
    /// `cbw-timeout` in seconds; 0 is no limit.
    pub timeout_secs: u32,
    pub min_cluster_size: u64,
}

/// `driver=nbd`'s members; the TLS credentials are looked up by id when the node opens.
#[derive(Clone, Debug)]
pub struct NbdClientSpec {
    pub server: nbd_client::ServerAddr,
    pub export: Option<String>,
    pub tls_creds: Option<String>,
    pub tls_hostname: Option<String>,
    /// The TLS upgrade built from the `tls-creds` object, filled in by
    /// `blockdev-add` before the node table sees the spec (it knows no objects).
    pub tls: Option<std::sync::Arc<dyn nbd_client::TlsConnect>>,
    pub dirty_bitmap: Option<String>,
    pub reconnect_delay: Duration,
    pub open_timeout: Duration,
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
