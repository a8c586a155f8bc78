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
//! connections of the server, by `budget.rs`; `counters.rs` counts TLS
//! upgrades for the metrics endpoint.
//! ```

mod budget;
mod conn;
mod counters;
mod input;
mod listener;
mod reply;
mod sink;
mod splice;
mod tls;
mod transmission;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use counters::{ServerGauges, ServerSnapshot};

use crate::config::{ListenAddr, NbdServerConfig};
use crate::error::ServerError;
use crate::exports::ExportTable;
use crate::net::StartGate;
use crate::objects::ObjectTable;
use crate::tls::TlsCreds;

/// What the NBD server needs of the rest of the daemon, and nothing more:
/// it never sees the daemon itself.
#[derive(Clone, Debug)]
pub struct ServerContext {
    /// Where a client's export is found (by NBD name) and attached.
    pub exports: Arc<ExportTable>,
    /// Where `tls-authz` objects are looked up, at each connection.
    pub objects: Arc<ObjectTable>,
    /// The daemon's shutdown: listeners close, connections finish in-flight requests.
    pub shutdown: CancellationToken,
    /// Connection tasks, awaited at shutdown.
    pub tasks: TaskTracker,
    /// Clients are accepted once it opens (when start-up is complete).
    pub gate: StartGate,
}

/// One running server's settings, shared by its listener and its connections.
#[derive(Debug)]
struct Settings {
    config: NbdServerConfig,
    /// The `tls-creds` object, resolved when the server started (QEMU keeps a
    /// reference too, so a later object-del does not affect the server).
    tls: Option<Arc<TlsCreds>>,
    ctx: ServerContext,
    /// The server-wide budget of pinned request bytes.
    budget: Arc<budget::SharedBudget>,
    /// TLS upgrades and their failures.
    counters: Arc<counters::ServerCounters>,
}

/// A running server. Dropping it does not stop it: call [`NbdServer::stop`].
#[derive(Debug)]
pub struct NbdServer {
    config: NbdServerConfig,
    cancel: CancellationToken,
    /// The address actually bound (a TCP port 0 resolved to the real port).
    bound: ListenAddr,
    /// Its counters and budget, for the metrics endpoint.
    gauges: ServerGauges,
}

impl NbdServer {
    /// Binds the listening socket now (so errors reach the caller) and starts
    /// accepting; `tls` is the resolved `tls-creds` object, if the config names one.
    pub fn start(
        config: NbdServerConfig,
        tls: Option<Arc<TlsCreds>>,
        ctx: ServerContext,
    ) -> Result<Self, ServerError> {
        if config.tls_creds.is_some() != tls.is_some() {
            return Err(ServerError::Listen("tls-creds were not resolved".into()));
        }
        let listener = listener::bind(&config.addr)?;
        let bound = listener::local_addr(&listener, &config.addr);
        let cancel = CancellationToken::new();
        let gauges = ServerGauges {
            counters: Arc::default(),
            budget: budget::SharedBudget::for_server(config.payload_budget),
        };
        let settings = Arc::new(Settings {
            budget: gauges.budget.clone(),
            counters: gauges.counters.clone(),
            config: config.clone(),
            tls,
            ctx: ctx.clone(),
        });
        ctx.tasks
            .spawn(listener::accept_loop(listener, settings, cancel.clone()));
        tracing::info!(addr = ?bound, "NBD server listening");
        Ok(Self {
            config,
            cancel,
            bound,
            gauges,
        })
    }

    /// The server's TLS counters and payload budget, to read at any time.
    pub fn gauges(&self) -> ServerGauges {
        self.gauges.clone()
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
