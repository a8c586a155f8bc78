//! WRITE payloads moved from the socket into a tmpfs image with `splice`:
//! socket to pipe (the pipe takes the socket's pages, no copy), pipe to file
//! (one copy, into the page cache). Read into a buffer and written, the same
//! bytes are copied twice, plus once more for the part the request reader
//! had buffered.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, Interest};

/// Largest pipe asked for; `/proc/sys/fs/pipe-max-size` is 1 MiB by default.
const PIPE_SIZE: libc::c_int = 1 << 20;

/// A connection's read side.
pub trait RequestReader: AsyncRead + Unpin + Send + 'static {
    /// Whether [`Self::poll_splice_into`] works here (not through TLS).
    fn can_splice(&self) -> bool {
        false
    }

    /// Moves up to `len` bytes from the socket into the pipe `pipe_w`; the
    /// count moved, 0 at end of stream.
    fn poll_splice_into(
        &mut self,
        _cx: &mut Context<'_>,
        _pipe_w: RawFd,
        _len: usize,
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::Unsupported.into()))
    }
}

fn splice(from: RawFd, to: RawFd, to_offset: Option<&mut u64>, len: usize) -> io::Result<usize> {
    let mut off: libc::loff_t = 0;
    let off_ptr = match &to_offset {
        Some(o) => {
            off = libc::loff_t::try_from(**o).map_err(|_| io::ErrorKind::InvalidInput)?;
            &mut off as *mut libc::loff_t
        }
        None => std::ptr::null_mut(),
    };
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: plain descriptors; `off_ptr` is null or points at a live local.
    let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, off_ptr, len, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if let Some(o) = to_offset {
        *o = off as u64;
    }
    Ok(n as usize)
}

macro_rules! splice_socket {
    ($half:ty) => {
        impl RequestReader for $half {
            fn can_splice(&self) -> bool {
                true
            }

            fn poll_splice_into(
                &mut self,
                cx: &mut Context<'_>,
                pipe_w: RawFd,
                len: usize,
            ) -> Poll<io::Result<usize>> {
                let stream = self.as_ref();
                loop {
                    ready!(stream.poll_read_ready(cx))?;
                    let moved = stream.try_io(Interest::READABLE, || {
                        splice(stream.as_raw_fd(), pipe_w, None, len)
                    });
                    match moved {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        r => return Poll::Ready(r),
                    }
                }
            }
        }
    };
}

splice_socket!(tokio::net::tcp::OwnedReadHalf);
splice_socket!(tokio::net::unix::OwnedReadHalf);

/// TLS streams: bytes only.
impl<T: AsyncRead + tokio::io::AsyncWrite + Send + 'static> RequestReader
    for tokio::io::ReadHalf<T>
{
}

/// A connection's pipe, made on its first spliced WRITE.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    pub fn new() -> io::Result<Self> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 returns.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ on our own pipe; on failure the default size stays.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        let capacity = if size > 0 { size as usize } else { 64 * 1024 };
        Ok(Self {
            read,
            write,
            capacity,
        })
    }
}

/// Moves `len` payload bytes from `reader` into `fd` at `offset`. The outer
/// error is the socket's (the connection is lost); the inner one the file's:
/// after a file error the rest of the payload is still taken off the socket
/// (and dropped) so the next request header is where the client put it.
pub async fn splice_payload<R: RequestReader>(
    reader: &mut R,
    pipe: &Pipe,
    fd: BorrowedFd<'_>,
    mut offset: u64,
    mut len: usize,
) -> io::Result<io::Result<()>> {
    let mut file_error = None;
    while len > 0 {
        let want = len.min(pipe.capacity);
        let got =
            std::future::poll_fn(|cx| reader.poll_splice_into(cx, pipe.write.as_raw_fd(), want))
                .await?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        drain_pipe(pipe, fd, &mut offset, got, &mut file_error)?;
        len -= got;
    }
    Ok(file_error.map_or(Ok(()), Err))
}

/// Empties the pipe's `n` bytes into the file, or after a file error into
/// nothing. Pipe errors end the connection: its contents are then unknown.
fn drain_pipe(
    pipe: &Pipe,
    fd: BorrowedFd<'_>,
    offset: &mut u64,
    mut n: usize,
    file_error: &mut Option<io::Error>,
) -> io::Result<()> {
    let mut discard = [0u8; 8192];
    while n > 0 {
        if file_error.is_none() {
            match splice(pipe.read.as_raw_fd(), fd.as_raw_fd(), Some(offset), n) {
                Ok(0) => *file_error = Some(io::ErrorKind::WriteZero.into()),
                Ok(m) => n -= m,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => *file_error = Some(e),
            }
            continue;
        }
        let want = n.min(discard.len());
        // SAFETY: reads into a local buffer of at least `want` bytes.
        let m = unsafe { libc::read(pipe.read.as_raw_fd(), discard.as_mut_ptr().cast(), want) };
        match m {
            m if m > 0 => n -= m as usize,
            _ => return Err(io::Error::last_os_error()),
        }
    }
    Ok(())
}
