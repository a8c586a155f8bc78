//! The driver's two faces over one `Link`: [`AsyncDriver`] for a node that
//! sends requests straight to it, [`Driver`] for a format above (qcow2) that
//! calls from the blocking pool and waits there for the same connection.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use block::{
    AsyncDriver, BlockError, BlockErrorKind, BlockResult, Capabilities, Driver, Extent, IoBuf,
    IoFuture, ZeroFlags,
};
use nbd::client_handshake::{ClientConfig, ClientNegotiated};
use nbd::consts::*;
use nbd::request::RequestHeader;
use nbd::types::CommandType;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::time::Instant;

use crate::addr::ServerAddr;
use crate::error::OpenError;
use crate::known_data::{KnownData, STATUS_LOOKAHEAD};
use crate::link::{Link, Params};
use crate::transport::{Stream, TlsConnect};

/// QEMU's `BlockdevOptionsNbd`, resolved (TLS credentials already looked up).
#[derive(Clone, Debug)]
pub struct NbdOptions {
    pub server: ServerAddr,
    /// The export name; QEMU's default is the empty name.
    pub export: String,
    pub tls: Option<Arc<dyn TlsConnect>>,
    /// `x-dirty-bitmap`: the metadata context block status asks for in place
    /// of `base:allocation` (QEMU's misnamed option takes any context name,
    /// e.g. `qemu:dirty-bitmap:NAME`); its bits are read as allocation bits,
    /// so a dirty range reads as unallocated, as in QEMU.
    pub dirty_bitmap: Option<String>,
    /// How long requests wait for a reconnect after the connection is lost.
    pub reconnect_delay: Duration,
    /// How long the first connection is retried; zero tries once.
    pub open_timeout: Duration,
}

/// Where the largest request goes: the server's maximum, or 32 MiB.
const DEFAULT_MAX: u32 = MAX_PAYLOAD;
const OPEN_RETRY: Duration = Duration::from_millis(200);

/// A block driver that is a client of one NBD export.
#[derive(Debug)]
pub struct NbdDriver {
    face: Arc<NbdAsync>,
    handle: Handle,
}

/// The asynchronous face; what every request runs through.
#[derive(Debug)]
struct NbdAsync {
    link: Arc<Link>,
    handle: Handle,
    max: u64,
    known_data: Arc<KnownData>,
}

impl NbdDriver {
    /// Connects and negotiates (blocking the calling thread, as `blockdev-add`
    /// does in QEMU), then serves the connection from a task on the runtime.
    pub fn open(options: NbdOptions) -> Result<Self, OpenError> {
        let handle = Handle::try_current().map_err(|_| OpenError::NoRuntime)?;
        let meta_context = Some(
            options
                .dirty_bitmap
                .clone()
                .unwrap_or_else(|| "base:allocation".to_string()),
        );
        let params = Params {
            addr: options.server.clone(),
            config: ClientConfig {
                export: options.export.clone(),
                tls: options.tls.is_some(),
                meta_context,
            },
            tls: options.tls.clone(),
            reconnect_delay: options.reconnect_delay,
        };
        let (stream, negotiated) = wait(&handle, open_retrying(&params, options.open_timeout))
            .ok_or(OpenError::NoRuntime)??;
        if let Some(b) = &options.dirty_bitmap {
            if negotiated.meta_context_id.is_none() {
                return Err(OpenError::NoSuchBitmap(b.clone()));
            }
        }
        let max = match negotiated.block_size {
            Some(b) => b.max.min(DEFAULT_MAX),
            None => DEFAULT_MAX,
        };
        let link = Arc::new(Link::new(params, negotiated));
        handle.spawn(crate::life::run(link.clone(), stream));
        Ok(Self {
            face: Arc::new(NbdAsync {
                link,
                handle: handle.clone(),
                max: u64::from(max),
                known_data: Arc::new(KnownData::new(options.dirty_bitmap.is_none())),
            }),
            handle,
        })
    }

