//! The transmission phase with extended headers (NBD_OPT_EXTENDED_HEADERS),
//! in process, over the same map as `transmission.rs` but on an 8 GiB disk
//! (its tail past 1 MiB a hole, see `wire/disk.rs`), so that one request's
//! 64-bit length covers more than a compact header could carry:
//!
//! | 0..64K data | 64K..192K hole | 192K..256K zeroes | 256K..512K backing data | 512K..8G hole |
//!
//! The byte layouts were checked against qemu-nbd 10 by the interop test
//! (tests/interop/test_extended_headers.py).

mod wire;

use nbd::consts::{CMD_FLAG_PAYLOAD_LEN, EXTENDED_REPLY_MAGIC, REPLY_FLAG_DONE};
use nbd::types::{CommandType, NbdErrno, ReplyType};
use wire::disk::GIB;
use wire::{Chunk, Op, Reply, Server, Setup, KIB};

const BASE: &str = "base:allocation";
const DEPTH: &str = "qemu:allocation-depth";
const DIRTY: &str = "qemu:dirty-bitmap:b0";
const BIG: u64 = 8 * GIB;

/// base:allocation flags.
const HOLE: u32 = 1;
const ZERO: u32 = 2;

fn server() -> Server {
    Server::start(Setup::sized(BIG))
}

fn none() -> Reply {
    Reply::Structured(vec![Chunk::None])
}

#[test]
fn test_block_status_of_a_whole_8_gib_export_is_one_request_with_64_bit_extents() {
    let s = server();
    let mut c = s.extended_client(&[BASE]);
    assert_eq!(c.size, BIG);
    let reply = c.command_long(CommandType::BLOCK_STATUS, 0, 0, BIG);
    let extents = vec![
        (64 * KIB, 0),
        (128 * KIB, HOLE | ZERO),
        (64 * KIB, ZERO),
        (256 * KIB, 0),
        // Past 4 GiB in one descriptor: only BLOCK_STATUS_EXT can say so.
        (BIG - 512 * KIB, HOLE | ZERO),
    ];
    let want = Chunk::StatusExt {
        context: c.context(BASE),
        extents,
    };
    assert_eq!(reply, Reply::Structured(vec![want]));
}

#[test]
fn test_block_status_ext_chunk_bytes_are_extended_header_id_count_descriptors() {
    let s = server();
    let mut c = s.extended_client(&[BASE]);
    let cookie = c.send_long(
        CommandType::BLOCK_STATUS,
        0,
        512 * KIB,
        BIG - 512 * KIB,
        &[],
    );
    let mut want = EXTENDED_REPLY_MAGIC.to_be_bytes().to_vec();
    want.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    want.extend_from_slice(&ReplyType::BLOCK_STATUS_EXT.0.to_be_bytes());
    want.extend_from_slice(&cookie.to_be_bytes());
    want.extend_from_slice(&(512 * KIB).to_be_bytes()); // the request's offset
    want.extend_from_slice(&24u64.to_be_bytes()); // id, count, one descriptor
    want.extend_from_slice(&c.context(BASE).to_be_bytes());
    want.extend_from_slice(&1u32.to_be_bytes());
    want.extend_from_slice(&(BIG - 512 * KIB).to_be_bytes());
    want.extend_from_slice(&u64::from(HOLE | ZERO).to_be_bytes());
    assert_eq!(c.read_bytes(want.len()), want);
}

#[test]
fn test_trim_and_write_zeroes_of_a_whole_8_gib_export_are_one_request_each() {
    let s = server();
    let mut c = s.extended_client(&[]);
    assert_eq!(c.command_long(CommandType::TRIM, 0, 0, BIG), none());
    assert_eq!(c.command_long(CommandType::WRITE_ZEROES, 0, 0, BIG), none());
    let ops = s.disk.take_ops();
    // However the block layer splits them, together they cover the export once each.
    let covered = |discard: bool| -> u64 {
        ops.iter()
            .map(|op| match (op, discard) {
                (Op::Discard { len, .. }, true) | (Op::WriteZeroes { len, .. }, false) => *len,
                _ => 0,
            })
            .sum()
    };
    assert_eq!((covered(true), covered(false)), (BIG, BIG), "{ops:?}");
    assert_eq!(s.disk.bytes(0, 4096), vec![0; 4096]);
}

