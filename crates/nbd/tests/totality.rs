//! Every decoder and the handshake are total: random and half-valid input,
//! split at random points, never panics, and the server's handshake output
//! always stays well framed. A seeded generator keeps failures reproducible;
//! the cargo-fuzz targets in /fuzz go deeper.

use nbd::client;
use nbd::consts::*;
use nbd::export::{BlockSize, ExportCatalog, ExportInfo, MetaContext};
use nbd::handshake::{HandshakeConfig, HandshakeStatus, Negotiated, ServerHandshake, TlsMode};
use nbd::reply::ReplyShape;
use nbd::request::{self, RequestHeader};
use nbd::types::{CommandType, InfoType, OptionType, ReplyType};

/// xorshift64*: tiny, deterministic, good enough to scatter bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, max: u64) -> Vec<u8> {
        let len = self.below(max + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

struct Catalog;

fn export(name: &str) -> ExportInfo {
    ExportInfo {
        name: name.into(),
        description: Some("d".into()),
        size: 1 << 20,
        read_only: name == "ro",
        can_trim: true,
        can_write_zeroes: true,
        can_fast_zero: true,
        can_multi_conn: true,
        can_cache: true,
        block_size: BlockSize {
            min: if name == "ro" { 512 } else { 1 },
            preferred: 4096,
            max: MAX_PAYLOAD,
        },
        meta_contexts: vec![
            MetaContext::BaseAllocation,
            MetaContext::AllocationDepth,
            MetaContext::DirtyBitmap("b0".into()),
        ],
    }
}

impl ExportCatalog for Catalog {
    fn list(&self) -> Vec<(String, Option<String>)> {
        vec![("disk".into(), Some("d".into())), ("ro".into(), None)]
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        matches!(name, "disk" | "ro" | "").then(|| export(name))
    }
}

const NAMES: &[&str] = &["disk", "ro", "", "missing", "dis"];
const QUERIES: &[&str] = &[
    "base:",
    "base:allocation",
    "qemu:",
    "qemu:dirty-bitmap:",
    "qemu:dirty-bitmap:b0",
    "qemu:allocation-depth",
    "x-nope:thing",
    "",
];

/// A payload that is well formed for some option, or random, then maybe damaged.
fn payload(rng: &mut Rng) -> Vec<u8> {
    let mut p = match rng.below(4) {
        0 => rng.bytes(48),
        1 => {
            let infos: Vec<InfoType> = (0..rng.below(4))
                .map(|_| InfoType(rng.below(5) as u16))
                .collect();
            client::info_payload(rng.pick(NAMES), &infos)
        }
        2 => {
            let queries: Vec<&str> = (0..rng.below(4)).map(|_| rng.pick(QUERIES)).collect();
            client::meta_payload(rng.pick(NAMES), &queries)
        }
        _ => rng.pick(NAMES).as_bytes().to_vec(),
    };
    if !p.is_empty() && rng.below(4) == 0 {
        let at = rng.below(p.len() as u64) as usize;
        p[at] = rng.next() as u8;
    }
    if rng.below(6) == 0 {
        p.truncate(rng.below(p.len() as u64 + 1) as usize);
    }
    p
}

/// A client script: flags, then options (some with lying lengths), some garbage.
fn script(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    let flags = match rng.below(10) {
        0 => rng.next() as u32,
        1 => CLIENT_FLAG_FIXED_NEWSTYLE,
        2 => 0,
        _ => CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES,
    };
    client::client_flags(&mut out, flags);
    for _ in 0..rng.below(8) {
        let option = match rng.below(10) {
            0 => OptionType(rng.next() as u32),
            _ => OptionType(rng.below(13) as u32),
        };
        let body = match rng.below(4) {
            0 => payload(rng),
            _ => fitting_payload(rng, option),
        };
        match rng.below(12) {
            0 => out.extend(rng.bytes(24)),
            1 => {
                client::option_header(&mut out, option, rng.below(1 << 17) as u32);
                out.extend(body);
            }
            _ => client::option(&mut out, option, &body),
        }
    }
    if rng.below(2) == 0 {
        client::go(&mut out, "disk", &[]);
    }
    out.extend(rng.bytes(40));
    out
}

/// A well-formed payload for `option`.
fn fitting_payload(rng: &mut Rng, option: OptionType) -> Vec<u8> {
    match option {
        OptionType::INFO | OptionType::GO => client::info_payload(rng.pick(NAMES), &[]),
        OptionType::LIST_META_CONTEXT | OptionType::SET_META_CONTEXT => {
            let queries: Vec<&str> = (0..rng.below(3)).map(|_| rng.pick(QUERIES)).collect();
            client::meta_payload(rng.pick(NAMES), &queries)
        }
        OptionType::EXPORT_NAME => rng.pick(NAMES).as_bytes().to_vec(),
        _ => Vec::new(),
    }
}

/// Checks that `out` is a run of option replies, plus at most an
/// EXPORT_NAME reply at the end when the handshake finished.
fn assert_well_framed(out: &[u8], finished: bool) {
    let mut used = 0;
    while let Ok(Some((_, n))) = client::decode_option_reply(&out[used..]) {
        used += n;
    }
    let rest = out.len() - used;
    let export_name_reply = finished && (rest == 10 || rest == 134);
    assert!(rest == 0 || export_name_reply, "{rest} stray bytes");
}

/// Runs one script through a handshake, delivered in random pieces;
/// returns whether it reached transmission.
fn run_handshake(rng: &mut Rng, tls: TlsMode) -> bool {
    let bytes = script(rng);
    let mut server = ServerHandshake::new(HandshakeConfig { tls });
    server.take_output();
    let mut output = Vec::new();
    let mut finished = false;
    let mut reached_transmission = false;
    let mut rest = bytes.as_slice();
    while !rest.is_empty() && !finished {
        let n = (rng.below(40) as usize + 1).min(rest.len());
        server.receive(&rest[..n]);
        rest = &rest[n..];
        match server.advance(&Catalog) {
            Ok(HandshakeStatus::NeedInput) => {}
            Ok(HandshakeStatus::StartTls) => {
                output.extend(server.take_output());
                server.tls_established();
            }
            Ok(HandshakeStatus::Done(_)) => {
                finished = true;
                reached_transmission = true;
            }
            Ok(HandshakeStatus::Closed) | Err(_) => finished = true,
        }
        output.extend(server.take_output());
    }
    let _ = server.take_leftover();
    assert_well_framed(&output, finished);
    reached_transmission
}

#[test]
fn test_handshake_when_fed_random_scripts_never_panics_and_stays_framed() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut reached = 0;
    for round in 0..4000 {
        let tls = if round % 3 == 0 {
            TlsMode::Required
        } else {
            TlsMode::None
        };
        reached += usize::from(run_handshake(&mut rng, tls));
    }
    // The generator must get past the options often enough to mean something.
    assert!(reached > 200, "only {reached} scripts reached transmission");
}

