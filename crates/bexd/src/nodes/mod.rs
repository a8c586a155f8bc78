//! The node table: the block graph by node name, behind its own lock.
//!
//! Nodes are opened by [`open`] (from plain [`crate::config::NodeOptions`]),
//! registered here, and held by exports through a [`NodeHold`], so
//! `blockdev-del` can refuse an exported node without asking the export table.
//! The lock guards bookkeeping only; it is never held across I/O or an
//! `.await`, and the data path never takes it (a connection holds its own
//! `Arc<BlockNode>`).

pub mod bitmaps;
mod open;

pub use open::open;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use block::drivers::cbw::CbwDriver;
use block::drivers::child::ChildSlot;
use block::drivers::qcow2::{Qcow2Driver, Qcow2Info};
use block::drivers::raw::RawDriver;
use block::throttle::ThrottleGroups;
use block::{BlockNode, NodeObserver};

use crate::error::NodeError;

/// What a format node shows beyond the common fields (qcow2's image info and backing).
#[derive(Clone, Debug)]
pub struct FormatInfo {
    pub qcow2: Qcow2Info,
    pub backing_node: Option<String>,
    /// The backing file's path as opened (QEMU's full-backing-filename).
    pub full_backing_filename: Option<String>,
}

/// A node whose `file` child `blockdev-reopen` can replace.
#[derive(Clone, Debug)]
pub enum Reopenable {
    Raw(Arc<RawDriver>),
    Qcow2(Arc<Qcow2Driver>),
}

impl Reopenable {
    pub fn slot(&self) -> &ChildSlot {
        match self {
            Self::Raw(d) => d.child_slot(),
            Self::Qcow2(d) => d.child_slot(),
        }
    }
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
    pub format: Option<FormatInfo>,
    /// How many exports hold this node ([`NodeHold`]s alive).
    users: Arc<AtomicUsize>,
    /// Where `blockdev-reopen` replaces the `file` child.
    pub reopen: Option<Reopenable>,
    /// A copy-before-write node's driver (its snapshot, for `snapshot-access`).
    pub cbw: Option<Arc<CbwDriver>>,
    /// The options it was opened with (`blockdev-reopen` compares).
    pub options: Option<crate::config::NodeOptions>,
}

impl NodeEntry {
    pub fn new(
        node: Arc<BlockNode>,
        children: Vec<String>,
        implicit: bool,
        filename: String,
        format: Option<FormatInfo>,
    ) -> Self {
        Self {
            node,
            children,
            parents: 0,
            implicit,
            filename,
            format,
            users: Arc::default(),
            reopen: None,
            cbw: None,
            options: None,
        }
    }
}

/// An export's claim on a node: while it lives, `blockdev-del` refuses the node.
#[derive(Debug)]
pub struct NodeHold {
    node: Arc<BlockNode>,
    users: Arc<AtomicUsize>,
}

impl NodeHold {
    pub fn node(&self) -> &Arc<BlockNode> {
        &self.node
    }
}

