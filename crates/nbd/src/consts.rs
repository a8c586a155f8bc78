//! Wire constants from the NBD protocol (NetworkBlockDevice/nbd doc/proto.md).
//! Enumerations with many values (options, commands, replies, errors) live in
//! [`crate::types`] as open newtypes; this module holds magics, flag bits and
//! limits.

/// "NBDMAGIC": first 8 bytes of every newstyle greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the newstyle magic, and the prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle greeting magic; obsolete, never sent by this server.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every compact (28-byte) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Prefix of an extended (32-byte) request; only valid after EXTENDED_HEADERS.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Prefix of an extended reply; only valid after EXTENDED_HEADERS.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set, so a client can tell flags from no flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Never sent by QEMU; kept for completeness.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Only ever advertised together with structured replies.
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Resize extension; nobody mainstream implements it server-side.
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Requires FLAG_SEND_WRITE_ZEROES.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// Extended headers only: BLOCK_STATUS may carry a context-id payload.
pub const FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

/// Command flag: force unit access (data stable before the reply).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// WRITE_ZEROES: allocate, do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// READ: don't fragment (at most one content chunk).
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// BLOCK_STATUS: exactly one descriptor per context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// WRITE_ZEROES: fail with ENOTSUP unless zeroing is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers only: `length` is a payload length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// Longest string (export name, description, message, query) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Largest payload a request may carry (QEMU's NBD_MAX_BUFFER_SIZE).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Longest option payload accepted before the client is dropped (QEMU's limit).
pub const MAX_OPTION_LEN: u32 = 32 * 1024 * 1024;

/// NBDMAGIC + IHAVEOPT + handshake flags.
pub const GREETING_LEN: usize = 18;
/// IHAVEOPT + option + length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Magic + option + reply type + length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Zero padding after an EXPORT_NAME reply unless NO_ZEROES was negotiated.
pub const EXPORT_NAME_PADDING: usize = 124;
pub const REQUEST_HEADER_LEN: usize = 28;
/// An extended request: as compact, but with a 64-bit length.
pub const EXTENDED_REQUEST_HEADER_LEN: usize = 32;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;
/// An extended reply chunk header: the request's offset and a 64-bit length.
pub const EXTENDED_CHUNK_HEADER_LEN: usize = 32;

/// base:allocation status bit: the range is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// base:allocation status bit: the range reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// qemu:dirty-bitmap status bit: the range is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;
