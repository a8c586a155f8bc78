//! Option payload grammar and option reply encoding.
//!
//! Parsers are strict (every length checked, no trailing bytes) and report
//! *why* a payload is malformed with QEMU's wording, because that text is what
//! the client sees in the NBD_REP_ERR_INVALID message.

use thiserror::Error;

use crate::consts::*;
pub(crate) use crate::text::truncate_utf8;
use crate::types::{InfoType, OptionReplyType, OptionType};

/// Why an option payload does not follow its grammar. The `Display` text is
/// the message sent with NBD_REP_ERR_INVALID.
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum PayloadError {
    #[error("Inconsistent lengths in option {0}")]
    Truncated(&'static str),
    #[error("Invalid name length: {0}")]
    NameTooLong(u32),
    #[error("Unexpected embedded NUL in option {0}")]
    EmbeddedNul(&'static str),
    #[error("option '{0}' has unexpected length")]
    TrailingBytes(&'static str),
}

/// The name QEMU uses for an option in its messages (`nbd_opt_lookup`).
pub(crate) fn option_name(option: OptionType) -> &'static str {
    match option {
        OptionType::EXPORT_NAME => "export name",
        OptionType::ABORT => "abort",
        OptionType::LIST => "list",
        OptionType::STARTTLS => "starttls",
        OptionType::INFO => "info",
        OptionType::GO => "go",
        OptionType::STRUCTURED_REPLY => "structured reply",
        OptionType::LIST_META_CONTEXT => "list meta context",
        OptionType::SET_META_CONTEXT => "set meta context",
        OptionType::EXTENDED_HEADERS => "extended headers",
        _ => "<unknown>",
    }
}

/// A bounded reader over one option payload; every read is checked.
pub(crate) struct Reader<'a> {
    data: &'a [u8],
    option: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(option: OptionType, data: &'a [u8]) -> Self {
        Self {
            data,
            option: option_name(option),
        }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], PayloadError> {
        if self.data.len() < n {
            return Err(PayloadError::Truncated(self.option));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, PayloadError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, PayloadError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A u32-length-prefixed name of at most MAX_STRING bytes without NUL.
    /// Raw bytes: a name that is not UTF-8 is merely unknown, not malformed.
    pub(crate) fn name(&mut self) -> Result<&'a [u8], PayloadError> {
        let len = self.u32()?;
        if len as usize > MAX_STRING {
            return Err(PayloadError::NameTooLong(len));
        }
        self.string_body(len as usize)
    }

    /// `len` bytes of a string that must not contain NUL.
    pub(crate) fn string_body(&mut self, len: usize) -> Result<&'a [u8], PayloadError> {
        let raw = self.bytes(len)?;
        if raw.contains(&0) {
            return Err(PayloadError::EmbeddedNul(self.option));
        }
        Ok(raw)
    }

    /// Fails unless the whole payload was consumed.
    pub(crate) fn finish(&self) -> Result<(), PayloadError> {
        match self.data.is_empty() {
            true => Ok(()),
            false => Err(PayloadError::TrailingBytes(self.option)),
        }
    }
}

/// The body of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct InfoRequest<'a> {
    pub name: &'a [u8],
    pub requests: Vec<InfoType>,
}

/// Parses `u32 len, name, u16 n, n × u16 info request`.
pub(crate) fn parse_info_request(
    option: OptionType,
    payload: &[u8],
) -> Result<InfoRequest<'_>, PayloadError> {
    let mut r = Reader::new(option, payload);
    let name = r.name()?;
    let count = r.u16()?;
    let requests = (0..count)
        .map(|_| r.u16().map(InfoType))
        .collect::<Result<Vec<_>, _>>()?;
    r.finish()?;
    Ok(InfoRequest { name, requests })
}

/// Parses the queries of LIST/SET_META_CONTEXT, after the export name:
/// `u32 n, n × (u32 len, query)`. Queries longer than MAX_STRING are skipped
/// rather than refused, as QEMU does: they cannot name a context.
pub(crate) fn parse_meta_queries<'a>(r: &mut Reader<'a>) -> Result<Vec<&'a [u8]>, PayloadError> {
    let count = r.u32()?;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = r.u32()? as usize;
        if len > MAX_STRING {
            r.bytes(len)?;
            continue;
        }
        queries.push(r.string_body(len)?);
    }
    r.finish()?;
    Ok(queries)
}

