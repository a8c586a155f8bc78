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
    /// Answer with this error; the connection goes on.
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

/// Validates `header` against the negotiated session, as QEMU's server does,
/// using the errno the NBD spec prefers where QEMU is looser (EPERM for
/// writes to a read-only export, ENOSPC for writes past the end).
pub fn validate(header: &RequestHeader, negotiated: &Negotiated) -> Verdict {
    let cmd = header.command;
    let flags = negotiated.transmission_flags;
    if cmd == CommandType::DISC {
        return Verdict::Ok;
    }
    let writes = matches!(
        cmd,
        CommandType::WRITE | CommandType::TRIM | CommandType::WRITE_ZEROES
    );
    let ranged = writes
        || matches!(
            cmd,
            CommandType::READ | CommandType::CACHE | CommandType::BLOCK_STATUS
        );
    if !ranged && cmd != CommandType::FLUSH {
        return reject(
            NbdErrno::EINVAL,
            format!("invalid request type ({}) received", cmd.0),
        );
    }
    if header.length > MAX_PAYLOAD && cmd == CommandType::WRITE {
        return Verdict::Disconnect {
            reason: format!(
                "WRITE payload of {} bytes exceeds {MAX_PAYLOAD}",
                header.length
            ),
        };
    }
    if let Some(v) = check_flags(header, negotiated) {
        return v;
    }
    if writes && flags & FLAG_READ_ONLY != 0 {
        return reject(NbdErrno::EPERM, "export is read-only");
    }
    if header.length > MAX_PAYLOAD && cmd == CommandType::READ {
        return reject(
            NbdErrno::EINVAL,
            format!(
                "len ({}) is larger than max len ({MAX_PAYLOAD})",
                header.length
            ),
        );
    }
    let size = negotiated.export.size;
    let end = header.offset.checked_add(u64::from(header.length));
    if ranged && end.is_none_or(|e| e > size) {
        let errno = match cmd {
            CommandType::WRITE | CommandType::WRITE_ZEROES => NbdErrno::ENOSPC,
            _ => NbdErrno::EINVAL,
        };
        let message = format!(
            "operation past EOF; From: {}, Len: {}, Size: {size}",
            header.offset, header.length
        );
        return reject(errno, message);
    }
    if cmd == CommandType::BLOCK_STATUS && negotiated.meta_contexts.is_empty() {
        return reject(NbdErrno::EINVAL, "CMD_BLOCK_STATUS not negotiated");
    }
    Verdict::Ok
}

/// Flags must be ones this command accepts and the server advertised.
fn check_flags(header: &RequestHeader, negotiated: &Negotiated) -> Option<Verdict> {
    let mut allowed = CMD_FLAG_FUA;
    match header.command {
        CommandType::READ if negotiated.structured_replies => allowed |= CMD_FLAG_DF,
        CommandType::WRITE_ZEROES => {
            allowed |= CMD_FLAG_NO_HOLE;
            if negotiated.transmission_flags & FLAG_SEND_FAST_ZERO != 0 {
                allowed |= CMD_FLAG_FAST_ZERO;
            }
        }
        CommandType::BLOCK_STATUS => allowed |= CMD_FLAG_REQ_ONE,
        _ => {}
    }
    (header.flags & !allowed != 0).then(|| {
        reject(
            NbdErrno::EINVAL,
            format!("unsupported flags (got 0x{:x})", header.flags),
        )
    })
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

    #[test]
    fn test_decode_request_roundtrips_encode() {
        let r = req(CommandType::WRITE, 4096, 512, CMD_FLAG_FUA);
        let mut bytes = Vec::new();
        r.encode(&mut bytes);
        let arr: [u8; REQUEST_HEADER_LEN] = bytes.try_into().unwrap();
        assert_eq!(decode_request(&arr), Ok(r));
    }

    #[test]
    fn test_decode_request_bad_magic_is_an_error() {
        let arr = [0u8; REQUEST_HEADER_LEN];
        assert_eq!(decode_request(&arr), Err(RequestDecodeError::BadMagic(0)));
    }

    #[test]
    fn test_validate_write_on_read_only_is_eperm() {
        let v = validate(&req(CommandType::WRITE, 0, 512, 0), &session(true));
        assert!(matches!(
            v,
            Verdict::Reject {
                errno: NbdErrno::EPERM,
                ..
            }
        ));
    }

    #[test]
    fn test_validate_write_past_end_is_enospc() {
        let v = validate(&req(CommandType::WRITE, 1 << 20, 512, 0), &session(false));
        assert!(matches!(
            v,
            Verdict::Reject {
                errno: NbdErrno::ENOSPC,
                ..
            }
        ));
    }

    #[test]
    fn test_validate_read_past_end_has_qemu_message() {
        let v = validate(&req(CommandType::READ, 1 << 20, 512, 0), &session(false));
        let expected = "operation past EOF; From: 1048576, Len: 512, Size: 1048576";
        assert_eq!(v, reject(NbdErrno::EINVAL, expected));
    }

    #[test]
    fn test_validate_huge_read_is_einval() {
        let v = validate(
            &req(CommandType::READ, 0, MAX_PAYLOAD + 1, 0),
            &session(false),
        );
        assert!(matches!(
            v,
            Verdict::Reject {
                errno: NbdErrno::EINVAL,
                ..
            }
        ));
    }

    #[test]
    fn test_validate_huge_write_disconnects() {
        let v = validate(
            &req(CommandType::WRITE, 0, MAX_PAYLOAD + 1, 0),
            &session(false),
        );
        assert!(matches!(v, Verdict::Disconnect { .. }));
    }

    #[test]
    fn test_validate_offset_overflow_is_rejected() {
        let v = validate(&req(CommandType::READ, u64::MAX, 1, 0), &session(false));
        assert!(matches!(
            v,
            Verdict::Reject {
                errno: NbdErrno::EINVAL,
                ..
            }
        ));
    }

    #[test]
    fn test_validate_req_one_on_read_is_einval() {
        let v = validate(
            &req(CommandType::READ, 0, 512, CMD_FLAG_REQ_ONE),
            &session(false),
        );
        assert!(matches!(
            v,
            Verdict::Reject {
                errno: NbdErrno::EINVAL,
                ..
            }
        ));
    }

    #[test]
    fn test_validate_unknown_command_is_einval() {
        let v = validate(&req(CommandType(42), 0, 0, 0), &session(false));
        assert!(matches!(
            v,
            Verdict::Reject {
                errno: NbdErrno::EINVAL,
                ..
            }
        ));
    }

    #[test]
    fn test_validate_block_status_without_context_is_einval() {
        let mut s = session(false);
        s.meta_contexts.clear();
        let v = validate(&req(CommandType::BLOCK_STATUS, 0, 512, 0), &s);
        assert!(matches!(
            v,
            Verdict::Reject {
                errno: NbdErrno::EINVAL,
                ..
            }
        ));
    }
}
