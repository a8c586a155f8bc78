//! The reply reader: one task per connection reads replies in whatever order
//! the server sends them and completes the request each one answers, reading
//! a READ's data straight into that request's buffer.

use std::sync::Arc;

use nbd::client::{
    decode_block_status, decode_error, decode_offset_hole, decode_reply_header, ReplyHeader,
};
use nbd::consts::*;
use nbd::types::{CommandType, NbdErrno, ReplyType};
use tokio::io::{AsyncReadExt, BufReader, ReadHalf};

use crate::inflight::Entry;
use crate::link::{server_error, Link};
use crate::transport::{strerror, Stream};

/// Bytes of reply headers and small chunks read per syscall.
const READ_BUFFER: usize = 64 * 1024;
/// Largest non-data chunk accepted (an error message, one context's
/// descriptors for a REQ_ONE query); more is a broken server.
const MAX_CHUNK: u64 = 1 << 20;

/// Reads replies until the connection fails; returns why.
pub(crate) async fn run(link: &Arc<Link>, half: ReadHalf<Stream>) -> String {
    let mut r = BufReader::with_capacity(READ_BUFFER, half);
    loop {
        if let Err(e) = one_reply(link, &mut r).await {
            return e;
        }
    }
}

type Reader = BufReader<ReadHalf<Stream>>;

async fn one_reply(link: &Arc<Link>, r: &mut Reader) -> Result<(), String> {
    let mut head = [0u8; EXTENDED_CHUNK_HEADER_LEN];
    r.read_exact(&mut head[..4]).await.map_err(io)?;
    let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let len = match magic {
        SIMPLE_REPLY_MAGIC => SIMPLE_REPLY_LEN,
        STRUCTURED_REPLY_MAGIC => CHUNK_HEADER_LEN,
        _ => return Err(format!("invalid reply magic {magic:#x}")),
    };
    r.read_exact(&mut head[4..len]).await.map_err(io)?;
    let header = match decode_reply_header(&head[..len]) {
        Ok(Some((h, _))) => h,
        _ => return Err("malformed reply header".into()),
    };
    match header {
        ReplyHeader::Simple { cookie, error } => simple(link, r, cookie, error).await,
        ReplyHeader::Chunk {
            flags,
            reply_type,
            cookie,
            length,
            ..
        } => chunk(link, r, cookie, flags, reply_type, length).await,
    }
}

/// Takes the request `cookie` out of the table while its reply is read.
fn take(link: &Link, cookie: u64) -> Result<Entry, String> {
    link.table()
        .entries
        .remove(&cookie)
        .ok_or_else(|| format!("reply for unknown cookie {cookie}"))
}

/// Puts a request back (its reply is not complete, or the connection broke mid-reply).
fn put_back(link: &Link, entry: Entry) {
    link.table().entries.insert(entry.header.cookie, entry);
}

async fn simple(link: &Link, r: &mut Reader, cookie: u64, error: NbdErrno) -> Result<(), String> {
    let mut entry = take(link, cookie)?;
    if error != NbdErrno::OK {
        entry.fail(server_error(error, ""));
        return Ok(());
    }
    if entry.header.command == CommandType::READ {
        if link.negotiated.structured_replies {
            put_back(link, entry);
            return Err("simple reply to a READ after structured replies".into());
        }
        let Some(buf) = entry.read.as_mut() else {
            return Err("a READ without a buffer".into());
        };
        if let Err(e) = r.read_exact(buf).await {
            put_back(link, entry);
            return Err(io(e));
        }
    }
    entry.finish(Ok(()));
    Ok(())
}

async fn chunk(
    link: &Link,
    r: &mut Reader,
    cookie: u64,
    flags: u16,
    reply_type: ReplyType,
    length: u64,
) -> Result<(), String> {
    let mut entry = take(link, cookie)?;
    match chunk_body(link, r, &mut entry, reply_type, length).await {
        Ok(()) => {}
        Err(e) => {
            put_back(link, entry);
            return Err(e);
        }
    }
    if flags & REPLY_FLAG_DONE == 0 {
        put_back(link, entry);
        return Ok(());
    }
    let result = match entry.error.take() {
        Some(e) => Err(e),
        None => complete(&entry),
    };
    entry.finish(result);
    Ok(())
}

