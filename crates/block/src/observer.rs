//! What a node tells the daemon about itself while it serves: a write past
//! its write threshold, corruption its format driver found. The block layer
//! knows no QMP; the daemon installs an observer that turns these into
//! `BLOCK_WRITE_THRESHOLD` and `BLOCK_IMAGE_CORRUPTED` events.

/// Corruption a format driver found at run time, as QEMU's
/// `BLOCK_IMAGE_CORRUPTED` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corruption {
    /// QEMU's text for what is wrong.
    pub msg: String,
    /// The host range the corruption concerns, when one is known (a write
    /// that would have overwritten metadata).
    pub offset: Option<u64>,
    pub size: Option<u64>,
    /// Whether the image was marked corrupt and the node made unusable
    /// (only a writable node is: a read-only one keeps serving).
    pub fatal: bool,
}

/// Receives a node's notifications. Called on whatever thread did the I/O,
/// so it must only hand the notification on (an event bus send).
pub trait NodeObserver: Send + Sync + std::fmt::Debug {
    /// A write ended `amount_exceeded` bytes past `threshold`; the node's
    /// threshold is now off (0).
    fn write_threshold_exceeded(&self, node: &str, amount_exceeded: u64, threshold: u64);
    /// The node's format driver found its image corrupt.
    fn image_corrupted(&self, node: &str, corruption: &Corruption);
}
