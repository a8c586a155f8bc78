//! The transmission phase, in process: the reply to every command, byte for
//! byte or field for field, with simple replies and with structured ones,
//! against an NBD server built from the tables (see `wire/mod.rs`) over a
//! memory disk with a known allocation map (see `wire/disk.rs`):
//!
//! | 0..64K data | 64K..192K hole | 192K..256K zeroes | 256K..512K backing data | 512K..1M hole |
//!
//! What is asserted was checked against qemu-storage-daemon 10.0 with a raw
//! client; where bexd answers differently on purpose, the test says so.

mod wire;

use block::drivers::blkdebug::IoType;
use block::ZeroFlags;
use nbd::consts::{
    CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE,
    FLAG_READ_ONLY, STRUCTURED_REPLY_MAGIC,
};
use nbd::types::{CommandType, NbdErrno};
use wire::{Chunk, Op, Reply, Server, Setup, KIB, SIZE};

const BASE: &str = "base:allocation";
const DEPTH: &str = "qemu:allocation-depth";
const DIRTY: &str = "qemu:dirty-bitmap:b0";

/// base:allocation flags.
const HOLE: u32 = 1;
const ZERO: u32 = 2;

fn server() -> Server {
    Server::start(Setup::default())
}

fn data(s: &Server, offset: u64, len: u32) -> Chunk {
    Chunk::Data {
        offset,
        data: s.disk.bytes(offset, len as usize),
    }
}

fn hole(offset: u64, len: u64) -> Chunk {
    Chunk::Hole {
        offset,
        len: len as u32,
    }
}

fn status(context: u32, extents: &[(u64, u32)]) -> Chunk {
    Chunk::Status {
        context,
        extents: extents.iter().map(|&(l, f)| (l as u32, f)).collect(),
    }
}

fn kib(n: u64) -> u32 {
    (n * KIB) as u32
}

// ---- simple replies (no structured reply negotiated) -------------------------

#[test]
fn test_simple_read_is_an_ok_reply_followed_by_the_data() {
    let s = server();
    let mut c = s.simple_client();
    // Across the end of the data region into the hole: one reply, all bytes.
    let reply = c.read(0, 60 * KIB, kib(8));
    let expected = s.disk.bytes(60 * KIB, 8 * 1024);
    assert_eq!(
        reply,
        Reply::Simple {
            error: NbdErrno::OK,
            data: expected
        }
    );
}

#[test]
fn test_simple_read_of_zero_length_is_an_ok_reply_with_no_data() {
    let s = server();
    let mut c = s.simple_client();
    assert_eq!(c.read(0, 0, 0), Reply::OK);
    // Nothing else followed it: the next reply lines up.
    assert_eq!(c.command(CommandType::FLUSH, 0, 0, 0), Reply::OK);
}

#[test]
fn test_simple_read_past_eof_is_einval_with_no_data() {
    let s = server();
    let mut c = s.simple_client();
    assert_eq!(
        c.read(0, SIZE - 512, 1024),
        Reply::simple_error(NbdErrno::EINVAL)
    );
    let last = c.read(0, SIZE - 512, 512);
    assert_eq!(
        last,
        Reply::Simple {
            error: NbdErrno::OK,
            data: vec![0; 512]
        }
    );
}

#[test]
fn test_simple_read_error_is_the_drivers_errno_with_no_data() {
    let s = Server::start(Setup::failing(IoType::Read, 8 * KIB, libc::EIO));
    let mut c = s.simple_client();
    assert_eq!(
        c.read(0, 8 * KIB, kib(4)),
        Reply::simple_error(NbdErrno::EIO)
    );
    let before = c.read(0, 0, kib(4));
    assert_eq!(
        before,
        Reply::Simple {
            error: NbdErrno::OK,
            data: s.disk.bytes(0, 4096)
        }
    );
}

#[test]
fn test_simple_read_with_df_is_einval_as_df_needs_structured_replies() {
    let s = server();
    let mut c = s.simple_client();
    assert_eq!(
        c.read(CMD_FLAG_DF, 0, kib(4)),
        Reply::simple_error(NbdErrno::EINVAL)
    );
}

