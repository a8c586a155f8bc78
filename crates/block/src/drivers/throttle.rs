//! The `throttle` filter: passes every request to its child unchanged. The
//! limits are applied by the node above it, which is async and waits on a
//! timer (`BlockNode::with_throttle`); a synchronous driver could only
//! wait by blocking a thread.

use std::sync::Arc;

use crate::debug_event::DebugEvent;
use crate::driver::{Capabilities, Driver, Extent, ZeroFlags};
use crate::error::BlockResult;
use crate::mapping::{Access, FileMapping};
use crate::node::BlockNode;

#[derive(Debug)]
pub struct ThrottleDriver {
    child: Arc<BlockNode>,
    /// `discard=unmap` on this node: QEMU drops a discard at the first node
    /// without it, so the child sees discards only then.
    discard: bool,
}

impl ThrottleDriver {
    pub fn new(child: Arc<BlockNode>, discard: bool) -> Self {
        Self { child, discard }
    }

    fn inner(&self) -> &dyn Driver {
        self.child.driver().as_ref()
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
        let mut caps = self.child.capabilities();
        caps.can_write = caps.can_write && !self.child.read_only();
        caps.can_discard = caps.can_discard && self.discard;
        caps
    }

    fn debug_event(&self, event: DebugEvent) {
        self.inner().debug_event(event);
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.inner().read_at(buf, offset)
    }

    fn try_read_now(&self, buf: &mut [u8], offset: u64) -> Option<BlockResult<()>> {
        self.inner().try_read_now(buf, offset)
    }

    fn map_file(&self, offset: u64, len: u64, access: Access) -> Option<FileMapping<'_>> {
        self.inner().map_file(offset, len, access)
    }

    /// Bitmaps on the child see writes made through the filter, as in QEMU.
    fn mapping_written(&self, offset: u64, len: u64) {
        self.child.record_write(offset, len);
        self.inner().mapping_written(offset, len);
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        let r = self.inner().write_at(buf, offset, fua);
        self.child.record_write(offset, buf.len() as u64);
        r
    }

    fn flush(&self) -> BlockResult<()> {
        self.inner().flush()
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        if !self.discard {
            return Ok(());
        }
        let r = self.inner().discard(offset, len);
        if self.child.capabilities().can_discard {
            self.child.record_write(offset, len);
        }
        r
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        let flags = ZeroFlags {
            may_unmap: flags.may_unmap && self.discard,
            ..flags
        };
        let r = self.inner().write_zeroes(offset, len, flags);
        self.child.record_write(offset, len);
        r
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.inner().block_status(offset, len)
    }

    fn try_block_status_now(&self, offset: u64, len: u64) -> Option<BlockResult<Extent>> {
        self.inner().try_block_status_now(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.inner().cache(offset, len)
    }
}
