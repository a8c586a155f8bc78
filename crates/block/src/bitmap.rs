//! Dirty bitmaps: which parts of a node were written since the bitmap was
//! created or last cleared, one bit per `granularity` bytes.
//!
//! A node owns its bitmaps ([`BitmapSet`]); the node marks every enabled one
//! after each write, write-zeroes or discard and before the request is
//! acknowledged, so a client that saw its write complete finds it in the
//! bitmap. Marking is done whether or not the driver call succeeded: a failed
//! write may still have changed part of the range, as QEMU reasons too.
//! Marking after the write (not before) means a `clear` racing with a write
//! can only leave an extra dirty granule, never lose a written one.
//!
//! Bitmaps live in memory while the node is open. A persistent one on a
//! qcow2 node is loaded at open and stored at close by the driver (see
//! `drivers/qcow2/bitmaps.rs`); one that was not stored cleanly (the image
//! says "in use") comes back *inconsistent*: it has no bits and can only be
//! removed, as in QEMU. Bitmaps of an image opened read-only are *readonly*.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

/// Smallest and largest granularities QEMU accepts.
pub const MIN_GRANULARITY: u64 = 512;
pub const MAX_GRANULARITY: u64 = 1 << 31;
/// What QEMU uses for nodes without a cluster size (raw, file, null-co).
pub const DEFAULT_GRANULARITY: u64 = 64 * 1024;

#[derive(Debug)]
struct State {
    words: Vec<u64>,
    /// Recording: writes mark it.
    enabled: bool,
    /// Used by an export or a pending transaction: most commands refuse it.
    busy: bool,
}

/// One named dirty bitmap.
#[derive(Debug)]
pub struct DirtyBitmap {
    name: String,
    granularity: u64,
    /// Size of the node it covers, in bytes.
    size: u64,
    persistent: bool,
    /// Loaded from an image that was not closed cleanly: its bits are lost.
    inconsistent: bool,
    /// Loaded from an image opened read-only: it cannot change.
    readonly: bool,
    state: Mutex<State>,
}

impl DirtyBitmap {
    /// A clean bitmap. `granularity` must be a power of two (callers check
    /// the QMP rules first; a bad value is rounded up rather than trusted).
    pub fn new(name: String, size: u64, granularity: u64, enabled: bool, persistent: bool) -> Self {
        let granularity = granularity.clamp(1, MAX_GRANULARITY).next_power_of_two();
        let bits = size.div_ceil(granularity);
        let words = vec![0u64; bits.div_ceil(64) as usize];
        Self::new_with_words(name, size, granularity, enabled, persistent, words)
    }

    /// A bitmap with given contents (a loaded persistent bitmap, a restore).
    pub fn new_with_words(
        name: String,
        size: u64,
        granularity: u64,
        enabled: bool,
        persistent: bool,
        mut words: Vec<u64>,
    ) -> Self {
        let bits = size.div_ceil(granularity);
        words.resize(bits.div_ceil(64) as usize, 0);
        Self {
            name,
            granularity,
            size,
            persistent,
            inconsistent: false,
            readonly: false,
            state: Mutex::new(State {
                words,
                enabled,
                busy: false,
            }),
        }
    }

    /// A persistent bitmap whose stored bits cannot be trusted (QEMU's
    /// "inconsistent"): empty, not recording.
    pub fn inconsistent(name: String, size: u64, granularity: u64) -> Self {
        let mut b = Self::new(name, size, granularity, false, true);
        b.inconsistent = true;
        b
    }

    /// Marks a loaded bitmap as belonging to a read-only image.
    pub fn into_readonly(mut self) -> Self {
        self.readonly = true;
        self
    }

    pub fn is_inconsistent(&self) -> bool {
        self.inconsistent
    }

    pub fn is_readonly(&self) -> bool {
        self.readonly
    }

