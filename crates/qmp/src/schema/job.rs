//! qapi/job.json and the job parts of qapi/block-core.json: job control
//! commands, `blockdev-backup`, the job queries and the job events.

use crate::{qapi_enum, qapi_object, qapi_struct};

qapi_enum!(
    /// QEMU's JobStatus: where a job is in its life (see `jobs/state.rs`).
    JobStatus {
        Undefined = "undefined",
        Created = "created",
        Running = "running",
        Paused = "paused",
        Ready = "ready",
        Standby = "standby",
        Waiting = "waiting",
        Pending = "pending",
        Aborting = "aborting",
        Concluded = "concluded",
        Null = "null",
    }
);

qapi_enum!(
    /// The kinds of job; bexd runs backups only, so only that one is listed.
    JobType { Backup = "backup" }
);

qapi_enum!(
    /// What blockdev-backup copies.
    MirrorSyncMode {
        Top = "top",
        Full = "full",
        None = "none",
        Incremental = "incremental",
        Bitmap = "bitmap",
    }
);

qapi_enum!(
    /// What happens to the sync bitmap when the backup ends.
    BitmapSyncMode { OnSuccess = "on-success", Never = "never", Always = "always" }
);

qapi_enum!(
    /// What a job does on an I/O error.
    BlockdevOnError {
        Report = "report",
        Ignore = "ignore",
        Enospc = "enospc",
        Stop = "stop",
        Auto = "auto",
    }
);

qapi_struct! {
    /// BackupPerf (`x-perf`): tuning QEMU offers for tests.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BackupPerf {
        opt "use-copy-range" use_copy_range: bool,
        opt "max-workers" max_workers: i64,
        opt "max-chunk" max_chunk: i64,
    }
}

qapi_struct! {
    /// blockdev-backup's arguments (BlockdevBackup, BackupCommon's members first).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BlockdevBackup {
        opt "job-id" job_id: String,
        req "device" device: String,
        req "sync" sync: MirrorSyncMode,
        opt "speed" speed: i64,
        opt "bitmap" bitmap: String,
        opt "bitmap-mode" bitmap_mode: BitmapSyncMode,
        opt "compress" compress: bool,
        opt "on-source-error" on_source_error: BlockdevOnError,
        opt "on-target-error" on_target_error: BlockdevOnError,
        opt "auto-finalize" auto_finalize: bool,
        opt "auto-dismiss" auto_dismiss: bool,
        opt "filter-node-name" filter_node_name: String,
        opt "discard-source" discard_source: bool,
        opt "x-perf" x_perf: BackupPerf,
        req "target" target: String,
    }
}

qapi_struct! {
    /// The job-* commands' one argument.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct JobIdArgs {
        req "id" id: String,
    }
}

qapi_struct! {
    /// block-job-pause, -resume and -complete name the job as `device`.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BlockJobDeviceArgs {
        req "device" device: String,
    }
}

qapi_struct! {
    /// block-job-cancel's arguments.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BlockJobCancelArgs {
        req "device" device: String,
        opt "force" force: bool,
    }
}

qapi_struct! {
    /// block-job-set-speed's arguments.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BlockJobSetSpeedArgs {
        req "device" device: String,
        req "speed" speed: i64,
    }
}

qapi_object! {
    /// One entry of query-jobs.
    pub JobInfo {
        req "id": String,
        req "type": JobType,
        req "status": JobStatus,
        req "current-progress": i64,
        req "total-progress": i64,
        opt "error": String,
    }
}

qapi_object! {
    /// One entry of query-block-jobs.
    pub BlockJobInfo {
        req "type": String,
        req "device": String,
        req "len": i64,
        req "offset": i64,
        req "busy": bool,
        req "paused": bool,
        req "speed": i64,
        req "io-status": String,
        req "ready": bool,
        req "status": JobStatus,
        req "auto-finalize": bool,
        req "auto-dismiss": bool,
        opt "error": String,
    }
}

qapi_object! {
    /// JOB_STATUS_CHANGE's data.
    pub JobStatusChangeEvent {
        req "id": String,
        req "status": JobStatus,
    }
}

qapi_object! {
    /// BLOCK_JOB_COMPLETED's data.
    pub BlockJobCompletedEvent {
        req "type": JobType,
        req "device": String,
        req "len": i64,
        req "offset": i64,
        req "speed": i64,
        opt "error": String,
    }
}

qapi_object! {
    /// BLOCK_JOB_CANCELLED's and BLOCK_JOB_READY's data.
    pub BlockJobCancelledEvent {
        req "type": JobType,
        req "device": String,
        req "len": i64,
        req "offset": i64,
        req "speed": i64,
    }
}

qapi_object! {
    /// BLOCK_JOB_ERROR's data.
    pub BlockJobErrorEvent {
        req "device": String,
        req "operation": String,
        req "action": String,
    }
}

qapi_object! {
    /// BLOCK_JOB_PENDING's data.
    pub BlockJobPendingEvent {
        req "type": JobType,
        req "id": String,
    }
}
