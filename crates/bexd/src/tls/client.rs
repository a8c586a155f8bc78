//! Client-endpoint TLS credentials, and the TLS upgrade of a `driver=nbd`
//! connection built from them ([`NbdTlsClient`], the nbd-client crate's
//! [`TlsConnect`]).
//!
//! x509 runs on rustls: the server certificate is verified against
//! `ca-cert.pem` (and `ca-crl.pem` when present) and the server name, and
//! `client-cert.pem`/`client-key.pem` are sent when both are there. PSK runs
//! on OpenSSL, as the server side does: the object's `username` picks its
//! key from `keys.psk` when the object is made. Handshake failures print
//! QEMU's (GnuTLS's) texts where scripts look for them.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use nbd_client::{Stream, TlsConnect};
use openssl::ssl::{Ssl, SslContext, SslMethod, SslVersion};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use tokio_openssl::SslStream;
use tokio_rustls::TlsConnector;

use super::psk::{self, PskKey};
use super::x509::{read_ca, read_chain, read_crls};
use super::{must_exist, TlsError};

/// The client side of a `tls-creds-*` object (endpoint=client).
pub enum ClientCreds {
    X509(Arc<ClientConfig>),
    Psk(SslContext),
}

impl std::fmt::Debug for ClientCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::X509(_) => "ClientCreds::X509",
            Self::Psk(_) => "ClientCreds::Psk",
        })
    }
}

impl ClientCreds {
    /// `dir/ca-cert.pem` (required) and the optional client certificate and key.
    pub fn x509(dir: &Path) -> Result<Self, TlsError> {
        let ca = dir.join("ca-cert.pem");
        let cert = dir.join("client-cert.pem");
        let key = dir.join("client-key.pem");
        must_exist(&ca)?;
        let (roots, _) = read_ca(&ca)?;
        let crls = read_crls(&dir.join("ca-crl.pem"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .with_crls(crls)
                .build()
                .map_err(|e| TlsError::Setup(e.to_string()))?;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_webpki_verifier(verifier);
        let config = if cert.exists() {
            must_exist(&key)?;
            let chain = read_chain(&cert)?;
            let key_der = PrivateKeyDer::from_pem_file(&key).map_err(|_| TlsError::CertKey {
                cert: cert.clone(),
                key: key.clone(),
                reason: "The requested data were not available.",
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => TlsError::CertKey {
                        cert,
                        key,
                        reason: "The certificate and the given key do not match.",
                    },
                    other => TlsError::Setup(other.to_string()),
                })?
        } else {
            builder.with_no_client_auth()
        };
        Ok(Self::X509(Arc::new(config)))
    }

    /// `dir/keys.psk`, and the key of `username` in it (QEMU's default user is "qemu").
    pub fn psk(dir: &Path, username: &str) -> Result<Self, TlsError> {
        let file = dir.join("keys.psk");
        let keys = psk::read_keys(&file)?;
        let key = keys
            .into_iter()
            .find(|k| k.username == username)
            .ok_or_else(|| TlsError::NoPskUser {
                username: username.to_string(),
                path: file,
            })?;
        Ok(Self::Psk(psk_context(key)?))
    }
}

fn psk_context(key: PskKey) -> Result<SslContext, TlsError> {
    let setup = |e: openssl::error::ErrorStack| TlsError::Setup(e.to_string());
    let mut b = SslContext::builder(SslMethod::tls_client()).map_err(setup)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(setup)?;
    b.set_cipher_list(psk::TLS12_PSK_CIPHERS).map_err(setup)?;
    b.set_psk_client_callback(move |_ssl, _hint, identity, out| {
        let name = key.username.as_bytes();
        // The identity is a C string: it needs room for the terminating NUL.
        if name.len() >= identity.len() || key.key().len() > out.len() {
            return Ok(0);
        }
        identity[..name.len()].copy_from_slice(name);
        identity[name.len()] = 0;
        out[..key.key().len()].copy_from_slice(key.key());
        Ok(key.key().len())
    });
    Ok(b.build())
}

/// A `driver=nbd` node's TLS: its credentials and the name the server's
/// certificate must carry (`tls-hostname`, else the inet server's host).
#[derive(Debug)]
pub struct NbdTlsClient {
    creds: Arc<ClientCreds>,
    hostname: Option<String>,
}

impl NbdTlsClient {
    pub fn new(creds: Arc<ClientCreds>, hostname: Option<String>) -> Self {
        Self { creds, hostname }
    }
}

impl TlsConnect for NbdTlsClient {
    fn connect(
        &self,
        stream: Stream,
    ) -> Pin<Box<dyn Future<Output = Result<Stream, String>> + Send + 'static>> {
        let creds = self.creds.clone();
        let hostname = self.hostname.clone();
        Box::pin(async move {
            match &*creds {
                ClientCreds::X509(config) => x509_connect(config, hostname, stream).await,
                ClientCreds::Psk(context) => psk_connect(context, stream).await,
            }
        })
    }
}

async fn x509_connect(
    config: &Arc<ClientConfig>,
    hostname: Option<String>,
    stream: Stream,
) -> Result<Stream, String> {
    // QEMU refuses rather than accept any name the CA signed (a unix socket
    // without tls-hostname).
    let hostname = hostname.ok_or("No hostname for certificate validation")?;
    let name = ServerName::try_from(hostname.clone())
        .map_err(|_| format!("Certificate does not match the hostname {hostname}"))?;
    let connector = TlsConnector::from(config.clone());
    match connector.connect(name, stream).await {
        Ok(tls) => Ok(Box::new(tls)),
        Err(e) => Err(x509_failure(&e, &hostname)),
    }
}

/// GnuTLS's texts for the certificate checks QEMU's client makes.
fn x509_failure(e: &std::io::Error, hostname: &str) -> String {
    let rustls_error = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                "The certificate hasn't got a known issuer".into()
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("Certificate does not match the hostname {hostname}")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "The certificate has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "The certificate is not yet activated".into()
            }
            CertificateError::Revoked => "The certificate has been revoked".into(),
            other => format!("TLS handshake failed: {other:?}"),
        },
        _ => format!("TLS handshake failed: {}", block::error::strerror(e)),
    }
}

