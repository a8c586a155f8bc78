//! The job table: every job's bookkeeping under one lock, the transitions
//! of QEMU's job.c (create, start, pause points, completion, transactions,
//! finalize, dismiss) and the events each sends.

use std::sync::{Arc, Mutex, MutexGuard};

use qmp::schema::job::{JobStatus, JobType};
use serde_json::{json, Value};
use tokio::sync::Notify;

use super::ctl::JobCtl;
use super::ratelimit::RateLimit;
use super::state::{apply_verb, is_completed, may_transition, JobVerb, VerbRefused};
use super::{JobFailure, JobWork, NodeUse};
use crate::config::is_well_formed_id;
use crate::events::EventBus;

/// A refused job command, with QEMU's text (and, for `block-job-*`, class).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// job-* commands name a job that does not exist.
    #[error("Job not found")]
    NotFound,
    /// block-job-* commands (QEMU answers DeviceNotActive).
    #[error("Block job '{0}' not found")]
    BlockJobNotFound(String),
    #[error(transparent)]
    Verb(#[from] VerbRefused),
    #[error("Job is already paused")]
    AlreadyPaused,
    #[error("Can't resume a job that was not paused")]
    NotPaused,
    #[error("Invalid job ID '{0}'")]
    InvalidId(String),
    #[error("Job ID '{0}' already in use")]
    IdInUse(String),
    #[error("Parameter 'speed' expects a non-negative value")]
    NegativeSpeed,
}

/// Jobs that complete together (QEMU's JobTxn): with `completion-mode=grouped`
/// one failure cancels the others. A job started alone is a transaction of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobTxn(u64);

/// What a new job is.
pub struct NewJob {
    pub id: String,
    pub kind: JobType,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    /// Bytes per second, 0 for no limit.
    pub speed: u64,
    pub work: Arc<dyn JobWork>,
}

/// QEMU's BlockDeviceIoStatus, as a job reports it after `on-*-error=stop`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum IoStatus {
    Ok,
    Failed,
    NoSpace,
}

/// One job's bookkeeping.
pub(super) struct Entry {
    pub serial: u64,
    pub id: String,
    pub kind: JobType,
    pub txn: u64,
    pub status: JobStatus,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    /// Pause requests outstanding (the user's, an error's stop, a drain).
    pub pause_count: u32,
    pub user_paused: bool,
    pub cancelled: bool,
    pub started: bool,
    /// Between pause points the job is working; at a pause point or asleep it is not.
    pub busy: bool,
    pub current: u64,
    pub total: u64,
    pub rate: RateLimit,
    pub io_status: IoStatus,
    /// Set when the work has returned (QEMU's `job->ret`, with its error text).
    pub ret: Option<Result<(), String>>,
    pub work: Arc<dyn JobWork>,
    /// Wakes the job's task: resumed, cancelled, speed changed.
    pub wake: Arc<Notify>,
}

#[derive(Default)]
pub(super) struct Jobs {
    /// Newest first, as QEMU lists them.
    pub list: Vec<Entry>,
    next_serial: u64,
    next_txn: u64,
    /// Transactions being aborted (QEMU's `txn->aborting`).
    aborting: Vec<u64>,
}

impl Jobs {
    pub fn get(&mut self, serial: u64) -> Option<&mut Entry> {
        self.list.iter_mut().find(|e| e.serial == serial)
    }

    fn by_id(&mut self, id: &str) -> Option<&mut Entry> {
        self.list.iter_mut().find(|e| e.id == id)
    }

    /// The serials of a transaction's jobs, in the order QEMU walks them.
    fn txn_members(&self, txn: u64) -> Vec<u64> {
        self.list
            .iter()
            .filter(|e| e.txn == txn)
            .map(|e| e.serial)
            .collect()
    }
}

pub struct JobTable {
    jobs: Mutex<Jobs>,
    events: EventBus,
}

impl std::fmt::Debug for JobTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobTable").finish_non_exhaustive()
    }
}

