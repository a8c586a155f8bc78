//! `BlockNode`: a named driver instance, and the async edge of the block layer.

use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::before_write::{BeforeWriteSlot, WriteGuard};
use crate::bitmap::{BitmapSet, DEFAULT_GRANULARITY};
use crate::buf::IoBuf;
use crate::driver::{AsyncDriver, Capabilities, Driver, Extent, ZeroFlags};
use crate::error::{BlockError, BlockErrorKind, BlockResult};
use crate::mapping::{Access, FileMapping, MappingLease};
use crate::observer::NodeObserver;
use crate::run::{runs_within, FileRun};
use crate::stats::IoStats;
use crate::throttle::{Direction, ThrottleMember};
use crate::uring::{Batch, Ring};
use crate::write_threshold::WriteThreshold;
use crate::zeroes::{is_zero, DetectZeroes};

/// The largest request a non-blocking driver runs inline on the caller's thread.
const INLINE_MAX: u64 = 256 * 1024;
/// A read goes out with `sendfile` only if its file runs average at least
/// this: a `sendfile` per shorter run costs more than the copy.
const MIN_AVERAGE_RUN: u64 = 128 * 1024;

/// Bytes of a node that sit in a page-cache file: `fd`'s `runs`, in order.
/// It holds the node, so the descriptor stays open while the slice lives,
/// and a format's lease, so the mapping stays valid (qcow2 frees no cluster).
#[derive(Debug)]
pub struct FileSlice {
    /// Open while `_node` lives; lent out only as a [`BorrowedFd`] tied to
    /// the slice.
    fd: RawFd,
    runs: Vec<FileRun>,
    _node: Arc<BlockNode>,
    _lease: Option<MappingLease>,
    /// A write slice counts as a write in flight until it is dropped.
    _write: Option<WriteGuard>,
}

impl FileSlice {
    /// The file's descriptor, valid while the slice is.
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the slice holds the node, whose driver owns the open
        // descriptor, so it stays open for the borrow's lifetime.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }

    /// The descriptor as a `File` for positional I/O; it is never closed
    /// through this (the node owns it).
    pub fn file(&self) -> std::mem::ManuallyDrop<std::fs::File> {
        // SAFETY: the slice holds the node, so `fd` stays open while the
        // slice lives; ManuallyDrop keeps this `File` from closing it.
        std::mem::ManuallyDrop::new(unsafe {
            <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(self.fd)
        })
    }

    /// The file offset of the slice's first byte. A write slice is one run,
    /// so its bytes go to `start()..start() + len`.
    pub fn start(&self) -> u64 {
        self.runs[0].offset
    }

    /// The file runs that hold bytes `range` of the slice (0 is its first
    /// byte), in order.
    pub fn runs_in(&self, range: Range<u64>) -> impl Iterator<Item = FileRun> + '_ {
        runs_within(&self.runs, range)
    }
}

#[derive(Debug)]
pub struct BlockNode {
    node_name: String,
    driver: Arc<dyn Driver>,
    /// The driver's asynchronous face, if it has one: requests go there
    /// instead of to the blocking pool (see [`AsyncDriver`]).
    async_driver: Option<Arc<dyn AsyncDriver>>,
    read_only: bool,
    caps: Capabilities,
    /// Dirty bitmaps; every write through this node marks them (see `bitmap.rs`).
    bitmaps: BitmapSet,
    /// Set once the persistent bitmaps have been stored (see [`Self::close`]).
    closed: AtomicBool,
    /// What a WRITE of zeroes becomes (see `zeroes.rs`).
    detect_zeroes: DetectZeroes,
    /// Requests served through this node by the daemon's exports (see
    /// `stats.rs`; the exports count, since some of their reads and writes
    /// bypass the node's async edge with sendfile and splice).
    stats: IoStats,
    /// A throttle node's place in its group: reads, writes, write-zeroes,
    /// discards and cache requests wait here for the group's limits.
    throttle: Option<ThrottleMember>,
    /// `block-set-write-threshold` (see `write_threshold.rs`).
    write_threshold: WriteThreshold,
    /// Hears a crossed write threshold; `None` for nodes nobody watches
    /// (tests, `bexd serve`'s throwaway nodes).
    observer: Option<Arc<dyn NodeObserver>>,
    /// A backup's copy-before-write hook (see `before_write.rs`).
    before_write: BeforeWriteSlot,
}