    /// The bits and flags, locked, poisoned or not: every write marks here,
    /// and a holder that panicked can only have left extra granules set (a
    /// mark or merge cut short sets fewer of the bits it meant to set, a
    /// clear cut short clears fewer) or a flag unchanged. Extra dirty
    /// granules cost a backup some bytes; they never hide a write.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn persistent(&self) -> bool {
        self.persistent
    }

    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    pub fn set_enabled(&self, enabled: bool) {
        self.lock().enabled = enabled;
    }

    pub fn busy(&self) -> bool {
        self.lock().busy
    }

    pub fn set_busy(&self, busy: bool) {
        self.lock().busy = busy;
    }

    /// Marks `[offset, offset+len)` dirty if the bitmap is recording.
    pub fn mark(&self, offset: u64, len: u64) {
        let mut s = self.lock();
        if s.enabled {
            set_bits(&mut s.words, self.bit_range(offset, len));
        }
    }

    /// Marks a range dirty whether or not the bitmap is recording (merges).
    pub fn set_range(&self, offset: u64, len: u64) {
        set_bits(&mut self.lock().words, self.bit_range(offset, len));
    }

    /// The bits that a byte range touches, clipped to the bitmap.
    fn bit_range(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return 0..0;
        }
        offset / self.granularity..end.div_ceil(self.granularity)
    }

    pub fn clear(&self) {
        self.lock().words.fill(0);
    }

    /// Dirty bytes, counting whole granules as QEMU does.
    pub fn count(&self) -> u64 {
        let ones: u64 = self
            .lock()
            .words
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        ones.saturating_mul(self.granularity)
    }

    /// A copy of the bits (for undo, and for persistence).
    pub fn words(&self) -> Vec<u64> {
        self.lock().words.clone()
    }

    /// Takes the bits, leaving the bitmap clean, in one step: no write
    /// marked meanwhile is lost (a backup freezes its sync bitmap so).
    pub fn take_words(&self) -> Vec<u64> {
        let mut s = self.lock();
        let clean = vec![0; s.words.len()];
        std::mem::replace(&mut s.words, clean)
    }

    pub fn restore_words(&self, words: Vec<u64>) {
        let mut s = self.lock();
        if words.len() == s.words.len() {
            s.words = words;
        }
    }

    /// ORs `source` into this bitmap; granularities may differ.
    pub fn merge_from(&self, source: &DirtyBitmap) -> Result<(), MergeError> {
        if source.size != self.size {
            return Err(MergeError {
                target_size: self.size,
                source_size: source.size,
            });
        }
        let runs = source.extents(0, source.size, usize::MAX);
        let mut offset = 0;
        for (len, dirty) in runs {
            if dirty {
                self.set_range(offset, len);
            }
            offset += len;
        }
        Ok(())
    }

    /// Runs of equal state covering `[offset, offset+len)` clipped to the
    /// bitmap's size: (length, dirty). At most `max` runs; the last one may
    /// then end short of the range.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(len).min(self.size);
        let s = self.lock();
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end && runs.len() < max {
            let bit = pos / self.granularity;
            let dirty = get_bit(&s.words, bit);
            let next = next_change(&s.words, bit, dirty, end.div_ceil(self.granularity));
            let run_end = next.saturating_mul(self.granularity).min(end);
            runs.push((run_end - pos, dirty));
            pos = run_end;
        }
        runs
    }
}

/// QEMU's refusal to merge bitmaps of different node sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Bitmaps are of different sizes (destination size is {target_size}, source size is {source_size}) and can't be merged")]
pub struct MergeError {
    pub target_size: u64,
    pub source_size: u64,
}

fn get_bit(words: &[u64], bit: u64) -> bool {
    words
        .get((bit / 64) as usize)
        .is_some_and(|w| w & (1 << (bit % 64)) != 0)
}

/// The first bit at or after `bit` (below `limit`) whose state is not `state`; `limit` if none.
fn next_change(words: &[u64], bit: u64, state: bool, limit: u64) -> u64 {
    let mut b = bit;
    while b < limit {
        let Some(&w) = words.get((b / 64) as usize) else {
            return limit;
        };
        let w = if state { !w } else { w };
        let masked = w & (u64::MAX << (b % 64));
        if masked != 0 {
            return ((b / 64) * 64 + u64::from(masked.trailing_zeros())).min(limit);
        }
        b = (b / 64 + 1) * 64;
    }
    limit
}

fn set_bits(words: &mut [u64], bits: std::ops::Range<u64>) {
    let mut b = bits.start;
    while b < bits.end {
        let Some(w) = words.get_mut((b / 64) as usize) else {
            return;
        };
        let lo = b % 64;
        let hi = (bits.end - (b - lo)).min(64);
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        *w |= mask;
        b = b - lo + 64;
    }
}

/// A node's bitmaps, newest first (the order QEMU lists them in).
#[derive(Debug, Default)]
pub struct BitmapSet {
    list: RwLock<Vec<Arc<DirtyBitmap>>>,
}

