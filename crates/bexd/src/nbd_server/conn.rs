//! One client connection: drives the sans-IO handshake over the socket, then
//! hands the negotiated session to the transmission phase.

use std::sync::{Arc, Weak};

use nbd::export::{ExportCatalog, ExportInfo};
use nbd::handshake::{HandshakeConfig, HandshakeStatus, Negotiated, ServerHandshake, TlsMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::budget::SharedBudget;
use super::NbdServerConfig;
use super::{tls, transmission};
use crate::daemon::Daemon;
use crate::export::ExportClient;
use crate::tls::TlsIo;

/// An accepted client socket.
#[derive(Debug)]
pub enum ClientStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Serves one client from greeting to close. `_slot` holds a max-connections
/// slot for as long as the connection lives; `budget` is the server's.
pub async fn run(
    stream: ClientStream,
    daemon: Weak<Daemon>,
    config: NbdServerConfig,
    cancel: CancellationToken,
    _slot: Option<OwnedSemaphorePermit>,
    budget: Arc<SharedBudget>,
) {
    let Some(d) = daemon.upgrade() else { return };
    let shutdown = d.shutdown.clone();
    drop(d);
    // The limit covers the whole handshake, TLS included: a client that stalls
    // in the middle of a TLS handshake is dropped like any other.
    let handshake = handshake(stream, &daemon, &config);
    let limited = async {
        match config.handshake_max {
            Some(limit) => tokio::time::timeout(limit, handshake)
                .await
                .unwrap_or_else(|_| Err("handshake timed out".into())),
            None => handshake.await,
        }
    };
    let outcome = tokio::select! {
        _ = cancel.cancelled() => return,
        _ = shutdown.cancelled() => return,
        r = limited => r,
    };
    let (negotiated, leftover, transport, client) = match outcome {
        Ok(Some(done)) => done,
        Ok(None) => return,
        Err(reason) => {
            tracing::info!(%reason, "NBD client dropped during handshake");
            return;
        }
    };
    let stop = client.export().kicked();
    let session = transmission::Session::new(negotiated, client, leftover, budget);
    match transport {
        Transport::Plain(ClientStream::Tcp(s)) => {
            let (r, w) = s.into_split();
            session.run(r, w, stop, shutdown).await;
        }
        Transport::Plain(ClientStream::Unix(s)) => {
            let (r, w) = s.into_split();
            session.run(r, w, stop, shutdown).await;
        }
        Transport::Tls(io) => {
            let (r, w) = tokio::io::split(io);
            session.run(r, w, stop, shutdown).await;
        }
    }
}

/// What the transmission phase runs over.
enum Transport {
    Plain(ClientStream),
    /// After STARTTLS: nothing is ever sent in plaintext again.
    Tls(Box<dyn TlsIo>),
}

/// The whole handshake: plaintext options, and with tls-creds the TLS upgrade
/// and the options after it. `Ok(None)`: the client left cleanly.
async fn handshake(
    mut stream: ClientStream,
    daemon: &Weak<Daemon>,
    config: &NbdServerConfig,
) -> HandshakeResult {
    let multi_conn = config.max_connections != 1;
    let tls = match config.tls {
        Some(_) => TlsMode::Required,
        None => TlsMode::None,
    };
    let mut hs = ServerHandshake::new(HandshakeConfig { tls });
    let step = match &mut stream {
        ClientStream::Tcp(s) => negotiate(s, &mut hs, daemon, multi_conn).await?,
        ClientStream::Unix(s) => negotiate(s, &mut hs, daemon, multi_conn).await?,
    };
    let creds = match step {
        Step::Done(n, leftover, client) => {
            return Ok(Some((n, leftover, Transport::Plain(stream), client)))
        }
        Step::Closed => return Ok(None),
        Step::StartTls => config
            .tls
            .as_ref()
            .ok_or("STARTTLS without TLS configured")?,
    };
    // The client must wait for the STARTTLS reply before its TLS hello.
    if !hs.take_leftover().is_empty() {
        return Err("client sent data before the STARTTLS reply".into());
    }
    let authz = config.tls_authz.as_deref();
    let mut io = match stream {
        ClientStream::Tcp(s) => tls::upgrade(s, creds, authz, daemon).await?,
        ClientStream::Unix(s) => tls::upgrade(s, creds, authz, daemon).await?,
    };
    hs.tls_established();
    match negotiate(&mut io, &mut hs, daemon, multi_conn).await? {
        Step::Done(n, leftover, client) => Ok(Some((n, leftover, Transport::Tls(io), client))),
        Step::Closed => Ok(None),
        Step::StartTls => Err("STARTTLS inside TLS".into()),
    }
}

/// The daemon's exports as the handshake sees them.
struct Catalog<'a> {
    daemon: &'a Daemon,
    multi_conn: bool,
}

impl ExportCatalog for Catalog<'_> {
    fn list(&self) -> Vec<(String, Option<String>)> {
        self.daemon
            .visible_exports()
            .iter()
            .map(|e| (e.name().to_string(), e.config.description.clone()))
            .collect()
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.daemon
            .visible_exports()
            .iter()
            .find(|e| e.name() == name)
            .map(|e| e.info(self.multi_conn))
    }
}

type HandshakeResult = Result<Option<(Negotiated, Vec<u8>, Transport, ExportClient)>, String>;

/// Where one stretch of option haggling ended.
enum Step {
    /// The export is chosen and the client already attached to it.
    Done(Negotiated, Vec<u8>, ExportClient),
    Closed,
    StartTls,
}

/// Feeds `stream` to the handshake until it finishes or asks for TLS.
async fn negotiate<S>(
    stream: &mut S,
    hs: &mut ServerHandshake,
    daemon: &Weak<Daemon>,
    multi_conn: bool,
) -> Result<Step, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    // Filled by `read_buf` into spare capacity: no memset per connection.
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        let status = {
            let Some(d) = daemon.upgrade() else {
                return Ok(Step::Closed);
            };
            let catalog = Catalog {
                daemon: &d,
                multi_conn,
            };
            hs.advance(&catalog).map_err(|e| e.to_string())
        };
        // The client is attached before it reads the reply that ends its
        // handshake: once it has that reply it counts as connected (a safe
        // block-export-del is refused), and an export removed in between is
        // never entered.
        let client = match &status {
            Ok(HandshakeStatus::Done(n)) => Some(
                daemon
                    .upgrade()
                    .and_then(|d| d.attach_client(&n.export.name))
                    .ok_or("export removed during the handshake")?,
            ),
            _ => None,
        };
        let out = hs.take_output();
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(|e| e.to_string())?;
            stream.flush().await.map_err(|e| e.to_string())?;
        }
        match status? {
            HandshakeStatus::NeedInput => {
                buf.clear();
                let n = stream.read_buf(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Ok(Step::Closed);
                }
                hs.receive(&buf);
            }
            HandshakeStatus::Done(negotiated) => {
                let leftover = hs.take_leftover();
                return client
                    .map(|c| Step::Done(*negotiated, leftover, c))
                    .ok_or_else(|| "no client for a finished handshake".into());
            }
            HandshakeStatus::Closed => return Ok(Step::Closed),
            HandshakeStatus::StartTls => return Ok(Step::StartTls),
        }
    }
}
