//! I/O accounting: how many requests of each kind a node or an export has
//! served, their bytes, failures, time and latency distribution, as QEMU's
//! block accounting counts them (`block/accounting.c`: successful requests
//! count operations and bytes, failed ones count in `failed`, requests
//! refused before they reach the image in `invalid`; failed requests'
//! time counts too, so `account_failed` is true).
//!
//! Counting sits on the data path, so it takes no lock and allocates
//! nothing per request: every counter is an atomic in one of [`shards`]
//! cache-line-aligned shards (one per core), and each thread always adds to the same shard
//! (picked round-robin the first time it counts). Threads on different cores
//! thus never write the same cache line; a reader sums the shards, which is
//! rare (a QMP query, a metrics scrape).

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Instant;

/// At most this many shards per statistics block.
const MAX_SHARDS: usize = 16;

/// Shards per statistics block: one per core (up to 16), so the
/// threads running on different cores rarely share one. Each block is
/// `shards() x 1152` bytes and every node and export has one: sixteen on a
/// two-core machine made 36 KiB per export, more than all of
/// qemu-storage-daemon's 43 KiB per export but the counters.
pub fn shards() -> usize {
    static SHARDS: OnceLock<usize> = OnceLock::new();
    *SHARDS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_SHARDS)
    })
}

/// Latency histogram buckets: bucket `i < LATENCY_BUCKETS - 1` holds
/// latencies of at most `2^i` microseconds (1 us to about 16.8 s); the last
/// one holds the rest.
pub const LATENCY_BUCKETS: usize = 26;

/// The kinds of request counted, in QEMU's order (zone append is never
/// served by bexd, so it has no counters; queries report it as zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Read = 0,
    Write = 1,
    Flush = 2,
    Unmap = 3,
}

impl IoKind {
    pub const ALL: [IoKind; 4] = [IoKind::Read, IoKind::Write, IoKind::Flush, IoKind::Unmap];

    /// The name in metric labels (QEMU's field prefixes spelled out).
    pub fn label(self) -> &'static str {
        match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::Flush => "flush",
            IoKind::Unmap => "unmap",
        }
    }
}

/// The errnos a failed request is counted under (those NBD can carry);
/// anything else counts in an "other" slot.
pub const ERRNOS: [(i32, &str); 8] = [
    (libc::EPERM, "EPERM"),
    (libc::EIO, "EIO"),
    (libc::ENOMEM, "ENOMEM"),
    (libc::EINVAL, "EINVAL"),
    (libc::ENOSPC, "ENOSPC"),
    (libc::EOVERFLOW, "EOVERFLOW"),
    (libc::ENOTSUP, "ENOTSUP"),
    (libc::ESHUTDOWN, "ESHUTDOWN"),
];
/// Slots in the errno table: the known ones and "other".
const ERRNO_SLOTS: usize = ERRNOS.len() + 1;

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// It reached the image and failed with this errno.
    Failed(i32),
    /// It was refused before reaching the image (out of range, read-only,
    /// bad flags), with this errno.
    Invalid(i32),
}

#[derive(Default)]
struct KindCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    failed: AtomicU64,
    invalid: AtomicU64,
    total_ns: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

/// One thread group's counters, alone on its cache lines.
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    kinds: [KindCounters; 4],
    errnos: [AtomicU64; ERRNO_SLOTS],
    /// Requests begun minus requests ended, from this shard's threads
    /// (a request may end on another thread, so one shard can go negative).
    in_flight: AtomicI64,
    /// When a request last ended, in ns since [`epoch`] (0: never).
    last_access_ns: AtomicU64,
}

/// The counters of one node or export.
pub struct IoStats {
    shards: Box<[Shard]>,
    /// The end of the furthest write, as QEMU's `wr_highest_offset`. Shared,
    /// but written only when a write goes further than any before.
    wr_highest_offset: AtomicU64,
}

impl std::fmt::Debug for IoStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoStats").finish_non_exhaustive()
    }
}

impl Default for IoStats {
    fn default() -> Self {
        Self {
            shards: (0..shards()).map(|_| Shard::default()).collect(),
            wr_highest_offset: AtomicU64::new(0),
        }
    }
}

/// The process's clock origin for "last access" times.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The calling thread's shard, fixed at its first count.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    INDEX.with(|i| {
        if i.get() == usize::MAX {
            i.set(NEXT.fetch_add(1, Relaxed) % shards());
        }
        i.get()
    })
}

