//! The QMP wire protocol: greeting, request framing and parsing, responses and events.
//!
//! Output is one JSON object per line, terminated by CRLF, ASCII only (other
//! characters escaped), as QEMU writes it. Input is a byte stream of JSON
//! documents in any framing, with QEMU's extensions: single-quoted strings and
//! a control character (or 0xFF) that resets the parser.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::QmpError;

/// Largest document accepted; above libvirt's and qemu.qmp's 10 MiB replies.
const MAX_DOCUMENT: usize = 16 << 20;
/// Deepest nesting accepted (QEMU's MAX_NESTING).
const MAX_NESTING: u64 = 1024;

/// The greeting line sent on connect.
pub fn greeting(major: u32, minor: u32, micro: u32, package: &str) -> String {
    let v = serde_json::json!({
        "QMP": {
            "version": {
                "qemu": {"micro": micro, "minor": minor, "major": major},
                "package": package,
            },
            "capabilities": ["oob"],
        }
    });
    line(&v)
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Quote {
    #[default]
    None,
    Double,
    Single,
}

/// Splits a byte stream into JSON documents.
#[derive(Debug, Default)]
pub struct JsonStream {
    doc: Vec<u8>,
    depth: u64,
    quote: Quote,
    escaped: bool,
    /// A bare top-level token (number, keyword) is being collected.
    scalar: bool,
    /// After a limit error: track structure but store nothing until the document ends.
    discarding: bool,
    /// Where the string being read starts in `doc`, for the text of a
    /// "stray" error (QEMU quotes a string cut short, not a bare word).
    token_start: Option<usize>,
    ready: std::collections::VecDeque<Result<Value, QmpError>>,
}

impl JsonStream {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.byte(b);
        }
    }

    /// The next complete document (or framing error), if any.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Result<Value, QmpError>> {
        self.ready.pop_front()
    }

    fn reset(&mut self) {
        self.doc.clear();
        self.depth = 0;
        self.quote = Quote::None;
        self.escaped = false;
        self.scalar = false;
        self.discarding = false;
        self.token_start = None;
    }

    /// A 0xFF byte, anywhere (QEMU's documented way for a client to
    /// resynchronise): the document so far is dropped with QEMU's error, which
    /// quotes the token it cut short, and the next byte starts a new one.
    fn stray(&mut self) {
        let token = match self.token_start {
            Some(at) if !self.discarding => String::from_utf8_lossy(&self.doc[at..]).into_owned(),
            _ => String::new(),
        };
        self.ready
            .push_back(Err(parse_error(&format!("stray '{token}\u{FFFD}'"))));
        self.reset();
    }

    fn byte(&mut self, b: u8) {
        if b == 0xff {
            return self.stray();
        }
        if self.quote != Quote::None {
            return self.string_byte(b);
        }
        if b < 0x20 && !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            // A control character also resets the parser (silently).
            return self.reset();
        }
        if self.scalar
            && (b.is_ascii_whitespace() || matches!(b, b'{' | b'[' | b'}' | b']' | b'"' | b'\''))
        {
            self.finish_document();
        }
        match b {
            b'"' => self.open_string(Quote::Double),
            b'\'' => self.open_string(Quote::Single),
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth > MAX_NESTING && !self.discarding {
                    self.fail("JSON nesting depth limit exceeded");
                }
                self.push(b);
            }
            b'}' | b']' => {
                if self.depth == 0 {
                    self.ready.push_back(Err(parse_error("expecting value")));
                    return;
                }
                self.depth -= 1;
                self.push(b);
                if self.depth == 0 {
                    self.finish_document();
                }
            }
            _ if b.is_ascii_whitespace() => {
                if self.depth > 0 {
                    self.push(b);
                }
            }
            _ => {
                if self.depth == 0 {
                    self.scalar = true;
                }
                self.push(b);
            }
        }
    }

    fn open_string(&mut self, quote: Quote) {
        self.quote = quote;
        self.token_start = Some(self.doc.len());
        self.push(b'"');
    }

    /// Inside a string: single-quoted strings are rewritten as double-quoted ones.
    fn string_byte(&mut self, b: u8) {
        if self.escaped {
            self.escaped = false;
            match (self.quote, b) {
                (Quote::Single, b'\'') => self.push(b'\''),
                _ => {
                    self.push(b'\\');
                    self.push(b);
                }
            }
            return;
        }
        match (self.quote, b) {
            (_, b'\\') => self.escaped = true,
            (Quote::Double, b'"') | (Quote::Single, b'\'') => {
                self.quote = Quote::None;
                self.token_start = None;
                self.push(b'"');
                if self.depth == 0 {
                    self.finish_document();
                }
            }
            (Quote::Single, b'"') => {
                self.push(b'\\');
                self.push(b'"');
            }
            _ => self.push(b),
        }
    }

    fn push(&mut self, b: u8) {
        if self.discarding {
            return;
        }
        if self.doc.len() >= MAX_DOCUMENT {
            return self.fail("JSON token size limit exceeded");
        }
        self.doc.push(b);
    }

    /// Reports an error for the current document and ignores the rest of it.
    fn fail(&mut self, message: &str) {
        self.ready.push_back(Err(QmpError::generic(format!(
            "JSON parse error, {message}"
        ))));
        self.doc = Vec::new();
        self.discarding = true;
    }

    fn finish_document(&mut self) {
        let discarding = self.discarding;
        let doc = std::mem::take(&mut self.doc);
        self.reset();
        if discarding || doc.is_empty() {
            return;
        }
        let parsed = serde_json::from_slice::<Value>(&doc).map_err(|e| parse_error(&describe(&e)));
        self.ready.push_back(parsed);
    }
}

