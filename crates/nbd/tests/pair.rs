//! The client codec against `ServerHandshake`, in memory: whole handshakes
//! and a few transmission round trips, as a real client would see them.

use nbd::client::{self, Info, OptionReply, ReplyHeader};
use nbd::consts::*;
use nbd::export::{BlockSize, ExportCatalog, ExportInfo, MetaContext};
use nbd::handshake::{
    HandshakeConfig, HandshakeError, HandshakeStatus, Negotiated, ServerHandshake, TlsMode,
};
use nbd::reply;
use nbd::request::{self, RequestHeader, Verdict};
use nbd::types::{CommandType, InfoType, NbdErrno, OptionReplyType, OptionType, ReplyType};

const SIZE: u64 = 64 << 20;

struct Catalog;

impl ExportCatalog for Catalog {
    fn list(&self) -> Vec<(String, Option<String>)> {
        vec![
            ("disk".into(), Some("the disk".into())),
            ("ro".into(), None),
        ]
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let mut export = ExportInfo {
            name: name.into(),
            description: None,
            size: SIZE,
            read_only: false,
            can_trim: true,
            can_write_zeroes: true,
            can_fast_zero: true,
            can_multi_conn: true,
            can_cache: true,
            block_size: BlockSize {
                min: 1,
                preferred: 4096,
                max: MAX_PAYLOAD,
            },
            meta_contexts: vec![MetaContext::BaseAllocation, MetaContext::AllocationDepth],
        };
        match name {
            "disk" => export.description = Some("the disk".into()),
            "ro" => export.read_only = true,
            _ => return None,
        }
        Some(export)
    }
}

/// A server handshake and everything it has sent, past the greeting.
struct Pair {
    server: ServerHandshake,
    from_server: Vec<u8>,
}

