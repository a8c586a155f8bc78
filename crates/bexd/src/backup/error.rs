//! What can go wrong in a backup.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BackupError {
    #[error("{0}")]
    Usage(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    #[error("server error: {0}")]
    Server(String),
    #[error("the export has no meta context '{0}' (is the bitmap exported?)")]
    NoContext(String),
    #[error("verify failed: {0} differs from the source")]
    Verify(String),
    #[error("TLS: {0}")]
    Tls(String),
    /// A QMP step of a live backup: what was done, and the daemon's answer.
    #[error("{0}")]
    Qmp(String),
}
