//! Binding the NBD listening socket and accepting clients.
//!
//! Like QEMU, a full server (max-connections reached) stops accepting rather
//! than refusing: the client's connect succeeds, and it gets its greeting when
//! a slot frees.

use std::os::fd::FromRawFd;
use std::sync::{Arc, Weak};
use std::time::Duration;

use qmp::QmpError;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::budget::SharedBudget;
use super::conn::{self, ClientStream};
use super::{ListenAddr, NbdServerConfig};
use crate::daemon::Daemon;

/// A bound listening socket of either family.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// The address really bound: resolves a requested TCP port 0.
    pub fn local_addr(&self, requested: &ListenAddr) -> ListenAddr {
        match (self, requested) {
            (Self::Tcp(l), ListenAddr::Tcp { host, .. }) => match l.local_addr() {
                Ok(a) => ListenAddr::Tcp {
                    host: host.clone(),
                    port: a.port().to_string(),
                },
                Err(_) => requested.clone(),
            },
            _ => requested.clone(),
        }
    }

    pub async fn accept(&self) -> std::io::Result<ClientStream> {
        match self {
            Self::Tcp(l) => {
                let (s, _) = l.accept().await?;
                // Small replies (write acks) must not wait for Nagle.
                s.set_nodelay(true)?;
                Ok(ClientStream::Tcp(s))
            }
            Self::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok(ClientStream::Unix(s))
            }
        }
    }
}

/// Binds the address. QEMU replaces a stale unix socket file, and so do we.
pub fn bind(addr: &ListenAddr) -> Result<Listener, QmpError> {
    match addr {
        ListenAddr::Tcp { host, port } => bind_tcp(host, port),
        ListenAddr::Unix { path } => {
            let _ = std::fs::remove_file(path);
            let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| {
                QmpError::generic(format!(
                    "Failed to bind socket to {}: {}",
                    path.display(),
                    crate::util::strerror(&e)
                ))
            })?;
            from_std_unix(l)
        }
        ListenAddr::Fd { fd } => {
            // SAFETY: the user handed us this descriptor number as a listening
            // socket (addr.type=fd); we take ownership of it from here on.
            let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(*fd) };
            from_std_unix(l)
        }
    }
}

fn bind_tcp(host: &str, port: &str) -> Result<Listener, QmpError> {
    let port_num: u16 = port
        .parse()
        .map_err(|_| QmpError::generic(format!("Failed to parse port '{port}'")))?;
    let host = match host {
        "" => "0.0.0.0",
        h => h.trim_start_matches('[').trim_end_matches(']'),
    };
    let l = std::net::TcpListener::bind((host, port_num)).map_err(|e| {
        QmpError::generic(format!(
            "Failed to bind socket: {}",
            crate::util::strerror(&e)
        ))
    })?;
    l.set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(l))
        .map(Listener::Tcp)
        .map_err(|e| QmpError::generic(format!("Failed to listen: {e}")))
}

fn from_std_unix(l: std::os::unix::net::UnixListener) -> Result<Listener, QmpError> {
    l.set_nonblocking(true)
        .and_then(|()| UnixListener::from_std(l))
        .map(Listener::Unix)
        .map_err(|e| QmpError::generic(format!("Failed to listen: {e}")))
}

/// Accepts clients until the server is stopped or the daemon shuts down.
pub async fn accept_loop(
    listener: Listener,
    daemon: Weak<Daemon>,
    config: NbdServerConfig,
    cancel: CancellationToken,
    budget: Arc<SharedBudget>,
) {
    let slots = match config.max_connections {
        0 => None,
        n => Some(Arc::new(Semaphore::new(n as usize))),
    };
    let Some(shutdown) = daemon.upgrade().map(|d| d.shutdown.clone()) else {
        return;
    };
    loop {
        let permit = match &slots {
            None => None,
            Some(s) => tokio::select! {
                _ = cancel.cancelled() => break,
                _ = shutdown.cancelled() => break,
                p = s.clone().acquire_owned() => p.ok(),
            },
        };
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(d) = daemon.upgrade() else { break };
        let conn_cancel = cancel.child_token();
        d.tasks.spawn(conn::run(
            stream,
            daemon.clone(),
            config.clone(),
            conn_cancel,
            permit,
            budget.clone(),
        ));
    }
    tracing::debug!("NBD listener closed");
}
