//! The `throttle` filter: passes every request to its child unchanged. The
//! limits are applied by the node above it, which is async and waits on a
//! timer (`BlockNode::with_throttle`); a synchronous driver could only
//! wait by blocking a thread. The child is reached through a
//! [`MarkingChild`], so its bitmaps and write threshold see the writes made
//! through the filter, as in QEMU.

use std::sync::Arc;

use crate::debug_event::DebugEvent;
use crate::driver::{Capabilities, Driver, Extent, ZeroFlags};
use crate::drivers::child::MarkingChild;
use crate::error::BlockResult;
use crate::mapping::{Access, FileMapping};
use crate::node::BlockNode;

#[derive(Debug)]
pub struct ThrottleDriver {
    child: MarkingChild,
    /// `discard=unmap` on this node: QEMU drops a discard at the first node
    /// without it, so the child sees discards only then.
    discard: bool,
}

impl ThrottleDriver {
    pub fn new(child: Arc<BlockNode>, discard: bool) -> Self {
        Self {
            child: MarkingChild::new(child),
            discard,
        }
    }

    fn node(&self) -> &BlockNode {
        self.child.node()
    }
}

impl Driver for ThrottleDriver {
    fn driver_name(&self) -> &'static str {
        "throttle"
    }

    fn size(&self) -> u64 {
        self.child.size()
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = self.node().capabilities();
        caps.can_write = caps.can_write && !self.node().read_only();
        caps.can_discard = caps.can_discard && self.discard;
        caps
    }

    fn debug_event(&self, event: DebugEvent) {
        self.child.debug_event(event);
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.child.read_at(buf, offset)
    }

    fn try_read_now(&self, buf: &mut [u8], offset: u64) -> Option<BlockResult<()>> {
        self.child.try_read_now(buf, offset)
    }

    /// Writes too (unlike a format's view of its child): the node above
    /// reports them back through [`Driver::mapping_written`].
    fn map_file(&self, offset: u64, len: u64, access: Access) -> Option<FileMapping<'_>> {
        self.node().driver().map_file(offset, len, access)
    }

    fn mapping_written(&self, offset: u64, len: u64) {
        self.node().record_write(offset, len);
        self.node().driver().mapping_written(offset, len);
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.child.write_at(buf, offset, fua)
    }

    fn flush(&self) -> BlockResult<()> {
        self.child.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        match self.discard {
            true => self.child.discard(offset, len),
            false => Ok(()),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        let flags = ZeroFlags {
            may_unmap: flags.may_unmap && self.discard,
            ..flags
        };
        self.child.write_zeroes(offset, len, flags)
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.child.block_status(offset, len)
    }

    fn try_block_status_now(&self, offset: u64, len: u64) -> Option<BlockResult<Extent>> {
        self.child.try_block_status_now(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.child.cache(offset, len)
    }
}