    fn negotiated(&self) -> &ClientNegotiated {
        &self.face.link.negotiated
    }

    fn has(&self, flag: u16) -> bool {
        self.negotiated().flags & flag != 0
    }

    /// Runs one of the async face's requests to completion from a blocking thread.
    fn sync<T>(&self, fut: IoFuture<BlockResult<T>>) -> BlockResult<T> {
        wait(&self.handle, fut).unwrap_or_else(|| {
            Err(BlockError::new(
                BlockErrorKind::Io,
                "nbd: synchronous request on a single-threaded runtime",
            ))
        })
    }
}

impl Drop for NbdDriver {
    fn drop(&mut self) {
        self.face.link.close();
    }
}

/// The first connection, tried until `timeout` passes (once if zero).
async fn open_retrying(
    params: &Params,
    timeout: Duration,
) -> Result<(Stream, ClientNegotiated), OpenError> {
    let deadline = Instant::now() + timeout;
    loop {
        match params.open().await {
            Ok(opened) => return Ok(opened),
            Err(e) if Instant::now() + OPEN_RETRY > deadline => return Err(e),
            Err(e) => tracing::debug!(error = %e, "NBD connection attempt failed; retrying"),
        }
        tokio::time::sleep(OPEN_RETRY).await;
    }
}

/// Blocks this thread until `fut` completes: on a runtime worker through
/// `block_in_place` (the runtime moves its other tasks away), on a pool or
/// plain thread directly. `None` on a current-thread runtime, which cannot
/// wait for itself.
fn wait<F: Future>(handle: &Handle, fut: F) -> Option<F::Output> {
    match Handle::try_current() {
        Err(_) => Some(handle.block_on(fut)),
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::CurrentThread => None,
        Ok(_) => Some(tokio::task::block_in_place(|| handle.block_on(fut))),
    }
}

fn header(command: CommandType, flags: u16, offset: u64, length: u64) -> RequestHeader {
    RequestHeader {
        flags,
        command,
        cookie: 0,
        offset,
        length,
    }
}

impl NbdAsync {
    fn has(&self, flag: u16) -> bool {
        self.link.negotiated.flags & flag != 0
    }

    /// A request without data either way.
    async fn plain(link: Arc<Link>, h: RequestHeader) -> BlockResult<()> {
        link.call(h, None, None).await.result
    }

