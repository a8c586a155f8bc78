//! Where the server is: QEMU's `server` member (SocketAddress inet or unix).

use std::path::PathBuf;

use tokio::net::{TcpStream, UnixStream};

use crate::error::OpenError;
use crate::transport::{strerror, Stream};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerAddr {
    Inet { host: String, port: String },
    Unix(PathBuf),
}

impl std::fmt::Display for ServerAddr {
    /// As QEMU names it in errors: `host:port`, or the socket's path.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Inet { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Self::Inet { host, port } => write!(f, "{host}:{port}"),
            Self::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

impl ServerAddr {
    /// One connection attempt. TCP sockets get TCP_NODELAY: requests are
    /// small and latency-bound, as in QEMU's client.
    pub async fn connect(&self) -> Result<Stream, OpenError> {
        let failed = |e: std::io::Error| OpenError::Connect {
            addr: self.to_string(),
            reason: strerror(&e),
        };
        match self {
            Self::Inet { host, port } => {
                let port: u16 = port.parse().map_err(|_| OpenError::Connect {
                    addr: self.to_string(),
                    reason: format!("Service '{port}' not known"),
                })?;
                let stream = TcpStream::connect((host.as_str(), port))
                    .await
                    .map_err(failed)?;
                stream.set_nodelay(true).map_err(failed)?;
                Ok(Box::new(stream))
            }
            Self::Unix(path) => Ok(Box::new(UnixStream::connect(path).await.map_err(failed)?)),
        }
    }
}
