//! QMP events: produced anywhere in the daemon, fanned out to every monitor.

use std::time::SystemTime;

use block::{Corruption, NodeObserver};
use serde_json::{json, Value};
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

/// Nodes report through the bus: the events QEMU sends for them.
impl NodeObserver for EventBus {
    fn write_threshold_exceeded(&self, node: &str, amount_exceeded: u64, threshold: u64) {
        self.emit(
            "BLOCK_WRITE_THRESHOLD",
            Some(json!({
                "node-name": node,
                "amount-exceeded": amount_exceeded,
                "write-threshold": threshold,
            })),
        );
    }

    fn image_corrupted(&self, node: &str, corruption: &Corruption) {
        let mut data = json!({
            "device": "",
            "node-name": node,
            "msg": corruption.msg,
            "fatal": corruption.fatal,
        });
        if let Some(offset) = corruption.offset {
            data["offset"] = json!(offset);
        }
        if let Some(size) = corruption.size {
            data["size"] = json!(size);
        }
        self.emit("BLOCK_IMAGE_CORRUPTED", Some(data));
    }
}
