//! The transmission phase of one connection.
//!
//! ```text
//!  socket ─► reader loop: header, validate, payload ─► polled once; if it must ─┐
//!                 (bounded by an in-flight budget)     wait, a task of its own  │ Reply
//!  socket ◄── writer task: replies in completion order, one writev per batch ◄──┘
//! ```
//!
//! What each reply looks like on the wire is the nbd crate's call
//! (`nbd::reply::ReplyShape`): this file runs the request, gathers its data
//! and extents, and hands the plan and the data to the writer.
//!
//! READ data in a tmpfs file is not read at all on plain sockets: the reply
//! names the file range and the writer `sendfile`s it (see `sink.rs`).
//!
//! The reader never waits for a request that blocks, so a slow request does
//! not stall the ones behind it. The budget (requests and payload bytes)
//! bounds the memory one client can pin, and the server-wide budget
//! (`budget.rs`) what all of them together can.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use block::uring::Batch;
use block::{BlockError, BlockNode, IoBuf, IoKind, Outcome, Started, ZeroFlags};
use nbd::consts::{
    CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE,
    EXTENDED_REQUEST_HEADER_LEN,
};
use nbd::export::MetaContext;
use nbd::handshake::Negotiated;
use nbd::reply::{allocation_status, ReplyShape, MAX_EXTENTS};
use nbd::request::{
    incoming, status_filter, validate, validate_selected, HeaderForm, Incoming, RequestHeader,
    StatusFilter, Verdict,
};
use nbd::types::{CommandType, NbdErrno};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::budget::SharedBudget;
use super::input::Input;
use super::reply::{write_batch, Data, Permits, Reply};
use super::sink::ReplyWriter;
use super::splice::{splice_payload, Pipe, RequestReader};
use crate::exports::nbd::NbdExport;
use crate::exports::ExportClient;

/// Budget units: one per request plus one per 4 KiB it pins (see `pinned_bytes`).
const BUDGET_UNIT: u64 = 4096;
/// Per connection: up to 64 MiB of payload in flight (and one unit per request)...
const BUDGET: usize = 256 + (64 << 20) / BUDGET_UNIT as usize;
/// ...and up to 256 requests. Counted apart: every request pins a buffer of at
/// least 4 KiB and a task, so as one unit each of `BUDGET` a client sending
/// small READs could hold 16640 of them (130 MiB per connection, measured).
const MAX_REQUESTS: usize = 256;
/// Reads at least this large go out with `sendfile` when their bytes are in
/// a page-cache file and the socket is plain. Below it, the copy costs less
/// than a `sendfile` call of its own (which also splits the writer's batch):
/// at 32 KiB, 64 KiB randrw (4 connections x QD16) ran 5% slower on raw and
/// 16% slower on qcow2 than with 128 KiB.
const ZERO_COPY_MIN: u32 = 128 * 1024;
/// WRITEs at least this large into a tmpfs file are spliced from the socket
/// (see `splice.rs`): two `splice` calls and a pipe cost more than copying
/// a small payload.
const SPLICE_MIN: u32 = 64 * 1024;
/// The request stream's buffer: room for a deep queue of small requests
/// (32 x 4 KiB WRITEs) per socket read. 64 KiB measured no better.
const INPUT_BUFFER: usize = 256 * 1024;
/// WRITE payloads at least this large are taken in only after the ring I/O
/// that the requests before them deferred has been submitted: the copy
/// would hold those up (64 KiB randrw on a disk read 459 MiB/s against
/// qemu-storage-daemon's 515 without this).
const SUBMIT_BEFORE_PAYLOAD: usize = 32 * 1024;

/// What every request task needs, shared by reference count.
struct Context {
    negotiated: Negotiated,
    /// How replies are framed, from the handshake.
    shape: ReplyShape,
    /// How requests are framed (28 or 32 bytes), from the handshake.
    form: HeaderForm,
    client: ExportClient,
    node: Arc<BlockNode>,
    writethrough: bool,
    /// The writer can `sendfile` (plain TCP or unix socket).
    zero_copy: bool,
    /// Payload bytes in flight across the whole server.
    shared: Arc<SharedBudget>,
    /// The reader's io_uring batch, plugged while it polls a request (see
    /// [`run_or_spawn`]); requests pass it to the node's reads and writes.
    batch: Batch,
}

/// A WRITE's payload as the reader left it for the request's task.
enum Payload {
    None,
    Buf(IoBuf),
    /// Already spliced into the image; the outcome.
    Written(Result<(), BlockError>),
}

