//! A format driver's view of its child node: the child's driver, with the
//! child's dirty bitmaps marked for every write made through it.
//!
//! In QEMU every layer tracks the writes that reach it, so a bitmap on the
//! `file` node under a qcow2 node records the image's metadata writes too.
//! Format drivers call their child's driver directly (no async hop, no
//! second range check), so this wrapper does the marking the node would.
//!
//! The child can be replaced while the node serves (`blockdev-reopen` puts
//! a copy-before-write filter between a format and its file, and takes it
//! out again): [`ChildSlot`]. The caller drains the parent's writes first.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use crate::debug_event::DebugEvent;
use crate::driver::{Capabilities, Driver, Extent, ZeroFlags};
use crate::error::BlockResult;
use crate::mapping::{Access, FileMapping};
use crate::node::BlockNode;

/// A child node that `blockdev-reopen` may replace. The node opened with
/// stays owned here for the slot's life, so the common case (never
/// replaced) costs one relaxed load and no reference count, and a file
/// mapping may borrow it.
#[derive(Debug)]
pub struct ChildSlot {
    original: Arc<BlockNode>,
    replaced: AtomicBool,
    /// The child in use while `replaced`. The lock is only held to clone
    /// or set the `Arc`, so a panic cannot leave it half-written.
    current: RwLock<Arc<BlockNode>>,
}

/// The child in use for one call.
pub enum ChildGuard<'a> {
    Original(&'a Arc<BlockNode>),
    Replaced(Arc<BlockNode>),
}

impl Deref for ChildGuard<'_> {
    type Target = Arc<BlockNode>;
    fn deref(&self) -> &Arc<BlockNode> {
        match self {
            Self::Original(n) => n,
            Self::Replaced(n) => n,
        }
    }
}

impl ChildSlot {
    pub fn new(node: Arc<BlockNode>) -> Self {
        Self {
            current: RwLock::new(node.clone()),
            original: node,
            replaced: AtomicBool::new(false),
        }
    }

    pub fn get(&self) -> ChildGuard<'_> {
        if !self.replaced.load(Ordering::Acquire) {
            return ChildGuard::Original(&self.original);
        }
        ChildGuard::Replaced(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    /// The child, when it is the one the slot was opened with (file
    /// mappings borrow it, so they are only handed out then).
    pub fn original_in_use(&self) -> Option<&Arc<BlockNode>> {
        (!self.replaced.load(Ordering::Acquire)).then_some(&self.original)
    }

    /// Puts `node` in; returns the child it replaces.
    pub fn replace(&self, node: Arc<BlockNode>) -> Arc<BlockNode> {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let replaced = !Arc::ptr_eq(&node, &self.original);
        let old = std::mem::replace(&mut *current, node);
        self.replaced.store(replaced, Ordering::Release);
        old
    }
}

#[derive(Debug)]
pub struct MarkingChild {
    slot: ChildSlot,
}

impl MarkingChild {
    pub fn new(node: Arc<BlockNode>) -> Self {
        Self {
            slot: ChildSlot::new(node),
        }
    }

    /// The child node it was opened with.
    pub fn node(&self) -> &Arc<BlockNode> {
        &self.slot.original
    }

    /// The child in use now, and where `blockdev-reopen` replaces it.
    pub fn slot(&self) -> &ChildSlot {
        &self.slot
    }

    fn n(&self) -> ChildGuard<'_> {
        self.slot.get()
    }
}

impl Driver for MarkingChild {
    fn driver_name(&self) -> &'static str {
        self.n().driver().driver_name()
    }

    fn size(&self) -> u64 {
        self.n().driver().size()
    }

    fn capabilities(&self) -> Capabilities {
        self.n().driver().capabilities()
    }

    fn current_len(&self) -> Option<u64> {
        self.n().driver().current_len()
    }

    fn debug_event(&self, event: DebugEvent) {
        self.n().driver().debug_event(event);
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.n().driver().read_at(buf, offset)
    }

    fn try_read_now(&self, buf: &mut [u8], offset: u64) -> Option<BlockResult<()>> {
        self.n().driver().try_read_now(buf, offset)
    }

    /// Reads only: a write straight into the file would skip the marking.
    fn map_file(&self, offset: u64, len: u64, access: Access) -> Option<FileMapping<'_>> {
        match access {
            Access::Read => self
                .slot
                .original_in_use()?
                .driver()
                .map_file(offset, len, access),
            Access::Write => None,
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        let n = self.n();
        let r = n.driver().write_at(buf, offset, fua);
        n.record_write(offset, buf.len() as u64);
        r
    }

    fn flush(&self) -> BlockResult<()> {
        self.n().driver().flush()
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        let n = self.n();
        let r = n.driver().discard(offset, len);
        if n.capabilities().can_discard {
            n.record_write(offset, len);
        }
        r
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        let n = self.n();
        let r = n.driver().write_zeroes(offset, len, flags);
        n.record_write(offset, len);
        r
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.n().driver().block_status(offset, len)
    }

    fn try_block_status_now(&self, offset: u64, len: u64) -> Option<BlockResult<Extent>> {
        self.n().driver().try_block_status_now(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.n().driver().cache(offset, len)
    }
}
