//! The byte stream a connection runs on: a TCP or unix socket, or TLS over one.

use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// Anything the connection can read and write.
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncStream for T {}

pub type Stream = Box<dyn AsyncStream>;

/// Wraps a connected stream in TLS (after STARTTLS was acknowledged). The
/// daemon implements it from a `tls-creds-x509` or `tls-creds-psk` object;
/// the error is the text `blockdev-add` reports.
pub trait TlsConnect: Send + Sync + Debug + 'static {
    fn connect(
        &self,
        stream: Stream,
    ) -> Pin<Box<dyn Future<Output = Result<Stream, String>> + Send + 'static>>;
}

/// The io error as QEMU prints it (no " (os error N)").
pub(crate) fn strerror(e: &io::Error) -> String {
    block::error::strerror(e)
}
