//! The reply shaper is on every request's path: the common replies (an ack,
//! an error, a READ that goes out whole) must cost one allocation, their
//! header bytes, and a sparse READ two (header bytes and chunk list), however
//! many chunks it has. Counted with a counting global allocator; one test in
//! this binary, so no other thread allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use nbd::reply::ReplyShape;
use nbd::request::RequestHeader;
use nbd::types::{CommandType, NbdErrno};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; it only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations (and reallocations) `f` makes, its result dropped after counting.
fn allocations<T>(f: impl FnOnce() -> T) -> usize {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let kept = std::hint::black_box(f());
    let n = ALLOCATIONS.load(Ordering::Relaxed) - before;
    drop(kept);
    n
}

#[test]
fn test_reply_plans_allocate_once_for_common_replies_and_twice_for_sparse_reads() {
    let read = |length| RequestHeader {
        flags: 0,
        command: CommandType::READ,
        cookie: 1,
        offset: 0,
        length,
    };
    let s = ReplyShape::Structured;
    assert_eq!(allocations(|| s.ack(&read(0))), 1, "ack");
    let e = ReplyShape::Extended;
    assert_eq!(allocations(|| e.ack(&read(0))), 1, "extended ack");
    assert_eq!(allocations(|| e.read(&read(4096), &[])), 1, "extended READ");
    assert_eq!(allocations(|| ReplyShape::Simple.read(&read(4096), &[])), 1);
    assert_eq!(allocations(|| s.read(&read(4096), &[])), 1, "whole READ");
    assert_eq!(
        allocations(|| s.error(&read(0), NbdErrno::EIO, "failed")),
        1
    );
    let runs: Vec<(u32, u32)> = (0..64).map(|i| (4096, (i % 2) * 3)).collect();
    assert_eq!(
        allocations(|| s.read(&read(64 * 4096), &runs)),
        2,
        "sparse READ"
    );
}
