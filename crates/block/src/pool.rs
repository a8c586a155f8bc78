//! The I/O worker pool: where a request runs whose driver may block (a file
//! on a disk filesystem, qcow2 metadata, blkdebug).
//!
//! Why not tokio's blocking pool: it wakes a sleeping thread for every task
//! it is given and a thread sleeps again the moment its queue is empty, so
//! at a steady 32 requests in flight each 4 KiB write to an ext4 file cost
//! 3.6 context switches, and `perf` put 44% of the daemon's CPU in
//! `finish_task_switch` (futex wake and wait) against 4% in the write itself
//! (vhost-user-blk, one queue, 72k IOPS against qemu-storage-daemon's 108k).
//! Here:
//! - a worker that runs out of jobs keeps looking for 50 µs (`SPIN`) before
//!   it sleeps, yielding its core between looks (one such worker at a time:
//!   a busy spin took the core from the threads that submit and halved
//!   throughput), so a steady stream of requests finds a worker awake;
//! - a submission wakes a sleeper only when more jobs are queued than
//!   workers are awake without a job (spinning, or woken and on their way);
//!   a busy worker is not counted, since its job may be waiting for a disk,
//!   so requests that block still spread over up to [`set_max_threads`]
//!   threads (64 unless `--object main-loop,thread-pool-max=N` says
//!   otherwise, as in QEMU's thread pool).
//!
//! Each sleeper parks on its own thread handle and is taken off the idle
//! list by the one submission that wakes it, so no wake-up is lost or
//! counted twice, whatever spurious returns `park` has.

use std::collections::VecDeque;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How long a worker out of jobs keeps looking before it sleeps: longer than
/// the gap between two requests of a busy client (a few microseconds), short
/// enough that an idle daemon spends nothing measurable.
const SPIN: Duration = Duration::from_micros(50);
/// Workers spinning at once.
const MAX_SPINNERS: usize = 1;
/// Threads at most unless [`set_max_threads`] says otherwise; more jobs than
/// the limit wait in the queue, in order.
pub const DEFAULT_MAX_THREADS: usize = 64;
/// A worker asleep this long exits (tokio's blocking pool keeps 10 s too).
const KEEP_ALIVE: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

struct Pool {
    state: Mutex<State>,
    /// `state.jobs.len()`, readable by a spinner without the lock.
    queued: AtomicUsize,
    max_threads: AtomicUsize,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Sleeping workers: (worker number, its thread), the newest last.
    idle: Vec<(u64, Thread)>,
    threads: usize,
    spinning: usize,
    /// Workers taken off `idle` (or started) and not yet back at the queue.
    woken: usize,
    next_id: u64,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        state: Mutex::new(State::default()),
        queued: AtomicUsize::new(0),
        max_threads: AtomicUsize::new(DEFAULT_MAX_THREADS),
    })
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A job never runs under the lock, so a poisoned lock only means a
        // panic in this file's few lines of bookkeeping: the state is whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn submit(&'static self, job: Job) {
        let mut s = self.lock();
        s.jobs.push_back(job);
        self.queued.store(s.jobs.len(), Ordering::Release);
        if s.jobs.len() <= s.spinning + s.woken {
            return;
        }
        if let Some((_, t)) = s.idle.pop() {
            s.woken += 1;
            t.unpark();
        } else if s.threads < self.max_threads.load(Ordering::Relaxed) {
            let id = s.next_id;
            s.next_id += 1;
            s.threads += 1;
            s.woken += 1;
            let spawned = thread::Builder::new()
                .name("bexd-io".into())
                .spawn(move || self.work(id));
            if spawned.is_err() {
                // Out of threads: the queued job waits for a worker that exists
                // (or, with none alive, for the next submission to start one).
                s.threads -= 1;
                s.woken -= 1;
                tracing::warn!("could not start an I/O worker thread");
            }
        }
    }

    fn work(&'static self, id: u64) {
        let mut s = self.lock();
        s.woken -= 1;
        loop {
            if let Some(job) = s.jobs.pop_front() {
                self.queued.store(s.jobs.len(), Ordering::Release);
                drop(s);
                job();
                s = self.lock();
                continue;
            }
            if s.spinning < MAX_SPINNERS {
                s.spinning += 1;
                drop(s);
                let start = Instant::now();
                while self.queued.load(Ordering::Acquire) == 0 && start.elapsed() < SPIN {
                    thread::yield_now();
                }
                s = self.lock();
                s.spinning -= 1;
                if !s.jobs.is_empty() {
                    continue;
                }
            }
            s.idle.push((id, thread::current()));
            drop(s);
            let deadline = Instant::now() + KEEP_ALIVE;
            loop {
                thread::park_timeout(deadline.saturating_duration_since(Instant::now()));
                s = self.lock();
                match s.idle.iter().position(|(i, _)| *i == id) {
                    // Taken off the list: a submission woke this worker.
                    None => {
                        s.woken -= 1;
                        break;
                    }
                    Some(at) if Instant::now() >= deadline => {
                        s.idle.remove(at);
                        s.threads -= 1;
                        return;
                    }
                    // A spurious return from park: sleep on.
                    Some(_) => drop(s),
                }
            }
        }
    }
}

