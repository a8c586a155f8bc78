//! A node's write generations and the flush events they decide, shared by
//! the drivers that report events (raw, qcow2) and blkdebug, which checks
//! its flush rules only for a node written since its last flush.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::debug_event::DebugEvent;
use crate::driver::Driver;

/// A node's write generations, as QEMU counts them: every write, zeroing or
/// discard made through the node counts one, and a successful flush records
/// the count it started at. QEMU reports `flush_to_disk` (and blkdebug
/// checks its flush rules) only for a node written since its last flush.
#[derive(Debug, Default)]
pub struct WriteGen {
    written: AtomicU64,
    flushed: AtomicU64,
}

impl WriteGen {
    pub fn wrote(&self) {
        self.written.fetch_add(1, Ordering::AcqRel);
    }

    /// The generation a flush starting now covers, and whether anything
    /// was written since the last successful flush.
    pub fn start_flush(&self) -> (u64, bool) {
        let current = self.written.load(Ordering::Acquire);
        (current, self.flushed.load(Ordering::Acquire) != current)
    }

    /// A flush that started at `generation` succeeded.
    pub fn flushed(&self, generation: u64) {
        self.flushed.fetch_max(generation, Ordering::AcqRel);
    }
}

/// What QEMU's block layer reports to a format node's file child when the
/// node is flushed: `flush_to_os` always, `flush_to_disk` if the node was
/// written since its last flush. Returns the generation the flush covers.
pub fn report_flush(child: &dyn Driver, generation: &WriteGen) -> u64 {
    child.debug_event(DebugEvent::FlushToOs);
    let (current, dirty) = generation.start_flush();
    if dirty {
        child.debug_event(DebugEvent::FlushToDisk);
    }
    current
}
