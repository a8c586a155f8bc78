//! Every reply shape against the bytes doc/proto.md (NetworkBlockDevice/nbd)
//! prescribes. Magics and type numbers are spelled out here rather than taken
//! from `consts`, so a wrong constant fails too.

use super::*;
use crate::consts::{CMD_FLAG_DF, CMD_FLAG_REQ_ONE, MAX_STRING};
use crate::request::RequestHeader;
use crate::types::{CommandType, NbdErrno};

/// Simple reply magic, 0x67446698.
const SIMPLE: [u8; 4] = [0x67, 0x44, 0x66, 0x98];
/// Structured reply chunk magic, 0x668e33ef.
const CHUNK: [u8; 4] = [0x66, 0x8e, 0x33, 0xef];
/// Chunk flags: none, or NBD_REPLY_FLAG_DONE.
const MORE: [u8; 2] = [0, 0];
const DONE: [u8; 2] = [0, 1];
/// Chunk types.
const NONE: [u8; 2] = [0, 0];
const OFFSET_DATA: [u8; 2] = [0, 1];
const OFFSET_HOLE: [u8; 2] = [0, 2];
const BLOCK_STATUS: [u8; 2] = [0, 5];
const ERROR: [u8; 2] = [0x80, 0x01];

const COOKIE: u64 = 0x0102_0304_0506_0708;
const COOKIE_BYTES: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn request(command: CommandType, flags: u16, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags,
        command,
        cookie: COOKIE,
        offset,
        length: u64::from(length),
    }
}

fn read(flags: u16, offset: u64, length: u32) -> RequestHeader {
    request(CommandType::READ, flags, offset, length)
}

/// A structured chunk header: magic, flags, type, cookie, payload length.
fn chunk(flags: [u8; 2], kind: [u8; 2], len: u32) -> Vec<u8> {
    cat(&[&CHUNK, &flags, &kind, &COOKIE_BYTES, &len.to_be_bytes()])
}

fn pieces(plan: &ReplyPlan) -> Vec<PlanPiece<'_>> {
    plan.pieces().collect()
}

#[test]
fn test_ack_in_either_shape_is_a_simple_reply_with_errno_zero() {
    let want = cat(&[&SIMPLE, &[0, 0, 0, 0], &COOKIE_BYTES]);
    for shape in [ReplyShape::Simple, ReplyShape::Structured] {
        let plan = shape.ack(&read(0, 0, 0));
        assert_eq!(pieces(&plan), [PlanPiece::Bytes(&want)], "{shape:?}");
    }
}

#[test]
fn test_error_when_simple_sends_errno_and_drops_the_message() {
    let plan = ReplyShape::Simple.error(&read(0, 0, 0), NbdErrno::ENOSPC, "No space left");
    let want = cat(&[&SIMPLE, &[0, 0, 0, 28], &COOKIE_BYTES]);
    assert_eq!(pieces(&plan), [PlanPiece::Bytes(&want)]);
}

#[test]
fn test_error_when_structured_sends_error_chunk_with_message() {
    let plan = ReplyShape::Structured.error(&read(0, 0, 0), NbdErrno::EIO, "bad");
    // Payload: errno (32), message length (16), message.
    let want = cat(&[&chunk(DONE, ERROR, 6 + 3), &[0, 0, 0, 5], &[0, 3], b"bad"]);
    assert_eq!(pieces(&plan), [PlanPiece::Bytes(&want)]);
}

#[test]
fn test_error_when_message_too_long_cuts_it_to_4096_bytes() {
    let message = "x".repeat(MAX_STRING + 10);
    let plan = ReplyShape::Structured.error(&read(0, 0, 0), NbdErrno::EINVAL, &message);
    let bytes = plan.protocol_bytes();
    assert_eq!(bytes.len(), 20 + 6 + MAX_STRING);
    assert_eq!(&bytes[16..20], &(6 + MAX_STRING as u32).to_be_bytes());
    assert_eq!(&bytes[24..26], &(MAX_STRING as u16).to_be_bytes());
}

