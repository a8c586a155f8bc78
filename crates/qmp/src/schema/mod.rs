//! The QAPI types bexd implements, named and shaped as in QEMU's schema
//! (qapi/sockets.json, block-core.json (and its statistics in block_stats.rs), block-export.json, char.json, control.json).
//! Each is declared once: its reader and its introspection description come
//! from one member list, or sit side by side with a test that they agree.

pub mod bitmap;
pub mod block_core;
pub mod block_export;
pub mod block_stats;
pub mod char;
pub mod control;
pub mod job;
pub mod object;
pub mod sockets;
