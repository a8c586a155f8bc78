//! The backup job (QEMU's block/backup.c): copies a source node to a
//! target node as it was when the job began, while the source keeps being
//! written. A copy-before-write hook on the source (`block::block_copy`)
//! saves each cluster's old contents before a write changes it; the job
//! walks the rest.
//!
//! The point in time: the handler arms the hook closed (writes reaching it
//! wait), the job's first step waits for the writes that started before
//! (QEMU drains the node), takes the sync bitmap's bits (the bitmap then
//! records only later writes, QEMU's "successor"), settles what to copy and
//! opens the hook. So the set and the frozen bitmap are exactly the writes
//! completed before that instant.

use std::sync::Arc;

use block::block_copy::BlockCopy;
use block::{BlockNode, DirtyBitmap};
use qmp::schema::job::{BitmapSyncMode, BlockdevOnError, MirrorSyncMode};

use super::{BoxFuture, ErrorAction, JobCtl, JobFailure, JobWork, NodeUse};
use crate::nodes::NodeHold;

/// QEMU's backup cluster size when the target has none larger.
pub const CLUSTER: u64 = 64 * 1024;

/// The sync bitmap and what becomes of it (`bitmap-mode`).
pub struct SyncBitmap {
    pub bitmap: Arc<DirtyBitmap>,
    pub mode: BitmapSyncMode,
}

/// A backup job's work and what it holds while it runs.
pub struct BackupWork {
    pub source: NodeHold,
    pub target: NodeHold,
    pub copy: Arc<BlockCopy>,
    pub sync: MirrorSyncMode,
    pub bitmap: Option<SyncBitmap>,
    pub on_source_error: BlockdevOnError,
    pub on_target_error: BlockdevOnError,
    /// The sync bitmap's bits at the freeze, once taken.
    frozen: std::sync::Mutex<Option<Vec<u64>>>,
    /// Whether the hook on the source is this job's.
    armed: std::sync::atomic::AtomicBool,
}

