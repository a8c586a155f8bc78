//! A reply ready for the wire: protocol bytes interleaved with data that
//! stays where it is, in the I/O buffer it was read into or in the page
//! cache (then sent with `sendfile`), never copied into a reply buffer.

use std::io::IoSlice;
use std::ops::Range;

use block::{FileSlice, IoBuf};
use tokio::io::AsyncWriteExt;
use tokio::sync::OwnedSemaphorePermit;

use super::sink::ReplyWriter;

/// A reply's data.
#[derive(Debug)]
pub enum Data {
    Buf(IoBuf),
    /// Bytes of a page-cache file, the request's first byte at the slice's offset.
    File(FileSlice),
}

/// A piece of a reply on the wire.
#[derive(Clone, Copy, Debug)]
pub enum Piece<'a> {
    Bytes(&'a [u8]),
    /// `len` bytes of the slice's file from `offset` (a file offset).
    File {
        slice: &'a FileSlice,
        offset: u64,
        len: usize,
    },
}

/// One reply (simple, or all chunks of a structured one), written whole.
#[derive(Debug, Default)]
pub struct Reply {
    /// Headers of every chunk, concatenated.
    meta: Vec<u8>,
    /// In wire order: a slice of `meta`, then optionally a slice of `data`.
    pieces: Vec<(Range<usize>, Option<Range<usize>>)>,
    data: Option<Data>,
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

    pub fn set_data(&mut self, data: Data) {
        self.data = Some(data);
    }

    pub fn hold_permits(&mut self, permits: Permits) {
        self._permits = Some(permits);
    }

    /// The reply in wire order: slices of its headers and of its data.
    pub fn pieces(&self) -> impl Iterator<Item = Piece<'_>> {
        self.pieces.iter().flat_map(|(meta, data)| {
            let (bytes, file) = match (data, &self.data) {
                (Some(range), Some(Data::Buf(buf))) => {
                    (Some(Piece::Bytes(&buf[range.clone()])), None)
                }
                // A data range of a qcow2 slice may span several file runs.
                (Some(range), Some(Data::File(f))) => {
                    let runs = f.runs_in(range.start as u64..range.end as u64);
                    (
                        None,
                        Some(runs.map(move |run| Piece::File {
                            slice: f,
                            offset: run.offset,
                            len: run.len as usize,
                        })),
                    )
                }
                _ => (None, None),
            };
            std::iter::once(Piece::Bytes(&self.meta[meta.clone()]))
                .chain(bytes)
                .chain(file.into_iter().flatten())
        })
    }
}

/// Writes every reply of `batch`, whole and in order.
///
/// With a vectored writer (plain TCP and unix sockets, and TLS: rustls packs
/// the slices into full records) headers and read data go out in one
/// `writev` straight from the I/O buffers, no copy, and page-cache data with
/// `sendfile` in between where the writer can; a writer that is not vectored
/// gets the bytes gathered into `scratch` and one `write_all`. Either way the
/// batch ends with a flush.
pub async fn write_batch<W: ReplyWriter>(
    w: &mut W,
    batch: &[Reply],
    scratch: &mut Vec<u8>,
) -> std::io::Result<()> {
    if !w.is_write_vectored() {
        scratch.clear();
        for piece in batch.iter().flat_map(Reply::pieces) {
            match piece {
                Piece::Bytes(b) => scratch.extend_from_slice(b),
                Piece::File { slice, offset, len } => read_file_into(scratch, slice, offset, len)?,
            }
        }
        w.write_all(scratch).await?;
        return w.flush().await;
    }
    let mut slices: Vec<IoSlice<'_>> = Vec::new();
    for piece in batch.iter().flat_map(Reply::pieces) {
        match piece {
            Piece::Bytes([]) => {}
            Piece::Bytes(b) => slices.push(IoSlice::new(b)),
            Piece::File { slice, offset, len } => {
                write_all_vectored(w, &mut slices).await?;
                slices.clear();
                send_file(w, slice, offset, len, scratch).await?;
            }
        }
    }
    write_all_vectored(w, &mut slices).await?;
    // A TLS writer may accept bytes it could not send yet (the socket was
    // full) and send them only on the next write or flush. Without this
    // flush, replies the client waits for could sit in the TLS buffer for
    // ever once no more replies come: nbdcopy over TLS hung that way. (On a
    // plain socket it costs nothing.)
    w.flush().await
}

