//! Batched submission: many ring entries, one `io_uring_enter`.
//!
//! A submitter that starts several requests in a row (the NBD reader,
//! polling each request once before it reads the next header) plugs a
//! [`Batch`] while it polls them and passes the batch down to the node's
//! reads and writes. Entries queued through a plugged batch wait in their
//! ring's submission queue; [`Batch::submit`] enters the kernel once for
//! all of them, and the block layer sends them to the device with one
//! notification (in a VM, one exit) instead of one each.
//!
//! The batch is a value, not thread state: the request that outlives the
//! reader's poll (a task of its own) still holds it, and whoever pushes
//! while it is unplugged submits at once.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::Shared;

/// A submitter's batch; clones share it (the reader and its requests).
#[derive(Clone, Default)]
pub struct Batch(Arc<Mutex<State>>);

#[derive(Default)]
struct State {
    /// Entries pushed now wait for [`Batch::submit`].
    plugged: bool,
    /// Rings with entries queued through this batch and not yet submitted.
    rings: Vec<Arc<Shared>>,
}

impl Drop for State {
    /// The last holder forgot to submit: nothing queued is left behind.
    fn drop(&mut self) {
        for shared in self.rings.drain(..) {
            shared.submit_now();
        }
    }
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").finish_non_exhaustive()
    }
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    /// One connection's lock, taken twice per polled request and once per
    /// ring entry, by the reader and the requests it spawned: never contended
    /// across connections. A holder that panicked leaves a flag and a list of
    /// rings, both valid as they are (submitting a ring with nothing queued
    /// is harmless), so a poisoned lock is used as it is.
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` with the batch plugged: entries pushed through it (on any
    /// ring, from any thread) wait for [`Self::submit`], which the caller
    /// must call before it waits for anything, or they may never be submitted.
    pub fn plugged<R>(&self, f: impl FnOnce() -> R) -> R {
        let was = std::mem::replace(&mut self.state().plugged, true);
        let r = f();
        self.state().plugged = was;
        r
    }

    /// Submits what the batch holds (nothing while it is plugged).
    pub fn submit(&self) {
        let rings = {
            let mut st = self.state();
            if st.plugged {
                return;
            }
            std::mem::take(&mut st.rings)
        };
        for shared in rings {
            shared.submit_now();
        }
    }

    /// Queues `entry` on `shared` if the batch is plugged (true), leaving
    /// the submission to [`Self::submit`]; false if the caller must submit.
    pub(super) fn defer(&self, shared: &Arc<Shared>, entry: &io_uring::squeue::Entry) -> bool {
        // Checked and recorded under one lock: a `submit` that follows an
        // unplug then sees every ring a deferring push registered.
        let mut st = self.state();
        if !st.plugged {
            return false;
        }
        drop(shared.queue(entry));
        if !st.rings.iter().any(|r| Arc::ptr_eq(r, shared)) {
            st.rings.push(shared.clone());
        }
        true
    }
}