#[test]
fn test_simple_write_is_an_ok_reply_and_reaches_the_disk() {
    let s = server();
    let mut c = s.simple_client();
    assert_eq!(c.write(0, 4 * KIB, &[7; 4096]), Reply::OK);
    let write = Op::Write {
        offset: 4 * KIB,
        len: 4096,
        fua: false,
    };
    assert_eq!(s.disk.take_ops(), vec![write]);
    assert_eq!(s.disk.bytes(4 * KIB, 4096), vec![7; 4096]);
}

#[test]
fn test_simple_write_error_is_the_drivers_errno() {
    let s = Server::start(Setup::failing(IoType::Write, 0, libc::ENOSPC));
    let mut c = s.simple_client();
    assert_eq!(
        c.write(0, 0, &[1; 4096]),
        Reply::simple_error(NbdErrno::ENOSPC)
    );
    assert_eq!(c.command(CommandType::FLUSH, 0, 0, 0), Reply::OK);
}

/// qemu-storage-daemon answers EINVAL here; bexd sends ENOSPC, the errno the
/// NBD spec asks for (see `nbd::request::validate`).
#[test]
fn test_simple_write_past_eof_is_enospc_and_its_payload_is_skipped() {
    let s = server();
    let mut c = s.simple_client();
    let reply = c.write(0, SIZE - 512, &[1; 1024]);
    assert_eq!(reply, Reply::simple_error(NbdErrno::ENOSPC));
    // The payload was read and dropped: the next request is parsed as one.
    assert_eq!(c.command(CommandType::FLUSH, 0, 0, 0), Reply::OK);
    assert_eq!(s.disk.take_ops(), vec![Op::Flush]);
}

#[test]
fn test_simple_write_to_read_only_export_is_eperm_and_its_payload_is_skipped() {
    let s = Server::start(Setup::read_only());
    let mut c = s.simple_client();
    assert_ne!(c.flags & FLAG_READ_ONLY, 0);
    assert_eq!(
        c.write(0, 0, &[1; 4096]),
        Reply::simple_error(NbdErrno::EPERM)
    );
    let reply = c.read(0, 0, 512);
    assert_eq!(
        reply,
        Reply::Simple {
            error: NbdErrno::OK,
            data: s.disk.bytes(0, 512)
        }
    );
    assert_eq!(s.disk.take_ops(), vec![]);
}

#[test]
fn test_simple_flush_trim_write_zeroes_and_cache_are_ok_replies_with_no_data() {
    let s = server();
    let mut c = s.simple_client();
    assert_eq!(c.command(CommandType::FLUSH, 0, 0, 0), Reply::OK);
    assert_eq!(
        c.command(CommandType::TRIM, 0, 512 * KIB, kib(64)),
        Reply::OK
    );
    assert_eq!(
        c.command(CommandType::WRITE_ZEROES, 0, 0, kib(4)),
        Reply::OK
    );
    assert_eq!(c.command(CommandType::CACHE, 0, 0, kib(64)), Reply::OK);
    let zero = ZeroFlags {
        may_unmap: true,
        fast: false,
    };
    assert_eq!(
        s.disk.take_ops(),
        vec![
            Op::Flush,
            Op::Discard {
                offset: 512 * KIB,
                len: 64 * KIB
            },
            Op::WriteZeroes {
                offset: 0,
                len: 4 * KIB,
                flags: zero
            },
            Op::Cache {
                offset: 0,
                len: 64 * KIB
            },
        ]
    );
    assert_eq!(s.disk.bytes(0, 4096), vec![0; 4096]);
}

#[test]
fn test_simple_block_status_without_contexts_is_einval() {
    let s = server();
    let mut c = s.simple_client();
    let reply = c.command(CommandType::BLOCK_STATUS, 0, 0, kib(4));
    assert_eq!(reply, Reply::simple_error(NbdErrno::EINVAL));
}

#[test]
fn test_simple_unknown_command_is_einval() {
    let s = server();
    let mut c = s.simple_client();
    assert_eq!(
        c.command(CommandType(99), 0, 0, 0),
        Reply::simple_error(NbdErrno::EINVAL)
    );
}

