//! `blkdebug`: fault injection over a child node, as QEMU's blkdebug does it,
//! for testing how everything above the block layer copes with failing
//! storage.
//!
//! Rules wait for events (see [`rules`]): the driver above a blkdebug node
//! (raw, qcow2) reports what it is about to do through
//! [`Driver::debug_event`], and the node itself reports `none` when it opens
//! and `pwritev`/`pwritev_zero`/`pwritev_done` (and the `pwritev_rmw_*`
//! steps of an unaligned write) around every write it gets, where QEMU's
//! generic block layer reports them. So a blkdebug node exported directly
//! only ever sees `none` and the `pwritev*` events, as in QEMU. An armed rule
//! fails matching requests with its errno. bexd adds `x-after` (an armed rule
//! lets its first N matching requests pass).
//!
//! The node also imposes the limits a test sets (`align`, `max-transfer`,
//! the write-zero and discard limits): it reports them in its capabilities
//! and pads, splits and aligns requests to them itself, which in QEMU the
//! generic block layer does.

pub mod config_file;
pub mod limits;
pub mod rules;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

pub use limits::Limits;
pub use rules::{InjectError, IoType, SetState};

use crate::debug_event::DebugEvent;
use crate::driver::{Capabilities, Driver, Extent, ZeroFlags};
use crate::error::{BlockError, BlockErrorKind, BlockResult};
use crate::node::BlockNode;
use crate::write_gen::WriteGen;
use rules::{RuleSet, Verdict};

/// Everything a blkdebug node is opened with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlkdebugOptions {
    /// QEMU's configuration file; its rules come before `inject`/`set_state`.
    pub config: Option<PathBuf>,
    pub inject: Vec<InjectError>,
    pub set_state: Vec<SetState>,
    pub limits: Limits,
}

#[derive(Debug)]
pub struct BlkdebugDriver {
    child: Arc<BlockNode>,
    /// Taken poisoned or not: the rules change by one step at a time (a
    /// state, an armed set, a counter, one removal), which a panic cannot
    /// leave half-done.
    rules: Mutex<RuleSet>,
    limits: Limits,
    /// Request alignment: `align`, or the child's if larger.
    align: u64,
    /// A flush reaches the rules only if the node was written since its
    /// last successful flush, as QEMU skips flushing a clean node.
    generation: WriteGen,
    /// Unaligned writes read, modify and write whole blocks: they take this
    /// exclusively, other writes shared, so no write lands inside a block
    /// between its read and its write-back. Taken poisoned or not: it
    /// guards no data of its own.
    rmw: RwLock<()>,
}

impl BlkdebugDriver {
    /// A node with `rules`, opened (the `none` event has fired).
    pub fn new(child: Arc<BlockNode>, rules: Vec<InjectError>) -> Self {
        Self::build(child, rules, Vec::new(), Limits::default())
    }

    /// Opens a node as QEMU does: the configuration file's rules, then the
    /// given ones; then the limits are checked against the child's.
    pub fn open(child: Arc<BlockNode>, opts: &BlkdebugOptions) -> BlockResult<Self> {
        let mut inject = Vec::new();
        let mut set_state = Vec::new();
        if let Some(path) = &opts.config {
            let text = std::fs::read_to_string(path)
                .map_err(|e| BlockError::io("Could not read blkdebug config file", e))?;
            let file = config_file::parse(&text)
                .map_err(|m| BlockError::new(BlockErrorKind::InvalidArgument, m))?;
            inject = file.inject;
            set_state = file.set_state;
        }
        inject.extend(opts.inject.iter().cloned());
        set_state.extend(opts.set_state.iter().cloned());
        let child_align = u64::from(child.capabilities().request_alignment.max(1));
        opts.limits
            .validate(child_align)
            .map_err(|m| BlockError::new(BlockErrorKind::InvalidArgument, m))?;
        Ok(Self::build(child, inject, set_state, opts.limits))
    }

