//! Image locking compatible with QEMU's: open-file-description (OFD) byte
//! locks at offset 100 + permission bit ("I use this permission") and
//! 200 + permission bit ("I forbid others this permission"). A second writer
//! (bexd, qemu-storage-daemon, qemu-img without -U) on the same image then
//! fails to open instead of corrupting it.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::error::{BlockError, BlockErrorKind, BlockResult};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
/// QEMU's permission bits, by index.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
pub(crate) const PERM_READ: usize = 0;
pub(crate) const PERM_WRITE: usize = 1;
pub(crate) const PERM_RESIZE: usize = 3;

fn flock(kind: i16, start: i64) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

fn set_shared_lock(file: &File, byte: i64) -> std::io::Result<()> {
    let fl = flock(libc::F_RDLCK as i16, byte);
    // SAFETY: fcntl with a valid fd and a pointer to a live flock struct.
    match unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } {
        -1 => Err(std::io::Error::last_os_error()),
        _ => Ok(()),
    }
}

/// Whether another open file description holds a lock on `byte`.
fn is_locked_by_other(file: &File, byte: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as i16, byte);
    // SAFETY: fcntl with a valid fd and a pointer to a live flock struct.
    match unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } {
        -1 => Err(std::io::Error::last_os_error()),
        _ => Ok(fl.l_type != libc::F_UNLCK as i16),
    }
}

/// Takes the locks for `perms` while forbidding `unshared` to others, after
/// checking nobody else conflicts.
pub(crate) fn lock_image(file: &File, perms: &[usize], unshared: &[usize]) -> BlockResult<()> {
    let io = |e: std::io::Error| BlockError::io("Failed to lock image", e);
    for &p in perms {
        if is_locked_by_other(file, SHARED_BASE + p as i64).map_err(io)? {
            return Err(conflict(format!(
                "Failed to get \"{}\" lock",
                PERM_NAMES[p]
            )));
        }
    }
    for &u in unshared {
        if is_locked_by_other(file, PERM_BASE + u as i64).map_err(io)? {
            return Err(conflict(format!(
                "Failed to get shared \"{}\" lock",
                PERM_NAMES[u]
            )));
        }
    }
    for &p in perms {
        set_shared_lock(file, PERM_BASE + p as i64).map_err(io)?;
    }
    for &u in unshared {
        set_shared_lock(file, SHARED_BASE + u as i64).map_err(io)?;
    }
    Ok(())
}

fn conflict(message: String) -> BlockError {
    BlockError::new(
        BlockErrorKind::Busy,
        format!("{message} (is another process using the image?)"),
    )
}
