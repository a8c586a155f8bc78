//! The client handshake (what `driver=nbd` speaks) against arbitrary server
//! bytes delivered in arbitrary splits, with and without TLS and a meta
//! context; then the reply decoders on what follows. Nothing may panic, the
//! client's output must stay bounded, and a `Done` must carry the block size
//! rules the client promises (powers of two, minimum at most 64 KiB).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::client;
use nbd::client_handshake::{ClientConfig, ClientHandshake, ClientStep};
use nbd::types::ReplyType;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut hs = ClientHandshake::new(ClientConfig {
        export: "disk".into(),
        tls: mode & 1 != 0,
        meta_context: (mode & 2 != 0).then(|| "base:allocation".to_string()),
    });
    let mut sent = 0usize;
    let mut pos = 0usize;
    let split = usize::from(mode >> 2).max(1);
    while pos <= rest.len() {
        let end = (pos + split).min(rest.len());
        hs.receive(&rest[pos..end]);
        pos = end;
        let step = hs.advance();
        sent += hs.take_output().len();
        assert!(sent < 64 * 1024, "the client sends a bounded handshake");
        match step {
            Ok(ClientStep::NeedInput) if pos < rest.len() => continue,
            Ok(ClientStep::NeedInput) => break,
            Ok(ClientStep::StartTls) => hs.tls_started(),
            Ok(ClientStep::Done(n)) => {
                if let Some(b) = n.block_size {
                    assert!(b.min.is_power_of_two() && b.min <= 64 * 1024);
                    assert!(b.preferred >= b.min && b.max >= b.min);
                }
                let tail = [hs.take_leftover(), rest[pos..].to_vec()].concat();
                decode_replies(&tail);
                return;
            }
            Err(_) => return,
        }
    }
});

/// Reply headers and chunk payloads as the driver's reader meets them.
fn decode_replies(mut buf: &[u8]) {
    while let Ok(Some((header, used))) = client::decode_reply_header(buf) {
        buf = &buf[used..];
        if let client::ReplyHeader::Chunk { reply_type, length, .. } = header {
            let n = (length as usize).min(buf.len());
            let payload = &buf[..n];
            match reply_type {
                ReplyType::OFFSET_DATA => drop(client::decode_offset_data(payload)),
                ReplyType::OFFSET_HOLE => drop(client::decode_offset_hole(payload)),
                ReplyType::BLOCK_STATUS => drop(client::decode_block_status(payload)),
                t if t.is_error() => drop(client::decode_error(t, payload)),
                _ => {}
            }
            buf = &buf[n..];
        }
    }
}