pub struct Session {
    ctx: Arc<Context>,
    leftover: Vec<u8>,
}

impl Session {
    pub fn new(
        negotiated: Negotiated,
        client: ExportClient,
        leftover: Vec<u8>,
        shared: Arc<SharedBudget>,
    ) -> Self {
        let node = client.export().node.clone();
        let writethrough = client.export().config.writethrough;
        Self {
            ctx: Arc::new(Context {
                shape: ReplyShape::of(&negotiated),
                form: HeaderForm::of(&negotiated),
                negotiated,
                client,
                node,
                writethrough,
                zero_copy: false,
                shared,
                batch: Batch::new(),
            }),
            leftover,
        }
    }

    /// Serves requests until DISC, EOF, a protocol violation, `kick` or `shutdown`.
    /// In every case the requests already read are finished and replied first.
    pub async fn run<R, W>(
        mut self,
        reader: R,
        writer: W,
        kick: CancellationToken,
        shutdown: CancellationToken,
    ) where
        R: RequestReader,
        W: ReplyWriter,
    {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.zero_copy = writer.can_sendfile();
        }
        // Boxed replies: the channel allocates its first block of 32 slots up
        // front, and at a Reply's size that was 6.7 KiB of every idle
        // connection's 22 (heaptrack); a box is 8 bytes a slot.
        let (tx, rx) = mpsc::unbounded_channel();
        let reader_done = CancellationToken::new();
        let writer_task = tokio::spawn(write_replies(writer, rx, reader_done.clone()));
        let input = Input::new(reader, &self.leftover, INPUT_BUFFER);
        let mut requests = 0u64;
        tokio::select! {
            _ = read_requests(input, self.ctx.clone(), tx, &mut requests) => {}
            _ = kick.cancelled() => tracing::info!("client dropped: export removed"),
            _ = shutdown.cancelled() => {}
        }
        // The reader (and its sender) is gone; the writer ends once every
        // request task has sent its reply, or when the client stops taking them.
        reader_done.cancel();
        let _ = writer_task.await;
        // What the client negotiated and how many requests it sent: the
        // server's own account, which the interop tests and bench/ read
        // (BEXD_LOG=bexd::nbd_server=debug) to prove extended headers were
        // used and to count round trips.
        tracing::debug!(
            export = %self.ctx.client.export().id(),
            replies = ?self.ctx.shape,
            requests,
            "NBD connection closed"
        );
    }
}

async fn read_requests<R: RequestReader>(
    mut input: Input<R>,
    ctx: Arc<Context>,
    tx: mpsc::UnboundedSender<Box<Reply>>,
    requests: &mut u64,
) {
    let budget = Arc::new(Semaphore::new(BUDGET));
    let slots = Arc::new(Semaphore::new(MAX_REQUESTS));
    let mut header = [0u8; EXTENDED_REQUEST_HEADER_LEN];
    let header = &mut header[..ctx.form.header_len()];
    let mut pipe: Option<Pipe> = None;
    // Whichever way the loop ends, nothing it deferred stays unsubmitted.
    let _submit = SubmitOnDrop(ctx.batch.clone());
    let batch = &ctx.batch;
    loop {
        if unplugged(batch, input.read_exact(header)).await.is_err() {
            return;
        }
        *requests += 1;
        let request = match ctx.form.decode(header) {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(error = %e, "NBD client sent a bad request; disconnecting");
                // In extended mode QEMU answers with the fields as read,
                // then disconnects; compact mode drops the client silently.
                if ctx.form == HeaderForm::Extended {
                    send_then_close(&ctx, &tx, &ctx.form.fields(header), &e.to_string());
                }
                return;
            }
        };
        let (request, selection, verdict, data_len) =
            match take_payload(&mut input, &ctx, &tx, request).await {
                Some(taken) => taken,
                None => return,
            };
        if let Verdict::Disconnect { reason } = &verdict {
            tracing::info!(%reason, "disconnecting NBD client");
            return;
        }
        let Ok(slot) = unplugged(batch, slots.clone().acquire_owned()).await else {
            return;
        };
        let selected = selection
            .as_ref()
            .map_or(ctx.negotiated.meta_contexts.len(), Vec::len);
        let len = pinned_bytes(&request, &verdict, selected, ctx.shape);
        let cost = 1 + (len / BUDGET_UNIT).min(BUDGET as u64 - 1) as u32;
        let Ok(permit) = unplugged(batch, budget.clone().acquire_many_owned(cost)).await else {
            return;
        };
        let shared = unplugged(batch, take_shared(&ctx.shared, &slots, len)).await;
        let permits = Permits::new(slot, permit, shared);
        if data_len >= SUBMIT_BEFORE_PAYLOAD {
            // A big payload takes a while to take in: what the requests
            // before it queued on a ring goes to the device first.
            batch.submit();
        }
        let payload = match data_len {
            0 => Payload::None,
            len => match splice_target(&ctx, &request, &verdict, &input) {
                Some(slice) => {
                    if pipe.is_none() {
                        pipe = Pipe::new().ok();
                    }
                    let Some(p) = &pipe else {
                        return;
                    };
                    match unplugged(batch, write_spliced(&mut input, &ctx, &request, slice, p))
                        .await
                    {
                        Ok(result) => Payload::Written(result),
                        Err(_) => return,
                    }
                }
                None => {
                    let mut buf = IoBuf::for_overwrite(len);
                    if unplugged(batch, read_payload(&mut input, &mut buf))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    Payload::Buf(buf)
                }
            },
        };
        if request.command == CommandType::DISC {
            return;
        }
        let mut counting = Counting::begin(ctx.clone());
        let tx = tx.clone();
        run_or_spawn(
            Box::pin(async move {
                let ctx = &counting.ctx;
                let invalid = matches!(verdict, Verdict::Reject { .. });
                let mut reply = match verdict {
                    Verdict::Reject { errno, message } => {
                        error_reply(ctx, &request, errno, &message)
                    }
                    _ => handle(ctx, &request, payload, selection.as_deref()).await,
                };
                counting.end(&request, &reply, invalid);
                reply.hold_permits(permits);
                let _ = tx.send(Box::new(reply));
            }),
            batch,
        )
        .await;
    }
}

