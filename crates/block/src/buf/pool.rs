//! Memory of dropped [`super::IoBuf`]s, kept for reuse by `for_overwrite`.
//!
//! Reusing a mapping saves a page fault and a kernel page clear per 4 KiB of
//! every large request; reusing a heap buffer saves the memset of
//! `alloc_zeroed` and a malloc/free pair (`perf` put that at 3% of the
//! server's time on 4 KiB reads).
//!
//! ```text
//!   take: this thread's cache ─miss─► its home shard ─miss─► the other shards ─miss─► allocate
//!   park: this thread's cache ─full─► its home shard
//! ```
//!
//! A request takes its buffer on one thread (the reader) and its reply drops
//! it on another (the writer task), so the caches alone would fill on one
//! side and run dry on the other; the shards carry buffers between threads.
//! Small buffers move between cache and shard [`SMALL_BATCH`] at a time, so
//! a shard's lock is taken once per that many requests, and there are
//! [`SHARDS`] of them: no lock is shared by every request of every thread.
//!
//! The bounds are global (counters over every cache and shard): however many
//! threads there are, at most [`LARGE_MAX_BUFFERS`] large buffers holding
//! [`LARGE_MAX_BYTES`] and [`SMALL_MAX`] one-page buffers stay parked.

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::ALIGNMENT;

/// Buffers smaller than this are not worth parking...
pub const LARGE_MIN: usize = 16 * 1024;
/// ...except the one-page buffers of small requests (4 KiB and less), the
/// most common size by far: they are counted apart, and found in O(1).
const SMALL_MAX: usize = 1024;
/// Bytes the large buffers parked may hold (they stay resident), and how
/// many there may be: enough for 1 MiB requests at queue depth 8 on several
/// connections, or nbdcopy's 4 x 64 x 256 KiB, without keeping a burst's
/// memory for good.
const LARGE_MAX_BYTES: usize = 64 << 20;
const LARGE_MAX_BUFFERS: usize = 256;

/// Depot shards; threads are spread over them round-robin.
const SHARDS: usize = 8;
/// Small buffers a thread keeps for itself, and how many move to or from
/// its shard at once when it has too many or none.
const LOCAL_SMALL: usize = 64;
const SMALL_BATCH: usize = 32;
/// Large buffers a thread keeps for itself (searched by size).
const LOCAL_LARGE: usize = 4;

/// An allocation parked in the pool.
pub struct Parked {
    pub ptr: NonNull<u8>,
    pub source: Source,
}

/// Size of an allocation and where it came from.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    Heap(Layout),
    Mmap(usize),
}

impl Parked {
    fn size(&self) -> usize {
        match self.source {
            Source::Heap(layout) => layout.size(),
            Source::Mmap(size) => size,
        }
    }

    fn is_small(&self) -> bool {
        matches!(self.source, Source::Heap(l) if l.size() == ALIGNMENT && l.align() == ALIGNMENT)
    }

    /// Returns the memory to the allocator or the kernel.
    pub fn release(self) {
        match self.source {
            // SAFETY: allocated in `IoBuf::zeroed` with exactly this layout; nothing borrows it.
            Source::Heap(layout) => unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) },
            // SAFETY: mapped in `IoBuf::zeroed` with exactly this size; nothing borrows it.
            Source::Mmap(size) => unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), size);
            },
        }
    }
}

// SAFETY: a parked allocation is owned by the pool alone; handing it to another thread is fine.
unsafe impl Send for Parked {}

#[derive(Default)]
struct Shelf {
    small: Vec<Parked>,
    large: Vec<Parked>,
}

impl Shelf {
    const fn new() -> Self {
        Self {
            small: Vec::new(),
            large: Vec::new(),
        }
    }

    fn take_large(&mut self, size: usize) -> Option<Parked> {
        let i = self.large.iter().position(|p| p.size() == size)?;
        Some(self.large.swap_remove(i))
    }
}

static DEPOT: [Mutex<Shelf>; SHARDS] = [const { Mutex::new(Shelf::new()) }; SHARDS];
static NEXT_HOME: AtomicUsize = AtomicUsize::new(0);
static HELD: Held = Held::new();
/// How many of those sit in shards (not in a thread's cache): a thread
/// whose cache is empty looks at the shards only if there is something to find.
static SMALL_IN_DEPOT: AtomicUsize = AtomicUsize::new(0);
static LARGE_IN_DEPOT: AtomicUsize = AtomicUsize::new(0);

