//! Handshake behaviour, one rule per test, driven with raw bytes.

use super::*;
use crate::export::tests::writable_export;
use crate::types::InfoType;

struct Catalog;

impl ExportCatalog for Catalog {
    fn list(&self) -> Vec<(String, Option<String>)> {
        vec![("disk".into(), Some("a disk".into()))]
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        match name {
            "disk" => Some(writable_export()),
            "aligned" => {
                let mut e = writable_export();
                e.name = "aligned".into();
                e.block_size.min = 512;
                Some(e)
            }
            _ => None,
        }
    }
}

fn option(opt: OptionType, payload: &[u8]) -> Vec<u8> {
    let mut out = option_header(opt, payload.len() as u32);
    out.extend_from_slice(payload);
    out
}

fn option_header(opt: OptionType, len: u32) -> Vec<u8> {
    let mut out = IHAVEOPT.to_be_bytes().to_vec();
    out.extend_from_slice(&opt.0.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out
}

fn info_payload(name: &str, infos: &[InfoType]) -> Vec<u8> {
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        p.extend_from_slice(&i.0.to_be_bytes());
    }
    p
}

fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        p.extend_from_slice(&(q.len() as u32).to_be_bytes());
        p.extend_from_slice(q.as_bytes());
    }
    p
}

/// A handshake past the client flags (fixed newstyle + no zeroes).
fn started(tls: TlsMode) -> ServerHandshake {
    let mut hs = ServerHandshake::new(HandshakeConfig { tls });
    hs.take_output();
    hs.receive(&3u32.to_be_bytes());
    hs
}

type Status = Result<HandshakeStatus, HandshakeError>;
/// An option reply's type and data.
type Reply = (OptionReplyType, Vec<u8>);

/// Feeds `bytes`, advances once, and returns the status and the replies.
fn exchange(hs: &mut ServerHandshake, bytes: &[u8]) -> (Status, Vec<Reply>) {
    hs.receive(bytes);
    let status = hs.advance(&Catalog);
    (status, replies(&hs.take_output()))
}

/// Feeds `bytes` for a step whose outcome the test does not check, beyond
/// it not being an error.
fn send(hs: &mut ServerHandshake, bytes: &[u8]) {
    let (status, _) = exchange(hs, bytes);
    assert!(status.is_ok(), "{status:?}");
}

/// Option replies in the output: (type, data).
fn replies(out: &[u8]) -> Vec<Reply> {
    let mut found = Vec::new();
    let mut rest = out;
    while rest.len() >= 20 {
        let kind = OptionReplyType(u32::from_be_bytes(rest[12..16].try_into().unwrap()));
        let len = u32::from_be_bytes(rest[16..20].try_into().unwrap()) as usize;
        found.push((kind, rest[20..20 + len].to_vec()));
        rest = &rest[20 + len..];
    }
    found
}

fn types(replies: &[Reply]) -> Vec<OptionReplyType> {
    replies.iter().map(|(t, _)| *t).collect()
}

fn message(replies: &[Reply]) -> String {
    String::from_utf8(replies[0].1.clone()).unwrap()
}

/// The BLOCK_SIZE info in `replies`: (min, preferred, max).
fn block_size(replies: &[Reply]) -> (u32, u32, u32) {
    let (_, d) = replies
        .iter()
        .find(|(t, d)| *t == OptionReplyType::INFO && d[..2] == [0, 3])
        .unwrap();
    let be = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
    (be(2), be(6), be(10))
}

fn done(status: Status) -> Box<Negotiated> {
    match status {
        Ok(HandshakeStatus::Done(n)) => n,
        other => panic!("expected Done, got {other:?}"),
    }
}

#[test]
fn test_new_when_created_queues_greeting_with_fixed_newstyle_and_no_zeroes() {
    let mut hs = ServerHandshake::new(HandshakeConfig { tls: TlsMode::None });
    let out = hs.take_output();
    assert_eq!(out.len(), GREETING_LEN);
    assert_eq!(&out[16..18], &3u16.to_be_bytes());
}

