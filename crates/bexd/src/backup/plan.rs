//! Which ranges a backup copies: data extents (base:allocation) for a full
//! backup, dirty extents (qemu:dirty-bitmap:NAME) for an incremental one,
//! split into requests no larger than a server accepts.

use nbd::consts::{STATE_DIRTY, STATE_ZERO};

use super::conn::Conn;
use super::error::BackupError;

/// What one BLOCK_STATUS may cover (descriptor lengths are 32-bit).
const STATUS_SPAN: u64 = (u32::MAX as u64) & !0xfff;
/// Largest READ issued (QEMU serves up to 32 MiB; smaller keeps connections busy evenly).
pub const MAX_READ: u64 = 4 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Copy what base:allocation says is not zero.
    Full,
    /// Copy what the bitmap marks dirty.
    Incremental,
}

impl Mode {
    pub fn context(self, bitmap: Option<&str>) -> String {
        match (self, bitmap) {
            (Mode::Incremental, Some(b)) => format!("qemu:dirty-bitmap:{b}"),
            _ => "base:allocation".into(),
        }
    }

    /// Whether an extent with these status flags is copied.
    fn wanted(self, flags: u32) -> bool {
        match self {
            Mode::Full => flags & STATE_ZERO == 0,
            Mode::Incremental => flags & STATE_DIRTY != 0,
        }
    }
}

/// Ranges to copy, merged and in order.
pub async fn ranges(conn: &mut Conn, mode: Mode) -> Result<Vec<(u64, u64)>, BackupError> {
    let size = conn.size;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let want = (size - pos).min(STATUS_SPAN) as u32;
        let before = pos;
        for (len, flags) in conn.block_status(pos, want).await? {
            let len = u64::from(len).min(size - pos);
            if len == 0 {
                break;
            }
            if mode.wanted(flags) {
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == pos => last.1 += len,
                    _ => out.push((pos, len)),
                }
            }
            pos += len;
        }
        // A server answering with an empty first extent would have us ask forever.
        if pos == before {
            return Err(BackupError::Protocol(format!(
                "block status made no progress at {pos}"
            )));
        }
    }
    Ok(out)
}

/// Splits ranges into READ-sized requests.
pub fn requests(ranges: &[(u64, u64)]) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    for &(mut offset, len) in ranges {
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(MAX_READ);
            out.push((offset, n as u32));
            offset += n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_requests_split_large_ranges() {
        let r = requests(&[(0, MAX_READ * 2 + 1), (100 << 20, 512)]);
        assert_eq!(
            r,
            vec![
                (0, MAX_READ as u32),
                (MAX_READ, MAX_READ as u32),
                (2 * MAX_READ, 1),
                (100 << 20, 512)
            ]
        );
    }

    #[test]
    fn test_wanted_flags() {
        assert!(Mode::Full.wanted(0));
        assert!(!Mode::Full.wanted(STATE_ZERO | 1));
        assert!(Mode::Incremental.wanted(STATE_DIRTY));
        assert!(!Mode::Incremental.wanted(0));
    }
}
