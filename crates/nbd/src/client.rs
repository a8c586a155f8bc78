//! A sans-IO client codec sharing the server's wire definitions: used by
//! tests, fuzz targets and benchmarks. Encoders append to `out`; decoders
//! look at the front of a buffer and return `Ok(None)` while it is
//! incomplete, or the decoded value and how many bytes it used.
//!
//! Like libnbd's unchecked mode, it encodes invalid messages on purpose when
//! asked (raw options with any payload, any flags), so the server's refusals
//! can be tested. Every decoder is total: malformed input is an error or
//! `None`, never a panic.

use thiserror::Error;

use crate::consts::*;
use crate::export::BlockSize;
use crate::request::RequestHeader;
use crate::types::{InfoType, NbdErrno, OptionReplyType, OptionType, ReplyType};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ClientError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("reply payload of {0} bytes is too large")]
    TooLarge(u32),
}

// ---- handshake encoders ---------------------------------------------------

/// Client flags, sent after the greeting.
pub fn client_flags(out: &mut Vec<u8>, flags: u32) {
    out.extend_from_slice(&flags.to_be_bytes());
}

/// An option header announcing `len` bytes of payload (which the caller may
/// then send, or not: useful to stream huge or lying payloads).
pub fn option_header(out: &mut Vec<u8>, option: OptionType, len: u32) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.0.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// An option request with any payload.
pub fn option(out: &mut Vec<u8>, option: OptionType, payload: &[u8]) {
    option_header(out, option, payload.len() as u32);
    out.extend_from_slice(payload);
}

pub fn export_name(out: &mut Vec<u8>, name: &str) {
    option(out, OptionType::EXPORT_NAME, name.as_bytes());
}

pub fn abort(out: &mut Vec<u8>) {
    option(out, OptionType::ABORT, &[]);
}

pub fn list(out: &mut Vec<u8>) {
    option(out, OptionType::LIST, &[]);
}

pub fn starttls(out: &mut Vec<u8>) {
    option(out, OptionType::STARTTLS, &[]);
}

pub fn structured_reply(out: &mut Vec<u8>) {
    option(out, OptionType::STRUCTURED_REPLY, &[]);
}

/// NBD_OPT_EXTENDED_HEADERS: 32-byte requests and replies, 64-bit lengths
/// (implies structured replies).
pub fn extended_headers(out: &mut Vec<u8>) {
    option(out, OptionType::EXTENDED_HEADERS, &[]);
}

/// NBD_OPT_INFO for `name`, asking for `infos`.
pub fn info(out: &mut Vec<u8>, name: &str, infos: &[InfoType]) {
    option(out, OptionType::INFO, &info_payload(name, infos));
}

/// NBD_OPT_GO for `name`, asking for `infos`.
pub fn go(out: &mut Vec<u8>, name: &str, infos: &[InfoType]) {
    option(out, OptionType::GO, &info_payload(name, infos));
}

pub fn list_meta_context(out: &mut Vec<u8>, export: &str, queries: &[&str]) {
    option(
        out,
        OptionType::LIST_META_CONTEXT,
        &meta_payload(export, queries),
    );
}

pub fn set_meta_context(out: &mut Vec<u8>, export: &str, queries: &[&str]) {
    option(
        out,
        OptionType::SET_META_CONTEXT,
        &meta_payload(export, queries),
    );
}

/// The payload of NBD_OPT_INFO / NBD_OPT_GO.
pub fn info_payload(name: &str, infos: &[InfoType]) -> Vec<u8> {
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        p.extend_from_slice(&i.0.to_be_bytes());
    }
    p
}

/// The payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
pub fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut p = (export.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(export.as_bytes());
    p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        p.extend_from_slice(&(q.len() as u32).to_be_bytes());
        p.extend_from_slice(q.as_bytes());
    }
    p
}

// ---- handshake decoders ---------------------------------------------------

/// Decodes the 18-byte greeting: the server's handshake flags.
pub fn decode_greeting(buf: &[u8]) -> Result<Option<(u16, usize)>, ClientError> {
    let Some(head) = buf.get(..GREETING_LEN) else {
        return Ok(None);
    };
    let (magic, opt) = (be64(head, 0), be64(head, 8));
    if magic != NBD_MAGIC {
        return Err(ClientError::BadMagic(magic));
    }
    if opt != IHAVEOPT {
        return Err(ClientError::BadMagic(opt));
    }
    Ok(Some((be16(head, 16), GREETING_LEN)))
}

