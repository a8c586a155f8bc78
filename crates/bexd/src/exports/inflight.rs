//! Counts the requests an export kind (FUSE, vhost-user-blk) has handed to
//! the runtime, so that removal can wait for them before it gives the node back.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[derive(Debug, Default)]
pub struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl InFlight {
    /// Counts one request until the guard drops.
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        *self.lock() += 1;
        InFlightGuard { of: self.clone() }
    }

    /// Blocks until no request is in flight. On a runtime worker the wait
    /// is `block_in_place`, so that the worker's queued tasks (perhaps the
    /// very requests waited for) move to another thread instead of waiting
    /// behind it.
    pub fn wait_idle(&self) {
        let wait = || {
            let mut count = self.lock();
            while *count > 0 {
                count = self.idle.wait(count).unwrap_or_else(|e| e.into_inner());
            }
        };
        let on_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        match on_worker {
            true => tokio::task::block_in_place(wait),
            false => wait(),
        }
    }

    /// The count is a plain number changed by one at a time, consistent
    /// whatever a panicking holder was doing.
    fn lock(&self) -> MutexGuard<'_, usize> {
        self.count.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct InFlightGuard {
    of: Arc<InFlight>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut count = self.of.lock();
        *count -= 1;
        if *count == 0 {
            self.of.idle.notify_all();
        }
    }
}
