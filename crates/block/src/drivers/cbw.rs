//! `copy-before-write` (QEMU's block/copy-before-write.c): a filter over
//! `file` that, before a write changes a cluster for the first time, copies
//! the cluster's old contents to `target`. Together with `snapshot-access`
//! (which reads through [`SnapshotSource`]) it serves the point-in-time view
//! of `file` as it was when writes began to pass through the filter
//! (image fleecing): a copied cluster is read from `target`, any other from
//! `file`, which nobody has changed there yet.
//!
//! The filter sees the writes made through it: `blockdev-reopen` puts it
//! between a format node and its file, so that instant is the freeze.
//!
//! Exclusion between a snapshot read of `file` and a write that would
//! change the bytes under it (QEMU's `frozen_read_reqs`): a snapshot read of
//! a cluster not yet copied registers its range; a write first copies its
//! clusters (so later snapshot reads go to `target`), then waits until no
//! registered read overlaps, and only then writes. Everything here is
//! synchronous: drivers run on the blocking pool (or inline, for files that
//! never wait), and every wait is for another thread's copy or read.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::debug_event::DebugEvent;
use crate::driver::{Capabilities, Driver, Extent, ZeroFlags};
use crate::drivers::child::MarkingChild;
use crate::error::{BlockError, BlockErrorKind, BlockResult};
use crate::mapping::{Access, FileMapping};
use crate::node::BlockNode;

/// QEMU's block-copy cluster size when the target has no larger one.
pub const DEFAULT_CLUSTER: u64 = 64 * 1024;

/// `on-cbw-error`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnCbwError {
    /// The guest write fails with the copy's error (QEMU's default).
    #[default]
    BreakGuestWrite,
    /// The snapshot breaks (every snapshot read fails with EACCES from then
    /// on) and the guest write goes on.
    BreakSnapshot,
}

#[derive(Clone, Debug)]
pub struct CbwOptions {
    /// Bytes per copy: max(64 KiB, the target's cluster, `min-cluster-size`).
    pub cluster: u64,
    pub on_error: OnCbwError,
    /// `cbw-timeout`: a copy (with the waits for others' copies) that takes
    /// longer fails with ETIMEDOUT. `None`: no limit.
    pub timeout: Option<Duration>,
    /// The clusters to copy and read (a `bitmap`'s dirty ones); `None`: all.
    pub dirty: Option<Vec<bool>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClusterCopy {
    /// Never needs copying: outside the bitmap, or discarded.
    No,
    Pending,
    InFlight,
    /// In `target` (QEMU's done_bitmap).
    Done,
}

#[derive(Debug)]
struct State {
    copy: Vec<ClusterCopy>,
    /// May the snapshot user read it (QEMU's access_bitmap).
    access: Vec<bool>,
    /// Snapshot reads of `file` in flight: (id, start, end).
    frozen_reads: Vec<(u64, u64, u64)>,
    next_read: u64,
    /// The first copy error, with `break-snapshot` (an errno).
    snapshot_error: Option<i32>,
}

#[derive(Debug)]
pub struct CbwDriver {
    file: MarkingChild,
    target: MarkingChild,
    cluster: u64,
    /// The size of `file` when the filter opened: the snapshot's size.
    frozen_len: u64,
    on_error: OnCbwError,
    timeout: Option<Duration>,
    state: Mutex<State>,
    /// Signalled when a copy ends or a frozen read is done.
    changed: Condvar,
}

/// What `snapshot-access` reads through.
pub trait SnapshotSource: Send + Sync + std::fmt::Debug {
    fn snapshot_len(&self) -> u64;
    fn snapshot_read(&self, buf: &mut [u8], offset: u64) -> BlockResult<()>;
    fn snapshot_block_status(&self, offset: u64, len: u64) -> BlockResult<Extent>;
    fn snapshot_discard(&self, offset: u64, len: u64) -> BlockResult<()>;
}

fn errno_error(errno: i32, what: &str) -> BlockError {
    BlockError::io(what, std::io::Error::from_raw_os_error(errno))
}

/// Unregisters a frozen read when dropped.
struct FrozenRead<'a> {
    cbw: &'a CbwDriver,
    id: u64,
}

