//! One connection to the server and its life: requests are written under the
//! writer's lock, the reader task completes them, and a lost connection is
//! reopened while requests wait (`reconnect-delay`) or fail.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use block::{BlockError, BlockErrorKind, IoBuf};
use nbd::client_handshake::{ClientConfig, ClientNegotiated};
use nbd::request::RequestHeader;
use nbd::types::CommandType;
use tokio::io::{AsyncWriteExt, WriteHalf};
use tokio::sync::{oneshot, Notify};

use crate::addr::ServerAddr;
use crate::error::OpenError;
use crate::handshake::negotiate;
use crate::inflight::{lost, Answer, Entry, LinkState, Table};
use crate::transport::{Stream, TlsConnect};

/// Payloads up to this size go out in the same write as their header.
const COALESCE_MAX: usize = 64 * 1024;
/// First pause between reconnect attempts; it doubles up to [`RETRY_MAX`].
pub(crate) const RETRY_FIRST: Duration = Duration::from_millis(100);
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(2);

/// How to (re)open the connection.
#[derive(Debug)]
pub(crate) struct Params {
    pub addr: ServerAddr,
    pub config: ClientConfig,
    pub tls: Option<Arc<dyn TlsConnect>>,
    /// Zero: a lost connection fails every request from then on.
    pub reconnect_delay: Duration,
}

impl Params {
    pub async fn open(&self) -> Result<(Stream, ClientNegotiated), OpenError> {
        let stream = self.addr.connect().await?;
        negotiate(stream, self.config.clone(), self.tls.as_ref()).await
    }
}

struct Writer {
    half: Option<WriteHalf<Stream>>,
    /// Bumped by every connection, so a request is written once per connection.
    generation: u64,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("connected", &self.half.is_some())
            .field("generation", &self.generation)
            .finish()
    }
}

/// The connection shared by the driver's faces and its tasks.
#[derive(Debug)]
pub(crate) struct Link {
    pub params: Params,
    /// What the first handshake found; a reconnect must find the same.
    pub negotiated: ClientNegotiated,
    table: Mutex<Table>,
    writer: tokio::sync::Mutex<Writer>,
    pub(crate) closing: AtomicBool,
    pub(crate) close: Notify,
}

impl Link {
    pub fn new(params: Params, negotiated: ClientNegotiated) -> Self {
        Self {
            params,
            negotiated,
            table: Mutex::new(Table::new()),
            writer: tokio::sync::Mutex::new(Writer {
                half: None,
                generation: 0,
                scratch: Vec::new(),
            }),
            closing: AtomicBool::new(false),
            close: Notify::new(),
        }
    }

    pub fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a request (its cookie is assigned here) and waits for its reply.
    pub async fn call(
        self: &Arc<Self>,
        mut header: RequestHeader,
        payload: Option<Arc<IoBuf>>,
        read: Option<IoBuf>,
    ) -> Answer {
        let (done, answer) = oneshot::channel();
        {
            let mut table = self.table();
            match table.state {
                LinkState::Up | LinkState::Waiting => {}
                LinkState::Failing => return Answer::failed(read, lost("not reconnected")),
                LinkState::Closed => return Answer::failed(read, lost("closed")),
            }
            header.cookie = table.next_cookie();
            let entry = Entry {
                header,
                payload,
                read,
                covered: 0,
                error: None,
                status: None,
                sent_gen: 0,
                done,
            };
            table.entries.insert(header.cookie, entry);
        }
        self.send(header.cookie).await;
        answer
            .await
            .unwrap_or_else(|_| Answer::failed(None, lost("request dropped")))
    }

    /// Writes the request `cookie` unless it was written on this connection
    /// already (a reconnect resent it) or there is no connection (the
    /// reconnect will send it).
    async fn send(&self, cookie: u64) {
        let mut w = self.writer.lock().await;
        let generation = w.generation;
        let Writer { half, scratch, .. } = &mut *w;
        let Some(stream) = half.as_mut() else {
            return;
        };
        let payload = {
            let mut table = self.table();
            let Some(e) = table.entries.get_mut(&cookie) else {
                return;
            };
            if e.sent_gen == generation {
                return;
            }
            e.sent_gen = generation;
            scratch.clear();
            e.header.encode(scratch);
            e.payload.clone()
        };
        if let Err(e) = write_request(stream, scratch, payload.as_deref()).await {
            // The reader sees the same dead socket and starts the reconnect.
            tracing::debug!(error = %e, "writing an NBD request failed");
            *half = None;
        }
    }

