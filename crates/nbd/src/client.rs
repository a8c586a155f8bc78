//! A sans-IO client codec, sharing the server's wire definitions: used by
//! tests, the fuzz targets and benchmarks. It can encode invalid messages on
//! purpose (raw options, any flags), like libnbd's unchecked mode.

use thiserror::Error;

use crate::consts::*;
use crate::types::{ChunkType, NbdErrno, OptionType, ReplyType};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ClientError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("reply payload of {0} bytes is too large")]
    TooLarge(u32),
}

/// Client flags after the greeting.
pub fn client_flags(out: &mut Vec<u8>, flags: u32) {
    out.extend_from_slice(&flags.to_be_bytes());
}

/// An option request with any payload.
pub fn option(out: &mut Vec<u8>, option: OptionType, payload: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.0.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// The payload of NBD_OPT_INFO / NBD_OPT_GO.
pub fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        p.extend_from_slice(&i.to_be_bytes());
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

/// One option reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionReply {
    pub option: OptionType,
    pub reply: ReplyType,
    pub data: Vec<u8>,
}

/// Decodes one option reply from the front of `buf`: `Ok(None)` if incomplete,
/// else the reply and the bytes it used.
pub fn decode_option_reply(buf: &[u8]) -> Result<Option<(OptionReply, usize)>, ClientError> {
    if buf.len() < 20 {
        return Ok(None);
    }
    let magic = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
    if magic != OPTION_REPLY_MAGIC {
        return Err(ClientError::BadMagic(magic));
    }
    let be32 = |i: usize| u32::from_be_bytes(buf[i..i + 4].try_into().unwrap_or_default());
    let len = be32(16);
    if len > MAX_OPTION_LEN {
        return Err(ClientError::TooLarge(len));
    }
    let total = 20 + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let reply = OptionReply {
        option: OptionType(be32(8)),
        reply: ReplyType(be32(12)),
        data: buf[20..total].to_vec(),
    };
    Ok(Some((reply, total)))
}

/// A transmission reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        cookie: u64,
        error: NbdErrno,
    },
    Chunk {
        flags: u16,
        chunk: ChunkType,
        cookie: u64,
        length: u32,
    },
}

/// Decodes a simple reply or structured chunk header from the front of `buf`.
pub fn decode_reply_header(buf: &[u8]) -> Result<Option<(ReplyHeader, usize)>, ClientError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let magic = u32::from_be_bytes(buf[..4].try_into().unwrap_or_default());
    let be32 = |i: usize| u32::from_be_bytes(buf[i..i + 4].try_into().unwrap_or_default());
    let be64 = |i: usize| u64::from_be_bytes(buf[i..i + 8].try_into().unwrap_or_default());
    match magic {
        SIMPLE_REPLY_MAGIC if buf.len() >= SIMPLE_REPLY_LEN => Ok(Some((
            ReplyHeader::Simple {
                error: NbdErrno(be32(4)),
                cookie: be64(8),
            },
            SIMPLE_REPLY_LEN,
        ))),
        STRUCTURED_REPLY_MAGIC if buf.len() >= CHUNK_HEADER_LEN => Ok(Some((
            ReplyHeader::Chunk {
                flags: u16::from_be_bytes([buf[4], buf[5]]),
                chunk: ChunkType(u16::from_be_bytes([buf[6], buf[7]])),
                cookie: be64(8),
                length: be32(16),
            },
            CHUNK_HEADER_LEN,
        ))),
        SIMPLE_REPLY_MAGIC | STRUCTURED_REPLY_MAGIC => Ok(None),
        other => Err(ClientError::BadMagic(u64::from(other))),
    }
}

/// Block status descriptors from a BLOCK_STATUS chunk payload: (context id, [(len, flags)]).
pub fn decode_block_status(payload: &[u8]) -> Option<(u32, Vec<(u32, u32)>)> {
    let (id, rest) = payload.split_first_chunk::<4>()?;
    if rest.len() % 8 != 0 {
        return None;
    }
    let extents = rest
        .chunks_exact(8)
        .map(|c| {
            let len = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
            let flags = u32::from_be_bytes([c[4], c[5], c[6], c[7]]);
            (len, flags)
        })
        .collect();
    Some((u32::from_be_bytes(*id), extents))
}