#[test]
fn test_simple_reply_bytes_are_magic_errno_cookie() {
    let s = server();
    let mut c = s.simple_client();
    let cookie = c.send(CommandType::FLUSH, 0, 0, 0, &[]);
    let mut expected = vec![0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0];
    expected.extend_from_slice(&cookie.to_be_bytes());
    assert_eq!(c.read_bytes(16), expected);
    let cookie = c.send(CommandType::READ, 0, SIZE, 1, &[]);
    let mut expected = vec![0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22];
    expected.extend_from_slice(&cookie.to_be_bytes());
    assert_eq!(c.read_bytes(16), expected);
}

// ---- structured replies: READ ------------------------------------------------

#[test]
fn test_structured_small_read_is_one_data_chunk_with_done() {
    let s = server();
    let mut c = s.structured_client(&[]);
    let reply = c.read(0, 4 * KIB, kib(4));
    assert_eq!(reply, Reply::Structured(vec![data(&s, 4 * KIB, kib(4))]));
}

#[test]
fn test_structured_sparse_read_sends_zero_ranges_as_hole_chunks() {
    let s = server();
    let mut c = s.structured_client(&[]);
    let reply = c.read(0, 0, SIZE as u32);
    // One chunk per allocation extent; unallocated and allocated-zero ranges
    // alike are holes, and only the last chunk carries DONE.
    let expected = vec![
        data(&s, 0, kib(64)),
        hole(64 * KIB, 128 * KIB),
        hole(192 * KIB, 64 * KIB),
        data(&s, 256 * KIB, kib(256)),
        hole(512 * KIB, 512 * KIB),
    ];
    assert_eq!(reply, Reply::Structured(expected));
}

#[test]
fn test_structured_sparse_read_chunks_are_clipped_to_the_request() {
    let s = server();
    let mut c = s.structured_client(&[]);
    let reply = c.read(0, 96 * KIB, kib(192));
    let expected = vec![
        hole(96 * KIB, 96 * KIB),
        hole(192 * KIB, 64 * KIB),
        data(&s, 256 * KIB, kib(32)),
    ];
    assert_eq!(reply, Reply::Structured(expected));
}

#[test]
fn test_structured_read_with_df_is_one_data_chunk_even_over_holes() {
    let s = server();
    let mut c = s.structured_client(&[]);
    let reply = c.read(CMD_FLAG_DF, 0, SIZE as u32);
    assert_eq!(reply, Reply::Structured(vec![data(&s, 0, SIZE as u32)]));
}

#[test]
fn test_structured_read_of_zero_length_is_a_none_chunk() {
    let s = server();
    let mut c = s.structured_client(&[]);
    let cookie = c.send(CommandType::READ, 0, 0, 0, &[]);
    let mut expected = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    expected.extend_from_slice(&[0, 1, 0, 0]); // DONE, NBD_REPLY_TYPE_NONE
    expected.extend_from_slice(&cookie.to_be_bytes());
    expected.extend_from_slice(&[0, 0, 0, 0]);
    assert_eq!(c.read_bytes(20), expected);
}

#[test]
fn test_structured_read_past_eof_is_an_einval_error_chunk_with_qemus_message() {
    let s = server();
    let mut c = s.structured_client(&[]);
    let reply = c.read(0, SIZE - 512, 1024);
    let message = "operation past EOF; From: 1048064, Len: 1024, Size: 1048576";
    assert_eq!(reply, Reply::error_chunk(NbdErrno::EINVAL, message));
}

#[test]
fn test_structured_read_over_32_mib_is_an_einval_error_chunk() {
    let s = server();
    let mut c = s.structured_client(&[]);
    let reply = c.read(0, 0, 33 << 20);
    let message = "len (34603008) is larger than max len (33554432)";
    assert_eq!(reply, Reply::error_chunk(NbdErrno::EINVAL, message));
}