/// A finished reply without an error chunk must have answered the whole request.
fn complete(entry: &Entry) -> block::BlockResult<()> {
    let short = match entry.header.command {
        CommandType::READ => entry.covered != entry.header.length,
        CommandType::BLOCK_STATUS => entry.status.is_none(),
        _ => false,
    };
    match short {
        true => Err(server_error(
            NbdErrno::EIO,
            "NBD server sent an incomplete reply",
        )),
        false => Ok(()),
    }
}

async fn chunk_body(
    link: &Link,
    r: &mut Reader,
    entry: &mut Entry,
    reply_type: ReplyType,
    length: u64,
) -> Result<(), String> {
    let req = entry.header;
    match reply_type {
        ReplyType::NONE if length == 0 => Ok(()),
        ReplyType::OFFSET_DATA if req.command == CommandType::READ && length > 8 => {
            let mut at = [0u8; 8];
            r.read_exact(&mut at).await.map_err(io)?;
            let offset = u64::from_be_bytes(at);
            let rel = in_request(offset, length - 8, req.offset, req.length)?;
            let buf = entry.read.as_mut().ok_or("a READ without a buffer")?;
            let dst = &mut buf[rel..rel + (length - 8) as usize];
            r.read_exact(dst).await.map_err(io)?;
            entry.covered += length - 8;
            Ok(())
        }
        ReplyType::OFFSET_HOLE if req.command == CommandType::READ && length == 12 => {
            let payload = small(r, length).await?;
            let (offset, len) = decode_offset_hole(&payload).ok_or("bad OFFSET_HOLE")?;
            let rel = in_request(offset, u64::from(len), req.offset, req.length)?;
            let buf = entry.read.as_mut().ok_or("a READ without a buffer")?;
            buf[rel..rel + len as usize].fill(0);
            entry.covered += u64::from(len);
            Ok(())
        }
        ReplyType::BLOCK_STATUS if req.command == CommandType::BLOCK_STATUS => {
            let payload = small(r, length).await?;
            let (id, extents) = decode_block_status(&payload).ok_or("bad BLOCK_STATUS chunk")?;
            if Some(id) != link.negotiated.meta_context_id {
                return Err(format!(
                    "BLOCK_STATUS for context {id} that was not selected"
                ));
            }
            let &(len, flags) = extents.first().ok_or("BLOCK_STATUS without descriptors")?;
            if len == 0 {
                return Err("BLOCK_STATUS with an empty extent".into());
            }
            entry.status = Some((u64::from(len), flags));
            Ok(())
        }
        t if t.is_error() => {
            let payload = small(r, length).await?;
            let chunk = decode_error(t, &payload).ok_or("bad error chunk")?;
            if chunk.error == NbdErrno::OK {
                return Err("error chunk with error 0".into());
            }
            entry
                .error
                .get_or_insert_with(|| server_error(chunk.error, &chunk.message));
            Ok(())
        }
        t => Err(format!(
            "unexpected chunk {t:?} of {length} bytes for {:?}",
            req.command
        )),
    }
}

/// The position of `[offset, offset+len)` in a request for `[start, start+req_len)`.
fn in_request(offset: u64, len: u64, start: u64, req_len: u64) -> Result<usize, String> {
    let end = offset.checked_add(len).ok_or("chunk past 2^64")?;
    match offset >= start && end <= start + req_len {
        true => Ok((offset - start) as usize),
        false => Err(format!("chunk [{offset}, {end}) outside the request")),
    }
}

async fn small(r: &mut Reader, length: u64) -> Result<Vec<u8>, String> {
    if length > MAX_CHUNK {
        return Err(format!("chunk of {length} bytes"));
    }
    let mut payload = vec![0u8; length as usize];
    r.read_exact(&mut payload).await.map_err(io)?;
    Ok(payload)
}

fn io(e: std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "server closed the connection".into(),
        _ => strerror(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::in_request;

    #[test]
    fn test_in_request_when_inside_returns_position() {
        assert_eq!(in_request(4096, 512, 4096, 8192), Ok(0));
        assert_eq!(in_request(8192, 4096, 4096, 8192), Ok(4096));
    }

    #[test]
    fn test_in_request_when_past_end_fails() {
        assert!(in_request(8192, 4097, 4096, 8192).is_err());
        assert!(in_request(0, 1, 4096, 8192).is_err());
        assert!(in_request(u64::MAX, 2, 0, 8192).is_err());
    }
}
