//! What a QMP monitor sees of the daemon: the command table to run, the
//! events to forward, and the daemon's shutdown and task tracker. A monitor
//! holds an [`Executor`], never the daemon itself.

use std::sync::Arc;

use qmp::QmpError;
use serde_json::Value;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::registry::{self, Args};
use crate::daemon::Daemon;
use crate::events::QmpEvent;

#[derive(Clone, Debug)]
pub struct Executor {
    daemon: Arc<Daemon>,
}

impl Executor {
    pub fn new(daemon: &Arc<Daemon>) -> Self {
        Self {
            daemon: daemon.clone(),
        }
    }

    /// Whether bexd has the command (QEMU checks this before refusing out-of-band execution).
    pub fn exists(&self, name: &str) -> bool {
        registry::exists(name)
    }

    /// Runs one command from the table.
    pub async fn run(&self, name: &str, args: Args) -> Result<Value, QmpError> {
        registry::dispatch(&self.daemon, name, args).await
    }

    /// Every event from now on (a negotiated monitor subscribes once).
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.daemon.events.subscribe()
    }

    /// Fired when the daemon winds down: monitors stop serving.
    pub fn shutdown(&self) -> CancellationToken {
        self.daemon.shutdown.clone()
    }

    /// Opens when start-up is complete: a monitor accepts its first client then.
    pub fn gate(&self) -> &crate::net::StartGate {
        &self.daemon.gate
    }

    /// Where a monitor's tasks go, so shutdown waits for them.
    pub fn tasks(&self) -> &TaskTracker {
        &self.daemon.tasks
    }

    /// A `quit` that ran: the daemon shuts down once its reply is sent.
    pub fn quit(&self) {
        self.daemon.begin_quit();
    }
}
