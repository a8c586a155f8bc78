//! `null-co`: a device of a given size that discards writes, for tests and benchmarks.

use std::time::Duration;

use crate::driver::{Capabilities, Driver, Extent, ZeroFlags};
use crate::error::BlockResult;

#[derive(Debug)]
pub struct NullDriver {
    size: u64,
    read_zeroes: bool,
    /// QEMU's `latency-ns`: every request takes this long (for testing clients).
    latency: Duration,
}

impl NullDriver {
    pub fn new(size: u64, read_zeroes: bool) -> Self {
        Self::with_latency(size, read_zeroes, Duration::ZERO)
    }

    pub fn with_latency(size: u64, read_zeroes: bool, latency: Duration) -> Self {
        Self {
            size,
            read_zeroes,
            latency,
        }
    }

    fn delay(&self) {
        if !self.latency.is_zero() {
            std::thread::sleep(self.latency);
        }
    }
}

impl Driver for NullDriver {
    fn driver_name(&self) -> &'static str {
        "null-co"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            can_write: true,
            can_discard: true,
            can_write_zeroes_fast: true,
            request_alignment: 1,
            max_transfer: 0,
            // With a latency the calls sleep, so they belong on the blocking pool.
            nonblocking: self.latency.is_zero(),
            ..Capabilities::default()
        }
    }

    fn read_at(&self, buf: &mut [u8], _offset: u64) -> BlockResult<()> {
        self.delay();
        // QEMU leaves the buffer untouched without read-zeroes; zeroes are
        // never wrong and never leak memory contents, so always zero.
        buf.fill(0);
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> BlockResult<()> {
        self.delay();
        Ok(())
    }

    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> BlockResult<()> {
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> BlockResult<()> {
        Ok(())
    }

    /// As QEMU reports it: never data; zero only with read-zeroes.
    fn block_status(&self, _offset: u64, len: u64) -> BlockResult<Extent> {
        Ok(Extent {
            len,
            allocated: false,
            zero: self.read_zeroes,
            depth: 1,
        })
    }
}
