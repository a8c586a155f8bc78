//! bexd, the block export daemon: block nodes served over NBD, managed over QMP,
//! started with qemu-storage-daemon's command line.
//!
//! Layout (see docs/architecture.md for the walkthrough and the module graph):
//! - [`program`] picks the mode; [`cli`] reads argv in order, as qemu-storage-daemon does, and
//!   [`startup`] applies it through the same commands QMP uses; [`cli_options`] describes the
//!   options once, for the walker, `--help` and the man page ([`man`]).
//! - [`config`]: plain data, what the CLI and QMP asked for; [`qapi`] reads QAPI types into it.
//! - [`daemon`]: owns the tables and the NBD server and wires what spans them.
//! - [`nodes`]: the node table (opening nodes from config, the graph, bitmap rules).
//! - [`exports`]: the export table and the export kinds behind [`exports::ExportKind`] (NBD).
//! - [`objects`]: the object table (authz, TLS credentials, iothreads); [`tls`] loads credentials.
//! - [`metrics`]: the `metrics-http` Prometheus endpoint over the exports' and nodes' counters.
//! - [`nbd_server`]: listener, handshake and transmission over a [`nbd_server::ServerContext`]
//!   (crate `nbd` owns the protocol); [`net`] is the accept side shared with the monitors.
//! - [`monitor`] and [`commands`]: QMP over chardevs ([`chardevs`]: stdio, sockets listening or
//!   connecting out), each command defined once; [`fds`]: descriptors taken as listening sockets.
//! - [`error`]: one error type per part, printing QEMU's texts; [`events`]: the QMP event bus.
//! - [`serve`]: `bexd serve IMAGE`, the one-image shortcut.
//! - [`backup`]: `bexd backup`, an NBD client pulling full and incremental backups.
//! - [`shell`]: `bexd qmp SOCKET`, an interactive QMP shell; [`top`]: `bexd top SOCKET`, a live
//!   view of the exports' counters.
//! - [`trace`]: `--trace`/`-T`, QEMU trace patterns mapped onto the log targets, and the log's
//!   set-up; [`log_output`]: `--log-target` (stderr, syslog, journal) and `--log-format`.
//! - [`version`]: the `--version` text, with the commit build.rs embedded.

pub mod backup;
pub mod chardevs;
pub mod cli;
pub mod cli_options;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod error;
pub mod events;
pub mod exports;
pub mod fds;
pub mod jobs;
pub mod log_output;
pub mod man;
pub mod metrics;
pub mod monitor;
pub mod nbd_server;
pub mod net;
pub mod nodes;
pub mod objects;
pub mod process;
pub mod program;
pub mod qapi;
pub mod qmp_client;
pub mod serve;
pub mod shell;
pub mod startup;
pub mod tls;
pub mod top;
pub mod trace;
pub mod util;
pub mod version;

/// The QEMU version bexd's QMP interface corresponds to (tools gate features on it).
pub const QEMU_VERSION: (u32, u32, u32) = (10, 0, 2);

/// What `query-version` and the greeting report as `package`.
pub const PACKAGE: &str = concat!("bexd ", env!("CARGO_PKG_VERSION"));
