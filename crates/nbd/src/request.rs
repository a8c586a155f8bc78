//! Transmission requests: decoding the header (28-byte compact or, after
//! EXTENDED_HEADERS, 32-byte extended with a 64-bit length), saying what
//! follows it on the wire, and validating it against the negotiated export
//! once, at the edge, so the block layer below never sees an out-of-range or
//! ill-flagged request.
//!
//! ```text
//!   header bytes ─► HeaderForm::decode ─► RequestHeader ─► incoming(): what follows
//!       Nothing │ Data(n) WRITE │ Filter(n) BLOCK_STATUS ids │ Discard(n) │ TooLong
//!   (filter parsed by status_filter) ─► validate_selected ─► Verdict
//! ```

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
    /// 32 bits on the wire in compact mode, 64 in extended mode.
    pub length: u64,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestDecodeError {
    /// QEMU's text, which it also sends the client in extended mode.
    #[error("invalid magic (got {got:#x}, expected {expected:#x})")]
    BadMagic { got: u32, expected: u32 },
}

/// The request header's form, fixed by the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderForm {
    /// 28 bytes, 32-bit length.
    Compact,
    /// 32 bytes, 64-bit length (EXTENDED_HEADERS).
    Extended,
}

impl HeaderForm {
    pub fn of(negotiated: &Negotiated) -> Self {
        match negotiated.extended_headers {
            true => Self::Extended,
            false => Self::Compact,
        }
    }

    /// Bytes of one header on the wire.
    pub fn header_len(self) -> usize {
        match self {
            Self::Compact => REQUEST_HEADER_LEN,
            Self::Extended => EXTENDED_REQUEST_HEADER_LEN,
        }
    }

    fn magic(self) -> u32 {
        match self {
            Self::Compact => REQUEST_MAGIC,
            Self::Extended => EXTENDED_REQUEST_MAGIC,
        }
    }

    /// Decodes a header from the first [`Self::header_len`] bytes of `bytes`
    /// (the caller reads exactly that many; a shorter slice is read as
    /// zero-padded, so decoding is total).
    pub fn decode(self, bytes: &[u8]) -> Result<RequestHeader, RequestDecodeError> {
        let got = bytes
            .first_chunk::<4>()
            .map_or(0, |m| u32::from_be_bytes(*m));
        if got != self.magic() {
            return Err(RequestDecodeError::BadMagic {
                got,
                expected: self.magic(),
            });
        }
        Ok(self.fields(bytes))
    }

    /// The header's fields whatever its magic: what QEMU echoes (cookie,
    /// offset) in the error it sends for a bad magic in extended mode.
    pub fn fields(self, bytes: &[u8]) -> RequestHeader {
        let mut b = [0u8; EXTENDED_REQUEST_HEADER_LEN];
        let n = bytes.len().min(self.header_len());
        b[..n].copy_from_slice(&bytes[..n]);
        let be32 = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let be64 = |i: usize| (u64::from(be32(i)) << 32) | u64::from(be32(i + 4));
        RequestHeader {
            flags: u16::from_be_bytes([b[4], b[5]]),
            command: CommandType(u16::from_be_bytes([b[6], b[7]])),
            cookie: be64(8),
            offset: be64(16),
            length: match self {
                Self::Compact => u64::from(be32(24)),
                Self::Extended => be64(24),
            },
        }
    }
}

/// Decodes a compact (28-byte) header.
pub fn decode_request(
    bytes: &[u8; REQUEST_HEADER_LEN],
) -> Result<RequestHeader, RequestDecodeError> {
    HeaderForm::Compact.decode(bytes)
}

impl RequestHeader {
    /// Bytes of payload that follow this compact header on the wire (a
    /// WRITE's data); see [`incoming`] for both forms.
    pub fn payload_len(&self) -> usize {
        match self.command {
            CommandType::WRITE => self.length as usize,
            _ => 0,
        }
    }

