//! Arbitrary client bytes, delivered in arbitrary splits, against the server
//! handshake: it must never panic and its output must stay bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::export::{BlockSize, ExportCatalog, ExportInfo, MetaContext};
use nbd::handshake::{HandshakeConfig, HandshakeStatus, ServerHandshake, TlsMode};

struct OneExport;

impl ExportCatalog for OneExport {
    fn list(&self) -> Vec<(String, Option<String>)> {
        vec![("disk".into(), Some("a disk".into()))]
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (name == "disk").then(|| ExportInfo {
            name: "disk".into(),
            description: Some("a disk".into()),
            size: 1 << 30,
            read_only: false,
            can_trim: true,
            can_write_zeroes: true,
            can_fast_zero: true,
            can_multi_conn: true,
            can_cache: true,
            block_size: BlockSize { min: 1, preferred: 4096, max: 32 << 20 },
            meta_contexts: vec![MetaContext::BaseAllocation, MetaContext::DirtyBitmap("b0".into())],
        })
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let tls = if mode & 1 == 0 { TlsMode::None } else { TlsMode::Required };
    let mut hs = ServerHandshake::new(HandshakeConfig { tls });
    let split = usize::from(mode >> 1).max(1);
    for piece in rest.chunks(split) {
        hs.receive(piece);
        match hs.advance(&OneExport) {
            Ok(HandshakeStatus::NeedInput) => {}
            Ok(HandshakeStatus::StartTls) => hs.tls_established(),
            Ok(HandshakeStatus::Done(_)) | Ok(HandshakeStatus::Closed) | Err(_) => break,
        }
        assert!(hs.take_output().len() < 16 << 20, "unbounded handshake output");
    }
    let _ = hs.take_leftover();
});
