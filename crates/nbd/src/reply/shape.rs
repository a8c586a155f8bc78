//! Which reply each request gets, as QEMU's server sends it: simple or
//! structured, a READ whole or as data and hole chunks, an error with or
//! without its message, one BLOCK_STATUS chunk per metadata context.
//!
//! The daemon decides nothing about the wire: it asks the shape for a
//! [`ReplyPlan`] and fills the plan's data ranges.

use crate::consts::{CHUNK_HEADER_LEN, CMD_FLAG_DF, CMD_FLAG_REQ_ONE, SIMPLE_REPLY_LEN};
use crate::consts::{MAX_STRING, REPLY_FLAG_DONE, STATE_ZERO};
use crate::handshake::Negotiated;
use crate::request::RequestHeader;
use crate::types::NbdErrno;

use super::plan::ReplyPlan;
use super::wire;

/// READs at least this large are sent sparse (runs of zeroes as OFFSET_HOLE
/// chunks) when the client allows it. Smaller ones go out whole: finding
/// their holes costs a block-status walk, more than the zeroes it saves.
pub const SPARSE_READ_MIN: u32 = 64 * 1024;

/// Most descriptors in one BLOCK_STATUS chunk (QEMU's bound, 2^17; the spec
/// asks for at most 2^20), and so the most extents a server gathers for one.
pub const MAX_EXTENTS: usize = 128 * 1024;

/// OFFSET_DATA: the chunk header and the 8-byte offset before the data.
const DATA_CHUNK_LEN: usize = CHUNK_HEADER_LEN + 8;
/// OFFSET_HOLE: the chunk header, offset and hole length.
const HOLE_CHUNK_LEN: usize = CHUNK_HEADER_LEN + 12;

/// How a connection's replies are framed, fixed by the handshake.
///
/// Extended headers (64-bit lengths) would be a third shape; the handshake
/// refuses them (ERR_UNSUP), as QEMU 10.0's server does not offer them either.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyShape {
    /// Simple replies only: errors carry just an errno, READs go out whole.
    Simple,
    /// STRUCTURED_REPLY was negotiated: READ replies are chunks, errors
    /// carry a message.
    Structured,
}

impl ReplyShape {
    /// The shape the handshake settled on.
    pub fn of(negotiated: &Negotiated) -> Self {
        match negotiated.structured_replies {
            true => Self::Structured,
            false => Self::Simple,
        }
    }

    /// Success for a command that returns no data (WRITE, FLUSH, TRIM,
    /// WRITE_ZEROES, CACHE): a simple reply in either shape. The spec allows
    /// it once structured replies are on, and QEMU sends exactly this.
    pub fn ack(self, cookie: u64) -> ReplyPlan {
        let mut plan = ReplyPlan::with_capacity(SIMPLE_REPLY_LEN, 1);
        plan.push(|out| wire::simple_reply(out, cookie, NbdErrno::OK), None);
        plan
    }

    /// A failed request: a structured ERROR chunk (it carries `message`,
    /// cut to 4096 bytes) once structured replies are on, else a simple
    /// reply with just the errno, as QEMU answers.
    pub fn error(self, cookie: u64, errno: NbdErrno, message: &str) -> ReplyPlan {
        match self {
            Self::Structured => {
                let len = CHUNK_HEADER_LEN + 6 + message.len().min(MAX_STRING);
                let mut plan = ReplyPlan::with_capacity(len, 1);
                plan.push(|out| wire::error_chunk(out, cookie, errno, message), None);
                plan
            }
            Self::Simple => {
                let mut plan = ReplyPlan::with_capacity(SIMPLE_REPLY_LEN, 1);
                plan.push(|out| wire::simple_reply(out, cookie, errno), None);
                plan
            }
        }
    }

    /// Whether a successful READ of `req` would go out sparse, so that the
    /// caller should gather its base:allocation extents for [`Self::read`].
    pub fn read_wants_allocation(self, req: &RequestHeader) -> bool {
        self == Self::Structured && req.flags & CMD_FLAG_DF == 0 && req.length >= SPARSE_READ_MIN
    }

    /// A successful READ of `req`; its data is the plan's data, byte 0 at
    /// `req.offset`.
    ///
    /// `allocation` holds base:allocation descriptors (length, flags) from
    /// `req.offset` on, or nothing. With structured replies and without DF,
    /// runs flagged STATE_ZERO go out as OFFSET_HOLE chunks and the rest as
    /// OFFSET_DATA; past the descriptors (if they stop short) it is data.
    /// Otherwise the data goes out whole: after a simple reply, or in one
    /// OFFSET_DATA chunk. A zero-length READ gets a NONE chunk (structured)
    /// or a bare simple reply.
    pub fn read(self, req: &RequestHeader, allocation: &[(u32, u32)]) -> ReplyPlan {
        let len = req.length;
        match self {
            Self::Simple => {
                let mut plan = ReplyPlan::with_capacity(SIMPLE_REPLY_LEN, 1);
                let data = (len > 0).then_some(0..len as usize);
                plan.push(
                    |out| wire::simple_reply(out, req.cookie, NbdErrno::OK),
                    data,
                );
                plan
            }
            Self::Structured if len == 0 => {
                let mut plan = ReplyPlan::with_capacity(CHUNK_HEADER_LEN, 1);
                plan.push(|out| wire::none_chunk(out, req.cookie), None);
                plan
            }
            Self::Structured if req.flags & CMD_FLAG_DF != 0 || allocation.is_empty() => {
                let mut plan = ReplyPlan::with_capacity(DATA_CHUNK_LEN, 1);
                push_data(&mut plan, req, 0, len, true);
                plan
            }
            Self::Structured => sparse_read(req, allocation),
        }
    }

