//! Ceph RBD images as block devices: `driver=rbd`.
//!
//! A crate of its own so that only the daemon links librbd and librados; the
//! block crate (and everything built on it alone) stays free of them. `sys`
//! declares the few C functions used, `image` connects and opens as QEMU does,
//! `completion` turns librbd's AIO callbacks into futures, and `driver` is the
//! block driver over both.

mod completion;
mod driver;
mod error;
mod image;
mod known;
mod sys;

pub use driver::RbdDriver;
pub use error::RbdError;
pub use image::{Image, RbdOptions, CONNECT_TIMEOUT_SECS};
