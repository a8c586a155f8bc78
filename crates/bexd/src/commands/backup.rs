//! `blockdev-backup`, alone or as a `transaction` action: QEMU's checks in
//! QEMU's order (blockdev.c's `do_backup_common`, then backup.c's
//! `backup_job_create`), then a backup job (`jobs/backup.rs`).

use std::sync::Arc;

use qmp::schema::job::{BitmapSyncMode, BlockdevBackup, BlockdevOnError, JobType, MirrorSyncMode};
use qmp::visitor::{from_value, InputMode};
use qmp::QmpError;
use serde_json::Value;

use super::job::qmp_error;
use super::{ok, Args};
use crate::daemon::Daemon;
use crate::jobs::backup::{BackupWork, SyncBitmap};
use crate::jobs::{JobTxn, NewJob};
use crate::nodes::bitmaps::{check_usable, Use};

pub fn blockdev_backup(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let b: BlockdevBackup = from_value(Value::Object(args), InputMode::Json)?;
    let serial = prepare(daemon, b, None)?;
    daemon.jobs.start_drained(serial);
    Ok(ok())
}

fn generic(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg.into())
}

fn not_found(name: &str) -> QmpError {
    generic(format!(
        "Cannot find device='{name}' nor node-name='{name}'"
    ))
}

/// Checks `b` and creates its job (status `created`), not yet started.
pub fn prepare(
    daemon: &Arc<Daemon>,
    mut b: BlockdevBackup,
    txn: Option<JobTxn>,
) -> Result<u64, QmpError> {
    let source = daemon
        .nodes
        .find(&b.device)
        .ok_or_else(|| not_found(&b.device))?;
    let target = daemon
        .nodes
        .find(&b.target)
        .ok_or_else(|| not_found(&b.target))?;
    if matches!(b.sync, MirrorSyncMode::Bitmap | MirrorSyncMode::Incremental) && b.bitmap.is_none()
    {
        return Err(generic(format!(
            "must provide a valid bitmap name for '{}' sync mode",
            b.sync.as_str()
        )));
    }
    if b.sync == MirrorSyncMode::Incremental {
        if b.bitmap_mode
            .is_some_and(|m| m != BitmapSyncMode::OnSuccess)
        {
            return Err(generic(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
            ));
        }
        b.sync = MirrorSyncMode::Bitmap;
        b.bitmap_mode = Some(BitmapSyncMode::OnSuccess);
    }
    let sync_bitmap = match &b.bitmap {
        Some(name) => {
            let bitmap = source
                .bitmaps()
                .find(name)
                .ok_or_else(|| generic(format!("Bitmap '{name}' could not be found")))?;
            let Some(mode) = b.bitmap_mode else {
                return Err(generic(
                    "Bitmap sync mode must be given when providing a bitmap",
                ));
            };
            check_usable(&bitmap, Use::Read)?;
            if b.sync == MirrorSyncMode::None {
                return Err(generic(
                    "sync mode 'none' does not produce meaningful bitmap outputs",
                ));
            }
            if mode == BitmapSyncMode::Never && b.sync != MirrorSyncMode::Bitmap {
                return Err(generic(format!(
                    "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{}'",
                    b.sync.as_str()
                )));
            }
            Some(SyncBitmap { bitmap, mode })
        }
        None if b.bitmap_mode.is_some() => {
            return Err(generic("Cannot specify bitmap sync mode without a bitmap"))
        }
        None => None,
    };
    refuse_unsupported(&b, daemon)?;
    if Arc::ptr_eq(&source, &target) {
        return Err(generic("Source and target cannot be the same"));
    }
    if b.compress == Some(true) {
        return Err(match target.driver_name() {
            "qcow2" => generic(format!(
                "bexd cannot write compressed qcow2 clusters yet (target '{}')",
                b.target
            )),
            // QEMU names the drive by its device name: a node has none.
            _ => generic("Compression is not supported for this drive "),
        });
    }
    for node in [&b.target, &b.device] {
        if daemon.jobs.node_busy(node) {
            return Err(generic(format!(
                "Node '{node}' is busy: block device is in use by block job: backup"
            )));
        }
    }
    if let Some(s) = &sync_bitmap {
        if s.mode != BitmapSyncMode::Never {
            check_usable(&s.bitmap, Use::Modify)?;
        }
    }
    if source.size() != target.size() {
        return Err(generic("Source and target image have different sizes"));
    }
    if target.read_only() {
        return Err(generic("Block node is read-only"));
    }
    if daemon.nodes.parents(&b.device) > 0 {
        // Writes through a format above reach the source's driver, not
        // its node, so the copy-before-write hook would not see them.
        return Err(generic(format!(
            "bexd backs up only a node no other node uses: '{}' is a child; back up the node above it",
            b.device
        )));
    }
    let speed = match b.speed {
        Some(s) if s < 0 => return Err(generic("Parameter 'speed' expects a non-negative value")),
        Some(s) => s as u64,
        None => 0,
    };
    let source_hold = daemon
        .nodes
        .hold(&b.device)
        .map_err(|_| not_found(&b.device))?;
    let target_hold = daemon
        .nodes
        .hold(&b.target)
        .map_err(|_| not_found(&b.target))?;
    let work = Arc::new(BackupWork::new(
        source_hold,
        target_hold,
        b.sync,
        sync_bitmap,
        b.on_source_error.unwrap_or(BlockdevOnError::Report),
        b.on_target_error.unwrap_or(BlockdevOnError::Report),
    ));
    let job = NewJob {
        // QEMU falls back on the device's name, which a node-only graph lacks.
        id: b.job_id.unwrap_or_default(),
        kind: JobType::Backup,
        auto_finalize: b.auto_finalize.unwrap_or(true),
        auto_dismiss: b.auto_dismiss.unwrap_or(true),
        speed,
        work: work.clone(),
    };
    daemon.jobs.create(job, txn).map_err(|e| {
        crate::jobs::JobWork::clean(work.as_ref());
        qmp_error(e)
    })
}

/// Members bexd does not act on are refused, not ignored.
fn refuse_unsupported(b: &BlockdevBackup, daemon: &Daemon) -> Result<(), QmpError> {
    if let Some(name) = &b.filter_node_name {
        if daemon.nodes.find(name).is_some() {
            return Err(generic(format!(
                "Could not create node: Duplicate nodes with node-name='{name}'"
            )));
        }
        return Err(generic(
            "bexd runs a backup's copy-before-write in the source node itself; 'filter-node-name' is not supported",
        ));
    }
    if b.discard_source == Some(true) {
        return Err(generic("bexd does not support 'discard-source'"));
    }
    if b.x_perf.is_some() {
        return Err(generic("bexd does not support 'x-perf'"));
    }
    Ok(())
}
