//! The vhost-user-blk export kind: bexd listens on a unix socket and serves
//! a virtio-blk device to one front-end (a VMM) at a time, through the
//! rust-vmm crates (`vhost` for the protocol, `vhost-user-backend` for the
//! connection and queue threads, `virtio-queue` for the rings, `vm-memory`
//! for guest memory). `device.rs` is the device and its threading,
//! the `virtio-blk` crate the request parser.
//!
//! A front-end that disconnects (a VMM restarting) can connect again: the
//! listener thread accepts the next connection once the last has ended, and
//! every request the last one had accepted has completed by then (its
//! writes are in the node, so nothing acknowledged is lost).

mod device;

use std::any::Any;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use block::{BlockNode, IoStats};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::inflight::InFlight;
use super::ExportKind;
use crate::config::VhostUserBlkExportConfig;
use crate::error::ExportError;
use device::BlkDevice;
use virtio_blk::Geometry;

#[derive(Debug)]
pub struct VhostUserBlkExport {
    socket: PathBuf,
    shared: Arc<Shared>,
    listener: Mutex<Option<JoinHandle<()>>>,
}

/// What the listener thread and the export share.
#[derive(Debug)]
struct Shared {
    node: Arc<Mutex<Option<Arc<BlockNode>>>>,
    in_flight: Arc<InFlight>,
    stopping: AtomicBool,
    /// The connection being served, to end it at removal.
    connection: Mutex<Option<ShutdownHandleDebug>>,
}

/// `ShutdownHandle` has no `Debug`.
struct ShutdownHandleDebug(ShutdownHandle);

impl std::fmt::Debug for ShutdownHandleDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShutdownHandle")
    }
}

impl VhostUserBlkExport {
    /// Listens on `config.socket` and serves `node` to whoever connects.
    pub fn create(
        config: &VhostUserBlkExportConfig,
        id: &str,
        node: &Arc<BlockNode>,
        writable: bool,
        stats: Arc<IoStats>,
    ) -> Result<Self, ExportError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| ExportError::VhostUserBlk("no runtime to serve it".into()))?;
        let listener = Listener::new(&config.socket, true).map_err(|e| {
            ExportError::VhostUserBlk(format!(
                "Failed to bind socket '{}': {e}",
                config.socket.display()
            ))
        })?;
        let geometry = Geometry {
            // Whole logical blocks only, as QEMU's export shows the node.
            capacity: node.size() / u64::from(config.logical_block_size)
                * u64::from(config.logical_block_size),
            block_size: u64::from(config.logical_block_size),
            writable,
        };
        let shared = Arc::new(Shared {
            node: Arc::new(Mutex::new(Some(node.clone()))),
            in_flight: Arc::default(),
            stopping: AtomicBool::new(false),
            connection: Mutex::new(None),
        });
        let num_queues = config.num_queues;
        let thread_shared = shared.clone();
        let listener = std::thread::Builder::new()
            .name(format!("vhost-{id}"))
            .spawn(move || {
                let device = || {
                    BlkDevice::new(
                        thread_shared.node.clone(),
                        geometry,
                        num_queues,
                        runtime.clone(),
                        thread_shared.in_flight.clone(),
                        stats.clone(),
                    )
                };
                serve_connections(listener, &thread_shared, device)
            })
            .map_err(|e| ExportError::VhostUserBlk(e.to_string()))?;
        tracing::info!(id, socket = %config.socket.display(), "vhost-user-blk export listening");
        Ok(Self {
            socket: config.socket.clone(),
            shared,
            listener: Mutex::new(Some(listener)),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Ends the connection and the listener, waits for the requests in
    /// flight, removes the socket; once only.
    fn stop(&self) {
        let Some(listener) = lock(&self.listener).take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::Release);
        lock(&self.shared.node).take();
        if let Some(c) = lock(&self.shared.connection).as_ref() {
            c.0.shutdown();
        }
        // Wakes an accept that is waiting: the thread sees `stopping` after it.
        let _ = UnixStream::connect(&self.socket);
        self.shared.in_flight.wait_idle();
        let _ = listener.join();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The listener thread: one connection at a time, until the export stops.
fn serve_connections(mut listener: Listener, shared: &Shared, device: impl Fn() -> BlkDevice) {
    while !shared.stopping.load(Ordering::Acquire) {
        let dev = device();
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = match VhostUserDaemon::new("vhost-user-blk".into(), dev.clone(), memory) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("vhost-user-blk: cannot serve: {e}");
                return;
            }
        };
        if let Err(e) = daemon.start(&mut listener) {
            tracing::warn!("vhost-user-blk: accept failed: {e}");
            dev.stop_workers();
            continue;
        }
        *lock(&shared.connection) = daemon.shutdown_handle().map(ShutdownHandleDebug);
        if shared.stopping.load(Ordering::Acquire) {
            if let Some(c) = lock(&shared.connection).as_ref() {
                c.0.shutdown();
            }
        }
        match daemon.wait() {
            Ok(()) => tracing::info!("vhost-user-blk: front-end disconnected"),
            Err(e) => tracing::info!("vhost-user-blk: connection ended: {e}"),
        }
        lock(&shared.connection).take();
        shared.in_flight.wait_idle();
        dev.stop_workers();
    }
}

impl ExportKind for VhostUserBlkExport {
    fn type_name(&self) -> &'static str {
        "vhost-user-blk"
    }

    fn release(&self) {
        self.stop();
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Drop for VhostUserBlkExport {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Locks whose values are replaced whole; a poisoned one is still consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