impl BlockNode {
    pub fn new(node_name: String, driver: Arc<dyn Driver>, read_only: bool) -> Self {
        let caps = driver.capabilities();
        let bitmaps = BitmapSet::default();
        if let Some(store) = driver.bitmap_store() {
            for b in store.take_loaded_bitmaps() {
                bitmaps.insert(Arc::new(b));
            }
        }
        Self {
            node_name,
            read_only: read_only || !caps.can_write,
            async_driver: driver.async_driver(),
            driver,
            caps,
            bitmaps,
            closed: AtomicBool::new(false),
            detect_zeroes: DetectZeroes::Off,
            stats: IoStats::default(),
            throttle: None,
            write_threshold: WriteThreshold::default(),
            observer: None,
            before_write: BeforeWriteSlot::default(),
        }
    }

    /// The node with `observer` hearing its write threshold and its
    /// driver's corruption reports.
    pub fn with_observer(mut self, observer: Arc<dyn NodeObserver>) -> Self {
        self.driver
            .attach_observer(&self.node_name, observer.clone());
        self.observer = Some(observer);
        self
    }

    /// Sets the write threshold in bytes; 0 turns it off.
    pub fn set_write_threshold(&self, offset: u64) {
        self.write_threshold.set(offset);
    }

    pub fn write_threshold(&self) -> u64 {
        self.write_threshold.get()
    }

    /// Reports a write ending past the threshold, once (QEMU checks every
    /// write, zeroing and discard that reaches a node, its children's too).
    fn check_write_threshold(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        if let Some(threshold) = self.write_threshold.crossed_by(end) {
            if let Some(o) = &self.observer {
                o.write_threshold_exceeded(&self.node_name, end - threshold, threshold);
            }
        }
    }

    /// The node as a member of a throttle group (a `throttle` node).
    pub fn with_throttle(mut self, member: ThrottleMember) -> Self {
        self.throttle = Some(member);
        self
    }

    pub fn throttle(&self) -> Option<&ThrottleMember> {
        self.throttle.as_ref()
    }

    /// Waits until the throttle group lets a request of `bytes` go; a node
    /// outside any group, or in a group without limits, goes at once.
    async fn throttled(&self, dir: Direction, bytes: u64) {
        if let Some(member) = &self.throttle {
            member.admit(dir, bytes).await;
        }
    }

    /// The node's request counters.
    pub fn stats(&self) -> &IoStats {
        &self.stats
    }

    /// The node with QEMU's `detect-zeroes` set; the caller has checked
    /// QEMU's rule (`unmap` needs `discard=unmap`).
    pub fn with_detect_zeroes(mut self, mode: DetectZeroes) -> Self {
        self.detect_zeroes = mode;
        self
    }

    pub fn detect_zeroes(&self) -> DetectZeroes {
        self.detect_zeroes
    }

    /// The range's bytes as a slice of a page-cache file (see
    /// [`Driver::map_file`]), for sending without a copy.
    pub fn page_cache_slice(self: &Arc<Self>, offset: u64, len: u64) -> Option<FileSlice> {
        self.slice(offset, len, Access::Read)
    }

