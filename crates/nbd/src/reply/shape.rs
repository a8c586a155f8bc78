//! Which reply each request gets, as QEMU's server sends it: simple or
//! structured, a READ whole or as data and hole chunks, an error with or
//! without its message, one BLOCK_STATUS chunk per metadata context.
//!
//! The daemon decides nothing about the wire: it asks the shape for a
//! [`ReplyPlan`] and fills the plan's data ranges.

use crate::consts::STATE_ZERO;
use crate::consts::{CHUNK_HEADER_LEN, CMD_FLAG_DF, CMD_FLAG_REQ_ONE, SIMPLE_REPLY_LEN};
use crate::consts::{EXTENDED_CHUNK_HEADER_LEN, MAX_PAYLOAD, MAX_STRING, REPLY_FLAG_DONE};
use crate::handshake::Negotiated;
use crate::request::RequestHeader;
use crate::types::NbdErrno;

use super::plan::ReplyPlan;
use super::wire::{self, Frame};

/// READs at least this large are sent sparse (runs of zeroes as OFFSET_HOLE
/// chunks) when the client allows it. Smaller ones go out whole: finding
/// their holes costs a block-status walk, more than the zeroes it saves.
pub const SPARSE_READ_MIN: u32 = 64 * 1024;

/// Most descriptors in one BLOCK_STATUS chunk (QEMU's bound, 2^17; the spec
/// asks for at most 2^20), and so the most extents a server gathers for one.
pub const MAX_EXTENTS: usize = 128 * 1024;

/// OFFSET_DATA: the 8-byte offset before the data.
const DATA_CHUNK_BODY: usize = 8;
/// OFFSET_HOLE: offset and hole length.
const HOLE_CHUNK_BODY: usize = 12;

/// How a connection's replies are framed, fixed by the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyShape {
    /// Simple replies only: errors carry just an errno, READs go out whole.
    Simple,
    /// STRUCTURED_REPLY was negotiated: READ replies are chunks, errors
    /// carry a message.
    Structured,
    /// EXTENDED_HEADERS was negotiated: as structured, but every chunk has
    /// the 32-byte header (the request's offset, a 64-bit length), a reply
    /// without data is a NONE chunk (no simple replies at all), and block
    /// status goes out as BLOCK_STATUS_EXT with 64-bit extent lengths.
    Extended,
}

impl ReplyShape {
    /// The shape the handshake settled on.
    pub fn of(negotiated: &Negotiated) -> Self {
        match (negotiated.extended_headers, negotiated.structured_replies) {
            (true, _) => Self::Extended,
            (false, true) => Self::Structured,
            (false, false) => Self::Simple,
        }
    }

    /// The chunk framing of a reply to `req` (structured or extended).
    fn frame(self, req: &RequestHeader) -> Frame {
        match self {
            Self::Extended => Frame::extended(req.cookie, req.offset),
            _ => Frame::structured(req.cookie),
        }
    }

    fn chunk_header_len(self) -> usize {
        match self {
            Self::Extended => EXTENDED_CHUNK_HEADER_LEN,
            _ => CHUNK_HEADER_LEN,
        }
    }

    /// Success for a command that returns no data (WRITE, FLUSH, TRIM,
    /// WRITE_ZEROES, CACHE): a simple reply, also once structured replies
    /// are on (the spec allows it, and QEMU sends exactly this); in extended
    /// mode, where simple replies are gone, a NONE chunk with DONE.
    pub fn ack(self, req: &RequestHeader) -> ReplyPlan {
        if self == Self::Extended {
            let mut plan = ReplyPlan::with_capacity(EXTENDED_CHUNK_HEADER_LEN, 1);
            plan.push(|out| wire::none_chunk(out, self.frame(req)), None);
            return plan;
        }
        let mut plan = ReplyPlan::with_capacity(SIMPLE_REPLY_LEN, 1);
        plan.push(
            |out| wire::simple_reply(out, req.cookie, NbdErrno::OK),
            None,
        );
        plan
    }

    /// A failed request: an ERROR chunk (it carries `message`, cut to 4096
    /// bytes) once structured replies are on, else a simple reply with just
    /// the errno, as QEMU answers.
    pub fn error(self, req: &RequestHeader, errno: NbdErrno, message: &str) -> ReplyPlan {
        match self {
            Self::Structured | Self::Extended => {
                let len = self.chunk_header_len() + 6 + message.len().min(MAX_STRING);
                let mut plan = ReplyPlan::with_capacity(len, 1);
                let frame = self.frame(req);
                plan.push(|out| wire::error_chunk(out, frame, errno, message), None);
                plan
            }
            Self::Simple => {
                let mut plan = ReplyPlan::with_capacity(SIMPLE_REPLY_LEN, 1);
                plan.push(|out| wire::simple_reply(out, req.cookie, errno), None);
                plan
            }
        }
    }