    fn build(
        child: Arc<BlockNode>,
        inject: Vec<InjectError>,
        set_state: Vec<SetState>,
        limits: Limits,
    ) -> Self {
        let child_align = u64::from(child.capabilities().request_alignment.max(1));
        let d = Self {
            child,
            rules: Mutex::new(RuleSet::new(inject, set_state)),
            align: limits.align.max(child_align),
            limits,
            generation: WriteGen::default(),
            rmw: RwLock::new(()),
        };
        d.fire(DebugEvent::None);
        d
    }

    fn inner(&self) -> &dyn Driver {
        self.child.driver().as_ref()
    }

    fn fire(&self, event: DebugEvent) {
        self.rules
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .fire(event);
    }

    /// Fails the request if an armed rule says so.
    fn check(&self, io: IoType, offset: u64, len: u64) -> BlockResult<()> {
        let verdict = self
            .rules
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .check(io, offset, len);
        match verdict {
            Verdict::Pass => Ok(()),
            Verdict::Fail { errno } => Err(BlockError::io(
                format!("blkdebug: injected error on {io:?} at {offset}"),
                std::io::Error::from_raw_os_error(errno),
            )),
        }
    }

    fn chunk(&self) -> u64 {
        match self.limits.max_transfer {
            0 => u64::MAX,
            n => n,
        }
    }

    fn aligned(&self, offset: u64, len: u64) -> bool {
        offset.is_multiple_of(self.align)
            && (len.is_multiple_of(self.align) || offset + len == self.size())
    }

    /// An aligned read, in pieces of at most `max-transfer`, each checked.
    fn read_pieces(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let chunk = usize::try_from(self.chunk()).unwrap_or(usize::MAX);
        let mut at = offset;
        for piece in buf.chunks_mut(chunk) {
            self.check(IoType::Read, at, piece.len() as u64)?;
            self.inner().read_at(piece, at)?;
            at += piece.len() as u64;
        }
        Ok(())
    }

    /// An aligned write, in pieces of at most `max-transfer`, each checked.
    fn write_pieces(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        let chunk = usize::try_from(self.chunk()).unwrap_or(usize::MAX);
        let mut at = offset;
        for piece in buf.chunks(chunk) {
            self.check(IoType::Write, at, piece.len() as u64)?;
            let r = self.inner().write_at(piece, at, fua);
            self.child.record_write(at, piece.len() as u64);
            r?;
            at += piece.len() as u64;
        }
        Ok(())
    }

    /// A write QEMU's block layer would make whole blocks of: read the
    /// blocks it touches (each end is a checked read, reported as the
    /// `pwritev_rmw_*` events), put the data in, write the blocks back.
    fn write_rmw(
        &self,
        data: &[u8],
        offset: u64,
        fua: bool,
        event: Option<DebugEvent>,
    ) -> BlockResult<()> {
        let _whole = self.rmw.write().unwrap_or_else(PoisonError::into_inner);
        let (start, len) = limits::widen(offset, data.len() as u64, self.align, self.size());
        let mut block = vec![0u8; len as usize];
        let head = (offset - start) as usize;
        let tail_start = ((offset + data.len() as u64 - start) / self.align * self.align) as usize;
        if head > 0 {
            self.fire(DebugEvent::PwritevRmwHead);
            let n = (self.align as usize).min(block.len());
            self.read_pieces(&mut block[..n], start)?;
            self.fire(DebugEvent::PwritevRmwAfterHead);
        }
        let tail_covered = head > 0 && tail_start < self.align as usize;
        if tail_start < block.len() && !tail_covered {
            self.fire(DebugEvent::PwritevRmwTail);
            self.read_pieces(&mut block[tail_start..], start + tail_start as u64)?;
            self.fire(DebugEvent::PwritevRmwAfterTail);
        }
        block[head..head + data.len()].copy_from_slice(data);
        if let Some(e) = event {
            self.fire(e);
        }
        self.write_pieces(&block, start, fua)
    }

    /// A write, made whole blocks of if need be; `event` fires just before
    /// the blocks are written, where QEMU's block layer reports `pwritev`.
    fn write(
        &self,
        data: &[u8],
        offset: u64,
        fua: bool,
        event: Option<DebugEvent>,
    ) -> BlockResult<()> {
        if !self.aligned(offset, data.len() as u64) {
            return self.write_rmw(data, offset, fua, event);
        }
        let _shared = self.rmw.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = event {
            self.fire(e);
        }
        self.write_pieces(data, offset, fua)
    }