/// The reply to NBD_OPT_EXPORT_NAME: size and transmission flags, followed
/// by 124 zeroes unless NO_ZEROES was negotiated.
pub fn decode_export_name_reply(buf: &[u8], no_zeroes: bool) -> Option<(u64, u16, usize)> {
    let len = 10 + if no_zeroes { 0 } else { EXPORT_NAME_PADDING };
    let head = buf.get(..len)?;
    Some((be64(head, 0), be16(head, 8), len))
}

/// One option reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionReply {
    pub option: OptionType,
    pub reply: OptionReplyType,
    pub data: Vec<u8>,
}

impl OptionReply {
    /// The message of an error reply (lossy: servers should send UTF-8).
    pub fn message(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// Decodes one option reply from the front of `buf`.
pub fn decode_option_reply(buf: &[u8]) -> Result<Option<(OptionReply, usize)>, ClientError> {
    let Some(head) = buf.get(..OPTION_REPLY_HEADER_LEN) else {
        return Ok(None);
    };
    let magic = be64(head, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(ClientError::BadMagic(magic));
    }
    let len = be32(head, 16);
    if len > MAX_OPTION_LEN {
        return Err(ClientError::TooLarge(len));
    }
    let total = OPTION_REPLY_HEADER_LEN + len as usize;
    let Some(data) = buf.get(OPTION_REPLY_HEADER_LEN..total) else {
        return Ok(None);
    };
    let reply = OptionReply {
        option: OptionType(be32(head, 8)),
        reply: OptionReplyType(be32(head, 12)),
        data: data.to_vec(),
    };
    Ok(Some((reply, total)))
}

/// The body of an NBD_REP_INFO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, flags: u16 },
    Name(String),
    Description(String),
    BlockSize(BlockSize),
    Unknown(InfoType, Vec<u8>),
}

/// Decodes an NBD_REP_INFO payload; `None` if its length is wrong for its type.
pub fn decode_info(data: &[u8]) -> Option<Info> {
    let (kind, body) = data.split_first_chunk::<2>()?;
    let kind = InfoType(u16::from_be_bytes(*kind));
    let text = || String::from_utf8(body.to_vec()).ok();
    Some(match kind {
        InfoType::EXPORT if body.len() == 10 => Info::Export {
            size: be64(body, 0),
            flags: be16(body, 8),
        },
        InfoType::NAME => Info::Name(text()?),
        InfoType::DESCRIPTION => Info::Description(text()?),
        InfoType::BLOCK_SIZE if body.len() == 12 => Info::BlockSize(BlockSize {
            min: be32(body, 0),
            preferred: be32(body, 4),
            max: be32(body, 8),
        }),
        InfoType::EXPORT | InfoType::BLOCK_SIZE => return None,
        other => Info::Unknown(other, body.to_vec()),
    })
}

/// Decodes an NBD_REP_SERVER payload: export name and description.
pub fn decode_server(data: &[u8]) -> Option<(String, String)> {
    let (len, rest) = data.split_first_chunk::<4>()?;
    let len = u32::from_be_bytes(*len) as usize;
    if len > rest.len() {
        return None;
    }
    let (name, description) = rest.split_at(len);
    let name = String::from_utf8(name.to_vec()).ok()?;
    Some((name, String::from_utf8(description.to_vec()).ok()?))
}

/// Decodes an NBD_REP_META_CONTEXT payload: context id and name.
pub fn decode_meta_context(data: &[u8]) -> Option<(u32, String)> {
    let (id, name) = data.split_first_chunk::<4>()?;
    Some((
        u32::from_be_bytes(*id),
        String::from_utf8(name.to_vec()).ok()?,
    ))
}

// ---- transmission ---------------------------------------------------------

/// A request header; a WRITE's data goes right after it.
pub fn request(out: &mut Vec<u8>, header: &RequestHeader) {
    header.encode(out);
}

/// An extended (32-byte) request header, once EXTENDED_HEADERS is acked.
pub fn extended_request(out: &mut Vec<u8>, header: &RequestHeader) {
    header.encode_extended(out);
}

/// The payload of a BLOCK_STATUS with PAYLOAD_LEN: the effective length,
/// then the context ids to report.
pub fn status_filter_payload(length: u64, ids: &[u32]) -> Vec<u8> {
    let mut p = length.to_be_bytes().to_vec();
    for id in ids {
        p.extend_from_slice(&id.to_be_bytes());
    }
    p
}

/// A transmission reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// 16 bytes; a successful READ's data follows.
    Simple { cookie: u64, error: NbdErrno },
    /// 20 bytes (structured) or 32 (extended, which also repeats the
    /// request's `offset`); `length` bytes of chunk payload follow.
    Chunk {
        flags: u16,
        reply_type: ReplyType,
        cookie: u64,
        /// `Some` in an extended header: the request's offset.
        offset: Option<u64>,
        length: u64,
    },
}

