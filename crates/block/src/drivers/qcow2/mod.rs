//! The `qcow2` format driver, over a child node holding the image.
//!
//! ```text
//!   header.rs      header and extensions, every field checked at open
//!   l2.rs          L1/L2 entry decoding (standard and extended), no I/O
//!   refcount.rs    refcount entries of 1..64 bits, allocation, table growth
//!   cache.rs       LRU of L2 tables and refcount blocks
//!   meta.rs        the open image's metadata and its crash-safe flush order
//!   bitmap_dir.rs  persistent bitmaps' directory, tables and bits, no I/O
//!   bitmaps.rs     persistent bitmaps loaded at open, stored at close
//!   compressed.rs  deflate / zstd clusters
//!   corruption.rs  corruption found while serving: event, corrupt bit, give up
//!   overlap.rs     QEMU's metadata overlap check and corruption messages
//!   io.rs          read, write (allocation, COW), zeroes, discard, block status
//! ```
//!
//! One mutex guards the metadata; it is held for mapping lookups and
//! updates, never across guest data I/O. Guest clusters being allocated are
//! marked busy in the metadata, so two writers never allocate the same
//! cluster; reads and in-place writes are counted while they do I/O, and
//! freed clusters become reusable only when none are in flight.

mod bitmap_dir;
mod bitmaps;
mod cache;
mod compressed;
mod corruption;
mod create;
mod header;
mod io;
mod l2;
mod meta;
mod overlap;
mod refcount;

#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::bitmap::DirtyBitmap;
use crate::bitmap_store::{BitmapStore, StoredBitmap};
use crate::debug_event::DebugEvent;
use crate::driver::{Capabilities, Driver, Extent, ZeroFlags};
use crate::drivers::child::MarkingChild;
use crate::error::{BlockError, BlockErrorKind, BlockResult};
use crate::mapping::{Access, FileMapping};
use crate::observer::NodeObserver;

use crate::node::BlockNode;
use crate::write_gen::{report_flush, WriteGen};
pub use create::empty_image;