impl BitmapSet {
    pub fn find(&self, name: &str) -> Option<Arc<DirtyBitmap>> {
        self.read().iter().find(|b| b.name() == name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<DirtyBitmap>> {
        self.read().clone()
    }

    /// Adds a bitmap; `false` if one of that name exists.
    pub fn insert(&self, bitmap: Arc<DirtyBitmap>) -> bool {
        let mut list = self.write();
        if list.iter().any(|b| b.name() == bitmap.name()) {
            return false;
        }
        list.insert(0, bitmap);
        true
    }

    pub fn remove(&self, name: &str) -> Option<Arc<DirtyBitmap>> {
        let mut list = self.write();
        let i = list.iter().position(|b| b.name() == name)?;
        Some(list.remove(i))
    }

    /// Marks every recording bitmap: the write path.
    pub fn mark(&self, offset: u64, len: u64) {
        for b in self.read().iter() {
            b.mark(offset, len);
        }
    }

    /// The list, poisoned or not: it changes only by one insert or remove,
    /// which a panic cannot leave half-done, and every write reads it.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<DirtyBitmap>>> {
        self.list.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// As [`Self::read`], for the two changes.
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<DirtyBitmap>>> {
        self.list.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Holds a bitmap busy (an export using it) until dropped.
#[derive(Debug)]
pub struct BitmapLease(Arc<DirtyBitmap>);

impl BitmapLease {
    pub fn new(bitmap: Arc<DirtyBitmap>) -> Self {
        bitmap.set_busy(true);
        Self(bitmap)
    }

    pub fn bitmap(&self) -> &Arc<DirtyBitmap> {
        &self.0
    }
}

impl Drop for BitmapLease {
    fn drop(&mut self) {
        self.0.set_busy(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bm(size: u64, gran: u64) -> DirtyBitmap {
        DirtyBitmap::new("b".into(), size, gran, true, false)
    }

    #[test]
    fn test_mark_rounds_out_to_granules() {
        let b = bm(1 << 20, 65536);
        b.mark(65535, 2);
        assert_eq!(
            b.extents(0, 1 << 20, 10),
            vec![(131072, true), ((1 << 20) - 131072, false)]
        );
        assert_eq!(b.count(), 131072);
    }

    #[test]
    fn test_disabled_bitmap_ignores_writes_but_merge_sets() {
        let b = bm(1 << 20, 4096);
        b.set_enabled(false);
        b.mark(0, 4096);
        assert_eq!(b.count(), 0);
        let src = bm(1 << 20, 65536);
        src.mark(8192, 1);
        b.merge_from(&src).unwrap();
        assert_eq!(b.extents(0, 1 << 20, 10)[0], (65536, true));
        assert_eq!(b.count(), 65536);
    }

    #[test]
    fn test_extents_clip_to_size_and_range() {
        let b = bm(100_000, 65536);
        b.mark(99_999, 1);
        assert_eq!(
            b.extents(0, 200_000, 10),
            vec![(65536, false), (100_000 - 65536, true)]
        );
        assert_eq!(b.extents(70_000, 10, 10), vec![(10, true)]);
        assert_eq!(b.extents(0, 100_000, 1), vec![(65536, false)]);
    }

    #[test]
    fn test_long_runs_cross_words() {
        let b = bm(1 << 30, 512);
        b.mark(512 * 60, 512 * 200);
        assert_eq!(
            b.extents(0, 1 << 30, 10),
            vec![
                (512 * 60, false),
                (512 * 200, true),
                ((1 << 30) - 512 * 260, false)
            ]
        );
        assert_eq!(b.count(), 512 * 200);
    }

    #[test]
    fn test_merge_refuses_other_sizes() {
        let e = bm(1 << 20, 512).merge_from(&bm(1 << 21, 512)).unwrap_err();
        assert_eq!(e.to_string(), "Bitmaps are of different sizes (destination size is 1048576, source size is 2097152) and can't be merged");
    }

    #[test]
    fn test_out_of_range_marks_are_ignored() {
        let b = bm(4096, 512);
        b.mark(u64::MAX - 1, 10);
        b.mark(4096, 512);
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn test_set_keeps_newest_first_and_unique_names() {
        let s = BitmapSet::default();
        assert!(s.insert(Arc::new(bm(4096, 512))));
        assert!(!s.insert(Arc::new(bm(4096, 512))));
        let b2 = Arc::new(DirtyBitmap::new("c".into(), 4096, 512, true, false));
        assert!(s.insert(b2));
        let names: Vec<_> = s.list().iter().map(|b| b.name().to_string()).collect();
        assert_eq!(names, ["c", "b"]);
    }

    #[test]
    fn test_lease_makes_busy_until_dropped() {
        let b = Arc::new(bm(4096, 512));
        let lease = BitmapLease::new(b.clone());
        assert!(b.busy());
        drop(lease);
        assert!(!b.busy());
    }
}