#[test]
fn test_advance_when_unknown_client_flags_returns_error() {
    let mut hs = ServerHandshake::new(HandshakeConfig { tls: TlsMode::None });
    hs.receive(&8u32.to_be_bytes());
    assert_eq!(
        hs.advance(&Catalog).unwrap_err(),
        HandshakeError::UnknownClientFlags(8)
    );
}

#[test]
fn test_advance_after_error_returns_finished() {
    let mut hs = ServerHandshake::new(HandshakeConfig { tls: TlsMode::None });
    hs.receive(&8u32.to_be_bytes());
    let _ = hs.advance(&Catalog);
    assert_eq!(hs.advance(&Catalog).unwrap_err(), HandshakeError::Finished);
}

#[test]
fn test_go_when_export_known_sends_info_then_ack_and_finishes() {
    let mut hs = started(TlsMode::None);
    let (status, replies) = exchange(&mut hs, &option(OptionType::GO, &info_payload("disk", &[])));
    let n = done(status);
    assert_eq!(n.transmission_flags, 0xd6d);
    assert_eq!(
        types(&replies),
        [
            OptionReplyType::INFO,
            OptionReplyType::INFO,
            OptionReplyType::INFO,
            OptionReplyType::ACK
        ]
    );
}

#[test]
fn test_go_when_name_requested_sends_name_info_first() {
    let mut hs = started(TlsMode::None);
    let payload = info_payload("disk", &[InfoType::NAME]);
    let (_, replies) = exchange(&mut hs, &option(OptionType::GO, &payload));
    assert_eq!(replies[0].1, b"\x00\x01disk");
}

#[test]
fn test_go_when_export_unknown_returns_err_unknown_and_continues() {
    let mut hs = started(TlsMode::None);
    let (status, replies) = exchange(&mut hs, &option(OptionType::GO, &info_payload("nope", &[])));
    assert!(matches!(status, Ok(HandshakeStatus::NeedInput)));
    assert_eq!(types(&replies), [OptionReplyType::ERR_UNKNOWN]);
    assert_eq!(message(&replies), "export 'nope' not present");
}

#[test]
fn test_go_when_payload_has_trailing_byte_returns_err_invalid() {
    let mut hs = started(TlsMode::None);
    let mut payload = info_payload("disk", &[]);
    payload.push(0);
    let (_, replies) = exchange(&mut hs, &option(OptionType::GO, &payload));
    assert_eq!(types(&replies), [OptionReplyType::ERR_INVALID]);
    assert_eq!(message(&replies), "option 'go' has unexpected length");
}

#[test]
fn test_go_when_block_size_not_requested_advertises_min_1() {
    let mut hs = started(TlsMode::None);
    let payload = info_payload("aligned", &[]);
    let (_, replies) = exchange(&mut hs, &option(OptionType::GO, &payload));
    assert_eq!(block_size(&replies), (1, 4096, MAX_PAYLOAD));
}

#[test]
fn test_go_when_block_size_requested_advertises_real_min() {
    let mut hs = started(TlsMode::None);
    let payload = info_payload("aligned", &[InfoType::BLOCK_SIZE]);
    let (_, replies) = exchange(&mut hs, &option(OptionType::GO, &payload));
    assert_eq!(block_size(&replies).0, 512);
}

#[test]
fn test_info_when_aligned_export_without_block_size_request_returns_block_size_reqd() {
    let mut hs = started(TlsMode::None);
    let payload = info_payload("aligned", &[]);
    let (_, replies) = exchange(&mut hs, &option(OptionType::INFO, &payload));
    assert_eq!(
        types(&replies).last(),
        Some(&OptionReplyType::ERR_BLOCK_SIZE_REQD)
    );
}

#[test]
fn test_info_when_export_known_continues_handshake() {
    let mut hs = started(TlsMode::None);
    let payload = info_payload("disk", &[]);
    let (status, replies) = exchange(&mut hs, &option(OptionType::INFO, &payload));
    assert!(matches!(status, Ok(HandshakeStatus::NeedInput)));
    assert_eq!(types(&replies).last(), Some(&OptionReplyType::ACK));
}

