//! `driver=nbd`: a block driver whose storage is an export of a remote NBD
//! server, so the daemon can re-export, chain and proxy exports.
//!
//! The protocol is the `nbd` crate's (the client handshake and the reply
//! decoders, sans-IO); this crate owns the socket. One connection carries
//! every request: each request registers under its own cookie in the
//! `inflight` table and is written whole under the writer's lock; one reader
//! task (`reader`) reads replies as they come, in any order, straight into
//! the waiting request's buffer, and completes it. So many requests are in
//! flight and none holds a thread (the [`block::AsyncDriver`] face); a format
//! on top (qcow2), which calls its child synchronously from the blocking
//! pool, waits there for the same connection ([`driver`]).
//!
//! ```text
//!   AsyncDriver::read ─► Link::call ─► InFlight (cookie) ─► writer lock ─► socket
//!                                              ▲                           │
//!                         reader task ◄────────┴── replies by cookie ◄─────┘
//!   connection lost ─► (reconnect-delay) requests wait, reconnect, resent ─► or EIO
//! ```
//!
//! The daemon gives the server's address, the export, and (for TLS) a
//! [`transport::TlsConnect`] built from its credentials objects; this crate
//! knows no daemon.

pub mod addr;
pub mod driver;
pub mod error;
mod handshake;
mod inflight;
mod known_data;
mod life;
mod link;
mod reader;
pub mod transport;

pub use addr::ServerAddr;
pub use driver::{NbdDriver, NbdOptions};
pub use error::OpenError;
pub use transport::{Stream, TlsConnect};
