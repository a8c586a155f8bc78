//! A reply ready for the wire: protocol bytes interleaved with data that
//! stays in the I/O buffer it was read into (no copy into a reply buffer).

use std::ops::Range;

use block::IoBuf;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;

/// One reply (simple, or all chunks of a structured one), written whole.
#[derive(Debug, Default)]
pub struct Reply {
    /// Headers of every chunk, concatenated.
    meta: Vec<u8>,
    /// In wire order: a slice of `meta`, then optionally a slice of `data`.
    pieces: Vec<(Range<usize>, Option<Range<usize>>)>,
    data: Option<IoBuf>,
    /// The in-flight budget this request holds until its reply is on the wire:
    /// its request slot and its payload units.
    _permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

impl Reply {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends protocol bytes produced by `encode`, with no data after them.
    pub fn push_meta(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        self.push(encode, None);
    }

    /// Appends protocol bytes followed by `data_range` of the data buffer.
    pub fn push_with_data(&mut self, encode: impl FnOnce(&mut Vec<u8>), data_range: Range<usize>) {
        self.push(encode, Some(data_range));
    }

    fn push(&mut self, encode: impl FnOnce(&mut Vec<u8>), data: Option<Range<usize>>) {
        let start = self.meta.len();
        encode(&mut self.meta);
        self.pieces.push((start..self.meta.len(), data));
    }

    pub fn set_data(&mut self, data: IoBuf) {
        self.data = Some(data);
    }

    pub fn hold_permits(&mut self, slot: OwnedSemaphorePermit, payload: OwnedSemaphorePermit) {
        self._permits = Some((slot, payload));
    }

    /// Writes the reply into `w` (a buffered writer; the caller flushes).
    pub async fn write_to<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        for (meta, data) in &self.pieces {
            w.write_all(&self.meta[meta.clone()]).await?;
            if let (Some(range), Some(buf)) = (data, &self.data) {
                w.write_all(&buf[range.clone()]).await?;
            }
        }
        Ok(())
    }
}