fn random_negotiated(rng: &mut Rng) -> Negotiated {
    let mut export = export(if rng.below(2) == 0 { "disk" } else { "ro" });
    export.size = match rng.below(3) {
        0 => 0,
        1 => rng.next(),
        _ => 1 << 20,
    };
    let structured = rng.below(2) == 0;
    let meta_contexts = match rng.below(2) {
        0 => vec![],
        _ => vec![(0, MetaContext::BaseAllocation)],
    };
    let extended = rng.below(3) == 0;
    Negotiated {
        transmission_flags: export.transmission_flags(structured || extended),
        structured_replies: structured || extended,
        extended_headers: extended,
        meta_contexts,
        export,
    }
}

#[test]
fn test_request_decode_and_validate_when_random_never_panic() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for _ in 0..20_000 {
        let mut bytes = [0u8; REQUEST_HEADER_LEN];
        bytes.iter_mut().for_each(|b| *b = rng.next() as u8);
        if rng.below(4) != 0 {
            bytes[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            bytes[6] = 0;
            bytes[7] = rng.below(10) as u8;
        }
        let Ok(header) = request::decode_request(&bytes) else {
            continue;
        };
        let _ = header.payload_len();
        let _ = request::validate(&header, &random_negotiated(&mut rng));
    }
}