use bitmaps::BitmapDirectory;
use cache::TableCache;
use corruption::CorruptionSignal;
use header::{Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use l2::Geometry;
use meta::{CleanState, Meta};

/// QEMU's defaults (docs/qcow2-cache.txt): an L2 cache big enough for the
/// whole disk up to 32 MiB, a refcount cache of 4 clusters.
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
const DEFAULT_REFCOUNT_CLUSTERS: u64 = 4;
/// QEMU's default `cache-clean-interval`, in seconds.
pub const DEFAULT_CACHE_CLEAN_INTERVAL: u64 = 600;

#[derive(Clone, Debug, Default)]
pub struct Qcow2Options {
    pub read_only: bool,
    /// `discard=unmap`: guest discards deallocate clusters, freed clusters are discarded below.
    pub discard: bool,
    pub l2_cache_size: Option<u64>,
    pub refcount_cache_size: Option<u64>,
    pub cache_size: Option<u64>,
    /// Seconds after which unused cache entries are dropped; 0 never.
    pub cache_clean_interval: Option<u64>,
    /// Accepted; refcounts are always kept exact, which lazy mode only relaxes.
    pub lazy_refcounts: Option<bool>,
}

#[derive(Debug)]
pub struct Qcow2Driver {
    /// The image's node; writes through it mark its bitmaps.
    file: MarkingChild,
    backing: Option<Arc<BlockNode>>,
    header: Header,
    backing_file: Option<String>,
    read_only: bool,
    discard: bool,
    meta: Mutex<Meta>,
    /// Signalled whenever a busy guest cluster is released.
    released: Condvar,
    /// Persistent bitmaps on disk. Locked before `meta`, never after.
    bitmaps: Mutex<BitmapDirectory>,
    /// For the flush events QEMU reports to the file (`flush_to_disk`
    /// only after a write).
    generation: WriteGen,
    /// Corruption found while serving, and whether the driver gave up.
    corruption: CorruptionSignal,
}

/// What `query-named-block-nodes` shows of a qcow2 image (QEMU's ImageInfoSpecificQCow2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qcow2Info {
    /// "0.10" for version 2, "1.1" for version 3.
    pub compat: &'static str,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    pub lazy_refcounts: bool,
    pub corrupt: bool,
    pub extended_l2: bool,
    /// "zlib" or "zstd".
    pub compression_type: &'static str,
    /// The backing file name as stored in the header.
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

fn invalid(msg: impl Into<String>) -> BlockError {
    BlockError::new(BlockErrorKind::InvalidImage, msg)
}

/// A request found a lock whose holder panicked: EIO, with the reason.
fn poisoned(what: &str) -> BlockError {
    BlockError::new(
        BlockErrorKind::Io,
        format!("qcow2: {what} lock poisoned by an earlier failure; the image is not used further"),
    )
}

impl Qcow2Driver {
    /// Opens the image on `file`. A backing file named in the header is not
    /// opened here (that needs the node graph); see [`Self::backing_file`]
    /// and [`Self::with_backing`].
    pub fn open(file: Arc<BlockNode>, opts: &Qcow2Options) -> BlockResult<Self> {
        let read_only = opts.read_only || file.read_only();
        let f = file.driver().as_ref();
        let mut prefix = vec![0u8; 512];
        f.read_at(&mut prefix, 0)?;
        let cluster_bits = Header::cluster_bits_of(&prefix)?;
        let mut cluster0 = vec![0u8; 1 << cluster_bits];
        f.read_at(&mut cluster0, 0)?;
        let header = Header::parse(&cluster0)?;
        check_open_flags(&header, read_only)?;
        let mut meta = load_meta(f, &header, opts)?;
        let bitmaps = bitmaps::load(f, &header, read_only)?;
        let interval = opts
            .cache_clean_interval
            .unwrap_or(DEFAULT_CACHE_CLEAN_INTERVAL);
        meta.clean.interval = (interval > 0).then(|| Duration::from_secs(interval));
        Ok(Self {
            backing_file: header.backing_file(&cluster0),
            file: MarkingChild::new(file),
            backing: None,
            header,
            read_only,
            discard: opts.discard,
            meta: Mutex::new(meta),
            released: Condvar::new(),
            bitmaps: Mutex::new(bitmaps),
            generation: WriteGen::default(),
            corruption: CorruptionSignal::default(),
        })
    }

    /// The backing file name and format from the header, if the image has one.
    pub fn backing_file(&self) -> Option<(&str, Option<&str>)> {
        self.backing_file
            .as_deref()
            .map(|n| (n, self.header.backing_format.as_deref()))
    }

    /// Reads fall through to `backing` where this image has no data.
    pub fn with_backing(mut self, backing: Option<Arc<BlockNode>>) -> Self {
        self.backing = backing;
        self
    }

    pub fn version(&self) -> u32 {
        self.header.version
    }

    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    pub fn info(&self) -> Qcow2Info {
        let h = &self.header;
        Qcow2Info {
            compat: if h.version == 2 { "0.10" } else { "1.1" },
            cluster_size: h.cluster_size(),
            refcount_bits: 1 << h.refcount_order,
            lazy_refcounts: self.lazy_refcounts(),
            corrupt: h.incompatible & INCOMPAT_CORRUPT != 0,
            extended_l2: h.extended_l2(),
            compression_type: match h.compression {
                header::Compression::Zlib => "zlib",
                header::Compression::Zstd => "zstd",
            },
            backing_file: self.backing_file.clone(),
            backing_format: h.backing_format.clone(),
        }
    }

    /// Internal snapshots in the image (their clusters are shared, never written in place).
    pub fn snapshots(&self) -> u32 {
        self.header.nb_snapshots
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.header.compatible & COMPAT_LAZY_REFCOUNTS != 0
    }

    fn geom(&self) -> Geometry {
        Geometry {
            cluster_bits: self.header.cluster_bits,
            extended: self.header.extended_l2(),
        }
    }

    fn f(&self) -> &dyn Driver {
        &self.file
    }

    /// Where `blockdev-reopen` replaces the `file` child.
    pub fn child_slot(&self) -> &crate::drivers::child::ChildSlot {
        self.file.slot()
    }

    /// The metadata, locked. A thread that panicked while holding it may
    /// have left a mapping half-updated (an L2 entry set, its refcount not),
    /// so a poisoned lock fails every later request with EIO instead of
    /// serving or flushing metadata nobody can vouch for.
    fn lock(&self) -> BlockResult<MutexGuard<'_, Meta>> {
        let mut m = self.meta.lock().map_err(|_| poisoned("metadata"))?;
        m.maybe_clean();
        Ok(m)
    }

    /// Waits until a busy cluster is released; EIO if the lock was
    /// poisoned meanwhile (see [`Self::lock`]).
    fn wait_released<'a>(&self, m: MutexGuard<'a, Meta>) -> BlockResult<MutexGuard<'a, Meta>> {
        self.released.wait(m).map_err(|_| poisoned("metadata"))
    }
}

