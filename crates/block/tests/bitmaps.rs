//! Dirty bitmaps marked by the write paths of nodes and of the layers above them.

use std::sync::Arc;

use block::drivers::raw::RawDriver;
use block::test_utils::MemDriver;
use block::{BlockNode, DirtyBitmap, IoBuf, ZeroFlags};

const MIB: u64 = 1 << 20;

fn bitmap(node: &BlockNode, name: &str, granularity: u64) -> Arc<DirtyBitmap> {
    let b = Arc::new(DirtyBitmap::new(
        name.into(),
        node.size(),
        granularity,
        true,
        false,
    ));
    assert!(node.bitmaps().insert(b.clone()));
    b
}

fn dirty_runs(b: &DirtyBitmap) -> Vec<(u64, u64)> {
    let mut pos = 0;
    let mut out = Vec::new();
    for (len, dirty) in b.extents(0, b.size(), usize::MAX) {
        if dirty {
            out.push((pos, len));
        }
        pos += len;
    }
    out
}

/// raw (offset 1 MiB) over a memory "file" node, with a bitmap on each.
fn stack() -> (Arc<BlockNode>, BlockNode) {
    let file = Arc::new(BlockNode::new(
        "file".into(),
        Arc::new(MemDriver::new(4 * MIB as usize)),
        false,
    ));
    let raw = RawDriver::new(file.clone(), MIB, Some(2 * MIB), true).unwrap();
    (file, BlockNode::new("raw".into(), Arc::new(raw), false))
}

#[tokio::test]
async fn test_write_through_raw_marks_raw_and_file_bitmaps() {
    let (file, raw) = stack();
    let on_raw = bitmap(&raw, "r", 65536);
    let on_file = bitmap(&file, "f", 4096);
    let (_, r) = raw.write(IoBuf::zeroed(4096), 70_000, false).await;
    r.unwrap();
    assert_eq!(dirty_runs(&on_raw), vec![(65536, 65536)]);
    // The file node sees the same write 1 MiB further on, at its own granularity.
    assert_eq!(dirty_runs(&on_file), vec![(MIB + 69_632, 8192)]);
}

#[tokio::test]
async fn test_zeroes_and_discard_mark_but_reads_do_not() {
    let (_file, raw) = stack();
    let b = bitmap(&raw, "r", 65536);
    raw.read(IoBuf::zeroed(4096), 0).await.1.unwrap();
    assert_eq!(b.count(), 0);
    raw.write_zeroes(MIB, 512, ZeroFlags::default())
        .await
        .unwrap();
    assert_eq!(dirty_runs(&b), vec![(MIB, 65536)]);
    b.clear();
    raw.discard(0, 65536).await.unwrap();
    // MemDriver cannot discard: like QEMU with discard=ignore, nothing changed, nothing marked.
    assert_eq!(b.count(), 0);
}

#[tokio::test]
async fn test_disabled_bitmap_and_failed_range_check_leave_bits_clear() {
    let (_file, raw) = stack();
    let b = bitmap(&raw, "r", 65536);
    b.set_enabled(false);
    raw.write(IoBuf::zeroed(4096), 0, false).await.1.unwrap();
    assert_eq!(b.count(), 0);
    b.set_enabled(true);
    assert!(raw
        .write(IoBuf::zeroed(4096), 2 * MIB, false)
        .await
        .1
        .is_err());
    assert_eq!(b.count(), 0);
}