    /// The reply to a BLOCK_STATUS of `req` over `contexts` metadata
    /// contexts (validation made sure there is at least one): push one
    /// descriptor list per context, then [`BlockStatusPlan::finish`].
    pub fn block_status(self, req: &RequestHeader, contexts: usize) -> BlockStatusPlan {
        BlockStatusPlan {
            plan: ReplyPlan::with_capacity(0, contexts),
            cookie: req.cookie,
            req_one: req.flags & CMD_FLAG_REQ_ONE != 0,
            last_chunk: None,
        }
    }
}

/// One chunk per allocation run: holes as OFFSET_HOLE, data as OFFSET_DATA.
/// The chunks always cover the whole request, and only the last carries DONE.
fn sparse_read(req: &RequestHeader, allocation: &[(u32, u32)]) -> ReplyPlan {
    let runs = allocation.len().min(req.length as usize) + 1;
    let mut plan = ReplyPlan::with_capacity(runs * HOLE_CHUNK_LEN, runs);
    let mut pos = 0u32;
    for &(len, flags) in allocation {
        let len = len.min(req.length - pos);
        if len == 0 {
            break;
        }
        let done = pos + len == req.length;
        if flags & STATE_ZERO != 0 {
            let offset = req.offset.saturating_add(u64::from(pos));
            plan.push(
                |out| wire::offset_hole(out, req.cookie, done, offset, len),
                None,
            );
        } else {
            push_data(&mut plan, req, pos, len, done);
        }
        pos += len;
    }
    if pos < req.length {
        push_data(&mut plan, req, pos, req.length - pos, true);
    }
    plan
}

/// An OFFSET_DATA chunk for `len` bytes of the request's data from `pos`.
fn push_data(plan: &mut ReplyPlan, req: &RequestHeader, pos: u32, len: u32, done: bool) {
    let offset = req.offset.saturating_add(u64::from(pos));
    let data = pos as usize..(pos as usize + len as usize);
    plan.push(
        |out| wire::offset_data_header(out, req.cookie, done, offset, len),
        Some(data),
    );
}

/// A BLOCK_STATUS reply being built, one chunk per metadata context.
#[derive(Debug)]
pub struct BlockStatusPlan {
    plan: ReplyPlan,
    cookie: u64,
    /// REQ_ONE: one descriptor per context.
    req_one: bool,
    /// Where the last chunk's header starts in the plan's bytes.
    last_chunk: Option<usize>,
}

impl BlockStatusPlan {
    /// Most descriptors worth gathering per context: 1 under REQ_ONE.
    pub fn max_extents(&self) -> usize {
        match self.req_one {
            true => 1,
            false => MAX_EXTENTS,
        }
    }

    /// The chunk for context `context_id`: its (length, flags) descriptors,
    /// cut to [`Self::max_extents`].
    pub fn push(&mut self, context_id: u32, extents: &[(u32, u32)]) {
        let extents = &extents[..extents.len().min(self.max_extents())];
        let start = self.plan.protocol_bytes().len();
        let cookie = self.cookie;
        self.plan.push(
            |out| {
                out.reserve(status_chunk_len(extents.len()));
                wire::block_status_chunk(out, cookie, false, context_id, extents);
            },
            None,
        );
        self.last_chunk = Some(start);
    }

    /// The reply, its last chunk marked DONE. (Had no context been pushed,
    /// a NONE chunk ends it, so the client still gets a complete reply.)
    pub fn finish(mut self) -> ReplyPlan {
        match self.last_chunk {
            Some(start) => {
                // The flags field sits after the 4-byte magic.
                if let Some(flags) = self.plan.bytes_mut().get_mut(start + 4..start + 6) {
                    flags.copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
                }
            }
            None => {
                let cookie = self.cookie;
                self.plan.push(|out| wire::none_chunk(out, cookie), None);
            }
        }
        self.plan
    }
}

/// Wire bytes of one BLOCK_STATUS chunk with `descriptors` descriptors:
/// the chunk header, the context id, 8 bytes a descriptor.
pub fn status_chunk_len(descriptors: usize) -> usize {
    CHUNK_HEADER_LEN + 4 + 8 * descriptors
}
