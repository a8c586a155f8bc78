//! A reply ready for the wire: protocol bytes interleaved with data that
//! stays in the I/O buffer it was read into (no copy into a reply buffer).

use std::io::IoSlice;
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
    /// The in-flight budget this request holds until its reply is on the wire.
    _permits: Option<Permits>,
}

/// What a request holds of the in-flight budgets until its reply is on the
/// wire; dropping it gives them back.
#[derive(Debug)]
pub struct Permits {
    /// Its connection's request slot.
    _slot: OwnedSemaphorePermit,
    /// Its connection's payload units.
    _payload: OwnedSemaphorePermit,
    /// Units of the server-wide budget (none when the request costs nothing there).
    _shared: Option<OwnedSemaphorePermit>,
}

impl Permits {
    pub fn new(
        slot: OwnedSemaphorePermit,
        payload: OwnedSemaphorePermit,
        shared: Option<OwnedSemaphorePermit>,
    ) -> Self {
        Self {
            _slot: slot,
            _payload: payload,
            _shared: shared,
        }
    }
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

    pub fn hold_permits(&mut self, permits: Permits) {
        self._permits = Some(permits);
    }

    /// The reply's bytes in wire order, as slices of its headers and its data.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        self.pieces.iter().flat_map(|(meta, data)| {
            let data = match (data, &self.data) {
                (Some(range), Some(buf)) => Some(&buf[range.clone()]),
                _ => None,
            };
            std::iter::once(&self.meta[meta.clone()]).chain(data)
        })
    }
}

/// Writes every reply of `batch`, whole and in order.
///
/// With a vectored writer (plain TCP and unix sockets) headers and read data
/// go out in one `writev` straight from the I/O buffers, no copy; other
/// writers (TLS) get the bytes gathered into `scratch` and one `write_all`,
/// so a batch still makes few records.
pub async fn write_batch<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &[Reply],
    scratch: &mut Vec<u8>,
) -> std::io::Result<()> {
    if !w.is_write_vectored() {
        scratch.clear();
        for piece in batch.iter().flat_map(Reply::slices) {
            scratch.extend_from_slice(piece);
        }
        return w.write_all(scratch).await;
    }
    let mut slices: Vec<IoSlice<'_>> = batch
        .iter()
        .flat_map(Reply::slices)
        .filter(|s| !s.is_empty())
        .map(IoSlice::new)
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// Accepts at most `step` bytes per call, vectored or not.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
        vectored: bool,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.step - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
                if n == self.step {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn sample() -> Vec<Reply> {
        let mut a = Reply::new();
        a.push_with_data(|m| m.extend_from_slice(b"HDR1"), 2..6);
        a.push_meta(|m| m.extend_from_slice(b"HOLE"));
        a.push_with_data(|m| m.extend_from_slice(b"HDR2"), 6..8);
        a.set_data(IoBuf::from_slice(b"01234567"));
        let mut b = Reply::new();
        b.push_meta(|m| m.extend_from_slice(b"ACK"));
        vec![a, b]
    }

    #[test]
    fn test_batches_go_out_whole_and_in_order_through_partial_writes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for vectored in [true, false] {
            for step in [1, 3, 7, 1000] {
                let mut w = Trickle {
                    out: Vec::new(),
                    step,
                    vectored,
                };
                rt.block_on(write_batch(&mut w, &sample(), &mut Vec::new()))
                    .unwrap();
                assert_eq!(
                    w.out, b"HDR12345HOLEHDR267ACK",
                    "vectored={vectored} step={step}"
                );
            }
        }
    }
}
