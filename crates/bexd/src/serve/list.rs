//! `-L`: list another NBD server's exports, printed as qemu-nbd prints them.
//!
//! The same questions qemu-nbd's client asks, in its order: extended headers
//! (else structured replies), `NBD_OPT_LIST`, then per export `NBD_OPT_INFO`
//! (with block sizes) and, once structured replies are on,
//! `NBD_OPT_LIST_META_CONTEXT` with no query (every context the export has).
//! Blocking I/O on one socket: a one-shot client needs no runtime.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nbd::client::{self as codec, Info, OptionReply};
use nbd::consts::{
    CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_HAS_FLAGS,
    FLAG_NO_ZEROES,
};
use nbd::types::{InfoType, OptionReplyType, OptionType};

use super::args::{ListPlan, Listen};

/// Gives up on a server that stops answering.
const TIMEOUT: Duration = Duration::from_secs(30);

/// What one export told us.
#[derive(Debug, Default)]
struct Listed {
    name: String,
    description: String,
    size: u64,
    flags: u16,
    block: Option<(u32, u32, u32)>,
    contexts: Vec<String>,
}

/// The header style negotiated, which qemu-nbd reports per export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Simple,
    Structured,
    Extended,
}

/// Runs `-L`; returns the exit code.
pub fn main(plan: &ListPlan) -> i32 {
    if plan.tls_creds.is_some() {
        eprintln!("bexd serve: -L with --tls-creds is not supported by bexd serve");
        return 1;
    }
    let result = match &plan.listen {
        Listen::Unix(path) => UnixStream::connect(path)
            .map_err(|e| connect_error(&path.display().to_string(), &e))
            .and_then(|s| list(Conn::new(s))),
        Listen::Tcp { host, port } => TcpStream::connect((host.as_str(), *port))
            .map_err(|e| connect_error(&format!("{host}:{port}"), &e))
            .and_then(|s| list(Conn::new(s))),
        // A list plan is never given the activation socket (qemu-nbd's text).
        Listen::Activated => Err("List mode is incompatible with socket activation".into()),
    };
    match result {
        Ok((exports, mode)) => {
            print!("{}", render(&exports, mode));
            0
        }
        Err(message) => {
            eprintln!("bexd serve: {message}");
            1
        }
    }
}

fn connect_error(addr: &str, e: &std::io::Error) -> String {
    format!(
        "Failed to connect to '{addr}': {}",
        crate::util::strerror(e)
    )
}

/// A socket and the bytes read from it but not yet decoded.
struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
}

trait Timeouts {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()>;
}
impl Timeouts for TcpStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}
impl Timeouts for UnixStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl<S: Read + Write + Timeouts> Conn<S> {
    fn new(stream: S) -> Self {
        let _ = stream.set_timeouts(TIMEOUT);
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .map_err(|e| format!("Failed to write to the server: {e}"))
    }

    /// Reads until `decode` finds a whole message at the front of the buffer.
    fn read<T>(
        &mut self,
        decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, String>,
    ) -> Result<T, String> {
        loop {
            if let Some((value, used)) = decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(value);
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("Server closed the connection during the handshake".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("Failed to read from the server: {e}")),
            }
        }
    }

    fn reply(&mut self) -> Result<OptionReply, String> {
        self.read(|b| codec::decode_option_reply(b).map_err(|e| e.to_string()))
    }

    /// Sends an option and collects its replies up to the final one (ACK or an error).
    fn ask(&mut self, option: OptionType, payload: &[u8]) -> Result<Vec<OptionReply>, String> {
        let mut out = Vec::new();
        codec::option(&mut out, option, payload);
        self.send(&out)?;
        let mut replies = Vec::new();
        loop {
            let r = self.reply()?;
            let last = r.reply == OptionReplyType::ACK || r.reply.0 & (1 << 31) != 0;
            replies.push(r);
            if last {
                return Ok(replies);
            }
        }
    }
}

fn list<S: Read + Write + Timeouts>(mut conn: Conn<S>) -> Result<(Vec<Listed>, Mode), String> {
    let flags = conn.read(|b| codec::decode_greeting(b).map_err(|e| e.to_string()))?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(
            "Server does not support the fixed newstyle protocol needed to list exports".into(),
        );
    }
    let mut client = CLIENT_FLAG_FIXED_NEWSTYLE;
    if flags & FLAG_NO_ZEROES != 0 {
        client |= CLIENT_FLAG_NO_ZEROES;
    }
    conn.send(&client.to_be_bytes())?;
    let mode = negotiate_mode(&mut conn)?;
    let mut exports = Vec::new();
    for reply in conn.ask(OptionType::LIST, &[])? {
        match reply.reply {
            OptionReplyType::SERVER => {
                let (name, description) = codec::decode_server(&reply.data)
                    .ok_or("Server sent a malformed export list entry")?;
                exports.push(Listed {
                    name,
                    description,
                    ..Listed::default()
                });
            }
            OptionReplyType::ACK => {}
            _ => {
                return Err(format!(
                    "Server refused to list exports: {}",
                    reply.message()
                ))
            }
        }
    }
    for export in &mut exports {
        describe(&mut conn, export, mode)?;
    }
    let mut out = Vec::new();
    codec::abort(&mut out);
    // The server may close before answering ABORT; either is fine.
    let _ = conn.send(&out).and_then(|()| conn.reply().map(drop));
    Ok((exports, mode))
}