impl Qcow2Driver {
    /// Runs one request unless the driver has given up, and signals the
    /// corruption it finds (see `corruption.rs`).
    fn guarded<T>(&self, request: impl FnOnce() -> BlockResult<T>) -> BlockResult<T> {
        self.corruption.check_usable()?;
        let r = request();
        if let Err(found) = &r {
            if let Some(c) = found.found_corruption() {
                self.corruption
                    .signal(c, !self.read_only, || self.mark_corrupt());
            }
        }
        r
    }

    /// Sets the header's corrupt bit (version 3; a version 2 header has no
    /// feature bits), so no one opens the image for writing until it is
    /// repaired: `qemu-img check -r all` clears it.
    fn mark_corrupt(&self) -> BlockResult<()> {
        if self.header.version < 3 {
            return Ok(());
        }
        let features = self.header.incompatible | INCOMPAT_CORRUPT;
        self.f()
            .write_at(&features.to_be_bytes(), header::OFF_INCOMPATIBLE, false)?;
        self.f().flush()
    }
}

fn check_open_flags(h: &Header, read_only: bool) -> BlockResult<()> {
    if h.incompatible & INCOMPAT_CORRUPT != 0 && !read_only {
        return Err(invalid(
            "qcow2: Image is corrupt; cannot be opened read/write",
        ));
    }
    if h.incompatible & INCOMPAT_DIRTY != 0 && !read_only {
        // QEMU repairs such an image on open; bexd asks for the repair instead.
        return Err(invalid(
            "qcow2: Image was not closed cleanly (lazy refcounts); repair it with 'qemu-img check -r all' first",
        ));
    }
    Ok(())
}

fn read_table(f: &dyn Driver, offset: u64, entries: usize) -> BlockResult<Vec<u64>> {
    let mut bytes = vec![0u8; entries * 8];
    f.read_at(&mut bytes, offset)?;
    Ok(bytes.chunks_exact(8).map(|c| l2::be64(c, 0)).collect())
}

/// Cache sizes in bytes, resolved as QEMU does from the three options.
fn cache_sizes(h: &Header, opts: &Qcow2Options) -> BlockResult<(u64, u64)> {
    let cs = h.cluster_size();
    let entry = if h.extended_l2() { 16 } else { 8 };
    let whole_disk = h.size.div_ceil(cs) * entry;
    let min_rc = DEFAULT_REFCOUNT_CLUSTERS * cs;
    match (
        opts.cache_size,
        opts.l2_cache_size,
        opts.refcount_cache_size,
    ) {
        (Some(t), Some(l2), Some(rc)) if l2 + rc > t => Err(BlockError::new(
            BlockErrorKind::InvalidArgument,
            "l2-cache-size + refcount-cache-size may not exceed cache-size",
        )),
        (_, Some(l2), Some(rc)) => Ok((l2, rc)),
        (Some(t), Some(l2), None) => Ok((l2, t.saturating_sub(l2))),
        (Some(t), None, Some(rc)) => Ok((t.saturating_sub(rc), rc)),
        (Some(t), None, None) => {
            let l2 = whole_disk.min(t.saturating_sub(min_rc));
            Ok((l2, t - l2))
        }
        (None, l2, rc) => Ok((
            l2.unwrap_or(whole_disk.min(DEFAULT_L2_CACHE_MAX)),
            rc.unwrap_or(min_rc),
        )),
    }
}

fn load_meta(f: &dyn Driver, h: &Header, opts: &Qcow2Options) -> BlockResult<Meta> {
    let cs = h.cluster_size();
    let geom = Geometry {
        cluster_bits: h.cluster_bits,
        extended: h.extended_l2(),
    };
    let l1 = read_table(f, h.l1_table_offset, h.l1_size as usize)?;
    let rt_entries = (u64::from(h.refcount_table_clusters) * cs / 8) as usize;
    let rc_table = read_table(f, h.refcount_table_offset, rt_entries)?;
    let (l2_bytes, rc_bytes) = cache_sizes(h, opts)?;
    Ok(Meta {
        geom,
        refcount_order: h.refcount_order,
        l1,
        l1_offset: h.l1_table_offset,
        l1_dirty: BTreeSet::new(),
        l2_cache: TableCache::new((l2_bytes / cs) as usize),
        rc_table,
        rc_table_offset: h.refcount_table_offset,
        rc_table_clusters: h.refcount_table_clusters,
        rc_cache: TableCache::new((rc_bytes / cs) as usize),
        free_hint: 0,
        pending_frees: Vec::new(),
        freed: Vec::new(),
        busy: HashSet::new(),
        in_flight: Arc::default(),
        leased: Arc::default(),
        untouched_from: f.size().next_multiple_of(cs),
        clean: CleanState {
            interval: None,
            at: Instant::now(),
            ticks: (0, 0),
        },
    })
}