async fn psk_connect(context: &SslContext, stream: Stream) -> Result<Stream, String> {
    let failed = |e: &dyn std::fmt::Display| format!("TLS handshake failed: {e}");
    let ssl = Ssl::new(context).map_err(|e| failed(&e))?;
    let mut tls = SslStream::new(ssl, stream).map_err(|e| failed(&e))?;
    Pin::new(&mut tls).connect().await.map_err(|e| failed(&e))?;
    Ok(Box::new(tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_psk_client_picks_the_username_s_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keys.psk"), "alice:00ff\nbob:0102\n").unwrap();
        assert!(matches!(
            ClientCreds::psk(dir.path(), "bob"),
            Ok(ClientCreds::Psk(_))
        ));
        let e = ClientCreds::psk(dir.path(), "qemu")
            .unwrap_err()
            .to_string();
        let file = dir.path().join("keys.psk");
        assert_eq!(
            e,
            format!("Username qemu not found in PSK file {}", file.display())
        );
    }

    #[test]
    fn test_x509_client_needs_the_ca_and_a_key_with_its_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let e = ClientCreds::x509(dir.path()).unwrap_err().to_string();
        assert!(e.starts_with("Unable to access credentials "), "{e}");
        assert!(e.ends_with("ca-cert.pem: No such file or directory"), "{e}");
        std::fs::write(dir.path().join("ca-cert.pem"), "not a certificate").unwrap();
        let e = ClientCreds::x509(dir.path()).unwrap_err().to_string();
        assert!(e.starts_with("Unable to import CA certificate list"), "{e}");
    }
}