async fn write_all_vectored<W: ReplyWriter>(
    w: &mut W,
    slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    let mut rest = slices;
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// `len` bytes of `fd` from `offset`, with `sendfile` where the writer can.
/// A file that ends early (truncated behind our back) reads as zeroes past
/// its end, as a read would.
async fn send_file<W: ReplyWriter>(
    w: &mut W,
    slice: &FileSlice,
    mut offset: u64,
    mut len: usize,
    scratch: &mut Vec<u8>,
) -> std::io::Result<()> {
    if !w.can_sendfile() {
        scratch.clear();
        read_file_into(scratch, slice, offset, len)?;
        return w.write_all(scratch).await;
    }
    while len > 0 {
        let n = std::future::poll_fn(|cx| w.poll_sendfile(cx, slice.fd(), offset, len)).await?;
        if n == 0 {
            scratch.clear();
            scratch.resize(len, 0);
            return w.write_all(scratch).await;
        }
        offset += n as u64;
        len -= n;
    }
    Ok(())
}

/// Appends `len` bytes of the slice's file from `offset` (zeroes past its end).
fn read_file_into(
    out: &mut Vec<u8>,
    slice: &FileSlice,
    offset: u64,
    len: usize,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = slice.file();
    let start = out.len();
    out.resize(start + len, 0);
    let mut done = 0;
    while done < len {
        match file.read_at(&mut out[start + done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncReadExt, AsyncWrite};

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

    impl ReplyWriter for Trickle {}

    fn sample() -> Vec<Reply> {
        let mut a = Reply::new();
        a.push_with_data(|m| m.extend_from_slice(b"HDR1"), 2..6);
        a.push_meta(|m| m.extend_from_slice(b"HOLE"));
        a.push_with_data(|m| m.extend_from_slice(b"HDR2"), 6..8);
        a.set_data(Data::Buf(IoBuf::from_slice(b"01234567")));
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

    /// A node over a file in /dev/shm (tmpfs), so its reads are page-cache slices.
    fn shm_node(contents: &[u8]) -> (tempfile::TempDir, std::sync::Arc<block::BlockNode>) {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, contents).unwrap();
        let opts = block::drivers::file::FileOptions {
            filename: path,
            read_only: true,
            ..Default::default()
        };
        let d = block::drivers::file::FileDriver::open(&opts).unwrap();
        let node = block::BlockNode::new("n".into(), std::sync::Arc::new(d), true);
        (dir, std::sync::Arc::new(node))
    }

    fn file_sample(node: &std::sync::Arc<block::BlockNode>) -> Vec<Reply> {
        let mut a = Reply::new();
        a.push_with_data(|m| m.extend_from_slice(b"HDR1"), 0..3);
        a.push_meta(|m| m.extend_from_slice(b"HOLE"));
        a.push_with_data(|m| m.extend_from_slice(b"HDR2"), 5..8);
        a.set_data(Data::File(node.page_cache_slice(2, 8).unwrap()));
        let mut b = Reply::new();
        b.push_meta(|m| m.extend_from_slice(b"ACK"));
        vec![a, b]
    }

    const FILE_EXPECTED: &[u8] = b"HDR1234HOLEHDR2789ACK";

    #[test]
    fn test_file_data_without_sendfile_is_read_in_order() {
        let (_dir, node) = shm_node(b"0123456789");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for vectored in [true, false] {
            let mut w = Trickle {
                out: Vec::new(),
                step: 3,
                vectored,
            };
            rt.block_on(write_batch(&mut w, &file_sample(&node), &mut Vec::new()))
                .unwrap();
            assert_eq!(w.out, FILE_EXPECTED, "vectored={vectored}");
        }
    }

    #[test]
    fn test_file_data_goes_out_with_sendfile_on_a_socket() {
        let (_dir, node) = shm_node(b"0123456789");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
            let (_r, mut w) = a.into_split();
            assert!(w.can_sendfile());
            let batch = file_sample(&node);
            write_batch(&mut w, &batch, &mut Vec::new()).await.unwrap();
            drop(w);
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, FILE_EXPECTED);
        });
    }

    /// Takes every write into a buffer and delivers it only on flush, as a
    /// TLS stream does when its socket is full. `vectored` as tokio-rustls
    /// says it is (the path TLS replies really take).
    #[derive(Default)]
    struct HoldsUntilFlush {
        held: Vec<u8>,
        out: Vec<u8>,
        vectored: bool,
    }

    impl AsyncWrite for HoldsUntilFlush {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.held.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            let held = std::mem::take(&mut self.held);
            self.out.extend_from_slice(&held);
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }
    }

    impl ReplyWriter for HoldsUntilFlush {}

    #[test]
    fn test_a_batch_is_flushed_out_of_a_buffering_writer() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for vectored in [false, true] {
            let mut w = HoldsUntilFlush {
                vectored,
                ..Default::default()
            };
            rt.block_on(write_batch(&mut w, &sample(), &mut Vec::new()))
                .unwrap();
            assert_eq!(w.out, b"HDR12345HOLEHDR267ACK", "vectored: {vectored}");
            assert!(w.held.is_empty(), "vectored: {vectored}");
        }
    }
}