impl Driver for Qcow2Driver {
    fn driver_name(&self) -> &'static str {
        "qcow2"
    }

    fn size(&self) -> u64 {
        self.header.size
    }

    fn capabilities(&self) -> Capabilities {
        let file = self.file.capabilities();
        Capabilities {
            can_write: !self.read_only,
            can_discard: self.discard,
            can_write_zeroes_fast: true,
            request_alignment: 1,
            max_transfer: 0,
            // Metadata and data both live in the file (and the backing
            // chain): if none of them can block, neither can the image. Its
            // waits (a cluster another writer is allocating, in-flight reads
            // before a free) are on other threads' synchronous calls, never
            // on the runtime, so running inline cannot deadlock.
            nonblocking: file.nonblocking
                && self
                    .backing
                    .as_ref()
                    .is_none_or(|b| b.capabilities().nonblocking),
            // Reads of its data clusters map onto the file (`leased_mapping`).
            maps_page_cache: file.maps_page_cache,
            maps_ring: file.maps_ring,
        }
    }

    /// Reads only, of this layer's data clusters (see `leased_mapping`); a
    /// write must go through `write_at` (COW, refcounts).
    fn map_file(&self, offset: u64, len: u64, access: Access) -> Option<FileMapping<'_>> {
        match access {
            Access::Read if !self.corruption.unusable() => self.leased_mapping(offset, len),
            _ => None,
        }
    }

    fn debug_event(&self, event: DebugEvent) {
        self.f().debug_event(event);
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.guarded(|| self.read(buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.guarded(|| {
            self.generation.wrote();
            self.write(buf, offset)?;
            match fua {
                true => self.flush_all(),
                false => Ok(()),
            }
        })
    }

    /// Reports `flush_to_os` (and `flush_to_disk` after a write) to the
    /// file, as QEMU's block layer does for a flush of the qcow2 node.
    fn flush(&self) -> BlockResult<()> {
        // As QEMU's flush of a node without a driver: nothing to do.
        if self.corruption.unusable() {
            return Ok(());
        }
        let generation = report_flush(self.f(), &self.generation);
        self.flush_all()?;
        self.generation.flushed(generation);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        match self.discard {
            true => self.guarded(|| {
                self.generation.wrote();
                self.discard_range(offset, len)
            }),
            false => Ok(()),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.guarded(|| {
            self.generation.wrote();
            self.zero_range(offset, len, flags)
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.guarded(|| self.status(offset, len))
    }

    fn attach_observer(&self, node_name: &str, observer: Arc<dyn NodeObserver>) {
        self.corruption.attach(node_name, observer);
    }

    fn unusable(&self) -> bool {
        self.corruption.unusable()
    }

    fn bitmap_store(&self) -> Option<&dyn BitmapStore> {
        Some(self)
    }
}

impl BitmapStore for Qcow2Driver {
    fn check_new_persistent_bitmap(&self, name: &str, granularity: u64) -> Result<(), String> {
        self.check_new(name, granularity)
    }

    fn default_bitmap_granularity(&self) -> u64 {
        self.cluster_size().clamp(4096, 65536)
    }

    fn take_loaded_bitmaps(&self) -> Vec<DirtyBitmap> {
        self.take_loaded()
    }

    fn remove_persistent_bitmap(&self, name: &str) -> BlockResult<()> {
        self.remove_stored(name)
    }

    /// Nothing is written to an image found corrupt.
    fn store_persistent_bitmaps(&self, bitmaps: &[Arc<DirtyBitmap>]) -> BlockResult<()> {
        if self.corruption.unusable() {
            return Ok(());
        }
        self.store(bitmaps)
    }

    fn stored_bitmaps(&self) -> Vec<StoredBitmap> {
        self.stored()
    }
}

impl Drop for Qcow2Driver {
    /// Cached metadata reaches the disk on close, as with QEMU's bdrv_close.
    /// Bitmaps no node took (the open failed after this driver's, say on the
    /// backing file) are stored back, so they do not stay flagged in use.
    fn drop(&mut self) {
        if self.read_only || self.corruption.unusable() {
            return;
        }
        let orphans: Vec<Arc<DirtyBitmap>> = self.take_loaded().into_iter().map(Arc::new).collect();
        if !orphans.is_empty() {
            if let Err(e) = self.store(&orphans) {
                tracing::error!(error = %e, "qcow2: storing bitmaps at close failed");
            }
        }
        let _ = self.flush_all();
    }
}
