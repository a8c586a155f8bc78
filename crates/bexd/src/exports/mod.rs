//! The export table, and what every export kind shares.
//!
//! An export is visible until it starts shutting down. From then on it is
//! hidden from new clients; it is freed (its node hold and the kind's
//! resources released, `BLOCK_EXPORT_DELETED` emitted) when the last client
//! connection is gone. Connections hold an [`ExportClient`] guard, so "last
//! connection gone" is simply the last guard dropping; the guard holds the
//! table, never the daemon.

pub mod bitmaps;
mod counting;
pub mod fuse;
mod inflight;
mod kind;
pub mod nbd;
pub mod vhost_user_blk;

pub use kind::ExportKind;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use block::{BlockNode, IoStats};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{ExportConfig, RemoveMode};
use crate::error::ExportError;
use crate::events::EventBus;
use crate::nodes::NodeHold;

/// One export: the shared part, and its kind.
#[derive(Debug)]
pub struct Export {
    pub config: ExportConfig,
    /// The exported node (the same one `hold` holds, kept here for the data path).
    pub node: Arc<BlockNode>,
    /// Keeps `blockdev-del` off the node until the export is freed.
    hold: Mutex<Option<NodeHold>>,
    kind: Box<dyn ExportKind>,
    /// Set once removal has begun; the export is then hidden from new clients.
    shutting_down: AtomicBool,
    /// Fired by a hard removal: every connection on this export drops at once.
    kick: CancellationToken,
    connections: AtomicUsize,
    /// Connections ever attached (the metrics' counter next to the gauge above).
    connections_total: AtomicU64,
    /// Requests served by this export (`x-query-export-stats`, metrics-http),
    /// shared with the kind's request handlers (FUSE, vhost-user-blk).
    pub stats: Arc<IoStats>,
    /// Signalled each time the last connection leaves (see [`Export::wait_until_idle`]).
    idle: tokio::sync::Notify,
}