#[test]
fn test_trim_past_the_end_with_a_64_bit_length_is_einval() {
    let s = server();
    let mut c = s.extended_client(&[]);
    let reply = c.command_long(CommandType::TRIM, 0, 4096, BIG);
    let Reply::Structured(chunks) = reply else {
        panic!("a structured reply: {reply:?}")
    };
    assert!(
        matches!(
            &chunks[..],
            [Chunk::Error {
                error: NbdErrno::EINVAL,
                ..
            }]
        ),
        "{chunks:?}"
    );
    assert_eq!(s.disk.take_ops(), vec![]);
}

#[test]
fn test_write_with_and_without_payload_len_lands_and_reads_back() {
    let s = server();
    let mut c = s.extended_client(&[]);
    let cookie = c.send_long(
        CommandType::WRITE,
        CMD_FLAG_PAYLOAD_LEN,
        4 * KIB,
        512,
        &[7; 512],
    );
    assert_eq!(c.reply(cookie, 0), none());
    assert_eq!(c.write(0, 8 * KIB, &[9; 512]), none());
    assert_eq!(s.disk.bytes(4 * KIB, 512), vec![7; 512]);
    assert_eq!(s.disk.bytes(8 * KIB, 512), vec![9; 512]);
    let read = c.read(0, 4 * KIB, 512);
    let want = Chunk::Data {
        offset: 4 * KIB,
        data: vec![7; 512],
    };
    assert_eq!(read, Reply::Structured(vec![want]));
}

#[test]
fn test_block_status_filter_payload_reports_only_the_contexts_asked_for() {
    let s = server();
    let mut c = s.extended_client(&[BASE, DEPTH, DIRTY]);
    let (depth, dirty) = (c.context(DEPTH), c.context(DIRTY));
    // The effective length is in the payload; the header's length is the payload's.
    let filter = nbd::client::status_filter_payload(BIG, &[dirty, depth]);
    let cookie = c.send_long(
        CommandType::BLOCK_STATUS,
        CMD_FLAG_PAYLOAD_LEN,
        0,
        filter.len() as u64,
        &filter,
    );
    let Reply::Structured(chunks) = c.reply(cookie, 0) else {
        panic!("a structured reply")
    };
    let contexts: Vec<u32> = chunks
        .iter()
        .map(|chunk| match chunk {
            Chunk::StatusExt { context, extents } => {
                assert_eq!(extents.iter().map(|e| e.0).sum::<u64>(), BIG, "{chunk:?}");
                *context
            }
            other => panic!("not a BLOCK_STATUS_EXT chunk: {other:?}"),
        })
        .collect();
    // One chunk per context asked for, none for base:allocation.
    let mut sorted = contexts.clone();
    sorted.sort_unstable();
    let mut want = vec![depth, dirty];
    want.sort_unstable();
    assert_eq!(sorted, want);
}

#[test]
fn test_block_status_filter_naming_an_unknown_context_is_einval_and_the_connection_lives() {
    let s = server();
    let mut c = s.extended_client(&[BASE]);
    let filter = nbd::client::status_filter_payload(4096, &[c.context(BASE) + 100]);
    let cookie = c.send_long(
        CommandType::BLOCK_STATUS,
        CMD_FLAG_PAYLOAD_LEN,
        0,
        filter.len() as u64,
        &filter,
    );
    let Reply::Structured(chunks) = c.reply(cookie, 0) else {
        panic!("a structured reply")
    };
    assert!(
        matches!(
            &chunks[..],
            [Chunk::Error {
                error: NbdErrno::EINVAL,
                ..
            }]
        ),
        "{chunks:?}"
    );
    assert_eq!(c.command(CommandType::FLUSH, 0, 0, 0), none());
}
