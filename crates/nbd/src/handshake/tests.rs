//! Handshake behaviour, one rule per test, driven with raw bytes.

use super::*;
use crate::export::tests::writable_export;

struct Catalog;

impl ExportCatalog for Catalog {
    fn list(&self) -> Vec<(String, Option<String>)> {
        vec![("disk".into(), Some("a disk".into()))]
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (name == "disk").then(writable_export)
    }
}

fn option(opt: OptionType, payload: &[u8]) -> Vec<u8> {
    let mut out = IHAVEOPT.to_be_bytes().to_vec();
    out.extend_from_slice(&opt.0.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn go_payload(name: &str) -> Vec<u8> {
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    p
}

/// A handshake past the client flags (fixed newstyle + no zeroes).
fn started(tls: TlsMode) -> ServerHandshake {
    let mut hs = ServerHandshake::new(HandshakeConfig { tls });
    assert_eq!(hs.take_output().len(), GREETING_LEN);
    hs.receive(&3u32.to_be_bytes());
    hs
}

/// Reply types in the output, in order.
fn reply_types(out: &[u8]) -> Vec<ReplyType> {
    let mut types = Vec::new();
    let mut rest = out;
    while rest.len() >= 20 {
        types.push(ReplyType(u32::from_be_bytes(
            rest[12..16].try_into().unwrap(),
        )));
        let len = u32::from_be_bytes(rest[16..20].try_into().unwrap()) as usize;
        rest = &rest[20 + len..];
    }
    types
}

#[test]
fn test_greeting_advertises_fixed_newstyle_and_no_zeroes() {
    let mut hs = ServerHandshake::new(HandshakeConfig { tls: TlsMode::None });
    let out = hs.take_output();
    assert_eq!(&out[16..18], &3u16.to_be_bytes());
}

#[test]
fn test_unknown_client_flags_are_an_error() {
    let mut hs = ServerHandshake::new(HandshakeConfig { tls: TlsMode::None });
    hs.receive(&8u32.to_be_bytes());
    assert_eq!(
        hs.advance(&Catalog).unwrap_err(),
        HandshakeError::UnknownClientFlags(8)
    );
}

#[test]
fn test_go_for_known_export_finishes_with_info_and_ack() {
    let mut hs = started(TlsMode::None);
    hs.receive(&option(OptionType::GO, &go_payload("disk")));
    let status = hs.advance(&Catalog).unwrap();
    assert!(matches!(status, HandshakeStatus::Done(_)));
    let types = reply_types(&hs.take_output());
    assert_eq!(types.last(), Some(&ReplyType::ACK));
    assert!(types.contains(&ReplyType::INFO));
}

#[test]
fn test_go_for_unknown_export_is_err_unknown_and_continues() {
    let mut hs = started(TlsMode::None);
    hs.receive(&option(OptionType::GO, &go_payload("nope")));
    assert!(matches!(
        hs.advance(&Catalog).unwrap(),
        HandshakeStatus::NeedInput
    ));
    assert_eq!(reply_types(&hs.take_output()), vec![ReplyType::ERR_UNKNOWN]);
}

#[test]
fn test_unknown_option_is_err_unsup() {
    let mut hs = started(TlsMode::None);
    hs.receive(&option(OptionType(99), b"xyz"));
    hs.advance(&Catalog).unwrap();
    assert_eq!(reply_types(&hs.take_output()), vec![ReplyType::ERR_UNSUP]);
}

#[test]
fn test_large_unknown_option_is_skipped_without_buffering() {
    let mut hs = started(TlsMode::None);
    let mut header = IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&99u32.to_be_bytes());
    header.extend_from_slice(&(1u32 << 20).to_be_bytes());
    hs.receive(&header);
    hs.advance(&Catalog).unwrap();
    hs.receive(&vec![0u8; 1 << 20]);
    hs.advance(&Catalog).unwrap();
    assert_eq!(reply_types(&hs.take_output()), vec![ReplyType::ERR_UNSUP]);
}

#[test]
fn test_option_over_32_mib_is_an_error() {
    let mut hs = started(TlsMode::None);
    let mut header = IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&99u32.to_be_bytes());
    header.extend_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
    hs.receive(&header);
    assert!(matches!(
        hs.advance(&Catalog),
        Err(HandshakeError::OptionTooLong(_))
    ));
}

