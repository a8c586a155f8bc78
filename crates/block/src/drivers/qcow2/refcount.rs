//! Refcounts: reading and updating entries of any width (1 to 64 bits),
//! cluster allocation, and growing the refcount structures.
//!
//! Increments go to the refcount cache and reach the disk before any L2
//! entry that references the new cluster (see `meta::Meta::flush`). A new
//! refcount block or table is written and synced before anything points at
//! it, so a kill at any moment leaves at worst leaked clusters.

use crate::debug_event::DebugEvent;
use crate::driver::Driver;
use crate::error::{BlockError, BlockErrorKind, BlockResult};

use super::header::{MAX_HOST_OFFSET, OFF_REFCOUNT_TABLE};
use super::meta::Meta;

/// Entry `index` of a refcount block with entries of `1 << order` bits.
/// Entries narrower than a byte are packed from the low bits up, wider
/// ones are big-endian (as qemu-img writes them).
pub fn get(block: &[u8], index: usize, order: u32) -> u64 {
    let bits = 1usize << order;
    match order {
        0..=2 => {
            let per_byte = 8 / bits;
            let byte = block[index / per_byte];
            let shift = (index % per_byte) * bits;
            u64::from(byte >> shift) & ((1 << bits) - 1)
        }
        _ => {
            let n = bits / 8;
            block[index * n..index * n + n]
                .iter()
                .fold(0u64, |acc, &b| acc << 8 | u64::from(b))
        }
    }
}

pub fn set(block: &mut [u8], index: usize, order: u32, value: u64) {
    let bits = 1usize << order;
    match order {
        0..=2 => {
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut block[index / per_byte];
            *b = (*b & !mask) | (((value as u8) << shift) & mask);
        }
        _ => {
            let n = bits / 8;
            let bytes = value.to_be_bytes();
            block[index * n..index * n + n].copy_from_slice(&bytes[8 - n..]);
        }
    }
}

/// The largest refcount an entry of `1 << order` bits holds.
pub fn max_value(order: u32) -> u64 {
    match order {
        6 => u64::MAX,
        o => (1u64 << (1 << o)) - 1,
    }
}

fn corrupt(msg: String) -> BlockError {
    BlockError::new(BlockErrorKind::Corrupt, msg)
}

impl Meta {
    /// Clusters one refcount block describes.
    pub fn rc_entries(&self) -> u64 {
        (self.geom.cluster_size() * 8) >> self.refcount_order
    }

    fn rc_position(&self, cluster: u64) -> (usize, usize) {
        let per = self.rc_entries();
        ((cluster / per) as usize, (cluster % per) as usize)
    }

    /// The refcount of a host cluster; clusters no block covers have refcount 0.
    pub fn refcount(&mut self, f: &dyn Driver, cluster: u64) -> BlockResult<u64> {
        let (ti, bi) = self.rc_position(cluster);
        let block = match self.rc_table.get(ti) {
            Some(&b) if b != 0 => b,
            _ => return Ok(0),
        };
        self.load_rc_block(f, block)?;
        let order = self.refcount_order;
        Ok(self.rc_cache.get(block).map_or(0, |b| get(b, bi, order)))
    }

    /// Refcount blocks are read through the cache; a dirty victim is written
    /// on its own (it holds only increments, or decrements already made safe).
    pub fn load_rc_block(&mut self, f: &dyn Driver, offset: u64) -> BlockResult<()> {
        if self.rc_cache.contains(offset) {
            return Ok(());
        }
        if !offset.is_multiple_of(self.geom.cluster_size()) || offset >= MAX_HOST_OFFSET {
            return Err(corrupt(format!(
                "qcow2: refcount block offset {offset:#x} is invalid"
            )));
        }
        if self.rc_cache.full() {
            if let Some((victim, dirty)) = self.rc_cache.victim() {
                if dirty {
                    self.write_rc_block(f, victim)?;
                }
                self.rc_cache.remove(victim);
            }
        }
        let mut data = vec![0u8; self.geom.cluster_size() as usize];
        f.debug_event(DebugEvent::RefblockLoad);
        f.read_at(&mut data, offset)?;
        self.rc_cache.insert(offset, data, false);
        Ok(())
    }

