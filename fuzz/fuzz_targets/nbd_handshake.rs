//! The server handshake against client input, two ways; it must never panic
//! and its output must stay bounded.
//!
//! - Raw: arbitrary client bytes, delivered in arbitrary splits.
//! - Options: a sequence of well-formed options built with the client codec
//!   (STRUCTURED_REPLY, EXTENDED_HEADERS, meta contexts, INFO, GO, STARTTLS,
//!   each sometimes with a stray payload or a wrong name), so the fuzzer
//!   reaches every order of the extended-header rules instead of having to
//!   guess option framing. A model of those rules checks every reply: the
//!   output must be exactly the greeting plus one well-formed reply series
//!   per option, STRUCTURED_REPLY and EXTENDED_HEADERS must get the reply
//!   type QEMU 10 gives in that state, and what GO hands to transmission
//!   must agree with the model (extended implies structured;
//!   BLOCK_STAT_PAYLOAD exactly when extended with contexts). The bytes that
//!   follow GO are then decoded as requests in the negotiated header form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::client;
use nbd::consts::{
    CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, FLAG_BLOCK_STATUS_PAYLOAD, GREETING_LEN,
};
use nbd::export::{BlockSize, ExportCatalog, ExportInfo, MetaContext};
use nbd::handshake::{HandshakeConfig, HandshakeStatus, Negotiated, ServerHandshake, TlsMode};
use nbd::request::HeaderForm;
use nbd::types::{InfoType, OptionReplyType, OptionType};

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
            block_size: BlockSize {
                min: 1,
                preferred: 4096,
                max: 32 << 20,
            },
            meta_contexts: vec![
                MetaContext::BaseAllocation,
                MetaContext::DirtyBitmap("b0".into()),
            ],
        })
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let tls = if mode & 1 == 0 {
        TlsMode::None
    } else {
        TlsMode::Required
    };
    if mode & 2 == 0 {
        raw(tls, usize::from(mode >> 2).max(1), rest);
    } else {
        options(tls, rest);
    }
});

fn raw(tls: TlsMode, split: usize, rest: &[u8]) {
    let mut hs = ServerHandshake::new(HandshakeConfig { tls });
    for piece in rest.chunks(split) {
        hs.receive(piece);
        match hs.advance(&OneExport) {
            Ok(HandshakeStatus::NeedInput) => {}
            Ok(HandshakeStatus::StartTls) => hs.tls_established(),
            Ok(HandshakeStatus::Done(_)) | Ok(HandshakeStatus::Closed) | Err(_) => break,
        }
        assert!(
            hs.take_output().len() < 16 << 20,
            "unbounded handshake output"
        );
    }
    let _ = hs.take_leftover();
}

/// What the client has negotiated so far, by the protocol's rules.
#[derive(Default)]
struct Model {
    tls_active: bool,
    structured: bool,
    extended: bool,
}

impl Model {
    /// The single reply type STRUCTURED_REPLY / EXTENDED_HEADERS get now
    /// (updating the model on ACK); `None` for options the model leaves alone.
    fn expect(
        &mut self,
        option: OptionType,
        with_payload: bool,
        tls: TlsMode,
    ) -> Option<OptionReplyType> {
        if tls == TlsMode::Required && !self.tls_active {
            return (option != OptionType::STARTTLS).then_some(OptionReplyType::ERR_TLS_REQD);
        }
        let flag_option = matches!(
            option,
            OptionType::STRUCTURED_REPLY | OptionType::EXTENDED_HEADERS
        );
        let reply = match option {
            _ if !flag_option => return None,
            _ if with_payload => OptionReplyType::ERR_INVALID,
            OptionType::STRUCTURED_REPLY if self.extended => OptionReplyType::ERR_EXT_HEADER_REQD,
            OptionType::STRUCTURED_REPLY if self.structured => OptionReplyType::ERR_INVALID,
            OptionType::STRUCTURED_REPLY => {
                self.structured = true;
                OptionReplyType::ACK
            }
            OptionType::EXTENDED_HEADERS if self.extended => OptionReplyType::ERR_INVALID,
            OptionType::EXTENDED_HEADERS => {
                (self.structured, self.extended) = (true, true);
                OptionReplyType::ACK
            }
            _ => return None,
        };
        Some(reply)
    }
}

