//! The daemon's state and the operations on it that the command line and QMP share.
//!
//! Everything lives behind one `std::sync::Mutex`, held only for short
//! bookkeeping (never across an `.await` and never on the data path: a
//! connection holds its own `Arc` to the export and node it serves).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use block::BlockNode;
use qmp::QmpError;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::events::EventBus;
use crate::export::{Export, ExportClient, ExportConfig};
use crate::monitor::ChardevConfig;
use crate::nbd_server::{NbdServer, NbdServerConfig};
use crate::objects::Object;
use crate::tls::TlsCreds;

/// How `block-export-del` treats connected clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse while clients are connected.
    Safe,
    /// Drop the clients.
    Hard,
}

/// A node in the graph, with the bookkeeping that decides whether it may be deleted.
#[derive(Debug)]
pub struct NodeEntry {
    pub node: Arc<BlockNode>,
    /// Nodes this one was opened on top of (e.g. raw's `file`).
    pub children: Vec<String>,
    /// How many other nodes use this one as a child.
    pub parents: usize,
    /// Whether the user named it (auto-named implicit children are deleted with their parent).
    pub implicit: bool,
    /// What QEMU shows as the node's `file`: the path for protocol nodes, the child's for formats.
    pub filename: String,
    /// Format details (qcow2) for query-named-block-nodes.
    pub format: Option<crate::blockdev::FormatInfo>,
}

#[derive(Debug, Default)]
pub struct State {
    pub nodes: BTreeMap<String, NodeEntry>,
    /// Exports, oldest first (QEMU lists newest first; `query` reverses).
    pub exports: Vec<Arc<Export>>,
    pub nbd: Option<NbdServer>,
    pub chardevs: BTreeMap<String, ChardevConfig>,
    /// `--object` / `object-add` objects by id.
    pub objects: BTreeMap<String, Object>,
}

#[derive(Debug)]
pub struct Daemon {
    state: Mutex<State>,
    pub events: EventBus,
    /// Fired by `quit` or a signal: everything winds down.
    pub shutdown: CancellationToken,
    /// Connection and monitor tasks, awaited on shutdown so in-flight requests finish.
    pub tasks: TaskTracker,
    node_counter: AtomicU64,
    /// Back-reference handed to connections and guards.
    this: Weak<Daemon>,
}