#[test]
fn test_bad_option_magic_is_an_error() {
    let mut hs = started(TlsMode::None);
    hs.receive(&[0u8; 16]);
    assert!(matches!(
        hs.advance(&Catalog),
        Err(HandshakeError::BadOptionMagic(0))
    ));
}

#[test]
fn test_starttls_without_tls_is_err_policy() {
    let mut hs = started(TlsMode::None);
    hs.receive(&option(OptionType::STARTTLS, &[]));
    hs.advance(&Catalog).unwrap();
    assert_eq!(reply_types(&hs.take_output()), vec![ReplyType::ERR_POLICY]);
}

#[test]
fn test_tls_required_refuses_go_before_starttls() {
    let mut hs = started(TlsMode::Required);
    hs.receive(&option(OptionType::GO, &go_payload("disk")));
    hs.advance(&Catalog).unwrap();
    assert_eq!(
        reply_types(&hs.take_output()),
        vec![ReplyType::ERR_TLS_REQD]
    );
}

#[test]
fn test_starttls_resets_structured_replies() {
    let mut hs = started(TlsMode::Required);
    hs.receive(&option(OptionType::STARTTLS, &[]));
    assert!(matches!(
        hs.advance(&Catalog).unwrap(),
        HandshakeStatus::StartTls
    ));
    hs.tls_established();
    hs.receive(&option(OptionType::GO, &go_payload("disk")));
    let HandshakeStatus::Done(n) = hs.advance(&Catalog).unwrap() else {
        panic!("expected Done");
    };
    assert!(!n.structured_replies);
}

#[test]
fn test_set_meta_context_without_structured_is_err_invalid() {
    let mut hs = started(TlsMode::None);
    let mut p = go_payload("disk");
    p.truncate(8);
    p.extend_from_slice(&0u32.to_be_bytes());
    hs.receive(&option(OptionType::SET_META_CONTEXT, &p));
    hs.advance(&Catalog).unwrap();
    assert_eq!(reply_types(&hs.take_output()), vec![ReplyType::ERR_INVALID]);
}

#[test]
fn test_request_bytes_after_go_are_leftover() {
    let mut hs = started(TlsMode::None);
    let mut bytes = option(OptionType::GO, &go_payload("disk"));
    bytes.extend_from_slice(b"REQUEST");
    hs.receive(&bytes);
    assert!(matches!(
        hs.advance(&Catalog).unwrap(),
        HandshakeStatus::Done(_)
    ));
    assert_eq!(hs.take_leftover(), b"REQUEST");
}

#[test]
fn test_export_name_without_no_zeroes_pads_124_bytes() {
    let mut hs = ServerHandshake::new(HandshakeConfig { tls: TlsMode::None });
    hs.take_output();
    hs.receive(&1u32.to_be_bytes());
    hs.receive(&option(OptionType::EXPORT_NAME, b"disk"));
    assert!(matches!(
        hs.advance(&Catalog).unwrap(),
        HandshakeStatus::Done(_)
    ));
    assert_eq!(hs.take_output().len(), 8 + 2 + 124);
}

#[test]
fn test_abort_is_acked_then_closed() {
    let mut hs = started(TlsMode::None);
    hs.receive(&option(OptionType::ABORT, &[]));
    assert!(matches!(
        hs.advance(&Catalog).unwrap(),
        HandshakeStatus::Closed
    ));
    assert_eq!(reply_types(&hs.take_output()), vec![ReplyType::ACK]);
}

#[test]
fn test_list_sends_server_then_ack() {
    let mut hs = started(TlsMode::None);
    hs.receive(&option(OptionType::LIST, &[]));
    hs.advance(&Catalog).unwrap();
    assert_eq!(
        reply_types(&hs.take_output()),
        vec![ReplyType::SERVER, ReplyType::ACK]
    );
}
