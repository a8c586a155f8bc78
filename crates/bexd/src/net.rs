//! Listening sockets of either family, shared by the NBD server and the QMP
//! monitors (each binds its own addresses; this is only the accept side).

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// A bound listening socket of either family.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
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
            Self::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok(ClientStream::Unix(s))
            }
        }
    }
}
