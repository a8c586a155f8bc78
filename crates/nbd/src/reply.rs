//! Reply encoders. Each appends only headers to `out`; read data stays in the
//! caller's I/O buffer and goes out with a vectored write after the header.

use crate::consts::*;
use crate::types::{ChunkType, NbdErrno};

/// A simple reply (16 bytes); a successful READ's data follows it.
pub fn simple_reply(out: &mut Vec<u8>, cookie: u64, error: NbdErrno) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.0.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

fn chunk_header(out: &mut Vec<u8>, cookie: u64, done: bool, chunk: ChunkType, len: u32) {
    let flags: u16 = if done { REPLY_FLAG_DONE } else { 0 };
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&chunk.0.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// OFFSET_DATA chunk header plus its offset; `data_len` bytes of data follow.
pub fn offset_data_header(out: &mut Vec<u8>, cookie: u64, done: bool, offset: u64, data_len: u32) {
    chunk_header(
        out,
        cookie,
        done,
        ChunkType::OFFSET_DATA,
        data_len.saturating_add(8),
    );
    out.extend_from_slice(&offset.to_be_bytes());
}

pub fn offset_hole(out: &mut Vec<u8>, cookie: u64, done: bool, offset: u64, len: u32) {
    chunk_header(out, cookie, done, ChunkType::OFFSET_HOLE, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// The NONE chunk: ends a structured reply with no content.
pub fn none_chunk(out: &mut Vec<u8>, cookie: u64) {
    chunk_header(out, cookie, true, ChunkType::NONE, 0);
}

/// An ERROR chunk (with DONE) carrying a message of at most 4096 bytes.
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, error: NbdErrno, message: &str) {
    let msg = truncate_utf8(message, MAX_STRING);
    chunk_header(out, cookie, true, ChunkType::ERROR, 6 + msg.len() as u32);
    out.extend_from_slice(&error.0.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// A BLOCK_STATUS chunk: the context id and (length, flags) descriptors.
pub fn block_status_chunk(
    out: &mut Vec<u8>,
    cookie: u64,
    done: bool,
    context_id: u32,
    extents: &[(u32, u32)],
) {
    let len = 4 + 8 * extents.len() as u32;
    chunk_header(out, cookie, done, ChunkType::BLOCK_STATUS, len);
    out.extend_from_slice(&context_id.to_be_bytes());
    for (length, flags) in extents {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_simple_reply_is_16_bytes_with_magic() {
        let mut out = Vec::new();
        simple_reply(&mut out, 9, NbdErrno::EIO);
        assert_eq!(out.len(), SIMPLE_REPLY_LEN);
        assert_eq!(&out[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..8], &5u32.to_be_bytes());
    }

    #[test]
    fn test_offset_hole_is_header_plus_12() {
        let mut out = Vec::new();
        offset_hole(&mut out, 1, true, 0, 4096);
        assert_eq!(out.len(), CHUNK_HEADER_LEN + 12);
        assert_eq!(&out[4..6], &REPLY_FLAG_DONE.to_be_bytes());
    }

    #[test]
    fn test_error_chunk_truncates_long_message_on_char_boundary() {
        let mut out = Vec::new();
        let message = "é".repeat(3000);
        error_chunk(&mut out, 1, NbdErrno::EINVAL, &message);
        let msg_len = u16::from_be_bytes([out[24], out[25]]) as usize;
        assert!(msg_len <= MAX_STRING);
        assert!(std::str::from_utf8(&out[26..26 + msg_len]).is_ok());
    }

    #[test]
    fn test_block_status_chunk_length_counts_descriptors() {
        let mut out = Vec::new();
        block_status_chunk(&mut out, 1, true, 0, &[(512, 0), (512, 3)]);
        assert_eq!(u32::from_be_bytes(out[16..20].try_into().unwrap()), 4 + 16);
    }
}