impl Export {
    /// `stats` are the counters the kind was created with (see [`Export::stats`]).
    pub fn new(
        config: ExportConfig,
        hold: NodeHold,
        kind: Box<dyn ExportKind>,
        stats: Arc<IoStats>,
    ) -> Self {
        Self {
            config,
            node: hold.node().clone(),
            hold: Mutex::new(Some(hold)),
            kind,
            shutting_down: AtomicBool::new(false),
            kick: CancellationToken::new(),
            connections: AtomicUsize::new(0),
            connections_total: AtomicU64::new(0),
            stats,
            idle: tokio::sync::Notify::new(),
        }
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    pub fn kind(&self) -> &dyn ExportKind {
        self.kind.as_ref()
    }

    /// The kind's own part, if the export is of kind `K`.
    pub fn kind_as<K: ExportKind>(&self) -> Option<&K> {
        self.kind.as_any().downcast_ref::<K>()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Connections attached since the export was added.
    pub fn connections_total(&self) -> u64 {
        self.connections_total.load(Ordering::Relaxed)
    }

    /// The token a connection watches to learn it must drop (hard removal).
    pub fn kicked(&self) -> CancellationToken {
        self.kick.clone()
    }

    /// Returns once a client has been attached and then every client has
    /// left (`bexd serve` without `-t` exits then, as qemu-nbd does). A
    /// departure before the call counts: the signal is kept until awaited.
    pub async fn wait_until_idle(&self) {
        loop {
            self.idle.notified().await;
            if self.connection_count() == 0 {
                return;
            }
        }
    }

    /// Starts removal. With `hard`, connected clients are dropped.
    fn begin_shutdown(&self, hard: bool) {
        self.shutting_down.store(true, Ordering::Release);
        if hard {
            self.kick.cancel();
        }
    }

    /// Gives back the node hold and the kind's resources (at removal, before the event).
    fn release(&self) {
        self.kind.release();
        lock(&self.hold).take();
    }

    /// `query-block-exports`' entry.
    pub fn query(&self) -> serde_json::Value {
        json!({
            "id": self.id(),
            "type": self.kind.type_name(),
            "node-name": self.node.node_name(),
            "shutting-down": self.is_shutting_down(),
        })
    }
}

/// The live exports, oldest first, behind their own lock (held for
/// bookkeeping only, never across I/O).
#[derive(Debug)]
pub struct ExportTable {
    exports: Mutex<Vec<Arc<Export>>>,
    events: EventBus,
}

impl ExportTable {
    /// A table that announces deletions on `events`.
    pub fn new(events: EventBus) -> Self {
        Self {
            exports: Mutex::new(Vec::new()),
            events,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Export>>> {
        lock(&self.exports)
    }

    /// Adds an export: its id must be new and its kind must not clash with a live one.
    pub fn add(&self, export: Export) -> Result<(), ExportError> {
        let mut exports = self.lock();
        if exports.iter().any(|e| e.id() == export.id()) {
            return Err(ExportError::DuplicateId(export.id().to_string()));
        }
        let clash = exports
            .iter()
            .filter(|e| !e.is_shutting_down())
            .find_map(|e| export.kind().clashes_with(e.kind()));
        if let Some(err) = clash {
            return Err(err);
        }
        tracing::info!(
            id = export.id(),
            kind = export.kind().type_name(),
            "export added"
        );
        exports.push(Arc::new(export));
        Ok(())
    }

    /// `block-export-del`: hides the export at once; frees it when the last client is gone.
    pub fn remove(&self, id: &str, mode: RemoveMode) -> Result<(), ExportError> {
        let export = {
            let exports = self.lock();
            let Some(export) = exports.iter().find(|e| e.id() == id).cloned() else {
                return Err(ExportError::NotFound(id.to_string()));
            };
            if export.is_shutting_down() {
                return Err(ExportError::ShuttingDown(id.to_string()));
            }
            if mode == RemoveMode::Safe && export.connection_count() > 0 {
                return Err(ExportError::InUse(id.to_string()));
            }
            export.begin_shutdown(mode == RemoveMode::Hard);
            export
        };
        if export.connection_count() == 0 {
            self.finish_removal(id);
        }
        Ok(())
    }

    /// Frees a shutting-down export and announces it. Idempotent.
    fn finish_removal(&self, id: &str) {
        let removed = {
            let mut exports = self.lock();
            let at = exports
                .iter()
                .position(|e| e.id() == id && e.is_shutting_down());
            at.map(|i| exports.remove(i))
        };
        if let Some(export) = removed {
            export.release();
            tracing::info!(id, "export deleted");
            self.events
                .emit("BLOCK_EXPORT_DELETED", Some(json!({ "id": id })));
        }
    }

    /// Removes (hard) every export, or every export of one kind, as `quit`
    /// and `nbd-server-stop` do.
    pub fn remove_all(&self, type_name: Option<&str>) {
        let ids: Vec<String> = self
            .lock()
            .iter()
            .filter(|e| !e.is_shutting_down())
            .filter(|e| type_name.is_none_or(|t| e.kind().type_name() == t))
            .map(|e| e.id().to_string())
            .collect();
        for id in ids {
            let _ = self.remove(&id, RemoveMode::Hard);
        }
    }

    /// Finds the first visible export `pick` accepts and registers a client
    /// on it, under the table's lock so a concurrent safe removal sees the count.
    pub fn attach(self: &Arc<Self>, pick: impl Fn(&Export) -> bool) -> Option<ExportClient> {
        let exports = self.lock();
        let export = exports
            .iter()
            .find(|e| !e.is_shutting_down() && pick(e))?
            .clone();
        export.connections.fetch_add(1, Ordering::AcqRel);
        export.connections_total.fetch_add(1, Ordering::Relaxed);
        Some(ExportClient {
            export,
            table: self.clone(),
        })
    }

    /// Visible exports, oldest first.
    pub fn visible(&self) -> Vec<Arc<Export>> {
        self.lock()
            .iter()
            .filter(|e| !e.is_shutting_down())
            .cloned()
            .collect()
    }

    /// Every export, shutting-down ones included, oldest first.
    pub fn all(&self) -> Vec<Arc<Export>> {
        self.lock().clone()
    }
}

/// Held by each connection using an export; the last one to drop after the
/// export began shutting down frees the export.
#[derive(Debug)]
pub struct ExportClient {
    export: Arc<Export>,
    table: Arc<ExportTable>,
}

impl ExportClient {
    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }
}

impl Drop for ExportClient {
    fn drop(&mut self) {
        let left = self.export.connections.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0 {
            self.export.idle.notify_one();
        }
        if left == 0 && self.export.is_shutting_down() {
            self.table.finish_removal(self.export.id());
        }
    }
}

/// Locks bookkeeping that no update leaves half-done (every update here is a
/// push, a remove or a `take`), so a lock poisoned by a panic elsewhere still
/// guards a consistent value and is used as it is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