impl JobTable {
    pub fn new(events: EventBus) -> Self {
        Self {
            jobs: Mutex::default(),
            events,
        }
    }

    /// The jobs. Every change under this lock leaves each entry whole (no
    /// update can panic half-way), so a poisoned lock is used as it is.
    pub(super) fn lock(&self) -> MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn new_txn(&self) -> JobTxn {
        let mut jobs = self.lock();
        jobs.next_txn += 1;
        JobTxn(jobs.next_txn)
    }

    /// QEMU's `job_create`: checks the id, adds the job (status `created`).
    pub fn create(&self, new: NewJob, txn: Option<JobTxn>) -> Result<u64, JobError> {
        if !is_well_formed_id(&new.id) {
            return Err(JobError::InvalidId(new.id));
        }
        let mut jobs = self.lock();
        if jobs.by_id(&new.id).is_some() {
            return Err(JobError::IdInUse(new.id));
        }
        jobs.next_serial += 1;
        let serial = jobs.next_serial;
        let txn = match txn {
            Some(t) => t.0,
            None => {
                jobs.next_txn += 1;
                jobs.next_txn
            }
        };
        let mut rate = RateLimit::default();
        rate.set_speed(new.speed);
        jobs.list.insert(
            0,
            Entry {
                serial,
                id: new.id,
                kind: new.kind,
                txn,
                status: JobStatus::Undefined,
                auto_finalize: new.auto_finalize,
                auto_dismiss: new.auto_dismiss,
                pause_count: 1,
                user_paused: false,
                cancelled: false,
                started: false,
                busy: false,
                current: 0,
                total: 0,
                rate,
                io_status: IoStatus::Ok,
                ret: None,
                work: new.work,
                wake: Arc::new(Notify::new()),
            },
        );
        self.transition(&mut jobs, serial, JobStatus::Created);
        Ok(serial)
    }

    /// QEMU's `job_start` inside the drained section of `blockdev-backup`
    /// and `transaction`: the job starts, stops at its first pause point
    /// while its nodes are drained, and runs on when the drain ends, so a
    /// client sees running, paused, running, as qemu-storage-daemon sends.
    pub fn start_drained(self: &Arc<Self>, serial: u64) {
        let work = {
            let mut jobs = self.lock();
            let Some(e) = jobs.get(serial) else { return };
            e.started = true;
            e.pause_count -= 1;
            e.busy = true;
            let work = e.work.clone();
            work.begin();
            self.transition(&mut jobs, serial, JobStatus::Running);
            self.transition(&mut jobs, serial, JobStatus::Paused);
            self.transition(&mut jobs, serial, JobStatus::Running);
            work
        };
        let ctl = JobCtl::new(self.clone(), serial);
        let table = self.clone();
        // The work passes its first pause point itself, once it has done
        // what must not wait for a resume (a backup's freeze).
        tokio::spawn(async move {
            let ret = work.run(ctl).await;
            table.completed(serial, ret);
        });
    }

    /// A job created in a transaction that then failed: it never starts
    /// (created, aborting, concluded, null; no BLOCK_JOB_* event).
    pub fn discard_unstarted(&self, serial: u64) {
        let mut jobs = self.lock();
        if let Some(e) = jobs.get(serial) {
            e.cancelled = true;
            e.ret = Some(Err("Operation cancelled".into()));
            let txn = e.txn;
            self.txn_abort(&mut jobs, txn);
        }
    }

    /// Whether a job uses node `name` (QEMU's op blockers).
    pub fn node_busy(&self, name: &str) -> bool {
        self.node_use(name).is_some()
    }

    /// How a job uses node `name`, if one does.
    pub fn node_use(&self, name: &str) -> Option<NodeUse> {
        self.lock().list.iter().find_map(|e| e.work.node_use(name))
    }

    pub(super) fn events(&self) -> &EventBus {
        &self.events
    }

