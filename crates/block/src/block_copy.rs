//! Copying a node's clusters to a target once each, from whichever side
//! gets there first: a backup job walking the disk, or a write to the
//! source that must first save the old contents (QEMU's block-copy, under
//! its copy-before-write filter). Together they give the target the
//! source's contents as they were when copying began, whatever is written
//! meanwhile.
//!
//! Each cluster is to copy, in flight, or done. A copy claims a cluster
//! under the lock and does its I/O outside it; anyone else who needs that
//! cluster waits for the claim to end. A failed copy leaves the cluster to
//! copy, so a retry (or a later write) copies it again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::before_write::{BeforeWrite, HookFuture};
use crate::buf::IoBuf;
use crate::driver::ZeroFlags;
use crate::error::BlockError;
use crate::node::BlockNode;

/// A failed copy: whether reading the source or writing the target failed.
#[derive(Debug)]
pub struct CopyError {
    pub is_read: bool,
    pub error: BlockError,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Skip,
    ToCopy,
    InFlight,
}

#[derive(Debug)]
pub struct BlockCopy {
    source: Arc<BlockNode>,
    target: Arc<BlockNode>,
    cluster: u64,
    len: u64,
    clusters: Mutex<Vec<State>>,
    /// Wakes those who wait for a claimed cluster.
    released: Notify,
    /// Bytes copied so far, by the job or by writes.
    copied: AtomicU64,
    /// Clusters a backing file holds are not copied (`sync=top`).
    skip_unallocated: bool,
    /// Bytes found unallocated and left out.
    skipped: AtomicU64,
    /// Writes wait here until the set to copy is known ([`Self::open`]).
    gate: tokio::sync::watch::Sender<bool>,
}

/// How a claim ended.
enum Claim {
    Mine,
    Nothing,
    Wait,
}

impl BlockCopy {
    /// Nothing to copy yet; [`Self::mark`] says what. Writes to the source
    /// that reach the hook wait until [`Self::open`].
    pub fn new(
        source: Arc<BlockNode>,
        target: Arc<BlockNode>,
        cluster: u64,
        skip_unallocated: bool,
    ) -> Self {
        let len = source.size();
        let n = len.div_ceil(cluster) as usize;
        Self {
            source,
            target,
            cluster,
            len,
            clusters: Mutex::new(vec![State::Skip; n]),
            released: Notify::new(),
            copied: AtomicU64::new(0),
            skip_unallocated,
            skipped: AtomicU64::new(0),
            gate: tokio::sync::watch::Sender::new(false),
        }
    }

    /// The set to copy is complete: writes go on (saving old data first).
    pub fn open(&self) {
        self.gate.send_replace(true);
    }

    /// Bytes left out as unallocated in the top layer.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// The byte ranges of the clusters still to copy, merged.
    pub fn pending_ranges(&self) -> Vec<(u64, u64)> {
        let c = self.lock();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (i, s) in c.iter().enumerate() {
            if *s == State::Skip {
                continue;
            }
            let (offset, len) = (i as u64 * self.cluster, self.cluster_len(i));
            match ranges.last_mut() {
                Some((o, l)) if *o + *l == offset => *l += len,
                _ => ranges.push((offset, len)),
            }
        }
        ranges
    }

    /// The cluster states. Every update is one assignment, so a lock
    /// poisoned elsewhere still guards whole states.
    fn lock(&self) -> MutexGuard<'_, Vec<State>> {
        self.clusters.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    pub fn clusters(&self) -> usize {
        self.lock().len()
    }