    /// Encodes the compact header (used by the client codec and tests); a
    /// length past 32 bits is sent as `u32::MAX`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        self.encode_fields(out);
        let length = u32::try_from(self.length).unwrap_or(u32::MAX);
        out.extend_from_slice(&length.to_be_bytes());
    }

    /// Encodes the extended (32-byte) header.
    pub fn encode_extended(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        self.encode_fields(out);
        out.extend_from_slice(&self.length.to_be_bytes());
    }

    fn encode_fields(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.command.0.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
    }
}

/// What follows a header on the wire, and what becomes of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// Nothing: validate the header as it is.
    Nothing,
    /// A WRITE's `n` bytes of data.
    Data(usize),
    /// BLOCK_STATUS with PAYLOAD_LEN: `n` bytes of length and context ids,
    /// for [`status_filter`].
    Filter(usize),
    /// `n` bytes the command cannot take (PAYLOAD_LEN on a command other than
    /// WRITE and BLOCK_STATUS): read and dropped, and the request is then
    /// validated with length 0, failing on its flags (QEMU's handling).
    Discard(usize),
    /// A payload too long to take in, so the stream cannot be kept in step:
    /// answer with this EINVAL in extended mode (QEMU does), then disconnect.
    TooLong { message: String },
}

/// What follows `header`: in compact mode a WRITE's data; in extended mode
/// whatever PAYLOAD_LEN announces too (a WRITE's data with or without the
/// flag, as QEMU takes it). A payload over 32 MiB cannot be taken in.
pub fn incoming(header: &RequestHeader, negotiated: &Negotiated) -> Incoming {
    let with_payload = negotiated.extended_headers && header.flags & CMD_FLAG_PAYLOAD_LEN != 0;
    let announced = header.command == CommandType::WRITE || with_payload;
    if !announced {
        return Incoming::Nothing;
    }
    if header.length > u64::from(MAX_PAYLOAD) {
        return Incoming::TooLong {
            message: too_long(header.length),
        };
    }
    let n = header.length as usize;
    match header.command {
        CommandType::WRITE => Incoming::Data(n),
        CommandType::BLOCK_STATUS => Incoming::Filter(n),
        _ => Incoming::Discard(n),
    }
}

/// A BLOCK_STATUS payload as QEMU reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatusFilter {
    /// The effective length and the ids asked for (each negotiated, none
    /// twice), in the client's order.
    Valid { length: u64, ids: Vec<u32> },
    /// Malformed (length not 8 + 4n, more ids than negotiated, an id not
    /// negotiated or repeated): the request fails with "payload not valid"
    /// (or "not negotiated" when no context is).
    Invalid,
}

/// Reads a BLOCK_STATUS payload: a 64-bit effective length, then context ids.
pub fn status_filter(payload: &[u8], negotiated: &Negotiated) -> StatusFilter {
    let negotiated_ids = &negotiated.meta_contexts;
    let ids_len = payload.len().wrapping_sub(8);
    if payload.len() < 8 || !ids_len.is_multiple_of(4) || ids_len / 4 > negotiated_ids.len() {
        return StatusFilter::Invalid;
    }
    let mut length = [0u8; 8];
    length.copy_from_slice(&payload[..8]);
    let mut ids: Vec<u32> = Vec::with_capacity(ids_len / 4);
    for chunk in payload[8..].chunks_exact(4) {
        let id = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        if ids.contains(&id) || !negotiated_ids.iter().any(|(n, _)| *n == id) {
            return StatusFilter::Invalid;
        }
        ids.push(id);
    }
    StatusFilter::Valid {
        length: u64::from_be_bytes(length),
        ids,
    }
}

/// QEMU's text for a length over the 32 MiB buffer.
fn too_long(length: u64) -> String {
    format!("len ({length}) is larger than max len ({MAX_PAYLOAD})")
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
    validate_selected(header, negotiated, negotiated.meta_contexts.len())
}

/// [`validate`] for a request whose BLOCK_STATUS asks for `selected`
/// contexts: all negotiated ones, or those of its payload filter (0 for an
/// invalid filter). `header` is the effective one: a filter's length, or
/// length 0 after a discarded payload.
pub fn validate_selected(
    header: &RequestHeader,
    negotiated: &Negotiated,
    selected: usize,
) -> Verdict {
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
    check_command(header, negotiated, selected)
}

