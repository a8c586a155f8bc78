//! The file a FUSE export is mounted over: QEMU's checks before the mount,
//! the clean-up of a mount a killed bexd left behind, and the unmount.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use block::error::strerror;

use super::FS_NAME;
use crate::error::ExportError;

/// The mountpoint must be a regular file (QEMU's texts). A path that fails
/// with `ENOTCONN` is a FUSE mount whose server is gone: if bexd made it
/// (a `kill -9` left it), it is unmounted and the check runs again;
/// another program's is reported with what to do.
pub fn check(path: &Path) -> Result<(), ExportError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(not_regular(path)),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => clean_stale(path, &e),
        Err(e) => Err(stat_failed(path, &e)),
    }
}

fn clean_stale(path: &Path, e: &io::Error) -> Result<(), ExportError> {
    if !is_bexd_mount(path) {
        return Err(ExportError::FuseMountpoint(format!(
            "Failed to stat '{}': {} (a FUSE mount whose server has exited; \
             unmount it with 'fusermount3 -u {}')",
            path.display(),
            strerror(e),
            path.display()
        )));
    }
    tracing::warn!(
        mountpoint = %path.display(),
        "unmounting a stale FUSE export left by an earlier bexd"
    );
    unmount(path).map_err(|e| {
        ExportError::FuseMountpoint(format!(
            "Failed to unmount the stale FUSE export on '{}': {}",
            path.display(),
            strerror(&e)
        ))
    })?;
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(not_regular(path)),
        Err(e) => Err(stat_failed(path, &e)),
    }
}

/// Whether the topmost mount on `path` is a FUSE mount named as bexd names
/// its own (mountinfo's source field).
fn is_bexd_mount(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let Some(wanted) = absolute(path) else {
        return false;
    };
    info.lines()
        .rev()
        .filter_map(parse_mountinfo)
        .find(|m| m.mount_point == wanted)
        .is_some_and(|m| m.fs_type.starts_with("fuse") && m.source == FS_NAME)
}

/// `path` made absolute without resolving it (a stale mount cannot be
/// resolved: every stat of it fails), as mountinfo shows mount points.
fn absolute(path: &Path) -> Option<String> {
    let abs = std::path::absolute(path).ok()?;
    Some(abs.to_string_lossy().into_owned())
}

#[derive(Debug, PartialEq, Eq)]
struct MountEntry {
    mount_point: String,
    fs_type: String,
    source: String,
}

/// One line of `/proc/self/mountinfo`: field 5 is the mount point (octal
/// escapes for space, tab, newline and backslash); after the `-` separator
/// come the type and the source.
fn parse_mountinfo(line: &str) -> Option<MountEntry> {
    let (before, after) = line.split_once(" - ")?;
    let mount_point = unescape(before.split(' ').nth(4)?);
    let mut after = after.split(' ');
    let fs_type = after.next()?.to_string();
    let source = unescape(after.next()?);
    Some(MountEntry {
        mount_point,
        fs_type,
        source,
    })
}

fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts lazily (`MNT_DETACH`), as libfuse does as root: a process that
/// still holds the file open keeps it until it closes it, and the removal
/// does not fail with EBUSY. Without the privilege, fusermount3 does it.
pub fn unmount(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if r == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) {
        return Err(err);
    }
    let status = std::process::Command::new("fusermount3")
        .args(["-u", "-z", "--"])
        .arg(path)
        .status()?;
    match status.success() {
        true => Ok(()),
        false => Err(io::Error::other(format!(
            "fusermount3 -u failed ({status})"
        ))),
    }
}

fn not_regular(path: &Path) -> ExportError {
    ExportError::FuseMountpoint(format!("'{}' is not a regular file", path.display()))
}

fn stat_failed(path: &Path, e: &io::Error) -> ExportError {
    ExportError::FuseMountpoint(format!(
        "Failed to stat '{}': {}",
        path.display(),
        strerror(e)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_mountinfo_fuse_line_gives_point_type_and_source() {
        let line = "45 27 0:40 / /tmp/qf/mnt rw,nosuid,nodev,relatime - fuse bexd rw,user_id=0";
        let entry = parse_mountinfo(line).unwrap();
        assert_eq!(
            entry,
            MountEntry {
                mount_point: "/tmp/qf/mnt".into(),
                fs_type: "fuse".into(),
                source: "bexd".into(),
            }
        );
    }

    #[test]
    fn test_parse_mountinfo_escaped_space_is_unescaped() {
        let line = "45 27 0:40 / /tmp/a\\040b rw shared:1 - fuse /dev/fuse rw";
        assert_eq!(parse_mountinfo(line).unwrap().mount_point, "/tmp/a b");
    }

    #[test]
    fn test_parse_mountinfo_without_separator_is_none() {
        assert_eq!(parse_mountinfo("45 27 0:40 / /x rw"), None);
    }
}
