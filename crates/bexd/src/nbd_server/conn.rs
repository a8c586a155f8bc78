//! One client connection: drives the sans-IO handshake over the socket, then
//! hands the negotiated session to the transmission phase.

use std::sync::Weak;

use nbd::export::{ExportCatalog, ExportInfo};
use nbd::handshake::{HandshakeConfig, HandshakeStatus, Negotiated, ServerHandshake, TlsMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::transmission;
use super::NbdServerConfig;
use crate::daemon::Daemon;

/// An accepted client socket.
#[derive(Debug)]
pub enum ClientStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Serves one client from greeting to close. `_slot` holds a max-connections
/// slot for as long as the connection lives.
pub async fn run(
    mut stream: ClientStream,
    daemon: Weak<Daemon>,
    config: NbdServerConfig,
    cancel: CancellationToken,
    _slot: Option<OwnedSemaphorePermit>,
) {
    let Some(d) = daemon.upgrade() else { return };
    let shutdown = d.shutdown.clone();
    let multi_conn = config.max_connections != 1;
    drop(d);
    let handshake = async {
        match &mut stream {
            ClientStream::Tcp(s) => negotiate(s, &daemon, multi_conn).await,
            ClientStream::Unix(s) => negotiate(s, &daemon, multi_conn).await,
        }
    };
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
    let (negotiated, leftover) = match outcome {
        Ok(Some(done)) => done,
        Ok(None) => return,
        Err(reason) => {
            tracing::info!(%reason, "NBD client dropped during handshake");
            return;
        }
    };
    let Some(client) = daemon
        .upgrade()
        .and_then(|d| d.attach_client(&negotiated.export.name))
    else {
        tracing::info!(name = %negotiated.export.name, "export vanished during handshake");
        return;
    };
    let stop = client.export().kicked();
    let session = transmission::Session::new(negotiated, client, leftover);
    match stream {
        ClientStream::Tcp(s) => {
            let (r, w) = s.into_split();
            session.run(r, w, stop, shutdown).await;
        }
        ClientStream::Unix(s) => {
            let (r, w) = s.into_split();
            session.run(r, w, stop, shutdown).await;
        }
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

type HandshakeResult = Result<Option<(Negotiated, Vec<u8>)>, String>;

/// Runs the handshake to completion. `Ok(None)`: the client left cleanly (ABORT, EOF).
async fn negotiate<S>(stream: &mut S, daemon: &Weak<Daemon>, multi_conn: bool) -> HandshakeResult
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut hs = ServerHandshake::new(HandshakeConfig { tls: TlsMode::None });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let status = {
            let Some(d) = daemon.upgrade() else {
                return Ok(None);
            };
            let catalog = Catalog {
                daemon: &d,
                multi_conn,
            };
            hs.advance(&catalog).map_err(|e| e.to_string())
        };
        let out = hs.take_output();
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(|e| e.to_string())?;
        }
        match status? {
            HandshakeStatus::NeedInput => {
                let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Ok(None);
                }
                hs.receive(&buf[..n]);
            }
            HandshakeStatus::Done(negotiated) => {
                return Ok(Some((*negotiated, hs.take_leftover())));
            }
            HandshakeStatus::Closed => return Ok(None),
            HandshakeStatus::StartTls => return Err("STARTTLS without TLS configured".into()),
        }
    }
}
