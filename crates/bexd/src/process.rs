//! Process-level chores qemu-storage-daemon does: `--daemonize` and `--pidfile`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Which side of the `--daemonize` fork we are on.
#[derive(Debug)]
pub enum Forked {
    /// The original process: exit with this code once the child reported.
    Parent(i32),
    /// The daemon: report startup success through the notifier.
    Child(StartupNotifier),
}

/// The child's end of the pipe the parent waits on.
#[derive(Debug)]
pub struct StartupNotifier {
    pipe: File,
}

impl StartupNotifier {
    /// Tells the parent startup succeeded, then detaches from the terminal.
    pub fn success(mut self) {
        let _ = self.pipe.write_all(&[0]);
        redirect_stdio_to_null();
    }
}

/// Forks. Must run before any thread exists (before the tokio runtime).
/// The parent waits until the child reports success (exit 0) or dies (exit 1).
pub fn daemonize() -> std::io::Result<Forked> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by us alone.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded here (no runtime yet), so the
    // child may continue running arbitrary Rust code after fork.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(read_end);
            // SAFETY: setsid has no memory-safety preconditions.
            unsafe { libc::setsid() };
            Ok(Forked::Child(StartupNotifier {
                pipe: File::from(write_end),
            }))
        }
        _ => {
            drop(write_end);
            let mut byte = [1u8; 1];
            let ok = File::from(read_end).read_exact(&mut byte).is_ok() && byte[0] == 0;
            Ok(Forked::Parent(if ok { 0 } else { 1 }))
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit, as QEMU does at startup.
/// Every NBD connection holds a socket, and with `max-connections=0` there is
/// no other bound: the usual soft limit of 1024 would make `accept` fail with
/// EMFILE long before the hard limit (often 2^20) is reached.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!("cannot raise RLIMIT_NOFILE to {}", lim.rlim_max);
            }
        }
    }
}

fn redirect_stdio_to_null() {
    let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return;
    };
    for target in 0..3 {
        // SAFETY: dup2 onto the standard descriptors with a valid open fd.
        unsafe { libc::dup2(null.as_raw_fd(), target) };
    }
}

/// A locked pid file, removed when dropped.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    _file: File,
}

impl PidFile {
    /// Creates, locks and writes the pid file; fails if another process holds it.
    pub fn create(path: &Path) -> Result<Self, String> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(path)
            .map_err(|e| format!("Cannot open pid file: {}", crate::util::strerror(&e)))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(format!(
                "Cannot lock pid file: {}",
                crate::util::strerror(&std::io::Error::last_os_error())
            ));
        }
        file.set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(|e| format!("Failed to write pid file: {}", crate::util::strerror(&e)))?;
        Ok(Self {
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
            _file: file,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