#[test]
fn test_unknown_option_returns_err_unsup_with_qemu_message() {
    let mut hs = started(TlsMode::None);
    let (_, replies) = exchange(&mut hs, &option(OptionType(99), b"xyz"));
    assert_eq!(types(&replies), [OptionReplyType::ERR_UNSUP]);
    assert_eq!(message(&replies), "Unsupported option 99 (<unknown>)");
}

fn extended(hs: &mut ServerHandshake) {
    let (_, replies) = exchange(hs, &option(OptionType::EXTENDED_HEADERS, &[]));
    assert_eq!(types(&replies), [OptionReplyType::ACK]);
}

#[test]
fn test_extended_headers_when_asked_acks_and_go_enters_extended_mode() {
    let mut hs = started(TlsMode::None);
    extended(&mut hs);
    let (status, _) = exchange(&mut hs, &option(OptionType::GO, &info_payload("disk", &[])));
    let n = done(status);
    assert!(n.extended_headers && n.structured_replies);
    // No context selected: no BLOCK_STAT_PAYLOAD, as QEMU (0xded).
    assert_eq!(n.transmission_flags, 0xded);
}

#[test]
fn test_extended_headers_when_sent_twice_returns_err_invalid_with_qemu_message() {
    let mut hs = started(TlsMode::None);
    extended(&mut hs);
    let (_, replies) = exchange(&mut hs, &option(OptionType::EXTENDED_HEADERS, &[]));
    assert_eq!(types(&replies), [OptionReplyType::ERR_INVALID]);
    assert_eq!(message(&replies), "extended headers already negotiated");
}

#[test]
fn test_extended_headers_with_payload_returns_err_invalid_unexpected_length() {
    let mut hs = started(TlsMode::None);
    let (_, replies) = exchange(&mut hs, &option(OptionType::EXTENDED_HEADERS, b"x"));
    assert_eq!(types(&replies), [OptionReplyType::ERR_INVALID]);
    assert_eq!(
        message(&replies),
        "option 'extended headers' has unexpected length"
    );
    extended(&mut hs);
}

#[test]
fn test_structured_reply_after_extended_headers_returns_err_ext_header_reqd() {
    let mut hs = started(TlsMode::None);
    extended(&mut hs);
    let (_, replies) = exchange(&mut hs, &option(OptionType::STRUCTURED_REPLY, &[]));
    assert_eq!(types(&replies), [OptionReplyType::ERR_EXT_HEADER_REQD]);
    assert_eq!(message(&replies), "extended headers already negotiated");
}

#[test]
fn test_extended_headers_after_structured_reply_acks() {
    let mut hs = started(TlsMode::None);
    let (_, replies) = exchange(&mut hs, &option(OptionType::STRUCTURED_REPLY, &[]));
    assert_eq!(types(&replies), [OptionReplyType::ACK]);
    extended(&mut hs);
}

#[test]
fn test_export_name_after_extended_headers_disconnects() {
    let mut hs = started(TlsMode::None);
    extended(&mut hs);
    let (status, replies) = exchange(&mut hs, &option(OptionType::EXPORT_NAME, b"disk"));
    assert_eq!(
        status.unwrap_err(),
        HandshakeError::ExtendedHeadersNegotiated
    );
    assert!(replies.is_empty());
}

#[test]
fn test_extended_headers_before_tls_returns_err_tls_reqd() {
    let mut hs = started(TlsMode::Required);
    let (_, replies) = exchange(&mut hs, &option(OptionType::EXTENDED_HEADERS, &[]));
    assert_eq!(types(&replies), [OptionReplyType::ERR_TLS_REQD]);
}

#[test]
fn test_go_with_contexts_in_extended_mode_advertises_block_status_payload() {
    let mut hs = started(TlsMode::None);
    extended(&mut hs);
    let set = meta_payload("disk", &["base:allocation"]);
    let _ = exchange(&mut hs, &option(OptionType::SET_META_CONTEXT, &set));
    let (status, _) = exchange(&mut hs, &option(OptionType::GO, &info_payload("disk", &[])));
    // qemu-nbd 10 sends 0x1ded for a writable export with base:allocation.
    assert_eq!(done(status).transmission_flags, 0x1ded);
}

