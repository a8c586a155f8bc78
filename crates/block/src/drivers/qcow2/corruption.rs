//! Corruption found while serving, signalled as QEMU's
//! `qcow2_signal_corruption` does: on a writable node the image gets its
//! corrupt bit and the driver gives up (every later request fails with
//! ENOMEDIUM, as QEMU's node without a driver); on a read-only node the
//! request fails and the node serves on. Either way one
//! `BLOCK_IMAGE_CORRUPTED` is reported, and later ones are suppressed
//! (a fatal one still follows an earlier non-fatal one).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{BlockError, BlockErrorKind, BlockResult};
use crate::observer::{Corruption, NodeObserver};

#[derive(Debug, Default)]
pub(super) struct CorruptionSignal {
    /// The node's name and who hears about it (see `Driver::attach_observer`).
    observer: OnceLock<(String, Arc<dyn NodeObserver>)>,
    /// Whether any corruption was signalled, and whether the image was
    /// marked corrupt. Poisoning is harmless: both only ever turn true.
    signalled: Mutex<(bool, bool)>,
    /// Set once a fatal corruption was signalled.
    unusable: AtomicBool,
}

impl CorruptionSignal {
    pub fn attach(&self, node_name: &str, observer: Arc<dyn NodeObserver>) {
        let _ = self.observer.set((node_name.to_string(), observer));
    }

    pub fn unusable(&self) -> bool {
        self.unusable.load(Ordering::Relaxed)
    }

    /// The error of every request once the driver has given up.
    pub fn check_usable(&self) -> BlockResult<()> {
        match self.unusable() {
            true => Err(BlockError::new(BlockErrorKind::NoMedium, "No medium found")),
            false => Ok(()),
        }
    }

    /// Signals `found` (fatal on a writable image); `mark_corrupt` sets the
    /// image's corrupt bit.
    pub fn signal(
        &self,
        found: &Corruption,
        writable: bool,
        mark_corrupt: impl FnOnce() -> BlockResult<()>,
    ) {
        let mut signalled = self.signalled.lock().unwrap_or_else(|p| p.into_inner());
        let (any, marked) = *signalled;
        if any && (!writable || marked) {
            return;
        }
        let corruption = Corruption {
            fatal: writable,
            ..found.clone()
        };
        match writable {
            true => tracing::error!(
                "qcow2: Marking image as corrupt: {}; further corruption events will be suppressed",
                corruption.msg
            ),
            false => tracing::error!(
                "qcow2: Image is corrupt: {}; further non-fatal corruption events will be suppressed",
                corruption.msg
            ),
        }
        if let Some((node, observer)) = self.observer.get() {
            observer.image_corrupted(node, &corruption);
        }
        if writable {
            if let Err(e) = mark_corrupt() {
                tracing::error!(error = %e, "qcow2: could not set the corrupt bit");
            }
            self.unusable.store(true, Ordering::Relaxed);
        }
        *signalled = (true, marked || writable);
    }
}

/// A number as C's `%#x` prints it, which QEMU's messages use: `0` for
/// zero, `0x...` otherwise.
pub(super) fn c_hex(v: u64) -> String {
    match v {
        0 => "0".to_string(),
        _ => format!("{v:#x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Heard(Mutex<Vec<Corruption>>);

    impl NodeObserver for Heard {
        fn write_threshold_exceeded(&self, _: &str, _: u64, _: u64) {}
        fn image_corrupted(&self, node: &str, c: &Corruption) {
            assert_eq!(node, "q0");
            self.0.lock().unwrap().push(c.clone());
        }
    }

    fn found() -> Corruption {
        Corruption {
            msg: "x".into(),
            offset: None,
            size: None,
            fatal: false,
        }
    }

    #[test]
    fn test_fatal_once_marks_and_gives_up() {
        let heard = Arc::new(Heard::default());
        let s = CorruptionSignal::default();
        s.attach("q0", heard.clone());
        let mut marks = 0;
        s.signal(&found(), true, || {
            marks += 1;
            Ok(())
        });
        s.signal(&found(), true, || {
            marks += 1;
            Ok(())
        });
        assert_eq!(marks, 1);
        assert!(s.unusable());
        assert_eq!(s.check_usable().unwrap_err().errno(), libc::ENOMEDIUM);
        let heard = heard.0.lock().unwrap();
        assert_eq!(heard.len(), 1);
        assert!(heard[0].fatal);
    }

    #[test]
    fn test_read_only_reports_once_and_serves_on() {
        let heard = Arc::new(Heard::default());
        let s = CorruptionSignal::default();
        s.attach("q0", heard.clone());
        s.signal(&found(), false, || {
            panic!("a read-only image is not marked")
        });
        s.signal(&found(), false, || {
            panic!("a read-only image is not marked")
        });
        assert!(!s.unusable());
        assert_eq!(heard.0.lock().unwrap().len(), 1);
        assert!(!heard.0.lock().unwrap()[0].fatal);
    }

    #[test]
    fn test_c_hex_prints_zero_as_c_does() {
        assert_eq!(c_hex(0), "0");
        assert_eq!(c_hex(0x40000), "0x40000");
    }
}
