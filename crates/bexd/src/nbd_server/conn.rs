//! One client connection: drives the sans-IO handshake over the socket, then
//! hands the negotiated session to the transmission phase.

use std::sync::Arc;

use nbd::export::{ExportCatalog, ExportInfo};
use nbd::handshake::{HandshakeConfig, HandshakeStatus, Negotiated, ServerHandshake, TlsMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::{tls, transmission, ServerContext, Settings};
use crate::exports::nbd::NbdExport;
use crate::exports::ExportClient;
use crate::net::ClientStream;
use crate::tls::TlsIo;

/// Serves one client from greeting to close. `_slot` holds a max-connections
/// slot for as long as the connection lives.
pub async fn run(
    stream: ClientStream,
    settings: Arc<Settings>,
    cancel: CancellationToken,
    _slot: Option<OwnedSemaphorePermit>,
) {
    let shutdown = settings.ctx.shutdown.clone();
    // The limit covers the whole handshake, TLS included: a client that stalls
    // in the middle of a TLS handshake is dropped like any other.
    // Boxed, so that its state (TLS included) is freed once it is done rather
    // than sized into the task for the connection's whole life.
    let handshake = Box::pin(handshake(stream, &settings));
    let limited = async {
        match settings.config.handshake_max {
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
    let session = transmission::Session::new(negotiated, client, leftover, settings.budget.clone());
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
async fn handshake(mut stream: ClientStream, settings: &Settings) -> HandshakeResult {
    let ctx = &settings.ctx;
    let multi_conn = settings.config.max_connections != 1;
    let tls = match settings.tls {
        Some(_) => TlsMode::Required,
        None => TlsMode::None,
    };
    let mut hs = ServerHandshake::new(HandshakeConfig { tls });
    let step = match &mut stream {
        ClientStream::Tcp(s) => negotiate(s, &mut hs, ctx, multi_conn).await?,
        ClientStream::Unix(s) => negotiate(s, &mut hs, ctx, multi_conn).await?,
    };
    let creds = match step {
        Step::Done(n, leftover, client) => {
            return Ok(Some((n, leftover, Transport::Plain(stream), client)))
        }
        Step::Closed => return Ok(None),
        Step::StartTls => settings
            .tls
            .as_ref()
            .ok_or("STARTTLS without TLS configured")?,
    };
    // The client must wait for the STARTTLS reply before its TLS hello.
    if !hs.take_leftover().is_empty() {
        return Err("client sent data before the STARTTLS reply".into());
    }
    let authz = settings.config.tls_authz.as_deref();
    let upgraded = match stream {
        ClientStream::Tcp(s) => tls::upgrade(s, creds, authz, &ctx.objects).await,
        ClientStream::Unix(s) => tls::upgrade(s, creds, authz, &ctx.objects).await,
    };
    settings.counters.tls_upgrade_ended(upgraded.is_ok());
    let mut io = upgraded?;
    hs.tls_established();
    match negotiate(&mut io, &mut hs, ctx, multi_conn).await? {
        Step::Done(n, leftover, client) => Ok(Some((n, leftover, Transport::Tls(io), client))),
        Step::Closed => Ok(None),
        Step::StartTls => Err("STARTTLS inside TLS".into()),
    }
}

/// The NBD exports of the table, as the handshake sees them.
struct Catalog<'a> {
    ctx: &'a ServerContext,
    multi_conn: bool,
}

impl ExportCatalog for Catalog<'_> {
    fn list(&self) -> Vec<(String, Option<String>)> {
        self.ctx
            .exports
            .visible()
            .iter()
            .filter_map(|e| e.kind_as::<NbdExport>())
            .map(|n| (n.name.clone(), n.description.clone()))
            .collect()
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.ctx.exports.visible().iter().find_map(|e| {
            let nbd = e.kind_as::<NbdExport>().filter(|n| n.name == name)?;
            Some(nbd.info(e, self.multi_conn))
        })
    }
}

/// Attaches a client to the visible NBD export called `name`.
fn attach(ctx: &ServerContext, name: &str) -> Option<ExportClient> {
    ctx.exports
        .attach(|e| e.kind_as::<NbdExport>().is_some_and(|n| n.name == name))
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
    ctx: &ServerContext,
    multi_conn: bool,
) -> Result<Step, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    // Filled by `read_buf` into spare capacity: no memset per connection.
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        let catalog = Catalog { ctx, multi_conn };
        let status = hs.advance(&catalog).map_err(|e| e.to_string());
        // The client is attached before it reads the reply that ends its
        // handshake: once it has that reply it counts as connected (a safe
        // block-export-del is refused), and an export removed in between is
        // never entered.
        let client = match &status {
            Ok(HandshakeStatus::Done(n)) => {
                Some(attach(ctx, &n.export.name).ok_or("export removed during the handshake")?)
            }
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