/// A shard's lock. Its holders only move whole allocations between vectors,
/// so a panic leaves every parked buffer either in the shard or gone (a
/// leak, not a double use); a poisoned shard is used as it is, and a data
/// path never fails for the pool's sake.
fn shard(i: usize) -> MutexGuard<'static, Shelf> {
    DEPOT[i % SHARDS]
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// One thread's cache.
struct Local {
    home: usize,
    shelf: Shelf,
}

impl Local {
    fn new() -> Self {
        Self {
            home: NEXT_HOME.fetch_add(1, Ordering::Relaxed) % SHARDS,
            shelf: Shelf::new(),
        }
    }

    /// From the cache, else a batch from the first shard that has one.
    fn take_small(&mut self) -> Option<Parked> {
        if self.shelf.small.is_empty() && SMALL_IN_DEPOT.load(Ordering::Relaxed) > 0 {
            for i in 0..SHARDS {
                let mut s = shard(self.home + i);
                let from = s.small.len().saturating_sub(SMALL_BATCH);
                let moved = s.small.len() - from;
                self.shelf.small.extend(s.small.drain(from..));
                drop(s);
                if moved > 0 {
                    SMALL_IN_DEPOT.fetch_sub(moved, Ordering::Relaxed);
                    break;
                }
            }
        }
        self.shelf.small.pop()
    }

    fn take_large(&mut self, size: usize) -> Option<Parked> {
        if let Some(p) = self.shelf.take_large(size) {
            return Some(p);
        }
        if LARGE_IN_DEPOT.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let p = (0..SHARDS).find_map(|i| shard(self.home + i).take_large(size))?;
        LARGE_IN_DEPOT.fetch_sub(1, Ordering::Relaxed);
        Some(p)
    }

    /// Into the cache; a full cache first hands a batch to the home shard.
    fn park_small(&mut self, p: Parked) {
        if self.shelf.small.len() >= LOCAL_SMALL {
            let from = self.shelf.small.len() - SMALL_BATCH;
            shard(self.home)
                .small
                .extend(self.shelf.small.drain(from..));
            SMALL_IN_DEPOT.fetch_add(SMALL_BATCH, Ordering::Relaxed);
        }
        self.shelf.small.push(p);
    }

