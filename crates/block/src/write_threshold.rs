//! A node's write threshold (QEMU's `block-set-write-threshold`): the first
//! write that ends past it is reported once and turns it off, so a
//! management layer that grows thin volumes (oVirt) hears about each
//! threshold exactly once and sets the next one itself.
//!
//! Off costs one relaxed load per write: most nodes never have one.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct WriteThreshold {
    /// Bytes; 0 is off.
    offset: AtomicU64,
}

impl WriteThreshold {
    pub fn set(&self, offset: u64) {
        self.offset.store(offset, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.offset.load(Ordering::Relaxed)
    }

    /// For a write ending at `end`: the threshold it crossed, which is now
    /// off, or `None`. Of two writes racing past the same threshold only
    /// one gets it; a threshold set again meanwhile is checked afresh.
    pub fn crossed_by(&self, end: u64) -> Option<u64> {
        let mut threshold = self.offset.load(Ordering::Relaxed);
        loop {
            if threshold == 0 || end <= threshold {
                return None;
            }
            match self.offset.compare_exchange_weak(
                threshold,
                0,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(threshold),
                Err(now) => threshold = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_write_ending_at_the_threshold_does_not_cross_it() {
        let t = WriteThreshold::default();
        t.set(4 << 20);
        assert_eq!(t.crossed_by(4 << 20), None);
        assert_eq!(t.get(), 4 << 20);
    }

    #[test]
    fn test_first_write_past_crosses_once_and_turns_it_off() {
        let t = WriteThreshold::default();
        t.set(4 << 20);
        assert_eq!(t.crossed_by((4 << 20) + 1024), Some(4 << 20));
        assert_eq!(t.get(), 0);
        assert_eq!(t.crossed_by(u64::MAX), None);
    }

    #[test]
    fn test_off_never_crosses() {
        let t = WriteThreshold::default();
        assert_eq!(t.crossed_by(u64::MAX), None);
    }

    #[test]
    fn test_racing_writers_report_it_once() {
        let t = std::sync::Arc::new(WriteThreshold::default());
        t.set(1);
        let hits: usize = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || (0..1000).filter(|_| t.crossed_by(2).is_some()).count())
            })
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(hits, 1);
    }
}