#[test]
fn test_info_in_extended_mode_advertises_block_status_payload_without_contexts() {
    let mut hs = started(TlsMode::None);
    extended(&mut hs);
    let (_, replies) = exchange(
        &mut hs,
        &option(OptionType::INFO, &info_payload("disk", &[])),
    );
    let export = replies
        .iter()
        .find(|(t, d)| *t == OptionReplyType::INFO && d[..2] == [0, 0])
        .expect("NBD_INFO_EXPORT");
    assert_eq!(&export.1[10..12], &0x1dedu16.to_be_bytes());
}

#[test]
fn test_unknown_option_when_large_is_skipped_without_buffering() {
    let mut hs = started(TlsMode::None);
    send(&mut hs, &option_header(OptionType(99), 1 << 20));
    let (_, replies) = exchange(&mut hs, &vec![0u8; 1 << 20]);
    assert_eq!(types(&replies), [OptionReplyType::ERR_UNSUP]);
    assert!(hs.input.capacity() <= 2 << 20);
}

#[test]
fn test_unknown_option_when_payload_partial_sends_nothing_yet() {
    let mut hs = started(TlsMode::None);
    send(&mut hs, &option_header(OptionType(99), 10));
    let (status, replies) = exchange(&mut hs, &[0u8; 9]);
    assert!(matches!(status, Ok(HandshakeStatus::NeedInput)));
    assert!(replies.is_empty());
}

#[test]
fn test_go_when_payload_over_buffer_limit_returns_err_too_big() {
    let mut hs = started(TlsMode::None);
    let len = MAX_BUFFERED_OPTION + 1;
    send(&mut hs, &option_header(OptionType::GO, len));
    let (_, replies) = exchange(&mut hs, &vec![0u8; len as usize]);
    assert_eq!(types(&replies), [OptionReplyType::ERR_TOO_BIG]);
}

#[test]
fn test_option_when_over_32_mib_returns_error() {
    let mut hs = started(TlsMode::None);
    let (status, _) = exchange(&mut hs, &option_header(OptionType(99), MAX_OPTION_LEN + 1));
    assert!(matches!(status, Err(HandshakeError::OptionTooLong { .. })));
}

#[test]
fn test_option_when_magic_wrong_returns_error() {
    let mut hs = started(TlsMode::None);
    let (status, _) = exchange(&mut hs, &[0u8; 16]);
    assert_eq!(status.unwrap_err(), HandshakeError::BadOptionMagic(0));
}

#[test]
fn test_option_when_client_not_fixed_newstyle_returns_error() {
    let mut hs = ServerHandshake::new(HandshakeConfig { tls: TlsMode::None });
    hs.receive(&0u32.to_be_bytes());
    let (status, _) = exchange(&mut hs, &option(OptionType::LIST, &[]));
    assert_eq!(
        status.unwrap_err(),
        HandshakeError::NotFixedNewstyle(OptionType::LIST)
    );
}

#[test]
fn test_starttls_when_tls_not_configured_returns_err_policy() {
    let mut hs = started(TlsMode::None);
    let (_, replies) = exchange(&mut hs, &option(OptionType::STARTTLS, &[]));
    assert_eq!(types(&replies), [OptionReplyType::ERR_POLICY]);
    assert_eq!(message(&replies), "TLS not configured");
}

#[test]
fn test_starttls_when_tls_required_acks_and_returns_start_tls() {
    let mut hs = started(TlsMode::Required);
    let (status, replies) = exchange(&mut hs, &option(OptionType::STARTTLS, &[]));
    assert!(matches!(status, Ok(HandshakeStatus::StartTls)));
    assert_eq!(types(&replies), [OptionReplyType::ACK]);
}

#[test]
fn test_starttls_when_tls_already_active_returns_err_invalid() {
    let mut hs = started(TlsMode::Required);
    send(&mut hs, &option(OptionType::STARTTLS, &[]));
    hs.tls_established();
    let (_, replies) = exchange(&mut hs, &option(OptionType::STARTTLS, &[]));
    assert_eq!(types(&replies), [OptionReplyType::ERR_INVALID]);
}

