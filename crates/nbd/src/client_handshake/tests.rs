//! The client handshake driven against this crate's own server handshake in
//! memory, and against hand-made server bytes for what that server never sends.

use super::*;
use crate::export::tests::writable_export;
use crate::export::{ExportCatalog, ExportInfo};
use crate::handshake::{HandshakeConfig, HandshakeStatus, ServerHandshake, TlsMode};

struct Catalog;

impl ExportCatalog for Catalog {
    fn list(&self) -> Vec<(String, Option<String>)> {
        vec![("disk".into(), None)]
    }
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (name == "disk").then(writable_export)
    }
}

fn config(export: &str, meta: Option<&str>) -> ClientConfig {
    ClientConfig {
        export: export.into(),
        tls: false,
        meta_context: meta.map(str::to_string),
    }
}

/// Runs both sides until the client stops; returns its last answer.
fn converse(
    client: &mut ClientHandshake,
    server: &mut ServerHandshake,
) -> Result<ClientStep, ClientHandshakeError> {
    for _ in 0..64 {
        client.receive(&server.take_output());
        let step = client.advance()?;
        let out = client.take_output();
        if out.is_empty() && step != ClientStep::NeedInput {
            return Ok(step);
        }
        server.receive(&out);
        match server.advance(&Catalog) {
            Ok(HandshakeStatus::StartTls) => server.tls_established(),
            Ok(_) => {}
            Err(_) => {
                client.receive(&server.take_output());
                return client.advance();
            }
        }
    }
    panic!("the handshake did not settle");
}

#[test]
fn test_handshake_when_export_exists_returns_size_flags_and_block_size() {
    let mut client = ClientHandshake::new(config("disk", None));
    let mut server = ServerHandshake::new(HandshakeConfig { tls: TlsMode::None });
    let ClientStep::Done(n) = converse(&mut client, &mut server).unwrap() else {
        panic!("not done");
    };
    let e = writable_export();
    assert_eq!(n.size, e.size);
    assert_eq!(n.flags, e.transmission_flags(true));
    assert!(n.structured_replies);
    assert_eq!(n.block_size, Some(e.block_size));
    assert_eq!(n.meta_context_id, None);
}

#[test]
fn test_handshake_when_base_allocation_asked_returns_its_id() {
    let mut client = ClientHandshake::new(config("disk", Some("base:allocation")));
    let mut server = ServerHandshake::new(HandshakeConfig { tls: TlsMode::None });
    let ClientStep::Done(n) = converse(&mut client, &mut server).unwrap() else {
        panic!("not done");
    };
    assert_eq!(n.meta_context_id, Some(0));
}

#[test]
fn test_handshake_when_bitmap_context_asked_returns_its_id() {
    let mut client = ClientHandshake::new(config("disk", Some("qemu:dirty-bitmap:b0")));
    let mut server = ServerHandshake::new(HandshakeConfig { tls: TlsMode::None });
    let ClientStep::Done(n) = converse(&mut client, &mut server).unwrap() else {
        panic!("not done");
    };
    assert_eq!(n.meta_context_id, Some(2));
}

#[test]
fn test_handshake_when_context_unknown_completes_without_id() {
    let mut client = ClientHandshake::new(config("disk", Some("qemu:dirty-bitmap:nope")));
    let mut server = ServerHandshake::new(HandshakeConfig { tls: TlsMode::None });
    let ClientStep::Done(n) = converse(&mut client, &mut server).unwrap() else {
        panic!("not done");
    };
    assert_eq!(n.meta_context_id, None);
}

#[test]
fn test_handshake_when_export_missing_fails_with_qemu_text() {
    let mut client = ClientHandshake::new(config("nope", None));
    let mut server = ServerHandshake::new(HandshakeConfig { tls: TlsMode::None });
    let err = converse(&mut client, &mut server).unwrap_err();
    assert_eq!(err, ClientHandshakeError::ExportNotAvailable);
    assert_eq!(err.to_string(), "Requested export not available");
}

#[test]
fn test_handshake_when_server_requires_tls_and_client_has_none_fails() {
    let mut client = ClientHandshake::new(config("disk", None));
    let mut server = ServerHandshake::new(HandshakeConfig {
        tls: TlsMode::Required,
    });
    let err = converse(&mut client, &mut server).unwrap_err();
    assert!(
        matches!(err, ClientHandshakeError::TlsRequired { .. }),
        "{err:?}"
    );
}