/// A request being counted in its export's and its node's statistics,
/// from when its payload is in until its reply is ready. Dropped before
/// [`Counting::end`] (the connection went), it leaves the in-flight count.
struct Counting {
    ctx: Arc<Context>,
    started: Started,
    ended: bool,
}

impl Counting {
    fn begin(ctx: Arc<Context>) -> Self {
        ctx.client.export().stats.begin();
        ctx.node.stats().begin();
        Self {
            ctx,
            started: Started::now(),
            ended: false,
        }
    }

    /// QEMU's accounting kinds: WRITE_ZEROES counts as a write, TRIM as an
    /// unmap; BLOCK_STATUS and CACHE move no data and are not counted.
    fn end(&mut self, req: &RequestHeader, reply: &Reply, invalid: bool) {
        let kind = match req.command {
            CommandType::READ => IoKind::Read,
            CommandType::WRITE | CommandType::WRITE_ZEROES => IoKind::Write,
            CommandType::FLUSH => IoKind::Flush,
            CommandType::TRIM => IoKind::Unmap,
            _ => return,
        };
        self.ended = true;
        let (export, node) = (&self.ctx.client.export().stats, self.ctx.node.stats());
        let outcome = match (reply.errno(), invalid) {
            (None, _) => Outcome::Done,
            (Some(errno), true) => Outcome::Invalid(errno.0 as i32),
            (Some(errno), false) => Outcome::Failed(errno.0 as i32),
        };
        let now = std::time::Instant::now();
        let range = (req.offset, req.length);
        export.end(self.started, now, kind, range, outcome);
        node.end(self.started, now, kind, range, outcome);
    }
}

impl Drop for Counting {
    fn drop(&mut self) {
        if !self.ended {
            self.ctx.client.export().stats.end_uncounted();
            self.ctx.node.stats().end_uncounted();
        }
    }
}

/// Context ids a BLOCK_STATUS payload asked for (`None`: every negotiated one).
type Selection = Option<Vec<u32>>;