#[test]
fn test_starttls_when_payload_and_tls_required_returns_error() {
    let mut hs = started(TlsMode::Required);
    let (status, _) = exchange(&mut hs, &option(OptionType::STARTTLS, b"x"));
    assert_eq!(status.unwrap_err(), HandshakeError::StartTlsWithPayload);
}

#[test]
fn test_starttls_when_payload_and_tls_required_sends_err_invalid_before_closing() {
    let mut hs = started(TlsMode::Required);
    let (_, replies) = exchange(&mut hs, &option(OptionType::STARTTLS, b"x"));
    assert_eq!(types(&replies), [OptionReplyType::ERR_INVALID]);
}

#[test]
fn test_starttls_when_payload_and_no_tls_returns_err_invalid() {
    let mut hs = started(TlsMode::None);
    let (_, replies) = exchange(&mut hs, &option(OptionType::STARTTLS, b"x"));
    assert_eq!(types(&replies), [OptionReplyType::ERR_INVALID]);
}

#[test]
fn test_go_when_tls_required_before_starttls_returns_err_tls_reqd() {
    let mut hs = started(TlsMode::Required);
    let (_, replies) = exchange(&mut hs, &option(OptionType::GO, &info_payload("disk", &[])));
    assert_eq!(types(&replies), [OptionReplyType::ERR_TLS_REQD]);
    assert_eq!(message(&replies), "Option 0x7 not permitted before TLS");
}

#[test]
fn test_unknown_option_when_tls_required_returns_err_tls_reqd() {
    let mut hs = started(TlsMode::Required);
    let (_, replies) = exchange(&mut hs, &option(OptionType(99), b"abc"));
    assert_eq!(types(&replies), [OptionReplyType::ERR_TLS_REQD]);
}

#[test]
fn test_export_name_when_tls_required_returns_error() {
    let mut hs = started(TlsMode::Required);
    let (status, _) = exchange(&mut hs, &option(OptionType::EXPORT_NAME, b"disk"));
    assert_eq!(status.unwrap_err(), HandshakeError::TlsRequired(1));
}

#[test]
fn test_abort_when_tls_required_returns_err_tls_reqd_then_closed() {
    let mut hs = started(TlsMode::Required);
    let (status, replies) = exchange(&mut hs, &option(OptionType::ABORT, &[]));
    assert!(matches!(status, Ok(HandshakeStatus::Closed)));
    assert_eq!(types(&replies), [OptionReplyType::ERR_TLS_REQD]);
}

#[test]
fn test_tls_established_resets_structured_replies() {
    let mut hs = started(TlsMode::Required);
    send(&mut hs, &option(OptionType::STARTTLS, &[]));
    hs.tls_established();
    let (status, _) = exchange(&mut hs, &option(OptionType::GO, &info_payload("disk", &[])));
    assert!(!done(status).structured_replies);
}

#[test]
fn test_tls_established_discards_plaintext_sent_after_starttls() {
    let mut hs = started(TlsMode::Required);
    let mut bytes = option(OptionType::STARTTLS, &[]);
    bytes.extend_from_slice(&option(OptionType::STRUCTURED_REPLY, &[]));
    send(&mut hs, &bytes);
    hs.tls_established();
    let (status, replies) = exchange(&mut hs, &[]);
    assert!(matches!(status, Ok(HandshakeStatus::NeedInput)));
    assert!(replies.is_empty());
}

#[test]
fn test_tls_established_when_not_awaiting_tls_is_ignored() {
    let mut hs = started(TlsMode::Required);
    hs.tls_established();
    let (_, replies) = exchange(&mut hs, &option(OptionType::LIST, &[]));
    assert_eq!(types(&replies), [OptionReplyType::ERR_TLS_REQD]);
}

