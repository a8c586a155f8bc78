//! The mutable metadata of an open image (L1 table, L2 and refcount caches,
//! refcount table) and the one place that writes it back.
//!
//! Write order on flush, which is what makes a kill at any moment safe:
//! 1. refcount blocks (increments for new clusters), then sync: data written
//!    earlier is durable too, so no L2 entry can point at unwritten data;
//! 2. L2 tables, then sync, so no L1 entry points at an unwritten table;
//! 3. the L1 table, then sync;
//! 4. only now refcount decrements of clusters that steps 2 and 3 stopped
//!    referencing, then sync. Freed clusters are reusable only after this.
//!
//! A crash between steps leaves clusters with a refcount but no reference
//! (leaks, which `qemu-img check -r leaks` reclaims), never the reverse.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::debug_event::DebugEvent;
use crate::driver::Driver;
use crate::error::{BlockError, BlockErrorKind, BlockResult};

use super::cache::TableCache;
use super::l2::{l2_offset, Geometry, L2Entry, COPIED, OFFSET_MASK};
use super::overlap::{unaligned_data_cluster, unaligned_l2_table};

#[derive(Debug)]
pub struct Meta {
    pub geom: Geometry,
    pub refcount_order: u32,
    pub l1: Vec<u64>,
    pub l1_offset: u64,
    /// L1 indices changed in memory and not yet written.
    pub l1_dirty: BTreeSet<usize>,
    pub l2_cache: TableCache,
    pub rc_table: Vec<u64>,
    pub rc_table_offset: u64,
    pub rc_table_clusters: u32,
    pub rc_cache: TableCache,
    /// No free cluster lies below this cluster index.
    pub free_hint: u64,
    /// Ranges whose references are gone in memory: their refcounts drop
    /// after the next flush has written the tables without them.
    pub pending_frees: Vec<(u64, u64)>,
    /// Host offsets whose refcount reached 0 during the last flush, to discard.
    pub freed: Vec<u64>,
    /// Guest clusters an allocating write is filling; other writers and
    /// zeroing wait for them.
    pub busy: HashSet<u64>,
    /// Reads and in-place writes that mapped under the lock and are still
    /// doing their I/O. Their mappings may name clusters that were just
    /// freed, so refcount decrements (which make clusters reusable) wait
    /// until none are left.
    pub in_flight: Arc<AtomicUsize>,
    /// Reads whose mapping went out as a file range (`sendfile` from the
    /// page cache): they last until the reply is sent, which a slow client
    /// can make long, so frees do not wait for them as for `in_flight` but
    /// stay pending until a flush finds none.
    pub leased: Arc<AtomicUsize>,
    pub clean: CleanState,
    /// Host offsets from here on have never been written since open (past
    /// the file's end then, and never allocated since), so they read as
    /// zeroes: a partial write into such a new cluster needs no zero fill.
    pub untouched_from: u64,
}

/// When the caches were last trimmed, for `cache-clean-interval`.
#[derive(Debug)]
pub struct CleanState {
    pub interval: Option<Duration>,
    pub at: Instant,
    /// The caches' use counters at that time.
    pub ticks: (u64, u64),
}

/// How long (in 100 us steps) a flush waits for in-flight I/O before it
/// leaves refcount decrements for the next flush.
const FREE_DRAIN_TRIES: u32 = 100;

fn corrupt(msg: String) -> BlockError {
    BlockError::new(BlockErrorKind::Corrupt, msg)
}

impl Meta {
    /// Drops clean cache entries unused for a whole `cache-clean-interval`.
    pub fn maybe_clean(&mut self) {
        let Some(interval) = self.clean.interval else {
            return;
        };
        if self.clean.at.elapsed() < interval {
            return;
        }
        self.l2_cache.drop_clean_older_than(self.clean.ticks.0);
        self.rc_cache.drop_clean_older_than(self.clean.ticks.1);
        self.clean.ticks = (self.l2_cache.tick(), self.rc_cache.tick());
        self.clean.at = Instant::now();
    }