    /// The clusters covering `[offset, offset + len)` are to copy.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = (offset / self.cluster) as usize;
        let end = (offset + len).div_ceil(self.cluster) as usize;
        let mut c = self.lock();
        let end = end.min(c.len());
        for s in &mut c[first..end] {
            if *s == State::Skip {
                *s = State::ToCopy;
            }
        }
    }

    fn cluster_len(&self, idx: usize) -> u64 {
        let offset = idx as u64 * self.cluster;
        self.cluster.min(self.len - offset)
    }

    /// Bytes still to copy (in flight counts as to copy).
    pub fn remaining(&self) -> u64 {
        let c = self.lock();
        (0..c.len())
            .filter(|i| c[*i] != State::Skip)
            .map(|i| self.cluster_len(i))
            .sum()
    }

    pub fn copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }

    /// The first cluster at or after `from` still to copy or in flight.
    pub fn next(&self, from: usize) -> Option<usize> {
        let c = self.lock();
        (from..c.len()).find(|i| c[*i] != State::Skip)
    }

    /// Copies cluster `idx` unless it is done (waiting for anyone copying
    /// it now). Returns the bytes this call copied.
    pub async fn copy_cluster(&self, idx: usize) -> Result<u64, CopyError> {
        loop {
            let wait = {
                let mut c = self.lock();
                let claim = match c.get(idx) {
                    None | Some(State::Skip) => Claim::Nothing,
                    Some(State::InFlight) => Claim::Wait,
                    Some(State::ToCopy) => {
                        c[idx] = State::InFlight;
                        Claim::Mine
                    }
                };
                match claim {
                    Claim::Nothing => return Ok(0),
                    Claim::Mine => None,
                    // Registered under the lock, so the release cannot be missed.
                    Claim::Wait => Some(self.released.notified()),
                }
            };
            match wait {
                Some(released) => released.await,
                None => break,
            }
        }
        let result = self.copy(idx).await;
        self.lock()[idx] = match result {
            Ok(_) => State::Skip,
            Err(_) => State::ToCopy,
        };
        self.released.notify_waiters();
        result
    }

    async fn copy(&self, idx: usize) -> Result<u64, CopyError> {
        let offset = idx as u64 * self.cluster;
        let len = self.cluster_len(idx);
        let read_err = |error| CopyError {
            is_read: true,
            error,
        };
        let write_err = |error| CopyError {
            is_read: false,
            error,
        };
        let status = self
            .source
            .block_status(offset, len)
            .await
            .map_err(read_err)?;
        if self.skip_unallocated && status.depth != 1 && status.len >= len {
            self.skipped.fetch_add(len, Ordering::Relaxed);
            return Ok(0);
        }
        if status.zero && status.len >= len {
            self.target
                .write_zeroes(offset, len, ZeroFlags::default())
                .await
                .map_err(write_err)?;
        } else {
            let (buf, r) = self
                .source
                .read(IoBuf::for_overwrite(len as usize), offset)
                .await;
            r.map_err(read_err)?;
            let (_, r) = self.target.write(buf, offset, false).await;
            r.map_err(write_err)?;
        }
        self.copied.fetch_add(len, Ordering::Relaxed);
        Ok(len)
    }
}

/// Before a write to the source: its clusters' old contents go first.
impl BeforeWrite for BlockCopy {
    fn before_write(&self, offset: u64, len: u64) -> HookFuture<'_> {
        Box::pin(async move {
            if len == 0 {
                return Ok(());
            }
            // Never closed again once open, and the sender lives with self.
            let _ = self.gate.subscribe().wait_for(|open| *open).await;
            let first = (offset / self.cluster) as usize;
            let end = (offset + len).div_ceil(self.cluster) as usize;
            for idx in first..end {
                self.copy_cluster(idx).await.map_err(|e| e.error)?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::null::NullDriver;

    fn node(name: &str, size: u64) -> Arc<BlockNode> {
        Arc::new(BlockNode::new(
            name.into(),
            Arc::new(NullDriver::new(size, true)),
            false,
        ))
    }

    #[tokio::test]
    async fn test_each_cluster_is_copied_once() {
        let copy = BlockCopy::new(node("s", 1 << 20), node("t", 1 << 20), 65536, false);
        copy.open();
        copy.mark(65536, 1);
        copy.mark(1 << 19, 65537);
        assert_eq!(copy.remaining(), 3 * 65536);
        assert_eq!(copy.next(0), Some(1));
        assert_eq!(copy.copy_cluster(1).await.unwrap(), 65536);
        assert_eq!(copy.copy_cluster(1).await.unwrap(), 0);
        copy.before_write(1 << 19, 100).await.unwrap();
        assert_eq!(copy.next(2), Some(9));
        assert_eq!(copy.copied(), 2 * 65536);
        assert_eq!(copy.remaining(), 65536);
        assert_eq!(copy.pending_ranges(), [(9 * 65536, 65536)]);
    }
}