/// qemu-storage-daemon sends "reading from file failed" as the message; bexd
/// sends the block layer's own text.
#[test]
fn test_structured_read_error_is_an_error_chunk_and_the_connection_lives() {
    let s = Server::start(Setup::failing(IoType::Read, 8 * KIB, libc::EIO));
    let mut c = s.structured_client(&[]);
    let message = "blkdebug: injected error on Read at 8192: Input/output error";
    assert_eq!(
        c.read(0, 8 * KIB, kib(4)),
        Reply::error_chunk(NbdErrno::EIO, message)
    );
    assert_eq!(
        c.read(0, 0, kib(4)),
        Reply::Structured(vec![data(&s, 0, kib(4))])
    );
}

/// A read large enough to be sent sparse gets the same single error chunk,
/// not a partial reply. (qemu-storage-daemon 10.0 drops the client here.)
#[test]
fn test_structured_sparse_read_error_is_one_error_chunk_and_the_connection_lives() {
    let s = Server::start(Setup::failing(IoType::Read, 8 * KIB, libc::EIO));
    let mut c = s.structured_client(&[]);
    let message = "blkdebug: injected error on Read at 0: Input/output error";
    let reply = c.read(0, 0, SIZE as u32);
    assert_eq!(reply, Reply::error_chunk(NbdErrno::EIO, message));
    assert_eq!(c.command(CommandType::FLUSH, 0, 0, 0), Reply::OK);
}

#[test]
fn test_structured_error_chunk_bytes_are_header_errno_length_message() {
    let s = server();
    let mut c = s.structured_client(&[]);
    let cookie = c.send(CommandType::READ, 0, SIZE, 1, &[]);
    let message = b"operation past EOF; From: 1048576, Len: 1, Size: 1048576";
    let mut expected = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    expected.extend_from_slice(&[0, 1, 0x80, 0x01]); // DONE, NBD_REPLY_TYPE_ERROR
    expected.extend_from_slice(&cookie.to_be_bytes());
    expected.extend_from_slice(&(6 + message.len() as u32).to_be_bytes());
    expected.extend_from_slice(&22u32.to_be_bytes());
    expected.extend_from_slice(&(message.len() as u16).to_be_bytes());
    expected.extend_from_slice(message);
    assert_eq!(c.read_bytes(expected.len()), expected);
}

#[test]
fn test_structured_data_and_hole_chunk_bytes() {
    let s = server();
    let mut c = s.structured_client(&[]);
    let cookie = c.send(CommandType::READ, 0, 16, 8, &[]);
    let mut expected = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    expected.extend_from_slice(&[0, 1, 0, 1]); // DONE, NBD_REPLY_TYPE_OFFSET_DATA
    expected.extend_from_slice(&cookie.to_be_bytes());
    expected.extend_from_slice(&16u32.to_be_bytes());
    expected.extend_from_slice(&16u64.to_be_bytes());
    expected.extend_from_slice(&s.disk.bytes(16, 8));
    assert_eq!(c.read_bytes(expected.len()), expected);

    let cookie = c.send(CommandType::READ, 0, 512 * KIB, kib(512), &[]);
    let mut expected = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    expected.extend_from_slice(&[0, 1, 0, 2]); // DONE, NBD_REPLY_TYPE_OFFSET_HOLE
    expected.extend_from_slice(&cookie.to_be_bytes());
    expected.extend_from_slice(&12u32.to_be_bytes());
    expected.extend_from_slice(&(512 * KIB).to_be_bytes());
    expected.extend_from_slice(&kib(512).to_be_bytes());
    assert_eq!(c.read_bytes(expected.len()), expected);
}

// ---- structured replies: the other commands ----------------------------------

#[test]
fn test_structured_successful_write_flush_trim_zero_cache_get_simple_replies() {
    let s = server();
    let mut c = s.structured_client(&[BASE]);
    assert_eq!(c.write(0, 0, &[3; 512]), Reply::OK);
    assert_eq!(c.command(CommandType::FLUSH, 0, 0, 0), Reply::OK);
    assert_eq!(
        c.command(CommandType::TRIM, 0, 512 * KIB, kib(64)),
        Reply::OK
    );
    assert_eq!(
        c.command(CommandType::WRITE_ZEROES, 0, 8 * KIB, kib(4)),
        Reply::OK
    );
    assert_eq!(c.command(CommandType::CACHE, 0, 0, kib(64)), Reply::OK);
}