    /// The L2 entry of a guest offset (all zero when no L2 table exists).
    pub fn lookup(&mut self, f: &dyn Driver, guest: u64) -> BlockResult<L2Entry> {
        let (l1i, l2i) = self.geom.split(guest);
        let Some(&l1e) = self.l1.get(l1i as usize) else {
            return Ok(L2Entry::default());
        };
        let cs = self.geom.cluster_size();
        let table = l1e & OFFSET_MASK;
        if !table.is_multiple_of(cs) {
            return Err(unaligned_l2_table(table, l1i));
        }
        if table == 0 {
            return Ok(L2Entry::default());
        }
        self.load_l2(f, table)?;
        let geom = self.geom;
        let e = self
            .l2_cache
            .get(table)
            .map_or(L2Entry::default(), |t| geom.read_entry(t, l2i));
        // QEMU checks every entry with a data cluster, allocated or not.
        let host = e.host_offset();
        if !e.is_compressed() && !host.is_multiple_of(cs) {
            return Err(unaligned_data_cluster(host, table, l2i as u64));
        }
        Ok(e)
    }

    /// True if `lookup` of `guest` reads nothing from the file: its L2 table
    /// is cached, or it has none.
    pub fn lookup_is_cached(&self, guest: u64) -> bool {
        let (l1i, _) = self.geom.split(guest);
        let Some(&l1e) = self.l1.get(l1i as usize) else {
            return true;
        };
        match l2_offset(l1e, self.geom.cluster_size()) {
            Ok(0) | Err(_) => true,
            Ok(table) => self.l2_cache.contains(table),
        }
    }

    /// True if the L1 entry for `guest` says its L2 table may be changed in place.
    pub fn l2_writable(&self, guest: u64) -> bool {
        let (l1i, _) = self.geom.split(guest);
        self.l1
            .get(l1i as usize)
            .is_some_and(|&e| e & COPIED != 0 && e & OFFSET_MASK != 0)
    }

    pub fn load_l2(&mut self, f: &dyn Driver, offset: u64) -> BlockResult<()> {
        if self.l2_cache.contains(offset) {
            return Ok(());
        }
        self.make_room_l2(f)?;
        let mut data = vec![0u8; self.geom.cluster_size() as usize];
        f.debug_event(DebugEvent::L2Load);
        f.read_at(&mut data, offset)?;
        self.l2_cache.insert(offset, data, false);
        Ok(())
    }

    /// Evicting a dirty L2 table must respect the write order, so it writes everything.
    fn make_room_l2(&mut self, f: &dyn Driver) -> BlockResult<()> {
        if !self.l2_cache.full() {
            return Ok(());
        }
        if let Some((victim, dirty)) = self.l2_cache.victim() {
            if dirty {
                self.flush(f)?;
            }
            self.l2_cache.remove(victim);
        }
        Ok(())
    }

    /// The L2 table for `guest`, made private to the active L1: allocated if
    /// missing, copied if shared with a snapshot. Returns its host offset.
    pub fn writable_l2(&mut self, f: &dyn Driver, guest: u64) -> BlockResult<u64> {
        let (l1i, _) = self.geom.split(guest);
        let l1i = l1i as usize;
        let l1e = *self
            .l1
            .get(l1i)
            .ok_or_else(|| corrupt(format!("qcow2: L1 index {l1i} out of range")))?;
        let old = l2_offset(l1e, self.geom.cluster_size())?;
        if old != 0 && l1e & COPIED != 0 {
            self.load_l2(f, old)?;
            return Ok(old);
        }
        let contents = match old {
            0 => vec![0u8; self.geom.cluster_size() as usize],
            _ => {
                self.load_l2(f, old)?;
                self.l2_cache
                    .get(old)
                    .map(<[u8]>::to_vec)
                    .ok_or_else(|| corrupt("qcow2: L2 table vanished from the cache".into()))?
            }
        };
        let new = self.alloc_clusters(f, 1)?;
        self.make_room_l2(f)?;
        self.l2_cache.insert(new, contents, true);
        self.l1[l1i] = new | COPIED;
        self.l1_dirty.insert(l1i);
        if old != 0 {
            self.pending_frees.push((old, self.geom.cluster_size()));
        }
        Ok(new)
    }

