//! Errors of opening an image, with QEMU's texts ("error opening pool rbd: No
//! such file or directory"), and the mapping of librbd's errno results to the
//! block layer's errors.

use block::BlockError;

#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    /// A librados or librbd call failed: "CONTEXT: strerror".
    #[error("{context}: {}", block::error::strerror(source))]
    Call {
        context: String,
        source: std::io::Error,
    },
    /// The options cannot be handed to librados (a NUL byte in a name).
    #[error("{0}")]
    Option(String),
    /// The image cannot be used as asked.
    #[error("{0}")]
    Open(String),
}

impl RbdError {
    pub(crate) fn errno(context: String, errno: i32) -> Self {
        Self::Call {
            context,
            source: std::io::Error::from_raw_os_error(errno),
        }
    }
}

/// A request's result: librbd returns the bytes moved or `-errno`.
pub(crate) fn io_result(what: &str, r: isize) -> block::BlockResult<()> {
    match r {
        r if r < 0 => Err(BlockError::io(
            format!("rbd {what}"),
            std::io::Error::from_raw_os_error(-r as i32),
        )),
        _ => Ok(()),
    }
}
