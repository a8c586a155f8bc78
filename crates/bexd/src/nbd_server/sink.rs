//! Where replies are written: any `AsyncWrite`, and for plain TCP and unix
//! sockets also `sendfile`, which moves read data from the page cache into
//! the socket without a copy through user space (and, on TCP, without a copy
//! at all: the socket buffers reference the file's pages).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest};

/// A connection's write side.
pub trait ReplyWriter: AsyncWrite + Unpin + Send + 'static {
    /// Whether [`Self::poll_sendfile`] works here (not through TLS).
    fn can_sendfile(&self) -> bool {
        false
    }

    /// Sends up to `len` bytes of `fd` from `offset`; the count sent, 0 at
    /// the file's end.
    fn poll_sendfile(
        &mut self,
        _cx: &mut Context<'_>,
        _fd: BorrowedFd<'_>,
        _offset: u64,
        _len: usize,
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::Unsupported.into()))
    }
}

fn sendfile_once(socket: RawFd, fd: RawFd, offset: u64, len: usize) -> io::Result<usize> {
    let mut off = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: plain descriptors and a local offset; the kernel copies between them.
    let n = unsafe { libc::sendfile(socket, fd, &mut off, len) };
    match n {
        n if n >= 0 => Ok(n as usize),
        _ => Err(io::Error::last_os_error()),
    }
}

/// The same for both socket kinds: wait until writable, try, and on
/// `WouldBlock` (readiness cleared by `try_io`) wait again.
macro_rules! sendfile_socket {
    ($half:ty) => {
        impl ReplyWriter for $half {
            fn can_sendfile(&self) -> bool {
                true
            }

            fn poll_sendfile(
                &mut self,
                cx: &mut Context<'_>,
                fd: BorrowedFd<'_>,
                offset: u64,
                len: usize,
            ) -> Poll<io::Result<usize>> {
                let stream = self.as_ref();
                loop {
                    ready!(stream.poll_write_ready(cx))?;
                    let sent = stream.try_io(Interest::WRITABLE, || {
                        sendfile_once(stream.as_raw_fd(), fd.as_raw_fd(), offset, len)
                    });
                    match sent {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        r => return Poll::Ready(r),
                    }
                }
            }
        }
    };
}

sendfile_socket!(tokio::net::tcp::OwnedWriteHalf);
sendfile_socket!(tokio::net::unix::OwnedWriteHalf);

/// TLS streams: bytes only.
impl<T: AsyncRead + AsyncWrite + Send + 'static> ReplyWriter for tokio::io::WriteHalf<T> {}
