//! `blkdebug`: fault injection over a child node, for testing how everything
//! above the block layer copes with failing storage.
//!
//! Each rule fails matching requests with an errno: by I/O type, optionally
//! only when the request covers a given sector, optionally only once, and
//! optionally only after the first `after` matching requests passed (a bexd
//! extension, `x-after`). Unlike QEMU's blkdebug, rules are always armed: the
//! event/state machinery is not modelled.

use std::sync::{Arc, Mutex, PoisonError};

use crate::driver::{Capabilities, Driver, Extent, ZeroFlags};
use crate::error::{BlockError, BlockResult};
use crate::node::BlockNode;

/// The kinds of request a rule can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
}

/// One `inject-error` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectError {
    pub iotypes: Vec<IoType>,
    /// A positive errno (EIO = 5, ENOSPC = 28, ...).
    pub errno: i32,
    /// Fail only requests covering this 512-byte sector.
    pub sector: Option<u64>,
    /// Remove the rule after it fired once.
    pub once: bool,
    /// Let this many matching requests pass before failing.
    pub after: u64,
}

#[derive(Debug)]
pub struct BlkdebugDriver {
    child: Arc<BlockNode>,
    /// Taken poisoned or not: a rule changes by one counter step or one
    /// removal, which a panic cannot leave half-done.
    rules: Mutex<Vec<InjectError>>,
}

impl BlkdebugDriver {
    pub fn new(child: Arc<BlockNode>, rules: Vec<InjectError>) -> Self {
        Self {
            child,
            rules: Mutex::new(rules),
        }
    }

    fn inner(&self) -> &dyn Driver {
        self.child.driver().as_ref()
    }

    /// Fails the request if a rule says so; updates `once`/`after` bookkeeping.
    fn check(&self, io: IoType, offset: u64, len: u64) -> BlockResult<()> {
        let mut rules = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
        let hit = rules.iter_mut().position(|r| {
            let in_range = r.sector.is_none_or(|s| {
                let at = s * 512;
                (io == IoType::Flush) || (offset <= at && at < offset + len.max(1))
            });
            if !r.iotypes.contains(&io) || !in_range {
                return false;
            }
            if r.after > 0 {
                r.after -= 1;
                return false;
            }
            true
        });
        let Some(index) = hit else { return Ok(()) };
        let errno = rules[index].errno;
        if rules[index].once {
            rules.remove(index);
        }
        let e = std::io::Error::from_raw_os_error(errno);
        Err(BlockError::io(
            format!("blkdebug: injected error on {io:?} at {offset}"),
            e,
        ))
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
        caps
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.check(IoType::Read, offset, buf.len() as u64)?;
        self.inner().read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.check(IoType::Write, offset, buf.len() as u64)?;
        let r = self.inner().write_at(buf, offset, fua);
        self.child.mark_dirty(offset, buf.len() as u64);
        r
    }

    fn flush(&self) -> BlockResult<()> {
        self.check(IoType::Flush, 0, 0)?;
        self.inner().flush()
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.check(IoType::Discard, offset, len)?;
        let r = self.inner().discard(offset, len);
        if self.child.capabilities().can_discard {
            self.child.mark_dirty(offset, len);
        }
        r
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.check(IoType::WriteZeroes, offset, len)?;
        let r = self.inner().write_zeroes(offset, len, flags);
        self.child.mark_dirty(offset, len);
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
mod tests {
    use super::*;
    use crate::test_utils::MemDriver;

    fn over_mem(rules: Vec<InjectError>) -> BlkdebugDriver {
        let child = Arc::new(BlockNode::new(
            "m".into(),
            Arc::new(MemDriver::new(1 << 20)),
            false,
        ));
        BlkdebugDriver::new(child, rules)
    }

    fn rule(io: IoType, errno: i32) -> InjectError {
        InjectError {
            iotypes: vec![io],
            errno,
            sector: None,
            once: false,
            after: 0,
        }
    }

    #[test]
    fn test_sector_rule_fails_only_covering_requests() {
        let d = over_mem(vec![InjectError {
            sector: Some(8),
            ..rule(IoType::Read, libc::EIO)
        }]);
        let mut buf = [0u8; 512];
        assert_eq!(d.read_at(&mut buf, 4096).unwrap_err().errno(), libc::EIO);
        assert!(d.read_at(&mut buf, 0).is_ok());
    }

    #[test]
    fn test_once_rule_fires_once() {
        let d = over_mem(vec![InjectError {
            once: true,
            ..rule(IoType::Write, libc::ENOSPC)
        }]);
        assert_eq!(
            d.write_at(&[1; 512], 0, false).unwrap_err().errno(),
            libc::ENOSPC
        );
        assert!(d.write_at(&[1; 512], 0, false).is_ok());
    }

    #[test]
    fn test_after_lets_the_first_requests_pass() {
        let d = over_mem(vec![InjectError {
            after: 2,
            ..rule(IoType::Flush, libc::EIO)
        }]);
        assert!(d.flush().is_ok());
        assert!(d.flush().is_ok());
        assert!(d.flush().is_err());
    }
}
