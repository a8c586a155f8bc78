//! The driver trait every block driver implements, and the asynchronous
//! face that drivers of storage behind a network add to it.

use std::future::Future;
use std::pin::Pin;

use crate::bitmap_store::BitmapStore;
use crate::buf::IoBuf;
use crate::debug_event::DebugEvent;
use crate::error::BlockResult;
use crate::mapping::{Access, FileMapping};
use crate::observer::NodeObserver;

/// What a driver can do, cached by the node at open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub can_write: bool,
    /// Discard reaches the storage (`discard=unmap` and support for it).
    pub can_discard: bool,
    /// Zeroing is cheaper than writing zeroes (fallocate, BLKZEROOUT).
    pub can_write_zeroes_fast: bool,
    /// Required alignment of offsets and lengths: 1, or the O_DIRECT block size.
    pub request_alignment: u32,
    /// Largest single transfer, 0 for no limit.
    pub max_transfer: u32,
    /// Calls never wait for a device (null-co, files in tmpfs): the node runs
    /// small requests inline instead of hopping to the blocking pool.
    pub nonblocking: bool,
    /// [`Driver::map_file`] may name a page-cache file, or a file with an
    /// io_uring. The node asks only for a path one of them allows, so a
    /// format (qcow2) does not lock and map a range for a path its file
    /// can never take: a read first tries `sendfile`, then the ring.
    pub maps_page_cache: bool,
    pub maps_ring: bool,
}

/// Flags for write_zeroes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated instead of written.
    pub may_unmap: bool,
    /// Fail with NotSupported unless zeroing is cheap.
    pub fast: bool,
}

/// A run of blocks with the same allocation status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Data is present (not a hole).
    pub allocated: bool,
    /// Reads return zeroes.
    pub zero: bool,
    /// Which layer of a backing chain holds the range: 0 nowhere (reads come
    /// from no layer), 1 this node, 2 its backing file, and so on. Protocol
    /// drivers and raw answer 1 everywhere, as QEMU's allocation depth does;
    /// it is what the `qemu:allocation-depth` meta context reports.
    pub depth: u32,
}

/// A block driver: positional, synchronous I/O. Callers (the node) have
/// checked ranges and permissions, so drivers need not re-validate.
pub trait Driver: Send + Sync + std::fmt::Debug + 'static {
    fn driver_name(&self) -> &'static str;
    fn size(&self) -> u64;
    fn capabilities(&self) -> Capabilities;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()>;
    /// With `fua`, the data is on stable storage when this returns.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()>;
    fn flush(&self) -> BlockResult<()>;
    /// Advisory; a no-op when the node does not pass discards down.
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()>;
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()>;
    /// The extent starting at `offset`, at most `len` long, never empty.
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent>;
    /// Reads at once if that cannot block (the data is in the page cache);
    /// `None` if it would block, and the node then runs `read_at` on the
    /// blocking pool. Lets cached reads skip the hop to a worker thread.
    fn try_read_now(&self, _buf: &mut [u8], _offset: u64) -> Option<BlockResult<()>> {
        None
    }
    /// Where `[offset, offset+len)` lies in a file: the file runs that hold
    /// its bytes, in order (one for a raw file, one per run of contiguous
    /// clusters for qcow2), and what that file can do (page cache, a ring);
    /// see `mapping.rs`. The node then moves the bytes itself (`sendfile`,
    /// `splice`, the ring) instead of calling `read_at`/`write_at`, so the
    /// bytes must be exactly those `read_at` would return. `None` when
    /// neither path applies.
    ///
    /// For [`Access::Write`] the bytes will be written straight into the
    /// file, so only drivers whose `write_at` would write exactly there (raw
    /// over a file) may answer; qcow2 answers reads only. After such a
    /// write the node calls [`Self::mapping_written`].
    fn map_file(&self, _offset: u64, _len: u64, _access: Access) -> Option<FileMapping<'_>> {
        None
    }
    /// `block_status` if it can be answered at once, without a syscall that
    /// may wait for a device or a peer (the file driver's cached data extent,
    /// a block device, a seek on a local filesystem); `None` sends the query
    /// to the pool. A sparse NBD READ asks
    /// this before every read of 64 KiB and more, and on a disk image the
    /// hop to the pool cost a fifth of 64 KiB read throughput.
    fn try_block_status_now(&self, _offset: u64, _len: u64) -> Option<BlockResult<Extent>> {
        None
    }
    /// Called after bytes were written straight into the file that
    /// [`Self::map_file`] named (a spliced NBD WRITE, or one through the
    /// ring), so drivers in between do what their `write_at` would have:
    /// raw marks its child's bitmaps.
    fn mapping_written(&self, _offset: u64, _len: u64) {}
    /// The storage's length now, when it may have grown since open (a
    /// file a format above extends); `None`: [`Self::size`] holds.
    fn current_len(&self) -> Option<u64> {
        None
    }
    /// Where the format keeps persistent dirty bitmaps (qcow2); `None`
    /// for drivers that cannot store them.
    fn bitmap_store(&self) -> Option<&dyn BitmapStore> {
        None
    }
    /// The driver above this one reports what it is about to do (QEMU's
    /// `BLKDBG_EVENT`). Only `blkdebug` acts on events; drivers over a child
    /// pass them down to it, as QEMU looks for the first node below that
    /// handles events, and drivers without a child ignore them. Without a
    /// blkdebug node in the chain this costs a call that does nothing.
    fn debug_event(&self, _event: DebugEvent) {}
    /// The node this driver serves, and who hears what it finds: a format
    /// that detects corruption at run time reports it there under the
    /// node's name. Others have nothing to report.
    fn attach_observer(&self, _node_name: &str, _observer: std::sync::Arc<dyn NodeObserver>) {}
    /// True once the driver has given up on its image (qcow2 found it
    /// corrupt): every request fails, and `query-named-block-nodes` reports
    /// the node as QEMU reports a node without a driver.
    fn unusable(&self) -> bool {
        false
    }
    /// Readahead hint.
    fn cache(&self, _offset: u64, _len: u64) -> BlockResult<()> {
        Ok(())
    }
    /// The driver's asynchronous face, for drivers whose requests complete
    /// without a thread waiting (storage behind a network; see
    /// [`AsyncDriver`]). The node asks once, at creation, and then sends
    /// every request there instead of to the blocking pool.
    fn async_driver(&self) -> Option<std::sync::Arc<dyn AsyncDriver>> {
        None
    }
}