/// Decodes a simple reply or structured chunk header from the front of `buf`.
pub fn decode_reply_header(buf: &[u8]) -> Result<Option<(ReplyHeader, usize)>, ClientError> {
    let Some(magic) = buf.get(..4).map(|m| be32(m, 0)) else {
        return Ok(None);
    };
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(buf.get(..SIMPLE_REPLY_LEN).map(|h| {
            let header = ReplyHeader::Simple {
                error: NbdErrno(be32(h, 4)),
                cookie: be64(h, 8),
            };
            (header, SIMPLE_REPLY_LEN)
        })),
        STRUCTURED_REPLY_MAGIC => Ok(buf.get(..CHUNK_HEADER_LEN).map(|h| {
            let header = ReplyHeader::Chunk {
                flags: be16(h, 4),
                reply_type: ReplyType(be16(h, 6)),
                cookie: be64(h, 8),
                offset: None,
                length: u64::from(be32(h, 16)),
            };
            (header, CHUNK_HEADER_LEN)
        })),
        EXTENDED_REPLY_MAGIC => Ok(buf.get(..EXTENDED_CHUNK_HEADER_LEN).map(|h| {
            let header = ReplyHeader::Chunk {
                flags: be16(h, 4),
                reply_type: ReplyType(be16(h, 6)),
                cookie: be64(h, 8),
                offset: Some(be64(h, 16)),
                length: be64(h, 24),
            };
            (header, EXTENDED_CHUNK_HEADER_LEN)
        })),
        other => Err(ClientError::BadMagic(u64::from(other))),
    }
}

/// OFFSET_DATA payload: offset and the data (at least one byte).
pub fn decode_offset_data(payload: &[u8]) -> Option<(u64, &[u8])> {
    let (offset, data) = payload.split_first_chunk::<8>()?;
    (!data.is_empty()).then_some((u64::from_be_bytes(*offset), data))
}

/// OFFSET_HOLE payload: offset and length (exactly 12 bytes).
pub fn decode_offset_hole(payload: &[u8]) -> Option<(u64, u32)> {
    (payload.len() == 12).then(|| (be64(payload, 0), be32(payload, 8)))
}

/// BLOCK_STATUS payload: context id and (length, flags) descriptors.
pub fn decode_block_status(payload: &[u8]) -> Option<(u32, Vec<(u32, u32)>)> {
    let (id, rest) = payload.split_first_chunk::<4>()?;
    if rest.len() % 8 != 0 {
        return None;
    }
    let extents = rest
        .chunks_exact(8)
        .map(|c| (be32(c, 0), be32(c, 4)))
        .collect();
    Some((u32::from_be_bytes(*id), extents))
}

/// BLOCK_STATUS_EXT payload: context id, descriptor count, and (64-bit
/// length, 64-bit flags) descriptors; `None` if the count disagrees with the
/// size or a flags word does not fit the 32 bits contexts define.
pub fn decode_block_status_ext(payload: &[u8]) -> Option<(u32, Vec<(u64, u32)>)> {
    let (head, rest) = payload.split_first_chunk::<8>()?;
    let count = be32(head, 4) as usize;
    if rest.len() % 16 != 0 || rest.len() / 16 != count {
        return None;
    }
    let extents = rest
        .chunks_exact(16)
        .map(|c| Some((be64(c, 0), u32::try_from(be64(c, 8)).ok()?)))
        .collect::<Option<Vec<_>>>()?;
    Some((be32(head, 0), extents))
}

/// An ERROR or ERROR_OFFSET chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorChunk {
    pub error: NbdErrno,
    pub message: String,
    /// Only for ERROR_OFFSET.
    pub offset: Option<u64>,
}

