//! The disk behind the test export: memory with a fixed allocation map, and
//! a log of what reached it, so a test can tell a hole from data, a backing
//! layer from this one, and a FUA write from a plain one.
//!
//! A disk may be larger than its memory ([`MapDisk::with_size`]): the tail
//! past [`SIZE`] is the map's last hole stretched, which reads as zeroes,
//! logs trims and zeroing, and refuses writes. That lets the extended-header
//! tests send 64-bit lengths without allocating gigabytes.

use std::sync::Mutex;

use block::test_utils::MemDriver;
use block::{BlockError, BlockErrorKind, BlockResult, Capabilities, Driver, Extent, ZeroFlags};

pub const KIB: u64 = 1024;
pub const GIB: u64 = 1024 * 1024 * KIB;
/// The export's size, and the part of a larger disk held in memory.
pub const SIZE: u64 = 1024 * KIB;

/// Byte of the data regions at `offset` (never zero, so data is never mistaken for a hole).
pub fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8 + 1
}

/// One region of the map: where it starts, and what block status says there.
struct Region {
    start: u64,
    allocated: bool,
    zero: bool,
    depth: u32,
}

/// The map, in order; each region ends where the next starts, the last at
/// the disk's end.
///
/// | range         | what                        | base:allocation | depth |
/// |---------------|-----------------------------|-----------------|-------|
/// | 0..64K        | data in this layer          | 0               | 1     |
/// | 64K..192K     | hole (unallocated, zero)    | HOLE+ZERO = 3   | 0     |
/// | 192K..256K    | allocated zeroes            | ZERO = 2        | 1     |
/// | 256K..512K    | data from a backing layer   | 0               | 2     |
/// | 512K..1M      | hole                        | 3               | 0     |
const MAP: [Region; 5] = [
    region(0, true, false, 1),
    region(64 * KIB, false, true, 0),
    region(192 * KIB, true, true, 1),
    region(256 * KIB, true, false, 2),
    region(512 * KIB, false, true, 0),
];

const fn region(start: u64, allocated: bool, zero: bool, depth: u32) -> Region {
    Region {
        start,
        allocated,
        zero,
        depth,
    }
}

/// The data regions, `[start, end)`: [`pattern`] bytes; the rest of the disk reads as zeroes.
pub const DATA: [(u64, u64); 2] = [(0, 64 * KIB), (256 * KIB, 512 * KIB)];

/// What a request did to the disk, in the order it happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Write {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    },
    Cache {
        offset: u64,
        len: u64,
    },
}

#[derive(Debug)]
pub struct MapDisk {
    /// The first [`SIZE`] bytes.
    mem: MemDriver,
    size: u64,
    ops: Mutex<Vec<Op>>,
}

impl MapDisk {
    /// The disk with [`DATA`] filled with [`pattern`] and zeroes elsewhere.
    pub fn new() -> Self {
        Self::with_size(SIZE)
    }

    /// The same map on a disk of `size` bytes (at least [`SIZE`]).
    pub fn with_size(size: u64) -> Self {
        assert!(size >= SIZE, "the map needs {SIZE} bytes");
        let mem = MemDriver::new(SIZE as usize);
        for (start, end) in DATA {
            let bytes: Vec<u8> = (start..end).map(pattern).collect();
            mem.write_at(&bytes, start, false)
                .expect("filling the memory disk");
        }
        Self {
            mem,
            size,
            ops: Mutex::new(Vec::new()),
        }
    }

    /// The part of `[offset, offset + len)` held in memory, if any.
    fn in_memory(offset: u64, len: u64) -> Option<(u64, u64)> {
        (offset < SIZE).then(|| (offset, len.min(SIZE - offset)))
    }

    /// What reached the disk since the last call.
    pub fn take_ops(&self) -> Vec<Op> {
        std::mem::take(&mut *self.ops.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The disk's bytes, read past the NBD server.
    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.read_at(&mut buf, offset)
            .expect("reading the memory disk");
        buf
    }

    fn log(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }
}

impl Driver for MapDisk {
    fn driver_name(&self) -> &'static str {
        "map-disk"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        self.mem.capabilities()
    }

    /// Memory, then zeroes past it.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        buf.fill(0);
        if let Some((at, len)) = Self::in_memory(offset, buf.len() as u64) {
            self.mem.read_at(&mut buf[..len as usize], at)?;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.log(Op::Write {
            offset,
            len: buf.len() as u64,
            fua,
        });
        if offset + buf.len() as u64 > SIZE {
            let msg = "the test disk takes writes only in its first MiB";
            return Err(BlockError::new(BlockErrorKind::NoSpace, msg));
        }
        self.mem.write_at(buf, offset, fua)
    }

    fn flush(&self) -> BlockResult<()> {
        self.log(Op::Flush);
        self.mem.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.log(Op::Discard { offset, len });
        match Self::in_memory(offset, len) {
            Some((at, len)) => self.mem.discard(at, len),
            None => Ok(()),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.log(Op::WriteZeroes { offset, len, flags });
        match Self::in_memory(offset, len) {
            Some((at, len)) => self.mem.write_zeroes(at, len, flags),
            None => Ok(()),
        }
    }

    /// The map's region at `offset`, cut at the region's end and at `len`.
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        let at = MAP.iter().rposition(|r| r.start <= offset).unwrap_or(0);
        let end = MAP.get(at + 1).map_or(self.size, |next| next.start);
        let r = &MAP[at];
        Ok(Extent {
            len: (end - offset).min(len),
            allocated: r.allocated,
            zero: r.zero,
            depth: r.depth,
        })
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.log(Op::Cache { offset, len });
        Ok(())
    }
}
