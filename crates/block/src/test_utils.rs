//! Test doubles and a conformance suite every driver must pass.

use std::sync::RwLock;

use crate::driver::{Capabilities, Driver, Extent, ZeroFlags};
use crate::error::BlockResult;

/// An in-memory disk: the reference model drivers are compared against.
#[derive(Debug)]
pub struct MemDriver {
    data: RwLock<Vec<u8>>,
}

impl MemDriver {
    pub fn new(size: usize) -> Self {
        Self {
            data: RwLock::new(vec![0; size]),
        }
    }
}

impl Driver for MemDriver {
    fn driver_name(&self) -> &'static str {
        "mem"
    }

    fn size(&self) -> u64 {
        self.data.read().map(|d| d.len() as u64).unwrap_or(0)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            can_write: true,
            can_discard: false,
            can_write_zeroes_fast: true,
            request_alignment: 1,
            max_transfer: 0,
            nonblocking: true,
            ..Capabilities::default()
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let d = self.data.read().unwrap_or_else(|e| e.into_inner());
        let o = offset as usize;
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> BlockResult<()> {
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        let o = offset as usize;
        d[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> BlockResult<()> {
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> BlockResult<()> {
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }

    fn block_status(&self, _offset: u64, len: u64) -> BlockResult<Extent> {
        Ok(Extent {
            len,
            allocated: true,
            zero: false,
            depth: 1,
        })
    }
}

pub mod conformance {
    //! Behaviour every writable driver must show, whatever its backend.

    use crate::driver::{Driver, ZeroFlags};

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn read(d: &dyn Driver, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        d.read_at(&mut buf, offset).expect("read");
        buf
    }

    /// Runs every check; the driver must be writable and at least 1 MiB.
    pub fn run_all(d: &dyn Driver) {
        read_after_write(d);
        unaligned_write_keeps_neighbours(d);
        write_zeroes_reads_back_zero(
            d,
            ZeroFlags {
                may_unmap: true,
                fast: false,
            },
        );
        write_zeroes_reads_back_zero(
            d,
            ZeroFlags {
                may_unmap: false,
                fast: false,
            },
        );
        discard_keeps_size(d);
        block_status_is_never_empty(d);
        fua_write_and_flush_succeed(d);
    }

    fn read_after_write(d: &dyn Driver) {
        let data = pattern(64 * 1024, 1);
        d.write_at(&data, 4096, false).expect("write");
        assert_eq!(read(d, 4096, data.len()), data);
    }

    fn unaligned_write_keeps_neighbours(d: &dyn Driver) {
        d.write_at(&pattern(8192, 2), 0, false).expect("write");
        d.write_at(b"xyz", 1000, false).expect("unaligned write");
        let got = read(d, 0, 8192);
        let mut expected = pattern(8192, 2);
        expected[1000..1003].copy_from_slice(b"xyz");
        assert_eq!(got, expected);
    }

    fn write_zeroes_reads_back_zero(d: &dyn Driver, flags: ZeroFlags) {
        d.write_at(&pattern(65536, 3), 131072, false)
            .expect("write");
        d.write_zeroes(131072 + 4096, 32768, flags).expect("zero");
        let got = read(d, 131072, 65536);
        assert!(got[4096..4096 + 32768].iter().all(|&b| b == 0));
        assert_eq!(&got[..4096], &pattern(65536, 3)[..4096]);
    }

    fn discard_keeps_size(d: &dyn Driver) {
        let size = d.size();
        d.discard(0, 65536).expect("discard");
        assert_eq!(d.size(), size);
    }

    fn block_status_is_never_empty(d: &dyn Driver) {
        let e = d.block_status(0, 1 << 20).expect("status");
        assert!(e.len > 0 && e.len <= 1 << 20);
    }

    fn fua_write_and_flush_succeed(d: &dyn Driver) {
        let data = pattern(4096, 4);
        d.write_at(&data, 8192, true).expect("fua write");
        d.flush().expect("flush");
        assert_eq!(read(d, 8192, 4096), data);
    }
}