/// Takes in what follows a request header other than a WRITE's data (a
/// BLOCK_STATUS context filter, a payload the command cannot take) and
/// decides the request: the effective header (a filter's length, or length
/// 0 after a dropped payload), the contexts it selects, the verdict, and how
/// many bytes of WRITE data follow. `None`: the connection ends (the socket
/// failed, or a payload too long to skip, answered first in extended mode).
async fn take_payload<R: RequestReader>(
    input: &mut Input<R>,
    ctx: &Context,
    tx: &mpsc::UnboundedSender<Box<Reply>>,
    request: RequestHeader,
) -> Option<(RequestHeader, Selection, Verdict, usize)> {
    let negotiated = &ctx.negotiated;
    match incoming(&request, negotiated) {
        Incoming::Nothing => Some((request, None, validate(&request, negotiated), 0)),
        Incoming::Data(n) => Some((request, None, validate(&request, negotiated), n)),
        Incoming::Discard(n) => {
            unplugged(&ctx.batch, discard(input, n)).await.ok()?;
            let effective = RequestHeader {
                length: 0,
                ..request
            };
            Some((effective, None, validate(&effective, negotiated), 0))
        }
        Incoming::Filter(n) => {
            // No valid filter is longer than the length and every negotiated
            // id; a longer payload is dropped unread, as QEMU does.
            let payload = match n <= 8 + 4 * negotiated.meta_contexts.len() {
                true => {
                    let mut payload = vec![0u8; n];
                    unplugged(&ctx.batch, read_payload(input, &mut payload))
                        .await
                        .ok()?;
                    payload
                }
                false => {
                    unplugged(&ctx.batch, discard(input, n)).await.ok()?;
                    Vec::new()
                }
            };
            let (length, ids) = match status_filter(&payload, negotiated) {
                StatusFilter::Valid { length, ids } => (length, ids),
                StatusFilter::Invalid => (0, Vec::new()),
            };
            let effective = RequestHeader { length, ..request };
            let verdict = validate_selected(&effective, negotiated, ids.len());
            Some((effective, Some(ids), verdict, 0))
        }
        Incoming::TooLong { message } => {
            tracing::info!(reason = %message, "disconnecting NBD client");
            if ctx.form == HeaderForm::Extended {
                send_then_close(ctx, tx, &request, &message);
            }
            None
        }
    }
}

/// Reads and drops `n` bytes of payload, 64 KiB at a time.
async fn discard<R: AsyncRead + Unpin>(input: &mut Input<R>, n: usize) -> std::io::Result<()> {
    let mut scratch = vec![0u8; n.min(64 * 1024)];
    let mut left = n;
    while left > 0 {
        let chunk = left.min(scratch.len());
        read_payload(input, &mut scratch[..chunk]).await?;
        left -= chunk;
    }
    Ok(())
}

/// The EINVAL QEMU sends before it drops a client whose request it cannot
/// take in (its payload too long to skip, or a header with a bad magic).
fn send_then_close(
    ctx: &Context,
    tx: &mpsc::UnboundedSender<Box<Reply>>,
    request: &RequestHeader,
    message: &str,
) {
    let _ = tx.send(Box::new(error_reply(
        ctx,
        request,
        NbdErrno::EINVAL,
        message,
    )));
}

/// The file range a WRITE's payload can be spliced into: an accepted WRITE
/// of [`SPLICE_MIN`] or more, on a plain socket, into a tmpfs image.
fn splice_target<R: RequestReader>(
    ctx: &Arc<Context>,
    req: &RequestHeader,
    verdict: &Verdict,
    input: &Input<R>,
) -> Option<block::FileSlice> {
    let eligible = ctx.zero_copy
        && matches!(verdict, Verdict::Ok)
        && req.command == CommandType::WRITE
        && req.length >= u64::from(SPLICE_MIN)
        && input.get_ref().can_splice();
    match eligible {
        true => ctx.node.page_cache_write_slice(req.offset, req.length),
        false => None,
    }
}

/// Writes a WRITE's payload into `slice`: what the reader has buffered with
/// `pwrite`, the rest spliced from the socket. The outer error is the
/// socket's (the connection ends); the inner one goes to the client.
async fn write_spliced<R: RequestReader>(
    input: &mut Input<R>,
    ctx: &Context,
    req: &RequestHeader,
    slice: block::FileSlice,
    pipe: &Pipe,
) -> std::io::Result<Result<(), BlockError>> {
    use std::os::unix::fs::FileExt;
    let len = req.length as usize;
    let buffered = input.buffer();
    let n = buffered.len().min(len);
    let mut result = slice.file().write_all_at(&buffered[..n], slice.start());
    input.consume(n);
    let mut socket = Ok(());
    if n < len {
        let reader = input.get_mut();
        let spliced = splice_payload(reader, pipe, slice.fd(), slice.start() + n as u64, len - n);
        match spliced.await {
            Ok(Err(e)) if result.is_ok() => result = Err(e),
            Ok(_) => {}
            Err(e) => socket = Err(e),
        }
    }
    // Even a payload cut short may have changed part of the range.
    ctx.node.page_cache_written(req.offset, req.length);
    socket.map(|()| result.map_err(|e| BlockError::io("Could not write to the image", e)))
}

