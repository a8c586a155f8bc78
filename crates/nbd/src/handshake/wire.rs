//! Option payload parsing and option reply encoding.

use crate::consts::*;
use crate::types::{OptionType, ReplyType};

/// A bounded reader over an option payload; every read is checked.
pub(crate) struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Some(head)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A u32-length-prefixed string of at most MAX_STRING bytes.
    pub(crate) fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return None;
        }
        let raw = self.bytes(len)?;
        String::from_utf8(raw.to_vec()).ok()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The body of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

pub(crate) fn parse_info_request(payload: &[u8]) -> Option<InfoRequest> {
    let mut r = Reader::new(payload);
    let name = r.string()?;
    let count = r.u16()?;
    let requests = (0..count).map(|_| r.u16()).collect::<Option<Vec<_>>>()?;
    r.is_empty().then_some(InfoRequest { name, requests })
}

/// The body of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

pub(crate) fn parse_meta_request(payload: &[u8]) -> Option<MetaRequest> {
    let mut r = Reader::new(payload);
    let export = r.string()?;
    let count = r.u32()?;
    // Each query needs at least its 4-byte length: reject absurd counts before allocating.
    if count as usize > payload.len() / 4 {
        return None;
    }
    let queries = (0..count).map(|_| r.string()).collect::<Option<Vec<_>>>()?;
    r.is_empty().then_some(MetaRequest { export, queries })
}

/// Appends one option reply.
pub(crate) fn option_reply(out: &mut Vec<u8>, option: OptionType, reply: ReplyType, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.0.to_be_bytes());
    out.extend_from_slice(&reply.0.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// An error reply carrying a human-readable message.
pub(crate) fn error_reply(out: &mut Vec<u8>, option: OptionType, reply: ReplyType, message: &str) {
    let mut msg = message.as_bytes();
    msg = &msg[..msg.len().min(MAX_STRING)];
    option_reply(out, option, reply, msg);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_info_request_reads_name_and_requests() {
        let payload = [0, 0, 0, 2, b'a', b'b', 0, 1, 0, 3];
        let parsed = parse_info_request(&payload);
        assert_eq!(
            parsed,
            Some(InfoRequest {
                name: "ab".into(),
                requests: vec![3]
            })
        );
    }

    #[test]
    fn test_parse_info_request_rejects_trailing_bytes() {
        let payload = [0, 0, 0, 0, 0, 0, 9];
        assert_eq!(parse_info_request(&payload), None);
    }

    #[test]
    fn test_parse_info_request_rejects_name_past_end() {
        let payload = [0, 0, 0, 9, b'a'];
        assert_eq!(parse_info_request(&payload), None);
    }

    #[test]
    fn test_parse_meta_request_rejects_absurd_count() {
        let payload = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(parse_meta_request(&payload), None);
    }
}