    /// Whether a successful READ of `req` would go out sparse, so that the
    /// caller should gather its base:allocation extents for [`Self::read`].
    pub fn read_wants_allocation(self, req: &RequestHeader) -> bool {
        self != Self::Simple
            && req.flags & CMD_FLAG_DF == 0
            && req.length >= u64::from(SPARSE_READ_MIN)
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
    ///
    /// Only accepted READs get here, so `req.length` is at most 32 MiB.
    pub fn read(self, req: &RequestHeader, allocation: &[(u32, u32)]) -> ReplyPlan {
        let len = req.length.min(u64::from(MAX_PAYLOAD)) as u32;
        let frame = self.frame(req);
        let header = self.chunk_header_len();
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
            _ if len == 0 => {
                let mut plan = ReplyPlan::with_capacity(header, 1);
                plan.push(|out| wire::none_chunk(out, frame), None);
                plan
            }
            _ if req.flags & CMD_FLAG_DF != 0 || allocation.is_empty() => {
                let mut plan = ReplyPlan::with_capacity(header + DATA_CHUNK_BODY, 1);
                push_data(&mut plan, frame, req.offset, 0, len, true);
                plan
            }
            _ => sparse_read(frame, header, req.offset, len, allocation),
        }
    }

    /// The reply to a BLOCK_STATUS of `req` over `contexts` metadata
    /// contexts (validation made sure there is at least one): push one
    /// descriptor list per context, then [`BlockStatusPlan::finish`].
    pub fn block_status(self, req: &RequestHeader, contexts: usize) -> BlockStatusPlan {
        BlockStatusPlan {
            plan: ReplyPlan::with_capacity(0, contexts),
            frame: self.frame(req),
            req_one: req.flags & CMD_FLAG_REQ_ONE != 0,
            last_chunk: None,
        }
    }

    /// Wire bytes of one BLOCK_STATUS chunk with `descriptors` descriptors
    /// in this shape (structured: 8 bytes a descriptor; extended: 16).
    pub fn status_chunk_len(self, descriptors: usize) -> usize {
        match self {
            Self::Extended => EXTENDED_CHUNK_HEADER_LEN + 8 + 16 * descriptors,
            _ => status_chunk_len(descriptors),
        }
    }

    /// The longest descriptor a BLOCK_STATUS reply in this shape can carry:
    /// 32 bits, or 64 in extended mode.
    pub fn max_extent_len(self) -> u64 {
        match self {
            Self::Extended => u64::MAX,
            _ => u64::from(u32::MAX),
        }
    }
}

/// One chunk per allocation run: holes as OFFSET_HOLE, data as OFFSET_DATA.
/// The chunks always cover the whole request (`total` bytes from `start`),
/// and only the last carries DONE.
fn sparse_read(
    frame: Frame,
    header: usize,
    start: u64,
    total: u32,
    allocation: &[(u32, u32)],
) -> ReplyPlan {
    let runs = allocation.len().min(total as usize) + 1;
    let mut plan = ReplyPlan::with_capacity(runs * (header + HOLE_CHUNK_BODY), runs);
    let mut pos = 0u32;
    for &(len, flags) in allocation {
        let len = len.min(total - pos);
        if len == 0 {
            break;
        }
        let done = pos + len == total;
        if flags & STATE_ZERO != 0 {
            let offset = start.saturating_add(u64::from(pos));
            plan.push(|out| wire::offset_hole(out, frame, done, offset, len), None);
        } else {
            push_data(&mut plan, frame, start, pos, len, done);
        }
        pos += len;
    }
    if pos < total {
        push_data(&mut plan, frame, start, pos, total - pos, true);
    }
    plan
}

/// An OFFSET_DATA chunk for `len` bytes of the request's data from `pos`
/// (the request starts at `start`).
fn push_data(plan: &mut ReplyPlan, frame: Frame, start: u64, pos: u32, len: u32, done: bool) {
    let offset = start.saturating_add(u64::from(pos));
    let data = pos as usize..(pos as usize + len as usize);
    plan.push(
        |out| wire::offset_data_header(out, frame, done, offset, len),
        Some(data),
    );
}

/// A BLOCK_STATUS reply being built, one chunk per metadata context.
#[derive(Debug)]
pub struct BlockStatusPlan {
    plan: ReplyPlan,
    frame: Frame,
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
    /// cut to [`Self::max_extents`]. Outside extended mode the caller keeps
    /// lengths to 32 bits ([`ReplyShape::max_extent_len`]).
    pub fn push(&mut self, context_id: u32, extents: &[(u64, u32)]) {
        let extents = &extents[..extents.len().min(self.max_extents())];
        let start = self.plan.protocol_bytes().len();
        let frame = self.frame;
        self.plan.push(
            |out| match frame.extended {
                Some(_) => {
                    out.reserve(EXTENDED_CHUNK_HEADER_LEN + 8 + 16 * extents.len());
                    wire::block_status_ext_chunk(out, frame, false, context_id, extents);
                }
                None => {
                    out.reserve(status_chunk_len(extents.len()));
                    wire::block_status_chunk(out, frame, false, context_id, extents);
                }
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
                let frame = self.frame;
                self.plan.push(|out| wire::none_chunk(out, frame), None);
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