/// Appends one option reply.
pub(crate) fn option_reply(
    out: &mut Vec<u8>,
    option: OptionType,
    reply: OptionReplyType,
    data: &[u8],
) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.0.to_be_bytes());
    out.extend_from_slice(&reply.0.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// An error reply carrying a human-readable message (at most MAX_STRING bytes).
pub(crate) fn error_reply(
    out: &mut Vec<u8>,
    option: OptionType,
    reply: OptionReplyType,
    message: &str,
) {
    option_reply(
        out,
        option,
        reply,
        truncate_utf8(message, MAX_STRING).as_bytes(),
    );
}

/// An NBD_REP_INFO reply: the info type, then its body.
pub(crate) fn info_reply(out: &mut Vec<u8>, option: OptionType, info: InfoType, body: &[u8]) {
    let mut data = Vec::with_capacity(2 + body.len());
    data.extend_from_slice(&info.0.to_be_bytes());
    data.extend_from_slice(body);
    option_reply(out, option, OptionReplyType::INFO, &data);
}

/// A name fit for an error message: QEMU cuts names at 80 characters.
pub(crate) fn sanitize_name(name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    match name.char_indices().nth(80) {
        Some((end, _)) => format!("{}...", &name[..end]),
        None => name.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_info_request_when_well_formed_returns_name_and_requests() {
        let payload = [0, 0, 0, 2, b'a', b'b', 0, 1, 0, 3];
        let parsed = parse_info_request(OptionType::GO, &payload);
        let expected = InfoRequest {
            name: b"ab",
            requests: vec![InfoType::BLOCK_SIZE],
        };
        assert_eq!(parsed, Ok(expected));
    }

    #[test]
    fn test_parse_info_request_when_trailing_bytes_returns_qemu_message() {
        let payload = [0, 0, 0, 0, 0, 0, 9];
        let err = parse_info_request(OptionType::GO, &payload).unwrap_err();
        assert_eq!(err.to_string(), "option 'go' has unexpected length");
    }

    #[test]
    fn test_parse_info_request_when_name_past_end_returns_truncated() {
        let payload = [0, 0, 0, 9, b'a'];
        let err = parse_info_request(OptionType::INFO, &payload).unwrap_err();
        assert_eq!(err, PayloadError::Truncated("info"));
    }

    #[test]
    fn test_parse_info_request_when_name_too_long_returns_name_too_long() {
        let payload = 4097u32.to_be_bytes();
        let err = parse_info_request(OptionType::GO, &payload).unwrap_err();
        assert_eq!(err, PayloadError::NameTooLong(4097));
    }

    #[test]
    fn test_parse_info_request_when_name_has_nul_returns_embedded_nul() {
        let payload = [0, 0, 0, 1, 0, 0, 0];
        let err = parse_info_request(OptionType::GO, &payload).unwrap_err();
        assert_eq!(err, PayloadError::EmbeddedNul("go"));
    }

    #[test]
    fn test_parse_meta_queries_when_count_absurd_returns_truncated() {
        let payload = [0xff, 0xff, 0xff, 0xff];
        let mut r = Reader::new(OptionType::SET_META_CONTEXT, &payload);
        assert!(parse_meta_queries(&mut r).is_err());
    }

    #[test]
    fn test_parse_meta_queries_when_query_too_long_skips_it() {
        let mut payload = 1u32.to_be_bytes().to_vec();
        payload.extend_from_slice(&5000u32.to_be_bytes());
        payload.extend_from_slice(&[b'x'; 5000]);
        let mut r = Reader::new(OptionType::SET_META_CONTEXT, &payload);
        assert_eq!(parse_meta_queries(&mut r), Ok(vec![]));
    }

    #[test]
    fn test_sanitize_name_when_long_cuts_at_80_chars() {
        let name = "é".repeat(100);
        assert_eq!(sanitize_name(name.as_bytes()).chars().count(), 83);
    }

    #[test]
    fn test_truncate_utf8_when_boundary_mid_char_backs_off() {
        assert_eq!(truncate_utf8("aé", 2), "a");
    }
}