#[test]
fn test_handshake_when_tls_asked_stops_for_tls_then_negotiates_inside() {
    let mut c = config("disk", Some("base:allocation"));
    c.tls = true;
    let mut client = ClientHandshake::new(c);
    let mut server = ServerHandshake::new(HandshakeConfig {
        tls: TlsMode::Required,
    });
    client.receive(&server.take_output());
    assert_eq!(client.advance().unwrap(), ClientStep::NeedInput);
    server.receive(&client.take_output());
    assert!(matches!(
        server.advance(&Catalog),
        Ok(HandshakeStatus::StartTls)
    ));
    client.receive(&server.take_output());
    assert_eq!(client.advance().unwrap(), ClientStep::StartTls);
    server.tls_established();
    client.tls_started();
    let ClientStep::Done(n) = converse(&mut client, &mut server).unwrap() else {
        panic!("not done");
    };
    assert_eq!(n.meta_context_id, Some(0));
}

/// A greeting with the given handshake flags.
fn greeting(flags: u16) -> Vec<u8> {
    let mut g = NBD_MAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&flags.to_be_bytes());
    g
}

fn option_reply(option: OptionType, reply: OptionReplyType, data: &[u8]) -> Vec<u8> {
    let mut r = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&option.0.to_be_bytes());
    r.extend_from_slice(&reply.0.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    r
}

#[test]
fn test_handshake_when_server_not_fixed_newstyle_fails() {
    let mut client = ClientHandshake::new(config("disk", None));
    client.receive(&greeting(0));
    assert_eq!(
        client.advance(),
        Err(ClientHandshakeError::NotFixedNewstyle)
    );
}

#[test]
fn test_handshake_when_go_unsupported_falls_back_to_export_name() {
    let mut client = ClientHandshake::new(config("disk", None));
    client.receive(&greeting(FLAG_FIXED_NEWSTYLE));
    client.receive(&option_reply(
        OptionType::STRUCTURED_REPLY,
        OptionReplyType::ERR_UNSUP,
        &[],
    ));
    client.receive(&option_reply(
        OptionType::GO,
        OptionReplyType::ERR_UNSUP,
        &[],
    ));
    assert_eq!(client.advance().unwrap(), ClientStep::NeedInput);
    let sent = client.take_output();
    assert!(sent.ends_with(b"disk"), "EXPORT_NAME sent last");
    let mut reply = 4096u64.to_be_bytes().to_vec();
    reply.extend_from_slice(&3u16.to_be_bytes());
    reply.extend_from_slice(&[0; EXPORT_NAME_PADDING]);
    client.receive(&reply);
    let ClientStep::Done(n) = client.advance().unwrap() else {
        panic!("not done");
    };
    assert_eq!((n.size, n.flags, n.structured_replies), (4096, 3, false));
}

#[test]
fn test_handshake_when_block_size_invalid_fails() {
    let mut client = ClientHandshake::new(config("disk", None));
    client.receive(&greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    client.receive(&option_reply(
        OptionType::STRUCTURED_REPLY,
        OptionReplyType::ACK,
        &[],
    ));
    let mut info = InfoType::BLOCK_SIZE.0.to_be_bytes().to_vec();
    for v in [3u32, 4096, 1 << 20] {
        info.extend_from_slice(&v.to_be_bytes());
    }
    client.receive(&option_reply(OptionType::GO, OptionReplyType::INFO, &info));
    assert!(matches!(
        client.advance(),
        Err(ClientHandshakeError::Malformed(_))
    ));
}

#[test]
fn test_handshake_when_ack_without_export_info_fails() {
    let mut client = ClientHandshake::new(config("disk", None));
    client.receive(&greeting(FLAG_FIXED_NEWSTYLE));
    client.receive(&option_reply(
        OptionType::STRUCTURED_REPLY,
        OptionReplyType::ACK,
        &[],
    ));
    client.receive(&option_reply(OptionType::GO, OptionReplyType::ACK, &[]));
    assert!(matches!(
        client.advance(),
        Err(ClientHandshakeError::Malformed(_))
    ));
}

#[test]
fn test_handshake_when_reply_names_another_option_fails() {
    let mut client = ClientHandshake::new(config("disk", None));
    client.receive(&greeting(FLAG_FIXED_NEWSTYLE));
    client.receive(&option_reply(OptionType::LIST, OptionReplyType::ACK, &[]));
    assert!(matches!(
        client.advance(),
        Err(ClientHandshakeError::Unexpected { .. })
    ));
}
