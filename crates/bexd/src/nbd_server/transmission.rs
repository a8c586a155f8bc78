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

use block::{BlockError, BlockNode, IoBuf, ZeroFlags};
use nbd::consts::{
    CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, REQUEST_HEADER_LEN,
};
use nbd::export::MetaContext;
use nbd::handshake::Negotiated;
use nbd::reply::{allocation_status, status_chunk_len, ReplyShape, MAX_EXTENTS};
use nbd::request::{decode_request, validate, RequestHeader, Verdict};
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
    client: ExportClient,
    node: Arc<BlockNode>,
    writethrough: bool,
    /// The writer can `sendfile` (plain TCP or unix socket).
    zero_copy: bool,
    /// Payload bytes in flight across the whole server.
    shared: Arc<SharedBudget>,
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
                negotiated,
                client,
                node,
                writethrough,
                zero_copy: false,
                shared,
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
        let (tx, rx) = mpsc::unbounded_channel();
        let reader_done = CancellationToken::new();
        let writer_task = tokio::spawn(write_replies(writer, rx, reader_done.clone()));
        let input = Input::new(reader, &self.leftover, INPUT_BUFFER);
        tokio::select! {
            _ = read_requests(input, self.ctx.clone(), tx) => {}
            _ = kick.cancelled() => tracing::info!("client dropped: export removed"),
            _ = shutdown.cancelled() => {}
        }
        // The reader (and its sender) is gone; the writer ends once every
        // request task has sent its reply, or when the client stops taking them.
        reader_done.cancel();
        let _ = writer_task.await;
        tracing::debug!(export = %self.ctx.client.export().id(), "NBD connection closed");
    }
}

async fn read_requests<R: RequestReader>(
    mut input: Input<R>,
    ctx: Arc<Context>,
    tx: mpsc::UnboundedSender<Reply>,
) {
    let budget = Arc::new(Semaphore::new(BUDGET));
    let slots = Arc::new(Semaphore::new(MAX_REQUESTS));
    let mut header = [0u8; REQUEST_HEADER_LEN];
    let mut pipe: Option<Pipe> = None;
    // Whichever way the loop ends, nothing it deferred stays unsubmitted.
    let _submit = SubmitOnDrop;
    loop {
        if unplugged(input.read_exact(&mut header)).await.is_err() {
            return;
        }
        let request = match decode_request(&header) {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(error = %e, "NBD client sent a bad request; disconnecting");
                return;
            }
        };
        let verdict = validate(&request, &ctx.negotiated);
        if let Verdict::Disconnect { reason } = &verdict {
            tracing::info!(%reason, "disconnecting NBD client");
            return;
        }
        let Ok(slot) = unplugged(slots.clone().acquire_owned()).await else {
            return;
        };
        let len = pinned_bytes(&request, &verdict, ctx.negotiated.meta_contexts.len());
        let cost = 1 + (len / BUDGET_UNIT).min(BUDGET as u64 - 1) as u32;
        let Ok(permit) = unplugged(budget.clone().acquire_many_owned(cost)).await else {
            return;
        };
        let shared = unplugged(take_shared(&ctx.shared, &slots, len)).await;
        let permits = Permits::new(slot, permit, shared);
        if request.payload_len() >= SUBMIT_BEFORE_PAYLOAD {
            // A big payload takes a while to take in: what the requests
            // before it queued on a ring goes to the device first.
            block::uring::submit_deferred();
        }
        let payload = match request.payload_len() {
            0 => Payload::None,
            len => match splice_target(&ctx, &request, &verdict, &input) {
                Some(slice) => {
                    if pipe.is_none() {
                        pipe = Pipe::new().ok();
                    }
                    let Some(p) = &pipe else {
                        return;
                    };
                    match unplugged(write_spliced(&mut input, &ctx, &request, slice, p)).await {
                        Ok(result) => Payload::Written(result),
                        Err(_) => return,
                    }
                }
                None => {
                    let mut buf = IoBuf::for_overwrite(len);
                    if unplugged(read_payload(&mut input, &mut buf)).await.is_err() {
                        return;
                    }
                    Payload::Buf(buf)
                }
            },
        };
        if request.command == CommandType::DISC {
            return;
        }
        let ctx = ctx.clone();
        let tx = tx.clone();
        run_or_spawn(Box::pin(async move {
            let mut reply = match verdict {
                Verdict::Reject { errno, message } => error_reply(&ctx, &request, errno, &message),
                _ => handle(&ctx, &request, payload).await,
            };
            reply.hold_permits(permits);
            let _ = tx.send(reply);
        }))
        .await;
    }
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
        && req.length >= SPLICE_MIN
        && input.get_ref().can_splice();
    match eligible {
        true => ctx
            .node
            .page_cache_write_slice(req.offset, u64::from(req.length)),
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
        let spliced = splice_payload(reader, pipe, slice.fd, slice.start() + n as u64, len - n);
        match spliced.await {
            Ok(Err(e)) if result.is_ok() => result = Err(e),
            Ok(_) => {}
            Err(e) => socket = Err(e),
        }
    }
    // Even a payload cut short may have changed part of the range.
    ctx.node
        .page_cache_written(req.offset, u64::from(req.length));
    socket.map(|()| result.map_err(|e| BlockError::io("Could not write to the image", e)))
}

