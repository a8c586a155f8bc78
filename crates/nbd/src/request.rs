//! Transmission requests: decoding the 28-byte header, and validating it
//! against the negotiated export once, at the edge, so the block layer below
//! never sees an out-of-range or ill-flagged request.

use thiserror::Error;

use crate::consts::*;
use crate::handshake::Negotiated;
use crate::types::{CommandType, NbdErrno};

/// A decoded request header. A WRITE's payload follows it on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: CommandType,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestDecodeError {
    #[error("bad request magic {0:#x}")]
    BadMagic(u32),
}

pub fn decode_request(
    bytes: &[u8; REQUEST_HEADER_LEN],
) -> Result<RequestHeader, RequestDecodeError> {
    let be32 = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let be64 = |i: usize| (u64::from(be32(i)) << 32) | u64::from(be32(i + 4));
    let magic = be32(0);
    if magic != REQUEST_MAGIC {
        return Err(RequestDecodeError::BadMagic(magic));
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes([bytes[4], bytes[5]]),
        command: CommandType(u16::from_be_bytes([bytes[6], bytes[7]])),
        cookie: be64(8),
        offset: be64(16),
        length: be32(24),
    })
}

impl RequestHeader {
    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> usize {
        match self.command {
            CommandType::WRITE => self.length as usize,
            _ => 0,
        }
    }

    /// Encodes the header (used by the client codec and tests).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.command.0.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }
}

/// What to do with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Answer with this error; the connection goes on. A WRITE's payload
    /// (`payload_len()` bytes) must still be read and discarded first.
    Reject {
        errno: NbdErrno,
        message: String,
    },
    /// The stream can't be resynchronised (an oversized WRITE payload): drop the client.
    Disconnect {
        reason: String,
    },
}

fn reject(errno: NbdErrno, message: impl Into<String>) -> Verdict {
    Verdict::Reject {
        errno,
        message: message.into(),
    }
}

/// The name QEMU gives a command in its messages (`nbd_cmd_lookup`).
pub fn command_name(command: CommandType) -> &'static str {
    match command {
        CommandType::READ => "read",
        CommandType::WRITE => "write",
        CommandType::DISC => "disconnect",
        CommandType::FLUSH => "flush",
        CommandType::TRIM => "trim",
        CommandType::CACHE => "cache",
        CommandType::WRITE_ZEROES => "write zeroes",
        CommandType::BLOCK_STATUS => "block status",
        _ => "<unknown>",
    }
}

/// Validates `header` against the negotiated session, with QEMU's checks in
/// QEMU's order (`nbd_co_receive_request`, then `nbd_handle_request`) and
/// QEMU's messages, but with the errno the NBD spec prefers where QEMU sends
/// EINVAL for everything: EPERM for writes to a read-only export, ENOSPC for
/// writes past the end.
///
/// DISC is always Ok: the shell closes without a reply, whatever its fields.
pub fn validate(header: &RequestHeader, negotiated: &Negotiated) -> Verdict {
    let cmd = header.command;
    if cmd == CommandType::DISC {
        return Verdict::Ok;
    }
    if let Some(verdict) = check_length(header) {
        return verdict;
    }
    let writes = matches!(
        cmd,
        CommandType::WRITE | CommandType::TRIM | CommandType::WRITE_ZEROES
    );
    if writes && negotiated.transmission_flags & FLAG_READ_ONLY != 0 {
        return reject(NbdErrno::EPERM, "Export is read-only");
    }
    if let Some(verdict) = check_range(header, negotiated.export.size) {
        return verdict;
    }
    let invalid = header.flags & !valid_flags(cmd, negotiated);
    if invalid != 0 {
        let message = format!(
            "unsupported flags for command {} (got 0x{:x})",
            command_name(cmd),
            header.flags
        );
        return reject(NbdErrno::EINVAL, message);
    }
    check_command(header, negotiated)
}

/// READ, WRITE and CACHE are bounded by the 32 MiB buffer. A WRITE that big
/// cannot even be skipped safely, so QEMU drops the client.
fn check_length(header: &RequestHeader) -> Option<Verdict> {
    let cmd = header.command;
    let bounded = matches!(
        cmd,
        CommandType::READ | CommandType::WRITE | CommandType::CACHE
    );
    if !bounded || header.length <= MAX_PAYLOAD {
        return None;
    }
    let message = format!(
        "len ({}) is larger than max len ({MAX_PAYLOAD})",
        header.length
    );
    Some(match cmd {
        CommandType::WRITE => Verdict::Disconnect { reason: message },
        _ => reject(NbdErrno::EINVAL, message),
    })
}

/// Every command but DISC must stay inside the export, even FLUSH and
/// unknown ones (QEMU checks `from`/`len` for all of them).
fn check_range(header: &RequestHeader, size: u64) -> Option<Verdict> {
    let end = header.offset.checked_add(u64::from(header.length));
    if end.is_some_and(|end| end <= size) {
        return None;
    }
    let errno = match header.command {
        CommandType::WRITE | CommandType::WRITE_ZEROES => NbdErrno::ENOSPC,
        _ => NbdErrno::EINVAL,
    };
    let message = format!(
        "operation past EOF; From: {}, Len: {}, Size: {size}",
        header.offset, header.length
    );
    Some(reject(errno, message))
}