/// Bytes a request pins until its reply is written: a WRITE's payload (read
/// even when the request is rejected), a READ's data, or at most this much
/// of BLOCK_STATUS descriptors for `contexts` metadata contexts in `shape`.
/// TRIM and WRITE_ZEROES pin nothing, however large their range: charged by
/// length, one of 4 GiB took a connection's whole budget and so ran alone.
fn pinned_bytes(
    request: &RequestHeader,
    verdict: &Verdict,
    contexts: usize,
    shape: ReplyShape,
) -> u64 {
    let ok = matches!(verdict, Verdict::Ok);
    match request.command {
        CommandType::WRITE => request.length,
        CommandType::READ if ok => request.length,
        CommandType::BLOCK_STATUS if ok => {
            let descriptors = match request.flags & CMD_FLAG_REQ_ONE {
                0 => request
                    .length
                    .div_ceil(STATUS_GRANULE)
                    .min(MAX_EXTENTS as u64),
                _ => 1,
            };
            contexts as u64 * shape.status_chunk_len(descriptors as usize) as u64
        }
        _ => 0,
    }
}

/// The smallest extent a driver reports (a sector), for the bound above.
const STATUS_GRANULE: u64 = 512;

/// Takes the server-wide budget for a request of `len` bytes, once this
/// request holds its own slot. A connection with nothing else in flight gets
/// the reserve free; that is checked again while it waits, since the replies
/// it had in flight (written just before the client sent this request) may
/// not have returned their slots yet. `None`: it costs nothing there.
async fn take_shared(
    shared: &SharedBudget,
    slots: &Semaphore,
    len: u64,
) -> Option<OwnedSemaphorePermit> {
    if len == 0 {
        return None;
    }
    let others = MAX_REQUESTS - 1;
    if slots.available_permits() == others {
        return shared.acquire(len, true).await;
    }
    tokio::select! {
        p = shared.acquire(len, false) => p,
        // Every other slot free: nothing else of this connection in flight.
        idle = slots.acquire_many(others as u32) => {
            drop(idle);
            shared.acquire(len, true).await
        }
    }
}

/// Once the reader has stopped (hard export removal, shutdown, DISC, EOF),
/// each remaining socket write gets this long. A client that stopped reading
/// its replies would otherwise keep the connection, and with it the export
/// and the daemon's shutdown, waiting for ever. (qemu-storage-daemon 10.0
/// does wait for ever here: no BLOCK_EXPORT_DELETED, no exit on SIGTERM.)
const WRITE_GRACE: Duration = Duration::from_secs(5);

/// Polls a request once on the reader's own task; only if it has to wait
/// (a blocking-pool read, a flush) does it become a task of its own.
///
/// Requests that complete at once (page-cache reads, tmpfs and null-co I/O,
/// rejections) thus skip a task spawn and the wake-up of another worker
/// thread, which `perf` showed as the largest cost of small requests. A
/// request left pending keeps its place: the spawned task polls the same
/// future again, with its own waker.
///
/// The I/O it starts on an io_uring is queued, not submitted (`batch` is
/// plugged while it is polled): the reader submits what the requests it
/// polled in a row queued with one call, in [`unplugged`], before it waits.
async fn run_or_spawn(mut request: Pin<Box<dyn Future<Output = ()> + Send>>, batch: &Batch) {
    let first =
        std::future::poll_fn(|cx| Poll::Ready(batch.plugged(|| request.as_mut().poll(cx)))).await;
    if first.is_pending() {
        tokio::spawn(request);
    }
}

/// Awaits `fut`; if it has to wait, first submits the ring I/O that the
/// requests it polled left queued in `batch`. Every wait of the reader goes
/// through here, or a queued read could wait for the reader, and the reader
/// for it (its budget back).
async fn unplugged<F: Future>(batch: &Batch, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    match std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        Poll::Ready(v) => v,
        Poll::Pending => {
            batch.submit();
            fut.await
        }
    }
}

/// Submits the reader's deferred ring I/O when it stops (see [`unplugged`]).
struct SubmitOnDrop(Batch);

impl Drop for SubmitOnDrop {
    fn drop(&mut self) {
        self.0.submit();
    }
}

/// Reads a WRITE payload: what the buffered reader already holds is copied,
/// the rest goes from the socket straight into `buf` instead of through the
/// reader's buffer (a second copy of every payload byte).
async fn read_payload<R: AsyncRead + Unpin>(
    input: &mut Input<R>,
    buf: &mut [u8],
) -> std::io::Result<()> {
    let buffered = input.buffer();
    let n = buffered.len().min(buf.len());
    buf[..n].copy_from_slice(&buffered[..n]);
    input.consume(n);
    if n < buf.len() {
        input.get_mut().read_exact(&mut buf[n..]).await?;
    }
    Ok(())
}