impl BackupWork {
    pub fn new(
        source: NodeHold,
        target: NodeHold,
        sync: MirrorSyncMode,
        bitmap: Option<SyncBitmap>,
        on_source_error: BlockdevOnError,
        on_target_error: BlockdevOnError,
    ) -> Self {
        let copy = Arc::new(BlockCopy::new(
            source.node().clone(),
            target.node().clone(),
            CLUSTER,
            sync == MirrorSyncMode::Top,
        ));
        if let Some(b) = &bitmap {
            b.bitmap.set_busy(true);
        }
        Self {
            source,
            target,
            copy,
            sync,
            bitmap,
            on_source_error,
            on_target_error,
            frozen: std::sync::Mutex::new(None),
            armed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn source(&self) -> &Arc<BlockNode> {
        self.source.node()
    }

    /// The instant of the backup (see the module's doc).
    async fn freeze(&self) {
        self.source().before_write().drain_unhooked().await;
        let size = self.source().size();
        let frozen = self.bitmap.as_ref().map(|b| b.bitmap.take_words());
        match (&self.bitmap, &frozen) {
            (Some(b), Some(words)) if self.sync == MirrorSyncMode::Bitmap => {
                let at_freeze = bitmap_with(&b.bitmap, words.clone());
                for (offset, len, dirty) in runs(&at_freeze, 0, size) {
                    if dirty {
                        self.copy.mark(offset, len);
                    }
                }
            }
            // `none` copies only what writes are about to change.
            _ => self.copy.mark(0, size),
        }
        *self.frozen_lock() = frozen;
        self.copy.open();
    }

    fn frozen_lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<u64>>> {
        self.frozen.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn run_job(self: Arc<Self>, ctl: JobCtl) -> Result<(), JobFailure> {
        self.freeze().await;
        let total = self.copy.remaining();
        let progress = |ctl: &JobCtl| {
            let done = self.copy.copied();
            ctl.set_progress(done, total - self.copy.skipped());
        };
        progress(&ctl);
        ctl.pause_point().await;
        if self.sync == MirrorSyncMode::None {
            // Clusters are copied only before writes change them, until cancelled.
            while !ctl.is_cancelled() {
                ctl.idle().await;
                progress(&ctl);
            }
            return Ok(());
        }
        let mut next = self.copy.next(0);
        while let Some(idx) = next {
            if ctl.is_cancelled() {
                return Ok(());
            }
            match self.copy.copy_cluster(idx).await {
                Ok(bytes) => {
                    progress(&ctl);
                    ctl.rate_limit(bytes).await;
                    next = self.copy.next(idx + 1);
                }
                Err(e) => {
                    let policy = match e.is_read {
                        true => self.on_source_error,
                        false => self.on_target_error,
                    };
                    let errno = e.error.errno();
                    if ctl.error_action(policy, e.is_read, errno).await == ErrorAction::Report {
                        return Err(JobFailure(strerror(errno)));
                    }
                }
            }
        }
        if let Err(e) = self.target.node().flush().await {
            return Err(JobFailure(strerror(e.errno())));
        }
        Ok(())
    }

    /// Gives the sync bitmap back the bits it had at the freeze that
    /// `keep` says (QEMU's reclaim of the successor).
    fn restore_bitmap(&self, keep: impl Fn(&[u64]) -> Option<DirtyBitmap>) {
        let (Some(b), Some(words)) = (&self.bitmap, self.frozen_lock().take()) else {
            return;
        };
        if let Some(old) = keep(&words) {
            // Same size, by construction.
            let _ = b.bitmap.merge_from(&old);
        }
    }
}

/// A bitmap shaped like `like` holding `words`.
fn bitmap_with(like: &DirtyBitmap, words: Vec<u64>) -> DirtyBitmap {
    DirtyBitmap::new_with_words(
        String::new(),
        like.size(),
        like.granularity(),
        false,
        false,
        words,
    )
}

/// The bitmap's runs over `[offset, offset + len)`: (start, length, dirty).
fn runs(b: &DirtyBitmap, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let mut at = offset;
    b.extents(offset, len, usize::MAX)
        .into_iter()
        .map(|(l, dirty)| {
            let run = (at, l, dirty);
            at += l;
            run
        })
        .collect()
}

/// QEMU's error text for an errno (`strerror`).
fn strerror(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno)
        .to_string()
        .split(" (os error")
        .next()
        .unwrap_or_default()
        .to_string()
}

impl JobWork for BackupWork {
    fn run(self: Arc<Self>, ctl: JobCtl) -> BoxFuture<Result<(), JobFailure>> {
        Box::pin(self.run_job(ctl))
    }

    /// Success: the bitmap keeps only what was written since the freeze,
    /// unless `bitmap-mode=never`.
    fn commit(&self) {
        let never = self
            .bitmap
            .as_ref()
            .is_some_and(|b| b.mode == BitmapSyncMode::Never);
        let Some(b) = &self.bitmap else { return };
        self.restore_bitmap(|words| never.then(|| bitmap_with(&b.bitmap, words.to_vec())));
    }

    /// Failure: `always` drops the bits of what was copied, the other modes
    /// keep every bit.
    fn abort(&self) {
        let Some(b) = &self.bitmap else { return };
        let always = b.mode == BitmapSyncMode::Always;
        let pending = self.copy.pending_ranges();
        self.restore_bitmap(|words| {
            let old = bitmap_with(&b.bitmap, words.to_vec());
            if !always {
                return Some(old);
            }
            let left = bitmap_with(&b.bitmap, vec![0; words.len()]);
            for (offset, len) in &pending {
                for (at, l, dirty) in runs(&old, *offset, *len) {
                    if dirty {
                        left.set_range(at, l);
                    }
                }
            }
            Some(left)
        });
    }

    /// Arms the hook, closed: from now on writes to the source wait for
    /// the freeze (see the module's doc).
    fn begin(&self) {
        self.source().before_write().arm(self.copy.clone());
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn clean(&self) {
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.source().before_write().disarm();
        }
        // Writes waiting at the closed gate of a job that never started go on.
        self.copy.open();
        if let Some(b) = &self.bitmap {
            b.bitmap.set_busy(false);
        }
    }

    fn node_use(&self, name: &str) -> Option<NodeUse> {
        if self.target.node().node_name() == name {
            Some(NodeUse::Target)
        } else if self.source().node_name() == name {
            Some(NodeUse::Source)
        } else {
            None
        }
    }
}
