//! Dirty bitmap paths: marking on every write (under the bitmap's mutex),
//! and walking runs for `qemu:dirty-bitmap` BLOCK_STATUS and backups.
//! `cargo bench -p block`.

use std::hint::black_box;

use block::DirtyBitmap;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const DISK: u64 = 1 << 40;

/// Offsets spread over the disk like random 4 KiB writes (a fixed LCG, no RNG crate).
fn offsets(n: usize) -> Vec<u64> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 20) % (DISK / 4096) * 4096
        })
        .collect()
}

fn bench_bitmap(c: &mut Criterion) {
    let offs = offsets(4096);
    let mut g = c.benchmark_group("mark");
    g.throughput(Throughput::Elements(offs.len() as u64));
    let bitmap = DirtyBitmap::new("b".into(), DISK, 65536, true, false);
    g.bench_function("4096 random 4 KiB writes, 1 TiB at 64 KiB", |b| {
        b.iter(|| {
            for &o in &offs {
                bitmap.mark(black_box(o), 4096);
            }
        })
    });
    g.finish();
    let mut g = c.benchmark_group("mark range");
    g.throughput(Throughput::Bytes(1 << 30));
    g.bench_function("one 1 GiB write", |b| {
        b.iter(|| bitmap.mark(black_box(0), 1 << 30))
    });
    g.finish();

    let sparse = DirtyBitmap::new("s".into(), DISK, 65536, true, false);
    for &o in &offs {
        sparse.mark(o, 4096);
    }
    let mut g = c.benchmark_group("extents");
    g.bench_function("runs over 1 TiB, 4096 dirty granules", |b| {
        b.iter(|| black_box(sparse.extents(0, DISK, usize::MAX).len()))
    });
    g.bench_function("count, 1 TiB at 64 KiB", |b| {
        b.iter(|| black_box(sparse.count()))
    });
    g.finish();
}

criterion_group!(benches, bench_bitmap);
criterion_main!(benches);
