//! A reply ready for the wire: the nbd crate's plan of it (protocol bytes
//! and data ranges; the daemon decides nothing about its shape) and data
//! that stays where it is, in the I/O buffer it was read into or in the page
//! cache (then sent with `sendfile`), never copied into a reply buffer.

use std::borrow::Borrow;
use std::io::IoSlice;

use block::{FileSlice, IoBuf};
use nbd::reply::{PlanPiece, ReplyPlan};
use nbd::types::NbdErrno;
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

/// One reply (simple, or all chunks of a structured one), written whole:
/// the nbd crate's plan of it, and the data its ranges point into.
#[derive(Debug)]
pub struct Reply {
    plan: ReplyPlan,
    data: Option<Data>,
    /// The errno an error reply carries (counted in the statistics).
    errno: Option<NbdErrno>,
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
    /// A reply that carries no data (its plan has no data ranges).
    pub fn new(plan: ReplyPlan) -> Self {
        Self {
            plan,
            data: None,
            errno: None,
            _permits: None,
        }
    }

    /// An error reply carrying `errno` (its plan built by the shape's `error`).
    pub fn failed(plan: ReplyPlan, errno: NbdErrno) -> Self {
        Self {
            errno: Some(errno),
            ..Self::new(plan)
        }
    }

    /// The errno of an error reply.
    pub fn errno(&self) -> Option<NbdErrno> {
        self.errno
    }

    /// A reply whose plan's data ranges are ranges of `data`.
    pub fn with_data(plan: ReplyPlan, data: Data) -> Self {
        Self {
            plan,
            data: Some(data),
            errno: None,
            _permits: None,
        }
    }

    pub fn hold_permits(&mut self, permits: Permits) {
        self._permits = Some(permits);
    }

    /// The reply in wire order: its protocol bytes, and its data where it lies.
    pub fn pieces(&self) -> impl Iterator<Item = Piece<'_>> {
        self.plan.pieces().flat_map(|piece| {
            let (bytes, file) = match (piece, &self.data) {
                (PlanPiece::Bytes(b), _) => (Some(Piece::Bytes(b)), None),
                (PlanPiece::Data(range), Some(Data::Buf(buf))) => {
                    (Some(Piece::Bytes(&buf[range])), None)
                }
                // A data range of a qcow2 slice may span several file runs.
                (PlanPiece::Data(range), Some(Data::File(f))) => {
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
                (PlanPiece::Data(_), None) => (None, None),
            };
            bytes.into_iter().chain(file.into_iter().flatten())
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
pub async fn write_batch<W: ReplyWriter, R: Borrow<Reply>>(
    w: &mut W,
    batch: &[R],
    scratch: &mut Vec<u8>,
) -> std::io::Result<()> {
    if !w.is_write_vectored() {
        scratch.clear();
        for piece in batch.iter().flat_map(|r| r.borrow().pieces()) {
            match piece {
                Piece::Bytes(b) => scratch.extend_from_slice(b),
                Piece::File { slice, offset, len } => read_file_into(scratch, slice, offset, len)?,
            }
        }
        w.write_all(scratch).await?;
        return w.flush().await;
    }
    let mut slices: Vec<IoSlice<'_>> = Vec::new();
    for piece in batch.iter().flat_map(|r| r.borrow().pieces()) {
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

    /// A sparse READ of `data` (data, hole, data) and an ack: every kind of piece.
    fn plans(offset: u64, data: &[u8]) -> (ReplyPlan, ReplyPlan) {
        let req = nbd::request::RequestHeader {
            flags: 0,
            command: nbd::types::CommandType::READ,
            cookie: 7,
            offset,
            length: data.len() as u64,
        };
        let shape = nbd::reply::ReplyShape::Structured;
        let allocation = [(3, 0), (2, nbd::consts::STATE_ZERO), (3, 0)];
        (
            shape.read(&req, &allocation),
            shape.ack(&nbd::request::RequestHeader { cookie: 8, ..req }),
        )
    }

    const DATA: &[u8] = b"01234567";

    /// The batch's bytes, from the plans alone.
    fn expected(offset: u64, data: &[u8]) -> Vec<u8> {
        let (read, ack) = plans(offset, data);
        let mut out = read.to_wire(data).expect("data covers the plan");
        out.extend_from_slice(ack.protocol_bytes());
        out
    }

    fn sample() -> Vec<Reply> {
        let (read, ack) = plans(0, DATA);
        vec![
            Reply::with_data(read, Data::Buf(IoBuf::from_slice(DATA))),
            Reply::new(ack),
        ]
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
                assert_eq!(w.out, expected(0, DATA), "vectored={vectored} step={step}");
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

    /// The file is "0123456789"; the READ covers bytes 2..10.
    fn file_sample(node: &std::sync::Arc<block::BlockNode>) -> Vec<Reply> {
        let (read, ack) = plans(2, &FILE_DATA);
        let slice = node.page_cache_slice(2, 8).unwrap();
        vec![Reply::with_data(read, Data::File(slice)), Reply::new(ack)]
    }

    const FILE_DATA: [u8; 8] = *b"23456789";

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
            assert_eq!(w.out, expected(2, &FILE_DATA), "vectored={vectored}");
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
            assert_eq!(got, expected(2, &FILE_DATA));
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
            assert_eq!(w.out, expected(0, DATA), "vectored: {vectored}");
            assert!(w.held.is_empty(), "vectored: {vectored}");
        }
    }
}
