//! Background jobs as QEMU runs them (job.c, blockjob.c): the job table,
//! each job's life through QEMU's state machine (`state.rs`), transactions
//! of jobs that finish together, and the events QMP clients watch.
//!
//! One lock guards every job's bookkeeping, as QEMU's `job_mutex` does: a
//! transaction's jobs change status together, so per-job locks would only
//! have to be taken in an order. The lock is never held across I/O or an
//! `.await`; the work itself (`JobWork::run`) runs in a task of its own and
//! reaches the table through its [`JobCtl`]. Events are sent under the lock
//! so that their order is the order of the transitions.

pub mod backup;
mod ctl;
mod ratelimit;
pub mod state;
mod table;

pub use ctl::{ErrorAction, JobCtl};
pub use table::{JobError, JobTable, JobTxn, NewJob};

use std::future::Future;
use std::pin::Pin;

/// The future a job's work runs as.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a node is to a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeUse {
    /// Read from (a backup's source, with its copy-before-write hook).
    Source,
    /// Written (a backup's target).
    Target,
}

/// How a job's work ended badly: the text QEMU puts in `error`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobFailure(pub String);

/// What a kind of job does. `run` does the work; the rest are QEMU's
/// `JobDriver` callbacks, called under the job table's lock in QEMU's
/// order (`prepare` for every job of a transaction, then per job `commit`
/// or `abort`, then `clean`), so they must not wait for anything.
pub trait JobWork: Send + Sync + 'static {
    /// The work. It must pass [`JobCtl::pause_point`] before its first
    /// step that a pause should hold back (QEMU's jobs do so on entry);
    /// what comes before it runs even on a job paused at once.
    fn run(self: std::sync::Arc<Self>, ctl: JobCtl) -> BoxFuture<Result<(), JobFailure>>;
    /// Called as the job starts, before its task is spawned (a backup arms
    /// its copy-before-write hook here, in the command that starts it).
    fn begin(&self) {}
    /// Last chance to fail before the transaction commits.
    fn prepare(&self) -> Result<(), JobFailure> {
        Ok(())
    }
    fn commit(&self) {}
    fn abort(&self) {}
    fn clean(&self) {}
    /// How the job uses node `name`, for "Node 'x' is busy" refusals.
    fn node_use(&self, _name: &str) -> Option<NodeUse> {
        None
    }
}