#[test]
fn test_read_when_simple_sends_header_then_all_data() {
    let plan = ReplyShape::Simple.read(&read(0, 512, 4096), &[]);
    let header = cat(&[&SIMPLE, &[0, 0, 0, 0], &COOKIE_BYTES]);
    assert_eq!(
        pieces(&plan),
        [PlanPiece::Bytes(&header), PlanPiece::Data(0..4096)]
    );
}

#[test]
fn test_read_when_simple_ignores_allocation() {
    let plan = ReplyShape::Simple.read(&read(0, 0, 128 * 1024), &[(128 * 1024, 3)]);
    assert_eq!(plan.data_len(), 128 * 1024);
    assert_eq!(plan.protocol_bytes().len(), 16);
}

#[test]
fn test_read_when_simple_and_empty_sends_header_without_data() {
    let plan = ReplyShape::Simple.read(&read(0, 0, 0), &[]);
    let header = cat(&[&SIMPLE, &[0, 0, 0, 0], &COOKIE_BYTES]);
    assert_eq!(pieces(&plan), [PlanPiece::Bytes(&header)]);
}

#[test]
fn test_read_when_structured_and_empty_sends_none_chunk() {
    let plan = ReplyShape::Structured.read(&read(0, 4096, 0), &[]);
    assert_eq!(pieces(&plan), [PlanPiece::Bytes(&chunk(DONE, NONE, 0))]);
}

#[test]
fn test_read_when_structured_without_allocation_sends_one_data_chunk() {
    let plan = ReplyShape::Structured.read(&read(0, 0x1_0000_0000, 4096), &[]);
    // Payload: offset (64), then the data; length counts both.
    let header = cat(&[
        &chunk(DONE, OFFSET_DATA, 8 + 4096),
        &0x1_0000_0000u64.to_be_bytes(),
    ]);
    assert_eq!(
        pieces(&plan),
        [PlanPiece::Bytes(&header), PlanPiece::Data(0..4096)]
    );
}

#[test]
fn test_read_when_df_set_ignores_holes_and_sends_one_data_chunk() {
    let req = read(CMD_FLAG_DF, 0, 128 * 1024);
    let plan = ReplyShape::Structured.read(&req, &[(64 * 1024, 0), (64 * 1024, 3)]);
    let header = cat(&[&chunk(DONE, OFFSET_DATA, 8 + 128 * 1024), &[0; 8]]);
    assert_eq!(
        pieces(&plan),
        [PlanPiece::Bytes(&header), PlanPiece::Data(0..128 * 1024)]
    );
}

#[test]
fn test_read_when_sparse_sends_data_hole_data_with_done_on_the_last() {
    let base = 1 << 20;
    let req = read(0, base, 16384);
    let plan = ReplyShape::Structured.read(&req, &[(4096, 0), (8192, 3), (4096, 0)]);
    let data1 = cat(&[&chunk(MORE, OFFSET_DATA, 8 + 4096), &base.to_be_bytes()]);
    // OFFSET_HOLE payload: offset (64), hole size (32).
    let hole = cat(&[
        &chunk(MORE, OFFSET_HOLE, 12),
        &(base + 4096).to_be_bytes(),
        &8192u32.to_be_bytes(),
    ]);
    let data2 = cat(&[
        &chunk(DONE, OFFSET_DATA, 8 + 4096),
        &(base + 12288).to_be_bytes(),
    ]);
    assert_eq!(
        pieces(&plan),
        [
            PlanPiece::Bytes(&data1),
            PlanPiece::Data(0..4096),
            PlanPiece::Bytes(&hole),
            PlanPiece::Bytes(&data2),
            PlanPiece::Data(12288..16384),
        ]
    );
}

#[test]
fn test_read_when_sparse_and_ends_in_a_hole_marks_the_hole_done() {
    let req = read(0, 0, 8192);
    let plan = ReplyShape::Structured.read(&req, &[(4096, 0), (4096, 2)]);
    let hole = cat(&[
        &chunk(DONE, OFFSET_HOLE, 12),
        &4096u64.to_be_bytes(),
        &4096u32.to_be_bytes(),
    ]);
    assert_eq!(pieces(&plan)[2], PlanPiece::Bytes(&hole));
    assert_eq!(plan.data_len(), 4096);
}