/// The histogram bucket of a latency.
fn latency_bucket(ns: u64) -> usize {
    let us = ns.div_ceil(1000).max(1);
    let bucket = (u64::BITS - (us - 1).leading_zeros()) as usize;
    bucket.min(LATENCY_BUCKETS - 1)
}

/// The upper bound of histogram bucket `i` in seconds (`None`: +Inf).
pub fn latency_bucket_bound(i: usize) -> Option<f64> {
    (i < LATENCY_BUCKETS - 1).then(|| (1u64 << i) as f64 / 1e6)
}

fn errno_slot(errno: i32) -> usize {
    ERRNOS
        .iter()
        .position(|&(e, _)| e == errno)
        .unwrap_or(ERRNOS.len())
}

/// When a request being counted arrived (one clock read serves every
/// statistics block that counts it).
#[derive(Clone, Copy, Debug)]
pub struct Started(Instant);

impl Started {
    pub fn now() -> Self {
        Self(Instant::now())
    }
}

impl IoStats {
    fn shard(&self) -> &Shard {
        &self.shards[shard_index()]
    }

    /// A request arrives: counted as in flight until [`Self::end`].
    pub fn begin(&self) {
        self.shard().in_flight.fetch_add(1, Relaxed);
    }

    /// A request that [`Self::begin`] counted has ended, uncounted (a
    /// command with no counters, such as BLOCK_STATUS).
    pub fn end_uncounted(&self) {
        self.shard().in_flight.fetch_sub(1, Relaxed);
    }

    /// A request of `kind` over `bytes` bytes at `offset`, begun at
    /// `started`, ended at `now`.
    pub fn end(
        &self,
        started: Started,
        now: Instant,
        kind: IoKind,
        range: (u64, u64),
        outcome: Outcome,
    ) {
        let (offset, bytes) = range;
        let shard = self.shard();
        shard.in_flight.fetch_sub(1, Relaxed);
        let counters = &shard.kinds[kind as usize];
        match outcome {
            Outcome::Invalid(errno) => {
                counters.invalid.fetch_add(1, Relaxed);
                shard.errnos[errno_slot(errno)].fetch_add(1, Relaxed);
            }
            Outcome::Done | Outcome::Failed(_) => {
                if let Outcome::Failed(errno) = outcome {
                    counters.failed.fetch_add(1, Relaxed);
                    shard.errnos[errno_slot(errno)].fetch_add(1, Relaxed);
                } else {
                    counters.ops.fetch_add(1, Relaxed);
                    counters.bytes.fetch_add(bytes, Relaxed);
                    if kind == IoKind::Write {
                        self.note_write_end(offset + bytes);
                    }
                }
                let ns = now.duration_since(started.0).as_nanos() as u64;
                counters.total_ns.fetch_add(ns, Relaxed);
                counters.latency[latency_bucket(ns)].fetch_add(1, Relaxed);
            }
        }
        let since_epoch = now.saturating_duration_since(epoch()).as_nanos() as u64;
        shard.last_access_ns.store(since_epoch.max(1), Relaxed);
    }

    fn note_write_end(&self, end: u64) {
        if end > self.wr_highest_offset.load(Relaxed) {
            self.wr_highest_offset.fetch_max(end, Relaxed);
        }
    }

    /// The counters summed over the shards. Counts taken while requests
    /// run may be a request apart from each other, never torn.
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut s = StatsSnapshot {
            wr_highest_offset: self.wr_highest_offset.load(Relaxed),
            ..StatsSnapshot::default()
        };
        let mut in_flight = 0i64;
        let mut last = 0u64;
        for shard in self.shards.iter() {
            for (sum, c) in s.kinds.iter_mut().zip(&shard.kinds) {
                sum.ops += c.ops.load(Relaxed);
                sum.bytes += c.bytes.load(Relaxed);
                sum.failed += c.failed.load(Relaxed);
                sum.invalid += c.invalid.load(Relaxed);
                sum.total_ns += c.total_ns.load(Relaxed);
                for (b, l) in sum.latency.iter_mut().zip(&c.latency) {
                    *b += l.load(Relaxed);
                }
            }
            for (sum, e) in s.errnos.iter_mut().zip(&shard.errnos) {
                *sum += e.load(Relaxed);
            }
            in_flight += shard.in_flight.load(Relaxed);
            last = last.max(shard.last_access_ns.load(Relaxed));
        }
        s.in_flight = in_flight.max(0) as u64;
        if last > 0 {
            let now = Instant::now().saturating_duration_since(epoch()).as_nanos() as u64;
            s.idle_time_ns = Some(now.saturating_sub(last));
        }
        s
    }
}

