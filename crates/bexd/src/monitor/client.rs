//! A monitor on a client-mode socket chardev (`server=off`): bexd connects
//! out to a listening peer (a management tool that waits for its daemons).
//! Without `reconnect` a failed first connect is an error and a lost peer
//! stays lost; with it, bexd retries every period, as QEMU does, reporting
//! only the first failure.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};

use super::listen::tcp_connected;
use super::scm::ScmStream;
use super::{serve_client, started};
use crate::chardevs::{addr_text, disconnected, Chardev, Opened};
use crate::commands::Executor;
use crate::config::{ChardevAddr, SocketChardev};
use crate::error::ChardevError;
use crate::fds::MonitorFds;
use crate::net::ClientStream;

/// Connects when the chardev is created, as QEMU does: an error without
/// `reconnect` fails the option.
pub async fn open(chardev: &Chardev, socket: &SocketChardev) -> Result<Opened, ChardevError> {
    match (connect(&socket.addr).await, socket.reconnect) {
        (Ok(s), _) => {
            chardev.set_filename(connected_text(&s, &socket.addr));
            Ok(Opened::Connecting(Some(s)))
        }
        (Err(e), None) => Err(ChardevError::Socket(e)),
        (Err(e), Some(_)) => {
            tracing::warn!("Unable to connect character device {}: {e}", chardev.id());
            Ok(Opened::Connecting(None))
        }
    }
}

/// Serves the connection once start-up is complete, then reconnects (if
/// asked to) whenever the peer goes.
pub fn serve(
    exec: &Executor,
    chardev: Arc<Chardev>,
    socket: &SocketChardev,
    first: Option<ClientStream>,
    fds: Arc<MonitorFds>,
    pretty: bool,
) {
    let addr = socket.addr.clone();
    let reconnect = socket.reconnect;
    let exec = exec.clone();
    exec.tasks().clone().spawn(async move {
        let shutdown = exec.shutdown();
        if !started(&exec).await {
            return;
        }
        let idle = disconnected(&addr_text(&addr), false);
        let mut stream = first;
        loop {
            match stream.take() {
                Some(s) => serve_one(s, &addr, &chardev, &exec, &fds, pretty).await,
                None if reconnect.is_none() => return,
                None => {}
            }
            chardev.set_filename(idle.clone());
            let Some(period) = reconnect else { return };
            stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                s = retry(&addr, period) => Some(s),
            };
        }
    });
}

/// A connected client chardev as QEMU prints it.
fn connected_text(s: &ClientStream, addr: &ChardevAddr) -> String {
    match s {
        ClientStream::Tcp(s) => tcp_connected(s, false),
        ClientStream::Unix(_) => addr_text(addr),
    }
}

async fn serve_one(
    stream: ClientStream,
    addr: &ChardevAddr,
    chardev: &Chardev,
    exec: &Executor,
    fds: &Arc<MonitorFds>,
    pretty: bool,
) {
    chardev.set_filename(connected_text(&stream, addr));
    match stream {
        ClientStream::Tcp(s) => serve_client(s, exec, fds, pretty).await,
        ClientStream::Unix(s) => serve_client(ScmStream::new(s), exec, fds, pretty).await,
    }
}

/// Connects every `period` until a peer answers.
async fn retry(addr: &ChardevAddr, period: Duration) -> ClientStream {
    loop {
        tokio::time::sleep(period).await;
        if let Ok(s) = connect(addr).await {
            return s;
        }
    }
}

/// One connection attempt; the error is QEMU's text.
async fn connect(addr: &ChardevAddr) -> Result<ClientStream, String> {
    let failed = |what: String, e: std::io::Error| {
        format!(
            "Failed to connect to '{what}': {}",
            crate::util::strerror(&e)
        )
    };
    match addr {
        ChardevAddr::Unix(path) => UnixStream::connect(path)
            .await
            .map(ClientStream::Unix)
            .map_err(|e| failed(path.display().to_string(), e)),
        ChardevAddr::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(|e| failed(format!("{host}:{port}"), e))?;
            let _ = s.set_nodelay(true);
            Ok(ClientStream::Tcp(s))
        }
        ChardevAddr::Fd(_) => Err("a descriptor chardev cannot connect".into()),
    }
}