/// One option from an op byte: bits 0-2 pick it, the rest vary it.
fn option_from(op: u8) -> (OptionType, Vec<u8>) {
    let name = if op & 0x40 != 0 { "nope" } else { "disk" };
    let stray = if op & 0x08 != 0 { vec![op] } else { Vec::new() };
    let queries: Vec<&str> = [
        (0x08, "base:allocation"),
        (0x10, "qemu:dirty-bitmap:b0"),
        (0x20, "qemu:"),
        (0x80, "nope:x"),
    ]
    .iter()
    .filter(|(bit, _)| op & bit != 0)
    .map(|&(_, q)| q)
    .collect();
    let infos: &[InfoType] = if op & 0x08 != 0 {
        &[InfoType::BLOCK_SIZE, InfoType::NAME]
    } else {
        &[]
    };
    match op & 7 {
        0 => (OptionType::EXTENDED_HEADERS, stray),
        1 => (OptionType::STRUCTURED_REPLY, stray),
        2 => (
            OptionType::SET_META_CONTEXT,
            client::meta_payload(name, &queries),
        ),
        3 => (
            OptionType::LIST_META_CONTEXT,
            client::meta_payload(name, &queries),
        ),
        4 => (OptionType::INFO, client::info_payload(name, infos)),
        5 => (OptionType::GO, client::info_payload(name, infos)),
        // With a payload STARTTLS ends the handshake (as in QEMU): raw mode covers that.
        6 => (OptionType::STARTTLS, Vec::new()),
        _ => (OptionType::LIST, stray),
    }
}

fn options(tls: TlsMode, rest: &[u8]) {
    let mut hs = ServerHandshake::new(HandshakeConfig { tls });
    let greeting = hs.take_output();
    assert_eq!(greeting.len(), GREETING_LEN);
    hs.receive(&(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES).to_be_bytes());
    assert!(matches!(
        hs.advance(&OneExport),
        Ok(HandshakeStatus::NeedInput)
    ));
    let mut model = Model::default();
    // Past a few hundred options nothing new happens; long inputs only slow the fuzzer.
    for (at, &op) in rest.iter().enumerate().take(256) {
        let (option, payload) = option_from(op);
        let mut out = Vec::new();
        client::option(&mut out, option, &payload);
        hs.receive(&out);
        let status = hs.advance(&OneExport);
        let replies = replies_to(option, &hs.take_output());
        if let Some(want) = model.expect(option, !payload.is_empty(), tls) {
            assert_eq!(replies, [want], "{option:?} (payload {payload:?})");
        }
        match status {
            Ok(HandshakeStatus::NeedInput) => {}
            Ok(HandshakeStatus::StartTls) => {
                hs.tls_established();
                model = Model {
                    tls_active: true,
                    ..Model::default()
                };
            }
            Ok(HandshakeStatus::Done(negotiated)) => {
                assert_eq!(option, OptionType::GO);
                check_done(&negotiated, &model);
                transmission(&negotiated, &rest[at + 1..]);
                return;
            }
            Ok(HandshakeStatus::Closed) => panic!("closed without ABORT"),
            // Only raw input can break the protocol; every option here is well-formed.
            Err(e) => panic!("{option:?} ended the handshake: {e}"),
        }
    }
}

/// The reply types in `output`, which must be whole, well-formed replies to `option`.
fn replies_to(option: OptionType, output: &[u8]) -> Vec<OptionReplyType> {
    let mut types = Vec::new();
    let mut at = 0;
    while at < output.len() {
        let (reply, used) = client::decode_option_reply(&output[at..])
            .expect("well-formed option replies")
            .expect("whole option replies");
        assert_eq!(reply.option, option, "a reply to another option");
        types.push(reply.reply);
        at += used;
    }
    assert!(!types.is_empty(), "{option:?} got no reply");
    types
}

fn check_done(negotiated: &Negotiated, model: &Model) {
    assert_eq!(negotiated.extended_headers, model.extended);
    assert_eq!(negotiated.structured_replies, model.structured);
    let payload_flag = negotiated.transmission_flags & FLAG_BLOCK_STATUS_PAYLOAD != 0;
    assert_eq!(
        payload_flag,
        negotiated.extended_headers && !negotiated.meta_contexts.is_empty(),
        "BLOCK_STAT_PAYLOAD"
    );
}

/// Whatever followed GO, read as requests in the negotiated header form.
fn transmission(negotiated: &Negotiated, bytes: &[u8]) {
    let form = HeaderForm::of(negotiated);
    for header in bytes.chunks_exact(form.header_len()) {
        let _ = form.decode(header);
    }
}