#[test]
fn test_validate_when_ok_request_stays_inside_export() {
    let mut rng = Rng(0x0bad_cafe_f00d_d00d);
    for _ in 0..20_000 {
        let negotiated = random_negotiated(&mut rng);
        let header = RequestHeader {
            flags: rng.below(64) as u16,
            command: CommandType(rng.below(9) as u16),
            cookie: rng.next(),
            offset: rng.below(negotiated.export.size.saturating_add(2)),
            length: rng.below(1 << 21),
        };
        let ok = request::validate(&header, &negotiated) == request::Verdict::Ok;
        if ok && header.command != CommandType::DISC {
            let end = header.offset + header.length;
            assert!(end <= negotiated.export.size, "{header:?}");
        }
    }
}

#[test]
fn test_client_decoders_when_random_never_panic() {
    let mut rng = Rng(0xdead_beef_0123_4567);
    for _ in 0..20_000 {
        let mut buf = rng.bytes(64);
        if buf.len() >= 8 && rng.below(2) == 0 {
            let magic = match rng.below(3) {
                0 => SIMPLE_REPLY_MAGIC,
                1 => STRUCTURED_REPLY_MAGIC,
                _ => 0x0003_e889,
            };
            buf[..4].copy_from_slice(&magic.to_be_bytes());
        }
        let _ = client::decode_greeting(&buf);
        let _ = client::decode_export_name_reply(&buf, rng.below(2) == 0);
        let _ = client::decode_option_reply(&buf);
        let _ = client::decode_reply_header(&buf);
        let _ = client::decode_info(&buf);
        let _ = client::decode_server(&buf);
        let _ = client::decode_meta_context(&buf);
        let _ = client::decode_offset_data(&buf);
        let _ = client::decode_offset_hole(&buf);
        let _ = client::decode_block_status(&buf);
        let _ = client::decode_error(ReplyType(0x8000 | rng.below(4) as u16), &buf);
    }
}

/// Walks a structured READ reply: each byte of the request covered exactly
/// once, by data (from the plan's range at the same position) or a hole, and
/// DONE on the last chunk only.
fn assert_read_covers_request(wire: &[u8], req: &RequestHeader) {
    let mut covered = 0u64;
    let mut rest = wire;
    let mut done = false;
    while !rest.is_empty() {
        assert!(!done, "a chunk after DONE");
        let (header, used) = client::decode_reply_header(rest).unwrap().unwrap();
        let client::ReplyHeader::Chunk {
            flags,
            reply_type,
            cookie,
            length,
            ..
        } = header
        else {
            panic!("a simple reply to a structured READ");
        };
        assert_eq!(cookie, req.cookie);
        done = flags & REPLY_FLAG_DONE != 0;
        let payload = &rest[used..used + length as usize];
        let (offset, len) = match reply_type {
            ReplyType::OFFSET_DATA => {
                let (offset, data) = client::decode_offset_data(payload).unwrap();
                // The data is the request's own bytes: byte i is (offset + i) as u8.
                assert!(data
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == (offset - req.offset + i as u64) as u8));
                (offset, data.len() as u64)
            }
            ReplyType::OFFSET_HOLE => {
                let (offset, len) = client::decode_offset_hole(payload).unwrap();
                (offset, u64::from(len))
            }
            other => panic!("unexpected chunk {other:?}"),
        };
        assert_eq!(offset, req.offset + covered, "chunks in order, no gap");
        assert!(len > 0);
        covered += len;
        rest = &rest[used + length as usize..];
    }
    assert!(done, "the reply ends with DONE");
    assert_eq!(covered, req.length);
}

#[test]
fn test_read_shape_when_allocation_random_covers_request_exactly_once() {
    let mut rng = Rng(0x05ee_d0f5_a45e);
    for _ in 0..300 {
        let req = RequestHeader {
            flags: if rng.below(8) == 0 { CMD_FLAG_DF } else { 0 },
            command: CommandType::READ,
            cookie: rng.next(),
            offset: rng.below(1 << 40),
            length: 1 + rng.below(256 * 1024),
        };
        let allocation: Vec<(u32, u32)> = (0..rng.below(12))
            .map(|_| (rng.below(96 * 1024) as u32, rng.below(4) as u32))
            .collect();
        let plan = ReplyShape::Structured.read(&req, &allocation);
        let data: Vec<u8> = (0..req.length).map(|i| i as u8).collect();
        let wire = plan.to_wire(&data).expect("ranges inside the request");
        assert_read_covers_request(&wire, &req);
    }
}
