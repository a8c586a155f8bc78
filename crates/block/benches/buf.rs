//! The buffer pool on the data path: a request takes a buffer
//! (`IoBuf::for_overwrite`) and its reply drops it, often on another thread
//! (the reader takes, the writer task drops). `cargo bench -p block --bench buf`.

use std::hint::black_box;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use block::IoBuf;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Buffers per measured batch in the threaded cases.
const BATCH: usize = 1024;

fn same_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("same thread");
    g.throughput(Throughput::Elements(1));
    for (name, size) in [("4 KiB", 4096), ("64 KiB", 64 << 10), ("1 MiB", 1 << 20)] {
        g.bench_function(format!("take and drop {name}"), |b| {
            b.iter(|| drop(black_box(IoBuf::for_overwrite(size))))
        });
    }
    g.finish();
}

/// Taken on one thread, dropped on another, as NBD READ buffers are.
fn handed_over(size: usize, iters: u64) -> Duration {
    let (tx, rx) = mpsc::sync_channel::<IoBuf>(64);
    let dropper = std::thread::spawn(move || rx.into_iter().for_each(drop));
    let start = Instant::now();
    for _ in 0..iters * BATCH as u64 {
        if tx.send(IoBuf::for_overwrite(size)).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = dropper.join();
    start.elapsed()
}

/// `threads` threads each taking and dropping buffers at once.
fn contended(threads: usize, size: usize, iters: u64) -> Duration {
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..iters * BATCH as u64 {
                    drop(black_box(IoBuf::for_overwrite(size)));
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    start.elapsed()
}

fn across_threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("across threads");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (name, size) in [("4 KiB", 4096), ("1 MiB", 1 << 20)] {
        g.bench_function(format!("taken on one, dropped on another, {name}"), |b| {
            b.iter_custom(|iters| handed_over(size, iters))
        });
        g.bench_function(format!("4 threads take and drop {name}"), |b| {
            b.iter_custom(|iters| contended(4, size, iters))
        });
    }
    g.finish();
}

criterion_group!(benches, same_thread, across_threads);
criterion_main!(benches);
