//! TLS credentials objects (`tls-creds-x509`, `tls-creds-psk`) and the server
//! side of an NBD connection's TLS upgrade.
//!
//! x509 runs on rustls. PSK runs on OpenSSL, because rustls has no external
//! pre-shared-key support (rustls issue #174); see docs/architecture.md.
//! An upgraded connection is a boxed [`TlsIo`] plus the identity the
//! `tls-authz` object is asked about: the client certificate's DN, printed as
//! GnuTLS prints it (so QEMU's authz rules work unchanged), or the PSK username.

mod dn;
mod error;
mod psk;
mod x509;

pub use dn::gnutls_dn;
pub use error::{HandshakeError, TlsError};

use std::path::{Path, PathBuf};

use qmp::schema::object::{QCryptoTLSCredsEndpoint, TlsCredsCommon};
use tokio::io::{AsyncRead, AsyncWrite};

/// A TLS stream after the handshake; the transmission phase splits it.
pub trait TlsIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> TlsIo for T {}

/// What the TLS handshake proved about the client, for `tls-authz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// The verified client certificate's distinguished name (GnuTLS format).
    X509Dn(String),
    /// The PSK username whose key the client proved it holds.
    PskUsername(String),
    /// verify-peer=off: no certificate was asked for, so nobody is identified.
    Anonymous,
}

/// A `tls-creds-*` object. Keys inside are never printed (`Debug` omits them).
pub struct TlsCreds {
    pub endpoint: QCryptoTLSCredsEndpoint,
    /// `None` for client-endpoint objects: bexd accepts them (QEMU does) but
    /// only a server endpoint can be used by the NBD server.
    server: Option<ServerCreds>,
}

enum ServerCreds {
    X509(x509::X509Server),
    Psk(psk::PskServer),
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.server {
            Some(ServerCreds::X509(_)) => "x509 server",
            Some(ServerCreds::Psk(_)) => "psk server",
            None => "client",
        };
        f.debug_struct("TlsCreds").field("kind", &kind).finish()
    }
}

impl TlsCreds {
    /// Loads `tls-creds-x509` from its directory, with QEMU's checks and error texts.
    pub fn x509(
        common: &TlsCredsCommon,
        sanity_check: bool,
        passwordid: Option<&str>,
    ) -> Result<Self, TlsError> {
        if passwordid.is_some() {
            return Err(TlsError::EncryptedKeysUnsupported);
        }
        let dir = creds_dir(common)?;
        let endpoint = common.endpoint.unwrap_or(QCryptoTLSCredsEndpoint::Client);
        let server = match endpoint {
            QCryptoTLSCredsEndpoint::Server => {
                let verify_peer = common.verify_peer.unwrap_or(true);
                Some(ServerCreds::X509(x509::X509Server::load(
                    &dir,
                    verify_peer,
                    sanity_check,
                )?))
            }
            QCryptoTLSCredsEndpoint::Client => {
                must_exist(&dir.join("ca-cert.pem"))?;
                None
            }
        };
        Ok(Self { endpoint, server })
    }

    /// Loads `tls-creds-psk`: `dir/keys.psk` holds `username:hexkey` lines.
    pub fn psk(common: &TlsCredsCommon, username: Option<&str>) -> Result<Self, TlsError> {
        let dir = creds_dir(common)?;
        let endpoint = common.endpoint.unwrap_or(QCryptoTLSCredsEndpoint::Client);
        let file = dir.join("keys.psk");
        // The username is what a client endpoint sends; a server looks the
        // client's username up in the file instead.
        let _ = username;
        let server = match endpoint {
            QCryptoTLSCredsEndpoint::Server => {
                let keys = psk::read_keys(&file)?;
                Some(ServerCreds::Psk(psk::PskServer::new(keys)?))
            }
            QCryptoTLSCredsEndpoint::Client => {
                must_exist(&file)?;
                None
            }
        };
        Ok(Self { endpoint, server })
    }

    pub fn is_server(&self) -> bool {
        self.server.is_some()
    }

    /// Runs the server side of the TLS handshake on `stream`.
    pub async fn accept<S>(
        &self,
        stream: S,
    ) -> Result<(Box<dyn TlsIo>, PeerIdentity), HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        match &self.server {
            Some(ServerCreds::X509(x)) => x.accept(stream).await,
            Some(ServerCreds::Psk(p)) => p.accept(stream).await,
            None => Err(HandshakeError::NotServerCreds),
        }
    }
}

fn creds_dir(common: &TlsCredsCommon) -> Result<PathBuf, TlsError> {
    common
        .dir
        .as_deref()
        .map(PathBuf::from)
        .ok_or(TlsError::MissingDir)
}

/// QEMU checks that each required file is accessible before parsing any.
fn must_exist(path: &Path) -> Result<(), TlsError> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| TlsError::Access {
            path: path.to_path_buf(),
            reason: crate::util::strerror(&e),
        })
}