    pub fn write_rc_block(&mut self, f: &dyn Driver, offset: u64) -> BlockResult<()> {
        if let Some(data) = self.rc_cache.get(offset) {
            let data = data.to_vec();
            f.debug_event(DebugEvent::RefblockUpdatePart);
            f.write_at(&data, offset, false)?;
            self.rc_cache.mark_clean(offset);
        }
        Ok(())
    }

    /// Adds `delta` to one cluster's refcount; returns the new value.
    pub fn update_refcount(
        &mut self,
        f: &dyn Driver,
        cluster: u64,
        delta: i64,
    ) -> BlockResult<u64> {
        let (ti, bi) = self.rc_position(cluster);
        let block = match self.rc_table.get(ti) {
            Some(&b) if b != 0 => b,
            _ => {
                return Err(corrupt(format!(
                    "qcow2: cluster {cluster} has no refcount block"
                )))
            }
        };
        self.load_rc_block(f, block)?;
        let order = self.refcount_order;
        let table = self
            .rc_cache
            .get_mut(block)
            .ok_or_else(|| corrupt("qcow2: refcount block vanished from the cache".into()))?;
        let old = get(table, bi, order);
        let new = old
            .checked_add_signed(delta)
            .filter(|&v| v <= max_value(order))
            .ok_or_else(|| {
                corrupt(format!(
                    "qcow2: refcount of cluster {cluster} would leave its range ({old} {delta:+})"
                ))
            })?;
        set(table, bi, order, new);
        Ok(new)
    }