    fn slice(self: &Arc<Self>, offset: u64, len: u64, access: Access) -> Option<FileSlice> {
        if !self.caps.maps_page_cache {
            return None;
        }
        // A slice is sent or filled by the caller, past the throttle: while
        // limits are set, requests take the paths that wait for them.
        if self
            .throttle
            .as_ref()
            .is_some_and(|t| t.group().is_limited())
        {
            return None;
        }
        self.check_range(offset, len).ok()?;
        // A write that must wait for a copy-before-write hook is not spliced.
        let write = match access {
            Access::Write => Some(self.before_write.enter_unhooked()?),
            Access::Read => None,
        };
        let m = self.driver.map_file(offset, len, access)?;
        // One run for a write: the splice writes one file range. A read in
        // many short runs costs more in `sendfile` calls than the copy.
        let runs_ok = match access {
            Access::Write => m.runs.len() == 1,
            Access::Read => m.runs.len() as u64 * MIN_AVERAGE_RUN <= len.max(MIN_AVERAGE_RUN),
        };
        if !m.page_cache || m.len() != len || !runs_ok {
            return None;
        }
        Some(FileSlice {
            fd: m.fd.as_raw_fd(),
            runs: m.runs,
            _node: self.clone(),
            _lease: m.lease,
            _write: write,
        })
    }

    /// Like [`Self::page_cache_slice`], for writing the range straight into
    /// the file (a spliced NBD WRITE); `None` on a read-only node. The
    /// caller must call [`Self::page_cache_written`] once the bytes are in.
    /// With `detect-zeroes` the payload must be looked at first, so no slice.
    pub fn page_cache_write_slice(self: &Arc<Self>, offset: u64, len: u64) -> Option<FileSlice> {
        self.check_writable().ok()?;
        if self.detect_zeroes != DetectZeroes::Off {
            return None;
        }
        self.slice(offset, len, Access::Write)
    }

    /// Bytes went into a [`Self::page_cache_write_slice`]: the bitmaps are
    /// marked here and below, as `write` would have (also after a failure,
    /// which may have changed part of the range).
    pub fn page_cache_written(&self, offset: u64, len: u64) {
        self.driver.mapping_written(offset, len);
        self.record_write(offset, len);
    }