#[test]
fn test_structured_write_error_is_an_error_chunk_with_the_drivers_errno() {
    let s = Server::start(Setup::failing(IoType::Write, 0, libc::ENOSPC));
    let mut c = s.structured_client(&[]);
    let message = "blkdebug: injected error on Write at 0: No space left on device";
    assert_eq!(
        c.write(0, 0, &[1; 4096]),
        Reply::error_chunk(NbdErrno::ENOSPC, message)
    );
    assert_eq!(c.write(0, 64 * KIB, &[1; 4096]), Reply::OK);
}

#[test]
fn test_structured_flush_error_is_an_error_chunk() {
    let s = Server::start(Setup::failing(IoType::Flush, 0, libc::EIO));
    let mut c = s.structured_client(&[]);
    // As in QEMU, only a node written since its last flush is flushed.
    assert_eq!(c.write(0, 0, &[1; 512]), Reply::OK);
    let message = "blkdebug: injected error on Flush at 0: Input/output error";
    let reply = c.command(CommandType::FLUSH, 0, 0, 0);
    assert_eq!(reply, Reply::error_chunk(NbdErrno::EIO, message));
}

#[test]
fn test_structured_trim_and_write_zeroes_errors_are_error_chunks() {
    let mut setup = Setup::failing(IoType::Discard, 0, libc::EIO);
    setup
        .faults
        .extend(Setup::failing(IoType::WriteZeroes, 0, libc::ENOSPC).faults);
    let s = Server::start(setup);
    let mut c = s.structured_client(&[]);
    let trim = c.command(CommandType::TRIM, 0, 0, kib(4));
    let message = "blkdebug: injected error on Discard at 0: Input/output error";
    assert_eq!(trim, Reply::error_chunk(NbdErrno::EIO, message));
    let zero = c.command(CommandType::WRITE_ZEROES, 0, 0, kib(4));
    let message = "blkdebug: injected error on WriteZeroes at 0: No space left on device";
    assert_eq!(zero, Reply::error_chunk(NbdErrno::ENOSPC, message));
}

#[test]
fn test_structured_writes_to_read_only_export_are_eperm_error_chunks() {
    let s = Server::start(Setup::read_only());
    let mut c = s.structured_client(&[]);
    let eperm = Reply::error_chunk(NbdErrno::EPERM, "Export is read-only");
    assert_eq!(c.write(0, 0, &[1; 512]), eperm);
    assert_eq!(c.command(CommandType::TRIM, 0, 0, kib(4)), eperm);
    assert_eq!(c.command(CommandType::WRITE_ZEROES, 0, 0, kib(4)), eperm);
    assert_eq!(s.disk.take_ops(), vec![]);
}

#[test]
fn test_structured_unknown_command_and_unsupported_flags_are_einval_error_chunks() {
    let s = server();
    let mut c = s.structured_client(&[BASE]);
    let unknown = c.command(CommandType(99), 0, 0, 0);
    let message = "invalid request type (99) received";
    assert_eq!(unknown, Reply::error_chunk(NbdErrno::EINVAL, message));
    let bad_flag = c.command(CommandType::BLOCK_STATUS, CMD_FLAG_DF, 0, kib(4));
    let message = "unsupported flags for command block status (got 0x4)";
    assert_eq!(bad_flag, Reply::error_chunk(NbdErrno::EINVAL, message));
}

// ---- FUA and writethrough ----------------------------------------------------

#[test]
fn test_fua_write_reaches_the_disk_as_fua_before_the_reply() {
    let s = server();
    let mut c = s.structured_client(&[]);
    assert_eq!(c.write(CMD_FLAG_FUA, 8 * KIB, &[9; 4096]), Reply::OK);
    let write = Op::Write {
        offset: 8 * KIB,
        len: 4096,
        fua: true,
    };
    assert_eq!(s.disk.take_ops(), vec![write]);
    assert_eq!(s.disk.bytes(8 * KIB, 4096), vec![9; 4096]);
    assert_eq!(
        c.read(0, 8 * KIB, kib(4)),
        Reply::Structured(vec![data(&s, 8 * KIB, kib(4))])
    );
}

