//! Descriptors handed to bexd as listening sockets: an inherited descriptor
//! number (`addr.type=fd,addr.str=3`, `--chardev socket,fd=3`, socket
//! activation) or a descriptor a QMP client passed with `getfd` over a unix
//! monitor (SCM_RIGHTS) and named.
//!
//! A descriptor is taken only once it is checked to be a listening stream
//! socket of the unix or an IP family: a number that names an open image,
//! a connected or datagram socket is refused and left open and untouched
//! (QEMU would call listen() on some of them and take them over).

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use crate::error::FdError;
use crate::net::Listener;

/// The descriptors of one QMP monitor: those that came with the last
/// message (SCM_RIGHTS) and those `getfd` named. Dropping it closes them.
#[derive(Debug, Default)]
pub struct MonitorFds {
    received: Mutex<Vec<OwnedFd>>,
    named: Mutex<BTreeMap<String, OwnedFd>>,
}

tokio::task_local! {
    /// The monitor whose command is running (QEMU's `monitor_cur()`).
    static CURRENT: Arc<MonitorFds>;
}

impl MonitorFds {
    /// Descriptors that came with the bytes just read; earlier unclaimed
    /// ones are closed, as QEMU keeps only the last message's.
    pub fn received(&self, fds: Vec<OwnedFd>) {
        if !fds.is_empty() {
            *lock(&self.received) = fds;
        }
    }

    /// Runs `f` (a command) with this monitor as the current one.
    pub async fn scope<F: std::future::Future>(self: &Arc<Self>, f: F) -> F::Output {
        CURRENT.scope(self.clone(), f).await
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each holder replaces or moves whole entries: a poisoned lock still
    // guards a consistent table.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn current() -> Option<Arc<MonitorFds>> {
    CURRENT.try_with(|c| c.clone()).ok()
}

/// `getfd`: names the descriptor that came with this command. A name
/// already in use is replaced (its descriptor closed), as in QEMU.
pub fn getfd(name: &str) -> Result<(), FdError> {
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(FdError::NameStartsWithDigit);
    }
    let mon = current().ok_or(FdError::NoneSupplied)?;
    let fd = {
        let mut received = lock(&mon.received);
        if received.is_empty() {
            return Err(FdError::NoneSupplied);
        }
        received.remove(0)
    };
    lock(&mon.named).insert(name.to_string(), fd);
    Ok(())
}

/// `closefd`.
pub fn closefd(name: &str) -> Result<(), FdError> {
    let mon = current().ok_or_else(|| FdError::CloseUnknown(name.to_string()))?;
    let removed = lock(&mon.named).remove(name);
    removed
        .map(drop)
        .ok_or_else(|| FdError::CloseUnknown(name.to_string()))
}

/// The listening socket `text` names: a descriptor number, or (from a QMP
/// command) a name given with `getfd`, which is then used up, as in QEMU.
/// Nothing is taken unless it is a listening stream socket.
pub fn take_listener(text: &str) -> Result<Listener, FdError> {
    let numeric = text.starts_with(|c: char| c.is_ascii_digit() || c == '-');
    let fd = match (numeric, current()) {
        (false, Some(mon)) => {
            let mut named = lock(&mon.named);
            let fd = named
                .get(text)
                .ok_or_else(|| FdError::NoSuchName(text.to_string()))?;
            check_listening(fd.as_raw_fd(), text)?;
            named
                .remove(text)
                .ok_or_else(|| FdError::NoSuchName(text.to_string()))?
        }
        _ => {
            let n: RawFd = text
                .parse()
                .map_err(|_| FdError::NotANumber(text.to_string()))?;
            check_listening(n, text)?;
            // SAFETY: `n` is an open listening socket (just checked) that the
            // user handed to bexd by number; from here bexd owns it.
            unsafe { OwnedFd::from_raw_fd(n) }
        }
    };
    into_listener(fd).map_err(|e| FdError::Io(format!("Failed to listen on fd socket: {e}")))
}

/// Checks that `fd` is an open listening stream socket, unix or IP; it is
/// only inspected (fstat, getsockopt), never changed or closed.
pub fn check_listening(fd: RawFd, text: &str) -> Result<(), FdError> {
    let named = || text.to_string();
    if fd < 0 {
        return Err(FdError::NotASocket(named()));
    }
    // SAFETY: `stat` is plain data; all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into the buffer it is given; a closed
    // descriptor fails with EBADF.
    let rc = unsafe { libc::fstat(fd, &mut st) };
    if rc != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(FdError::NotASocket(named()));
    }
    let opt = |name| sockopt(fd, name).ok_or_else(|| FdError::NotASocket(named()));
    if opt(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(FdError::NotStream(named()));
    }
    if opt(libc::SO_ACCEPTCONN)? == 0 {
        return Err(FdError::NotListening(named()));
    }
    match opt(libc::SO_DOMAIN)? {
        libc::AF_UNIX | libc::AF_INET | libc::AF_INET6 => Ok(()),
        _ => Err(FdError::Family(named())),
    }
}

