//! QMP events: produced anywhere in the daemon, fanned out to every monitor.

use std::time::SystemTime;

use serde_json::Value;
use tokio::sync::broadcast;

/// One event as QMP sends it: a name, optional data and the time it happened.
#[derive(Clone, Debug)]
pub struct QmpEvent {
    pub name: &'static str,
    pub data: Option<Value>,
    pub time: SystemTime,
}

/// The daemon-wide event bus. Monitors subscribe once capabilities are negotiated;
/// an event nobody listens to is dropped, as QEMU drops events for no monitor.
#[derive(Debug, Clone)]
pub struct EventBus {
    sender: broadcast::Sender<QmpEvent>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    pub fn new() -> Self {
        let (sender, _) = broadcast::channel(1024);
        Self { sender }
    }

    pub fn emit(&self, name: &'static str, data: Option<Value>) {
        let event = QmpEvent {
            name,
            data,
            time: SystemTime::now(),
        };
        tracing::debug!(event = name, "emitting QMP event");
        // No receiver is not an error: events go to the monitors that exist now.
        let _ = self.sender.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.sender.subscribe()
    }
}