    /// A new connection: every request not yet written on it is (re)sent
    /// before the reader starts, so no reply can arrive while a resend holds
    /// a WRITE's buffer.
    pub(crate) async fn install(&self, half: WriteHalf<Stream>) {
        let mut w = self.writer.lock().await;
        w.generation += 1;
        w.half = Some(half);
        let generation = w.generation;
        let resend: Vec<(Vec<u8>, Option<Arc<IoBuf>>)> = {
            let mut table = self.table();
            table.state = LinkState::Up;
            table
                .entries
                .values_mut()
                .filter(|e| e.sent_gen != generation)
                .map(|e| {
                    e.sent_gen = generation;
                    e.reset();
                    let mut header = Vec::new();
                    e.header.encode(&mut header);
                    (header, e.payload.clone())
                })
                .collect()
        };
        let Writer { half, scratch, .. } = &mut *w;
        for (header, payload) in resend {
            let Some(stream) = half.as_mut() else { break };
            scratch.clear();
            scratch.extend_from_slice(&header);
            if write_request(stream, scratch, payload.as_deref())
                .await
                .is_err()
            {
                *half = None;
            }
        }
    }

    pub(crate) async fn uninstall(&self) {
        self.writer.lock().await.half = None;
    }

    /// The node is going away: tell the server (NBD_CMD_DISC) and end the tasks.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.close.notify_one();
    }

    pub(crate) async fn disconnect(&self) {
        let mut w = self.writer.lock().await;
        if let Some(mut half) = w.half.take() {
            let mut header = Vec::new();
            disc_header().encode(&mut header);
            let _ = half.write_all(&header).await;
            let _ = half.shutdown().await;
        }
        let mut table = self.table();
        table.state = LinkState::Closed;
        table.fail_all("closed");
    }

    /// One reconnect attempt: a new connection to the same export, or why not.
    pub(crate) async fn reopen(&self) -> Result<Stream, OpenError> {
        let (stream, negotiated) = self.params.open().await?;
        let (was, now) = (&self.negotiated, &negotiated);
        if was.size != now.size
            || was.flags != now.flags
            || was.structured_replies != now.structured_replies
            || was.meta_context_id.is_some() != now.meta_context_id.is_some()
        {
            return Err(OpenError::Changed(format!(
                "size {} flags {:#x} became size {} flags {:#x}",
                was.size, was.flags, now.size, now.flags
            )));
        }
        Ok(stream)
    }
}

async fn write_request(
    stream: &mut WriteHalf<Stream>,
    scratch: &mut Vec<u8>,
    payload: Option<&IoBuf>,
) -> std::io::Result<()> {
    match payload {
        Some(p) if p.len() <= COALESCE_MAX => {
            scratch.extend_from_slice(p);
            stream.write_all(scratch).await
        }
        Some(p) => {
            stream.write_all(scratch).await?;
            stream.write_all(p).await
        }
        None => stream.write_all(scratch).await,
    }
}

fn disc_header() -> RequestHeader {
    RequestHeader {
        flags: 0,
        command: CommandType::DISC,
        cookie: 0,
        offset: 0,
        length: 0,
    }
}

/// An error a request gets from the server's errno.
pub(crate) fn server_error(errno: nbd::types::NbdErrno, message: &str) -> BlockError {
    use nbd::types::NbdErrno as E;
    let kind = match errno {
        E::EPERM => BlockErrorKind::ReadOnly,
        E::ENOSPC => BlockErrorKind::NoSpace,
        E::EINVAL | E::EOVERFLOW => BlockErrorKind::InvalidArgument,
        E::ENOTSUP => BlockErrorKind::NotSupported,
        _ => BlockErrorKind::Io,
    };
    let text = match message.is_empty() {
        true => format!("NBD server error {errno:?}"),
        false => message.to_string(),
    };
    BlockError::new(kind, text)
}
