//! Reply encoders: each appends one simple reply or one structured chunk,
//! headers only, to `out`. Read data is never copied in; [`super::ReplyPlan`]
//! says where it goes between these headers.

use crate::consts::*;
use crate::text::truncate_utf8;
use crate::types::{NbdErrno, ReplyType};

/// How a chunk header is framed: the request's cookie, and in extended mode
/// the request's offset too (the 32-byte header repeats it, as QEMU's does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub cookie: u64,
    /// `Some(request offset)`: an extended header with a 64-bit length.
    pub extended: Option<u64>,
}

impl Frame {
    /// A 20-byte structured chunk header.
    pub fn structured(cookie: u64) -> Self {
        Self {
            cookie,
            extended: None,
        }
    }

    /// A 32-byte extended chunk header for a request at `offset`.
    pub fn extended(cookie: u64, offset: u64) -> Self {
        Self {
            cookie,
            extended: Some(offset),
        }
    }

    /// Bytes of the chunk header.
    pub fn header_len(self) -> usize {
        match self.extended {
            Some(_) => EXTENDED_CHUNK_HEADER_LEN,
            None => CHUNK_HEADER_LEN,
        }
    }
}

/// A bare cookie frames a structured (20-byte) chunk.
impl From<u64> for Frame {
    fn from(cookie: u64) -> Self {
        Self::structured(cookie)
    }
}