    /// Allocates `n` contiguous free clusters with refcount 1; returns the host offset.
    pub fn alloc_clusters(&mut self, f: &dyn Driver, n: u64) -> BlockResult<u64> {
        f.debug_event(DebugEvent::ClusterAlloc);
        let mut start = self.free_hint;
        // The first free cluster the search passed over (too short a run), for the next search.
        let mut skipped_free = None;
        'search: loop {
            if (start + n) << self.geom.cluster_bits >= MAX_HOST_OFFSET {
                return Err(BlockError::new(
                    BlockErrorKind::NoSpace,
                    "qcow2: image is full",
                ));
            }
            if let Some(used) = self.first_used(f, start, n)? {
                if used > start {
                    skipped_free.get_or_insert(start);
                }
                start = used + 1;
                continue 'search;
            }
            // Every cluster of the run needs a refcount block; making one may take a cluster of the run.
            let per = self.rc_entries();
            for ti in start / per..=(start + n - 1) / per {
                if self.ensure_rc_block(f, ti as usize)? {
                    continue 'search;
                }
            }
            break;
        }
        for c in start..start + n {
            self.update_refcount(f, c, 1)?;
        }
        self.free_hint = skipped_free.unwrap_or(start + n);
        let offset = start << self.geom.cluster_bits;
        self.note_used(offset + (n << self.geom.cluster_bits));
        Ok(offset)
    }

    /// Everything from `end` on was never written (reads as zeroes).
    fn note_used(&mut self, end: u64) {
        self.untouched_from = self.untouched_from.max(end);
    }

    /// The first cluster of `[start, start + n)` with a nonzero refcount.
    fn first_used(&mut self, f: &dyn Driver, start: u64, n: u64) -> BlockResult<Option<u64>> {
        for c in start..start + n {
            if self.refcount(f, c)? != 0 {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }

    /// Makes sure refcount table entry `ti` has a block; true if one was created.
    /// The block goes in the first cluster it covers (free, since nothing covered it).
    fn ensure_rc_block(&mut self, f: &dyn Driver, ti: usize) -> BlockResult<bool> {
        if ti >= self.rc_table.len() {
            self.grow_rc_table(f, ti + 1)?;
            return Ok(true);
        }
        if self.rc_table[ti] != 0 {
            return Ok(false);
        }
        let offset = (ti as u64 * self.rc_entries()) << self.geom.cluster_bits;
        let mut data = vec![0u8; self.geom.cluster_size() as usize];
        set(&mut data, 0, self.refcount_order, 1);
        self.note_used(offset + self.geom.cluster_size());
        f.debug_event(DebugEvent::RefblockAlloc);
        f.debug_event(DebugEvent::RefblockAllocWrite);
        f.write_at(&data, offset, false)?;
        f.flush()?;
        let entry_at = self.rc_table_offset + ti as u64 * 8;
        f.debug_event(DebugEvent::RefblockAllocHookup);
        f.write_at(&offset.to_be_bytes(), entry_at, false)?;
        self.rc_table[ti] = offset;
        self.insert_rc_block(f, offset, data)?;
        Ok(true)
    }

    fn insert_rc_block(&mut self, f: &dyn Driver, offset: u64, data: Vec<u8>) -> BlockResult<()> {
        if self.rc_cache.full() {
            if let Some((victim, dirty)) = self.rc_cache.victim() {
                if dirty {
                    self.write_rc_block(f, victim)?;
                }
                self.rc_cache.remove(victim);
            }
        }
        self.rc_cache.insert(offset, data, false);
        Ok(())
    }

    /// A new, larger refcount table past everything the old one covers, with
    /// a refcount block in front describing the block and the table. Written
    /// and synced before the header points at it; the old table is freed later.
    fn grow_rc_table(&mut self, f: &dyn Driver, min_entries: usize) -> BlockResult<()> {
        f.debug_event(DebugEvent::ReftableGrow);
        let cs = self.geom.cluster_size();
        let old_len = self.rc_table.len();
        let per_cluster = (cs / 8) as usize;
        let new_len = min_entries
            .max(old_len * 2)
            .max(old_len + 1)
            .next_multiple_of(per_cluster);
        let table_clusters = (new_len / per_cluster) as u64;
        if table_clusters + 1 > self.rc_entries() || new_len as u64 * 8 > (8 << 20) {
            return Err(BlockError::new(
                BlockErrorKind::NoSpace,
                "qcow2: refcount table cannot grow further",
            ));
        }
        let first = old_len as u64 * self.rc_entries();
        let block_off = first << self.geom.cluster_bits;
        let table_off = block_off + cs;
        let mut block = vec![0u8; cs as usize];
        for i in 0..=table_clusters as usize {
            set(&mut block, i, self.refcount_order, 1);
        }
        let mut table = self.rc_table.clone();
        table.resize(new_len, 0);
        table[old_len] = block_off;
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.note_used(table_off + table_clusters * cs);
        f.write_at(&block, block_off, false)?;
        f.write_at(&bytes, table_off, false)?;
        f.flush()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        f.write_at(&hdr, OFF_REFCOUNT_TABLE, false)?;
        f.flush()?;
        let old = (self.rc_table_offset, u64::from(self.rc_table_clusters) * cs);
        self.rc_table = table;
        self.rc_table_offset = table_off;
        self.rc_table_clusters = table_clusters as u32;
        self.pending_frees.push(old);
        self.insert_rc_block(f, block_off, block)
    }

    /// Drops one reference from every cluster of `[offset, offset + len)`.
    /// Only called once nothing on disk references them any more.
    pub fn release(&mut self, f: &dyn Driver, offset: u64, len: u64) -> BlockResult<()> {
        if len == 0 {
            return Ok(());
        }
        let first = offset >> self.geom.cluster_bits;
        let last = (offset + len - 1) >> self.geom.cluster_bits;
        for c in first..=last {
            if self.update_refcount(f, c, -1)? == 0 {
                self.free_hint = self.free_hint.min(c);
                self.freed.push(c << self.geom.cluster_bits);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_one_bit_entries_pack_from_low_bit() {
        let mut b = vec![0u8; 2];
        set(&mut b, 9, 0, 1);
        assert_eq!(b, vec![0, 0b10]);
        assert_eq!(get(&b, 9, 0), 1);
    }

    #[test]
    fn test_four_bit_entries_share_a_byte() {
        let mut b = vec![0u8; 1];
        set(&mut b, 0, 2, 0xa);
        set(&mut b, 1, 2, 0x5);
        assert_eq!((b[0], get(&b, 0, 2), get(&b, 1, 2)), (0x5a, 0xa, 0x5));
    }

    #[test]
    fn test_sixteen_bit_entries_are_big_endian() {
        let mut b = vec![0u8; 4];
        set(&mut b, 1, 4, 0x0102);
        assert_eq!(b, vec![0, 0, 1, 2]);
    }

    #[test]
    fn test_sixty_four_bit_roundtrip() {
        let mut b = vec![0u8; 16];
        set(&mut b, 1, 6, u64::MAX - 1);
        assert_eq!(get(&b, 1, 6), u64::MAX - 1);
    }

    #[test]
    fn test_max_value_by_order() {
        assert_eq!(
            (max_value(0), max_value(3), max_value(6)),
            (1, 255, u64::MAX)
        );
    }
}
