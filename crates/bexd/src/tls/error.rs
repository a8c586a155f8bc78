//! Why credentials could not be loaded, and why a client's TLS handshake failed.
//! Load errors print QEMU's texts, so scripts see the same messages.

use std::path::PathBuf;

use thiserror::Error;

/// Loading a `tls-creds-*` object failed.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("Missing 'dir' property value")]
    MissingDir,
    #[error("Unable to access credentials {}: {reason}", path.display())]
    Access { path: PathBuf, reason: String },
    #[error("Unable to import CA certificate list {}", path.display())]
    BadCa { path: PathBuf },
    #[error("Unable to import server certificate {}: {reason}", path.display())]
    BadCert { path: PathBuf, reason: String },
    #[error("Cannot load certificate '{}' & key '{}': {reason}", cert.display(), key.display())]
    CertKey {
        cert: PathBuf,
        key: PathBuf,
        reason: &'static str,
    },
    /// `role` is "server" or "CA", as in QEMU's text.
    #[error("The {role} certificate {} has expired", path.display())]
    Expired { role: &'static str, path: PathBuf },
    #[error("The {role} certificate {} is not yet active", path.display())]
    NotYetActive { role: &'static str, path: PathBuf },
    #[error("Unable to read PSK keys file {}: {reason}", path.display())]
    PskFile { path: PathBuf, reason: String },
    /// A client-endpoint PSK object's `username` has no line in the file.
    #[error("Username {username} not found in PSK file {}", path.display())]
    NoPskUser { username: String, path: PathBuf },
    #[error("Encrypted private keys (passwordid) are not supported by bexd")]
    EncryptedKeysUnsupported,
    #[error("Unable to set up TLS: {0}")]
    Setup(String),
}

/// One client's TLS handshake failed; the connection is dropped and logged.
/// None of these carry key material.
#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("the client presented no certificate")]
    NoCertificate,
    #[error("the client certificate cannot be parsed: {0}")]
    BadPeerCertificate(String),
    #[error("the TLS credentials are not for a server endpoint")]
    NotServerCreds,
}