#[test]
fn test_read_when_allocation_stops_short_sends_the_rest_as_data() {
    let req = read(0, 0, 8192);
    let plan = ReplyShape::Structured.read(&req, &[(4096, 3)]);
    let data = cat(&[&chunk(DONE, OFFSET_DATA, 8 + 4096), &4096u64.to_be_bytes()]);
    assert_eq!(
        pieces(&plan)[1..],
        [PlanPiece::Bytes(&data), PlanPiece::Data(4096..8192)]
    );
    assert_eq!(&plan.protocol_bytes()[4..6], &MORE, "the hole is not last");
}

#[test]
fn test_read_when_allocation_runs_past_the_request_clips_it() {
    let req = read(0, 0, 8192);
    let plan = ReplyShape::Structured.read(&req, &[(4096, 0), (1 << 20, 3), (4096, 0)]);
    let hole = cat(&[
        &chunk(DONE, OFFSET_HOLE, 12),
        &4096u64.to_be_bytes(),
        &4096u32.to_be_bytes(),
    ]);
    assert_eq!(pieces(&plan).len(), 3);
    assert_eq!(pieces(&plan)[2], PlanPiece::Bytes(&hole));
}

#[test]
fn test_read_when_unallocated_but_not_zero_sends_data() {
    // HOLE alone (say, a backing file's data shows through): it must be read.
    let plan = ReplyShape::Structured.read(&read(0, 0, 8192), &[(8192, 1)]);
    assert_eq!(plan.data_len(), 8192);
}

#[test]
fn test_read_wants_allocation_only_for_large_structured_reads_without_df() {
    let big = read(0, 0, SPARSE_READ_MIN);
    assert!(ReplyShape::Structured.read_wants_allocation(&big));
    assert!(!ReplyShape::Simple.read_wants_allocation(&big));
    let df = read(CMD_FLAG_DF, 0, SPARSE_READ_MIN);
    assert!(!ReplyShape::Structured.read_wants_allocation(&df));
    let small = read(0, 0, SPARSE_READ_MIN - 1);
    assert!(!ReplyShape::Structured.read_wants_allocation(&small));
}

#[cfg(feature = "client")]
#[test]
fn test_sparse_read_round_trips_through_the_client_decoder() {
    let req = read(0, 0, 12288);
    let plan = ReplyShape::Structured.read(&req, &[(4096, 0), (4096, 3), (4096, 0)]);
    let data: Vec<u8> = (0..12288u32).map(|i| i as u8).collect();
    let wire = plan.to_wire(&data).expect("data covers the plan");
    let mut rest = wire.as_slice();
    let mut got = vec![0xffu8; 12288];
    while let Some((
        crate::client::ReplyHeader::Chunk {
            reply_type, length, ..
        },
        used,
    )) = crate::client::decode_reply_header(rest).expect("a chunk")
    {
        let payload = &rest[used..used + length as usize];
        if let Some((offset, bytes)) = crate::client::decode_offset_data(payload)
            .filter(|_| reply_type == crate::types::ReplyType::OFFSET_DATA)
        {
            got[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
        } else if let Some((offset, len)) = crate::client::decode_offset_hole(payload) {
            got[offset as usize..offset as usize + len as usize].fill(0);
        }
        rest = &rest[used + length as usize..];
    }
    assert!(rest.is_empty());
    let mut want = data.clone();
    want[4096..8192].fill(0);
    assert_eq!(got, want);
}

#[test]
fn test_to_wire_when_data_too_short_returns_none() {
    let plan = ReplyShape::Simple.read(&read(0, 0, 4096), &[]);
    assert!(plan.to_wire(&[0; 100]).is_none());
}

fn status_req(flags: u16) -> RequestHeader {
    request(CommandType::BLOCK_STATUS, flags, 0, 65536)
}

/// A BLOCK_STATUS chunk: context id (32), then (length, flags) descriptors.
fn status_chunk(flags: [u8; 2], id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut out = chunk(flags, BLOCK_STATUS, 4 + 8 * extents.len() as u32);
    out.extend_from_slice(&id.to_be_bytes());
    for (len, status) in extents {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&status.to_be_bytes());
    }
    out
}

