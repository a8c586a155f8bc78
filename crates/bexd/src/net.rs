//! Listening sockets of either family, shared by the NBD server and the QMP
//! monitors (each binds its own addresses; this is only the accept side).

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

pub mod abstract_unix;
pub mod inet;

/// Opens once, when start-up is complete. Listeners are bound as their
/// option is applied (so errors name the option, and a client that connects
/// early waits in the listen backlog), but accept only once the gate is open:
/// as with qemu-storage-daemon, whose main loop runs only after the whole
/// command line, no client is served before every `--export` is in place.
#[derive(Clone, Debug, Default)]
pub struct StartGate(CancellationToken);

impl StartGate {
    /// A gate that is still closed.
    pub fn closed() -> Self {
        Self::default()
    }

    /// A gate already open (a server started after start-up, or in a test).
    pub fn opened() -> Self {
        let gate = Self::default();
        gate.open();
        gate
    }

    pub fn open(&self) {
        self.0.cancel();
    }

    /// Resolves once the gate is open (at once if it is).
    pub async fn wait(&self) {
        self.0.cancelled().await
    }
}

/// A bound listening socket of either family.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// The NBD server's inet listener: every resolved address (see `inet.rs`).
    Inet(inet::InetListener),
    Unix(UnixListener),
}

/// An accepted client socket.
#[derive(Debug)]
pub enum ClientStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Listener {
    /// The TCP port really bound (a requested port 0 resolved), if TCP.
    pub fn tcp_port(&self) -> Option<u16> {
        match self {
            Self::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Self::Inet(l) => l.port(),
            Self::Unix(_) => None,
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
            Self::Inet(l) => {
                let s = l.accept().await?;
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