#[test]
fn test_writethrough_export_makes_every_write_fua() {
    let s = Server::start(Setup {
        writethrough: true,
        ..Setup::default()
    });
    let mut c = s.simple_client();
    assert_eq!(c.write(0, 0, &[5; 512]), Reply::OK);
    assert_eq!(
        s.disk.take_ops(),
        vec![Op::Write {
            offset: 0,
            len: 512,
            fua: true
        }]
    );
}

#[test]
fn test_fua_write_zeroes_and_trim_flush_after_the_operation() {
    let s = server();
    let mut c = s.simple_client();
    assert_eq!(
        c.command(CommandType::WRITE_ZEROES, CMD_FLAG_FUA, 0, kib(4)),
        Reply::OK
    );
    assert_eq!(
        c.command(CommandType::TRIM, CMD_FLAG_FUA, 0, kib(4)),
        Reply::OK
    );
    let zero = ZeroFlags {
        may_unmap: true,
        fast: false,
    };
    assert_eq!(
        s.disk.take_ops(),
        vec![
            Op::WriteZeroes {
                offset: 0,
                len: 4 * KIB,
                flags: zero
            },
            Op::Flush,
            Op::Discard {
                offset: 0,
                len: 4 * KIB
            },
            Op::Flush,
        ]
    );
}

#[test]
fn test_write_zeroes_no_hole_and_fast_zero_flags_reach_the_disk() {
    let s = server();
    let mut c = s.simple_client();
    let flags = CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO;
    assert_eq!(
        c.command(CommandType::WRITE_ZEROES, flags, 0, kib(4)),
        Reply::OK
    );
    let zero = ZeroFlags {
        may_unmap: false,
        fast: true,
    };
    assert_eq!(
        s.disk.take_ops(),
        vec![Op::WriteZeroes {
            offset: 0,
            len: 4 * KIB,
            flags: zero
        }]
    );
}

// ---- BLOCK_STATUS --------------------------------------------------------------

#[test]
fn test_block_status_base_allocation_reports_holes_and_zeroes() {
    let s = server();
    let mut c = s.structured_client(&[BASE]);
    let reply = c.command(CommandType::BLOCK_STATUS, 0, 0, SIZE as u32);
    let extents = [
        (64 * KIB, 0),
        (128 * KIB, HOLE | ZERO),
        (64 * KIB, ZERO),
        (256 * KIB, 0),
        (512 * KIB, HOLE | ZERO),
    ];
    assert_eq!(
        reply,
        Reply::Structured(vec![status(c.context(BASE), &extents)])
    );
}

#[test]
fn test_block_status_allocation_depth_reports_the_layer_of_each_range() {
    let s = server();
    let mut c = s.structured_client(&[DEPTH]);
    let reply = c.command(CommandType::BLOCK_STATUS, 0, 0, SIZE as u32);
    let extents = [
        (64 * KIB, 1),
        (128 * KIB, 0),
        (64 * KIB, 1),
        (256 * KIB, 2),
        (512 * KIB, 0),
    ];
    assert_eq!(
        reply,
        Reply::Structured(vec![status(c.context(DEPTH), &extents)])
    );
}

#[test]
fn test_block_status_dirty_bitmap_reports_dirty_ranges() {
    let s = server();
    let mut c = s.structured_client(&[DIRTY]);
    let reply = c.command(CommandType::BLOCK_STATUS, 0, 0, SIZE as u32);
    let extents = [(64 * KIB, 0), (64 * KIB, 1), (896 * KIB, 0)];
    assert_eq!(
        reply,
        Reply::Structured(vec![status(c.context(DIRTY), &extents)])
    );
}