/// Bytes a request pins until its reply is written: a WRITE's payload (read
/// even when the request is rejected), a READ's data, or at most this much
/// of BLOCK_STATUS descriptors for `contexts` metadata contexts. TRIM and
/// WRITE_ZEROES pin nothing, however large their range: charged by length,
/// one of 4 GiB took a connection's whole budget and so ran alone.
fn pinned_bytes(request: &RequestHeader, verdict: &Verdict, contexts: usize) -> u64 {
    let ok = matches!(verdict, Verdict::Ok);
    match request.command {
        CommandType::WRITE => u64::from(request.length),
        CommandType::READ if ok => u64::from(request.length),
        CommandType::BLOCK_STATUS if ok => {
            let descriptors = match request.flags & CMD_FLAG_REQ_ONE {
                0 => u64::from(request.length.div_ceil(STATUS_GRANULE)).min(MAX_EXTENTS as u64),
                _ => 1,
            };
            contexts as u64 * status_chunk_len(descriptors as usize) as u64
        }
        _ => 0,
    }
}

/// The smallest extent a driver reports (a sector), for the bound above.
const STATUS_GRANULE: u32 = 512;

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
/// The I/O it starts on an io_uring is queued, not submitted
/// (`block::uring::deferring`): the reader submits what the requests it
/// polled in a row queued with one call, in [`unplugged`], before it waits.
async fn run_or_spawn(mut request: Pin<Box<dyn Future<Output = ()> + Send>>) {
    let first = std::future::poll_fn(|cx| {
        Poll::Ready(block::uring::deferring(|| request.as_mut().poll(cx)))
    })
    .await;
    if first.is_pending() {
        tokio::spawn(request);
    }
}

/// Awaits `fut`; if it has to wait, first submits the ring I/O that the
/// requests polled on this thread left queued. Every wait of the reader goes
/// through here, or a queued read could wait for the reader, and the reader
/// for it (its budget back).
async fn unplugged<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    match std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        Poll::Ready(v) => v,
        Poll::Pending => {
            block::uring::submit_deferred();
            fut.await
        }
    }
}

/// Submits the reader's deferred ring I/O when it stops (see [`unplugged`]).
struct SubmitOnDrop;

