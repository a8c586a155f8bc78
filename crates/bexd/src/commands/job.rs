//! The job commands: query-jobs, job-*, query-block-jobs and block-job-*.
//! The rules (which verb in which status, QEMU's texts) are the job
//! table's; this is the QMP edge.

use std::sync::Arc;

use qmp::schema::job::{BlockJobCancelArgs, BlockJobDeviceArgs, BlockJobSetSpeedArgs, JobIdArgs};
use qmp::visitor::{from_value, FromQapi, InputMode};
use qmp::{ErrorClass, QmpError};
use serde_json::Value;

use super::{no_args, ok, Args};
use crate::daemon::Daemon;
use crate::jobs::{JobError, JobTable};

fn read<T: FromQapi>(args: Args) -> Result<T, QmpError> {
    from_value(Value::Object(args), InputMode::Json)
}

/// QEMU answers DeviceNotActive for a block job that is not there, GenericError otherwise.
pub fn qmp_error(e: JobError) -> QmpError {
    match e {
        JobError::BlockJobNotFound(_) => QmpError::new(ErrorClass::DeviceNotActive, e.to_string()),
        e => QmpError::generic(e.to_string()),
    }
}

type Verb = fn(&JobTable, &str, bool) -> Result<(), JobError>;

fn by_id(daemon: &Arc<Daemon>, args: Args, verb: Verb, block: bool) -> Result<Value, QmpError> {
    let a: JobIdArgs = read(args)?;
    verb(&daemon.jobs, &a.id, block).map_err(qmp_error)?;
    Ok(ok())
}

fn by_device(daemon: &Arc<Daemon>, args: Args, verb: Verb) -> Result<Value, QmpError> {
    let a: BlockJobDeviceArgs = read(args)?;
    verb(&daemon.jobs, &a.device, true).map_err(qmp_error)?;
    Ok(ok())
}

pub fn query_jobs(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    no_args(args)?;
    Ok(daemon.jobs.query_jobs())
}

pub fn query_block_jobs(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    no_args(args)?;
    Ok(daemon.jobs.query_block_jobs())
}

pub fn job_pause(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    by_id(daemon, args, JobTable::pause, false)
}

pub fn job_resume(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    by_id(daemon, args, JobTable::resume, false)
}

pub fn job_cancel(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    by_id(daemon, args, JobTable::cancel, false)
}

pub fn job_complete(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    by_id(daemon, args, JobTable::complete, false)
}

pub fn job_finalize(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    by_id(daemon, args, JobTable::finalize, false)
}

pub fn job_dismiss(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    by_id(daemon, args, JobTable::dismiss, false)
}

pub fn block_job_pause(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    by_device(daemon, args, JobTable::pause)
}

pub fn block_job_resume(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    by_device(daemon, args, JobTable::resume)
}

pub fn block_job_complete(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    by_device(daemon, args, JobTable::complete)
}

/// `force` matters only for a ready job, and no job bexd runs becomes ready.
pub fn block_job_cancel(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let a: BlockJobCancelArgs = read(args)?;
    daemon.jobs.cancel(&a.device, true).map_err(qmp_error)?;
    Ok(ok())
}

pub fn block_job_finalize(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    by_id(daemon, args, JobTable::finalize, true)
}

pub fn block_job_dismiss(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    by_id(daemon, args, JobTable::dismiss, true)
}

pub fn block_job_set_speed(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let a: BlockJobSetSpeedArgs = read(args)?;
    daemon
        .jobs
        .set_speed(&a.device, a.speed)
        .map_err(qmp_error)?;
    Ok(ok())
}
