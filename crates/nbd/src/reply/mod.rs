//! Transmission replies, sans-IO.
//!
//! [`ReplyShape`] (fixed by the handshake) decides each reply's form: simple,
//! structured or extended (32-byte chunk headers, 64-bit lengths), a READ whole or as data and hole chunks, an error with or
//! without its message, one BLOCK_STATUS chunk per context. It answers with
//! a [`ReplyPlan`]: the protocol bytes, and between them the ranges of the
//! request's data, which the daemon fills from its I/O buffer or page-cache
//! file and writes with vectored I/O or `sendfile`, so data is never copied
//! into a reply.
//!
//! ```text
//!   request + shape ─► ReplyShape::{ack, error, read, block_status} ─► ReplyPlan
//!   ReplyPlan::pieces(): Bytes(header) Data(0..n) Bytes(hole chunk) Data(m..len) ...
//! ```
//!
//! - `shape`: the decisions, as QEMU's server makes them.
//! - `plan`: the laid-out reply.
//! - `status`: BLOCK_STATUS flag bits per context.
//! - `wire`: the encoders of single replies and chunks.

mod plan;
mod shape;
mod status;
mod wire;

#[cfg(test)]
mod tests;

pub use plan::{PlanPiece, ReplyPlan};
pub use shape::{status_chunk_len, BlockStatusPlan, ReplyShape, MAX_EXTENTS, SPARSE_READ_MIN};
pub use status::{allocation_status, dirty_status};
pub use wire::{
    block_status_chunk, block_status_ext_chunk, error_chunk, none_chunk, offset_data_header,
    offset_hole, simple_reply, Frame,
};