#[test]
fn test_block_status_for_base_allocation_sends_one_done_chunk() {
    let mut plan = ReplyShape::Structured.block_status(&status_req(0), 1);
    let extents = [
        (4096, allocation_status(true, false)),
        (61440, allocation_status(false, true)),
    ];
    plan.push(1, &extents);
    let plan = plan.finish();
    let want = cat(&[
        &chunk(DONE, BLOCK_STATUS, 4 + 16),
        &[0, 0, 0, 1],
        &[0, 0, 0x10, 0, 0, 0, 0, 0],
        &[0, 0, 0xf0, 0, 0, 0, 0, 3],
    ]);
    assert_eq!(pieces(&plan), [PlanPiece::Bytes(&want)]);
}

#[test]
fn test_block_status_for_three_contexts_sends_a_chunk_each_and_done_on_the_last() {
    let mut plan = ReplyShape::Structured.block_status(&status_req(0), 3);
    let allocation = [(65536, allocation_status(true, false))];
    // qemu:allocation-depth: 0 unallocated, 1 this layer, 2 the backing file.
    let depth = [(4096, 1), (4096, 2), (57344, 0)];
    let dirty = [(8192, dirty_status(true)), (57344, dirty_status(false))];
    plan.push(1, &allocation);
    plan.push(2, &depth);
    plan.push(3, &dirty);
    let plan = plan.finish();
    let want = cat(&[
        &status_chunk(MORE, 1, &[(65536, 0)]),
        &status_chunk(MORE, 2, &[(4096, 1), (4096, 2), (57344, 0)]),
        &status_chunk(DONE, 3, &[(8192, 1), (57344, 0)]),
    ]);
    assert_eq!(plan.protocol_bytes(), want.as_slice());
    assert_eq!(pieces(&plan).len(), 3);
    assert_eq!(plan.data_len(), 0);
}

#[test]
fn test_block_status_when_req_one_keeps_one_descriptor_per_context() {
    let mut plan = ReplyShape::Structured.block_status(&status_req(CMD_FLAG_REQ_ONE), 2);
    assert_eq!(plan.max_extents(), 1);
    plan.push(1, &[(4096, 0), (4096, 3)]);
    plan.push(2, &[(512, 1), (512, 0)]);
    let want = cat(&[
        &status_chunk(MORE, 1, &[(4096, 0)]),
        &status_chunk(DONE, 2, &[(512, 1)]),
    ]);
    assert_eq!(plan.finish().protocol_bytes(), want.as_slice());
}

#[test]
fn test_block_status_without_req_one_gathers_up_to_max_extents() {
    let plan = ReplyShape::Structured.block_status(&status_req(0), 1);
    assert_eq!(plan.max_extents(), MAX_EXTENTS);
}

#[test]
fn test_block_status_when_nothing_pushed_ends_with_a_none_chunk() {
    let plan = ReplyShape::Structured
        .block_status(&status_req(0), 0)
        .finish();
    assert_eq!(pieces(&plan), [PlanPiece::Bytes(&chunk(DONE, NONE, 0))]);
}

#[test]
fn test_status_chunk_len_counts_header_id_and_descriptors() {
    assert_eq!(status_chunk_len(0), 24);
    assert_eq!(status_chunk_len(2), 40);
}

#[test]
fn test_allocation_status_sets_hole_and_zero_bits() {
    assert_eq!(allocation_status(true, false), 0);
    assert_eq!(allocation_status(false, false), 1);
    assert_eq!(allocation_status(true, true), 2);
    assert_eq!(allocation_status(false, true), 3);
}

#[test]
fn test_dirty_status_sets_bit_zero() {
    assert_eq!((dirty_status(true), dirty_status(false)), (1, 0));
}