fn parse_error(what: &str) -> QmpError {
    QmpError::generic(format!("JSON parse error, {what}"))
}

/// serde_json's message without its position suffix, in QEMU's words where
/// they differ ("expecting value" is what QEMU's parser says).
fn describe(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let text = match text.find(" at line ") {
        Some(i) => &text[..i],
        None => &text,
    };
    match text {
        "expected value" => "expecting value".to_string(),
        other => other.to_string(),
    }
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub command: String,
    pub arguments: Map<String, Value>,
    pub id: Option<Value>,
    /// Sent with `exec-oob`.
    pub oob: bool,
}

/// Checks a document's shape as QEMU's dispatcher does; errors carry the id if readable.
pub fn parse_request(
    value: Value,
    oob_enabled: bool,
) -> Result<Request, (QmpError, Option<Value>)> {
    let Value::Object(mut obj) = value else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = obj.remove("id");
    let fail = |msg: String, id: &Option<Value>| Err((QmpError::generic(msg), id.clone()));
    let execute = obj.remove("execute");
    let exec_oob = obj.remove("exec-oob");
    let arguments = obj.remove("arguments");
    if let Some(key) = obj.keys().next() {
        return fail(format!("QMP input member '{key}' is unexpected"), &id);
    }
    let (command, oob) = match (execute, exec_oob) {
        (_, Some(_)) if !oob_enabled => {
            return fail("QMP input member 'exec-oob' is unexpected".into(), &id)
        }
        (Some(_), Some(_)) => {
            return fail(
                "QMP input must not contain both 'execute' and 'exec-oob'".into(),
                &id,
            )
        }
        (Some(c), None) => (c, false),
        (None, Some(c)) => (c, true),
        (None, None) => return fail("QMP input lacks member 'execute'".into(), &id),
    };
    let member = if oob { "exec-oob" } else { "execute" };
    let Value::String(command) = command else {
        return fail(format!("QMP input member '{member}' must be a string"), &id);
    };
    let arguments = match arguments {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into(), &id),
    };
    Ok(Request {
        command,
        arguments,
        id,
        oob,
    })
}

pub fn encode_return(value: &Value, id: Option<&Value>) -> String {
    let mut obj = Map::new();
    obj.insert("return".into(), value.clone());
    if let Some(id) = id {
        obj.insert("id".into(), id.clone());
    }
    line(&Value::Object(obj))
}

pub fn encode_error(err: &QmpError, id: Option<&Value>) -> String {
    let mut obj = Map::new();
    obj.insert(
        "error".into(),
        serde_json::json!({"class": err.class.as_str(), "desc": err.desc}),
    );
    if let Some(id) = id {
        obj.insert("id".into(), id.clone());
    }
    line(&Value::Object(obj))
}