/// One kind's summed counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindSnapshot {
    /// Successful requests.
    pub ops: u64,
    /// Bytes of successful requests.
    pub bytes: u64,
    pub failed: u64,
    pub invalid: u64,
    /// Time spent in successful and failed requests.
    pub total_ns: u64,
    /// Successful and failed requests by latency bucket (not cumulative).
    pub latency: [u64; LATENCY_BUCKETS],
}

/// [`IoStats`] summed at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Indexed by [`IoKind`].
    pub kinds: [KindSnapshot; 4],
    /// Failed and invalid requests by errno, in [`ERRNOS`] order, then the rest.
    pub errnos: [u64; ERRNO_SLOTS],
    pub in_flight: u64,
    pub wr_highest_offset: u64,
    /// Time since a request last ended (`None`: none has).
    pub idle_time_ns: Option<u64>,
}

impl StatsSnapshot {
    pub fn kind(&self, kind: IoKind) -> &KindSnapshot {
        &self.kinds[kind as usize]
    }

    /// (errno name, count) for every errno slot, "other" last.
    pub fn errno_counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        ERRNOS
            .iter()
            .map(|&(_, name)| name)
            .chain(["other"])
            .zip(self.errnos.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_latency_buckets_hold_up_to_their_bound() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1000), 0);
        assert_eq!(latency_bucket(1001), 1);
        assert_eq!(latency_bucket(2000), 1);
        assert_eq!(latency_bucket(2001), 2);
        assert_eq!(latency_bucket(4000), 2);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
        assert_eq!(latency_bucket_bound(0), Some(1e-6));
        assert_eq!(latency_bucket_bound(LATENCY_BUCKETS - 1), None);
    }

    #[test]
    fn test_counts_as_qemu_accounts_done_failed_and_invalid_requests() {
        let stats = IoStats::default();
        assert_eq!(stats.snapshot().idle_time_ns, None);
        let count = |kind, range, outcome| {
            stats.begin();
            stats.end(Started::now(), Instant::now(), kind, range, outcome);
        };
        stats.begin();
        assert_eq!(stats.snapshot().in_flight, 1);
        stats.end_uncounted();
        count(IoKind::Write, (4096, 512), Outcome::Done);
        count(IoKind::Read, (0, 4096), Outcome::Failed(libc::EIO));
        count(IoKind::Read, (0, 4096), Outcome::Invalid(libc::EINVAL));
        count(IoKind::Write, (0, 512), Outcome::Done);
        let snap = stats.snapshot();
        assert_eq!(snap.in_flight, 0);
        assert_eq!(snap.wr_highest_offset, 4608);
        let w = snap.kind(IoKind::Write);
        assert_eq!((w.ops, w.bytes, w.failed, w.invalid), (2, 1024, 0, 0));
        assert_eq!(w.latency.iter().sum::<u64>(), 2);
        let r = snap.kind(IoKind::Read);
        assert_eq!((r.ops, r.bytes, r.failed, r.invalid), (0, 0, 1, 1));
        assert_eq!(
            r.latency.iter().sum::<u64>(),
            1,
            "invalid requests have no latency"
        );
        let errnos: Vec<_> = snap.errno_counts().filter(|&(_, n)| n > 0).collect();
        assert_eq!(errnos, [("EIO", 1), ("EINVAL", 1)]);
        assert!(snap.idle_time_ns.is_some());
    }

    #[test]
    fn test_counts_from_many_threads_add_up() {
        let stats = std::sync::Arc::new(IoStats::default());
        // More threads than shards: some share one, and nothing is lost.
        let n = shards() * 2 + 1;
        let threads: Vec<_> = (0..n)
            .map(|_| {
                let stats = stats.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        stats.begin();
                        let range = (i * 4096, 4096);
                        stats.end(
                            Started::now(),
                            Instant::now(),
                            IoKind::Read,
                            range,
                            Outcome::Done,
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let snap = stats.snapshot();
        assert_eq!(snap.kind(IoKind::Read).ops, n as u64 * 1000);
        assert_eq!(snap.kind(IoKind::Read).bytes, n as u64 * 1000 * 4096);
        assert_eq!(snap.in_flight, 0);
    }

    #[test]
    fn test_a_block_has_one_shard_per_core_of_1152_bytes() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(shards(), cores.clamp(1, MAX_SHARDS));
        assert_eq!(IoStats::default().shards.len(), shards());
        assert_eq!(std::mem::size_of::<Shard>(), 1152);
    }
}
