//! Block layer errors: a small kind to match on, a message, and the OS error.

use std::fmt::Display;

use crate::observer::Corruption;

/// What went wrong, for control flow; callers map it to protocol errors in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlockErrorKind {
    Io,
    NoSpace,
    ReadOnly,
    OutOfBounds,
    NotSupported,
    InvalidArgument,
    NotFound,
    Busy,
    /// An image's header or layout is malformed, so it cannot be opened.
    InvalidImage,
    /// An image's metadata is inconsistent at run time (an L2 entry points
    /// outside the image, a refcount would overflow): the request fails with EIO.
    Corrupt,
    /// The node has no usable driver any more (a qcow2 image found corrupt
    /// and marked so): ENOMEDIUM, as QEMU's node without a driver answers.
    NoMedium,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BlockError {
    kind: BlockErrorKind,
    message: String,
    #[source]
    source: Option<std::io::Error>,
    /// Set when this error is a corruption the format driver must signal
    /// (see `observer.rs`); boxed, as nearly every error has none.
    corruption: Option<Box<Corruption>>,
}

pub type BlockResult<T> = Result<T, BlockError>;

impl BlockError {
    pub fn new(kind: BlockErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
            corruption: None,
        }
    }

    /// Corruption found at run time that the format driver signals as
    /// QEMU's `qcow2_signal_corruption` does (event, corrupt bit); the
    /// request itself fails with EIO. `offset`/`size` name a host range
    /// when there is one.
    pub fn corruption(msg: impl Into<String>, offset: Option<u64>, size: Option<u64>) -> Self {
        let msg = msg.into();
        Self {
            kind: BlockErrorKind::Corrupt,
            message: msg.clone(),
            source: None,
            corruption: Some(Box::new(Corruption {
                msg,
                offset,
                size,
                fatal: false,
            })),
        }
    }

    /// The corruption to signal, if this error is one (see [`Self::corruption`]).
    pub fn found_corruption(&self) -> Option<&Corruption> {
        self.corruption.as_deref()
    }

    /// An OS error, with QEMU-style text: "CONTEXT: No such file or directory".
    pub fn io(context: impl Display, e: std::io::Error) -> Self {
        let kind = match e.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => BlockErrorKind::NoSpace,
            Some(libc::EROFS | libc::EACCES | libc::EPERM) => BlockErrorKind::ReadOnly,
            Some(libc::ENOENT) => BlockErrorKind::NotFound,
            Some(libc::EOPNOTSUPP) => BlockErrorKind::NotSupported,
            Some(libc::EINVAL) => BlockErrorKind::InvalidArgument,
            Some(libc::EBUSY | libc::EAGAIN) => BlockErrorKind::Busy,
            _ => BlockErrorKind::Io,
        };
        Self {
            kind,
            message: format!("{context}: {}", strerror(&e)),
            source: Some(e),
            corruption: None,
        }
    }

    pub fn kind(&self) -> BlockErrorKind {
        self.kind
    }

    /// The errno to report: the OS's own when there is one, else by kind.
    pub fn errno(&self) -> i32 {
        if let Some(code) = self.source.as_ref().and_then(|e| e.raw_os_error()) {
            return code;
        }
        match self.kind {
            BlockErrorKind::Io => libc::EIO,
            BlockErrorKind::NoSpace => libc::ENOSPC,
            BlockErrorKind::ReadOnly => libc::EPERM,
            BlockErrorKind::OutOfBounds
            | BlockErrorKind::InvalidArgument
            | BlockErrorKind::InvalidImage => libc::EINVAL,
            BlockErrorKind::Corrupt => libc::EIO,
            BlockErrorKind::NotSupported => libc::ENOTSUP,
            BlockErrorKind::NotFound => libc::ENOENT,
            BlockErrorKind::Busy => libc::EBUSY,
            BlockErrorKind::NoMedium => libc::ENOMEDIUM,
        }
    }
}

/// The OS's text for an error, without Rust's " (os error N)" suffix, as QEMU prints it.
pub fn strerror(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_io_error_keeps_os_errno() {
        let e = BlockError::io("x", std::io::Error::from_raw_os_error(libc::EDQUOT));
        assert_eq!(e.errno(), libc::EDQUOT);
        assert_eq!(e.kind(), BlockErrorKind::NoSpace);
    }

    #[test]
    fn test_message_has_qemu_shape() {
        let e = BlockError::io(
            "Could not open '/x'",
            std::io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert_eq!(
            e.to_string(),
            "Could not open '/x': No such file or directory"
        );
    }

    #[test]
    fn test_kind_without_source_maps_to_errno() {
        assert_eq!(
            BlockError::new(BlockErrorKind::NotSupported, "x").errno(),
            libc::ENOTSUP
        );
    }
}
