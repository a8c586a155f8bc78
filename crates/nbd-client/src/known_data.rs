//! What block status already told: the last extent of allocated data.

/// How far ahead a block status query looks: one answer then covers the
/// queries of many reads (a re-export asks before every read of 64 KiB and
/// more, and a round trip each halved sequential read throughput).
pub(crate) const STATUS_LOOKAHEAD: u64 = 1 << 30;

/// The last range the server reported as allocated data, answered from here.
/// Only data is remembered: a stale "data" answer (another client trimmed the
/// range since) costs a read of zeroes, never wrong bytes, whereas a stale
/// hole would hide data. A discard or zeroing through this node forgets it.
/// Off for `x-dirty-bitmap`, whose bits change meaning as others write.
#[derive(Debug, Default)]
pub(crate) struct KnownData {
    enabled: bool,
    range: std::sync::Mutex<Option<std::ops::Range<u64>>>,
}

impl KnownData {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            range: Default::default(),
        }
    }

    pub fn lookup(&self, offset: u64, len: u64) -> Option<u64> {
        let range = self.range.lock().unwrap_or_else(|p| p.into_inner());
        let r = range.as_ref()?;
        r.contains(&offset).then(|| (r.end - offset).min(len))
    }

    pub fn remember(&self, offset: u64, len: u64) {
        if self.enabled {
            *self.range.lock().unwrap_or_else(|p| p.into_inner()) = Some(offset..offset + len);
        }
    }

    pub fn forget(&self) {
        *self.range.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_lookup_when_inside_the_data_extent_returns_what_is_left_of_it() {
        let k = KnownData::new(true);
        k.remember(4096, 8192);
        assert_eq!(k.lookup(8192, 1 << 20), Some(4096));
        assert_eq!(k.lookup(4096, 512), Some(512));
        assert_eq!(k.lookup(12288, 512), None);
        assert_eq!(k.lookup(0, 512), None);
    }

    #[test]
    fn test_forget_and_disabled_remember_nothing() {
        let k = KnownData::new(true);
        k.remember(0, 4096);
        k.forget();
        assert_eq!(k.lookup(0, 512), None);
        let off = KnownData::new(false);
        off.remember(0, 4096);
        assert_eq!(off.lookup(0, 512), None);
    }
}