impl Pair {
    /// Connects, checks the greeting and sends `flags`.
    fn connect(tls: TlsMode, flags: u32) -> Self {
        let mut server = ServerHandshake::new(HandshakeConfig { tls });
        let greeting = server.take_output();
        let (handshake_flags, used) = client::decode_greeting(&greeting).unwrap().unwrap();
        assert_eq!(used, greeting.len());
        assert_eq!(handshake_flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        let mut pair = Self {
            server,
            from_server: Vec::new(),
        };
        let mut out = Vec::new();
        client::client_flags(&mut out, flags);
        pair.send(&out).unwrap();
        pair
    }

    fn fixed(tls: TlsMode) -> Self {
        Self::connect(tls, CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES)
    }

    fn send(&mut self, bytes: &[u8]) -> Result<HandshakeStatus, HandshakeError> {
        self.server.receive(bytes);
        let status = self.server.advance(&Catalog);
        self.from_server.extend(self.server.take_output());
        status
    }

    /// Sends what `encode` writes and expects the handshake to go on.
    fn option(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> Vec<OptionReply> {
        let mut out = Vec::new();
        encode(&mut out);
        let status = self.send(&out);
        assert!(
            matches!(status, Ok(HandshakeStatus::NeedInput)),
            "{status:?}"
        );
        self.replies()
    }

    /// Decodes every complete option reply received so far.
    fn replies(&mut self) -> Vec<OptionReply> {
        let mut replies = Vec::new();
        let mut used = 0;
        while let Some((reply, n)) = client::decode_option_reply(&self.from_server[used..]).unwrap()
        {
            replies.push(reply);
            used += n;
        }
        self.from_server.drain(..used);
        replies
    }
}

fn kinds(replies: &[OptionReply]) -> Vec<OptionReplyType> {
    replies.iter().map(|r| r.reply).collect()
}

fn done(status: Result<HandshakeStatus, HandshakeError>) -> Negotiated {
    match status {
        Ok(HandshakeStatus::Done(n)) => *n,
        other => panic!("expected Done, got {other:?}"),
    }
}

/// The client side of a structured GO with base:allocation selected.
fn structured_go_script() -> Vec<u8> {
    let mut out = Vec::new();
    client::client_flags(&mut out, CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
    client::structured_reply(&mut out);
    client::set_meta_context(&mut out, "disk", &["base:allocation"]);
    client::go(&mut out, "disk", &[InfoType::NAME, InfoType::BLOCK_SIZE]);
    out
}

#[test]
fn test_go_with_structured_replies_and_base_allocation_negotiates_both() {
    let mut pair = Pair::fixed(TlsMode::None);
    let acked = pair.option(client::structured_reply);
    assert_eq!(kinds(&acked), [OptionReplyType::ACK]);
    let set = pair.option(|o| client::set_meta_context(o, "disk", &["base:allocation"]));
    assert_eq!(
        kinds(&set),
        [OptionReplyType::META_CONTEXT, OptionReplyType::ACK]
    );
    assert_eq!(
        client::decode_meta_context(&set[0].data),
        Some((0, "base:allocation".into()))
    );

    let mut go = Vec::new();
    client::go(&mut go, "disk", &[InfoType::NAME, InfoType::BLOCK_SIZE]);
    let negotiated = done(pair.send(&go));
    let infos: Vec<Info> = pair
        .replies()
        .iter()
        .filter(|r| r.reply == OptionReplyType::INFO)
        .map(|r| client::decode_info(&r.data).unwrap())
        .collect();

    assert_eq!(
        infos,
        [
            Info::Name("disk".into()),
            Info::Description("the disk".into()),
            Info::BlockSize(BlockSize {
                min: 1,
                preferred: 4096,
                max: MAX_PAYLOAD
            }),
            Info::Export {
                size: SIZE,
                flags: 0xded
            },
        ]
    );
    assert!(negotiated.structured_replies);
    assert_eq!(negotiated.transmission_flags, 0xded);
    assert_eq!(negotiated.meta_contexts, [(0, MetaContext::BaseAllocation)]);
}

#[test]
fn test_set_meta_context_allocation_depth_gets_id_1() {
    let mut pair = Pair::fixed(TlsMode::None);
    pair.option(client::structured_reply);
    let set = pair.option(|o| {
        client::set_meta_context(o, "disk", &["qemu:allocation-depth", "base:allocation"])
    });
    let ids: Vec<_> = set
        .iter()
        .filter_map(|r| client::decode_meta_context(&r.data))
        .collect();
    assert_eq!(
        ids,
        [
            (0, "base:allocation".to_string()),
            (1, "qemu:allocation-depth".to_string())
        ]
    );
}

#[test]
fn test_list_meta_context_qemu_wildcard_lists_allocation_depth() {
    let mut pair = Pair::fixed(TlsMode::None);
    let listed = pair.option(|o| client::list_meta_context(o, "disk", &["qemu:"]));
    assert_eq!(
        client::decode_meta_context(&listed[0].data),
        Some((0, "qemu:allocation-depth".into()))
    );
}

#[test]
fn test_list_returns_every_export_with_description() {
    let mut pair = Pair::fixed(TlsMode::None);
    let replies = pair.option(client::list);
    let servers: Vec<_> = replies
        .iter()
        .filter(|r| r.reply == OptionReplyType::SERVER)
        .map(|r| client::decode_server(&r.data).unwrap())
        .collect();
    assert_eq!(
        servers,
        [
            ("disk".to_string(), "the disk".to_string()),
            ("ro".to_string(), String::new())
        ]
    );
    assert_eq!(replies.last().unwrap().reply, OptionReplyType::ACK);
}

#[test]
fn test_info_for_unknown_export_returns_err_unknown_and_go_still_works() {
    let mut pair = Pair::fixed(TlsMode::None);
    let replies = pair.option(|o| client::info(o, "missing", &[]));
    assert_eq!(kinds(&replies), [OptionReplyType::ERR_UNKNOWN]);
    assert_eq!(replies[0].message(), "export 'missing' not present");
    let mut go = Vec::new();
    client::go(&mut go, "ro", &[]);
    assert_eq!(done(pair.send(&go)).transmission_flags, 0x50f);
}

#[test]
fn test_starttls_without_tls_configured_returns_err_policy() {
    let mut pair = Pair::fixed(TlsMode::None);
    let replies = pair.option(client::starttls);
    assert_eq!(kinds(&replies), [OptionReplyType::ERR_POLICY]);
    assert_eq!(replies[0].message(), "TLS not configured");
}

#[test]
fn test_starttls_with_tls_required_upgrades_then_go_works() {
    let mut pair = Pair::fixed(TlsMode::Required);
    let refused = pair.option(client::list);
    assert_eq!(kinds(&refused), [OptionReplyType::ERR_TLS_REQD]);
    assert_eq!(refused[0].message(), "Option 0x3 not permitted before TLS");

    let mut starttls = Vec::new();
    client::starttls(&mut starttls);
    let status = pair.send(&starttls);
    assert!(matches!(status, Ok(HandshakeStatus::StartTls)));
    assert_eq!(kinds(&pair.replies()), [OptionReplyType::ACK]);
    pair.server.tls_established();

    let again = pair.option(client::starttls);
    assert_eq!(kinds(&again), [OptionReplyType::ERR_INVALID]);
    let mut go = Vec::new();
    client::go(&mut go, "disk", &[]);
    assert!(!done(pair.send(&go)).structured_replies);
}

#[test]
fn test_structured_reply_refused_before_tls_is_acked_after_it() {
    let mut pair = Pair::fixed(TlsMode::Required);
    let refused = pair.option(client::structured_reply);
    assert_eq!(kinds(&refused), [OptionReplyType::ERR_TLS_REQD]);
    let mut starttls = Vec::new();
    client::starttls(&mut starttls);
    pair.send(&starttls).unwrap();
    pair.replies();
    pair.server.tls_established();
    let acked = pair.option(client::structured_reply);
    assert_eq!(kinds(&acked), [OptionReplyType::ACK]);
}

#[test]
fn test_bytes_split_one_at_a_time_give_the_same_output() {
    let script = structured_go_script();
    let mut whole = ServerHandshake::new(HandshakeConfig { tls: TlsMode::None });
    whole.receive(&script);
    let whole_status = done(whole.advance(&Catalog));
    let whole_output = whole.take_output();

    let mut split = ServerHandshake::new(HandshakeConfig { tls: TlsMode::None });
    let mut split_output = Vec::new();
    let mut last = None;
    for byte in &script {
        split.receive(std::slice::from_ref(byte));
        last = Some(split.advance(&Catalog));
        split_output.extend(split.take_output());
    }

    assert_eq!(split_output, whole_output);
    let split_status = done(last.unwrap());
    assert_eq!(split_status.meta_contexts, whole_status.meta_contexts);
}

#[test]
fn test_request_pipelined_after_go_is_leftover_and_decodes() {
    let mut script = structured_go_script();
    let header = RequestHeader {
        flags: CMD_FLAG_REQ_ONE,
        command: CommandType::BLOCK_STATUS,
        cookie: 42,
        offset: 0,
        length: 65536,
    };
    client::request(&mut script, &header);
    let mut server = ServerHandshake::new(HandshakeConfig { tls: TlsMode::None });
    server.receive(&script);
    let negotiated = done(server.advance(&Catalog));

    let leftover = server.take_leftover();
    let bytes: [u8; REQUEST_HEADER_LEN] = leftover.as_slice().try_into().unwrap();
    let decoded = request::decode_request(&bytes).unwrap();

    assert_eq!(decoded, header);
    assert_eq!(request::validate(&decoded, &negotiated), Verdict::Ok);
}

#[test]
fn test_block_status_reply_round_trips_through_client_decoder() {
    let mut out = Vec::new();
    reply::block_status_chunk(
        &mut out,
        42,
        true,
        0,
        &[(4096, 0), (61440, STATE_HOLE | STATE_ZERO)],
    );
    let (header, used) = client::decode_reply_header(&out).unwrap().unwrap();
    let ReplyHeader::Chunk {
        flags,
        reply_type,
        cookie,
        length,
        ..
    } = header
    else {
        panic!("expected a chunk");
    };
    let payload = &out[used..used + length as usize];
    assert_eq!(
        (flags, reply_type, cookie),
        (REPLY_FLAG_DONE, ReplyType::BLOCK_STATUS, 42)
    );
    assert_eq!(
        client::decode_block_status(payload),
        Some((0, vec![(4096, 0), (61440, 3)]))
    );
}

#[test]
fn test_structured_read_reply_round_trips_data_hole_and_error() {
    let mut out = Vec::new();
    reply::offset_data_header(&mut out, 7, false, 0, 4);
    out.extend_from_slice(b"abcd");
    reply::offset_hole(&mut out, 7, false, 4, 508);
    reply::error_chunk(&mut out, 7, NbdErrno::EIO, "reading from file failed");

    let mut chunks = Vec::new();
    let mut rest = out.as_slice();
    while let Some((
        ReplyHeader::Chunk {
            reply_type, length, ..
        },
        used,
    )) = client::decode_reply_header(rest).unwrap()
    {
        chunks.push((reply_type, rest[used..used + length as usize].to_vec()));
        rest = &rest[used + length as usize..];
    }

    assert_eq!(
        client::decode_offset_data(&chunks[0].1),
        Some((0, &b"abcd"[..]))
    );
    assert_eq!(client::decode_offset_hole(&chunks[1].1), Some((4, 508)));
    let error = client::decode_error(chunks[2].0, &chunks[2].1).unwrap();
    assert_eq!(error.error, NbdErrno::EIO);
    assert_eq!(error.message, "reading from file failed");
}

#[test]
fn test_export_name_client_without_fixed_newstyle_gets_padded_reply() {
    let mut pair = Pair::connect(TlsMode::None, 0);
    let mut out = Vec::new();
    client::export_name(&mut out, "disk");
    let negotiated = done(pair.send(&out));
    let reply = client::decode_export_name_reply(&pair.from_server, false);
    assert_eq!(reply, Some((SIZE, 0xd6d, 134)));
    assert_eq!(negotiated.export.name, "disk");
}

#[test]
fn test_oversized_unknown_option_streamed_in_pieces_then_list_works() {
    let mut pair = Pair::fixed(TlsMode::None);
    let mut header = Vec::new();
    client::option_header(&mut header, OptionType(0x4242), 8 << 20);
    pair.send(&header).unwrap();
    let piece = vec![0xa5; 64 << 10];
    for _ in 0..128 {
        pair.send(&piece).unwrap();
    }
    let refused = pair.replies();
    assert_eq!(kinds(&refused), [OptionReplyType::ERR_UNSUP]);
    let listed = pair.option(client::list);
    assert_eq!(listed.last().unwrap().reply, OptionReplyType::ACK);
}

#[test]
fn test_option_longer_than_32_mib_disconnects() {
    let mut pair = Pair::fixed(TlsMode::None);
    let mut header = Vec::new();
    client::option_header(&mut header, OptionType::GO, MAX_OPTION_LEN + 1);
    assert!(matches!(
        pair.send(&header),
        Err(HandshakeError::OptionTooLong { .. })
    ));
}

#[test]
fn test_garbage_instead_of_option_magic_disconnects() {
    let mut pair = Pair::fixed(TlsMode::None);
    let status = pair.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(matches!(status, Err(HandshakeError::BadOptionMagic(_))));
}

#[test]
fn test_garbage_go_payload_returns_err_invalid_and_handshake_continues() {
    let mut pair = Pair::fixed(TlsMode::None);
    let replies = pair.option(|o| client::option(o, OptionType::GO, &[0xff; 40]));
    assert_eq!(kinds(&replies), [OptionReplyType::ERR_INVALID]);
    assert_eq!(replies[0].message(), "Invalid name length: 4294967295");
}

#[test]
fn test_abort_is_acked_and_closes() {
    let mut pair = Pair::fixed(TlsMode::None);
    let mut out = Vec::new();
    client::abort(&mut out);
    assert!(matches!(pair.send(&out), Ok(HandshakeStatus::Closed)));
    assert_eq!(kinds(&pair.replies()), [OptionReplyType::ACK]);
}
