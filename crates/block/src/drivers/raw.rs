//! The `raw` format: a window (`offset`, `size`) onto a child node.

use std::sync::Arc;

use crate::debug_event::DebugEvent;
use crate::driver::{Capabilities, Driver, Extent, ZeroFlags};
use crate::error::{BlockError, BlockErrorKind, BlockResult};
use crate::mapping::{Access, FileMapping};
use crate::node::BlockNode;
use crate::write_gen::{report_flush, WriteGen};

#[derive(Debug)]
pub struct RawDriver {
    child: Arc<BlockNode>,
    offset: u64,
    size: u64,
    /// `discard=unmap` on this node; QEMU passes discards down only if every layer allows it.
    discard: bool,
    /// For the flush events QEMU reports to the child (`flush_to_disk`
    /// only after a write).
    generation: WriteGen,
}

impl RawDriver {
    pub fn new(
        child: Arc<BlockNode>,
        offset: u64,
        size: Option<u64>,
        discard: bool,
    ) -> BlockResult<Self> {
        let child_size = child.size();
        let size = size.unwrap_or(child_size.saturating_sub(offset));
        if offset.checked_add(size).is_none_or(|end| end > child_size) {
            return Err(BlockError::new(
                BlockErrorKind::InvalidArgument,
                format!(
                    "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the  actual size of the containing file ({child_size})"
                ),
            ));
        }
        Ok(Self {
            child,
            offset,
            size,
            discard,
            generation: WriteGen::default(),
        })
    }

    fn inner(&self) -> &dyn Driver {
        self.child.driver().as_ref()
    }
}

impl Driver for RawDriver {
    fn driver_name(&self) -> &'static str {
        "raw"
    }

    fn size(&self) -> u64 {
        self.size
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

    /// Reports `read_aio` to the child first, as QEMU's raw format does.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.inner().debug_event(DebugEvent::ReadAio);
        self.inner().read_at(buf, self.offset + offset)
    }

    fn map_file(&self, offset: u64, len: u64, access: Access) -> Option<FileMapping<'_>> {
        self.inner().map_file(self.offset + offset, len, access)
    }

    fn mapping_written(&self, offset: u64, len: u64) {
        self.generation.wrote();
        self.child.record_write(self.offset + offset, len);
        self.inner().mapping_written(self.offset + offset, len);
    }

    fn try_read_now(&self, buf: &mut [u8], offset: u64) -> Option<BlockResult<()>> {
        self.inner().try_read_now(buf, self.offset + offset)
    }

    /// Reports `write_aio` to the child first, as QEMU's raw format does.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.inner().debug_event(DebugEvent::WriteAio);
        let r = self.inner().write_at(buf, self.offset + offset, fua);
        self.generation.wrote();
        self.child
            .record_write(self.offset + offset, buf.len() as u64);
        r
    }

    fn flush(&self) -> BlockResult<()> {
        let generation = report_flush(self.inner(), &self.generation);
        self.inner().flush()?;
        self.generation.flushed(generation);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        match self.discard {
            true => {
                self.generation.wrote();
                let r = self.inner().discard(self.offset + offset, len);
                if self.child.capabilities().can_discard {
                    self.child.record_write(self.offset + offset, len);
                }
                r
            }
            false => Ok(()),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        let flags = ZeroFlags {
            may_unmap: flags.may_unmap && self.discard,
            ..flags
        };
        self.generation.wrote();
        let r = self.inner().write_zeroes(self.offset + offset, len, flags);
        self.child.record_write(self.offset + offset, len);
        r
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.inner().block_status(self.offset + offset, len)
    }

    fn try_block_status_now(&self, offset: u64, len: u64) -> Option<BlockResult<Extent>> {
        self.inner().try_block_status_now(self.offset + offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.inner().cache(self.offset + offset, len)
    }
}
