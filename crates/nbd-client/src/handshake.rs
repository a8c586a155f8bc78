//! Drives the `nbd` crate's client handshake over a stream.

use std::sync::Arc;

use nbd::client_handshake::{ClientConfig, ClientHandshake, ClientNegotiated, ClientStep};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::OpenError;
use crate::transport::{strerror, Stream, TlsConnect};

/// Negotiates `config` on `stream`; returns the stream (TLS-wrapped if asked) and the outcome.
pub(crate) async fn negotiate(
    mut stream: Stream,
    config: ClientConfig,
    tls: Option<&Arc<dyn TlsConnect>>,
) -> Result<(Stream, ClientNegotiated), OpenError> {
    let mut hs = ClientHandshake::new(config);
    let mut buf = vec![0u8; 4096];
    loop {
        let step = hs.advance();
        let out = hs.take_output();
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(io)?;
        }
        match step? {
            ClientStep::NeedInput => {
                let n = stream.read(&mut buf).await.map_err(io)?;
                if n == 0 {
                    return Err(OpenError::Eof);
                }
                hs.receive(&buf[..n]);
            }
            ClientStep::StartTls => {
                let Some(tls) = tls else {
                    return Err(OpenError::Tls(
                        "TLS handshake failed: no credentials".into(),
                    ));
                };
                stream = tls.connect(stream).await.map_err(OpenError::Tls)?;
                hs.tls_started();
            }
            ClientStep::Done(negotiated) => return Ok((stream, negotiated)),
        }
    }
}

fn io(e: std::io::Error) -> OpenError {
    OpenError::Io(strerror(&e))
}