#[test]
fn test_structured_reply_when_repeated_returns_err_invalid() {
    let mut hs = started(TlsMode::None);
    send(&mut hs, &option(OptionType::STRUCTURED_REPLY, &[]));
    let (_, replies) = exchange(&mut hs, &option(OptionType::STRUCTURED_REPLY, &[]));
    assert_eq!(types(&replies), [OptionReplyType::ERR_INVALID]);
}

#[test]
fn test_structured_reply_when_payload_returns_err_invalid() {
    let mut hs = started(TlsMode::None);
    let (_, replies) = exchange(&mut hs, &option(OptionType::STRUCTURED_REPLY, b"x"));
    assert_eq!(types(&replies), [OptionReplyType::ERR_INVALID]);
}

#[test]
fn test_go_after_structured_reply_advertises_df() {
    let mut hs = started(TlsMode::None);
    send(&mut hs, &option(OptionType::STRUCTURED_REPLY, &[]));
    let (status, _) = exchange(&mut hs, &option(OptionType::GO, &info_payload("disk", &[])));
    assert_eq!(done(status).transmission_flags, 0xded);
}

#[test]
fn test_set_meta_context_without_structured_returns_err_invalid() {
    let mut hs = started(TlsMode::None);
    let payload = meta_payload("disk", &["base:allocation"]);
    let (_, replies) = exchange(&mut hs, &option(OptionType::SET_META_CONTEXT, &payload));
    assert_eq!(types(&replies), [OptionReplyType::ERR_INVALID]);
}

#[test]
fn test_set_meta_context_when_bitmap_selected_replies_id_2() {
    let mut hs = started(TlsMode::None);
    send(&mut hs, &option(OptionType::STRUCTURED_REPLY, &[]));
    let payload = meta_payload("disk", &["qemu:dirty-bitmap:b0"]);
    let (_, replies) = exchange(&mut hs, &option(OptionType::SET_META_CONTEXT, &payload));
    assert_eq!(replies[0].1[..4], 2u32.to_be_bytes());
}

#[test]
fn test_set_meta_context_when_go_picks_same_export_keeps_selection() {
    let mut hs = started(TlsMode::None);
    send(&mut hs, &option(OptionType::STRUCTURED_REPLY, &[]));
    let payload = meta_payload("disk", &["base:allocation"]);
    send(&mut hs, &option(OptionType::SET_META_CONTEXT, &payload));
    let (status, _) = exchange(&mut hs, &option(OptionType::GO, &info_payload("disk", &[])));
    assert_eq!(
        done(status).meta_contexts,
        vec![(0, MetaContext::BaseAllocation)]
    );
}

#[test]
fn test_set_meta_context_when_go_picks_other_export_drops_selection() {
    let mut hs = started(TlsMode::None);
    send(&mut hs, &option(OptionType::STRUCTURED_REPLY, &[]));
    let payload = meta_payload("disk", &["base:allocation"]);
    send(&mut hs, &option(OptionType::SET_META_CONTEXT, &payload));
    let go = info_payload("aligned", &[]);
    let (status, _) = exchange(&mut hs, &option(OptionType::GO, &go));
    assert!(done(status).meta_contexts.is_empty());
}

#[test]
fn test_set_meta_context_when_repeated_replaces_selection() {
    let mut hs = started(TlsMode::None);
    send(&mut hs, &option(OptionType::STRUCTURED_REPLY, &[]));
    let first = meta_payload("disk", &["base:allocation"]);
    send(&mut hs, &option(OptionType::SET_META_CONTEXT, &first));
    let second = meta_payload("disk", &[]);
    send(&mut hs, &option(OptionType::SET_META_CONTEXT, &second));
    let (status, _) = exchange(&mut hs, &option(OptionType::GO, &info_payload("disk", &[])));
    assert!(done(status).meta_contexts.is_empty());
}

#[test]
fn test_set_meta_context_when_export_unknown_returns_err_unknown() {
    let mut hs = started(TlsMode::None);
    send(&mut hs, &option(OptionType::STRUCTURED_REPLY, &[]));
    let payload = meta_payload("nope", &["base:allocation"]);
    let (_, replies) = exchange(&mut hs, &option(OptionType::SET_META_CONTEXT, &payload));
    assert_eq!(types(&replies), [OptionReplyType::ERR_UNKNOWN]);
}