impl Drop for NodeHold {
    fn drop(&mut self) {
        self.users.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The nodes by name, sorted (QEMU lists them in creation order per graph;
/// bexd's order is by name, as before).
pub type Nodes = BTreeMap<String, NodeEntry>;

#[derive(Debug, Default)]
pub struct NodeTable {
    nodes: Mutex<Nodes>,
    counter: AtomicU64,
    /// Where throttle nodes find their group (the object table adds them).
    throttle_groups: Arc<ThrottleGroups>,
    /// Hears every node's write threshold and corruption reports (the
    /// daemon's event bus); `None` in tests that need no events.
    observer: Option<Arc<dyn NodeObserver>>,
}

impl NodeTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// A table whose throttle nodes join the groups in `groups` and whose
    /// nodes report to `observer`.
    pub fn new_in(groups: Arc<ThrottleGroups>, observer: Arc<dyn NodeObserver>) -> Self {
        Self {
            throttle_groups: groups,
            observer: Some(observer),
            ..Self::default()
        }
    }

    pub fn throttle_groups(&self) -> &ThrottleGroups {
        &self.throttle_groups
    }

    /// Who the nodes opened into this table report to.
    pub fn observer(&self) -> Option<Arc<dyn NodeObserver>> {
        self.observer.clone()
    }

    /// The table for reading (queries). A poisoned lock only means a panic
    /// elsewhere between two consistent updates (no update here can panic
    /// half-way), so the map is still whole and is used as it is.
    pub fn lock(&self) -> MutexGuard<'_, Nodes> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// QEMU's name for an implicitly created node: `#block` and a counter.
    pub fn generate_name(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("#block{:03}", n + 100)
    }

    pub fn find(&self, name: &str) -> Option<Arc<BlockNode>> {
        self.lock().get(name).map(|e| e.node.clone())
    }

    /// A node and the filename it shows, for a parent opening on top of it.
    pub fn find_with_filename(&self, name: &str) -> Option<(Arc<BlockNode>, String)> {
        self.lock()
            .get(name)
            .map(|e| (e.node.clone(), e.filename.clone()))
    }

    /// How many nodes use `name` as a child (0 for an unknown node).
    pub fn parents(&self, name: &str) -> usize {
        self.lock().get(name).map_or(0, |e| e.parents)
    }

    pub fn names(&self) -> BTreeSet<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn all(&self) -> Vec<Arc<BlockNode>> {
        self.lock().values().map(|e| e.node.clone()).collect()
    }

    /// Holds `name` for an export; `NoSuchDevice` if it is not there.
    pub fn hold(&self, name: &str) -> Result<NodeHold, NodeError> {
        let nodes = self.lock();
        let entry = nodes
            .get(name)
            .ok_or_else(|| NodeError::NoSuchDevice(name.to_string()))?;
        entry.users.fetch_add(1, Ordering::AcqRel);
        Ok(NodeHold {
            node: entry.node.clone(),
            users: entry.users.clone(),
        })
    }

    pub fn insert(&self, entry: NodeEntry) -> Result<(), NodeError> {
        let mut nodes = self.lock();
        let name = entry.node.node_name().to_string();
        if nodes.contains_key(&name) {
            return Err(NodeError::Duplicate(name));
        }
        for child in &entry.children {
            if let Some(c) = nodes.get_mut(child) {
                c.parents += 1;
            }
        }
        nodes.insert(name, entry);
        Ok(())
    }

    /// `blockdev-del`: refused while an export holds the node or another node uses it.
    pub fn delete(&self, name: &str) -> Result<(), NodeError> {
        let mut nodes = self.lock();
        let Some(entry) = nodes.get(name) else {
            return Err(NodeError::NotFound(name.to_string()));
        };
        if entry.users.load(Ordering::Acquire) > 0 {
            return Err(NodeError::Exported(name.to_string()));
        }
        if entry.parents > 0 {
            return Err(NodeError::HasParents(name.to_string()));
        }
        let mut removed = Vec::new();
        remove_tree(&mut nodes, name, &mut removed);
        drop(nodes);
        // Closing stores persistent bitmaps: I/O, so outside the lock.
        close_nodes(removed);
        Ok(())
    }

    /// `blockdev-reopen` replaced `parent`'s child `old` with `new`.
    pub fn replace_child(&self, parent: &str, old: &str, new: &str) {
        let mut nodes = self.lock();
        if let Some(p) = nodes.get_mut(parent) {
            for c in p.children.iter_mut().filter(|c| *c == old) {
                *c = new.to_string();
            }
        }
        if let Some(o) = nodes.get_mut(old) {
            o.parents = o.parents.saturating_sub(1);
        }
        if let Some(n) = nodes.get_mut(new) {
            n.parents += 1;
        }
    }

    /// Whether `name` is `ancestor` or lies below it.
    pub fn reaches(&self, name: &str, ancestor: &str) -> bool {
        let nodes = self.lock();
        let mut stack = vec![name.to_string()];
        while let Some(n) = stack.pop() {
            if n == ancestor {
                return true;
            }
            if let Some(e) = nodes.get(&n) {
                stack.extend(e.children.iter().cloned());
            }
        }
        false
    }

    /// Removes (and closes) the implicit nodes not in `before` that no node uses.
    pub fn remove_orphans_since(&self, before: &BTreeSet<String>) {
        let mut nodes = self.lock();
        let orphans: Vec<String> = nodes
            .iter()
            .filter(|(name, e)| !before.contains(*name) && e.implicit && e.parents == 0)
            .map(|(name, _)| name.clone())
            .collect();
        let mut removed = Vec::new();
        for name in orphans {
            remove_tree(&mut nodes, &name, &mut removed);
        }
        drop(nodes);
        close_nodes(removed);
    }

    /// Flushes every writable node; used at shutdown so nothing acknowledged is left in caches.
    pub async fn flush_all(&self) {
        for node in self.all() {
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
        let nodes = self.all();
        let _ = tokio::task::spawn_blocking(move || close_nodes(nodes)).await;
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
fn remove_tree(nodes: &mut Nodes, name: &str, removed: &mut Vec<Arc<BlockNode>>) {
    let Some(entry) = nodes.remove(name) else {
        return;
    };
    removed.push(entry.node.clone());
    for child in entry.children {
        let Some(c) = nodes.get_mut(&child) else {
            continue;
        };
        c.parents = c.parents.saturating_sub(1);
        if c.parents == 0 && c.implicit {
            remove_tree(nodes, &child, removed);
        }
    }
}
