//! A reply laid out for the wire without its data: the protocol bytes of
//! every chunk, and after each the range of the request's data (if any)
//! that follows it. The daemon fills the ranges from wherever the data
//! already is (an I/O buffer, a page-cache file) and writes the pieces in
//! order, so read data is never copied into a reply buffer.

use std::ops::Range;

/// One reply (a simple reply, or every chunk of a structured one) as
/// protocol bytes interleaved with ranges of the request's data.
///
/// Built only by [`super::ReplyShape`], so every plan is a valid reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplyPlan {
    /// Every chunk's protocol bytes, concatenated in wire order.
    bytes: Vec<u8>,
    /// The first segment, kept inline: most replies (acks, errors, reads
    /// that go out whole) have only one, and then the plan allocates
    /// nothing but `bytes`.
    first: Option<Segment>,
    /// The segments after the first (sparse reads, block status).
    more: Vec<Segment>,
}

/// A run of protocol bytes, then optionally data.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Segment {
    bytes: Range<usize>,
    data: Option<Range<usize>>,
}

/// A piece of a reply, in wire order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanPiece<'a> {
    /// Protocol bytes (headers, hole and status payloads, error messages).
    Bytes(&'a [u8]),
    /// This range of the request's data: byte 0 is the data at the
    /// request's offset.
    Data(Range<usize>),
}

impl ReplyPlan {
    /// An empty plan with room for `bytes` protocol bytes and `segments`
    /// segments, so that building it does not reallocate.
    pub(super) fn with_capacity(bytes: usize, segments: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(bytes),
            first: None,
            more: Vec::with_capacity(segments.saturating_sub(1)),
        }
    }

    /// Appends what `encode` writes, followed by `data` of the request's data.
    pub(super) fn push(&mut self, encode: impl FnOnce(&mut Vec<u8>), data: Option<Range<usize>>) {
        let start = self.bytes.len();
        encode(&mut self.bytes);
        let segment = Segment {
            bytes: start..self.bytes.len(),
            data,
        };
        match self.first {
            None => self.first = Some(segment),
            Some(_) => self.more.push(segment),
        }
    }

    /// The protocol bytes written so far, for patching a chunk's flags.
    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// The reply in wire order.
    pub fn pieces(&self) -> impl Iterator<Item = PlanPiece<'_>> {
        self.first.iter().chain(&self.more).flat_map(|s| {
            std::iter::once(PlanPiece::Bytes(&self.bytes[s.bytes.clone()]))
                .chain(s.data.clone().map(PlanPiece::Data))
        })
    }

    /// All protocol bytes, in wire order, without the data between them.
    pub fn protocol_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Bytes of the request's data the reply carries.
    pub fn data_len(&self) -> usize {
        self.first
            .iter()
            .chain(&self.more)
            .filter_map(|s| s.data.as_ref())
            .map(|d| d.len())
            .sum()
    }

    /// The whole reply with `data` (the request's data) filled in: for tests
    /// and for writers that gather into one buffer anyway.
    pub fn to_wire(&self, data: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(self.bytes.len() + self.data_len());
        for piece in self.pieces() {
            match piece {
                PlanPiece::Bytes(b) => out.extend_from_slice(b),
                PlanPiece::Data(range) => out.extend_from_slice(data.get(range)?),
            }
        }
        Some(out)
    }
}