#[test]
fn test_block_status_sends_one_chunk_per_context_with_its_id_done_on_the_last() {
    let s = server();
    let mut c = s.structured_client(&[BASE, DEPTH, DIRTY]);
    let reply = c.command(CommandType::BLOCK_STATUS, 0, 32 * KIB, kib(64));
    // Every context's extents stop at the end of the request.
    let expected = vec![
        status(c.context(BASE), &[(32 * KIB, 0), (32 * KIB, HOLE | ZERO)]),
        status(c.context(DEPTH), &[(32 * KIB, 1), (32 * KIB, 0)]),
        status(c.context(DIRTY), &[(32 * KIB, 0), (32 * KIB, 1)]),
    ];
    assert_eq!(reply, Reply::Structured(expected));
}

#[test]
fn test_block_status_req_one_sends_one_whole_extent_per_context() {
    let s = server();
    let mut c = s.structured_client(&[BASE, DEPTH, DIRTY]);
    let reply = c.command(
        CommandType::BLOCK_STATUS,
        CMD_FLAG_REQ_ONE,
        96 * KIB,
        kib(512),
    );
    let expected = vec![
        status(c.context(BASE), &[(96 * KIB, HOLE | ZERO)]),
        status(c.context(DEPTH), &[(96 * KIB, 0)]),
        status(c.context(DIRTY), &[(32 * KIB, 1)]),
    ];
    assert_eq!(reply, Reply::Structured(expected));
}

#[test]
fn test_block_status_chunk_bytes_are_header_context_id_descriptors() {
    let s = server();
    let mut c = s.structured_client(&[BASE]);
    let cookie = c.send(CommandType::BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, kib(4), &[]);
    let mut expected = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    expected.extend_from_slice(&[0, 1, 0, 5]); // DONE, NBD_REPLY_TYPE_BLOCK_STATUS
    expected.extend_from_slice(&cookie.to_be_bytes());
    expected.extend_from_slice(&12u32.to_be_bytes());
    expected.extend_from_slice(&c.context(BASE).to_be_bytes());
    expected.extend_from_slice(&kib(4).to_be_bytes());
    expected.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(c.read_bytes(expected.len()), expected);
}

#[test]
fn test_block_status_of_zero_length_is_an_einval_error_chunk() {
    let s = server();
    let mut c = s.structured_client(&[BASE]);
    let reply = c.command(CommandType::BLOCK_STATUS, 0, 0, 0);
    assert_eq!(
        reply,
        Reply::error_chunk(NbdErrno::EINVAL, "need non-zero length")
    );
}

#[test]
fn test_block_status_without_contexts_is_an_einval_error_chunk() {
    let s = server();
    let mut c = s.structured_client(&[]);
    let reply = c.command(CommandType::BLOCK_STATUS, 0, 0, kib(4));
    let message = "CMD_BLOCK_STATUS not negotiated";
    assert_eq!(reply, Reply::error_chunk(NbdErrno::EINVAL, message));
}

#[test]
fn test_block_status_error_is_one_error_chunk_for_all_contexts() {
    let s = Server::start(Setup::failing(IoType::BlockStatus, 0, libc::EIO));
    let mut c = s.structured_client(&[BASE, DEPTH, DIRTY]);
    let reply = c.command(CommandType::BLOCK_STATUS, 0, 0, kib(4));
    let message = "blkdebug: injected error on BlockStatus at 0: Input/output error";
    assert_eq!(reply, Reply::error_chunk(NbdErrno::EIO, message));
}

// ---- DISC ----------------------------------------------------------------------

#[test]
fn test_disc_gets_no_reply_after_the_requests_before_it_are_answered() {
    let s = server();
    let mut c = s.structured_client(&[]);
    let flush = c.send(CommandType::FLUSH, 0, 0, 0, &[]);
    let write = c.send(CommandType::WRITE, 0, 0, 512, &[4; 512]);
    c.send(CommandType::DISC, 0, 0, 0, &[]);
    let mut answered = vec![c.reply_any(), c.reply_any()];
    answered.sort_by_key(|(cookie, _)| *cookie);
    assert_eq!(answered, vec![(flush, Reply::OK), (write, Reply::OK)]);
    assert!(
        c.at_eof(),
        "the server closes after DISC, with no reply to it"
    );
    assert_eq!(s.disk.bytes(0, 512), vec![4; 512]);
}