#[test]
fn test_list_meta_context_without_structured_lists_all_with_id_0() {
    let mut hs = started(TlsMode::None);
    let payload = meta_payload("disk", &[]);
    let (_, replies) = exchange(&mut hs, &option(OptionType::LIST_META_CONTEXT, &payload));
    assert_eq!(
        types(&replies),
        [
            OptionReplyType::META_CONTEXT,
            OptionReplyType::META_CONTEXT,
            OptionReplyType::ACK
        ]
    );
    assert_eq!(replies[1].1, b"\0\0\0\0qemu:dirty-bitmap:b0");
}

#[test]
fn test_list_meta_context_when_query_truncated_returns_err_invalid() {
    let mut hs = started(TlsMode::None);
    let mut payload = meta_payload("disk", &["base:allocation"]);
    payload.pop();
    let (_, replies) = exchange(&mut hs, &option(OptionType::LIST_META_CONTEXT, &payload));
    assert_eq!(types(&replies), [OptionReplyType::ERR_INVALID]);
}

#[test]
fn test_request_bytes_after_go_are_leftover() {
    let mut hs = started(TlsMode::None);
    let mut bytes = option(OptionType::GO, &info_payload("disk", &[]));
    bytes.extend_from_slice(b"REQUEST");
    let (status, _) = exchange(&mut hs, &bytes);
    done(status);
    assert_eq!(hs.take_leftover(), b"REQUEST");
}

#[test]
fn test_export_name_without_no_zeroes_pads_124_bytes() {
    let mut hs = ServerHandshake::new(HandshakeConfig { tls: TlsMode::None });
    hs.take_output();
    hs.receive(&1u32.to_be_bytes());
    hs.receive(&option(OptionType::EXPORT_NAME, b"disk"));
    done(hs.advance(&Catalog));
    assert_eq!(hs.take_output().len(), 8 + 2 + 124);
}

#[test]
fn test_export_name_with_no_zeroes_sends_10_bytes() {
    let mut hs = started(TlsMode::None);
    hs.receive(&option(OptionType::EXPORT_NAME, b"disk"));
    done(hs.advance(&Catalog));
    assert_eq!(hs.take_output().len(), 10);
}

#[test]
fn test_export_name_when_export_unknown_returns_error() {
    let mut hs = started(TlsMode::None);
    let (status, _) = exchange(&mut hs, &option(OptionType::EXPORT_NAME, b"nope"));
    assert_eq!(
        status.unwrap_err(),
        HandshakeError::UnknownExport("nope".into())
    );
}

#[test]
fn test_export_name_when_name_too_long_returns_error() {
    let mut hs = started(TlsMode::None);
    let (status, _) = exchange(&mut hs, &option_header(OptionType::EXPORT_NAME, 4097));
    assert_eq!(status.unwrap_err(), HandshakeError::ExportNameTooLong(4097));
}

#[test]
fn test_abort_is_acked_then_closed() {
    let mut hs = started(TlsMode::None);
    let (status, replies) = exchange(&mut hs, &option(OptionType::ABORT, &[]));
    assert!(matches!(status, Ok(HandshakeStatus::Closed)));
    assert_eq!(types(&replies), [OptionReplyType::ACK]);
}

#[test]
fn test_list_sends_server_with_description_then_ack() {
    let mut hs = started(TlsMode::None);
    let (_, replies) = exchange(&mut hs, &option(OptionType::LIST, &[]));
    assert_eq!(
        types(&replies),
        [OptionReplyType::SERVER, OptionReplyType::ACK]
    );
    assert_eq!(replies[0].1, b"\0\0\0\x04diska disk");
}

#[test]
fn test_list_when_payload_returns_err_invalid() {
    let mut hs = started(TlsMode::None);
    let (_, replies) = exchange(&mut hs, &option(OptionType::LIST, b"x"));
    assert_eq!(types(&replies), [OptionReplyType::ERR_INVALID]);
    assert_eq!(message(&replies), "option 'list' has unexpected length");
}
