//! A format driver's view of its child node: the child's driver, with the
//! child's dirty bitmaps marked for every write made through it.
//!
//! In QEMU every layer tracks the writes that reach it, so a bitmap on the
//! `file` node under a qcow2 node records the image's metadata writes too.
//! Format drivers call their child's driver directly (no async hop, no
//! second range check), so this wrapper does the marking the node would.

use std::sync::Arc;

use crate::debug_event::DebugEvent;
use crate::driver::{Capabilities, Driver, Extent, ZeroFlags};
use crate::error::BlockResult;
use crate::mapping::{Access, FileMapping};
use crate::node::BlockNode;

#[derive(Debug)]
pub struct MarkingChild {
    node: Arc<BlockNode>,
}

impl MarkingChild {
    pub fn new(node: Arc<BlockNode>) -> Self {
        Self { node }
    }

    /// The child node itself.
    pub fn node(&self) -> &Arc<BlockNode> {
        &self.node
    }

    fn d(&self) -> &dyn Driver {
        self.node.driver().as_ref()
    }
}

impl Driver for MarkingChild {
    fn driver_name(&self) -> &'static str {
        self.d().driver_name()
    }

    fn size(&self) -> u64 {
        self.d().size()
    }

    fn capabilities(&self) -> Capabilities {
        self.d().capabilities()
    }

    fn debug_event(&self, event: DebugEvent) {
        self.d().debug_event(event);
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.d().read_at(buf, offset)
    }

    fn try_read_now(&self, buf: &mut [u8], offset: u64) -> Option<BlockResult<()>> {
        self.d().try_read_now(buf, offset)
    }

    /// Reads only: a write straight into the file would skip the marking.
    fn map_file(&self, offset: u64, len: u64, access: Access) -> Option<FileMapping<'_>> {
        match access {
            Access::Read => self.d().map_file(offset, len, access),
            Access::Write => None,
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        let r = self.d().write_at(buf, offset, fua);
        self.node.record_write(offset, buf.len() as u64);
        r
    }

    fn flush(&self) -> BlockResult<()> {
        self.d().flush()
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        let r = self.d().discard(offset, len);
        if self.node.capabilities().can_discard {
            self.node.record_write(offset, len);
        }
        r
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        let r = self.d().write_zeroes(offset, len, flags);
        self.node.record_write(offset, len);
        r
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.d().block_status(offset, len)
    }

    fn try_block_status_now(&self, offset: u64, len: u64) -> Option<BlockResult<Extent>> {
        self.d().try_block_status_now(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.d().cache(offset, len)
    }
}
