//! What a job's work sees of its job: pause points, cancellation, progress,
//! its speed limit and QEMU's error policy (`on-source-error`,
//! `on-target-error`).

use std::sync::Arc;
use std::time::Instant;

use qmp::schema::job::{BlockdevOnError, JobStatus};
use serde_json::json;

use super::table::{IoStatus, JobTable};

/// What to do about a failed request, decided by the job's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorAction {
    /// Fail the job with the error.
    Report,
    /// Try the request again (QEMU's backup retries; `stop` has paused the
    /// job until the user resumed it).
    Retry,
}

/// The handle a job's work holds on its job.
#[derive(Clone)]
pub struct JobCtl {
    table: Arc<JobTable>,
    serial: u64,
}

impl JobCtl {
    pub(super) fn new(table: Arc<JobTable>, serial: u64) -> Self {
        Self { table, serial }
    }

    fn with<T>(&self, f: impl FnOnce(&mut super::table::Entry) -> T) -> Option<T> {
        self.table.lock().get(self.serial).map(f)
    }

    pub fn is_cancelled(&self) -> bool {
        self.with(|e| e.cancelled).unwrap_or(true)
    }

    /// Progress as QMP shows it: bytes done, and done plus still to do.
    pub fn set_progress(&self, current: u64, total: u64) {
        self.with(|e| {
            e.current = current;
            e.total = total;
        });
    }

    /// Waits until something happens to the job (a pause, a resume, a
    /// cancel, a new speed), passing a pause point: a job with nothing to
    /// do but wait (`sync=none`) sits here.
    pub async fn idle(&self) {
        let Some(wake) = self.with(|e| {
            e.busy = false;
            e.wake.clone()
        }) else {
            return;
        };
        if !self.is_cancelled() {
            wake.notified().await;
        }
        self.pause_point().await;
    }

    /// QEMU's `job_pause_point`: while a pause is asked for (and the job is
    /// not cancelled) the job shows `paused` (`standby` if it was ready)
    /// and waits; then it shows what it was before.
    pub async fn pause_point(&self) {
        let mut resume_to = None;
        loop {
            let wake = {
                let mut jobs = self.table.lock();
                let Some(e) = jobs.get(self.serial) else {
                    return;
                };
                if e.cancelled || e.pause_count == 0 {
                    e.busy = true;
                    if let Some(to) = resume_to {
                        self.table.transition(&mut jobs, self.serial, to);
                    }
                    return;
                }
                e.busy = false;
                if resume_to.is_none() {
                    let status = e.status;
                    resume_to = Some(status);
                    let paused = match status {
                        JobStatus::Ready => JobStatus::Standby,
                        _ => JobStatus::Paused,
                    };
                    self.table.transition(&mut jobs, self.serial, paused);
                }
                jobs.get(self.serial).expect("found above").wake.clone()
            };
            wake.notified().await;
        }
    }

    /// Counts `bytes` against the speed limit and waits as long as it says
    /// (a resume, a cancel or a new speed cuts the wait short), then passes
    /// a pause point.
    pub async fn rate_limit(&self, bytes: u64) {
        let Some((delay, wake)) = self.with(|e| {
            e.rate.dispatch(bytes);
            (e.rate.delay(Instant::now()), e.wake.clone())
        }) else {
            return;
        };
        if !delay.is_zero() && !self.is_cancelled() {
            self.with(|e| e.busy = false);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = wake.notified() => {}
            }
            self.with(|e| e.busy = true);
        }
        self.pause_point().await
    }

    /// QEMU's `block_job_error_action`: decides by `policy` what a failed
    /// read (`is_read`) or write with `errno` does, tells QMP clients
    /// (BLOCK_JOB_ERROR), and on `stop` pauses the job as the user would
    /// have, waiting for `job-resume` before the retry.
    pub async fn error_action(
        &self,
        policy: BlockdevOnError,
        is_read: bool,
        errno: i32,
    ) -> ErrorAction {
        let action = match policy {
            BlockdevOnError::Enospc | BlockdevOnError::Auto if errno == libc::ENOSPC => "stop",
            BlockdevOnError::Enospc | BlockdevOnError::Auto | BlockdevOnError::Report => "report",
            BlockdevOnError::Stop => "stop",
            BlockdevOnError::Ignore => "ignore",
        };
        {
            let mut jobs = self.table.lock();
            let Some(e) = jobs.get(self.serial) else {
                return ErrorAction::Report;
            };
            if !e.cancelled {
                let data = json!({
                    "device": e.id,
                    "operation": if is_read { "read" } else { "write" },
                    "action": action,
                });
                self.table.events().emit("BLOCK_JOB_ERROR", Some(data));
            }
            if action == "stop" {
                if !e.user_paused {
                    e.pause_count += 1;
                    e.user_paused = true;
                }
                e.io_status = match errno == libc::ENOSPC {
                    true => IoStatus::NoSpace,
                    false => IoStatus::Failed,
                };
            }
        }
        match action {
            "report" => ErrorAction::Report,
            "ignore" => {
                tokio::task::yield_now().await;
                ErrorAction::Retry
            }
            _ => {
                self.pause_point().await;
                ErrorAction::Retry
            }
        }
    }
}
