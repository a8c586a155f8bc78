//! The QAPI types bexd implements, named and shaped as in QEMU's schema
//! (qapi/sockets.json, block-core.json, block-export.json, char.json).

pub mod bitmap;
pub mod block_core;
pub mod block_export;
pub mod char;
pub mod object;
pub mod sockets;