    /// Moves the job to `to`, announcing it as QEMU does (only real changes).
    pub(super) fn transition(&self, jobs: &mut Jobs, serial: u64, to: JobStatus) {
        let Some(e) = jobs.get(serial) else { return };
        let from = e.status;
        debug_assert!(
            may_transition(from, to),
            "job {} {} -> {}",
            e.id,
            from.as_str(),
            to.as_str()
        );
        e.status = to;
        if from != to {
            self.events.emit(
                "JOB_STATUS_CHANGE",
                Some(json!({ "id": e.id, "status": to.as_str() })),
            );
        }
    }

    /// QEMU's `job_completed`: the work returned.
    fn completed(&self, serial: u64, ret: Result<(), JobFailure>) {
        let mut jobs = self.lock();
        let Some(e) = jobs.get(serial) else { return };
        e.busy = false;
        e.ret = Some(ret.map_err(|f| f.0));
        let txn = e.txn;
        let failed = self.update_rc(&mut jobs, serial);
        if jobs.aborting.contains(&txn) || failed {
            self.txn_abort(&mut jobs, txn);
        } else {
            self.txn_success(&mut jobs, serial, txn);
        }
    }

    /// QEMU's `job_update_rc`: a cancelled job failed with ECANCELED, and a
    /// failed job is aborting. True if it failed.
    fn update_rc(&self, jobs: &mut Jobs, serial: u64) -> bool {
        let Some(e) = jobs.get(serial) else {
            return false;
        };
        if e.cancelled && matches!(e.ret, Some(Ok(()))) {
            e.ret = Some(Err("Operation cancelled".into()));
        }
        let failed = matches!(e.ret, Some(Err(_)));
        if failed {
            self.transition(jobs, serial, JobStatus::Aborting);
        }
        failed
    }

    fn txn_success(&self, jobs: &mut Jobs, serial: u64, txn: u64) {
        self.transition(jobs, serial, JobStatus::Waiting);
        let members = jobs.txn_members(txn);
        let all_done = members
            .iter()
            .all(|s| jobs.get(*s).is_some_and(|e| is_completed(e.status)));
        if !all_done {
            return;
        }
        for s in &members {
            self.transition(jobs, *s, JobStatus::Pending);
            let e = jobs.get(*s).expect("member listed above");
            if !e.auto_finalize {
                let data = json!({ "type": e.kind.as_str(), "id": e.id });
                self.events.emit("BLOCK_JOB_PENDING", Some(data));
            }
        }
        let manual = members
            .iter()
            .any(|s| jobs.get(*s).is_some_and(|e| !e.auto_finalize));
        if !manual {
            self.do_finalize(jobs, txn);
        }
    }

    /// QEMU's `job_do_finalize`: every job prepares, then each commits (or,
    /// if one failed to prepare, the transaction aborts).
    fn do_finalize(&self, jobs: &mut Jobs, txn: u64) {
        let members = jobs.txn_members(txn);
        for s in &members {
            let e = jobs.get(*s).expect("member listed above");
            if let Err(f) = e.work.prepare() {
                e.ret = Some(Err(f.0));
                self.txn_abort(jobs, txn);
                return;
            }
        }
        for s in members {
            self.finalize_single(jobs, s);
        }
    }

    /// QEMU's `job_completed_txn_abort`: every other job of the transaction
    /// is cancelled; once all have returned, each is finalized.
    fn txn_abort(&self, jobs: &mut Jobs, txn: u64) {
        if !jobs.aborting.contains(&txn) {
            jobs.aborting.push(txn);
        }
        let members = jobs.txn_members(txn);
        for s in &members {
            let e = jobs.get(*s).expect("member listed above");
            if e.ret.is_none() && !e.cancelled {
                e.cancelled = true;
                if e.user_paused {
                    e.user_paused = false;
                    e.pause_count -= 1;
                }
                e.wake.notify_one();
            }
        }
        // Jobs still running report back through `completed`, which comes here again.
        let running = members
            .iter()
            .any(|s| jobs.get(*s).is_some_and(|e| e.ret.is_none() && e.started));
        if running {
            return;
        }
        for s in members {
            self.finalize_single(jobs, s);
        }
        jobs.aborting.retain(|t| *t != txn);
    }

