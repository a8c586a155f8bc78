//! A fuzzed qcow2 image held in memory: open it read-only (which loads its
//! persistent bitmaps), then read, query block status and walk the loaded
//! bitmaps' extents. Any input must give data or an error, never a panic,
//! an out-of-bounds access or an unbounded allocation.
#![no_main]

use std::sync::Arc;

use block::driver::{Capabilities, Driver, Extent, ZeroFlags};
use block::drivers::qcow2::{Qcow2Driver, Qcow2Options};
use block::{BitmapStore, BlockNode, BlockResult};
use libfuzzer_sys::fuzz_target;

/// The image file: reads past its end return zeroes, as a file's do.
#[derive(Debug)]
struct Image(Vec<u8>);

impl Driver for Image {
    fn driver_name(&self) -> &'static str {
        "fuzz-image"
    }
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            request_alignment: 1,
            nonblocking: true,
            ..Default::default()
        }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        buf.fill(0);
        if let Some(src) = usize::try_from(offset).ok().and_then(|o| self.0.get(o..)) {
            let n = src.len().min(buf.len());
            buf[..n].copy_from_slice(&src[..n]);
        }
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64, _: bool) -> BlockResult<()> {
        Ok(())
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> BlockResult<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> BlockResult<()> {
        Ok(())
    }
    fn block_status(&self, _: u64, len: u64) -> BlockResult<Extent> {
        Ok(Extent { len, allocated: true, zero: false, depth: 1 })
    }
}

fuzz_target!(|data: &[u8]| {
    let file = Arc::new(BlockNode::new("f".into(), Arc::new(Image(data.to_vec())), true));
    let opts = Qcow2Options { read_only: true, ..Default::default() };
    let Ok(q) = Qcow2Driver::open(file, &opts) else { return };
    let size = q.size();
    for bitmap in q.take_loaded_bitmaps() {
        let _ = bitmap.count();
        let _ = bitmap.extents(0, bitmap.size(), 64);
    }
    let _ = q.stored_bitmaps();
    let mut buf = vec![0u8; 256 << 10];
    for offset in [0, size / 3, size.saturating_sub(buf.len() as u64)] {
        let len = (buf.len() as u64).min(size - offset.min(size)) as usize;
        let _ = q.read_at(&mut buf[..len], offset);
    }
    let mut pos = 0;
    for _ in 0..16 {
        if pos >= size {
            break;
        }
        match q.block_status(pos, (size - pos).min(1 << 30)) {
            Ok(e) if e.len > 0 => pos += e.len,
            _ => break,
        }
    }
});