    /// Reads `buf` from `offset` in requests of at most `max` bytes.
    async fn read_all(
        link: Arc<Link>,
        max: u64,
        buf: IoBuf,
        offset: u64,
    ) -> (IoBuf, BlockResult<()>) {
        if buf.len() as u64 <= max {
            let h = header(CommandType::READ, 0, offset, buf.len() as u64);
            let answer = link.call(h, None, Some(buf)).await;
            return match answer.read {
                Some(buf) => (buf, answer.result),
                None => (IoBuf::zeroed(0), Err(lost_buffer())),
            };
        }
        let mut buf = buf;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(max as usize);
            let h = header(CommandType::READ, 0, offset + done as u64, n as u64);
            let answer = link.call(h, None, Some(IoBuf::for_overwrite(n))).await;
            if let Err(e) = answer.result {
                return (buf, Err(e));
            }
            let Some(part) = answer.read else {
                return (buf, Err(lost_buffer()));
            };
            buf[done..done + n].copy_from_slice(&part);
            done += n;
        }
        (buf, Ok(()))
    }

    /// Writes `buf` at `offset` in requests of at most `max` bytes; without
    /// FUA from the server, `fua` becomes a flush after the write.
    async fn write_all(
        link: Arc<Link>,
        max: u64,
        buf: IoBuf,
        offset: u64,
        fua: bool,
    ) -> (IoBuf, BlockResult<()>) {
        let native_fua = link.negotiated.flags & FLAG_SEND_FUA != 0;
        let flags = match fua && native_fua {
            true => CMD_FLAG_FUA,
            false => 0,
        };
        let (buf, r) = if buf.len() as u64 <= max {
            let h = header(CommandType::WRITE, flags, offset, buf.len() as u64);
            let data = Arc::new(buf);
            let r = link.call(h, Some(data.clone()), None).await.result;
            // Every other holder (the table, a resend) has let go once the reply came.
            let buf = Arc::try_unwrap(data).unwrap_or_else(|d| IoBuf::from_slice(&d));
            (buf, r)
        } else {
            let mut r = Ok(());
            for (at, part) in buf.chunks(max as usize).enumerate() {
                let pos = offset + at as u64 * max;
                let h = header(CommandType::WRITE, flags, pos, part.len() as u64);
                let data = Arc::new(IoBuf::from_slice(part));
                r = link.call(h, Some(data), None).await.result;
                if r.is_err() {
                    break;
                }
            }
            (buf, r)
        };
        match (r, fua && !native_fua) {
            (Ok(()), true) => (buf, Self::flush_on(link).await),
            (r, _) => (buf, r),
        }
    }

    async fn flush_on(link: Arc<Link>) -> BlockResult<()> {
        match link.negotiated.flags & FLAG_SEND_FLUSH != 0 {
            true => Self::plain(link, header(CommandType::FLUSH, 0, 0, 0)).await,
            false => Ok(()),
        }
    }

    /// A TRIM or WRITE_ZEROES over any length, in requests the 32-bit length fits.
    async fn ranged(
        link: Arc<Link>,
        command: CommandType,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> BlockResult<()> {
        let step = u64::from(u32::MAX) & !0xfff;
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(step);
            Self::plain(link.clone(), header(command, flags, pos, n)).await?;
            pos += n;
        }
        Ok(())
    }

    /// Spawned, so a request the caller stops waiting for still runs to its
    /// end: the connection never carries half a request.
    fn spawn<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> IoFuture<T> {
        let task = self.handle.spawn(fut);
        Box::pin(async move {
            match task.await {
                Ok(v) => v,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        })
    }
}

fn lost_buffer() -> BlockError {
    BlockError::new(BlockErrorKind::Io, "NBD read lost its buffer")
}

impl AsyncDriver for NbdAsync {
    fn read(&self, buf: IoBuf, offset: u64) -> IoFuture<(IoBuf, BlockResult<()>)> {
        self.spawn(Self::read_all(self.link.clone(), self.max, buf, offset))
    }

    fn write(&self, buf: IoBuf, offset: u64, fua: bool) -> IoFuture<(IoBuf, BlockResult<()>)> {
        self.spawn(Self::write_all(
            self.link.clone(),
            self.max,
            buf,
            offset,
            fua,
        ))
    }

    fn flush(&self) -> IoFuture<BlockResult<()>> {
        self.spawn(Self::flush_on(self.link.clone()))
    }

    /// Without TRIM from the server a discard does nothing (it is advisory).
    fn discard(&self, offset: u64, len: u64) -> IoFuture<BlockResult<()>> {
        self.known_data.forget();
        let link = self.link.clone();
        let can = self.has(FLAG_SEND_TRIM);
        self.spawn(async move {
            match can {
                true => Self::ranged(link, CommandType::TRIM, 0, offset, len).await,
                false => Ok(()),
            }
        })
    }

    /// Without WRITE_ZEROES from the server, zeroes are written as data
    /// (unless `fast` was asked: then NotSupported, as the flag means).
    fn write_zeroes(&self, offset: u64, len: u64, zf: ZeroFlags) -> IoFuture<BlockResult<()>> {
        self.known_data.forget();
        let (link, max) = (self.link.clone(), self.max);
        let native = self.has(FLAG_SEND_WRITE_ZEROES);
        let fast_ok = self.has(FLAG_SEND_FAST_ZERO);
        self.spawn(async move {
            if zf.fast && !fast_ok {
                return Err(BlockError::new(
                    BlockErrorKind::NotSupported,
                    "the NBD server cannot zero fast",
                ));
            }
            if native {
                let mut flags = 0;
                if !zf.may_unmap {
                    flags |= CMD_FLAG_NO_HOLE;
                }
                if zf.fast {
                    flags |= CMD_FLAG_FAST_ZERO;
                }
                return Self::ranged(link, CommandType::WRITE_ZEROES, flags, offset, len).await;
            }
            let mut pos = offset;
            while pos < offset + len {
                let n = (offset + len - pos).min(max);
                let (_, r) =
                    Self::write_all(link.clone(), max, IoBuf::zeroed(n as usize), pos, false).await;
                r?;
                pos += n;
            }
            Ok(())
        })
    }

