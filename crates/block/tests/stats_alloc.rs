//! Counting sits on every request's path and must not cost it an allocation
//! (issue 21: "no shared lock, no allocation per request"): a request's
//! `begin` and `end` in [`IoStats`], whatever its kind and outcome, latency
//! histogram bucket included, allocate nothing, from the first request a
//! thread counts (when it picks its shard) on. Counted with a counting
//! global allocator; one test in this binary, so no other thread allocates
//! meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use block::stats::{IoKind, IoStats, Outcome, Started};

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

#[test]
fn test_counting_a_request_allocates_nothing() {
    // The statistics of one node and one export, made when they are (not per request).
    let (node, export) = (IoStats::default(), IoStats::default());
    let outcomes = [
        Outcome::Done,
        Outcome::Failed(libc::EIO),
        Outcome::Failed(libc::E2BIG), // the "other" errno slot
        Outcome::Invalid(libc::EINVAL),
    ];
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for i in 0..10_000u64 {
        let kind = IoKind::ALL[i as usize % 4];
        let outcome = outcomes[(i / 4) as usize % outcomes.len()];
        let started = Started::now();
        export.begin();
        node.begin();
        // Latencies from 0 to past the last histogram bucket (2^39 ns is 550 s).
        let now = Instant::now() + Duration::from_nanos((1u64 << (i % 40)) - 1);
        export.end(started, now, kind, (i * 4096, 4096), outcome);
        node.end(started, now, kind, (i * 4096, 4096), outcome);
        if i % 7 == 0 {
            export.begin();
            export.end_uncounted();
        }
    }
    let allocated = ALLOCATIONS.load(Ordering::Relaxed) - before;
    assert_eq!(allocated, 0, "counting 10 000 requests allocated");
    // The counts are real, so the loop above was not optimised away.
    let snap = node.snapshot();
    let kinds = IoKind::ALL.map(|k| snap.kind(k));
    let total: u64 = kinds.iter().map(|s| s.ops + s.failed + s.invalid).sum();
    assert_eq!(total, 10_000);
    let timed: u64 = kinds.iter().map(|s| s.latency.iter().sum::<u64>()).sum();
    assert_eq!(
        timed, 7_500,
        "the histograms count every request but the invalid"
    );
    assert_eq!(snap.in_flight, 0);
}
