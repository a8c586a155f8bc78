//! bexd, the block export daemon: block nodes served over NBD, managed over QMP,
//! started with qemu-storage-daemon's command line.
//!
//! Layout (see docs/architecture.md for the walkthrough):
//! - [`cli`]: argv in order, as qemu-storage-daemon reads it; [`startup`] applies it.
//! - [`daemon`]: the state (nodes, exports, NBD server) and the operations CLI and QMP share.
//! - [`qapi`]: QAPI argument types (crate `qmp`) turned into the daemon's own configs.
//! - [`blockdev`]: opening block nodes (crate `block`) from `BlockdevOptions`.
//! - [`export`] and [`export_bitmaps`]: exports, and the dirty bitmaps they serve.
//! - [`nbd_server`]: listener, handshake and transmission (crate `nbd` does the protocol).
//! - [`monitor`] and [`commands`]: QMP over socket chardevs.
//! - [`serve`]: `bexd serve IMAGE`, the one-image shortcut.
//! - [`backup`]: `bexd backup`, an NBD client pulling full and incremental backups.
//! - [`shell`]: `bexd qmp SOCKET`, an interactive QMP shell.

pub mod backup;
pub mod cli;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod error;
pub mod events;
pub mod exports;
pub mod monitor;
pub mod nbd_server;
pub mod net;
pub mod nodes;
pub mod objects;
pub mod process;
pub mod program;
pub mod qapi;
pub mod serve;
pub mod shell;
pub mod startup;
pub mod tls;
pub mod util;

/// The QEMU version bexd's QMP interface corresponds to (tools gate features on it).
pub const QEMU_VERSION: (u32, u32, u32) = (10, 0, 2);

/// What `query-version` and the greeting report as `package`.
pub const PACKAGE: &str = concat!("bexd ", env!("CARGO_PKG_VERSION"));
