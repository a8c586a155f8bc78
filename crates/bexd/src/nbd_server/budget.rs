//! The server-wide budget of request payload bytes in flight.
//!
//! Each connection already has its own budget (256 requests, 64 MiB); this one
//! bounds the sum over all connections, so that many clients pipelining large
//! requests cannot pin memory in proportion to their number. A request holds
//! its units from the moment its header is read (before a WRITE payload is
//! read or a READ buffer is filled) until its reply is on the wire; while the
//! budget is spent, a connection's reader waits instead of reading the next
//! request.
//!
//! Two rules keep that from stalling anyone for ever:
//! - The semaphore is fair (FIFO): a large request waiting for units is not
//!   overtaken by small ones, so it gets them once enough requests finish; one
//!   larger than the whole budget takes the whole budget.
//! - A connection with nothing in flight gets its first [`RESERVE`] bytes free.
//!   Requests whose replies a client never reads hold their units for as long
//!   as it stays connected; without the reserve a few such clients could spend
//!   the budget and stop every other connection. With it, a client sending one
//!   request at a time of up to 2 MiB is always served, and the memory bound is
//!   the budget plus 2 MiB per connection.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Budget units, as in the per-connection budget.
const UNIT: u64 = 4096;
/// Free for a connection with nothing else in flight.
pub const RESERVE: u64 = 2 << 20;

#[derive(Debug)]
pub struct SharedBudget {
    sem: Arc<Semaphore>,
    units: u32,
}

impl SharedBudget {
    /// A budget of `bytes` (at least one unit).
    pub fn new(bytes: u64) -> Arc<Self> {
        let units = u32::try_from((bytes / UNIT).max(1)).unwrap_or(u32::MAX);
        Arc::new(Self {
            sem: Arc::new(Semaphore::new(units as usize)),
            units,
        })
    }

    /// The budget the server was started with (`x-payload-budget`, 1 GiB by
    /// default), unless `BEXD_NBD_PAYLOAD_BUDGET_MIB` (a positive number of
    /// MiB) overrides it, as documented for tests and emergencies.
    pub fn for_server(configured: u64) -> Arc<Self> {
        let env = std::env::var("BEXD_NBD_PAYLOAD_BUDGET_MIB").ok();
        Self::new(budget_bytes(env.as_deref(), configured))
    }

    /// Waits for the units a request with `len` payload bytes costs; `alone`
    /// when its connection has nothing else in flight. `None` when it costs
    /// nothing; the permit returns the units when dropped.
    pub async fn acquire(&self, len: u64, alone: bool) -> Option<OwnedSemaphorePermit> {
        let charged = match alone {
            true => len.saturating_sub(RESERVE),
            false => len,
        };
        let units = self.units_for(charged);
        if units == 0 {
            return None;
        }
        self.sem.clone().acquire_many_owned(units).await.ok()
    }

    /// Units for `bytes`, rounded up, never more than the whole budget.
    fn units_for(&self, bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .min(self.units)
    }

    /// Bytes requests hold now (in whole units).
    pub fn in_use_bytes(&self) -> u64 {
        let free = self.sem.available_permits() as u64;
        u64::from(self.units).saturating_sub(free) * UNIT
    }

    /// The whole budget, in bytes.
    pub fn total_bytes(&self) -> u64 {
        u64::from(self.units) * UNIT
    }

    #[cfg(test)]
    fn available(&self) -> usize {
        self.sem.available_permits()
    }
}

fn budget_bytes(env: Option<&str>, configured: u64) -> u64 {
    match env.map(|v| v.trim().parse::<u64>()) {
        Some(Ok(mib)) if mib > 0 => mib.saturating_mul(1 << 20),
        Some(_) => {
            tracing::warn!(
                configured,
                "BEXD_NBD_PAYLOAD_BUDGET_MIB must be a positive number; ignored"
            );
            configured
        }
        None => configured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_PAYLOAD_BUDGET as DEFAULT_BYTES;

    #[test]
    fn test_budget_bytes_when_unset_is_1_gib() {
        assert_eq!(budget_bytes(None, DEFAULT_BYTES), 1 << 30);
        assert_eq!(budget_bytes(Some("0"), DEFAULT_BYTES), 1 << 30);
        assert_eq!(budget_bytes(Some("lots"), DEFAULT_BYTES), 1 << 30);
        assert_eq!(budget_bytes(Some("64"), DEFAULT_BYTES), 64 << 20);
    }

    #[tokio::test]
    async fn test_acquire_when_alone_charges_only_past_the_reserve() {
        let b = SharedBudget::new(64 << 20);
        assert!(b.acquire(RESERVE, true).await.is_none());
        let p = b.acquire(RESERVE + UNIT, true).await;
        assert_eq!(p.map(|p| p.num_permits()), Some(1));
        let p = b.acquire(RESERVE, false).await;
        assert_eq!(p.map(|p| p.num_permits()), Some((RESERVE / UNIT) as usize));
        assert!(b.acquire(0, false).await.is_none());
    }

    #[tokio::test]
    async fn test_acquire_when_larger_than_the_budget_takes_all_of_it() {
        let b = SharedBudget::new(8 << 20);
        let p = b.acquire(32 << 20, false).await.expect("a permit");
        assert_eq!(p.num_permits(), (8 << 20) / UNIT as usize);
        assert_eq!(b.available(), 0);
        assert_eq!(b.in_use_bytes(), b.total_bytes());
        drop(p);
        assert_eq!(b.in_use_bytes(), 0);
        assert_eq!(b.available(), (8 << 20) / UNIT as usize);
    }

    /// Polls `f` once: its output if it is ready.
    fn poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn test_acquire_when_spent_waits_for_units_and_is_not_overtaken() {
        let b = SharedBudget::new(8 << 20);
        let held = b.acquire(6 << 20, false).await.expect("a permit");
        let mut large = std::pin::pin!(b.acquire(4 << 20, false));
        assert!(poll_once(large.as_mut()).is_none());
        // 2 MiB are free, but the waiting 4 MiB request is first in line.
        let mut small = std::pin::pin!(b.acquire(1 << 20, false));
        assert!(poll_once(small.as_mut()).is_none());
        drop(held);
        assert!(poll_once(large.as_mut())
            .expect("ready once units are back")
            .is_some());
        assert!(poll_once(small.as_mut()).expect("ready after it").is_some());
    }
}