/// Replies gathered into one write at most; bounds the iovec list.
const MAX_BATCH: usize = 64;

async fn write_replies<W: ReplyWriter>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<Box<Reply>>,
    reader_done: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut scratch = Vec::new();
    while let Some(reply) = rx.recv().await {
        batch.push(reply);
        // Batch whatever else is ready into the same write.
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        // Boxed: the write's state (its iovecs, a timer once the reader is
        // gone) exists only while a batch is written, not in every idle
        // connection's writer task.
        let write = Box::pin(bounded_after(
            &reader_done,
            write_batch(&mut writer, &batch, &mut scratch),
        ));
        if write.await.is_err() {
            return;
        }
        // Dropping the replies releases their buffers and budget.
        batch.clear();
    }
    let _ = bounded_after(&reader_done, writer.shutdown()).await;
}

/// Runs a socket write; unbounded while `reader_done` is not cancelled, then
/// given [`WRITE_GRACE`] from that moment (or from its start, if later).
async fn bounded_after<F>(reader_done: &CancellationToken, write: F) -> std::io::Result<()>
where
    F: std::future::Future<Output = std::io::Result<()>>,
{
    tokio::pin!(write);
    if !reader_done.is_cancelled() {
        tokio::select! {
            // The write first: most complete at once (the socket has room), and
            // then the token is never polled (no waiter registered).
            biased;
            r = &mut write => return r,
            _ = reader_done.cancelled() => {}
        }
    }
    tokio::time::timeout(WRITE_GRACE, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

async fn handle(
    ctx: &Context,
    req: &RequestHeader,
    payload: Payload,
    selection: Option<&[u32]>,
) -> Reply {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let node = &ctx.node;
    let (offset, len) = (req.offset, req.length);
    let result = match req.command {
        CommandType::READ => return read(ctx, req).await,
        CommandType::BLOCK_STATUS => return block_status(ctx, req, selection).await,
        CommandType::WRITE => match payload {
            Payload::Buf(buf) => {
                let durable = fua || ctx.writethrough;
                node.write_batched(buf, offset, durable, &ctx.batch).await.1
            }
            Payload::Written(Ok(())) if fua || ctx.writethrough => node.flush().await,
            Payload::Written(r) => r,
            Payload::None => Ok(()),
        },
        CommandType::FLUSH => node.flush().await,
        CommandType::TRIM => match node.discard(offset, len).await {
            Ok(()) if fua => node.flush().await,
            r => r,
        },
        CommandType::WRITE_ZEROES => {
            let flags = ZeroFlags {
                may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0,
                fast: req.flags & CMD_FLAG_FAST_ZERO != 0,
            };
            match node.write_zeroes(offset, len, flags).await {
                Ok(()) if fua || ctx.writethrough => node.flush().await,
                r => r,
            }
        }
        CommandType::CACHE => node.cache(offset, len).await,
        _ => return error_reply(ctx, req, NbdErrno::EINVAL, "unknown command"),
    };
    match result {
        Ok(()) => Reply::new(ctx.shape.ack(req)),
        Err(e) => block_error_reply(ctx, req, &e),
    }
}

fn error_reply(ctx: &Context, req: &RequestHeader, errno: NbdErrno, message: &str) -> Reply {
    Reply::failed(ctx.shape.error(req, errno, message), errno)
}

fn block_error_reply(ctx: &Context, req: &RequestHeader, e: &BlockError) -> Reply {
    tracing::debug!(command = ?req.command, error = %e, "request failed");
    error_reply(ctx, req, NbdErrno::from_os_errno(e.errno()), &e.to_string())
}

async fn read(ctx: &Context, req: &RequestHeader) -> Reply {
    if req.length == 0 {
        return Reply::new(ctx.shape.read(req, &[]));
    }
    let slice = match ctx.zero_copy && req.length >= u64::from(ZERO_COPY_MIN) {
        true => ctx.node.page_cache_slice(req.offset, req.length),
        false => None,
    };
    let data = match slice {
        Some(slice) => Data::File(slice),
        None => {
            // Every driver fills a read buffer completely on success, so a reused one is fine.
            let buf = IoBuf::for_overwrite(req.length as usize);
            let (buf, result) = ctx.node.read_batched(buf, req.offset, &ctx.batch).await;
            if let Err(e) = result {
                return block_error_reply(ctx, req, &e);
            }
            Data::Buf(buf)
        }
    };
    let extents = match ctx.shape.read_wants_allocation(req) {
        // A READ is at most 32 MiB, so its runs fit the 32-bit hole chunks.
        true => allocation_extents(
            &ctx.node,
            req.offset,
            req.length,
            MAX_EXTENTS,
            u32::MAX.into(),
        )
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|(len, flags)| (len as u32, flags))
        .collect(),
        false => Vec::new(),
    };
    Reply::with_data(ctx.shape.read(req, &extents), data)
}

/// base:allocation extents covering `[offset, offset+len)`, equal neighbours
/// merged while they stay within `max_len`.
async fn allocation_extents(
    node: &BlockNode,
    offset: u64,
    len: u64,
    max: usize,
    max_len: u64,
) -> Result<Vec<(u64, u32)>, BlockError> {
    status_extents(node, offset, len, (max, max_len), |e| {
        allocation_status(e.allocated, e.zero)
    })
    .await
}

/// `qemu:allocation-depth` extents: 0 unallocated, 1 this layer, 2+ a backing layer.
async fn depth_extents(
    node: &BlockNode,
    offset: u64,
    len: u64,
    max: usize,
    max_len: u64,
) -> Result<Vec<(u64, u32)>, BlockError> {
    status_extents(node, offset, len, (max, max_len), |e| e.depth).await
}

/// Block status over `[offset, offset+len)` as (length, `status(extent)`)
/// descriptors, equal neighbours merged, at most `max` of them, none longer
/// than `max_len` (32 bits, or 64 in extended mode).
async fn status_extents(
    node: &BlockNode,
    offset: u64,
    len: u64,
    (max, max_len): (usize, u64),
    status: fn(&block::Extent) -> u32,
) -> Result<Vec<(u64, u32)>, BlockError> {
    // Each driver call asks for at most what one descriptor can carry
    // (sector-aligned), so a descriptor never needs to be split.
    let step = max_len.clamp(512, !511) & !511;
    let merge = Descriptors {
        extents: Vec::new(),
        max,
        max_len,
        status,
    };
    let mut merged = node.walk_block_status(offset, len, step, merge).await?;
    merged.extents.truncate(max);
    Ok(merged.extents)
}

/// Gathers block status into NBD extent descriptors.
struct Descriptors {
    extents: Vec<(u64, u32)>,
    max: usize,
    max_len: u64,
    status: fn(&block::Extent) -> u32,
}

impl block::ExtentSink for Descriptors {
    fn push(&mut self, _offset: u64, e: &block::Extent) -> bool {
        let flags = (self.status)(e);
        match self.extents.last_mut() {
            Some(last)
                if last.1 == flags
                    && last.0.checked_add(e.len).is_some_and(|s| s <= self.max_len) =>
            {
                last.0 += e.len
            }
            _ => self.extents.push((e.len, flags)),
        }
        // One descriptor past `max` is gathered (then dropped) so that the
        // last kept one has absorbed every equal neighbour: with REQ_ONE the
        // answer is the whole run, as QEMU gives it, not the first driver
        // extent of it.
        self.extents.len() <= self.max
    }
}

/// BLOCK_STATUS over the negotiated contexts, in their order (QEMU's), or
/// only those a payload filter selected.
async fn block_status(ctx: &Context, req: &RequestHeader, selection: Option<&[u32]>) -> Reply {
    let (offset, len) = (req.offset, req.length);
    let contexts: Vec<_> = ctx
        .negotiated
        .meta_contexts
        .iter()
        .filter(|(id, _)| selection.is_none_or(|ids| ids.contains(id)))
        .collect();
    let mut plan = ctx.shape.block_status(req, contexts.len());
    let max = plan.max_extents();
    let max_len = ctx.shape.max_extent_len();
    for (id, context) in contexts {
        let extents = match context {
            MetaContext::BaseAllocation => {
                allocation_extents(&ctx.node, offset, len, max, max_len).await
            }
            MetaContext::AllocationDepth => {
                depth_extents(&ctx.node, offset, len, max, max_len).await
            }
            MetaContext::DirtyBitmap(name) => {
                Ok(match exported_bitmap(ctx.client.export(), name) {
                    Some(b) => crate::exports::bitmaps::extents(b, offset, len, max),
                    None => vec![(len, nbd::reply::dirty_status(false))],
                })
            }
        };
        match extents {
            Ok(extents) => plan.push(*id, &extents),
            Err(e) => return block_error_reply(ctx, req, &e),
        }
    }
    Reply::new(plan.finish())
}

/// The bitmap an NBD export serves as `qemu:dirty-bitmap:NAME`.
fn exported_bitmap<'a>(
    export: &'a crate::exports::Export,
    name: &str,
) -> Option<&'a std::sync::Arc<block::DirtyBitmap>> {
    export.kind_as::<NbdExport>()?.bitmap(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll_once<F: Future>(f: Pin<&mut F>) -> Option<F::Output> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.poll(&mut cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn test_take_shared_when_the_budget_is_spent_and_the_connection_goes_idle_uses_the_reserve(
    ) {
        let shared = SharedBudget::new(1 << 20);
        let spent = shared.acquire(1 << 20, false).await;
        let slots = Arc::new(Semaphore::new(MAX_REQUESTS));
        let _mine = slots.clone().acquire_owned().await.expect("a slot");
        let earlier = slots.clone().acquire_owned().await.expect("a slot");
        // One earlier request still holds its slot: charged in full, and nothing is left.
        let mut take = std::pin::pin!(take_shared(&shared, &slots, 64 * 1024));
        assert!(poll_once(take.as_mut()).is_none());
        // Its reply is written: the connection has nothing else in flight.
        drop(earlier);
        let got = poll_once(take.as_mut()).expect("ready without waiting for the budget");
        assert!(got.is_none(), "a 64 KiB request fits in the reserve");
        drop(spent);
    }

    #[tokio::test]
    async fn test_pinned_bytes_when_read_write_or_other_counts_only_payload() {
        let shared = SharedBudget::new(1 << 20);
        let slots = Semaphore::new(MAX_REQUESTS);
        let _mine = slots.acquire().await.expect("a slot");
        assert!(take_shared(&shared, &slots, 0).await.is_none());
        let pinned_bytes =
            |r: &RequestHeader, v: &Verdict| pinned_bytes(r, v, 1, ReplyShape::Structured);
        let read = RequestHeader {
            flags: 0,
            command: CommandType::READ,
            cookie: 1,
            offset: 0,
            length: 4096,
        };
        let rejected = Verdict::Reject {
            errno: NbdErrno::EINVAL,
            message: String::new(),
        };
        assert_eq!(pinned_bytes(&read, &Verdict::Ok), 4096);
        assert_eq!(pinned_bytes(&read, &rejected), 0);
        let write = RequestHeader {
            command: CommandType::WRITE,
            ..read
        };
        assert_eq!(pinned_bytes(&write, &rejected), 4096);
        let trim = RequestHeader {
            command: CommandType::TRIM,
            ..read
        };
        assert_eq!(pinned_bytes(&trim, &Verdict::Ok), 0);
        let huge_zero = RequestHeader {
            command: CommandType::WRITE_ZEROES,
            length: u64::MAX,
            ..read
        };
        assert_eq!(pinned_bytes(&huge_zero, &Verdict::Ok), 0);
    }

    #[test]
    fn test_pinned_bytes_of_block_status_bounds_its_reply() {
        let status = |length, flags| RequestHeader {
            flags,
            command: CommandType::BLOCK_STATUS,
            cookie: 1,
            offset: 0,
            length,
        };
        // 4 GiB: at most MAX_EXTENTS descriptors per context, 1 MiB each.
        let structured = ReplyShape::Structured;
        let big = pinned_bytes(&status(u32::MAX.into(), 0), &Verdict::Ok, 2, structured);
        assert_eq!(big, 2 * (24 + 8 * MAX_EXTENTS as u64));
        // A 4 KiB range has at most 8 sector-sized extents.
        let small = pinned_bytes(&status(4096, 0), &Verdict::Ok, 1, structured);
        assert_eq!(small, 24 + 64);
        let one = pinned_bytes(
            &status(u32::MAX.into(), CMD_FLAG_REQ_ONE),
            &Verdict::Ok,
            3,
            structured,
        );
        assert_eq!(one, 3 * 32);
        // Extended: 16-byte descriptors after a 40-byte chunk head, and a
        // whole 1 TiB export in one request still pins only MAX_EXTENTS of them.
        let ext = pinned_bytes(&status(1 << 40, 0), &Verdict::Ok, 1, ReplyShape::Extended);
        assert_eq!(ext, 40 + 16 * MAX_EXTENTS as u64);
        let rejected = Verdict::Reject {
            errno: NbdErrno::EINVAL,
            message: String::new(),
        };
        assert_eq!(
            pinned_bytes(&status(u32::MAX.into(), 0), &rejected, 1, structured),
            0
        );
    }
}
