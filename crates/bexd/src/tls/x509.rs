//! `tls-creds-x509` for a server endpoint, on rustls.
//!
//! QEMU's directory layout: `ca-cert.pem` (required), `ca-crl.pem` (optional),
//! `server-cert.pem` and `server-key.pem` (required), `dh-params.pem` (optional:
//! rustls only offers ECDHE key exchange, so it is not needed and not read).
//! With verify-peer=on (the default) a client certificate signed by the CA is
//! required; with verify-peer=off none is asked for, as GnuTLS does in QEMU.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;

use super::{must_exist, HandshakeError, PeerIdentity, TlsError, TlsIo};

pub struct X509Server {
    acceptor: TlsAcceptor,
    verify_peer: bool,
}

impl X509Server {
    pub fn load(dir: &Path, verify_peer: bool, sanity_check: bool) -> Result<Self, TlsError> {
        let ca = dir.join("ca-cert.pem");
        let crl = dir.join("ca-crl.pem");
        let cert = dir.join("server-cert.pem");
        let key = dir.join("server-key.pem");
        must_exist(&ca)?;
        must_exist(&cert)?;
        must_exist(&key)?;
        let (roots, ca_certs) = read_ca(&ca)?;
        let chain = read_chain(&cert)?;
        if sanity_check {
            for c in &ca_certs {
                check_times(c, &ca, "CA")?;
            }
            check_times(&chain[0], &cert, "server")?;
        }
        let key_der = PrivateKeyDer::from_pem_file(&key).map_err(|_| TlsError::CertKey {
            cert: cert.clone(),
            key: key.clone(),
            reason: "The requested data were not available.",
        })?;
        let crls = read_crls(&crl)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        let builder = if verify_peer {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .with_crls(crls)
                .build()
                .map_err(|e| TlsError::Setup(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(chain, key_der)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => TlsError::CertKey {
                    cert,
                    key,
                    reason: "The certificate and the given key do not match.",
                },
                other => TlsError::Setup(other.to_string()),
            })?;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            verify_peer,
        })
    }

    /// The handshake; with verify-peer the identity is the verified certificate's DN.
    pub async fn accept<S>(
        &self,
        stream: S,
    ) -> Result<(Box<dyn TlsIo>, PeerIdentity), HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let tls = self
            .acceptor
            .accept(stream)
            .await
            .map_err(|e| HandshakeError::Tls(e.to_string()))?;
        let identity = if self.verify_peer {
            let certs = tls.get_ref().1.peer_certificates();
            let first = certs
                .and_then(|c| c.first())
                .ok_or(HandshakeError::NoCertificate)?;
            PeerIdentity::X509Dn(super::dn::dn_of_certificate(first)?)
        } else {
            PeerIdentity::Anonymous
        };
        Ok((Box::new(tls), identity))
    }
}

/// The trust anchors, and the certificates they came from (for sanity-check).
pub(super) type CaCerts = (RootCertStore, Vec<CertificateDer<'static>>);

pub(super) fn read_ca(path: &Path) -> Result<CaCerts, TlsError> {
    let bad = || TlsError::BadCa {
        path: path.to_path_buf(),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|_| bad())?
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    if certs.is_empty() {
        return Err(bad());
    }
    let mut roots = RootCertStore::empty();
    for c in &certs {
        roots.add(c.clone()).map_err(|_| bad())?;
    }
    Ok((roots, certs))
}

pub(super) fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: &str| TlsError::BadCert {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&e.to_string()))?;
    if chain.is_empty() {
        return Err(bad("Base64 unexpected header error."));
    }
    Ok(chain)
}

/// The optional revocation list; absent means none.
pub(super) fn read_crls(
    path: &PathBuf,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let bad = |e: rustls_pki_types::pem::Error| {
        TlsError::Setup(format!("Unable to import CRL {}: {e}", path.display()))
    };
    CertificateRevocationListDer::pem_file_iter(path)
        .map_err(bad)?
        .collect::<Result<_, _>>()
        .map_err(bad)
}

/// sanity-check=on: refuse a server or CA certificate outside its validity
/// period now, rather than have every client refuse it later.
fn check_times(cert: &CertificateDer<'_>, path: &Path, role: &'static str) -> Result<(), TlsError> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Err(TlsError::BadCert {
            path: path.to_path_buf(),
            reason: "ASN1 parser: Error in DER parsing.".into(),
        });
    };
    let now = x509_parser::time::ASN1Time::now();
    let validity = parsed.validity();
    if now < validity.not_before {
        return Err(TlsError::NotYetActive {
            role,
            path: path.to_path_buf(),
        });
    }
    if now > validity.not_after {
        return Err(TlsError::Expired {
            role,
            path: path.to_path_buf(),
        });
    }
    Ok(())
}
