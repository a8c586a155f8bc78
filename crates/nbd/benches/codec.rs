//! The per-request codec work on the data path: decoding a request header,
//! encoding the reply headers that go in front of READ data, shaping whole
//! reply plans (a fresh one per request, as the server does), and a
//! BLOCK_STATUS chunk of many extents. `cargo bench -p nbd`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nbd::consts::{REQUEST_HEADER_LEN, REQUEST_MAGIC};
use nbd::reply::{self, ReplyShape};
use nbd::request::{decode_request, RequestHeader};
use nbd::types::{CommandType, NbdErrno};

fn request_header(cookie: u64) -> [u8; REQUEST_HEADER_LEN] {
    let mut h = [0u8; REQUEST_HEADER_LEN];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[6..8].copy_from_slice(&0u16.to_be_bytes()); // READ
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&(cookie * 4096).to_be_bytes());
    h[24..28].copy_from_slice(&4096u32.to_be_bytes());
    h
}

fn bench_codec(c: &mut Criterion) {
    let headers: Vec<_> = (0..1024).map(request_header).collect();
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Elements(headers.len() as u64));
    g.bench_function("decode 1024 headers", |b| {
        b.iter(|| {
            for h in &headers {
                black_box(decode_request(black_box(h)).ok());
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("reply");
    g.throughput(Throughput::Elements(1024));
    let mut out = Vec::with_capacity(64 * 1024);
    g.bench_function("1024 simple replies", |b| {
        b.iter(|| {
            out.clear();
            for cookie in 0..1024u64 {
                reply::simple_reply(&mut out, black_box(cookie), NbdErrno(0));
            }
            black_box(out.len())
        })
    });
    g.bench_function("1024 OFFSET_DATA headers", |b| {
        b.iter(|| {
            out.clear();
            for cookie in 0..1024u64 {
                reply::offset_data_header(&mut out, black_box(cookie), true, cookie * 4096, 4096);
            }
            black_box(out.len())
        })
    });
    g.finish();

    let reads: Vec<RequestHeader> = (0..1024u64)
        .map(|cookie| RequestHeader {
            flags: 0,
            command: CommandType::READ,
            cookie,
            offset: cookie * 4096,
            length: 4096,
        })
        .collect();
    let shape = ReplyShape::Structured;
    let mut g = c.benchmark_group("reply plan");
    g.throughput(Throughput::Elements(reads.len() as u64));
    g.bench_function("1024 acks", |b| {
        b.iter(|| {
            for r in &reads {
                black_box(shape.ack(black_box(r)));
            }
        })
    });
    g.bench_function("1024 whole 4k READs", |b| {
        b.iter(|| {
            for r in &reads {
                black_box(shape.read(black_box(r), &[]));
            }
        })
    });
    let runs: Vec<(u32, u32)> = (0..16).map(|i| (4096, (i % 2) * 3)).collect();
    g.bench_function("1024 sparse 64k READs of 16 runs", |b| {
        b.iter(|| {
            for r in &reads {
                let r = RequestHeader {
                    length: 65536,
                    ..*r
                };
                black_box(shape.read(black_box(&r), &runs));
            }
        })
    });
    g.finish();

    let extents: Vec<(u64, u32)> = (0..128 * 1024).map(|i| (65536, i % 2)).collect();
    let mut g = c.benchmark_group("block status");
    g.throughput(Throughput::Elements(extents.len() as u64));
    g.bench_function("chunk of 128Ki extents", |b| {
        let mut out = Vec::with_capacity(extents.len() * 8 + 64);
        b.iter(|| {
            out.clear();
            reply::block_status_chunk(&mut out, 7, true, 1, black_box(&extents));
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench_codec);
criterion_main!(benches);