/// Flags each command accepts: FUA everywhere (QEMU always advertises it),
/// DF on READ once structured replies are on, NO_HOLE and (if advertised)
/// FAST_ZERO on WRITE_ZEROES, REQ_ONE on BLOCK_STATUS.
fn valid_flags(cmd: CommandType, negotiated: &Negotiated) -> u16 {
    let fast_zero = negotiated.transmission_flags & FLAG_SEND_FAST_ZERO != 0;
    CMD_FLAG_FUA
        | match cmd {
            CommandType::READ if negotiated.structured_replies => CMD_FLAG_DF,
            CommandType::WRITE_ZEROES if fast_zero => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CommandType::WRITE_ZEROES => CMD_FLAG_NO_HOLE,
            CommandType::BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

/// The checks QEMU makes while dispatching: unknown commands, and
/// BLOCK_STATUS without a context or without a length.
fn check_command(header: &RequestHeader, negotiated: &Negotiated) -> Verdict {
    match header.command {
        CommandType::READ
        | CommandType::WRITE
        | CommandType::FLUSH
        | CommandType::TRIM
        | CommandType::CACHE
        | CommandType::WRITE_ZEROES => Verdict::Ok,
        CommandType::BLOCK_STATUS if negotiated.meta_contexts.is_empty() => {
            reject(NbdErrno::EINVAL, "CMD_BLOCK_STATUS not negotiated")
        }
        CommandType::BLOCK_STATUS if header.length == 0 => {
            reject(NbdErrno::EINVAL, "need non-zero length")
        }
        CommandType::BLOCK_STATUS => Verdict::Ok,
        other => reject(
            NbdErrno::EINVAL,
            format!("invalid request type ({}) received", other.0),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::tests::writable_export;
    use crate::export::MetaContext;

    fn session(read_only: bool) -> Negotiated {
        let mut export = writable_export();
        export.read_only = read_only;
        Negotiated {
            transmission_flags: export.transmission_flags(true),
            structured_replies: true,
            meta_contexts: vec![(0, MetaContext::BaseAllocation)],
            export,
        }
    }

    fn req(command: CommandType, offset: u64, length: u32, flags: u16) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    /// The errno of a rejection, or None for Ok/Disconnect.
    fn errno(verdict: Verdict) -> Option<NbdErrno> {
        match verdict {
            Verdict::Reject { errno, .. } => Some(errno),
            _ => None,
        }
    }

    #[test]
    fn test_decode_request_when_encoded_returns_same_header() {
        let r = req(CommandType::WRITE, 4096, 512, CMD_FLAG_FUA);
        let mut bytes = Vec::new();
        r.encode(&mut bytes);
        let arr: [u8; REQUEST_HEADER_LEN] = bytes.try_into().unwrap();
        assert_eq!(decode_request(&arr), Ok(r));
    }

    #[test]
    fn test_decode_request_when_magic_wrong_returns_bad_magic() {
        let arr = [0u8; REQUEST_HEADER_LEN];
        assert_eq!(decode_request(&arr), Err(RequestDecodeError::BadMagic(0)));
    }

    #[test]
    fn test_payload_len_when_write_returns_length() {
        assert_eq!(req(CommandType::WRITE, 0, 512, 0).payload_len(), 512);
    }

    #[test]
    fn test_payload_len_when_trim_returns_zero() {
        assert_eq!(req(CommandType::TRIM, 0, 512, 0).payload_len(), 0);
    }

    #[test]
    fn test_validate_when_read_in_range_returns_ok() {
        let v = validate(
            &req(CommandType::READ, 0, 4096, CMD_FLAG_DF),
            &session(false),
        );
        assert_eq!(v, Verdict::Ok);
    }

    #[test]
    fn test_validate_when_write_on_read_only_returns_eperm() {
        let v = validate(&req(CommandType::WRITE, 0, 512, 0), &session(true));
        assert_eq!(v, reject(NbdErrno::EPERM, "Export is read-only"));
    }

    #[test]
    fn test_validate_when_trim_on_read_only_returns_eperm() {
        let v = validate(&req(CommandType::TRIM, 0, 512, 0), &session(true));
        assert_eq!(errno(v), Some(NbdErrno::EPERM));
    }

    #[test]
    fn test_validate_when_write_past_end_returns_enospc() {
        let v = validate(&req(CommandType::WRITE, 1 << 20, 512, 0), &session(false));
        assert_eq!(errno(v), Some(NbdErrno::ENOSPC));
    }

    #[test]
    fn test_validate_when_write_zeroes_past_end_returns_enospc() {
        let v = validate(
            &req(CommandType::WRITE_ZEROES, 1 << 20, 1, 0),
            &session(false),
        );
        assert_eq!(errno(v), Some(NbdErrno::ENOSPC));
    }

    #[test]
    fn test_validate_when_read_past_end_returns_qemu_message() {
        let v = validate(&req(CommandType::READ, 1 << 20, 512, 0), &session(false));
        let expected = "operation past EOF; From: 1048576, Len: 512, Size: 1048576";
        assert_eq!(v, reject(NbdErrno::EINVAL, expected));
    }

    #[test]
    fn test_validate_when_block_status_past_end_returns_einval() {
        let v = validate(
            &req(CommandType::BLOCK_STATUS, 1 << 20, 1, 0),
            &session(false),
        );
        assert_eq!(errno(v), Some(NbdErrno::EINVAL));
    }

    #[test]
    fn test_validate_when_flush_has_range_past_end_returns_einval() {
        let v = validate(&req(CommandType::FLUSH, 1 << 21, 0, 0), &session(false));
        assert_eq!(errno(v), Some(NbdErrno::EINVAL));
    }

    #[test]
    fn test_validate_when_read_over_32_mib_returns_qemu_message() {
        let v = validate(
            &req(CommandType::READ, 0, MAX_PAYLOAD + 1, 0),
            &session(false),
        );
        let expected = "len (33554433) is larger than max len (33554432)";
        assert_eq!(v, reject(NbdErrno::EINVAL, expected));
    }

    #[test]
    fn test_validate_when_cache_over_32_mib_returns_einval() {
        let v = validate(
            &req(CommandType::CACHE, 0, MAX_PAYLOAD + 1, 0),
            &session(false),
        );
        assert_eq!(errno(v), Some(NbdErrno::EINVAL));
    }

    #[test]
    fn test_validate_when_trim_over_32_mib_is_not_length_checked() {
        let mut s = session(false);
        s.export.size = 1 << 30;
        let v = validate(&req(CommandType::TRIM, 0, MAX_PAYLOAD + 1, 0), &s);
        assert_eq!(v, Verdict::Ok);
    }

    #[test]
    fn test_validate_when_write_over_32_mib_returns_disconnect() {
        let v = validate(
            &req(CommandType::WRITE, 0, MAX_PAYLOAD + 1, 0),
            &session(false),
        );
        assert!(matches!(v, Verdict::Disconnect { .. }));
    }

    #[test]
    fn test_validate_when_offset_overflows_returns_einval() {
        let v = validate(&req(CommandType::READ, u64::MAX, 1, 0), &session(false));
        assert_eq!(errno(v), Some(NbdErrno::EINVAL));
    }

    #[test]
    fn test_validate_when_req_one_on_read_returns_qemu_message() {
        let v = validate(
            &req(CommandType::READ, 0, 512, CMD_FLAG_REQ_ONE),
            &session(false),
        );
        let expected = "unsupported flags for command read (got 0x8)";
        assert_eq!(v, reject(NbdErrno::EINVAL, expected));
    }

    #[test]
    fn test_validate_when_df_without_structured_returns_einval() {
        let mut s = session(false);
        s.structured_replies = false;
        let v = validate(&req(CommandType::READ, 0, 512, CMD_FLAG_DF), &s);
        assert_eq!(errno(v), Some(NbdErrno::EINVAL));
    }

    #[test]
    fn test_validate_when_fast_zero_not_advertised_returns_einval() {
        let mut s = session(false);
        s.transmission_flags &= !FLAG_SEND_FAST_ZERO;
        let flags = CMD_FLAG_FAST_ZERO;
        let v = validate(&req(CommandType::WRITE_ZEROES, 0, 512, flags), &s);
        assert_eq!(errno(v), Some(NbdErrno::EINVAL));
    }

    #[test]
    fn test_validate_when_fast_zero_advertised_returns_ok() {
        let flags = CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE | CMD_FLAG_FUA;
        let v = validate(
            &req(CommandType::WRITE_ZEROES, 0, 512, flags),
            &session(false),
        );
        assert_eq!(v, Verdict::Ok);
    }

    #[test]
    fn test_validate_when_unknown_command_returns_qemu_message() {
        let v = validate(&req(CommandType(42), 0, 0, 0), &session(false));
        assert_eq!(
            v,
            reject(NbdErrno::EINVAL, "invalid request type (42) received")
        );
    }

    #[test]
    fn test_validate_when_disc_has_garbage_fields_returns_ok() {
        let v = validate(
            &req(CommandType::DISC, u64::MAX, u32::MAX, 0xffff),
            &session(false),
        );
        assert_eq!(v, Verdict::Ok);
    }

    #[test]
    fn test_validate_when_block_status_without_context_returns_einval() {
        let mut s = session(false);
        s.meta_contexts.clear();
        let v = validate(&req(CommandType::BLOCK_STATUS, 0, 512, 0), &s);
        assert_eq!(
            v,
            reject(NbdErrno::EINVAL, "CMD_BLOCK_STATUS not negotiated")
        );
    }

    #[test]
    fn test_validate_when_block_status_has_zero_length_returns_einval() {
        let v = validate(&req(CommandType::BLOCK_STATUS, 0, 0, 0), &session(false));
        assert_eq!(v, reject(NbdErrno::EINVAL, "need non-zero length"));
    }
}