    /// QEMU's `job_finalize_single`: commit or abort, clean, the
    /// BLOCK_JOB_* event, then concluded (and null with auto-dismiss).
    fn finalize_single(&self, jobs: &mut Jobs, serial: u64) {
        if jobs.get(serial).is_some_and(|e| e.ret.is_none()) {
            // Never started: it ends cancelled.
            let e = jobs.get(serial).expect("checked above");
            e.cancelled = true;
            e.ret = Some(Ok(()));
        }
        self.update_rc(jobs, serial);
        let e = jobs.get(serial).expect("finalized jobs are in the table");
        match &e.ret {
            Some(Ok(())) => e.work.commit(),
            _ => e.work.abort(),
        }
        e.work.clean();
        if e.started {
            let mut data = json!({
                "type": e.kind.as_str(),
                "device": e.id,
                "len": e.total,
                "offset": e.current,
                "speed": e.rate.speed(),
            });
            let name = if e.cancelled {
                "BLOCK_JOB_CANCELLED"
            } else {
                if let Some(Err(msg)) = &e.ret {
                    data["error"] = json!(msg);
                }
                "BLOCK_JOB_COMPLETED"
            };
            self.events.emit(name, Some(data));
        }
        e.txn = 0;
        let dismiss = e.auto_dismiss || !e.started;
        self.transition(jobs, serial, JobStatus::Concluded);
        if dismiss {
            self.do_dismiss(jobs, serial);
        }
    }

    fn do_dismiss(&self, jobs: &mut Jobs, serial: u64) {
        self.transition(jobs, serial, JobStatus::Null);
        jobs.list.retain(|e| e.serial != serial);
    }

    /// Finds a job for a job-* command (`block` false) or a block-job-* one.
    fn find(jobs: &mut Jobs, id: &str, block: bool) -> Result<u64, JobError> {
        match jobs.by_id(id) {
            Some(e) => Ok(e.serial),
            None if block => Err(JobError::BlockJobNotFound(id.to_string())),
            None => Err(JobError::NotFound),
        }
    }

    fn verb(jobs: &mut Jobs, id: &str, block: bool, verb: JobVerb) -> Result<u64, JobError> {
        let serial = Self::find(jobs, id, block)?;
        let e = jobs.get(serial).expect("found above");
        apply_verb(&e.id, e.status, verb)?;
        Ok(serial)
    }

    /// `job-pause` / `block-job-pause`.
    pub fn pause(&self, id: &str, block: bool) -> Result<(), JobError> {
        let mut jobs = self.lock();
        let serial = Self::verb(&mut jobs, id, block, JobVerb::Pause)?;
        let e = jobs.get(serial).expect("found above");
        if e.user_paused {
            return Err(JobError::AlreadyPaused);
        }
        e.user_paused = true;
        e.pause_count += 1;
        e.wake.notify_one();
        Ok(())
    }

    /// `job-resume` / `block-job-resume`.
    pub fn resume(&self, id: &str, block: bool) -> Result<(), JobError> {
        let mut jobs = self.lock();
        let serial = Self::find(&mut jobs, id, block)?;
        let e = jobs.get(serial).expect("found above");
        if !e.user_paused || e.pause_count == 0 {
            return Err(JobError::NotPaused);
        }
        apply_verb(&e.id, e.status, JobVerb::Resume)?;
        e.io_status = IoStatus::Ok;
        e.user_paused = false;
        e.pause_count -= 1;
        if e.pause_count == 0 {
            e.wake.notify_one();
        }
        Ok(())
    }