impl Drop for FrozenRead<'_> {
    fn drop(&mut self) {
        let mut s = self.cbw.lock();
        s.frozen_reads.retain(|r| r.0 != self.id);
        drop(s);
        self.cbw.changed.notify_all();
    }
}

/// Where one piece of a snapshot read comes from.
enum Source<'a> {
    Target,
    File(FrozenRead<'a>),
}

impl CbwDriver {
    pub fn new(file: Arc<BlockNode>, target: Arc<BlockNode>, options: CbwOptions) -> Self {
        // A format above may have grown its file since the file node
        // opened (whose size is the one at open).
        let frozen_len = file.driver().current_len().unwrap_or(0).max(file.size());
        let n = frozen_len.div_ceil(options.cluster) as usize;
        let copy: Vec<ClusterCopy> = match &options.dirty {
            None => vec![ClusterCopy::Pending; n],
            Some(d) => (0..n)
                .map(|i| match d.get(i).copied().unwrap_or(false) {
                    true => ClusterCopy::Pending,
                    false => ClusterCopy::No,
                })
                .collect(),
        };
        let access = copy.iter().map(|c| *c == ClusterCopy::Pending).collect();
        Self {
            file: MarkingChild::new(file),
            target: MarkingChild::new(target),
            cluster: options.cluster,
            frozen_len,
            on_error: options.on_error,
            timeout: options.timeout,
            state: Mutex::new(State {
                copy,
                access,
                frozen_reads: Vec::new(),
                next_read: 0,
                snapshot_error: None,
            }),
            changed: Condvar::new(),
        }
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// Every update of the state is whole under the lock, so a poisoned
    /// lock still guards consistent state.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The clusters covering `[offset, offset + len)` within the snapshot.
    fn clusters(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let n = self.frozen_len.div_ceil(self.cluster) as usize;
        let first = ((offset / self.cluster) as usize).min(n);
        let end = ((offset.saturating_add(len)).div_ceil(self.cluster) as usize).min(n);
        first..end
    }

    fn cluster_range(&self, idx: usize) -> (u64, u64) {
        let offset = idx as u64 * self.cluster;
        (offset, self.cluster.min(self.frozen_len - offset))
    }

    /// Waits on the condition variable, up to `deadline`.
    fn wait<'a>(
        &self,
        s: MutexGuard<'a, State>,
        deadline: Option<Instant>,
    ) -> BlockResult<MutexGuard<'a, State>> {
        match deadline {
            None => Ok(self.changed.wait(s).unwrap_or_else(|e| e.into_inner())),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(errno_error(libc::ETIMEDOUT, "copy-before-write"));
                }
                let (s, _) = self
                    .changed
                    .wait_timeout(s, left)
                    .unwrap_or_else(|e| e.into_inner());
                Ok(s)
            }
        }
    }

    /// Copies the clusters of the range that still need it (waiting for
    /// those another write is copying).
    fn copy_range(
        &self,
        range: std::ops::Range<usize>,
        deadline: Option<Instant>,
    ) -> BlockResult<()> {
        for idx in range {
            let mut s = self.lock();
            loop {
                match s.copy[idx] {
                    ClusterCopy::No | ClusterCopy::Done => break,
                    ClusterCopy::InFlight => s = self.wait(s, deadline)?,
                    ClusterCopy::Pending => {
                        s.copy[idx] = ClusterCopy::InFlight;
                        drop(s);
                        let r = self.copy_cluster(idx);
                        let timed_out = deadline.is_some_and(|d| Instant::now() > d);
                        let mut s = self.lock();
                        s.copy[idx] = match (&r, s.copy[idx]) {
                            // Discarded meanwhile: nobody needs it any more.
                            (_, ClusterCopy::No) => ClusterCopy::No,
                            (Ok(()), _) => ClusterCopy::Done,
                            (Err(_), _) => ClusterCopy::Pending,
                        };
                        drop(s);
                        self.changed.notify_all();
                        r?;
                        if timed_out {
                            return Err(errno_error(libc::ETIMEDOUT, "copy-before-write"));
                        }
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn copy_cluster(&self, idx: usize) -> BlockResult<()> {
        // Always the bytes: a file's block status past its size at open
        // says hole where a format above has since written.
        let (offset, len) = self.cluster_range(idx);
        let mut buf = vec![0u8; len as usize];
        self.file.read_at(&mut buf, offset)?;
        self.target.write_at(&buf, offset, false)
    }

    /// QEMU's cbw_do_copy_before_write: the old contents go first; then no
    /// snapshot read of `file` may still be reading the range.
    fn before_write(&self, offset: u64, len: u64) -> BlockResult<()> {
        if self.lock().snapshot_error.is_some() {
            return Ok(());
        }
        let range = self.clusters(offset, len);
        if range.is_empty() {
            return Ok(());
        }
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let copied = self.copy_range(range.clone(), deadline);
        if let Err(e) = &copied {
            if self.on_error == OnCbwError::BreakGuestWrite {
                return copied;
            }
            let mut s = self.lock();
            s.snapshot_error.get_or_insert(e.errno());
        }
        let (start, end) = (
            range.start as u64 * self.cluster,
            range.end as u64 * self.cluster,
        );
        let mut s = self.lock();
        while s.frozen_reads.iter().any(|r| r.1 < end && start < r.2) {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }

    /// QEMU's cbw_snapshot_read_lock: where the first part of the range
    /// comes from, and its length. EACCES when any of it is not readable.
    fn snapshot_lock(&self, offset: u64, len: u64) -> BlockResult<(Source<'_>, u64)> {
        if len == 0 {
            return Ok((Source::Target, 0));
        }
        let mut s = self.lock();
        let denied = || errno_error(libc::EACCES, "snapshot-access");
        if s.snapshot_error.is_some() {
            return Err(denied());
        }
        let range = self.clusters(offset, len);
        if offset + len > self.frozen_len || !s.access[range.clone()].iter().all(|a| *a) {
            return Err(denied());
        }
        let done = s.copy[range.start] == ClusterCopy::Done;
        let same = s.copy[range.clone()]
            .iter()
            .take_while(|c| (**c == ClusterCopy::Done) == done)
            .count();
        let run_end = ((range.start + same) as u64 * self.cluster).min(offset + len);
        let run = run_end - offset;
        if done {
            return Ok((Source::Target, run));
        }
        let id = s.next_read;
        s.next_read += 1;
        s.frozen_reads.push((id, offset, offset + len));
        Ok((Source::File(FrozenRead { cbw: self, id }), run))
    }
}

impl SnapshotSource for CbwDriver {
    fn snapshot_len(&self) -> u64 {
        self.frozen_len
    }

    /// Past the snapshot's end reads zeroes, as QEMU's block layer reads
    /// past a node's end (a format's last cluster may end beyond its file).
    fn snapshot_read(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let inside = self.frozen_len.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (buf, past) = buf.split_at_mut(inside);
        past.fill(0);
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (source, run) = self.snapshot_lock(at, (buf.len() - done) as u64)?;
            let part = &mut buf[done..done + run as usize];
            match source {
                Source::Target => self.target.read_at(part, at)?,
                Source::File(_read) => self.file.read_at(part, at)?,
            }
            done += run as usize;
        }
        Ok(())
    }

    fn snapshot_block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        let (source, run) = self.snapshot_lock(offset, len)?;
        match source {
            // Only what was written there is read from the target: data.
            Source::Target => Ok(Extent {
                len: run,
                allocated: true,
                zero: false,
                depth: 1,
            }),
            Source::File(_read) => {
                let mut e = self.file.block_status(offset, run)?;
                e.len = e.len.min(run);
                Ok(e)
            }
        }
    }

    /// QEMU's cbw_co_pdiscard_snapshot: whole clusters inside the range
    /// are given up: no longer copied, no longer readable.
    fn snapshot_discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        let start = offset.div_ceil(self.cluster);
        let end = (offset + len) / self.cluster;
        if end <= start {
            return Ok(());
        }
        let range = self.clusters(start * self.cluster, (end - start) * self.cluster);
        {
            let mut s = self.lock();
            for idx in range.clone() {
                s.access[idx] = false;
                if s.copy[idx] == ClusterCopy::Pending || s.copy[idx] == ClusterCopy::InFlight {
                    s.copy[idx] = ClusterCopy::No;
                }
            }
        }
        self.changed.notify_all();
        let at = range.start as u64 * self.cluster;
        let end = (range.end as u64 * self.cluster).min(self.frozen_len);
        self.target.discard(at, end - at)
    }
}

impl Driver for CbwDriver {
    fn driver_name(&self) -> &'static str {
        "copy-before-write"
    }

    /// The file's size now (a format above may grow it); the snapshot
    /// keeps the size at open.
    fn size(&self) -> u64 {
        self.file.size()
    }

    fn current_len(&self) -> Option<u64> {
        self.file.current_len()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            maps_page_cache: false,
            maps_ring: false,
            nonblocking: false,
            ..self.file.capabilities()
        }
    }

    fn debug_event(&self, event: DebugEvent) {
        self.file.debug_event(event);
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.file.read_at(buf, offset)
    }

    fn try_read_now(&self, buf: &mut [u8], offset: u64) -> Option<BlockResult<()>> {
        self.file.try_read_now(buf, offset)
    }

    /// Reads only: every write must pass the copy.
    fn map_file(&self, offset: u64, len: u64, access: Access) -> Option<FileMapping<'_>> {
        match access {
            Access::Read => self.file.map_file(offset, len, access),
            Access::Write => None,
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.before_write(offset, buf.len() as u64)?;
        self.file.write_at(buf, offset, fua)
    }

    fn flush(&self) -> BlockResult<()> {
        self.file.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.before_write(offset, len)?;
        self.file.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.before_write(offset, len)?;
        self.file.write_zeroes(offset, len, flags)
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.file.block_status(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.file.cache(offset, len)
    }
}

/// `snapshot-access`: the point-in-time view a copy-before-write node
/// keeps, read-only (writes fail with ENOTSUP, as in QEMU); a discard gives
/// ranges up. Over any other node every request fails with ENOTSUP.
#[derive(Debug)]
pub struct SnapshotAccessDriver {
    file: Arc<BlockNode>,
    source: Option<Arc<dyn SnapshotSource>>,
    /// `discard=unmap`: without it QEMU's block layer drops discards.
    discard: bool,
}

fn not_supported() -> BlockError {
    BlockError::new(
        BlockErrorKind::NotSupported,
        "snapshot-access: operation not supported",
    )
}

impl SnapshotAccessDriver {
    pub fn new(
        file: Arc<BlockNode>,
        source: Option<Arc<dyn SnapshotSource>>,
        discard: bool,
    ) -> Self {
        Self {
            file,
            source,
            discard,
        }
    }

    fn source(&self) -> BlockResult<&dyn SnapshotSource> {
        self.source.as_deref().ok_or_else(not_supported)
    }
}

impl Driver for SnapshotAccessDriver {
    fn driver_name(&self) -> &'static str {
        "snapshot-access"
    }

    fn size(&self) -> u64 {
        match &self.source {
            Some(s) => s.snapshot_len(),
            None => self.file.size(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            can_write: true,
            can_discard: self.discard,
            can_write_zeroes_fast: false,
            request_alignment: 1,
            max_transfer: 0,
            nonblocking: false,
            maps_page_cache: false,
            maps_ring: false,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.source()?.snapshot_read(buf, offset)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> BlockResult<()> {
        Err(not_supported())
    }

    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.source()?.snapshot_discard(offset, len)
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> BlockResult<()> {
        Err(not_supported())
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.source()?.snapshot_block_status(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::MemDriver;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn mem(name: &str, size: usize, fill: u8) -> Arc<BlockNode> {
        let d = MemDriver::new(size);
        d.write_at(&vec![fill; size], 0, false).unwrap();
        Arc::new(BlockNode::new(name.into(), Arc::new(d), false))
    }

    fn options(cluster: u64) -> CbwOptions {
        CbwOptions {
            cluster,
            on_error: OnCbwError::BreakGuestWrite,
            timeout: None,
            dirty: None,
        }
    }

    #[test]
    fn test_snapshot_read_after_write_returns_old_data() {
        let file = mem("f", 1 << 20, 1);
        let cbw = CbwDriver::new(file.clone(), mem("t", 1 << 20, 0), options(65536));
        cbw.write_at(&[2; 4096], 65536 + 512, false).unwrap();
        let mut live = vec![0; 4096];
        cbw.read_at(&mut live, 65536 + 512).unwrap();
        assert_eq!(live, vec![2; 4096]);
        let mut snap = vec![0; 3 * 65536];
        cbw.snapshot_read(&mut snap, 0).unwrap();
        assert!(snap.iter().all(|b| *b == 1), "the snapshot is the old data");
    }

    #[test]
    fn test_write_waits_for_a_frozen_read_of_its_range() {
        let file = mem("f", 1 << 20, 1);
        let cbw = Arc::new(CbwDriver::new(file, mem("t", 1 << 20, 0), options(65536)));
        // A snapshot read of the file holds its range...
        let (source, run) = cbw.snapshot_lock(0, 65536).unwrap();
        assert!(matches!(source, Source::File(_)));
        assert_eq!(run, 65536);
        let written = Arc::new(AtomicBool::new(false));
        let writer = {
            let (cbw, written) = (cbw.clone(), written.clone());
            std::thread::spawn(move || {
                cbw.write_at(&[2; 512], 0, false).unwrap();
                written.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        // ...so the write has copied the old data but not yet written.
        assert!(
            !written.load(Ordering::SeqCst),
            "the write waited for the read"
        );
        assert_eq!(cbw.lock().copy[0], ClusterCopy::Done);
        let mut still = vec![0; 512];
        cbw.file.read_at(&mut still, 0).unwrap();
        assert_eq!(still, vec![1; 512]);
        drop(source);
        writer.join().unwrap();
        assert!(written.load(Ordering::SeqCst));
        // New snapshot reads of the range come from the target.
        let (source, _) = cbw.snapshot_lock(0, 512).unwrap();
        assert!(matches!(source, Source::Target));
    }

    #[test]
    fn test_discard_and_bitmap_limit_what_is_readable() {
        let file = mem("f", 1 << 20, 1);
        let mut o = options(65536);
        o.dirty = Some(vec![true, true, false]);
        let cbw = CbwDriver::new(file, mem("t", 1 << 20, 0), o);
        let mut buf = vec![0; 65536];
        assert_eq!(
            cbw.snapshot_read(&mut buf, 2 * 65536).unwrap_err().errno(),
            libc::EACCES
        );
        cbw.snapshot_read(&mut buf, 65536).unwrap();
        // Only whole clusters inside the range are given up.
        cbw.snapshot_discard(100, 65536).unwrap();
        cbw.snapshot_read(&mut buf, 0).unwrap();
        cbw.snapshot_discard(0, 65536).unwrap();
        assert_eq!(
            cbw.snapshot_read(&mut buf, 0).unwrap_err().errno(),
            libc::EACCES
        );
        // A write to a discarded or clean cluster copies nothing.
        cbw.write_at(&[2; 512], 0, false).unwrap();
        cbw.write_at(&[2; 512], 2 * 65536, false).unwrap();
        assert_eq!(
            cbw.lock().copy[..3],
            [ClusterCopy::No, ClusterCopy::Pending, ClusterCopy::No]
        );
    }
}
