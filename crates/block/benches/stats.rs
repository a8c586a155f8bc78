//! What counting costs a request: `begin` when it arrives, `end` when its
//! reply is ready (two clock reads and a handful of relaxed atomic adds on
//! the thread's own shard), alone and with threads counting into the same
//! statistics at once, as an export's connections do.
//! `cargo bench -p block --bench stats`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{IoKind, IoStats, Outcome, Started};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn count_one(stats: &IoStats, i: u64) {
    stats.begin();
    let started = Started::now();
    let range = (black_box(i) * 4096, 4096);
    stats.end(started, Instant::now(), IoKind::Read, range, Outcome::Done);
}

fn one_thread(c: &mut Criterion) {
    let stats = IoStats::default();
    let mut g = c.benchmark_group("count a request");
    g.throughput(Throughput::Elements(1));
    let mut i = 0u64;
    g.bench_function("one thread", |b| {
        b.iter(|| {
            i += 1;
            count_one(&stats, i)
        })
    });
    g.bench_function("clock read alone (for scale)", |b| {
        b.iter(|| black_box(Instant::now()))
    });
    g.finish();
}

/// `threads` threads counting `iters` requests each into one `IoStats`.
fn contended(threads: usize, iters: u64) -> Duration {
    let stats = Arc::new(IoStats::default());
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let stats = stats.clone();
            std::thread::spawn(move || (0..iters).for_each(|i| count_one(&stats, i)))
        })
        .collect();
    handles.into_iter().for_each(|h| h.join().unwrap());
    start.elapsed()
}

fn many_threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("count a request");
    g.throughput(Throughput::Elements(1));
    g.bench_function("2 threads at once, per request per thread", |b| {
        b.iter_custom(|iters| contended(2, iters))
    });
    g.finish();
}

criterion_group!(benches, one_thread, many_threads);
criterion_main!(benches);
