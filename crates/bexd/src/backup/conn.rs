//! One NBD client connection for backups, on the repo's own sans-IO client
//! codec (`nbd::client`) over a tokio socket.
//!
//! It negotiates what a backup needs (fixed newstyle, extended headers or
//! else structured replies, one meta context, GO) and then runs one request at a time: a backup opens
//! several connections instead of pipelining on one, which keeps each
//! connection trivially correct and still fills the pipe when the server
//! allows multi-conn.

use nbd::client::{self as codec, Info, ReplyHeader};
use nbd::consts::*;
use nbd::request::RequestHeader;
use nbd::types::{CommandType, OptionReplyType, ReplyType};
use nbd_client::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::error::BackupError;
use super::uri::{Source, Target};

/// Largest chunk payload accepted from a server (a 32 MiB read plus headers).
const MAX_CHUNK: u64 = MAX_PAYLOAD as u64 + 4096;

pub struct Conn {
    io: Stream,
    rbuf: Vec<u8>,
    pub size: u64,
    pub flags: u16,
    /// The id the server gave the requested meta context.
    pub context_id: Option<u32>,
    /// The server acked EXTENDED_HEADERS: 32-byte requests, extended replies.
    pub extended: bool,
    cookie: u64,
}

/// What a READ brought back: data or a hole, at an offset inside the request.
pub enum Piece {
    Data(u64, Vec<u8>),
    Zero(u64, u32),
}

impl Conn {
    /// Connects and negotiates (TLS first when the source has credentials);
    /// `context` is the meta context to select (if any).
    pub async fn open(source: &Source, context: Option<&str>) -> Result<Self, BackupError> {
        let target = &source.target;
        let io: Stream = match target {
            Target::Unix { socket, .. } => Box::new(tokio::net::UnixStream::connect(socket).await?),
            Target::Tcp { host, port, .. } => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
        };
        let mut c = Self {
            io,
            rbuf: Vec::new(),
            size: 0,
            flags: 0,
            context_id: None,
            extended: false,
            cookie: 0,
        };
        c.handshake(source, context).await?;
        Ok(c)
    }

    async fn fill(&mut self) -> Result<(), BackupError> {
        let mut tmp = [0u8; 64 * 1024];
        let n = self.io.read(&mut tmp).await?;
        if n == 0 {
            return Err(BackupError::Protocol("server closed the connection".into()));
        }
        self.rbuf.extend_from_slice(&tmp[..n]);
        Ok(())
    }

    /// The next `n` bytes: what is buffered, then straight from the socket
    /// into the result (a 4 MiB read is not staged through the small buffer).
    async fn take(&mut self, n: usize) -> Result<Vec<u8>, BackupError> {
        let have = self.rbuf.len().min(n);
        let mut out = Vec::with_capacity(n);
        out.extend(self.rbuf.drain(..have));
        if have < n {
            out.resize(n, 0);
            self.io.read_exact(&mut out[have..]).await?;
        }
        Ok(out)
    }

    async fn send(&mut self, out: &[u8]) -> Result<(), BackupError> {
        self.io.write_all(out).await?;
        Ok(())
    }

    async fn option_reply(&mut self) -> Result<codec::OptionReply, BackupError> {
        loop {
            if let Some((reply, n)) = codec::decode_option_reply(&self.rbuf).map_err(proto)? {
                self.rbuf.drain(..n);
                return Ok(reply);
            }
            self.fill().await?;
        }
    }

