//! The NBD protocol, sans-IO: no sockets, no runtime, no clock.
//!
//! The daemon owns the sockets (and TLS, and timeouts); this crate only turns
//! bytes into typed events and typed answers into bytes, so every protocol
//! rule can be unit-tested, driven against the bundled client codec in
//! memory, and fuzzed.
//!
//! ```text
//!                 handshake                              transmission
//!   socket ─bytes─► ServerHandshake::receive      socket ─28 bytes─► request::decode_request
//!                        │                                               │ RequestHeader
//!                        ▼                                               ▼
//!   ExportCatalog ─► advance(catalog) ─► HandshakeStatus       request::validate(&Negotiated)
//!                        │   NeedInput │ StartTls │ Closed         │ Ok │ Reject{errno,msg}
//!                        │   Done(Negotiated) ──────────────────►  │    │ Disconnect
//!                        ▼                                         ▼
//!   socket ◄─bytes─ take_output()               reply::ReplyShape::{ack,error,read,block_status}
//!                   take_leftover() ─► first requests          │ ReplyPlan: header bytes and
//!                                                  socket ◄────┘ data ranges, filled in place
//! ```
//!
//! Layout:
//! - [`consts`]: magics, flag bits, limits.
//! - [`types`]: open newtypes for wire enumerations (`OptionType`, `CommandType`, ...).
//! - `text`: protocol strings cut to their limit (shared by handshake and replies).
//! - [`export`]: what the daemon tells the handshake about its exports.
//! - [`handshake`]: the server's option negotiation, QEMU's behaviour exactly.
//! - [`request`]: request header decoding and validation.
//! - [`reply`]: the shape of every reply (simple or structured, sparse reads,
//!   error chunks, block status per context), laid out as a plan whose data
//!   the daemon fills in place; and the single-chunk encoders.
//! - `client` (feature `client`): the client codec: encoders and total decoders of
//!   everything a server sends, used by the NBD client block driver, tests, fuzzing
//!   and benches.
//! - `client_handshake` (feature `client`): the client's option haggling as a state
//!   machine (STARTTLS, structured replies, one meta context, GO with block size).

pub mod consts;
pub mod export;
pub mod handshake;
pub mod reply;
pub mod request;
mod text;
pub mod types;

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "client")]
pub mod client_handshake;