/// A request's completion: `'static`, so it owns what it needs (an `Arc` of the driver's
/// state, the buffer).
pub type IoFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The asynchronous face of a driver whose requests complete without a
/// thread waiting for them.
///
/// A [`Driver`] is synchronous: the node runs it on tokio's blocking pool, so each
/// request in flight holds a pool thread for as long as the device takes. That is right for a
/// local file (a page-cache copy or a disk read of microseconds to milliseconds, and io_uring for
/// the rest), and wrong for storage behind a network: a Ceph RBD image answers through librbd's
/// completion callbacks, an NBD server through replies on one connection, each after a round
/// trip, and 32 requests in flight would hold 32 threads that do nothing but wait.
///
/// Such a driver still implements `Driver` (formats such as qcow2 call their child
/// synchronously from the pool, and its answers there must be the same bytes), and offers an
/// [`AsyncDriver`] through [`Driver::async_driver`]. A node over it sends every request there
/// instead of to the pool, after the same range, permission and throttle checks; `raw` over such
/// a node offers one too ([`crate::drivers::raw`]), so the common raw-over-protocol stack never
/// touches the pool.
///
/// Futures are boxed: one allocation per request is nothing next to a network round trip, and it
/// keeps the trait object-safe.
///
/// The node has checked ranges, permissions and limits, as for [`Driver`]; each call means
/// what the `Driver` method of the same name means (FUA durable on return, `block_status`
/// never empty, ...).
pub trait AsyncDriver: Send + Sync + std::fmt::Debug + 'static {
    /// Fills all of `buf` from `offset`; the buffer comes back with the result.
    fn read(&self, buf: IoBuf, offset: u64) -> IoFuture<(IoBuf, BlockResult<()>)>;
    /// Writes all of `buf` at `offset`; with `fua` it is on stable storage when this completes.
    fn write(&self, buf: IoBuf, offset: u64, fua: bool) -> IoFuture<(IoBuf, BlockResult<()>)>;
    fn flush(&self) -> IoFuture<BlockResult<()>>;
    fn discard(&self, offset: u64, len: u64) -> IoFuture<BlockResult<()>>;
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<BlockResult<()>>;
    /// The extent starting at `offset`, at most `len` long, never empty.
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<BlockResult<Extent>>;
    /// Readahead hint; drivers without one do nothing.
    fn cache(&self, _offset: u64, _len: u64) -> IoFuture<BlockResult<()>> {
        Box::pin(async { Ok(()) })
    }
}
