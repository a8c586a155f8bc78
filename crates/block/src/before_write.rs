//! A hook run before every write to a node: what QEMU's copy-before-write
//! filter does when it sits above a node. bexd has no filter nodes between
//! an export and its node, so the node itself runs the hook (a backup job
//! arms it on its source) before a write, write-zeroes or discard touches
//! the range, and the write waits for it.
//!
//! Arming must not miss a write already past the check: each write counts
//! itself in the current epoch before it looks at the hook, and
//! [`BeforeWriteSlot::arm`] flips the epoch; [`BeforeWriteSlot::drain_unhooked`]
//! then waits until every write of the old epoch is done (QEMU drains the node for the same reason). From
//! then on every write sees the hook. A write costs an atomic add and sub
//! and a reference count when nothing is armed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::error::BlockResult;

/// The future a hook returns.
pub type HookFuture<'a> = Pin<Box<dyn Future<Output = BlockResult<()>> + Send + 'a>>;

/// Runs before bytes `[offset, offset + len)` of a node change.
pub trait BeforeWrite: Send + Sync + std::fmt::Debug {
    fn before_write(&self, offset: u64, len: u64) -> HookFuture<'_>;
}

#[derive(Debug, Default)]
pub struct BeforeWriteSlot {
    armed: AtomicBool,
    hook: RwLock<Option<Arc<dyn BeforeWrite>>>,
    writes: Arc<Epochs>,
}

/// Writes in flight, counted per epoch parity.
#[derive(Debug, Default)]
struct Epochs {
    epoch: AtomicUsize,
    in_flight: [AtomicU64; 2],
}

/// A write in flight; dropped when the write is done.
#[derive(Debug)]
pub struct WriteGuard {
    writes: Arc<Epochs>,
    epoch: usize,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        self.writes.in_flight[self.epoch & 1].fetch_sub(1, SeqCst);
    }
}

impl BeforeWriteSlot {
    fn count(&self) -> WriteGuard {
        let epoch = self.writes.epoch.load(SeqCst);
        self.writes.in_flight[epoch & 1].fetch_add(1, SeqCst);
        WriteGuard {
            writes: self.writes.clone(),
            epoch,
        }
    }

    fn hook(&self) -> Option<Arc<dyn BeforeWrite>> {
        self.hook.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Before a write: runs the hook if one is armed. The guard must be
    /// held until the write is done.
    pub async fn enter(&self, offset: u64, len: u64) -> BlockResult<WriteGuard> {
        let guard = self.count();
        if !self.armed.load(SeqCst) {
            return Ok(guard);
        }
        // A write that runs the hook is not one the drain must wait for:
        // the hook may itself wait for the drain to end (a closed gate).
        drop(guard);
        if let Some(hook) = self.hook() {
            hook.before_write(offset, len).await?;
        }
        Ok(self.count())
    }

    /// For a write that cannot wait for a hook (a spliced write slice): a
    /// guard if none is armed, else `None` and the write takes the path
    /// through [`Self::enter`].
    pub fn enter_unhooked(&self) -> Option<WriteGuard> {
        let guard = self.count();
        (!self.armed.load(SeqCst)).then_some(guard)
    }

    pub fn is_armed(&self) -> bool {
        self.armed.load(SeqCst)
    }

    /// Arms `hook`: every write that checks from now on runs it. Writes
    /// already past the check are waited for by [`Self::drain_unhooked`].
    pub fn arm(&self, hook: Arc<dyn BeforeWrite>) {
        *self.hook.write().unwrap_or_else(|e| e.into_inner()) = Some(hook);
        self.armed.store(true, SeqCst);
        self.writes.epoch.fetch_add(1, SeqCst);
    }

    /// Returns once every write that started before the last [`Self::arm`]
    /// (and so may not run the hook) is done.
    pub async fn drain_unhooked(&self) {
        let old = self.writes.epoch.load(SeqCst).wrapping_sub(1);
        while self.writes.in_flight[old & 1].load(SeqCst) != 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// [`Self::drain_unhooked`] for a caller that is not async (a QMP
    /// command run under `block_in_place`).
    pub fn drain_unhooked_blocking(&self) {
        let old = self.writes.epoch.load(SeqCst).wrapping_sub(1);
        while self.writes.in_flight[old & 1].load(SeqCst) != 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Removes the hook; writes go on without it.
    pub fn disarm(&self) {
        self.armed.store(false, SeqCst);
        *self.hook.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// A hook that holds every write until [`WriteGate::open`]: armed and
/// drained, it quiesces a node's writes (QEMU's drained section), which
/// `blockdev-reopen` needs while it replaces a child.
#[derive(Debug)]
pub struct WriteGate {
    open: tokio::sync::watch::Sender<bool>,
}

impl Default for WriteGate {
    fn default() -> Self {
        Self {
            open: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl WriteGate {
    pub fn open(&self) {
        self.open.send_replace(true);
    }
}

impl BeforeWrite for WriteGate {
    fn before_write(&self, _offset: u64, _len: u64) -> HookFuture<'_> {
        let mut open = self.open.subscribe();
        // The sender lives with self, so the wait ends when it opens.
        Box::pin(async move {
            let _ = open.wait_for(|o| *o).await;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[derive(Debug, Default)]
    struct Count(AtomicU64);

    impl BeforeWrite for Count {
        fn before_write(&self, _offset: u64, len: u64) -> HookFuture<'_> {
            self.0.fetch_add(len, SeqCst);
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn test_drain_waits_for_writes_that_missed_the_hook() {
        let slot = BeforeWriteSlot::default();
        let hook = Arc::new(Count::default());
        let early = slot.enter_unhooked().expect("nothing armed yet");
        slot.arm(hook.clone());
        assert!(
            slot.enter_unhooked().is_none(),
            "no splice past an armed hook"
        );
        let drained = tokio::time::timeout(Duration::from_millis(50), slot.drain_unhooked());
        assert!(
            drained.await.is_err(),
            "a write without the hook is still in flight"
        );
        drop(early);
        slot.drain_unhooked().await;
        // Writes now run the hook, and a hooked write never holds the drain.
        let late = slot.enter(0, 4096).await.unwrap();
        slot.drain_unhooked().await;
        drop(late);
        assert_eq!(hook.0.load(SeqCst), 4096);
        slot.disarm();
        drop(slot.enter(0, 512).await.unwrap());
        assert_eq!(hook.0.load(SeqCst), 4096);
    }
}