    async fn handshake(
        &mut self,
        source: &Source,
        context: Option<&str>,
    ) -> Result<(), BackupError> {
        let export = source.target.export();
        let server_flags = loop {
            if let Some((flags, n)) = codec::decode_greeting(&self.rbuf).map_err(proto)? {
                self.rbuf.drain(..n);
                break flags;
            }
            self.fill().await?;
        };
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(BackupError::Protocol("server is not fixed-newstyle".into()));
        }
        let mut out = Vec::new();
        let mut client = CLIENT_FLAG_FIXED_NEWSTYLE;
        if server_flags & FLAG_NO_ZEROES != 0 {
            client |= CLIENT_FLAG_NO_ZEROES;
        }
        codec::client_flags(&mut out, client);
        if let Some(tls) = &source.tls {
            codec::starttls(&mut out);
            self.send(&out).await?;
            out.clear();
            let reply = self.option_reply().await?;
            if reply.reply != OptionReplyType::ACK {
                return Err(match reply.reply {
                    OptionReplyType::ERR_UNSUP | OptionReplyType::ERR_POLICY => {
                        BackupError::Tls("the server does not offer TLS".into())
                    }
                    _ => option_error(&reply),
                });
            }
            if !self.rbuf.is_empty() {
                return Err(BackupError::Protocol(
                    "data after the STARTTLS reply".into(),
                ));
            }
            let plain = std::mem::replace(&mut self.io, Box::new(tokio::io::empty()));
            self.io = tls.connect(plain).await.map_err(BackupError::Tls)?;
        }
        // Extended headers first (one round trip covers a whole disk's block
        // status); a server without them gets STRUCTURED_REPLY instead.
        codec::extended_headers(&mut out);
        self.send(&out).await?;
        let reply = self.option_reply().await?;
        if reply.reply == OptionReplyType::ERR_TLS_REQD {
            return Err(BackupError::Tls(
                "the server requires TLS (give --tls-x509 or --tls-psk)".into(),
            ));
        }
        self.extended = reply.reply == OptionReplyType::ACK;
        if !self.extended {
            let mut out = Vec::new();
            codec::structured_reply(&mut out);
            self.send(&out).await?;
            let reply = self.option_reply().await?;
            if reply.reply != OptionReplyType::ACK {
                return Err(BackupError::Protocol(
                    "server does not support structured replies".into(),
                ));
            }
        }
        if let Some(context) = context {
            let mut out = Vec::new();
            codec::set_meta_context(&mut out, export, &[context]);
            self.send(&out).await?;
            loop {
                let reply = self.option_reply().await?;
                match reply.reply {
                    OptionReplyType::META_CONTEXT => {
                        if let Some((id, name)) = codec::decode_meta_context(&reply.data) {
                            if name == context {
                                self.context_id = Some(id);
                            }
                        }
                    }
                    OptionReplyType::ACK => break,
                    _ => return Err(option_error(&reply)),
                }
            }
            if self.context_id.is_none() {
                return Err(BackupError::NoContext(context.to_string()));
            }
        }
        let mut out = Vec::new();
        codec::go(&mut out, export, &[]);
        self.send(&out).await?;
        loop {
            let reply = self.option_reply().await?;
            match reply.reply {
                OptionReplyType::INFO => {
                    if let Some(Info::Export { size, flags }) = codec::decode_info(&reply.data) {
                        self.size = size;
                        self.flags = flags;
                    }
                }
                OptionReplyType::ACK => return Ok(()),
                _ => return Err(option_error(&reply)),
            }
        }
    }

    fn next_cookie(&mut self) -> u64 {
        self.cookie += 1;
        self.cookie
    }

    async fn request(
        &mut self,
        command: CommandType,
        offset: u64,
        length: u32,
        flags: u16,
    ) -> Result<u64, BackupError> {
        let cookie = self.next_cookie();
        let mut out = Vec::new();
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length: u64::from(length),
        };
        match self.extended {
            true => codec::extended_request(&mut out, &header),
            false => codec::request(&mut out, &header),
        }
        self.send(&out).await?;
        Ok(cookie)
    }

    /// The next reply header and, for a chunk, its payload.
    async fn reply(&mut self) -> Result<(ReplyHeader, Vec<u8>), BackupError> {
        let header = loop {
            if let Some((h, n)) = codec::decode_reply_header(&self.rbuf).map_err(proto)? {
                self.rbuf.drain(..n);
                break h;
            }
            self.fill().await?;
        };
        let payload = match header {
            ReplyHeader::Chunk { length, .. } if length > MAX_CHUNK => {
                return Err(BackupError::Protocol(format!("chunk of {length} bytes")))
            }
            ReplyHeader::Chunk { length, .. } => self.take(length as usize).await?,
            ReplyHeader::Simple { .. } => Vec::new(),
        };
        Ok((header, payload))
    }

    /// Reads `[offset, offset+len)`; holes come back as `Piece::Zero`.
    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<Piece>, BackupError> {
        let cookie = self.request(CommandType::READ, offset, len, 0).await?;
        let mut pieces = Vec::new();
        loop {
            let (header, payload) = self.reply().await?;
            match header {
                ReplyHeader::Simple { cookie: c, error } => {
                    check_cookie(cookie, c)?;
                    if error.0 != 0 {
                        return Err(BackupError::Server(format!(
                            "read at {offset}: error {}",
                            error.0
                        )));
                    }
                    pieces.push(Piece::Data(offset, self.take(len as usize).await?));
                    return Ok(pieces);
                }
                ReplyHeader::Chunk {
                    flags,
                    reply_type,
                    cookie: c,
                    ..
                } => {
                    check_cookie(cookie, c)?;
                    match reply_type {
                        ReplyType::OFFSET_DATA => {
                            let (at, data) = codec::decode_offset_data(&payload)
                                .ok_or_else(|| BackupError::Protocol("bad OFFSET_DATA".into()))?;
                            check_within(offset, len, at, data.len() as u64)?;
                            pieces.push(Piece::Data(at, data.to_vec()));
                        }
                        ReplyType::OFFSET_HOLE => {
                            let (at, n) = codec::decode_offset_hole(&payload)
                                .ok_or_else(|| BackupError::Protocol("bad OFFSET_HOLE".into()))?;
                            check_within(offset, len, at, u64::from(n))?;
                            pieces.push(Piece::Zero(at, n));
                        }
                        ReplyType::NONE => {}
                        t if t.is_error() => return Err(chunk_error(t, &payload)),
                        _ => {
                            return Err(BackupError::Protocol("unexpected chunk in a read".into()))
                        }
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Ok(pieces);
                    }
                }
            }
        }
    }

    /// BLOCK_STATUS for the negotiated context from `offset`: (length, flags)
    /// extents, possibly ending before `offset + len` (callers check for progress).
    pub async fn block_status(
        &mut self,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, u32)>, BackupError> {
        let id = self
            .context_id
            .ok_or_else(|| BackupError::Protocol("no meta context".into()))?;
        let cookie = self
            .request(CommandType::BLOCK_STATUS, offset, len, 0)
            .await?;
        let mut extents = Vec::new();
        loop {
            let (header, payload) = self.reply().await?;
            let ReplyHeader::Chunk {
                flags,
                reply_type,
                cookie: c,
                ..
            } = header
            else {
                return Err(BackupError::Protocol("simple reply to BLOCK_STATUS".into()));
            };
            check_cookie(cookie, c)?;
            match reply_type {
                ReplyType::BLOCK_STATUS => {
                    let (ctx, e) = codec::decode_block_status(&payload)
                        .ok_or_else(|| BackupError::Protocol("bad BLOCK_STATUS chunk".into()))?;
                    if ctx == id {
                        extents = e;
                    }
                }
                ReplyType::BLOCK_STATUS_EXT => {
                    let (ctx, e) = codec::decode_block_status_ext(&payload).ok_or_else(|| {
                        BackupError::Protocol("bad BLOCK_STATUS_EXT chunk".into())
                    })?;
                    // The request was at most 4 GiB, so each extent fits 32 bits.
                    if ctx == id {
                        extents = e
                            .into_iter()
                            .map(|(l, f)| (u32::try_from(l).unwrap_or(u32::MAX), f))
                            .collect();
                    }
                }
                ReplyType::NONE => {}
                t if t.is_error() => return Err(chunk_error(t, &payload)),
                _ => {
                    return Err(BackupError::Protocol(
                        "unexpected chunk in block status".into(),
                    ))
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if extents.iter().all(|e| e.0 == 0) {
            return Err(BackupError::Protocol(format!(
                "empty block status at {offset}"
            )));
        }
        Ok(extents)
    }

    /// Ends the session politely.
    pub async fn close(mut self) {
        if self.request(CommandType::DISC, 0, 0, 0).await.is_ok() {
            let _ = self.io.shutdown().await;
        }
    }
}

fn proto(e: codec::ClientError) -> BackupError {
    BackupError::Protocol(e.to_string())
}

fn check_cookie(sent: u64, got: u64) -> Result<(), BackupError> {
    match sent == got {
        true => Ok(()),
        false => Err(BackupError::Protocol(format!(
            "reply for cookie {got}, expected {sent}"
        ))),
    }
}

fn check_within(offset: u64, len: u32, at: u64, n: u64) -> Result<(), BackupError> {
    let end = offset + u64::from(len);
    match at >= offset && at.checked_add(n).is_some_and(|e| e <= end) {
        true => Ok(()),
        false => Err(BackupError::Protocol(format!(
            "chunk {at}+{n} outside the request"
        ))),
    }
}

fn option_error(reply: &codec::OptionReply) -> BackupError {
    BackupError::Server(format!("{:?}: {}", reply.reply, reply.message()))
}

fn chunk_error(t: ReplyType, payload: &[u8]) -> BackupError {
    match codec::decode_error(t, payload) {
        Some(e) => BackupError::Server(format!("error {}: {}", e.error.0, e.message)),
        None => BackupError::Protocol("malformed error chunk".into()),
    }
}
