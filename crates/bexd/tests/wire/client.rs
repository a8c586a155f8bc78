//! A blocking NBD client over a unix socket, built on the nbd crate's client
//! codec: the handshake, requests, and replies decoded chunk by chunk, with
//! nothing merged or hidden, so tests see the exact reply shape.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nbd::client::{self, ReplyHeader};
use nbd::consts::{
    CHUNK_HEADER_LEN, CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, GREETING_LEN,
    REPLY_FLAG_DONE, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC,
};
use nbd::request::RequestHeader;
use nbd::types::{CommandType, NbdErrno, OptionReplyType, OptionType, ReplyType};

/// A reply that never comes is a failure, not a hung test.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Cookies start here: every byte differs, so a cookie echoed with its bytes
/// swapped or cut short shows.
const FIRST_COOKIE: u64 = 0x0102_0304_0506_0700;

/// One whole reply to a request, as it came off the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply; `data` is what followed it (a successful READ's bytes).
    Simple { error: NbdErrno, data: Vec<u8> },
    /// The chunks of a structured reply, in order; only the last had DONE.
    Structured(Vec<Chunk>),
}

impl Reply {
    /// A simple reply with no error and no data.
    pub const OK: Reply = Reply::Simple {
        error: NbdErrno::OK,
        data: Vec::new(),
    };

    pub fn simple_error(error: NbdErrno) -> Self {
        Self::Simple {
            error,
            data: Vec::new(),
        }
    }

    /// A structured reply of a single ERROR chunk.
    pub fn error_chunk(error: NbdErrno, message: &str) -> Self {
        Self::Structured(vec![Chunk::Error {
            error,
            message: message.into(),
        }])
    }
}

/// One structured reply chunk, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk {
    None,
    Data {
        offset: u64,
        data: Vec<u8>,
    },
    Hole {
        offset: u64,
        len: u32,
    },
    Status {
        context: u32,
        extents: Vec<(u32, u32)>,
    },
    Error {
        error: NbdErrno,
        message: String,
    },
    ErrorOffset {
        error: NbdErrno,
        message: String,
        offset: u64,
    },
    /// A type this client does not know, or a payload its decoder refused.
    Other {
        reply_type: u16,
        payload: Vec<u8>,
    },
}

pub struct Client {
    stream: UnixStream,
    /// Meta context ids by name, as SET_META_CONTEXT answered.
    contexts: HashMap<String, u32>,
    /// Export size and transmission flags, from GO's NBD_INFO_EXPORT.
    pub size: u64,
    pub flags: u16,
    next_cookie: u64,
    /// Bytes read ahead (to see a reply's cookie), served before the socket's.
    pending: Vec<u8>,
}

impl Client {
    /// Greeting, client flags, then (if `structured`) STRUCTURED_REPLY and
    /// SET_META_CONTEXT for `contexts`, then GO for `export`.
    pub fn connect(socket: &Path, export: &str, structured: bool, contexts: &[&str]) -> Self {
        let stream = UnixStream::connect(socket).expect("connecting to the NBD socket");
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .expect("a read timeout");
        let mut c = Self {
            stream,
            contexts: HashMap::new(),
            size: 0,
            flags: 0,
            next_cookie: FIRST_COOKIE,
            pending: Vec::new(),
        };
        let greeting = c.read_bytes(GREETING_LEN);
        client::decode_greeting(&greeting)
            .expect("a newstyle greeting")
            .expect("a whole greeting");
        let mut out = Vec::new();
        client::client_flags(&mut out, CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
        if structured {
            client::structured_reply(&mut out);
        }
        if !contexts.is_empty() {
            client::set_meta_context(&mut out, export, contexts);
        }
        client::go(&mut out, export, &[]);
        c.stream.write_all(&out).expect("sending the options");
        if structured {
            let ack = c.option_reply();
            assert_eq!(ack.reply, OptionReplyType::ACK, "{}", ack.message());
        }
        if !contexts.is_empty() {
            c.read_meta_contexts();
        }
        c.read_go_replies();
        c
    }

    fn read_meta_contexts(&mut self) {
        loop {
            let r = self.option_reply();
            match r.reply {
                OptionReplyType::META_CONTEXT => {
                    let (id, name) = client::decode_meta_context(&r.data).expect("a context");
                    self.contexts.insert(name, id);
                }
                OptionReplyType::ACK => return,
                other => panic!("SET_META_CONTEXT: {other:?}: {}", r.message()),
            }
        }
    }

    fn read_go_replies(&mut self) {
        loop {
            let r = self.option_reply();
            match r.reply {
                OptionReplyType::ACK if r.option == OptionType::GO => return,
                OptionReplyType::INFO => {
                    if let Some(client::Info::Export { size, flags }) = client::decode_info(&r.data)
                    {
                        (self.size, self.flags) = (size, flags);
                    }
                }
                other => panic!("GO: {other:?}: {}", r.message()),
            }
        }
    }

    fn option_reply(&mut self) -> client::OptionReply {
        let mut buf = self.read_bytes(20);
        let len = u32::from_be_bytes(buf[16..20].try_into().expect("4 bytes")) as usize;
        buf.extend(self.read_bytes(len));
        client::decode_option_reply(&buf)
            .expect("an option reply")
            .expect("a whole option reply")
            .0
    }

    /// The id the server gave meta context `name`.
    pub fn context(&self, name: &str) -> u32 {
        match self.contexts.get(name) {
            Some(&id) => id,
            None => panic!("context {name} was not negotiated: {:?}", self.contexts),
        }
    }

    /// Sends a request (a WRITE's `payload` right after it); returns its cookie.
    pub fn send(
        &mut self,
        command: CommandType,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut out = Vec::new();
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length: u64::from(length),
        };
        client::request(&mut out, &header);
        out.extend_from_slice(payload);
        self.stream.write_all(&out).expect("sending a request");
        cookie
    }