/// An event line, members in QEMU's order: timestamp, event, data.
pub fn encode_event(name: &str, data: Option<&Value>, now: SystemTime) -> String {
    let (seconds, micros) = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, i64::from(d.subsec_micros())),
        Err(_) => (-1, -1),
    };
    let mut text = format!(
        "{{\"timestamp\":{{\"seconds\":{seconds},\"microseconds\":{micros}}},\"event\":{}",
        ascii_json(&Value::String(name.to_string()))
    );
    if let Some(d) = data {
        text.push_str(",\"data\":");
        text.push_str(&ascii_json(d));
    }
    text.push_str("}\r\n");
    text
}

fn line(v: &Value) -> String {
    let mut s = ascii_json(v);
    s.push_str("\r\n");
    s
}

/// QMP output as a monitor with `pretty=on` sends it: every `\r\n`-ended
/// document of `text` (compact, as the encoders here write it) laid out as
/// QEMU's pretty printer does: one member or element per line, indented by
/// four spaces a level, `": "` after a key, an empty object or array with its
/// brackets on two lines, and `\r\n` for every newline (the monitor's
/// line discipline).
pub fn pretty(text: &str) -> String {
    const NL: &str = "\r\n";
    let indent = |out: &mut String, level: usize| {
        out.push_str(NL);
        out.extend(std::iter::repeat_n("    ", level));
    };
    let mut out = String::with_capacity(text.len() * 2);
    let mut level = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                let empty = matches!(chars.peek(), Some('}' | ']'));
                match empty {
                    true => indent(&mut out, level),
                    false => {
                        level += 1;
                        indent(&mut out, level);
                    }
                }
                if empty {
                    out.extend(chars.next());
                }
            }
            '}' | ']' => {
                level = level.saturating_sub(1);
                indent(&mut out, level);
                out.push(c);
            }
            ',' => {
                out.push(c);
                indent(&mut out, level);
            }
            ':' => out.push_str(": "),
            // Between documents; compact text has no other whitespace.
            '\r' | '\n' => {
                if c == '\n' {
                    out.push_str(NL);
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// JSON text with every non-ASCII character escaped, as QEMU sends it.
fn ascii_json(v: &Value) -> String {
    let text = v.to_string();
    if text.is_ascii() {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
            continue;
        }
        let mut units = [0u16; 2];
        for unit in c.encode_utf16(&mut units) {
            out.push_str(&format!("\\u{unit:04x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_all(input: &[u8]) -> Vec<Result<Value, QmpError>> {
        let mut s = JsonStream::new();
        s.feed(input);
        std::iter::from_fn(|| s.next()).collect()
    }

    #[test]
    fn test_pretty_is_qemus_layout() {
        let compact = encode_return(&json!({"a": {}, "b": [1, "x,:{"], "c": []}), None);
        assert_eq!(
            pretty(&compact),
            "{\r\n    \"return\": {\r\n        \"a\": {\r\n        },\r\n        \"b\": [\r\n            1,\r\n            \"x,:{\"\r\n        ],\r\n        \"c\": [\r\n        ]\r\n    }\r\n}\r\n"
        );
        // Two documents stay two, and an empty return is QEMU's.
        let two = format!(
            "{}{}",
            encode_return(&json!({}), None),
            encode_return(&json!({}), None)
        );
        assert_eq!(
            pretty(&two),
            "{\r\n    \"return\": {\r\n    }\r\n}\r\n".repeat(2)
        );
    }

    #[test]
    fn test_pretty_keeps_escapes_inside_strings() {
        let compact = encode_return(&json!("a\"}\\"), None);
        assert_eq!(
            pretty(&compact),
            "{\r\n    \"return\": \"a\\\"}\\\\\"\r\n}\r\n"
        );
    }

    #[test]
    fn test_stream_splits_documents_in_one_read() {
        let got = parse_all(b"{\"a\": 1}{\"b\": [2]}\n");
        assert_eq!(got, vec![Ok(json!({"a": 1})), Ok(json!({"b": [2]}))]);
    }

    #[test]
    fn test_stream_joins_documents_split_across_reads() {
        let mut s = JsonStream::new();
        s.feed(b"{\"exec");
        assert!(s.next().is_none());
        s.feed(b"ute\": \"x\"}");
        assert_eq!(s.next(), Some(Ok(json!({"execute": "x"}))));
    }

    #[test]
    fn test_stream_accepts_single_quotes() {
        let got = parse_all(b"{'execute': 'say \"hi\" \\'x\\''}");
        assert_eq!(got, vec![Ok(json!({"execute": "say \"hi\" 'x'"}))]);
    }

    #[test]
    fn test_stream_braces_inside_strings_do_not_count() {
        let got = parse_all(b"{\"a\": \"}{\"}");
        assert_eq!(got, vec![Ok(json!({"a": "}{"}))]);
    }

    #[test]
    fn test_stream_recovers_after_parse_error() {
        let got = parse_all(b"{\"a\": }{\"b\": 1}");
        assert!(got[0]
            .as_ref()
            .unwrap_err()
            .desc
            .starts_with("JSON parse error, "));
        assert_eq!(got[1], Ok(json!({"b": 1})));
    }

    #[test]
    fn test_stream_0xff_resets_with_qemus_error() {
        let got = parse_all(b"{\"a\": \xff{\"b\": 1}");
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0].as_ref().unwrap_err().desc,
            "JSON parse error, stray '\u{FFFD}'"
        );
        assert_eq!(got[1], Ok(json!({"b": 1})));
    }

    #[test]
    fn test_stream_0xff_inside_a_string_cuts_it_short() {
        let got = parse_all(b"{\"execute\": \"query-ver\xff{\"execute\": \"x\"}");
        assert_eq!(
            got[0].as_ref().unwrap_err().desc,
            "JSON parse error, stray '\"query-ver\u{FFFD}'"
        );
        assert_eq!(got[1], Ok(json!({"execute": "x"})));
        let got = parse_all(b"{\"a\": tru\xff[1]");
        assert_eq!(
            got[0].as_ref().unwrap_err().desc,
            "JSON parse error, stray '\u{FFFD}'"
        );
        assert_eq!(got[1], Ok(json!([1])));
    }

    #[test]
    fn test_stream_deep_nesting_is_an_error_not_a_crash() {
        let mut input = vec![b'['; 100_000];
        input.extend(vec![b']'; 100_000]);
        input.extend_from_slice(b"{\"ok\": 1}");
        let got = parse_all(&input);
        assert_eq!(
            got[0].as_ref().unwrap_err().desc,
            "JSON parse error, JSON nesting depth limit exceeded"
        );
        assert_eq!(got.last().unwrap(), &Ok(json!({"ok": 1})));
    }

    #[test]
    fn test_stream_stray_close_brace_is_error() {
        let got = parse_all(b"}");
        assert_eq!(
            got[0].as_ref().unwrap_err().desc,
            "JSON parse error, expecting value"
        );
    }

    #[test]
    fn test_parse_request_unexpected_member_keeps_id() {
        let (e, id) = parse_request(json!({"execute": "x", "foo": 1, "id": 5}), false).unwrap_err();
        assert_eq!(e.desc, "QMP input member 'foo' is unexpected");
        assert_eq!(id, Some(json!(5)));
    }

    #[test]
    fn test_parse_request_exec_oob_without_capability() {
        let (e, _) = parse_request(json!({"exec-oob": "x"}), false).unwrap_err();
        assert_eq!(e.desc, "QMP input member 'exec-oob' is unexpected");
    }

    #[test]
    fn test_parse_request_lacks_execute() {
        let (e, _) = parse_request(json!({"arguments": {}}), false).unwrap_err();
        assert_eq!(e.desc, "QMP input lacks member 'execute'");
    }

    #[test]
    fn test_encode_return_is_crlf_terminated_ascii() {
        let s = encode_return(&json!({"x": "é"}), Some(&json!("id1")));
        assert!(s.ends_with("\r\n"));
        assert!(s.is_ascii());
        assert!(s.contains("\\u00e9"));
    }

    #[test]
    fn test_encode_event_orders_timestamp_first() {
        let s = encode_event(
            "BLOCK_EXPORT_DELETED",
            Some(&json!({"id": "e0"})),
            UNIX_EPOCH,
        );
        assert!(s.starts_with("{\"timestamp\":{\"seconds\":0,\"microseconds\":0},\"event\""));
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["data"], json!({"id": "e0"}));
    }
}
