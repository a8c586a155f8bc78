//! The NBD server: a listener, and a task per client connection.
//!
//! ```text
//!  listener.rs  accept (bounded by max-connections) ──► conn.rs: handshake (nbd::ServerHandshake)
//!                                                          │ Negotiated + ExportClient guard
//!                                                          ▼
//!                                   transmission.rs: reader ─► request tasks ─► writer (replies, any order)
//!
//! With tls-creds, the handshake stops at STARTTLS, `tls.rs` upgrades the
//! socket and checks tls-authz, and the handshake continues over TLS.
//! Request payloads in flight are bounded per connection and, across all
//! connections of the server, by `budget.rs`.
//! ```

mod budget;
mod conn;
mod input;
mod listener;
mod reply;
mod sink;
mod splice;
mod tls;
mod transmission;

pub(crate) use conn::ClientStream;
pub(crate) use listener::Listener;

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use qmp::QmpError;
use tokio_util::sync::CancellationToken;

use crate::daemon::Daemon;
use crate::tls::TlsCreds;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp {
        host: String,
        port: String,
    },
    Unix {
        path: PathBuf,
    },
    /// An already listening socket passed in by file descriptor number.
    Fd {
        fd: i32,
    },
}

impl ListenAddr {
    /// The address in NBD URI form, for messages (`bexd serve` prints it).
    pub fn uri(&self, export_name: &str) -> String {
        match self {
            Self::Tcp { host, port } if host.contains(':') => {
                format!("nbd://[{host}]:{port}/{export_name}")
            }
            Self::Tcp { host, port } => format!("nbd://{host}:{port}/{export_name}"),
            Self::Unix { path } => {
                format!("nbd+unix:///{export_name}?socket={}", path.display())
            }
            Self::Fd { fd } => format!("fd:{fd}"),
        }
    }
}

/// `nbd-server-start` / `--nbd-server` options, resolved.
#[derive(Clone, Debug)]
pub struct NbdServerConfig {
    pub addr: ListenAddr,
    pub tls_creds: Option<String>,
    /// The `tls-creds` object, resolved when the server starts (QEMU keeps a
    /// reference too, so a later object-del does not affect the server).
    pub tls: Option<Arc<TlsCreds>>,
    /// Looked up at each connection; a missing object denies.
    pub tls_authz: Option<String>,
    /// 0 means unlimited. QEMU's default is 100.
    pub max_connections: u32,
    /// Clients that have not finished the handshake by then are dropped; `None` = no limit.
    pub handshake_max: Option<Duration>,
}

/// A running server. Dropping it does not stop it: call [`NbdServer::stop`].
#[derive(Debug)]
pub struct NbdServer {
    config: NbdServerConfig,
    cancel: CancellationToken,
    /// The address actually bound (a TCP port 0 resolved to the real port).
    bound: ListenAddr,
}

impl NbdServer {
    /// Binds the listening socket now (so errors reach the caller) and starts accepting.
    pub fn start(config: NbdServerConfig, daemon: Weak<Daemon>) -> Result<Self, QmpError> {
        if config.tls_creds.is_some() && config.tls.is_none() {
            return Err(QmpError::generic("tls-creds were not resolved"));
        }
        let listener = listener::bind(&config.addr)?;
        let bound = listener.local_addr(&config.addr);
        let cancel = CancellationToken::new();
        let Some(strong) = daemon.upgrade() else {
            return Err(QmpError::generic("daemon is shutting down"));
        };
        strong.tasks.spawn(listener::accept_loop(
            listener,
            daemon,
            config.clone(),
            cancel.clone(),
            budget::SharedBudget::from_env(),
        ));
        tracing::info!(addr = ?bound, "NBD server listening");
        Ok(Self {
            config,
            cancel,
            bound,
        })
    }

    pub fn max_connections(&self) -> u32 {
        self.config.max_connections
    }

    pub fn bound_addr(&self) -> &ListenAddr {
        &self.bound
    }

    /// Closes the listener and drops clients still in the handshake.
    pub fn stop(&self) {
        self.cancel.cancel();
        if let ListenAddr::Unix { path } = &self.config.addr {
            let _ = std::fs::remove_file(path);
        }
    }
}