impl Daemon {
    pub fn new() -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            state: Mutex::new(State::default()),
            events: EventBus::new(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            node_counter: AtomicU64::new(0),
            this: this.clone(),
        })
    }

    pub fn weak(&self) -> Weak<Daemon> {
        self.this.clone()
    }

    /// Locks the state. A poisoned lock only means a panic elsewhere; the
    /// bookkeeping itself is still consistent, so carry on.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// QEMU's name for an implicitly created node: `#block` and a counter.
    pub fn generate_node_name(&self) -> String {
        let n = self.node_counter.fetch_add(1, Ordering::Relaxed);
        format!("#block{:03}", n + 100)
    }

    pub fn find_node(&self, name: &str) -> Option<Arc<BlockNode>> {
        self.state().nodes.get(name).map(|e| e.node.clone())
    }

    pub fn node_names(&self) -> std::collections::BTreeSet<String> {
        self.state().nodes.keys().cloned().collect()
    }

    /// Removes (and closes) the implicit nodes not in `before` that no node uses.
    pub fn remove_orphans_since(&self, before: &std::collections::BTreeSet<String>) {
        let mut state = self.state();
        let orphans: Vec<String> = state
            .nodes
            .iter()
            .filter(|(name, e)| !before.contains(*name) && e.implicit && e.parents == 0)
            .map(|(name, _)| name.clone())
            .collect();
        let mut removed = Vec::new();
        for name in orphans {
            remove_node_tree(&mut state, &name, &mut removed);
        }
        drop(state);
        close_nodes(removed);
    }

    pub fn insert_node(&self, entry: NodeEntry) -> Result<(), QmpError> {
        let mut state = self.state();
        let name = entry.node.node_name().to_string();
        if state.nodes.contains_key(&name) {
            return Err(QmpError::generic(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
        for child in &entry.children {
            if let Some(c) = state.nodes.get_mut(child) {
                c.parents += 1;
            }
        }
        state.nodes.insert(name, entry);
        Ok(())
    }

    /// `blockdev-del`: refused while the node is exported or used by another node.
    pub fn delete_node(&self, name: &str) -> Result<(), QmpError> {
        let mut state = self.state();
        let Some(entry) = state.nodes.get(name) else {
            return Err(QmpError::generic(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        if state.exports.iter().any(|e| e.node.node_name() == name) {
            return Err(QmpError::generic(format!("Node {name} is in use")));
        }
        if entry.parents > 0 {
            return Err(QmpError::generic(format!("Block device {name} is in use")));
        }
        let mut removed = Vec::new();
        remove_node_tree(&mut state, name, &mut removed);
        drop(state);
        // Closing stores persistent bitmaps: I/O, so outside the state lock.
        close_nodes(removed);
        Ok(())
    }

    pub fn add_export(&self, export: Export) -> Result<(), QmpError> {
        let mut state = self.state();
        if state.exports.iter().any(|e| e.id() == export.id()) {
            return Err(QmpError::generic(format!(
                "Block export id '{}' is already in use",
                export.id()
            )));
        }
        if state
            .exports
            .iter()
            .any(|e| !e.is_shutting_down() && e.name() == export.name())
        {
            return Err(QmpError::generic(format!(
                "NBD server already has export named '{}'",
                export.name()
            )));
        }
        tracing::info!(id = export.id(), name = export.name(), "export added");
        state.exports.push(Arc::new(export));
        Ok(())
    }

    /// `block-export-del`: hides the export at once; frees it when the last client is gone.
    pub fn remove_export(&self, id: &str, mode: RemoveMode) -> Result<(), QmpError> {
        let export = {
            let state = self.state();
            let Some(export) = state.exports.iter().find(|e| e.id() == id).cloned() else {
                return Err(QmpError::generic(format!("Export '{id}' is not found")));
            };
            if export.is_shutting_down() {
                return Err(QmpError::generic(format!(
                    "Export '{id}' is already shutting down"
                )));
            }
            if mode == RemoveMode::Safe && export.connection_count() > 0 {
                return Err(QmpError::generic(format!(
                    "export '{}' still in use",
                    export.id()
                )));
            }
            export.begin_shutdown(mode == RemoveMode::Hard);
            export
        };
        if export.connection_count() == 0 {
            self.finish_export_removal(id);
        }
        Ok(())
    }

    /// Frees a shutting-down export and announces it. Idempotent.
    pub fn finish_export_removal(&self, id: &str) {
        let removed = {
            let mut state = self.state();
            let before = state.exports.len();
            state.exports.retain(|e| {
                let gone = e.id() == id && e.is_shutting_down();
                if gone {
                    e.release_bitmaps();
                }
                !gone
            });
            state.exports.len() != before
        };
        if removed {
            tracing::info!(id, "export deleted");
            self.events
                .emit("BLOCK_EXPORT_DELETED", Some(json!({ "id": id })));
        }
    }

    /// Removes every export (hard), as `nbd-server-stop` and `quit` do.
    pub fn remove_all_exports(&self) {
        let ids: Vec<String> = self
            .state()
            .exports
            .iter()
            .filter(|e| !e.is_shutting_down())
            .map(|e| e.id().to_string())
            .collect();
        for id in ids {
            let _ = self.remove_export(&id, RemoveMode::Hard);
        }
    }

    /// Finds a visible export by NBD name and registers a client on it.
    pub fn attach_client(&self, name: &str) -> Option<ExportClient> {
        let state = self.state();
        let export = state
            .exports
            .iter()
            .find(|e| !e.is_shutting_down() && e.name() == name)?
            .clone();
        Some(ExportClient::attach(export, self.weak()))
    }

    /// Visible exports, oldest first.
    pub fn visible_exports(&self) -> Vec<Arc<Export>> {
        self.state()
            .exports
            .iter()
            .filter(|e| !e.is_shutting_down())
            .cloned()
            .collect()
    }

    pub fn start_nbd_server(&self, mut config: NbdServerConfig) -> Result<(), QmpError> {
        if self.state().nbd.is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        config.tls = match &config.tls_creds {
            Some(id) => Some(self.server_tls_creds(id)?),
            None => None,
        };
        let server = NbdServer::start(config, self.weak())?;
        let mut state = self.state();
        if state.nbd.is_some() {
            server.stop();
            return Err(QmpError::generic("NBD server already running"));
        }
        state.nbd = Some(server);
        Ok(())
    }

    pub fn stop_nbd_server(&self) -> Result<(), QmpError> {
        let Some(server) = self.state().nbd.take() else {
            return Err(QmpError::generic("NBD server not running"));
        };
        self.remove_all_exports();
        server.stop();
        Ok(())
    }

    /// Whether clients may use several connections to one export (QEMU: unless max-connections=1).
    pub fn multi_conn(&self) -> bool {
        self.state()
            .nbd
            .as_ref()
            .is_some_and(|s| s.max_connections() != 1)
    }

    pub fn add_export_config(&self, config: ExportConfig, node_name: &str) -> Result<(), QmpError> {
        if self.state().nbd.is_none() {
            return Err(QmpError::generic("NBD server not running"));
        }
        let node = self.find_node(node_name).ok_or_else(|| {
            QmpError::generic(format!("Cannot find device='' nor node-name='{node_name}'"))
        })?;
        if let Some(iothread) = &config.iothread {
            if !matches!(self.state().objects.get(iothread), Some(Object::Iothread)) {
                return Err(QmpError::generic(format!(
                    "iothread \"{iothread}\" not found"
                )));
            }
        }
        if config.writable && node.read_only() {
            return Err(QmpError::generic(
                "Cannot export read-only node as writable",
            ));
        }
        let bitmaps = crate::export_bitmaps::resolve(self, &config, &node)?;
        self.add_export(Export::new(config, node, bitmaps))
    }

    pub fn add_object(&self, id: String, object: Object) -> Result<(), QmpError> {
        let mut state = self.state();
        if state.objects.contains_key(&id) {
            return Err(QmpError::generic(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        state.objects.insert(id, object);
        Ok(())
    }

    pub fn delete_object(&self, id: &str) -> Result<(), QmpError> {
        match self.state().objects.remove(id) {
            Some(_) => Ok(()),
            None => Err(QmpError::generic(format!("object '{id}' not found"))),
        }
    }

    /// The server-endpoint TLS credentials `tls-creds` names, with QEMU's errors.
    pub fn server_tls_creds(&self, id: &str) -> Result<Arc<TlsCreds>, QmpError> {
        match self.state().objects.get(id) {
            None => Err(QmpError::generic(format!(
                "No TLS credentials with id '{id}'"
            ))),
            Some(Object::TlsCreds(c)) if c.is_server() => Ok(c.clone()),
            Some(Object::TlsCreds(_)) => Err(QmpError::generic(
                "Expected TLS credentials for a server endpoint",
            )),
            Some(_) => Err(QmpError::generic(format!(
                "Object with id '{id}' is not TLS credentials"
            ))),
        }
    }

    /// Whether the authz object `authz_id` lets `identity` in. Looked up now,
    /// at the time of use; a missing object (or one of another type) denies.
    pub fn authorize(&self, authz_id: &str, identity: &str) -> bool {
        match self.state().objects.get(authz_id) {
            Some(Object::Authz(a)) => a.is_allowed(identity),
            _ => false,
        }
    }

    /// `quit`: the main task notices and shuts the daemon down.
    pub fn begin_quit(&self) {
        self.shutdown.cancel();
    }

    fn all_nodes(&self) -> Vec<Arc<BlockNode>> {
        self.state()
            .nodes
            .values()
            .map(|e| e.node.clone())
            .collect()
    }

    /// Flushes every node; used at shutdown so nothing acknowledged is left in caches.
    pub async fn flush_all(&self) {
        let nodes = self.all_nodes();
        for node in nodes {
            if node.read_only() {
                continue;
            }
            if let Err(e) = node.flush().await {
                tracing::error!(node = node.node_name(), error = %e, "flush at shutdown failed");
            }
        }
    }

    /// Closes every node, storing persistent bitmaps; the last step of shutdown.
    pub async fn close_all(&self) {
        let nodes = self.all_nodes();
        let closing = tokio::task::spawn_blocking(move || {
            close_nodes(nodes);
        });
        let _ = closing.await;
    }
}

/// Closes nodes taken out of the table (storing their persistent bitmaps).
fn close_nodes(nodes: Vec<Arc<BlockNode>>) {
    for node in nodes {
        if let Err(e) = node.close() {
            tracing::error!(node = node.node_name(), error = %e, "closing the node failed");
        }
    }
}

/// Removes a node and, recursively, the implicit children nobody else uses;
/// `removed` gets them, parents before children, for closing.
fn remove_node_tree(state: &mut State, name: &str, removed: &mut Vec<Arc<BlockNode>>) {
    let Some(entry) = state.nodes.remove(name) else {
        return;
    };
    removed.push(entry.node.clone());
    for child in entry.children {
        let Some(c) = state.nodes.get_mut(&child) else {
            continue;
        };
        c.parents = c.parents.saturating_sub(1);
        if c.parents == 0 && c.implicit {
            remove_node_tree(state, &child, removed);
        }
    }
}