    /// Stores the persistent bitmaps in the image, as QEMU does when it
    /// closes a node; the node must not be written afterwards. Runs once;
    /// dropping the node runs it too, for the nodes nobody closed.
    pub fn close(&self) -> BlockResult<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        match self.driver.bitmap_store() {
            Some(store) => store.store_persistent_bitmaps(&self.bitmaps.list()),
            None => Ok(()),
        }
    }

    /// The granularity of a bitmap added without one: the format's rule
    /// where it stores bitmaps, QEMU's 64 KiB elsewhere.
    pub fn default_bitmap_granularity(&self) -> u64 {
        self.driver
            .bitmap_store()
            .map_or(DEFAULT_GRANULARITY, |s| s.default_bitmap_granularity())
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    pub fn driver_name(&self) -> &'static str {
        self.driver.driver_name()
    }

    pub fn size(&self) -> u64 {
        self.driver.size()
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }

    pub fn driver(&self) -> &Arc<dyn Driver> {
        &self.driver
    }

    /// The driver's asynchronous face, where it has one; a format over this
    /// node (raw) passes its requests on through it.
    pub fn async_driver(&self) -> Option<&Arc<dyn AsyncDriver>> {
        self.async_driver.as_ref()
    }

    pub fn bitmaps(&self) -> &BitmapSet {
        &self.bitmaps
    }

    /// The copy-before-write hook every write of this node passes.
    pub fn before_write(&self) -> &BeforeWriteSlot {
        &self.before_write
    }

    /// Records a write that has been done: marks this node's recording
    /// bitmaps and checks its write threshold. The node calls it for its
    /// own writes; a format driver that writes its child through the
    /// child's driver (raw, blkdebug, qcow2's `MarkingChild`) calls it on
    /// the child, so a bitmap or threshold on a `file` node sees writes
    /// made through the format on top, as in QEMU, where every layer
    /// tracks its own writes.
    pub fn record_write(&self, offset: u64, len: u64) {
        self.check_write_threshold(offset, len);
        self.bitmaps.mark(offset, len);
    }

    fn check_range(&self, offset: u64, len: u64) -> BlockResult<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BlockError::new(
                BlockErrorKind::OutOfBounds,
                format!(
                    "request {offset}+{len} is past the end of node '{}' ({size})",
                    self.node_name
                ),
            )),
        }
    }

    fn check_writable(&self) -> BlockResult<()> {
        match self.read_only {
            true => Err(BlockError::new(
                BlockErrorKind::ReadOnly,
                format!("node '{}' is read-only", self.node_name),
            )),
            false => Ok(()),
        }
    }

    /// Runs `f`, which touches `len` bytes, on the blocking pool, or inline
    /// when the driver never blocks and the request is small. For a 4 KiB
    /// request the hop to the pool (two thread wake-ups) costs more than the
    /// copy itself; a large copy inline would stall the runtime's other tasks.
    async fn run<T: Send + 'static>(
        &self,
        len: u64,
        f: impl FnOnce(&dyn Driver) -> T + Send + 'static,
    ) -> T {
        if self.runs_inline(len) {
            return f(self.driver.as_ref());
        }
        let driver = self.driver.clone();
        crate::pool::run(move || f(driver.as_ref())).await
    }

    fn runs_inline(&self, len: u64) -> bool {
        self.caps.nonblocking && len <= INLINE_MAX
    }

    /// Where a request that would go to the pool can go to an io_uring
    /// instead: the file's ring and runs covering the whole range.
    fn ring_mapping(
        &self,
        offset: u64,
        len: u64,
        access: Access,
    ) -> Option<(&Ring, FileMapping<'_>)> {
        if !self.caps.maps_ring || self.runs_inline(len) {
            return None;
        }
        let m = self.driver.map_file(offset, len, access)?;
        let ring = m.ring.filter(|_| m.len() == len)?;
        Some((ring, m))
    }

    pub async fn read(&self, buf: IoBuf, offset: u64) -> (IoBuf, BlockResult<()>) {
        self.read_via(buf, offset, None).await
    }

    /// [`Self::read`], with what it queues on an io_uring left in `batch`
    /// while that is plugged (see `uring/batch.rs`).
    pub async fn read_batched(
        &self,
        buf: IoBuf,
        offset: u64,
        batch: &Batch,
    ) -> (IoBuf, BlockResult<()>) {
        self.read_via(buf, offset, Some(batch)).await
    }

    async fn read_via(
        &self,
        mut buf: IoBuf,
        offset: u64,
        batch: Option<&Batch>,
    ) -> (IoBuf, BlockResult<()>) {
        let len = buf.len() as u64;
        if let Err(e) = self.check_range(offset, len) {
            return (buf, Err(e));
        }
        self.throttled(Direction::Read, len).await;
        if let Some(a) = &self.async_driver {
            return a.read(buf, offset).await;
        }
        if !self.caps.nonblocking && len <= INLINE_MAX {
            if let Some(r) = self.driver.try_read_now(&mut buf, offset) {
                return (buf, r);
            }
        }
        if let Some((ring, m)) = self.ring_mapping(offset, len, Access::Read) {
            let (buf, r) = ring.read_runs(m.fd, buf, &m.runs, batch).await;
            // The mapping (a qcow2 lease) stays valid until the bytes are in.
            drop(m.lease);
            let what = || format!("Could not read from '{}'", m.path.display());
            return (buf, r.map_err(|e| BlockError::io(what(), e)));
        }
        self.run(buf.len() as u64, move |d| {
            let r = d.read_at(&mut buf, offset);
            (buf, r)
        })
        .await
    }

    pub async fn write(&self, buf: IoBuf, offset: u64, fua: bool) -> (IoBuf, BlockResult<()>) {
        self.write_via(buf, offset, fua, None).await
    }

    /// [`Self::write`], with what it queues on an io_uring left in `batch`
    /// while that is plugged.
    pub async fn write_batched(
        &self,
        buf: IoBuf,
        offset: u64,
        fua: bool,
        batch: &Batch,
    ) -> (IoBuf, BlockResult<()>) {
        self.write_via(buf, offset, fua, Some(batch)).await
    }

    async fn write_via(
        &self,
        buf: IoBuf,
        offset: u64,
        fua: bool,
        batch: Option<&Batch>,
    ) -> (IoBuf, BlockResult<()>) {
        if let Err(e) = self
            .check_writable()
            .and(self.check_range(offset, buf.len() as u64))
        {
            return (buf, Err(e));
        }
        let len = buf.len() as u64;
        self.throttled(Direction::Write, len).await;
        let _write = match self.before_write.enter(offset, len).await {
            Ok(guard) => guard,
            Err(e) => return (buf, Err(e)),
        };
        if self.detect_zeroes != DetectZeroes::Off && is_zero(&buf) {
            return (buf, self.write_detected_zeroes(offset, len, fua).await);
        }
        if let Some(a) = &self.async_driver {
            let done = a.write(buf, offset, fua).await;
            self.record_write(offset, len);
            return done;
        }
        let mapping = self.ring_mapping(offset, len, Access::Write);
        // Only raw over a file answers writes: one run.
        if let Some((ring, m)) = mapping.filter(|(_, m)| m.runs.len() == 1) {
            let (buf, r) = ring.write(m.fd, buf, m.runs[0].offset, fua, batch).await;
            // Even a failed write may have changed part of the range.
            self.driver.mapping_written(offset, len);
            self.record_write(offset, len);
            let what = || format!("Could not write to '{}'", m.path.display());
            return (buf, r.map_err(|e| BlockError::io(what(), e)));
        }
        let done = self
            .run(len, move |d| {
                let r = d.write_at(&buf, offset, fua);
                (buf, r)
            })
            .await;
        self.record_write(offset, len);
        done
    }

    /// A WRITE whose payload is all zeroes, as QEMU's `detect-zeroes` turns
    /// it: a write-zeroes, which may deallocate with `unmap` (the driver
    /// still deallocates only with `discard=unmap`); FUA becomes a flush.
    async fn write_detected_zeroes(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        let flags = ZeroFlags {
            may_unmap: self.detect_zeroes == DetectZeroes::Unmap,
            fast: false,
        };
        let r = match &self.async_driver {
            Some(a) => match a.write_zeroes(offset, len, flags).await {
                Ok(()) if fua => a.flush().await,
                r => r,
            },
            None => {
                self.run(len, move |d| {
                    d.write_zeroes(offset, len, flags)?;
                    match fua {
                        true => d.flush(),
                        false => Ok(()),
                    }
                })
                .await
            }
        };
        self.record_write(offset, len);
        r
    }

    pub async fn flush(&self) -> BlockResult<()> {
        if self.read_only {
            return Ok(());
        }
        match &self.async_driver {
            Some(a) => a.flush().await,
            None => self.run(0, |d| d.flush()).await,
        }
    }

    pub async fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        // A discard the node drops never reaches the throttle, as in QEMU.
        if self.caps.can_discard {
            self.throttled(Direction::Write, len).await;
        }
        let _write = self.before_write.enter(offset, len).await?;
        let r = match &self.async_driver {
            Some(a) => a.discard(offset, len).await,
            None => self.run(len, move |d| d.discard(offset, len)).await,
        };
        // A node that ignores discards writes nothing: QEMU leaves its
        // bitmaps and write threshold alone.
        if self.caps.can_discard {
            self.record_write(offset, len);
        }
        r
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.throttled(Direction::Write, len).await;
        let _write = self.before_write.enter(offset, len).await?;
        let r = match &self.async_driver {
            Some(a) => a.write_zeroes(offset, len, flags).await,
            None => {
                self.run(len, move |d| d.write_zeroes(offset, len, flags))
                    .await
            }
        };
        self.record_write(offset, len);
        r
    }

    /// A status query costs a seek or a table lookup whatever its length, so
    /// on a driver that never blocks it runs inline at any length: sent to
    /// the pool for being "large", a map of a sparse terabyte made two thread
    /// wake-ups per extent and ran 5x slower than qemu-nbd's.
    pub async fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.check_range(offset, len)?;
        if let Some(a) = &self.async_driver {
            return a.block_status(offset, len).await;
        }
        if self.caps.nonblocking {
            return self.driver.block_status(offset, len);
        }
        if !self.runs_inline(len) {
            if let Some(known) = self.driver.try_block_status_now(offset, len) {
                return known;
            }
        }
        self.run(len, move |d| d.block_status(offset, len)).await
    }

    /// Block status over `[offset, offset+len)`, queried at most `step`
    /// bytes at a time and handed to `sink` extent by extent until it has
    /// enough or the range is covered; the sink comes back with what it
    /// gathered. Queries run inline while the driver can answer at once (it
    /// never blocks, or it knows the answer); the rest of the walk then goes
    /// to the pool in one trip, not one per extent: on a disk file a map of
    /// a sparse terabyte paid two thread wake-ups per extent and took 3-6x
    /// qemu-nbd's time.
    pub async fn walk_block_status<S: ExtentSink>(
        &self,
        offset: u64,
        len: u64,
        step: u64,
        mut sink: S,
    ) -> BlockResult<S> {
        self.check_range(offset, len)?;
        let end = offset + len;
        let step = step.max(1);
        if let Some(a) = &self.async_driver {
            return walk_async(a.as_ref(), offset, end, step, sink).await;
        }
        let nonblocking = self.caps.nonblocking;
        let now = |d: &dyn Driver, pos, want| match nonblocking {
            true => Some(d.block_status(pos, want)),
            false => d.try_block_status_now(pos, want),
        };
        let pos = match walk_extents(self.driver.as_ref(), offset, end, step, &mut sink, now)? {
            Walked::Done => return Ok(sink),
            Walked::Stopped(pos) => pos,
        };
        let driver = self.driver.clone();
        let rest = move || {
            let all = |d: &dyn Driver, pos, want| Some(d.block_status(pos, want));
            walk_extents(driver.as_ref(), pos, end, step, &mut sink, all).map(|_| sink)
        };
        crate::pool::run(rest).await
    }

    pub async fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.check_range(offset, len)?;
        // QEMU's NBD CACHE is a prefetching read, which its throttle counts.
        self.throttled(Direction::Read, len).await;
        match &self.async_driver {
            Some(a) => a.cache(offset, len).await,
            None => self.run(len, move |d| d.cache(offset, len)).await,
        }
    }
}

