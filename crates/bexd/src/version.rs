//! What `bexd --version` and `bexd serve --version` print: bexd's version
//! and, when built from a git checkout, its commit (embedded by build.rs),
//! then the QEMU release whose interfaces it follows, in the shape of
//! QEMU's own `qemu-storage-daemon version 10.0.2 (...)`.

/// bexd's version, with ` (commit HASH)` when the build knew it.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), env!("BEXD_VERSION_SUFFIX"));

/// The full `--version` text, one trailing newline.
pub fn text() -> String {
    let (major, minor, micro) = crate::QEMU_VERSION;
    format!(
        "bexd version {VERSION}\n\
         compatible with qemu-storage-daemon and qemu-nbd version {major}.{minor}.{micro}\n"
    )
}