/// Extended headers if the server has them, else structured replies, as
/// QEMU 10's client asks.
fn negotiate_mode<S: Read + Write + Timeouts>(conn: &mut Conn<S>) -> Result<Mode, String> {
    let acked = |replies: Vec<OptionReply>| replies.iter().any(|r| r.reply == OptionReplyType::ACK);
    if acked(conn.ask(OptionType::EXTENDED_HEADERS, &[])?) {
        return Ok(Mode::Extended);
    }
    if acked(conn.ask(OptionType::STRUCTURED_REPLY, &[])?) {
        return Ok(Mode::Structured);
    }
    Ok(Mode::Simple)
}

fn describe<S: Read + Write + Timeouts>(
    conn: &mut Conn<S>,
    export: &mut Listed,
    mode: Mode,
) -> Result<(), String> {
    let payload = codec::info_payload(&export.name, &[InfoType::BLOCK_SIZE]);
    for reply in conn.ask(OptionType::INFO, &payload)? {
        if reply.reply != OptionReplyType::INFO {
            continue;
        }
        match codec::decode_info(&reply.data) {
            Some(Info::Export { size, flags }) => {
                export.size = size;
                export.flags = flags;
            }
            Some(Info::BlockSize(b)) => export.block = Some((b.min, b.preferred, b.max)),
            _ => {}
        }
    }
    if mode == Mode::Simple {
        return Ok(());
    }
    let payload = codec::meta_payload(&export.name, &[]);
    for reply in conn.ask(OptionType::LIST_META_CONTEXT, &payload)? {
        if reply.reply == OptionReplyType::META_CONTEXT {
            if let Some((_, name)) = codec::decode_meta_context(&reply.data) {
                export.contexts.push(name);
            }
        }
    }
    Ok(())
}

/// qemu-nbd's names for the transmission flags, by bit.
const FLAG_NAMES: [(u16, &str); 12] = [
    (1, "readonly"),
    (2, "flush"),
    (3, "fua"),
    (4, "rotational"),
    (5, "trim"),
    (6, "zeroes"),
    (7, "df"),
    (8, "multi"),
    (9, "resize"),
    (10, "cache"),
    (11, "fast-zero"),
    (12, "block-status-payload"),
];

/// qemu-nbd -L's output, line for line.
fn render(exports: &[Listed], mode: Mode) -> String {
    use std::fmt::Write as _;
    let mut out = format!("exports available: {}\n", exports.len());
    for e in exports {
        let _ = writeln!(out, " export: '{}'", e.name);
        if !e.description.is_empty() {
            let _ = writeln!(out, "  description: {}", e.description);
        }
        if e.flags & FLAG_HAS_FLAGS != 0 {
            let _ = writeln!(out, "  size:  {}", e.size);
            let names: String = FLAG_NAMES
                .iter()
                .filter(|(bit, _)| e.flags & (1 << bit) != 0)
                .map(|(_, name)| format!(" {name}"))
                .collect();
            let _ = writeln!(out, "  flags: {:#x} ({names} )", e.flags);
        }
        if let Some((min, opt, max)) = e.block.filter(|b| b.0 != 0) {
            let _ = writeln!(
                out,
                "  min block: {min}\n  opt block: {opt}\n  max block: {max}"
            );
        }
        let width = if mode == Mode::Extended {
            "64-bit"
        } else {
            "32-bit"
        };
        let _ = writeln!(out, "  transaction size: {width}");
        if !e.contexts.is_empty() {
            let _ = writeln!(out, "  available meta contexts: {}", e.contexts.len());
            for c in &e.contexts {
                let _ = writeln!(out, "   {c}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_render_is_qemu_nbds_layout() {
        let e = Listed {
            name: "foo".into(),
            description: "a desc".into(),
            size: 16777216,
            flags: 0x0ced,
            block: Some((1, 4096, 33554432)),
            contexts: vec!["base:allocation".into()],
        };
        let want = "exports available: 1\n export: 'foo'\n  description: a desc\n  size:  16777216\n  flags: 0xced ( flush fua trim zeroes df cache fast-zero )\n  min block: 1\n  opt block: 4096\n  max block: 33554432\n  transaction size: 32-bit\n  available meta contexts: 1\n   base:allocation\n";
        assert_eq!(render(&[e], Mode::Structured), want);
    }
}
