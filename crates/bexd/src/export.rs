//! Block exports: what a node looks like to NBD clients, and its lifecycle.
//!
//! An export is visible by name until it starts shutting down. From then on it
//! is hidden from new clients; it is freed (and `BLOCK_EXPORT_DELETED`
//! emitted) when the last client connection is gone. Connections hold an
//! [`ExportClient`] guard, so "last connection gone" is simply the last guard
//! dropping.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use block::{BitmapLease, BlockNode, DirtyBitmap};
use nbd::export::{BlockSize, ExportInfo, MetaContext};
use tokio_util::sync::CancellationToken;

use crate::daemon::Daemon;

/// QEMU's NBD server never transfers more than 32 MiB in one request.
const MAX_TRANSFER: u32 = 32 * 1024 * 1024;

/// What an export was created with; immutable for its lifetime.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub writable: bool,
    pub writethrough: bool,
    pub allocation_depth: bool,
    /// The iothread object it was placed in (accepted; bexd serves exports on all its threads).
    pub iothread: Option<String>,
    /// Dirty bitmaps to offer as `qemu:dirty-bitmap:NAME`, resolved when the export is added.
    pub bitmaps: Vec<BitmapRef>,
}

/// A bitmap named in `bitmaps` / `bitmap`: on the exported node, or on a named node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapRef {
    Local(String),
    External { node: String, name: String },
}

#[derive(Debug)]
pub struct Export {
    pub config: ExportConfig,
    pub node: Arc<BlockNode>,
    /// Set once removal has begun; the export is then hidden from new clients.
    shutting_down: AtomicBool,
    /// Fired by a hard removal: every connection on this export drops at once.
    kick: CancellationToken,
    connections: AtomicUsize,
    /// The exported bitmaps, held busy until the export is freed (QEMU's rule:
    /// an exported bitmap cannot be changed or removed under its readers).
    bitmaps: Mutex<Vec<BitmapLease>>,
    /// Their names, in context-id order (fixed at creation).
    bitmap_list: Vec<Arc<DirtyBitmap>>,
}

impl Export {
    /// An export of `node` serving `bitmaps`, which become busy now.
    pub fn new(config: ExportConfig, node: Arc<BlockNode>, bitmaps: Vec<Arc<DirtyBitmap>>) -> Self {
        let leases = bitmaps.iter().cloned().map(BitmapLease::new).collect();
        Self {
            config,
            node,
            bitmaps: Mutex::new(leases),
            bitmap_list: bitmaps,
            shutting_down: AtomicBool::new(false),
            kick: CancellationToken::new(),
            connections: AtomicUsize::new(0),
        }
    }

    /// The exported bitmap behind `qemu:dirty-bitmap:NAME`.
    pub fn bitmap(&self, name: &str) -> Option<&Arc<DirtyBitmap>> {
        self.bitmap_list.iter().find(|b| b.name() == name)
    }

    /// Ends the export's hold on its bitmaps (at removal, before the event).
    pub fn release_bitmaps(&self) {
        self.bitmaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// The token a connection watches to learn it must drop (hard removal).
    pub fn kicked(&self) -> CancellationToken {
        self.kick.clone()
    }

    /// Starts removal. With `hard`, connected clients are dropped.
    pub fn begin_shutdown(&self, hard: bool) {
        self.shutting_down.store(true, Ordering::Release);
        if hard {
            self.kick.cancel();
        }
    }

    /// The NBD view of this export, as QEMU's server advertises it.
    pub fn info(&self, multi_conn: bool) -> ExportInfo {
        let caps = self.node.capabilities();
        let min = caps.request_alignment.max(1);
        let max = match caps.max_transfer {
            0 => MAX_TRANSFER,
            n => n.min(MAX_TRANSFER),
        };
        let mut meta_contexts = vec![MetaContext::BaseAllocation];
        if self.config.allocation_depth {
            meta_contexts.push(MetaContext::AllocationDepth);
        }
        for b in &self.bitmap_list {
            meta_contexts.push(MetaContext::DirtyBitmap(b.name().to_string()));
        }
        let writable = self.config.writable;
        ExportInfo {
            name: self.config.name.clone(),
            description: self.config.description.clone(),
            // QEMU exports whole 512-byte sectors only.
            size: self.node.size() & !511,
            read_only: !writable,
            can_trim: writable,
            can_write_zeroes: writable,
            can_fast_zero: writable,
            can_multi_conn: multi_conn,
            can_cache: true,
            block_size: BlockSize {
                min,
                preferred: min.max(4096),
                max: max.max(min),
            },
            meta_contexts,
        }
    }
}

/// Held by each connection using an export; the last one to drop after the
/// export began shutting down frees the export.
#[derive(Debug)]
pub struct ExportClient {
    export: Arc<Export>,
    daemon: Weak<Daemon>,
}

impl ExportClient {
    /// Registers a connection. Callers hold the daemon's state lock so that a
    /// concurrent safe removal sees the count.
    pub fn attach(export: Arc<Export>, daemon: Weak<Daemon>) -> Self {
        export.connections.fetch_add(1, Ordering::AcqRel);
        Self { export, daemon }
    }

    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }
}

impl Drop for ExportClient {
    fn drop(&mut self) {
        let left = self.export.connections.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0 && self.export.is_shutting_down() {
            if let Some(daemon) = self.daemon.upgrade() {
                daemon.finish_export_removal(self.export.id());
            }
        }
    }
}
