//! QMP commands. Each is defined once, in the table below: its name, the
//! QAPI types of its arguments and reply, and its handler. Dispatch,
//! `query-commands` and `query-qmp-schema` are all read from that table
//! (`registry.rs`), so they cannot disagree; each family's handlers live in
//! their own file.

pub(crate) mod backup;
pub(crate) mod bitmap;
mod blockdev;
mod chardev;
mod executor;
mod export;
mod job;
mod object;
mod qom;
mod query;
mod registry;
#[cfg(test)]
mod registry_tests;
mod reopen;
mod stats;

pub use blockdev::add as blockdev_add;
pub use executor::Executor;
pub use export::{block_export_add, nbd_server_start};
pub use object::create_and_add as create_and_add_object;
pub use registry::{dispatch, exists, not_found};

use std::sync::Arc;

use qmp::introspect::{describe, Empty};
use qmp::schema::bitmap::{
    BlockDirtyBitmap, BlockDirtyBitmapAdd, BlockDirtyBitmapMerge, Transaction,
};
use qmp::schema::block_core::{
    BlockDeviceInfo, BlockImageCorruptedEvent, BlockSetWriteThresholdArgs,
    BlockWriteThresholdEvent, BlockdevDelArgs, BlockdevOptions, BlockdevReopenArgs,
    QueryNamedBlockNodesArgs,
};
use qmp::schema::block_export::{
    BlockExportDelArgs, BlockExportDeletedEvent, BlockExportInfo, BlockExportOptions,
    NbdServerAddOptions, NbdServerOptionsLegacy, NbdServerRemoveArgs,
};
use qmp::schema::block_stats::{BlockStats, ExportStats, QueryBlockstatsArgs};
use qmp::schema::char::{ChardevBackendInfo, ChardevInfo, ClosefdArgs, GetfdArgs};
use qmp::schema::control::{CommandInfo, QmpCapabilitiesArgs, SchemaInfo, VersionInfo};
use qmp::schema::job::{
    BlockJobCancelArgs, BlockJobCancelledEvent, BlockJobCompletedEvent, BlockJobDeviceArgs,
    BlockJobErrorEvent, BlockJobInfo, BlockJobPendingEvent, BlockJobSetSpeedArgs, BlockdevBackup,
    JobIdArgs, JobInfo, JobStatusChangeEvent,
};
use qmp::schema::object::{ObjectDelArgs, ObjectOptions, QomGetArgs, QomSetArgs};
use qmp::{ErrorClass, QmpError};
use serde_json::{Map, Value};

use crate::daemon::Daemon;
use registry::{commands, Args, Command, Event};

