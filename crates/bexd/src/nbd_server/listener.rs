//! Binding the NBD listening socket and accepting clients.
//!
//! Like QEMU, a full server (max-connections reached) stops accepting rather
//! than refusing: the client's connect succeeds, and it gets its greeting when
//! a slot frees.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{conn, Settings};
use crate::config::ListenAddr;
use crate::error::ServerError;
use crate::net::inet::InetListener;
use crate::net::Listener;

/// The address really bound: resolves a requested TCP port 0, and a
/// descriptor (`addr.type=fd`, socket activation) to the address it listens
/// on, so what is printed is something a client can connect to.
pub fn local_addr(listener: &Listener, requested: &ListenAddr) -> ListenAddr {
    match (listener, requested) {
        (_, ListenAddr::Tcp { host, inet, .. }) => match listener.tcp_port() {
            Some(port) => ListenAddr::Tcp {
                host: host.clone(),
                port: port.to_string(),
                inet: *inet,
            },
            None => requested.clone(),
        },
        (Listener::Tcp(l), ListenAddr::Fd { .. }) => match l.local_addr() {
            Ok(a) => ListenAddr::Tcp {
                host: a.ip().to_string(),
                port: a.port().to_string(),
                inet: Default::default(),
            },
            Err(_) => requested.clone(),
        },
        (Listener::Unix(l), ListenAddr::Fd { .. }) => {
            match l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Into::into))
            {
                Some(path) => ListenAddr::Unix { path },
                None => requested.clone(),
            }
        }
        _ => requested.clone(),
    }
}

/// Binds the address. QEMU replaces a stale unix socket file, and so do we.
pub fn bind(addr: &ListenAddr) -> Result<Listener, ServerError> {
    match addr {
        ListenAddr::Tcp { host, port, inet } => InetListener::bind(host, port, inet)
            .map(Listener::Inet)
            .map_err(ServerError::Listen),
        ListenAddr::Unix { path } => {
            let _ = std::fs::remove_file(path);
            let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| {
                ServerError::Listen(format!(
                    "Failed to bind socket to {}: {}",
                    path.display(),
                    crate::util::strerror(&e)
                ))
            })?;
            from_std_unix(l)
        }
        ListenAddr::UnixAbstract { name, tight } => {
            let l = crate::net::abstract_unix::bind(name, *tight).map_err(ServerError::Listen)?;
            from_std_unix(l)
        }
        // Checked to be a listening stream socket before it is taken.
        ListenAddr::Fd { fd } => Ok(crate::fds::take_listener(fd)?),
    }
}

fn from_std_unix(l: std::os::unix::net::UnixListener) -> Result<Listener, ServerError> {
    l.set_nonblocking(true)
        .and_then(|()| UnixListener::from_std(l))
        .map(Listener::Unix)
        .map_err(|e| ServerError::Listen(format!("Failed to listen: {e}")))
}

/// Accepts clients until the server is stopped or the daemon shuts down.
pub async fn accept_loop(listener: Listener, settings: Arc<Settings>, cancel: CancellationToken) {
    let slots = match settings.config.max_connections {
        0 => None,
        n => Some(Arc::new(Semaphore::new(n as usize))),
    };
    let shutdown = settings.ctx.shutdown.clone();
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = shutdown.cancelled() => return,
        _ = settings.ctx.gate.wait() => {}
    }
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
        let conn_cancel = cancel.child_token();
        settings
            .ctx
            .tasks
            .spawn(conn::run(stream, settings.clone(), conn_cancel, permit));
    }
    tracing::debug!("NBD listener closed");
}