/// A simple reply (16 bytes); a successful READ's data follows it.
pub fn simple_reply(out: &mut Vec<u8>, cookie: u64, error: NbdErrno) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.0.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// The chunk header (20 bytes, or 32 extended); `len` bytes of payload
/// follow. A structured header's length is 32 bits: callers keep their
/// chunks below 4 GiB (QEMU's bounds are far lower).
fn chunk_header(out: &mut Vec<u8>, frame: Frame, done: bool, chunk: ReplyType, len: u64) {
    let flags: u16 = if done { REPLY_FLAG_DONE } else { 0 };
    let magic = match frame.extended {
        Some(_) => EXTENDED_REPLY_MAGIC,
        None => STRUCTURED_REPLY_MAGIC,
    };
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&chunk.0.to_be_bytes());
    out.extend_from_slice(&frame.cookie.to_be_bytes());
    match frame.extended {
        Some(offset) => {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
        }
        None => {
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
}

/// OFFSET_DATA chunk header plus its offset; `data_len` bytes of data follow.
pub fn offset_data_header(
    out: &mut Vec<u8>,
    frame: impl Into<Frame>,
    done: bool,
    offset: u64,
    data_len: u32,
) {
    let len = u64::from(data_len) + 8;
    chunk_header(out, frame.into(), done, ReplyType::OFFSET_DATA, len);
    out.extend_from_slice(&offset.to_be_bytes());
}

/// OFFSET_HOLE chunk: `len` bytes at `offset` read as zeroes (a 32-bit
/// length in either framing: reads are at most 32 MiB).
pub fn offset_hole(out: &mut Vec<u8>, frame: impl Into<Frame>, done: bool, offset: u64, len: u32) {
    chunk_header(out, frame.into(), done, ReplyType::OFFSET_HOLE, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// The NONE chunk: ends a structured reply with no content (and, in
/// extended mode, is every successful reply without data).
pub fn none_chunk(out: &mut Vec<u8>, frame: impl Into<Frame>) {
    chunk_header(out, frame.into(), true, ReplyType::NONE, 0);
}

/// An ERROR chunk (with DONE) carrying a message of at most 4096 bytes.
pub fn error_chunk(out: &mut Vec<u8>, frame: impl Into<Frame>, error: NbdErrno, message: &str) {
    let msg = truncate_utf8(message, MAX_STRING);
    let len = 6 + msg.len() as u64;
    chunk_header(out, frame.into(), true, ReplyType::ERROR, len);
    out.extend_from_slice(&error.0.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// A BLOCK_STATUS chunk: the context id and (length, flags) descriptors.
/// The caller keeps `extents` to a sane count (QEMU sends at most 2^17 per
/// chunk; the spec asks for at most 2^20) and lengths to 32 bits (a longer
/// one is sent as `u32::MAX`).
pub fn block_status_chunk(
    out: &mut Vec<u8>,
    frame: impl Into<Frame>,
    done: bool,
    context_id: u32,
    extents: &[(u64, u32)],
) {
    let len = 4 + 8 * extents.len() as u64;
    chunk_header(out, frame.into(), done, ReplyType::BLOCK_STATUS, len);
    out.extend_from_slice(&context_id.to_be_bytes());
    for &(length, flags) in extents {
        let length = u32::try_from(length).unwrap_or(u32::MAX);
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

/// A BLOCK_STATUS_EXT chunk (extended mode): the context id, the descriptor
/// count, and (64-bit length, 64-bit flags) descriptors.
pub fn block_status_ext_chunk(
    out: &mut Vec<u8>,
    frame: Frame,
    done: bool,
    context_id: u32,
    extents: &[(u64, u32)],
) {
    let len = 8 + 16 * extents.len() as u64;
    chunk_header(out, frame, done, ReplyType::BLOCK_STATUS_EXT, len);
    out.extend_from_slice(&context_id.to_be_bytes());
    let count = u32::try_from(extents.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for &(length, flags) in extents {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&u64::from(flags).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_simple_reply_when_error_returns_16_bytes_with_errno() {
        let mut out = Vec::new();
        simple_reply(&mut out, 9, NbdErrno::EIO);
        assert_eq!(out.len(), SIMPLE_REPLY_LEN);
        assert_eq!(&out[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..8], &5u32.to_be_bytes());
    }

    #[test]
    fn test_offset_hole_when_done_returns_header_plus_12_with_done_flag() {
        let mut out = Vec::new();
        offset_hole(&mut out, 1, true, 0, 4096);
        assert_eq!(out.len(), CHUNK_HEADER_LEN + 12);
        assert_eq!(&out[4..6], &REPLY_FLAG_DONE.to_be_bytes());
    }

    #[test]
    fn test_error_chunk_when_message_long_truncates_on_char_boundary() {
        let mut out = Vec::new();
        let message = "é".repeat(3000);
        error_chunk(&mut out, 1, NbdErrno::EINVAL, &message);
        let msg_len = u16::from_be_bytes([out[24], out[25]]) as usize;
        assert!(msg_len <= MAX_STRING);
        assert!(std::str::from_utf8(&out[26..26 + msg_len]).is_ok());
    }

    #[test]
    fn test_block_status_chunk_when_two_extents_returns_length_20() {
        let mut out = Vec::new();
        block_status_chunk(&mut out, 1, true, 0, &[(512, 0), (512, 3)]);
        assert_eq!(u32::from_be_bytes(out[16..20].try_into().unwrap()), 4 + 16);
    }

    #[test]
    fn test_offset_data_header_when_data_follows_counts_offset_in_length() {
        let mut out = Vec::new();
        offset_data_header(&mut out, 1, true, 4096, 512);
        assert_eq!(out.len(), CHUNK_HEADER_LEN + 8);
        assert_eq!(u32::from_be_bytes(out[16..20].try_into().unwrap()), 520);
    }

    #[test]
    fn test_none_chunk_when_written_has_done_flag_and_no_payload() {
        let mut out = Vec::new();
        none_chunk(&mut out, 3);
        assert_eq!(out.len(), CHUNK_HEADER_LEN);
        assert_eq!(&out[4..8], &[0, 1, 0, 0]);
    }

    #[test]
    fn test_error_chunk_when_short_message_has_error_type_and_text() {
        let mut out = Vec::new();
        error_chunk(&mut out, 1, NbdErrno::EIO, "bad");
        assert_eq!(&out[6..8], &ReplyType::ERROR.0.to_be_bytes());
        assert_eq!(&out[26..], b"bad");
    }

    #[test]
    fn test_none_chunk_when_extended_is_32_bytes_with_the_request_offset() {
        let mut out = Vec::new();
        none_chunk(&mut out, Frame::extended(3, 4096));
        assert_eq!(out.len(), EXTENDED_CHUNK_HEADER_LEN);
        assert_eq!(&out[..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[16..24], &4096u64.to_be_bytes());
        assert_eq!(&out[24..32], &0u64.to_be_bytes());
    }

    #[test]
    fn test_block_status_ext_chunk_when_extent_over_4_gib_keeps_64_bits() {
        let mut out = Vec::new();
        let extents = [(5u64 << 32, 3u32), (512, 0)];
        block_status_ext_chunk(&mut out, Frame::extended(1, 0), true, 2, &extents);
        assert_eq!(&out[6..8], &ReplyType::BLOCK_STATUS_EXT.0.to_be_bytes());
        assert_eq!(u64::from_be_bytes(out[24..32].try_into().unwrap()), 8 + 32);
        assert_eq!(&out[32..40], &[0, 0, 0, 2, 0, 0, 0, 2]);
        assert_eq!(&out[40..48], &(5u64 << 32).to_be_bytes());
        assert_eq!(&out[48..56], &3u64.to_be_bytes());
    }
}