    /// Sets the L2 entry of `guest` (its table must be writable, see `writable_l2`).
    pub fn set_entry(&mut self, f: &dyn Driver, guest: u64, e: L2Entry) -> BlockResult<()> {
        let table = self.writable_l2(f, guest)?;
        let (_, l2i) = self.geom.split(guest);
        let geom = self.geom;
        let t = self
            .l2_cache
            .get_mut(table)
            .ok_or_else(|| corrupt("qcow2: L2 table vanished from the cache".into()))?;
        geom.write_entry(t, l2i, e);
        Ok(())
    }

    /// Queues the references an entry held, to be dropped after the next flush.
    pub fn free_entry(&mut self, old: L2Entry) {
        if old.is_compressed() {
            if let Some(span) = old.compressed_span(&self.geom) {
                self.pending_frees.push(span);
            }
        } else if old.host_offset() != 0 {
            self.pending_frees
                .push((old.host_offset(), self.geom.cluster_size()));
        }
    }

    pub fn is_dirty(&self) -> bool {
        self.rc_cache.is_dirty() || self.l2_cache.is_dirty() || !self.l1_dirty.is_empty()
    }

    fn frees_ready(&self) -> bool {
        !self.pending_frees.is_empty()
    }

    /// Waits (briefly, holding the lock so no new I/O maps) for mapped I/O to
    /// finish; true if none is left. I/O in flight never needs this lock.
    fn drain_in_flight(&self) -> bool {
        for _ in 0..FREE_DRAIN_TRIES {
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        false
    }

    /// Writes all metadata in the safe order (module docs). Returns true if anything was written.
    pub fn flush(&mut self, f: &dyn Driver) -> BlockResult<bool> {
        if !self.is_dirty() && !self.frees_ready() {
            return Ok(false);
        }
        self.write_rc_blocks(f)?;
        f.flush()?;
        let l2 = self.l2_cache.dirty();
        for (off, data) in &l2 {
            f.debug_event(DebugEvent::L2Update);
            f.write_at(data, *off, false)?;
        }
        if !l2.is_empty() {
            f.flush()?;
            l2.iter()
                .for_each(|(off, _)| self.l2_cache.mark_clean(*off));
        }
        if !self.l1_dirty.is_empty() {
            self.write_l1(f)?;
            f.flush()?;
        }
        // I/O is counted under this lock, so none in flight means no stale mapping.
        let leased = self.leased.load(Ordering::Acquire) != 0;
        let frees = match !self.pending_frees.is_empty() && !leased && self.drain_in_flight() {
            true => std::mem::take(&mut self.pending_frees),
            false => Vec::new(),
        };
        if !frees.is_empty() {
            for (off, len) in frees {
                if let Err(e) = self.release(f, off, len) {
                    // A refcount that would go below zero: keep going, it only leaks.
                    tracing::warn!("qcow2: {e}");
                }
            }
            self.write_rc_blocks(f)?;
            f.flush()?;
        }
        Ok(true)
    }

    fn write_rc_blocks(&mut self, f: &dyn Driver) -> BlockResult<()> {
        for (off, data) in self.rc_cache.dirty() {
            f.debug_event(DebugEvent::RefblockUpdatePart);
            f.write_at(&data, off, false)?;
            self.rc_cache.mark_clean(off);
        }
        Ok(())
    }

    /// Writes the 512-byte sectors of L1 that hold changed entries.
    fn write_l1(&mut self, f: &dyn Driver) -> BlockResult<()> {
        let sectors: BTreeSet<usize> = self.l1_dirty.iter().map(|i| i / 64).collect();
        for s in sectors {
            let first = s * 64;
            let last = (first + 64).min(self.l1.len());
            let bytes: Vec<u8> = self.l1[first..last]
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            f.debug_event(DebugEvent::L1Update);
            f.write_at(&bytes, self.l1_offset + first as u64 * 8, false)?;
        }
        self.l1_dirty.clear();
        Ok(())
    }
}
