//! TLS credentials objects (`tls-creds-x509`, `tls-creds-psk`) and the server
//! two sides of an NBD connection's TLS upgrade: the server's (the NBD
//! server) and the client's (`driver=nbd` nodes, [`NbdTlsClient`]).
//!
//! x509 runs on rustls. PSK runs on OpenSSL, because rustls has no external
//! pre-shared-key support (rustls issue #174); see docs/architecture.md.
//! An upgraded connection is a boxed [`TlsIo`] plus the identity the
//! `tls-authz` object is asked about: the client certificate's DN, printed as
//! GnuTLS prints it (so QEMU's authz rules work unchanged), or the PSK username.

mod client;
mod dn;
mod error;
mod psk;
mod x509;

pub use client::{ClientCreds, NbdTlsClient};
pub use dn::gnutls_dn;
pub use error::{HandshakeError, TlsError};

use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    endpoint: Endpoint,
}

/// The NBD server takes only server-endpoint objects, `driver=nbd` only client ones.
enum Endpoint {
    Server(ServerCreds),
    Client(Arc<ClientCreds>),
}

enum ServerCreds {
    X509(x509::X509Server),
    Psk(psk::PskServer),
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.endpoint {
            Endpoint::Server(ServerCreds::X509(_)) => "x509 server",
            Endpoint::Server(ServerCreds::Psk(_)) => "psk server",
            Endpoint::Client(c) => match **c {
                ClientCreds::X509(_) => "x509 client",
                ClientCreds::Psk(_) => "psk client",
            },
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
        let endpoint = match endpoint {
            QCryptoTLSCredsEndpoint::Server => {
                let verify_peer = common.verify_peer.unwrap_or(true);
                Endpoint::Server(ServerCreds::X509(x509::X509Server::load(
                    &dir,
                    verify_peer,
                    sanity_check,
                )?))
            }
            QCryptoTLSCredsEndpoint::Client => Endpoint::Client(Arc::new(ClientCreds::x509(&dir)?)),
        };
        Ok(Self { endpoint })
    }

    /// Loads `tls-creds-psk`: `dir/keys.psk` holds `username:hexkey` lines.
    /// `username` is what a client endpoint sends (QEMU's default: "qemu");
    /// a server looks the client's username up in the file instead.
    pub fn psk(common: &TlsCredsCommon, username: Option<&str>) -> Result<Self, TlsError> {
        let dir = creds_dir(common)?;
        let endpoint = common.endpoint.unwrap_or(QCryptoTLSCredsEndpoint::Client);
        let file = dir.join("keys.psk");
        let endpoint = match endpoint {
            QCryptoTLSCredsEndpoint::Server => {
                let keys = psk::read_keys(&file)?;
                Endpoint::Server(ServerCreds::Psk(psk::PskServer::new(keys)?))
            }
            QCryptoTLSCredsEndpoint::Client => Endpoint::Client(Arc::new(ClientCreds::psk(
                &dir,
                username.unwrap_or("qemu"),
            )?)),
        };
        Ok(Self { endpoint })
    }

    pub fn is_server(&self) -> bool {
        matches!(self.endpoint, Endpoint::Server(_))
    }

    /// The client side, for a `driver=nbd` node; `None` for a server endpoint.
    pub fn client(&self) -> Option<Arc<ClientCreds>> {
        match &self.endpoint {
            Endpoint::Client(c) => Some(c.clone()),
            Endpoint::Server(_) => None,
        }
    }

    /// Runs the server side of the TLS handshake on `stream`.
    pub async fn accept<S>(
        &self,
        stream: S,
    ) -> Result<(Box<dyn TlsIo>, PeerIdentity), HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        match &self.endpoint {
            Endpoint::Server(ServerCreds::X509(x)) => x.accept(stream).await,
            Endpoint::Server(ServerCreds::Psk(p)) => p.accept(stream).await,
            Endpoint::Client(_) => Err(HandshakeError::NotServerCreds),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn common(dir: &Path, endpoint: QCryptoTLSCredsEndpoint) -> TlsCredsCommon {
        TlsCredsCommon {
            verify_peer: None,
            dir: Some(dir.display().to_string()),
            endpoint: Some(endpoint),
            priority: None,
        }
    }

    #[test]
    fn test_psk_server_creds_debug_prints_no_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = "00112233445566778899aabbccddeeff";
        std::fs::write(dir.path().join("keys.psk"), format!("alice:{key}\n")).unwrap();
        let creds =
            TlsCreds::psk(&common(dir.path(), QCryptoTLSCredsEndpoint::Server), None).unwrap();
        assert!(creds.is_server());
        let shown = format!("{creds:?}");
        assert!(!shown.contains(key) && !shown.contains("alice"), "{shown}");
    }

    #[test]
    fn test_missing_dir_and_files_are_named_like_qemu() {
        let mut c = common(Path::new("/nonexistent"), QCryptoTLSCredsEndpoint::Server);
        let e = TlsCreds::x509(&c, true, None).unwrap_err().to_string();
        assert_eq!(
            e,
            "Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory"
        );
        c.dir = None;
        let e = TlsCreds::psk(&c, None).unwrap_err().to_string();
        assert_eq!(e, "Missing 'dir' property value");
    }

    #[test]
    fn test_client_endpoint_creds_are_not_server_creds() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keys.psk"), "qemu:00ff\n").unwrap();
        let creds =
            TlsCreds::psk(&common(dir.path(), QCryptoTLSCredsEndpoint::Client), None).unwrap();
        assert!(!creds.is_server());
        assert!(creds.client().is_some());
    }
}
