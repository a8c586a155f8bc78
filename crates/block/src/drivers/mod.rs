//! The drivers: `file` (protocol), `raw` (format over a child node), `null-co`.

pub mod blkdebug;
pub mod child;
pub mod file;
mod lock;
pub mod null;
pub mod qcow2;
pub mod raw;
