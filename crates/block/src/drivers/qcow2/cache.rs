//! A small LRU cache of metadata tables (L2 tables, refcount blocks), keyed
//! by host offset. It only holds bytes; the caller decides when a dirty table
//! may be written (the write order is what keeps a killed image consistent).

use std::collections::HashMap;

#[derive(Debug)]
struct Entry {
    data: Vec<u8>,
    dirty: bool,
    last_use: u64,
}

#[derive(Debug)]
pub struct TableCache {
    capacity: usize,
    entries: HashMap<u64, Entry>,
    tick: u64,
}

impl TableCache {
    /// `capacity` tables, at least 2 (a COW of one table needs two at once).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(2),
            entries: HashMap::new(),
            tick: 0,
        }
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.entries.contains_key(&offset)
    }

    pub fn get(&mut self, offset: u64) -> Option<&[u8]> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(&offset).map(|e| {
            e.last_use = tick;
            &e.data[..]
        })
    }

    /// The table for writing; it becomes dirty.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut [u8]> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(&offset).map(|e| {
            e.last_use = tick;
            e.dirty = true;
            &mut e.data[..]
        })
    }

    /// True if adding one more table would need an eviction first.
    pub fn full(&self) -> bool {
        self.entries.len() >= self.capacity
    }

    /// The least recently used table and whether it is dirty.
    pub fn victim(&self) -> Option<(u64, bool)> {
        self.entries
            .iter()
            .min_by_key(|(_, e)| e.last_use)
            .map(|(&off, e)| (off, e.dirty))
    }

    pub fn insert(&mut self, offset: u64, data: Vec<u8>, dirty: bool) {
        self.tick += 1;
        let last_use = self.tick;
        self.entries.insert(
            offset,
            Entry {
                data,
                dirty,
                last_use,
            },
        );
    }

    pub fn remove(&mut self, offset: u64) {
        self.entries.remove(&offset);
    }

    /// Dirty tables in offset order, to be written; they stay dirty until `mark_clean`.
    pub fn dirty(&self) -> Vec<(u64, Vec<u8>)> {
        let mut v: Vec<_> = self
            .entries
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(&off, e)| (off, e.data.clone()))
            .collect();
        v.sort_by_key(|(off, _)| *off);
        v
    }

    pub fn mark_clean(&mut self, offset: u64) {
        if let Some(e) = self.entries.get_mut(&offset) {
            e.dirty = false;
        }
    }

    pub fn is_dirty(&self) -> bool {
        self.entries.values().any(|e| e.dirty)
    }

    /// Drops clean tables not used since `since` (cache-clean-interval).
    pub fn drop_clean_older_than(&mut self, since: u64) {
        self.entries.retain(|_, e| e.dirty || e.last_use >= since);
    }

    pub fn tick(&self) -> u64 {
        self.tick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_victim_is_least_recently_used() {
        let mut c = TableCache::new(2);
        c.insert(1, vec![0], false);
        c.insert(2, vec![0], false);
        c.get(1);
        assert_eq!(c.victim(), Some((2, false)));
    }

    #[test]
    fn test_get_mut_marks_dirty_until_clean() {
        let mut c = TableCache::new(2);
        c.insert(1, vec![0], false);
        c.get_mut(1).unwrap()[0] = 9;
        assert_eq!(c.dirty(), vec![(1, vec![9])]);
        c.mark_clean(1);
        assert!(!c.is_dirty());
    }
}