/// An integer socket option, or `None` if the call fails.
fn sockopt(fd: RawFd, name: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// A checked listening socket as a tokio listener of its family.
fn into_listener(fd: OwnedFd) -> std::io::Result<Listener> {
    let domain = sockopt(fd.as_raw_fd(), libc::SO_DOMAIN);
    if domain == Some(libc::AF_UNIX) {
        let l = std::os::unix::net::UnixListener::from(fd);
        l.set_nonblocking(true)?;
        return tokio::net::UnixListener::from_std(l).map(Listener::Unix);
    }
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l).map(Listener::Tcp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;

    fn still_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD only reads the descriptor's flags.
        unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
    }

    fn refused(fd: RawFd) -> FdError {
        let text = fd.to_string();
        let e = check_listening(fd, &text).expect_err("must be refused");
        assert!(still_open(fd), "a refused descriptor is left open");
        e
    }

    #[test]
    fn test_check_listening_refuses_a_regular_file_and_leaves_it_open() {
        let f = tempfile::tempfile().expect("tempfile");
        let fd = f.as_raw_fd();
        assert_eq!(refused(fd), FdError::NotASocket(fd.to_string()));
    }

    #[test]
    fn test_check_listening_refuses_datagram_and_unlistened_sockets() {
        let dgram = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let fd = dgram.as_raw_fd();
        assert_eq!(refused(fd), FdError::NotStream(fd.to_string()));
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let fd = a.as_raw_fd();
        assert_eq!(refused(fd), FdError::NotListening(fd.to_string()));
    }

    #[test]
    fn test_check_listening_refuses_closed_and_negative_numbers() {
        assert_eq!(
            check_listening(-1, "-1"),
            Err(FdError::NotASocket("-1".into()))
        );
        assert_eq!(
            check_listening(1_000_000, "1000000"),
            Err(FdError::NotASocket("1000000".into()))
        );
    }

    #[test]
    fn test_check_listening_takes_listening_tcp_and_unix_sockets() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
        assert_eq!(check_listening(tcp.as_raw_fd(), "t"), Ok(()));
        let dir = tempfile::tempdir().expect("dir");
        let unix = std::os::unix::net::UnixListener::bind(dir.path().join("s")).expect("unix");
        assert_eq!(check_listening(unix.as_raw_fd(), "u"), Ok(()));
    }

    #[test]
    fn test_take_listener_without_a_monitor_parses_a_number() {
        assert_eq!(
            take_listener("foo").err(),
            Some(FdError::NotANumber("foo".into()))
        );
    }

    #[tokio::test]
    async fn test_getfd_names_the_received_descriptor_and_closefd_closes_it() {
        // A socket pair, not a descriptor number, tells that closefd closed it: once the
        // passed end is closed the kept end reads end-of-file. A number can be reused at
        // once by another test's open on another thread.
        let mon = Arc::new(MonitorFds::default());
        let (passed, mut kept) = std::os::unix::net::UnixStream::pair().expect("pair");
        mon.scope(async {
            assert_eq!(getfd("x"), Err(FdError::NoneSupplied));
            assert_eq!(getfd("1x"), Err(FdError::NameStartsWithDigit));
        })
        .await;
        mon.received(vec![OwnedFd::from(passed)]);
        mon.scope(async {
            assert_eq!(getfd("lst"), Ok(()));
            assert_eq!(closefd("other"), Err(FdError::CloseUnknown("other".into())));
        })
        .await;
        kept.set_nonblocking(true).expect("nonblocking");
        let mut byte = [0u8; 1];
        let open = kept.read(&mut byte);
        assert_eq!(
            open.map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::WouldBlock),
            "the named descriptor stays open until closefd"
        );
        mon.scope(async {
            assert_eq!(closefd("lst"), Ok(()));
        })
        .await;
        assert_eq!(kept.read(&mut byte).expect("read after close"), 0);
    }

    #[tokio::test]
    async fn test_take_listener_uses_up_a_named_descriptor_only_when_it_listens() {
        let mon = Arc::new(MonitorFds::default());
        let f = tempfile::tempfile().expect("tempfile");
        mon.received(vec![OwnedFd::from(f)]);
        mon.scope(async {
            getfd("img").expect("getfd");
            assert_eq!(
                take_listener("img").err(),
                Some(FdError::NotASocket("img".into()))
            );
            // Refused, so still there to close.
            assert_eq!(closefd("img"), Ok(()));
            assert_eq!(
                take_listener("gone").err(),
                Some(FdError::NoSuchName("gone".into()))
            );
        })
        .await;
    }
}