    /// One extent of the selected context (REQ_ONE), at most `len` long;
    /// without a context (a server without structured replies), all data.
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<BlockResult<Extent>> {
        let data = |len| Extent {
            len,
            allocated: true,
            zero: false,
            depth: 1,
        };
        if self.link.negotiated.meta_context_id.is_none() {
            return Box::pin(async move { Ok(data(len)) });
        }
        if let Some(n) = self.known_data.lookup(offset, len) {
            return Box::pin(async move { Ok(data(n)) });
        }
        let (link, known) = (self.link.clone(), self.known_data.clone());
        let size = link.negotiated.size;
        self.spawn(async move {
            let want = len
                .max(STATUS_LOOKAHEAD)
                .min(size.saturating_sub(offset))
                .min(u64::from(u32::MAX) & !0xfff)
                .max(1);
            let h = header(CommandType::BLOCK_STATUS, CMD_FLAG_REQ_ONE, offset, want);
            let answer = link.call(h, None, None).await;
            answer.result?;
            let (n, flags) = answer.status.unwrap_or((len, 0));
            if flags & (STATE_HOLE | STATE_ZERO) == 0 {
                known.remember(offset, n.min(want));
            }
            Ok(Extent {
                len: n.clamp(1, len),
                allocated: flags & STATE_HOLE == 0,
                zero: flags & STATE_ZERO != 0,
                depth: 1,
            })
        })
    }

    fn cache(&self, offset: u64, len: u64) -> IoFuture<BlockResult<()>> {
        let link = self.link.clone();
        let can = self.has(FLAG_SEND_CACHE);
        self.spawn(async move {
            match can {
                true => Self::ranged(link, CommandType::CACHE, 0, offset, len).await,
                false => Ok(()),
            }
        })
    }
}

impl Driver for NbdDriver {
    fn driver_name(&self) -> &'static str {
        "nbd"
    }

    fn size(&self) -> u64 {
        self.negotiated().size
    }

    /// The server's flags and block size constraints, as the node's capabilities.
    fn capabilities(&self) -> Capabilities {
        let block = self.negotiated().block_size;
        Capabilities {
            can_write: !self.has(FLAG_READ_ONLY),
            can_discard: self.has(FLAG_SEND_TRIM),
            can_write_zeroes_fast: self.has(FLAG_SEND_WRITE_ZEROES),
            request_alignment: block.map_or(1, |b| b.min.max(1)),
            max_transfer: self.face.max as u32,
            ..Capabilities::default()
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let fut = self.face.read(IoBuf::for_overwrite(buf.len()), offset);
        let filled = self.sync(Box::pin(async move {
            let (b, r) = fut.await;
            r.map(|()| b)
        }))?;
        buf.copy_from_slice(&filled);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        let fut = self.face.write(IoBuf::from_slice(buf), offset, fua);
        self.sync(Box::pin(async move { fut.await.1 }))
    }

    fn flush(&self) -> BlockResult<()> {
        self.sync(self.face.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.sync(self.face.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.sync(self.face.write_zeroes(offset, len, flags))
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.sync(self.face.block_status(offset, len))
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.sync(self.face.cache(offset, len))
    }

    fn async_driver(&self) -> Option<Arc<dyn AsyncDriver>> {
        Some(self.face.clone())
    }
}
