//! A minimal HTTP/1.1 responder for the metrics endpoint: one GET per
//! connection, then close. It reads at most [`MAX_HEAD`] bytes of request
//! head within [`READ_LIMIT`]; anything it cannot parse gets 400, another
//! method 405, another path 404. It never panics on input.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A request head larger than this is refused (431 would be exact; 400 is
/// what the brief of this endpoint promises for any bad request).
const MAX_HEAD: usize = 8192;
/// A client that does not send its request head within this is dropped.
const READ_LIMIT: Duration = Duration::from_secs(5);
/// The Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the request asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// GET of this path (query string removed).
    Get(String),
    /// A method other than GET.
    OtherMethod,
    /// Not an HTTP/1.x request line.
    Malformed,
}

/// Parses a request head (the bytes up to the blank line).
pub fn parse_head(head: &[u8]) -> Request {
    let Ok(text) = std::str::from_utf8(head) else {
        return Request::Malformed;
    };
    let line = text.split('\n').next().unwrap_or("").trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Malformed;
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") || !target.starts_with('/') {
        return Request::Malformed;
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Request::Malformed;
    }
    if method != "GET" {
        return Request::OtherMethod;
    }
    let path = target.split('?').next().unwrap_or(target);
    Request::Get(path.to_string())
}

/// Where the head ends: the first blank line (CRLF CRLF, or bare LF LF,
/// which RFC 9112 lets a server accept).
fn head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = bytes.windows(2).position(|w| w == b"\n\n");
    crlf.into_iter().chain(lf).min()
}

/// Reads the request head: `None` when the client closed, sent too much,
/// or took too long.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&chunk[..n]);
            if let Some(end) = head_end(&head) {
                head.truncate(end);
                return Some(());
            }
            if head.len() > MAX_HEAD {
                return Some(());
            }
        }
    };
    tokio::time::timeout(READ_LIMIT, read).await.ok()??;
    Some(head)
}

/// Serves one connection: `body` renders the metrics for `GET /metrics`.
pub async fn serve<S, F>(mut stream: S, body: F)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce() -> String,
{
    let Some(head) = read_head(&mut stream).await else {
        return;
    };
    let request = match head.len() > MAX_HEAD {
        true => Request::Malformed,
        false => parse_head(&head),
    };
    let (status, content_type, extra, body) = match request {
        Request::Get(path) if path == "/metrics" => ("200 OK", CONTENT_TYPE, "", body()),
        Request::Get(_) => (
            "404 Not Found",
            "text/plain",
            "",
            "not found: try /metrics\n".into(),
        ),
        Request::OtherMethod => (
            "405 Method Not Allowed",
            "text/plain",
            "Allow: GET\r\n",
            "only GET is served\n".into(),
        ),
        Request::Malformed => ("400 Bad Request", "text/plain", "", "bad request\n".into()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(READ_LIMIT, write).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_head_takes_get_and_refuses_the_rest() {
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x"),
            Request::Get("/metrics".into())
        );
        assert_eq!(
            parse_head(b"GET /metrics?x=1 HTTP/1.0"),
            Request::Get("/metrics".into())
        );
        assert_eq!(parse_head(b"POST /metrics HTTP/1.1"), Request::OtherMethod);
        for bad in [
            &b""[..],
            b"GET",
            b"GET /metrics",
            b"GET /metrics HTTP/2.0",
            b"GET metrics HTTP/1.1",
            b"get /metrics HTTP/1.1",
            b"GET  /metrics HTTP/1.1",
            b"GET /metrics HTTP/1.1 extra",
            b"\xff\xfe /metrics HTTP/1.1",
        ] {
            assert_eq!(parse_head(bad), Request::Malformed, "{bad:?}");
        }
    }

    async fn exchange(request: &[u8]) -> String {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(serve(server, || "m 1\n".to_string()));
        client.write_all(request).await.unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        task.await.unwrap();
        out
    }

    #[tokio::test]
    async fn test_serve_answers_each_kind_of_request() {
        let ok = exchange(b"GET /metrics HTTP/1.1\r\nHost: h\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nm 1\n"), "{ok}");
        let bare_lf = exchange(b"GET /metrics HTTP/1.0\n\n").await;
        assert!(bare_lf.starts_with("HTTP/1.1 200 OK\r\n"), "{bare_lf}");
        let missing = exchange(b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
        let post = exchange(b"PUT /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        let junk = exchange(b"\x16\x03\x01 hello\r\n\r\n").await;
        assert!(junk.starts_with("HTTP/1.1 400 "), "{junk}");
        let mut huge = b"GET /".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        let huge = exchange(&huge).await;
        assert!(huge.starts_with("HTTP/1.1 400 "), "{huge}");
    }
}