    /// `job-cancel` / `block-job-cancel`. A job that is not ready is
    /// cancelled hard whatever `force` says (QEMU's rule); no job bexd runs
    /// becomes ready.
    pub fn cancel(&self, id: &str, block: bool) -> Result<(), JobError> {
        let mut jobs = self.lock();
        let serial = Self::verb(&mut jobs, id, block, JobVerb::Cancel)?;
        let e = jobs.get(serial).expect("found above");
        if e.user_paused {
            e.user_paused = false;
            e.pause_count -= 1;
        }
        e.cancelled = true;
        let txn = e.txn;
        if !e.started {
            e.ret = Some(Ok(()));
            self.txn_abort(&mut jobs, txn);
        } else if e.ret.is_some() {
            // Waiting or pending: the work is over, so the abort is now.
            self.txn_abort(&mut jobs, txn);
        } else {
            e.wake.notify_one();
        }
        Ok(())
    }

    /// `job-complete` / `block-job-complete`: only a ready job takes it,
    /// and no job bexd runs becomes ready.
    pub fn complete(&self, id: &str, block: bool) -> Result<(), JobError> {
        let mut jobs = self.lock();
        Self::verb(&mut jobs, id, block, JobVerb::Complete).map(|_| ())
    }

    /// `job-finalize` / `block-job-finalize`: the whole transaction.
    pub fn finalize(&self, id: &str, block: bool) -> Result<(), JobError> {
        let mut jobs = self.lock();
        let serial = Self::verb(&mut jobs, id, block, JobVerb::Finalize)?;
        let txn = jobs.get(serial).expect("found above").txn;
        self.do_finalize(&mut jobs, txn);
        Ok(())
    }

    /// `job-dismiss` / `block-job-dismiss`.
    pub fn dismiss(&self, id: &str, block: bool) -> Result<(), JobError> {
        let mut jobs = self.lock();
        let serial = Self::verb(&mut jobs, id, block, JobVerb::Dismiss)?;
        self.do_dismiss(&mut jobs, serial);
        Ok(())
    }

    /// `block-job-set-speed`.
    pub fn set_speed(&self, id: &str, speed: i64) -> Result<(), JobError> {
        let mut jobs = self.lock();
        let serial = Self::verb(&mut jobs, id, true, JobVerb::SetSpeed)?;
        let speed = u64::try_from(speed).map_err(|_| JobError::NegativeSpeed)?;
        let e = jobs.get(serial).expect("found above");
        e.rate.set_speed(speed);
        e.wake.notify_one();
        Ok(())
    }

    /// `query-jobs`.
    pub fn query_jobs(&self) -> Value {
        let jobs = self.lock();
        jobs.list
            .iter()
            .map(|e| {
                let mut info = json!({
                    "id": e.id,
                    "type": e.kind.as_str(),
                    "status": e.status.as_str(),
                    "current-progress": e.current,
                    "total-progress": e.total,
                });
                if let Some(Err(msg)) = &e.ret {
                    info["error"] = json!(msg);
                }
                info
            })
            .collect()
    }

    /// `query-block-jobs`.
    pub fn query_block_jobs(&self) -> Value {
        let jobs = self.lock();
        jobs.list
            .iter()
            .map(|e| {
                let mut info = json!({
                    "type": e.kind.as_str(),
                    "device": e.id,
                    "len": e.total,
                    "offset": e.current,
                    "busy": e.busy,
                    "paused": e.pause_count > 0,
                    "speed": e.rate.speed(),
                    "io-status": match e.io_status {
                        IoStatus::Ok => "ok",
                        IoStatus::Failed => "failed",
                        IoStatus::NoSpace => "nospace",
                    },
                    "ready": matches!(e.status, JobStatus::Ready | JobStatus::Standby),
                    "status": e.status.as_str(),
                    "auto-finalize": e.auto_finalize,
                    "auto-dismiss": e.auto_dismiss,
                });
                if let Some(Err(msg)) = &e.ret {
                    info["error"] = json!(msg);
                }
                info
            })
            .collect()
    }
}
