//! NBD against the real binary through the crate's own client codec (the
//! interop suite does the same with libnbd, qemu-img and friends).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use common::{read_n, Daemon};
use nbd::client::{self, ReplyHeader};
use nbd::consts::{CMD_FLAG_FUA, FLAG_READ_ONLY, SIMPLE_REPLY_MAGIC};
use nbd::request::RequestHeader;
use nbd::types::{CommandType, NbdErrno, OptionReplyType, OptionType, ReplyType};

fn daemon(writable: bool) -> Daemon {
    let w = if writable { "on" } else { "off" };
    Daemon::start(
        "",
        &[
            "--blockdev".into(),
            "driver=null-co,node-name=n0,size=8388608,read-zeroes=on".into(),
            "--export".into(),
            format!("type=nbd,id=e0,node-name=n0,writable={w}"),
        ],
    )
}

/// Greeting, flags, STRUCTURED_REPLY and GO for `n0`; returns the export flags.
fn handshake(s: &mut UnixStream) -> u16 {
    assert_eq!(&read_n(s, 8), b"NBDMAGIC");
    read_n(s, 10);
    let mut out = Vec::new();
    client::client_flags(&mut out, 3);
    client::structured_reply(&mut out);
    client::go(&mut out, "n0", &[]);
    s.write_all(&out).unwrap();
    let mut flags = 0;
    loop {
        let reply = read_option_reply(s);
        match reply.reply {
            OptionReplyType::ACK if reply.option == OptionType::GO => return flags,
            OptionReplyType::ACK => {}
            OptionReplyType::INFO => {
                if let Some(client::Info::Export { flags: f, .. }) =
                    client::decode_info(&reply.data)
                {
                    flags = f;
                }
            }
            other => panic!("unexpected option reply {other:?}: {}", reply.message()),
        }
    }
}

fn read_option_reply(s: &mut UnixStream) -> client::OptionReply {
    let mut buf = read_n(s, 20);
    let len = u32::from_be_bytes(buf[16..20].try_into().unwrap()) as usize;
    buf.extend(read_n(s, len));
    client::decode_option_reply(&buf).unwrap().unwrap().0
}

fn send(
    s: &mut UnixStream,
    command: CommandType,
    cookie: u64,
    offset: u64,
    data: &[u8],
    length: u32,
) {
    let mut out = Vec::new();
    let flags = if command == CommandType::WRITE {
        CMD_FLAG_FUA
    } else {
        0
    };
    let header = RequestHeader {
        flags,
        command,
        cookie,
        offset,
        length: u64::from(length),
    };
    client::request(&mut out, &header);
    out.extend_from_slice(data);
    s.write_all(&out).unwrap();
}

/// Reads one whole reply: (cookie, error, the data its chunks carried).
fn read_reply(s: &mut UnixStream) -> (u64, NbdErrno, Vec<u8>) {
    let mut data = Vec::new();
    let mut error = NbdErrno::OK;
    loop {
        let mut head = read_n(s, 4);
        let simple = head == SIMPLE_REPLY_MAGIC.to_be_bytes();
        head.extend(read_n(s, if simple { 12 } else { 16 }));
        match client::decode_reply_header(&head).unwrap().unwrap().0 {
            ReplyHeader::Simple { cookie, error } => return (cookie, error, data),
            ReplyHeader::Chunk {
                flags,
                reply_type,
                cookie,
                length,
                ..
            } => {
                let payload = read_n(s, length as usize);
                match reply_type {
                    ReplyType::OFFSET_DATA => {
                        data.extend_from_slice(client::decode_offset_data(&payload).unwrap().1)
                    }
                    ReplyType::OFFSET_HOLE => {
                        let hole = client::decode_offset_hole(&payload).unwrap().1 as usize;
                        data.resize(data.len() + hole, 0);
                    }
                    t if t.is_error() => error = client::decode_error(t, &payload).unwrap().error,
                    _ => {}
                }
                if flags & 1 != 0 {
                    return (cookie, error, data);
                }
            }
        }
    }
}

#[test]
fn test_pipelined_requests_all_get_their_own_reply() {
    let d = daemon(true);
    let mut s = d.nbd();
    handshake(&mut s);
    for cookie in 0..64u64 {
        send(
            &mut s,
            CommandType::WRITE,
            cookie,
            cookie * 4096,
            &[7u8; 4096],
            4096,
        );
    }
    for cookie in 64..128u64 {
        send(
            &mut s,
            CommandType::READ,
            cookie,
            (cookie - 64) * 4096,
            &[],
            4096,
        );
    }
    let replies: HashMap<u64, (NbdErrno, Vec<u8>)> = (0..128)
        .map(|_| {
            let (cookie, error, data) = read_reply(&mut s);
            (cookie, (error, data))
        })
        .collect();
    assert_eq!(replies.len(), 128, "every cookie answered exactly once");
    assert!(replies.values().all(|(e, _)| *e == NbdErrno::OK));
    // null-co discards writes and reads back zeroes.
    assert_eq!(replies[&64].1, vec![0u8; 4096]);
}

#[test]
fn test_write_to_read_only_export_is_eperm_and_connection_lives() {
    let d = daemon(false);
    let mut s = d.nbd();
    let flags = handshake(&mut s);
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    send(&mut s, CommandType::WRITE, 1, 0, &[1u8; 512], 512);
    assert_eq!(read_reply(&mut s).1, NbdErrno::EPERM);
    send(&mut s, CommandType::READ, 2, 0, &[], 512);
    let (cookie, error, data) = read_reply(&mut s);
    assert_eq!((cookie, error, data.len()), (2, NbdErrno::OK, 512));
}

#[test]
fn test_bad_request_magic_drops_only_that_client() {
    let d = daemon(true);
    let mut bad = d.nbd();
    handshake(&mut bad);
    bad.write_all(&[0u8; 28]).unwrap();
    let mut rest = Vec::new();
    assert_eq!(bad.read_to_end(&mut rest).unwrap_or(0), 0);
    let mut good = d.nbd();
    handshake(&mut good);
    send(&mut good, CommandType::FLUSH, 9, 0, &[], 0);
    assert_eq!(read_reply(&mut good), (9, NbdErrno::OK, Vec::new()));
}
