//! The request side of one connection, buffered.
//!
//! Like tokio's `BufReader`, but its buffer is an [`IoBuf`]: taken from the
//! buffer pool (or a fresh mapping, touched only as far as it is used)
//! instead of a 256 KiB `vec![0; ..]`. That memset was 8% of the server's
//! time at a few thousand connections per second. The bytes the handshake
//! read past its end start out in the buffer, so they are served first and
//! the socket is only read once they are used up.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use block::IoBuf;
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};

pub struct Input<R> {
    buf: IoBuf,
    /// `buf[pos..filled]` is read from the socket and not yet consumed.
    pos: usize,
    filled: usize,
    inner: R,
}

impl<R> Input<R> {
    /// `leftover` (the handshake's extra bytes) comes first; the buffer holds
    /// at least `capacity` bytes, more if the leftover needs it.
    pub fn new(inner: R, leftover: &[u8], capacity: usize) -> Self {
        let mut buf = IoBuf::for_overwrite(capacity.max(leftover.len()));
        buf[..leftover.len()].copy_from_slice(leftover);
        Self {
            buf,
            pos: 0,
            filled: leftover.len(),
            inner,
        }
    }

    /// The bytes read and not yet consumed.
    pub fn buffer(&self) -> &[u8] {
        &self.buf[self.pos..self.filled]
    }

    /// Marks `n` buffered bytes as used (at most [`Self::buffer`]'s length).
    pub fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.filled);
    }

    /// The socket itself. Reading it directly skips the buffer: callers do
    /// so only once [`Self::buffer`] is empty.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Input<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // A read at least as large as the buffer goes straight to the caller.
        if self.pos == self.filled && out.remaining() >= self.buf.len() {
            return Pin::new(&mut self.inner).poll_read(cx, out);
        }
        let available = ready!(self.as_mut().poll_fill_buf(cx))?;
        let n = available.len().min(out.remaining());
        out.put_slice(&available[..n]);
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}

impl<R: AsyncRead + Unpin> AsyncBufRead for Input<R> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        if this.pos == this.filled {
            let mut space = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut space))?;
            this.filled = space.filled().len();
            this.pos = 0;
        }
        Poll::Ready(Ok(&this.buf[this.pos..this.filled]))
    }

    fn consume(self: Pin<&mut Self>, n: usize) {
        Input::consume(self.get_mut(), n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn test_leftover_comes_first_then_the_socket() {
        let socket: &[u8] = b"world, and more";
        let mut input = Input::new(socket, b"hello ", 8);
        let mut got = [0u8; 11];
        input.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello world");
        let mut rest = Vec::new();
        input.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b", and more");
    }

    #[tokio::test]
    async fn test_buffer_and_consume_then_direct_socket_reads() {
        let socket: &[u8] = b"0123456789abcdef";
        let mut input = Input::new(socket, b"", 4096);
        let mut first = [0u8; 4];
        input.read_exact(&mut first).await.unwrap();
        // The first read buffered the whole socket's contents.
        assert_eq!(input.buffer(), b"456789abcdef");
        input.consume(6);
        assert_eq!(input.buffer(), b"abcdef");
        input.consume(100);
        assert!(input.buffer().is_empty());
        let mut rest = Vec::new();
        input.get_mut().read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn test_a_leftover_larger_than_the_capacity_is_kept_whole() {
        let leftover = vec![7u8; 10_000];
        let mut input = Input::new(&b"!"[..], &leftover, 4096);
        let mut got = vec![0u8; 10_001];
        input.read_exact(&mut got).await.unwrap();
        assert!(got[..10_000].iter().all(|&b| b == 7));
        assert_eq!(got[10_000], b'!');
    }
}