    /// Zeroes: the parts off `opt-write-zero` boundaries (and anything when
    /// the child cannot zero) as written zeroes, the rest as write-zeroes
    /// requests of at most `max-write-zero`, as QEMU's block layer splits them.
    fn zero(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        let opt = self.limits.opt_write_zero.max(self.align);
        for (at, n, aligned) in limits::pieces(offset, len, opt, self.limits.max_write_zero) {
            if aligned {
                let _shared = self.rmw.read().unwrap_or_else(PoisonError::into_inner);
                self.check(IoType::WriteZeroes, at, n)?;
                let r = self.inner().write_zeroes(at, n, flags);
                self.child.record_write(at, n);
                r?;
            } else {
                if flags.fast {
                    return Err(BlockError::new(
                        BlockErrorKind::NotSupported,
                        "blkdebug: no fast zeroing off the write-zero alignment",
                    ));
                }
                let zeroes = vec![0u8; n as usize];
                self.write(&zeroes, at, false, None)?;
            }
        }
        Ok(())
    }
}

impl Driver for BlkdebugDriver {
    fn driver_name(&self) -> &'static str {
        "blkdebug"
    }

    fn size(&self) -> u64 {
        self.inner().size()
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = self.child.capabilities();
        caps.can_write = caps.can_write && !self.child.read_only();
        // Rules take a lock; keep the work off the async workers like any I/O.
        caps.nonblocking = false;
        // Every request must pass the rules: nothing bypasses `read_at`.
        caps.maps_page_cache = false;
        caps.maps_ring = false;
        caps.request_alignment = u32::try_from(self.align).unwrap_or(u32::MAX);
        if self.limits.max_transfer != 0 {
            caps.max_transfer = u32::try_from(self.limits.max_transfer).unwrap_or(u32::MAX);
        }
        caps
    }

    fn debug_event(&self, event: DebugEvent) {
        self.fire(event);
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        if self.aligned(offset, buf.len() as u64) {
            return self.read_pieces(buf, offset);
        }
        let (start, len) = limits::widen(offset, buf.len() as u64, self.align, self.size());
        let mut block = vec![0u8; len as usize];
        self.read_pieces(&mut block, start)?;
        let from = (offset - start) as usize;
        buf.copy_from_slice(&block[from..from + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        let r = self.write(buf, offset, fua, Some(DebugEvent::Pwritev));
        self.fire(DebugEvent::PwritevDone);
        self.generation.wrote();
        r
    }

    fn flush(&self) -> BlockResult<()> {
        let (current, dirty) = self.generation.start_flush();
        if dirty {
            self.check(IoType::Flush, 0, 0)?;
        }
        self.inner().flush()?;
        self.generation.flushed(current);
        Ok(())
    }

    /// Pieces smaller than the request alignment are dropped (discard is
    /// advisory; QEMU's driver answers them "not supported", which its block
    /// layer takes as done); the rest go down in pieces of at most `max-discard`.
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.generation.wrote();
        let opt = self.limits.opt_discard.max(self.align);
        for (at, n, _) in limits::pieces(offset, len, opt, self.limits.max_discard) {
            let start = at.next_multiple_of(self.align);
            let end = (at + n) / self.align * self.align;
            if end <= start {
                continue;
            }
            let _shared = self.rmw.read().unwrap_or_else(PoisonError::into_inner);
            self.check(IoType::Discard, start, end - start)?;
            let r = self.inner().discard(start, end - start);
            if self.child.capabilities().can_discard {
                self.child.record_write(start, end - start);
            }
            r?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.fire(DebugEvent::PwritevZero);
        let r = self.zero(offset, len, flags);
        self.fire(DebugEvent::PwritevDone);
        self.generation.wrote();
        r
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.check(IoType::BlockStatus, offset, len)?;
        self.inner().block_status(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.inner().cache(offset, len)
    }
}

#[cfg(test)]
mod tests;
