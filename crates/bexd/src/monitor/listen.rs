//! A monitor on a listening socket chardev (`server=on`): one client at a
//! time, as QEMU serves a socket chardev.

use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};

use super::scm::ScmStream;
use super::{serve_client, started};
use crate::chardevs::{disconnected, server_suffix, Chardev, Opened};
use crate::commands::Executor;
use crate::config::{ChardevAddr, SocketChardev};
use crate::error::ChardevError;
use crate::fds::MonitorFds;
use crate::net::{ClientStream, Listener};

/// Binds (or takes the descriptor) when the chardev is created, as QEMU does.
pub async fn open(chardev: &Chardev, socket: &SocketChardev) -> Result<Opened, ChardevError> {
    let (listener, socket_file) = bind(chardev.id(), &socket.addr).await?;
    chardev.set_filename(disconnected(&listening_text(&listener), true));
    Ok(Opened::Listening(listener, socket_file))
}

/// Accepts one client at a time once start-up is complete.
pub fn serve(
    exec: &Executor,
    chardev: Arc<Chardev>,
    listener: Listener,
    socket_file: Option<std::path::PathBuf>,
    fds: Arc<MonitorFds>,
    pretty: bool,
) {
    let idle = disconnected(&listening_text(&listener), true);
    let exec = exec.clone();
    exec.tasks().clone().spawn(async move {
        let shutdown = exec.shutdown();
        let mut serving = started(&exec).await;
        while serving && !shutdown.is_cancelled() {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok(ClientStream::Unix(s)) => {
                    chardev.set_filename(format!("{},server=on", listening_text(&listener)));
                    serve_client(ScmStream::new(s), &exec, &fds, pretty).await;
                }
                Ok(ClientStream::Tcp(s)) => {
                    chardev.set_filename(tcp_connected(&s, true));
                    serve_client(s, &exec, &fds, pretty).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "QMP accept failed");
                    serving = !shutdown.is_cancelled();
                }
            }
            chardev.set_filename(idle.clone());
        }
        // Like QEMU, leave no stale socket file behind.
        if let Some(path) = socket_file {
            let _ = std::fs::remove_file(path);
        }
    });
}

async fn bind(
    id: &str,
    addr: &ChardevAddr,
) -> Result<(Listener, Option<std::path::PathBuf>), ChardevError> {
    let bind_err = |e: std::io::Error| {
        ChardevError::Socket(format!(
            "Failed to bind socket for chardev '{id}': {}",
            crate::util::strerror(&e)
        ))
    };
    Ok(match addr {
        ChardevAddr::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let l = UnixListener::bind(path).map_err(bind_err)?;
            (Listener::Unix(l), Some(path.clone()))
        }
        ChardevAddr::Tcp { host, port } => {
            let l = TcpListener::bind((host.as_str(), *port))
                .await
                .map_err(bind_err)?;
            (Listener::Tcp(l), None)
        }
        ChardevAddr::Fd(text) => (crate::fds::take_listener(text)?, None),
    })
}

/// The listening address as QEMU prints it: the bound address, numeric,
/// with the real port (`tcp:::1:4000` for IPv6, without brackets).
fn listening_text(listener: &Listener) -> String {
    match listener {
        Listener::Tcp(l) => match l.local_addr() {
            Ok(a) => format!("tcp:{}:{}", a.ip(), a.port()),
            Err(_) => "tcp:".into(),
        },
        // Only the NBD server binds inet listeners this way; kept total.
        Listener::Inet(l) => format!("tcp::{}", l.port().unwrap_or(0)),
        Listener::Unix(l) => {
            let path = l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()));
            format!("unix:{}", path.unwrap_or_default())
        }
    }
}

/// A connected TCP chardev as QEMU prints it: `tcp:LOCAL[,server=on] <-> PEER`.
pub fn tcp_connected(s: &tokio::net::TcpStream, server: bool) -> String {
    let show =
        |a: std::io::Result<std::net::SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
    format!(
        "tcp:{}{} <-> {}",
        show(s.local_addr()),
        server_suffix(server),
        show(s.peer_addr())
    )
}
