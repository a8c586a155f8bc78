//! The NBD protocol, sans-IO: no sockets, no runtime, no clock.
//!
//! ```text
//!   socket bytes ──► ServerHandshake::receive ─► advance(catalog) ─► HandshakeStatus
//!                                                    │
//!   socket  ◄──────────── take_output() ◄────────────┘  (option replies)
//!
//!   transmission:  28-byte header ─► request::decode_request ─► request::validate
//!                  reply::* encoders append headers; data stays in the caller's buffer
//! ```
//!
//! The daemon owns the sockets; this crate only turns bytes into typed events
//! and typed answers into bytes, so every rule here is unit-tested and fuzzed.

pub mod consts;
pub mod export;
pub mod handshake;
pub mod reply;
pub mod request;
pub mod types;

#[cfg(feature = "client")]
pub mod client;