    fn park_large(&mut self, p: Parked) {
        if self.shelf.large.len() < LOCAL_LARGE {
            return self.shelf.large.push(p);
        }
        shard(self.home).large.push(p);
        LARGE_IN_DEPOT.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Local {
    /// The thread ends: its buffers go to its shard, still counted.
    fn drop(&mut self) {
        let (small, large) = (self.shelf.small.len(), self.shelf.large.len());
        let mut s = shard(self.home);
        s.small.append(&mut self.shelf.small);
        s.large.append(&mut self.shelf.large);
        drop(s);
        SMALL_IN_DEPOT.fetch_add(small, Ordering::Relaxed);
        LARGE_IN_DEPOT.fetch_add(large, Ordering::Relaxed);
    }
}

thread_local! {
    static LOCAL: RefCell<Local> = RefCell::new(Local::new());
}

/// A parked allocation of exactly `size` bytes (a multiple of ALIGNMENT).
pub fn take(size: usize) -> Option<Parked> {
    let small = size == ALIGNMENT;
    // No cache while the thread's locals are being destroyed: allocate.
    let p = LOCAL
        .try_with(|l| {
            let mut l = l.borrow_mut();
            match small {
                true => l.take_small(),
                false => l.take_large(size),
            }
        })
        .ok()
        .flatten()?;
    HELD.unreserve(small, size);
    Some(p)
}

/// Parks an allocation for reuse; gives it back if it is too small or the
/// pool is full (the caller frees it).
pub fn park(p: Parked) -> Result<(), Parked> {
    let small = p.is_small();
    if !small && !(LARGE_MIN..=LARGE_MAX_BYTES).contains(&p.size()) {
        return Err(p);
    }
    if !HELD.reserve(small, p.size()) {
        return Err(p);
    }
    let mut p = Some(p);
    let _ = LOCAL.try_with(|l| {
        let mut l = l.borrow_mut();
        match (p.take(), small) {
            (Some(p), true) => l.park_small(p),
            (Some(p), false) => l.park_large(p),
            (None, _) => {}
        }
    });
    match p {
        // The thread is ending and its cache is gone: the caller frees it.
        Some(p) => {
            HELD.unreserve(small, p.size());
            Err(p)
        }
        None => Ok(()),
    }
}

/// What is parked, in every cache and shard, against the bounds: one
/// atomic add to park a buffer and one to take it, whatever the thread.
struct Held {
    small: AtomicUsize,
    /// Large buffers: their count above [`COUNT_SHIFT`], their bytes below.
    large: AtomicU64,
}

/// Bytes fit below this bit (1 TiB), counts above it.
const COUNT_SHIFT: u32 = 40;

impl Held {
    const fn new() -> Self {
        Self {
            small: AtomicUsize::new(0),
            large: AtomicU64::new(0),
        }
    }

    /// Counts one more parked buffer, if the bounds allow it.
    fn reserve(&self, small: bool, size: usize) -> bool {
        if small {
            if self.small.fetch_add(1, Ordering::Relaxed) >= SMALL_MAX {
                self.small.fetch_sub(1, Ordering::Relaxed);
                return false;
            }
            return true;
        }
        let one = Self::one_large(size);
        let before = self.large.fetch_add(one, Ordering::Relaxed);
        let (buffers, bytes) = Self::split(before);
        if buffers >= LARGE_MAX_BUFFERS || bytes + size > LARGE_MAX_BYTES {
            self.large.fetch_sub(one, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn unreserve(&self, small: bool, size: usize) {
        match small {
            true => drop(self.small.fetch_sub(1, Ordering::Relaxed)),
            false => drop(
                self.large
                    .fetch_sub(Self::one_large(size), Ordering::Relaxed),
            ),
        }
    }

    /// One buffer of `size` bytes, as added to `large`. Sizes are checked
    /// against LARGE_MAX_BYTES before, so they fit below COUNT_SHIFT.
    fn one_large(size: usize) -> u64 {
        (1 << COUNT_SHIFT) | (size as u64 & ((1 << COUNT_SHIFT) - 1))
    }

    /// (buffers, bytes) of a `large` value.
    fn split(v: u64) -> (usize, usize) {
        (
            (v >> COUNT_SHIFT) as usize,
            (v & ((1 << COUNT_SHIFT) - 1)) as usize,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::IoBuf;
    use super::*;

    #[test]
    fn test_a_buffer_dropped_on_another_thread_is_taken_from_the_shards() {
        let size = 5 * ALIGNMENT; // a size no other test uses
        let bufs: Vec<IoBuf> = (0..LOCAL_LARGE + 2)
            .map(|_| IoBuf::for_overwrite(size))
            .collect();
        let addrs: Vec<usize> = bufs.iter().map(|b| b.as_ptr() as usize).collect();
        // The dropping thread keeps LOCAL_LARGE for itself and shelves the rest.
        std::thread::spawn(move || drop(bufs)).join().unwrap();
        let taken = std::thread::spawn(move || IoBuf::for_overwrite(size).as_ptr() as usize)
            .join()
            .unwrap();
        assert!(
            addrs.contains(&taken),
            "a fresh thread reused a shelved buffer"
        );
    }

    #[test]
    fn test_small_buffers_go_round_through_a_batch() {
        // More than a cache holds: batches reach the shards, and a thread
        // with an empty cache takes them back.
        let n = LOCAL_SMALL + 1;
        let bufs: Vec<IoBuf> = (0..n).map(|_| IoBuf::for_overwrite(ALIGNMENT)).collect();
        let addrs: Vec<usize> = bufs.iter().map(|b| b.as_ptr() as usize).collect();
        std::thread::spawn(move || drop(bufs)).join().unwrap();
        let taken = std::thread::spawn(move || {
            let bufs: Vec<IoBuf> = (0..n).map(|_| IoBuf::for_overwrite(ALIGNMENT)).collect();
            bufs.iter().map(|b| b.as_ptr() as usize).collect::<Vec<_>>()
        });
        let taken = taken.join().unwrap();
        assert!(taken.iter().any(|a| addrs.contains(a)), "none came back");
    }

    #[test]
    fn test_reserve_stops_at_the_bounds() {
        let held = Held::new();
        assert!((0..SMALL_MAX).all(|_| held.reserve(true, ALIGNMENT)));
        assert!(!held.reserve(true, ALIGNMENT));
        let mib = 1 << 20;
        let fit = LARGE_MAX_BYTES / mib;
        assert!((0..fit).all(|_| held.reserve(false, mib)));
        assert!(!held.reserve(false, mib), "past the byte bound");
        held.unreserve(false, mib);
        assert!(held.reserve(false, mib), "room again once one is taken");
        let (_, bytes) = Held::split(held.large.load(Ordering::Relaxed));
        assert_eq!(bytes, LARGE_MAX_BYTES);
        let held = Held::new();
        assert!((0..LARGE_MAX_BUFFERS).all(|_| held.reserve(false, LARGE_MIN)));
        assert!(!held.reserve(false, LARGE_MIN), "past the buffer bound");
        let (buffers, _) = Held::split(held.large.load(Ordering::Relaxed));
        assert_eq!(buffers, LARGE_MAX_BUFFERS);
    }
}
