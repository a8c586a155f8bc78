//! The STARTTLS upgrade of one connection: the TLS handshake, then tls-authz.
//!
//! As in QEMU, authorization is checked once the TLS handshake has completed;
//! a denied client gets no NBD reply: the TLS session is closed and the
//! connection dropped, and the log names the identity that was refused.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::objects::ObjectTable;
use crate::tls::{PeerIdentity, TlsCreds, TlsIo};

/// Upgrades `stream`; `Err` is the reason the client was dropped (for the log).
pub async fn upgrade<S>(
    stream: S,
    creds: &TlsCreds,
    authz: Option<&str>,
    objects: &ObjectTable,
) -> Result<Box<dyn TlsIo>, String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut io, identity) = creds.accept(stream).await.map_err(|e| {
        tracing::warn!(error = %e, "TLS handshake with an NBD client failed");
        e.to_string()
    })?;
    let Some(authz_id) = authz else {
        tracing::debug!(?identity, "TLS client accepted");
        return Ok(io);
    };
    let allowed = match &identity {
        PeerIdentity::X509Dn(name) | PeerIdentity::PskUsername(name) => {
            objects.authorize(authz_id, name)
        }
        // verify-peer=off proves nothing about the client: deny rather than
        // authorize an unverified name.
        PeerIdentity::Anonymous => false,
    };
    if allowed {
        tracing::info!(?identity, authz = authz_id, "TLS client authorized");
        return Ok(io);
    }
    tracing::warn!(
        ?identity,
        authz = authz_id,
        "TLS client denied by tls-authz"
    );
    let _ = io.shutdown().await;
    Err(match identity {
        PeerIdentity::X509Dn(dn) => format!("TLS x509 authz check for {dn} is denied"),
        PeerIdentity::PskUsername(u) => format!("TLS PSK authz check for {u} is denied"),
        PeerIdentity::Anonymous => "TLS authz needs verify-peer=on: client denied".into(),
    })
}