/// Where a block-status walk ([`BlockNode::walk_block_status`]) puts the
/// extents it finds.
pub trait ExtentSink: Send + 'static {
    /// Takes the extent that starts at `offset` (its length at least 1 and
    /// within the query); `false` ends the walk.
    fn push(&mut self, offset: u64, extent: &Extent) -> bool;
}

/// How far [`walk_extents`] got.
enum Walked {
    /// The range is covered or the sink has enough.
    Done,
    /// `query` could not answer at this offset without blocking.
    Stopped(u64),
}

/// [`walk_extents`] over an asynchronous driver: one query in flight at a
/// time, as each starts where the last one ended.
async fn walk_async<S: ExtentSink>(
    driver: &dyn AsyncDriver,
    mut pos: u64,
    end: u64,
    step: u64,
    mut sink: S,
) -> BlockResult<S> {
    while pos < end {
        let want = (end - pos).min(step);
        let extent = driver.block_status(pos, want).await?;
        let len = extent.len.clamp(1, want);
        if !sink.push(pos, &Extent { len, ..extent }) {
            break;
        }
        pos += len;
    }
    Ok(sink)
}

/// Queries `driver` from `pos` to `end` through `query` (`None`: not
/// without blocking) and feeds `sink`.
fn walk_extents(
    driver: &dyn Driver,
    mut pos: u64,
    end: u64,
    step: u64,
    sink: &mut impl ExtentSink,
    query: impl Fn(&dyn Driver, u64, u64) -> Option<BlockResult<Extent>>,
) -> BlockResult<Walked> {
    while pos < end {
        let want = (end - pos).min(step);
        let Some(extent) = query(driver, pos, want) else {
            return Ok(Walked::Stopped(pos));
        };
        let extent = extent?;
        let len = extent.len.clamp(1, want);
        if !sink.push(pos, &Extent { len, ..extent }) {
            break;
        }
        pos += len;
    }
    Ok(Walked::Done)
}

impl Drop for BlockNode {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(node = %self.node_name, error = %e, "storing persistent bitmaps failed");
        }
    }
}