#[test]
fn test_shape_of_follows_the_negotiated_structured_replies() {
    let mut negotiated = crate::handshake::Negotiated {
        export: crate::export::ExportInfo {
            name: String::new(),
            description: None,
            size: 0,
            read_only: false,
            can_trim: false,
            can_write_zeroes: false,
            can_fast_zero: false,
            can_multi_conn: false,
            can_cache: false,
            block_size: crate::export::BlockSize {
                min: 1,
                preferred: 4096,
                max: 1 << 25,
            },
            meta_contexts: Vec::new(),
        },
        structured_replies: true,
        extended_headers: false,
        meta_contexts: Vec::new(),
        transmission_flags: 0,
    };
    assert_eq!(ReplyShape::of(&negotiated), ReplyShape::Structured);
    negotiated.structured_replies = false;
    assert_eq!(ReplyShape::of(&negotiated), ReplyShape::Simple);
    negotiated.extended_headers = true;
    assert_eq!(ReplyShape::of(&negotiated), ReplyShape::Extended);
}

/// Extended reply magic, 0x6e8a278c.
const EXT: [u8; 4] = [0x6e, 0x8a, 0x27, 0x8c];
const BLOCK_STATUS_EXT: [u8; 2] = [0, 6];

/// An extended chunk header: magic, flags, type, cookie, the request's
/// offset, 64-bit payload length.
fn ext_chunk(flags: [u8; 2], kind: [u8; 2], offset: u64, len: u64) -> Vec<u8> {
    cat(&[
        &EXT,
        &flags,
        &kind,
        &COOKIE_BYTES,
        &offset.to_be_bytes(),
        &len.to_be_bytes(),
    ])
}

#[test]
fn test_ack_when_extended_is_a_none_chunk_with_the_request_offset() {
    let req = request(CommandType::WRITE_ZEROES, 0, 8192, 512);
    let plan = ReplyShape::Extended.ack(&req);
    let want = ext_chunk(DONE, NONE, 8192, 0);
    assert_eq!(pieces(&plan), [PlanPiece::Bytes(&want)]);
}

#[test]
fn test_error_when_extended_is_an_extended_error_chunk() {
    let plan = ReplyShape::Extended.error(&read(0, 4096, 0), NbdErrno::EIO, "bad");
    let want = cat(&[
        &ext_chunk(DONE, ERROR, 4096, 6 + 3),
        &[0, 0, 0, 5],
        &[0, 3],
        b"bad",
    ]);
    assert_eq!(pieces(&plan), [PlanPiece::Bytes(&want)]);
}

#[test]
fn test_read_when_extended_and_sparse_frames_every_chunk_with_the_request_offset() {
    let plan = ReplyShape::Extended.read(
        &read(0, 4096, 128 * 1024),
        &[(64 * 1024, 0), (64 * 1024, 3)],
    );
    let mut hole = ext_chunk(DONE, OFFSET_HOLE, 4096, 12);
    hole.extend_from_slice(&(4096u64 + 65536).to_be_bytes());
    hole.extend_from_slice(&65536u32.to_be_bytes());
    let mut data = ext_chunk(MORE, OFFSET_DATA, 4096, 8 + 65536);
    data.extend_from_slice(&4096u64.to_be_bytes());
    assert_eq!(
        pieces(&plan),
        [
            PlanPiece::Bytes(&data),
            PlanPiece::Data(0..65536),
            PlanPiece::Bytes(&hole)
        ]
    );
}

#[test]
fn test_block_status_when_extended_sends_block_status_ext_with_64_bit_lengths() {
    let req = RequestHeader {
        length: 1 << 40,
        ..status_req(0)
    };
    let mut plan = ReplyShape::Extended.block_status(&req, 1);
    plan.push(0, &[(1 << 40, allocation_status(false, true))]);
    let want = cat(&[
        &ext_chunk(DONE, BLOCK_STATUS_EXT, req.offset, 8 + 16),
        &[0, 0, 0, 0, 0, 0, 0, 1],
        &(1u64 << 40).to_be_bytes(),
        &3u64.to_be_bytes(),
    ]);
    assert_eq!(plan.finish().protocol_bytes(), want.as_slice());
    assert_eq!(ReplyShape::Extended.status_chunk_len(1), want.len());
}

#[test]
fn test_max_extent_len_is_64_bits_only_when_extended() {
    assert_eq!(ReplyShape::Structured.max_extent_len(), u64::from(u32::MAX));
    assert_eq!(ReplyShape::Extended.max_extent_len(), u64::MAX);
}
