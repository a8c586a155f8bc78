//! The `raw` format: a window (`offset`, `size`) onto a child node.

use std::sync::Arc;

use crate::buf::IoBuf;
use crate::debug_event::DebugEvent;
use crate::driver::{AsyncDriver, Capabilities, Driver, Extent, IoFuture, ZeroFlags};
use crate::drivers::child::{ChildGuard, ChildSlot};
use crate::error::{BlockError, BlockErrorKind, BlockResult};
use crate::mapping::{Access, FileMapping};
use crate::node::BlockNode;
use crate::write_gen::{report_flush, WriteGen};

#[derive(Debug)]
pub struct RawDriver {
    /// Replaceable by `blockdev-reopen` (see `child.rs`).
    child: ChildSlot,
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
            child: ChildSlot::new(child),
            offset,
            size,
            discard,
            generation: WriteGen::default(),
        })
    }

    fn c(&self) -> ChildGuard<'_> {
        self.child.get()
    }

    /// Where `blockdev-reopen` replaces the child.
    pub fn child_slot(&self) -> &ChildSlot {
        &self.child
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
        let c = self.c();
        let mut caps = c.capabilities();
        caps.can_write = caps.can_write && !c.read_only();
        caps.can_discard = caps.can_discard && self.discard;
        caps
    }

    fn debug_event(&self, event: DebugEvent) {
        self.c().driver().debug_event(event);
    }

    /// Reports `read_aio` to the child first, as QEMU's raw format does.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let c = self.c();
        c.driver().debug_event(DebugEvent::ReadAio);
        c.driver().read_at(buf, self.offset + offset)
    }

    fn map_file(&self, offset: u64, len: u64, access: Access) -> Option<FileMapping<'_>> {
        // Only from the child opened with: a filter put in its place
        // (copy-before-write) must see every write.
        let child = self.child.original_in_use()?;
        child.driver().map_file(self.offset + offset, len, access)
    }

    fn mapping_written(&self, offset: u64, len: u64) {
        self.generation.wrote();
        let c = self.c();
        c.record_write(self.offset + offset, len);
        c.driver().mapping_written(self.offset + offset, len);
    }

    fn try_read_now(&self, buf: &mut [u8], offset: u64) -> Option<BlockResult<()>> {
        self.c().driver().try_read_now(buf, self.offset + offset)
    }

    /// Reports `write_aio` to the child first, as QEMU's raw format does.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        let c = self.c();
        c.driver().debug_event(DebugEvent::WriteAio);
        let r = c.driver().write_at(buf, self.offset + offset, fua);
        self.generation.wrote();
        c.record_write(self.offset + offset, buf.len() as u64);
        r
    }

    fn flush(&self) -> BlockResult<()> {
        let c = self.c();
        let generation = report_flush(c.driver().as_ref(), &self.generation);
        c.driver().flush()?;
        self.generation.flushed(generation);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        match self.discard {
            true => {
                self.generation.wrote();
                let c = self.c();
                let r = c.driver().discard(self.offset + offset, len);
                if c.capabilities().can_discard {
                    c.record_write(self.offset + offset, len);
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
        let c = self.c();
        let r = c.driver().write_zeroes(self.offset + offset, len, flags);
        c.record_write(self.offset + offset, len);
        r
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.c().driver().block_status(self.offset + offset, len)
    }

    fn try_block_status_now(&self, offset: u64, len: u64) -> Option<BlockResult<Extent>> {
        self.c()
            .driver()
            .try_block_status_now(self.offset + offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.c().driver().cache(self.offset + offset, len)
    }

    /// Over a child that completes asynchronously (rbd, nbd), raw does too:
    /// its window is an offset added on the way down, so a request needs no
    /// thread of its own any more than the child's do.
    fn async_driver(&self) -> Option<Arc<dyn AsyncDriver>> {
        let child = self.child.original_in_use()?;
        child.async_driver()?;
        Some(Arc::new(RawOverAsync {
            child: child.clone(),
            offset: self.offset,
            discard: self.discard,
        }))
    }
}

/// Raw's window onto a child whose driver is asynchronous. Requests go
/// through the child node's async edge, which marks the child's bitmaps and
/// checks its write threshold as the synchronous path's `record_write` does.
/// No debug events: blkdebug is synchronous, so it is never such a child.
#[derive(Debug)]
struct RawOverAsync {
    child: Arc<BlockNode>,
    offset: u64,
    discard: bool,
}

impl AsyncDriver for RawOverAsync {
    fn read(&self, buf: IoBuf, offset: u64) -> IoFuture<(IoBuf, BlockResult<()>)> {
        let (child, at) = (self.child.clone(), self.offset + offset);
        Box::pin(async move { child.read(buf, at).await })
    }

    fn write(&self, buf: IoBuf, offset: u64, fua: bool) -> IoFuture<(IoBuf, BlockResult<()>)> {
        let (child, at) = (self.child.clone(), self.offset + offset);
        Box::pin(async move { child.write(buf, at, fua).await })
    }

    fn flush(&self) -> IoFuture<BlockResult<()>> {
        let child = self.child.clone();
        Box::pin(async move { child.flush().await })
    }

    /// Passed down only with `discard=unmap` on this node, as QEMU passes
    /// discards down only if every layer allows it.
    fn discard(&self, offset: u64, len: u64) -> IoFuture<BlockResult<()>> {
        let (child, at, pass) = (self.child.clone(), self.offset + offset, self.discard);
        Box::pin(async move {
            match pass {
                true => child.discard(at, len).await,
                false => Ok(()),
            }
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<BlockResult<()>> {
        let (child, at) = (self.child.clone(), self.offset + offset);
        let flags = ZeroFlags {
            may_unmap: flags.may_unmap && self.discard,
            ..flags
        };
        Box::pin(async move { child.write_zeroes(at, len, flags).await })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<BlockResult<Extent>> {
        let (child, at) = (self.child.clone(), self.offset + offset);
        Box::pin(async move { child.block_status(at, len).await })
    }

    fn cache(&self, offset: u64, len: u64) -> IoFuture<BlockResult<()>> {
        let (child, at) = (self.child.clone(), self.offset + offset);
        Box::pin(async move { child.cache(at, len).await })
    }
}
