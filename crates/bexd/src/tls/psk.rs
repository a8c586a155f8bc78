//! `tls-creds-psk` for a server endpoint, on OpenSSL (rustls has no external
//! PSK support). `keys.psk` is GnuTLS's `username:hexkey` file; the key for the
//! username the client names is handed to OpenSSL's PSK callback, and the
//! username becomes the connection's identity for `tls-authz`.
//!
//! TLS 1.3 (psk_dhe_ke) and TLS 1.2 ECDHE-PSK are offered, so the key
//! exchange is always forward secret. Keys are never logged.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use openssl::ex_data::Index;
use openssl::ssl::{Ssl, SslContext, SslMethod, SslVersion};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_openssl::SslStream;

use super::{must_exist, HandshakeError, PeerIdentity, TlsError, TlsIo};

/// TLS 1.2: only forward-secret PSK key exchanges (both ends offer these).
pub const TLS12_PSK_CIPHERS: &str =
    "ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES256-CBC-SHA384:ECDHE-PSK-AES128-CBC-SHA256";

/// One `username:hexkey` line.
pub struct PskKey {
    pub username: String,
    key: Vec<u8>,
}

impl PskKey {
    pub fn key(&self) -> &[u8] {
        &self.key
    }
}

/// Names the user, never the key.
impl std::fmt::Debug for PskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PskKey")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Reads and checks every line now, so a broken file fails at object creation.
pub fn read_keys(path: &Path) -> Result<Vec<PskKey>, TlsError> {
    must_exist(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| TlsError::PskFile {
        path: path.to_path_buf(),
        reason: crate::util::strerror(&e),
    })?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| TlsError::PskFile {
            path: path.to_path_buf(),
            reason: format!("line {}: {what}", n + 1),
        };
        let (username, hex) = line.split_once(':').ok_or_else(|| bad("no ':'"))?;
        let key = decode_hex(hex.trim()).ok_or_else(|| bad("the key is not hex"))?;
        if username.is_empty() || key.is_empty() {
            return Err(bad("empty username or key"));
        }
        keys.push(PskKey {
            username: username.to_string(),
            key,
        });
    }
    Ok(keys)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

pub struct PskServer {
    context: SslContext,
    /// Where the PSK callback leaves the username it found a key for.
    username_slot: Index<Ssl, String>,
}

impl PskServer {
    pub fn new(keys: Vec<PskKey>) -> Result<Self, TlsError> {
        let setup = |e: openssl::error::ErrorStack| TlsError::Setup(e.to_string());
        let username_slot = Ssl::new_ex_index::<String>().map_err(setup)?;
        let keys = Arc::new(keys);
        let mut b = SslContext::builder(SslMethod::tls_server()).map_err(setup)?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(setup)?;
        // TLS 1.3 suites stay default.
        b.set_cipher_list(TLS12_PSK_CIPHERS).map_err(setup)?;
        b.set_psk_server_callback(move |ssl, identity, out| {
            let Some(found) = identity
                .and_then(|id| std::str::from_utf8(id).ok())
                .and_then(|id| keys.iter().find(|k| k.username == id))
            else {
                return Ok(0);
            };
            if found.key.len() > out.len() {
                return Ok(0);
            }
            out[..found.key.len()].copy_from_slice(&found.key);
            ssl.set_ex_data(username_slot, found.username.clone());
            Ok(found.key.len())
        });
        Ok(Self {
            context: b.build(),
            username_slot,
        })
    }

    pub async fn accept<S>(
        &self,
        stream: S,
    ) -> Result<(Box<dyn TlsIo>, PeerIdentity), HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let tls_err = |e: &dyn std::fmt::Display| HandshakeError::Tls(e.to_string());
        let ssl = Ssl::new(&self.context).map_err(|e| tls_err(&e))?;
        let mut tls = SslStream::new(ssl, stream).map_err(|e| tls_err(&e))?;
        Pin::new(&mut tls).accept().await.map_err(|e| tls_err(&e))?;
        let username = tls
            .ssl()
            .ex_data(self.username_slot)
            .cloned()
            .ok_or_else(|| HandshakeError::Tls("no PSK username was agreed".into()))?;
        Ok((Box::new(tls), PeerIdentity::PskUsername(username)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_keys_file_lines_are_parsed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.psk");
        std::fs::write(&path, "alice:0a0B\n\nbob:ff\n").unwrap();
        let keys = read_keys(&path).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].username, "alice");
        assert_eq!(keys[0].key, vec![0x0a, 0x0b]);
        std::fs::write(&path, "carol:xyz\n").unwrap();
        let e = read_keys(&path).unwrap_err().to_string();
        assert!(e.contains("line 1: the key is not hex"), "{e}");
        assert!(!e.contains("xyz"), "the key must not be printed: {e}");
    }

    #[test]
    fn test_hex_rejects_odd_length_and_non_ascii() {
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("é1"), None);
        assert_eq!(decode_hex(""), Some(vec![]));
    }
}
