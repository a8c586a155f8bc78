//! What one NBD server counts beyond its exports' requests, for the
//! metrics endpoint: TLS handshakes and how many failed (the handshake
//! itself, or `tls-authz` denying the client), and the payload budget in use.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::budget::SharedBudget;

/// Counters a server's connections add to (once per connection, off the
/// request path, so plain shared atomics).
#[derive(Debug, Default)]
pub struct ServerCounters {
    tls_handshakes: AtomicU64,
    tls_failures: AtomicU64,
}

impl ServerCounters {
    /// A STARTTLS upgrade ended; `ok` when the client is in (handshake done
    /// and authorized).
    pub fn tls_upgrade_ended(&self, ok: bool) {
        self.tls_handshakes.fetch_add(1, Relaxed);
        if !ok {
            self.tls_failures.fetch_add(1, Relaxed);
        }
    }
}

/// A server's counters at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerSnapshot {
    pub tls_handshakes: u64,
    pub tls_failures: u64,
    /// Bytes of the server-wide payload budget requests hold now.
    pub budget_in_use: u64,
    /// The whole budget (`x-payload-budget`).
    pub budget_total: u64,
}

/// What the running server hands out to read its counters.
#[derive(Clone, Debug)]
pub struct ServerGauges {
    pub(super) counters: Arc<ServerCounters>,
    pub(super) budget: Arc<SharedBudget>,
}

impl ServerGauges {
    pub fn snapshot(&self) -> ServerSnapshot {
        ServerSnapshot {
            tls_handshakes: self.counters.tls_handshakes.load(Relaxed),
            tls_failures: self.counters.tls_failures.load(Relaxed),
            budget_in_use: self.budget.in_use_bytes(),
            budget_total: self.budget.total_bytes(),
        }
    }
}
