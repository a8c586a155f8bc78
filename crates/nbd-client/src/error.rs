//! Why a connection could not be opened; the texts are QEMU's.

use nbd::client_handshake::ClientHandshakeError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum OpenError {
    /// `Failed to connect to '127.0.0.1:1': Connection refused`.
    #[error("Failed to connect to '{addr}': {reason}")]
    Connect { addr: String, reason: String },
    #[error("{0}")]
    Handshake(#[from] ClientHandshakeError),
    #[error("Failed to read initial magic: Unexpected end-of-file before all data were read")]
    Eof,
    #[error("{0}")]
    Io(String),
    /// The TLS upgrade failed; the text is whole (QEMU prints GnuTLS's
    /// certificate check failures without a prefix).
    #[error("{0}")]
    Tls(String),
    /// x-dirty-bitmap names a bitmap the export does not offer (QEMU reports EINVAL).
    #[error("Could not open image: Invalid argument")]
    NoSuchBitmap(String),
    #[error("Server has changed the export since it was first opened: {0}")]
    Changed(String),
    #[error("The nbd driver needs the daemon's multi-threaded runtime")]
    NoRuntime,
    #[error("Timed out connecting to '{0}'")]
    Timeout(String),
}
