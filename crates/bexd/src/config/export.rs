//! `block-export-add` / `--export` / `nbd-server-add`: what an export was created with.

use std::path::PathBuf;

/// What every export kind shares, plus the kind's own options.
/// Immutable for the export's lifetime.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    pub id: String,
    /// The node it exports.
    pub node_name: String,
    pub writable: bool,
    pub writethrough: bool,
    /// The iothread object it was placed in (checked to exist; bexd serves
    /// every export on all its threads).
    pub iothread: Option<String>,
    pub kind: ExportKindConfig,
}

/// The kind-specific part: QAPI's `BlockExportOptions` union, by `type`.
#[derive(Debug, Clone)]
pub enum ExportKindConfig {
    Nbd(NbdExportConfig),
    Fuse(FuseExportConfig),
    VhostUserBlk(VhostUserBlkExportConfig),
}

impl ExportKindConfig {
    /// QAPI's `BlockExportType` name.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Nbd(_) => "nbd",
            Self::Fuse(_) => "fuse",
            Self::VhostUserBlk(_) => "vhost-user-blk",
        }
    }
}

/// `BlockExportOptionsNbd`.
#[derive(Debug, Clone)]
pub struct NbdExportConfig {
    pub name: String,
    pub description: Option<String>,
    pub allocation_depth: bool,
    /// Dirty bitmaps to offer as `qemu:dirty-bitmap:NAME`, resolved when the export is added.
    pub bitmaps: Vec<BitmapRef>,
}

/// `BlockExportOptionsFuse`.
#[derive(Debug, Clone)]
pub struct FuseExportConfig {
    /// The regular file the image is mounted over.
    pub mountpoint: PathBuf,
    pub allow_other: AllowOther,
}

/// `BlockExportOptionsVhostUserBlk`.
#[derive(Debug, Clone)]
pub struct VhostUserBlkExportConfig {
    /// The unix socket the front-end (the VMM) connects to; bexd listens.
    pub socket: PathBuf,
    /// The sector size the guest sees (a power of 2, 512 to 2 MiB).
    pub logical_block_size: u32,
    /// Virtqueues; each is served by its own worker thread.
    pub num_queues: u16,
}

/// `FuseExportAllowOther`: whether users other than the daemon's may open
/// the mounted file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllowOther {
    Off,
    On,
    /// `allow_other` if the mount accepts it, else without (QEMU's default).
    Auto,
}

/// A bitmap named in `bitmaps` / `bitmap`: on the exported node, or on a named node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapRef {
    Local(String),
    External { node: String, name: String },
}

/// How `block-export-del` treats connected clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse while clients are connected.
    Safe,
    /// Drop the clients.
    Hard,
}