/// READ, WRITE and CACHE are bounded by the 32 MiB buffer. A WRITE that big
/// cannot even be skipped safely, so QEMU drops the client.
fn check_length(header: &RequestHeader) -> Option<Verdict> {
    let cmd = header.command;
    let bounded = matches!(
        cmd,
        CommandType::READ | CommandType::WRITE | CommandType::CACHE
    );
    if !bounded || header.length <= u64::from(MAX_PAYLOAD) {
        return None;
    }
    let message = too_long(header.length);
    Some(match cmd {
        CommandType::WRITE => Verdict::Disconnect { reason: message },
        _ => reject(NbdErrno::EINVAL, message),
    })
}

/// Every command but DISC must stay inside the export, even FLUSH and
/// unknown ones (QEMU checks `from`/`len` for all of them).
fn check_range(header: &RequestHeader, size: u64) -> Option<Verdict> {
    let end = header.offset.checked_add(header.length);
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
/// FAST_ZERO on WRITE_ZEROES, REQ_ONE on BLOCK_STATUS, and in extended mode
/// PAYLOAD_LEN on the two commands that take a payload, WRITE and BLOCK_STATUS.
fn valid_flags(cmd: CommandType, negotiated: &Negotiated) -> u16 {
    let fast_zero = negotiated.transmission_flags & FLAG_SEND_FAST_ZERO != 0;
    let payload = match negotiated.extended_headers {
        true => CMD_FLAG_PAYLOAD_LEN,
        false => 0,
    };
    CMD_FLAG_FUA
        | match cmd {
            CommandType::READ if negotiated.structured_replies => CMD_FLAG_DF,
            CommandType::WRITE => payload,
            CommandType::WRITE_ZEROES if fast_zero => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CommandType::WRITE_ZEROES => CMD_FLAG_NO_HOLE,
            CommandType::BLOCK_STATUS => CMD_FLAG_REQ_ONE | payload,
            _ => 0,
        }
}

/// The checks QEMU makes while dispatching: unknown commands, and
/// BLOCK_STATUS without a length, without a context negotiated, or with a
/// payload that selects none.
fn check_command(header: &RequestHeader, negotiated: &Negotiated, selected: usize) -> Verdict {
    match header.command {
        CommandType::READ
        | CommandType::WRITE
        | CommandType::FLUSH
        | CommandType::TRIM
        | CommandType::CACHE
        | CommandType::WRITE_ZEROES => Verdict::Ok,
        CommandType::BLOCK_STATUS if selected > 0 && header.length == 0 => {
            reject(NbdErrno::EINVAL, "need non-zero length")
        }
        CommandType::BLOCK_STATUS if selected > 0 => Verdict::Ok,
        CommandType::BLOCK_STATUS if !negotiated.meta_contexts.is_empty() => {
            reject(NbdErrno::EINVAL, "CMD_BLOCK_STATUS payload not valid")
        }
        CommandType::BLOCK_STATUS => reject(NbdErrno::EINVAL, "CMD_BLOCK_STATUS not negotiated"),
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
            extended_headers: false,
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
            length: u64::from(length),
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
        let err = RequestDecodeError::BadMagic {
            got: 0,
            expected: REQUEST_MAGIC,
        };
        assert_eq!(decode_request(&arr), Err(err));
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

    fn extended_session() -> Negotiated {
        let mut s = session(false);
        s.extended_headers = true;
        s.meta_contexts
            .push((2, MetaContext::DirtyBitmap("b0".into())));
        s
    }

    #[test]
    fn test_extended_decode_when_encoded_keeps_a_64_bit_length() {
        let r = RequestHeader {
            length: 1 << 40,
            ..req(CommandType::WRITE_ZEROES, 4096, 0, 0)
        };
        let mut bytes = Vec::new();
        r.encode_extended(&mut bytes);
        assert_eq!(bytes.len(), EXTENDED_REQUEST_HEADER_LEN);
        assert_eq!(HeaderForm::Extended.decode(&bytes), Ok(r));
    }

    #[test]
    fn test_extended_decode_when_compact_magic_returns_qemu_message() {
        let mut bytes = Vec::new();
        req(CommandType::READ, 0, 512, 0).encode(&mut bytes);
        bytes.extend_from_slice(&[0; 4]);
        let err = HeaderForm::Extended.decode(&bytes).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid magic (got 0x25609513, expected 0x21e41c71)"
        );
    }

    #[test]
    fn test_incoming_when_extended_payload_len_on_each_command() {
        let s = extended_session();
        let with = |cmd, len| req(cmd, 0, len, CMD_FLAG_PAYLOAD_LEN);
        assert_eq!(
            incoming(&with(CommandType::WRITE, 512), &s),
            Incoming::Data(512)
        );
        assert_eq!(
            incoming(&with(CommandType::BLOCK_STATUS, 12), &s),
            Incoming::Filter(12)
        );
        assert_eq!(
            incoming(&with(CommandType::TRIM, 8), &s),
            Incoming::Discard(8)
        );
        assert_eq!(
            incoming(&req(CommandType::TRIM, 0, 8, 0), &s),
            Incoming::Nothing
        );
        let too_long = incoming(&with(CommandType::BLOCK_STATUS, MAX_PAYLOAD + 4), &s);
        let message = "len (33554436) is larger than max len (33554432)".to_string();
        assert_eq!(too_long, Incoming::TooLong { message });
    }

    #[test]
    fn test_incoming_when_compact_ignores_payload_len_flag() {
        let s = session(false);
        let r = req(CommandType::TRIM, 0, 8, CMD_FLAG_PAYLOAD_LEN);
        assert_eq!(incoming(&r, &s), Incoming::Nothing);
        assert_eq!(
            validate(&r, &s),
            reject(
                NbdErrno::EINVAL,
                "unsupported flags for command trim (got 0x20)"
            )
        );
    }

    fn filter(length: u64, ids: &[u32]) -> Vec<u8> {
        let mut p = length.to_be_bytes().to_vec();
        ids.iter()
            .for_each(|i| p.extend_from_slice(&i.to_be_bytes()));
        p
    }

    #[test]
    fn test_status_filter_when_ids_negotiated_returns_them_in_order() {
        let got = status_filter(&filter(4096, &[2, 0]), &extended_session());
        let ids = vec![2, 0];
        assert_eq!(got, StatusFilter::Valid { length: 4096, ids });
    }

    #[test]
    fn test_status_filter_when_malformed_returns_invalid() {
        let s = extended_session();
        for payload in [
            filter(4096, &[5]),
            filter(4096, &[0, 0]),
            filter(4096, &[0, 2, 1]),
            vec![0; 6],
            vec![0; 10],
        ] {
            assert_eq!(
                status_filter(&payload, &s),
                StatusFilter::Invalid,
                "{payload:?}"
            );
        }
    }

    #[test]
    fn test_validate_selected_when_filter_selects_none_returns_payload_not_valid() {
        let s = extended_session();
        let r = req(CommandType::BLOCK_STATUS, 0, 0, CMD_FLAG_PAYLOAD_LEN);
        let v = validate_selected(&r, &s, 0);
        assert_eq!(
            v,
            reject(NbdErrno::EINVAL, "CMD_BLOCK_STATUS payload not valid")
        );
        let v = validate_selected(&RequestHeader { length: 512, ..r }, &s, 1);
        assert_eq!(v, Verdict::Ok);
    }

    #[test]
    fn test_validate_when_extended_trim_covers_a_huge_export_in_one_request() {
        let mut s = extended_session();
        s.export.size = 1 << 40;
        let r = RequestHeader {
            length: 1 << 40,
            ..req(CommandType::TRIM, 0, 0, 0)
        };
        assert_eq!(validate(&r, &s), Verdict::Ok);
        let past = RequestHeader {
            length: (1 << 40) + 1,
            ..r
        };
        let message = "operation past EOF; From: 0, Len: 1099511627777, Size: 1099511627776";
        assert_eq!(validate(&past, &s), reject(NbdErrno::EINVAL, message));
    }
}
