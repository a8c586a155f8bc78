//! The drivers: `file` (protocol), `raw` and `qcow2` (formats over a child
//! node), `blkdebug` (fault injection over a child), `throttle` (the I/O
//! limits filter: the node does the waiting), `null-co`, `copy-before-write`
//! and `snapshot-access` (image fleecing, `cbw.rs`).

pub mod blkdebug;
pub mod cbw;
pub mod child;
pub mod file;
mod lock;
pub mod null;
pub mod qcow2;
pub mod raw;
pub mod throttle;