/// Decodes an error chunk payload: u32 error, u16 message length, message
/// [, u64 offset when `reply_type` is ERROR_OFFSET].
pub fn decode_error(reply_type: ReplyType, payload: &[u8]) -> Option<ErrorChunk> {
    let head = payload.get(..6)?;
    let msg_len = usize::from(be16(head, 4));
    let message = payload.get(6..6 + msg_len)?;
    let tail = &payload[6 + msg_len..];
    let offset = match (reply_type, tail.len()) {
        (ReplyType::ERROR_OFFSET, 8) => Some(be64(tail, 0)),
        (ReplyType::ERROR_OFFSET, _) => return None,
        (_, 0) => None,
        _ => return None,
    };
    Some(ErrorChunk {
        error: NbdErrno(be32(head, 0)),
        message: String::from_utf8_lossy(message).into_owned(),
        offset,
    })
}

// ---- helpers: callers guarantee the slice is long enough --------------------

fn be16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(a)
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_decode_option_reply_when_incomplete_returns_none() {
        let mut buf = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        buf.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 5, b'x']);
        assert_eq!(decode_option_reply(&buf), Ok(None));
    }

    #[test]
    fn test_decode_option_reply_when_bad_magic_returns_error() {
        let buf = [0u8; OPTION_REPLY_HEADER_LEN];
        assert_eq!(decode_option_reply(&buf), Err(ClientError::BadMagic(0)));
    }

    #[test]
    fn test_decode_info_when_export_has_wrong_length_returns_none() {
        assert_eq!(decode_info(&[0, 0, 1, 2, 3]), None);
    }

    #[test]
    fn test_decode_server_when_name_length_past_end_returns_none() {
        assert_eq!(decode_server(&[0, 0, 0, 9, b'a']), None);
    }

    #[test]
    fn test_decode_reply_header_when_simple_magic_but_short_returns_none() {
        let buf = SIMPLE_REPLY_MAGIC.to_be_bytes();
        assert_eq!(decode_reply_header(&buf), Ok(None));
    }

    #[test]
    fn test_decode_error_when_message_length_past_end_returns_none() {
        assert_eq!(
            decode_error(ReplyType::ERROR, &[0, 0, 0, 5, 0, 9, b'x']),
            None
        );
    }

    #[test]
    fn test_decode_error_when_offset_variant_returns_offset() {
        let payload = [0, 0, 0, 5, 0, 1, b'x', 0, 0, 0, 0, 0, 0, 2, 0];
        let chunk = decode_error(ReplyType::ERROR_OFFSET, &payload).unwrap();
        assert_eq!(chunk.offset, Some(512));
    }

    #[test]
    fn test_decode_offset_hole_when_length_wrong_returns_none() {
        assert_eq!(decode_offset_hole(&[0; 11]), None);
    }

    #[test]
    fn test_decode_offset_data_when_no_data_returns_none() {
        assert_eq!(decode_offset_data(&[0; 8]), None);
    }

    #[test]
    fn test_decode_reply_header_when_extended_returns_offset_and_64_bit_length() {
        let mut buf = EXTENDED_REPLY_MAGIC.to_be_bytes().to_vec();
        buf.extend_from_slice(&[0, 1, 0, 6]);
        buf.extend_from_slice(&7u64.to_be_bytes());
        buf.extend_from_slice(&4096u64.to_be_bytes());
        buf.extend_from_slice(&(5u64 << 32).to_be_bytes());
        let header = ReplyHeader::Chunk {
            flags: 1,
            reply_type: ReplyType::BLOCK_STATUS_EXT,
            cookie: 7,
            offset: Some(4096),
            length: 5 << 32,
        };
        assert_eq!(decode_reply_header(&buf), Ok(Some((header, 32))));
    }

    #[test]
    fn test_decode_block_status_ext_when_count_disagrees_returns_none() {
        let mut p = vec![0, 0, 0, 0, 0, 0, 0, 2];
        p.extend_from_slice(&[0; 16]);
        assert_eq!(decode_block_status_ext(&p), None);
    }

    #[test]
    fn test_decode_block_status_ext_when_flags_over_32_bits_returns_none() {
        let mut p = vec![0, 0, 0, 0, 0, 0, 0, 1];
        p.extend_from_slice(&512u64.to_be_bytes());
        p.extend_from_slice(&(1u64 << 32).to_be_bytes());
        assert_eq!(decode_block_status_ext(&p), None);
    }
}
