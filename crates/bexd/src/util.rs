//! Small helpers shared across the daemon.

/// The error text of an I/O error as QEMU prints it (no " (os error N)" suffix).
pub use block::error::strerror;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_strerror_drops_os_error_suffix() {
        let e = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(strerror(&e), "No such file or directory");
    }
}