impl Drop for SubmitOnDrop {
    fn drop(&mut self) {
        block::uring::submit_deferred();
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
    mut rx: mpsc::UnboundedReceiver<Reply>,
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
        let write = write_batch(&mut writer, &batch, &mut scratch);
        if bounded_after(&reader_done, write).await.is_err() {
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

async fn handle(ctx: &Context, req: &RequestHeader, payload: Payload) -> Reply {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let node = &ctx.node;
    let (offset, len) = (req.offset, u64::from(req.length));
    let result = match req.command {
        CommandType::READ => return read(ctx, req).await,
        CommandType::BLOCK_STATUS => return block_status(ctx, req).await,
        CommandType::WRITE => match payload {
            Payload::Buf(buf) => {
                let durable = fua || ctx.writethrough;
                node.write(buf, offset, durable).await.1
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
        Ok(()) => Reply::new(ctx.shape.ack(req.cookie)),
        Err(e) => block_error_reply(ctx, req, &e),
    }
}

fn error_reply(ctx: &Context, req: &RequestHeader, errno: NbdErrno, message: &str) -> Reply {
    Reply::new(ctx.shape.error(req.cookie, errno, message))
}

fn block_error_reply(ctx: &Context, req: &RequestHeader, e: &BlockError) -> Reply {
    tracing::debug!(command = ?req.command, error = %e, "request failed");
    error_reply(ctx, req, NbdErrno::from_os_errno(e.errno()), &e.to_string())
}

async fn read(ctx: &Context, req: &RequestHeader) -> Reply {
    if req.length == 0 {
        return Reply::new(ctx.shape.read(req, &[]));
    }
    let slice = match ctx.zero_copy && req.length >= ZERO_COPY_MIN {
        true => ctx.node.page_cache_slice(req.offset, u64::from(req.length)),
        false => None,
    };
    let data = match slice {
        Some(slice) => Data::File(slice),
        None => {
            // Every driver fills a read buffer completely on success, so a reused one is fine.
            let buf = IoBuf::for_overwrite(req.length as usize);
            let (buf, result) = ctx.node.read(buf, req.offset).await;
            if let Err(e) = result {
                return block_error_reply(ctx, req, &e);
            }
            Data::Buf(buf)
        }
    };
    let extents = match ctx.shape.read_wants_allocation(req) {
        true => allocation_extents(&ctx.node, req.offset, u64::from(req.length), MAX_EXTENTS)
            .await
            .unwrap_or_default(),
        false => Vec::new(),
    };
    Reply::with_data(ctx.shape.read(req, &extents), data)
}

/// base:allocation extents covering `[offset, offset+len)`, equal neighbours merged.
async fn allocation_extents(
    node: &BlockNode,
    offset: u64,
    len: u64,
    max: usize,
) -> Result<Vec<(u32, u32)>, BlockError> {
    status_extents(node, offset, len, max, |e| {
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
) -> Result<Vec<(u32, u32)>, BlockError> {
    status_extents(node, offset, len, max, |e| e.depth).await
}

/// Block status over `[offset, offset+len)` as (length, `status(extent)`)
/// descriptors, equal neighbours merged, at most `max` of them.
async fn status_extents(
    node: &BlockNode,
    offset: u64,
    len: u64,
    max: usize,
    status: impl Fn(&block::Extent) -> u32,
) -> Result<Vec<(u32, u32)>, BlockError> {
    let mut extents: Vec<(u32, u32)> = Vec::new();
    let end = offset + len;
    let mut pos = offset;
    // One descriptor past `max` is gathered (then dropped) so that the last
    // kept one has absorbed every equal neighbour: with REQ_ONE the answer is
    // the whole run, as QEMU gives it, not the first driver extent of it.
    while pos < end && extents.len() <= max {
        // Descriptor lengths are 32-bit; ask for at most ~4 GiB at once.
        let want = (end - pos).min(u64::from(u32::MAX) & !511);
        let e = node.block_status(pos, want).await?;
        let e_len = e.len.clamp(1, want) as u32;
        let flags = status(&e);
        match extents.last_mut() {
            Some(last) if last.1 == flags && last.0.checked_add(e_len).is_some() => last.0 += e_len,
            _ => extents.push((e_len, flags)),
        }
        pos += u64::from(e_len);
    }
    extents.truncate(max);
    Ok(extents)
}

async fn block_status(ctx: &Context, req: &RequestHeader) -> Reply {
    let (offset, len) = (req.offset, u64::from(req.length));
    let contexts = &ctx.negotiated.meta_contexts;
    let mut plan = ctx.shape.block_status(req, contexts.len());
    let max = plan.max_extents();
    for (id, context) in contexts {
        let extents = match context {
            MetaContext::BaseAllocation => allocation_extents(&ctx.node, offset, len, max).await,
            MetaContext::AllocationDepth => depth_extents(&ctx.node, offset, len, max).await,
            MetaContext::DirtyBitmap(name) => {
                Ok(match exported_bitmap(ctx.client.export(), name) {
                    Some(b) => crate::exports::bitmaps::extents(b, offset, req.length, max),
                    None => vec![(req.length, nbd::reply::dirty_status(false))],
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
        let pinned_bytes = |r: &RequestHeader, v: &Verdict| pinned_bytes(r, v, 1);
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
            length: u32::MAX,
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
        let big = pinned_bytes(&status(u32::MAX, 0), &Verdict::Ok, 2);
        assert_eq!(big, 2 * (24 + 8 * MAX_EXTENTS as u64));
        // A 4 KiB range has at most 8 sector-sized extents.
        assert_eq!(pinned_bytes(&status(4096, 0), &Verdict::Ok, 1), 24 + 64);
        assert_eq!(
            pinned_bytes(&status(u32::MAX, CMD_FLAG_REQ_ONE), &Verdict::Ok, 3),
            3 * 32
        );
        let rejected = Verdict::Reject {
            errno: NbdErrno::EINVAL,
            message: String::new(),
        };
        assert_eq!(pinned_bytes(&status(u32::MAX, 0), &rejected, 1), 0);
    }
}