/// Runs `f` on a pool worker; its result, or its panic resumed here.
pub async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = oneshot::channel();
    pool().submit(Box::new(move || {
        // The receiver may be gone (a client that went away): the result
        // is dropped, as the job's own effects are not undone either.
        let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
    }));
    match rx.await {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => resume_unwind(panic),
        // Only a worker that died outside `catch_unwind` drops the sender.
        Err(_) => panic!("an I/O worker thread exited with a job"),
    }
}

/// Caps the workers (at least one); set once at start-up, before the first
/// request (`--object main-loop,thread-pool-max=N`). Workers beyond a lower
/// cap set later finish their jobs and are not replaced.
pub fn set_max_threads(n: usize) {
    pool().max_threads.store(n.max(1), Ordering::Relaxed);
}

/// Workers alive now.
#[cfg(test)]
fn threads() -> usize {
    pool().lock().threads
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_job_runs_once_and_returns_its_result() {
        let count = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for i in 0..2000u64 {
            let count = count.clone();
            handles.push(tokio::spawn(run(move || {
                count.fetch_add(1, Ordering::Relaxed);
                i * 2
            })));
        }
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.await.unwrap(), i as u64 * 2);
        }
        assert_eq!(count.load(Ordering::Relaxed), 2000);
        assert!(threads() <= DEFAULT_MAX_THREADS);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_that_block_run_side_by_side() {
        // Each job waits until all 8 have started: they finish only if the
        // pool runs them at the same time (a job that blocks on a disk must
        // not hold up the ones queued behind it).
        const N: usize = 8;
        let started = Arc::new(AtomicUsize::new(0));
        let jobs: Vec<_> = (0..N)
            .map(|_| {
                let started = started.clone();
                tokio::spawn(run(move || {
                    started.fetch_add(1, Ordering::SeqCst);
                    let give_up = Instant::now() + Duration::from_secs(60);
                    while started.load(Ordering::SeqCst) < N && Instant::now() < give_up {
                        thread::sleep(Duration::from_millis(1));
                    }
                    started.load(Ordering::SeqCst)
                }))
            })
            .collect();
        for j in jobs {
            assert_eq!(j.await.unwrap(), N);
        }
    }

    #[tokio::test]
    async fn a_panic_in_a_job_reaches_the_caller_and_the_pool_goes_on() {
        let r = tokio::spawn(run(|| -> u32 { panic!("job failed") })).await;
        assert!(r.unwrap_err().is_panic());
        assert_eq!(run(|| 7).await, 7);
    }

    #[tokio::test]
    async fn a_job_started_after_every_worker_slept_still_runs() {
        assert_eq!(run(|| 1).await, 1);
        // Past the spin: the worker is parked, and a new job must wake it.
        thread::sleep(SPIN * 20);
        assert_eq!(run(|| 2).await, 2);
    }
}