    /// Sends a request and reads its reply (a READ of `length` bytes expects them after an OK simple reply).
    pub fn request(
        &mut self,
        command: CommandType,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Reply {
        let cookie = self.send(command, flags, offset, length, payload);
        let data_len = if command == CommandType::READ {
            length as usize
        } else {
            0
        };
        self.reply(cookie, data_len)
    }

    pub fn read(&mut self, flags: u16, offset: u64, length: u32) -> Reply {
        self.request(CommandType::READ, flags, offset, length, &[])
    }

    pub fn write(&mut self, flags: u16, offset: u64, data: &[u8]) -> Reply {
        let len = u32::try_from(data.len()).expect("a small payload");
        self.request(CommandType::WRITE, flags, offset, len, data)
    }

    /// BLOCK_STATUS, FLUSH, TRIM, WRITE_ZEROES, CACHE: no payload, no data.
    pub fn command(&mut self, command: CommandType, flags: u16, offset: u64, length: u32) -> Reply {
        self.request(command, flags, offset, length, &[])
    }

    /// The next reply, which must be for `cookie`. A simple reply with no
    /// error is followed by `data_len` bytes of data.
    pub fn reply(&mut self, cookie: u64, data_len: usize) -> Reply {
        let mut chunks = Vec::new();
        loop {
            let mut head = self.read_bytes(4);
            let simple = head == SIMPLE_REPLY_MAGIC.to_be_bytes();
            let rest = if simple {
                SIMPLE_REPLY_LEN
            } else {
                CHUNK_HEADER_LEN
            } - 4;
            head.extend(self.read_bytes(rest));
            let header = client::decode_reply_header(&head)
                .expect("a reply magic")
                .expect("a whole header")
                .0;
            match header {
                ReplyHeader::Simple { cookie: c, error } => {
                    assert_eq!(c, cookie, "simple reply for another request");
                    assert!(chunks.is_empty(), "a simple reply inside a structured one");
                    let data = match error {
                        NbdErrno::OK => self.read_bytes(data_len),
                        _ => Vec::new(),
                    };
                    return Reply::Simple { error, data };
                }
                ReplyHeader::Chunk {
                    flags,
                    reply_type,
                    cookie: c,
                    length,
                    ..
                } => {
                    assert_eq!(c, cookie, "chunk for another request");
                    assert_eq!(
                        flags & !REPLY_FLAG_DONE,
                        0,
                        "unknown chunk flags {flags:#x}"
                    );
                    let payload = self.read_bytes(length as usize);
                    chunks.push(decode_chunk(reply_type, payload));
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Reply::Structured(chunks);
                    }
                }
            }
        }
    }

    /// The next reply, whichever request it answers (replies may come in any
    /// order); only for requests that return no data.
    pub fn reply_any(&mut self) -> (u64, Reply) {
        let head = self.read_bytes(16);
        let cookie = u64::from_be_bytes(head[8..16].try_into().expect("8 bytes"));
        self.pending = head;
        (cookie, self.reply(cookie, 0))
    }

    /// Exactly `n` bytes off the socket.
    pub fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        let ahead = self.pending.len().min(n);
        let mut buf: Vec<u8> = self.pending.drain(..ahead).collect();
        buf.resize(n, 0);
        self.stream
            .read_exact(&mut buf[ahead..])
            .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
        buf
    }

    /// Whether the server has closed the connection (EOF, nothing more sent).
    pub fn at_eof(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte), Ok(0))
    }
}

fn decode_chunk(reply_type: ReplyType, payload: Vec<u8>) -> Chunk {
    let decoded = match reply_type {
        ReplyType::NONE if payload.is_empty() => Some(Chunk::None),
        ReplyType::OFFSET_DATA => {
            client::decode_offset_data(&payload).map(|(offset, data)| Chunk::Data {
                offset,
                data: data.to_vec(),
            })
        }
        ReplyType::OFFSET_HOLE => {
            client::decode_offset_hole(&payload).map(|(offset, len)| Chunk::Hole { offset, len })
        }
        ReplyType::BLOCK_STATUS => client::decode_block_status(&payload)
            .map(|(context, extents)| Chunk::Status { context, extents }),
        t if t.is_error() => client::decode_error(t, &payload).map(|e| match e.offset {
            None => Chunk::Error {
                error: e.error,
                message: e.message,
            },
            Some(offset) => Chunk::ErrorOffset {
                error: e.error,
                message: e.message,
                offset,
            },
        }),
        _ => None,
    };
    decoded.unwrap_or(Chunk::Other {
        reply_type: reply_type.0,
        payload,
    })
}