commands! {
    "qmp_capabilities" (QmpCapabilitiesArgs) -> Empty => negotiated_already,
    "query-version" (Empty) -> VersionInfo => query::version,
    "query-commands" (Empty) -> Vec<CommandInfo> => query::commands,
    "query-qmp-schema" (Empty) -> Vec<SchemaInfo> => query::schema,
    "quit" (Empty) -> Empty => quit,
    "blockdev-add" (BlockdevOptions) -> Empty => blockdev::add_qmp,
    "blockdev-del" (BlockdevDelArgs) -> Empty => blockdev::del,
    "blockdev-reopen" (BlockdevReopenArgs) -> Empty => reopen::reopen,
    "block-set-write-threshold" (BlockSetWriteThresholdArgs) -> Empty
        => blockdev::set_write_threshold,
    "query-named-block-nodes" (QueryNamedBlockNodesArgs) -> Vec<BlockDeviceInfo>
        => query::named_block_nodes,
    "object-add" (ObjectOptions) -> Empty => object::add,
    "object-del" (ObjectDelArgs) -> Empty => object::del,
    "qom-get" (QomGetArgs) -> Value => qom::get,
    "qom-set" (QomSetArgs) -> Empty => qom::set,
    "nbd-server-start" (NbdServerOptionsLegacy) -> Empty => export::nbd_server_start_qmp,
    "nbd-server-stop" (Empty) -> Empty => export::nbd_server_stop,
    "nbd-server-add" (NbdServerAddOptions) -> Empty ["deprecated"] => export::nbd_server_add,
    "nbd-server-remove" (NbdServerRemoveArgs) -> Empty ["deprecated"]
        => export::nbd_server_remove,
    "block-export-add" (BlockExportOptions) -> Empty => export::block_export_add_qmp,
    "block-export-del" (BlockExportDelArgs) -> Empty => export::block_export_del,
    "query-block-exports" (Empty) -> Vec<BlockExportInfo> => query::block_exports,
    "query-blockstats" (QueryBlockstatsArgs) -> Vec<BlockStats> => stats::query_blockstats,
    "x-query-export-stats" (Empty) -> Vec<ExportStats> => stats::export_stats,
    "block-dirty-bitmap-add" (BlockDirtyBitmapAdd) -> Empty => bitmap::single::add,
    "block-dirty-bitmap-remove" (BlockDirtyBitmap) -> Empty => bitmap::single::remove,
    "block-dirty-bitmap-clear" (BlockDirtyBitmap) -> Empty => bitmap::single::clear,
    "block-dirty-bitmap-enable" (BlockDirtyBitmap) -> Empty => bitmap::single::enable,
    "block-dirty-bitmap-disable" (BlockDirtyBitmap) -> Empty => bitmap::single::disable,
    "block-dirty-bitmap-merge" (BlockDirtyBitmapMerge) -> Empty => bitmap::single::merge,
    "transaction" (Transaction) -> Empty => bitmap::transaction,
    "blockdev-backup" (BlockdevBackup) -> Empty => backup::blockdev_backup,
    "query-jobs" (Empty) -> Vec<JobInfo> => job::query_jobs,
    "job-pause" (JobIdArgs) -> Empty => job::job_pause,
    "job-resume" (JobIdArgs) -> Empty => job::job_resume,
    "job-cancel" (JobIdArgs) -> Empty => job::job_cancel,
    "job-complete" (JobIdArgs) -> Empty => job::job_complete,
    "job-dismiss" (JobIdArgs) -> Empty => job::job_dismiss,
    "job-finalize" (JobIdArgs) -> Empty => job::job_finalize,
    "query-block-jobs" (Empty) -> Vec<BlockJobInfo> => job::query_block_jobs,
    "block-job-set-speed" (BlockJobSetSpeedArgs) -> Empty => job::block_job_set_speed,
    "block-job-cancel" (BlockJobCancelArgs) -> Empty => job::block_job_cancel,
    "block-job-pause" (BlockJobDeviceArgs) -> Empty => job::block_job_pause,
    "block-job-resume" (BlockJobDeviceArgs) -> Empty => job::block_job_resume,
    "block-job-complete" (BlockJobDeviceArgs) -> Empty => job::block_job_complete,
    "block-job-dismiss" (JobIdArgs) -> Empty => job::block_job_dismiss,
    "block-job-finalize" (JobIdArgs) -> Empty => job::block_job_finalize,
    "query-chardev" (Empty) -> Vec<ChardevInfo> => chardev::query,
    "query-chardev-backends" (Empty) -> Vec<ChardevBackendInfo> => chardev::query_backends,
    "getfd" (GetfdArgs) -> Empty => chardev::getfd,
    "closefd" (ClosefdArgs) -> Empty => chardev::closefd,
}

/// The events bexd emits, for `query-qmp-schema`.
pub static EVENTS: &[Event] = &[
    Event {
        name: "BLOCK_EXPORT_DELETED",
        data: describe::<BlockExportDeletedEvent>,
    },
    Event {
        name: "BLOCK_WRITE_THRESHOLD",
        data: describe::<BlockWriteThresholdEvent>,
    },
    Event {
        name: "BLOCK_IMAGE_CORRUPTED",
        data: describe::<BlockImageCorruptedEvent>,
    },
    Event {
        name: "JOB_STATUS_CHANGE",
        data: describe::<JobStatusChangeEvent>,
    },
    Event {
        name: "BLOCK_JOB_COMPLETED",
        data: describe::<BlockJobCompletedEvent>,
    },
    Event {
        name: "BLOCK_JOB_CANCELLED",
        data: describe::<BlockJobCancelledEvent>,
    },
    Event {
        name: "BLOCK_JOB_ERROR",
        data: describe::<BlockJobErrorEvent>,
    },
    Event {
        name: "BLOCK_JOB_PENDING",
        data: describe::<BlockJobPendingEvent>,
    },
];

/// `qmp_capabilities` once negotiated (the monitor runs the negotiation itself).
fn negotiated_already(_daemon: &Arc<Daemon>, _args: Args) -> Result<Value, QmpError> {
    Err(QmpError::new(
        ErrorClass::CommandNotFound,
        "Capabilities negotiation is already complete, command ignored",
    ))
}

fn quit(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    no_args(args)?;
    // QEMU announces every export's deletion before the quit's return.
    daemon.exports.remove_all(None);
    Ok(ok())
}

/// Commands without arguments still refuse unknown ones, as QEMU does.
fn no_args(args: Args) -> Result<(), QmpError> {
    match args.keys().next() {
        Some(key) => Err(QmpError::generic(format!(
            "Parameter '{key}' is unexpected"
        ))),
        None => Ok(()),
    }
}

fn ok() -> Value {
    Value::Object(Map::new())
}
