//! The objects of an image known to hold data, so that block status on them
//! is answered from memory.
//!
//! An NBD server asks block status after every large READ (a sparse reply
//! needs it), and librbd answers from the object map it reads from the
//! cluster: a round trip per 1 MiB read. Once an object has been seen
//! allocated (by a query, or because this node wrote it) it is remembered.
//! Only "data" is remembered, never "hole": a stale "data" answer is always
//! correct to act on (the bytes are read and sent), a stale "hole" would send
//! zeroes for data. Discards and unmapping zero writes forget their objects.

use std::sync::Mutex;

#[derive(Debug)]
pub struct KnownData {
    object_size: u64,
    /// One bit per object.
    bits: Mutex<Vec<u64>>,
}

impl KnownData {
    pub fn new(object_size: u64) -> Self {
        Self {
            object_size,
            bits: Mutex::new(Vec::new()),
        }
    }

    fn objects(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let first = offset / self.object_size;
        let end = (offset + len.max(1)).div_ceil(self.object_size);
        first..end
    }

    /// The objects touching `[offset, offset+len)` hold data.
    pub fn mark(&self, offset: u64, len: u64) {
        let mut bits = self.bits.lock().unwrap_or_else(|e| e.into_inner());
        for o in self.objects(offset, len) {
            let (word, bit) = ((o / 64) as usize, o % 64);
            if bits.len() <= word {
                bits.resize(word + 1, 0);
            }
            bits[word] |= 1 << bit;
        }
    }

    /// The objects touching `[offset, offset+len)` may no longer hold data.
    pub fn forget(&self, offset: u64, len: u64) {
        let mut bits = self.bits.lock().unwrap_or_else(|e| e.into_inner());
        for o in self.objects(offset, len) {
            if let Some(w) = bits.get_mut((o / 64) as usize) {
                *w &= !(1 << (o % 64));
            }
        }
    }

    /// The length of the known data run at `offset` (at most `len`), if the
    /// object holding `offset` is known to hold data.
    pub fn data_run(&self, offset: u64, len: u64) -> Option<u64> {
        let bits = self.bits.lock().unwrap_or_else(|e| e.into_inner());
        let known = |o: u64| {
            bits.get((o / 64) as usize)
                .is_some_and(|w| w & (1 << (o % 64)) != 0)
        };
        let mut o = offset / self.object_size;
        if !known(o) {
            return None;
        }
        let end = offset + len;
        while (o + 1) * self.object_size < end && known(o + 1) {
            o += 1;
        }
        Some(((o + 1) * self.object_size).min(end) - offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_known_objects_and_forgetting() {
        let k = KnownData::new(100);
        assert_eq!(k.data_run(0, 1000), None);
        k.mark(150, 100); // objects 1 and 2
        assert_eq!(k.data_run(120, 1000), Some(180));
        assert_eq!(k.data_run(120, 50), Some(50));
        assert_eq!(k.data_run(50, 10), None);
        k.forget(250, 1); // object 2
        assert_eq!(k.data_run(120, 1000), Some(80));
        k.mark(6399, 2); // objects 63 and 64: across a word
        assert_eq!(k.data_run(6300, 1000), Some(200));
    }
}
