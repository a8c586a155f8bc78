//! The FUSE export kind: the node appears as a regular file, mounted over
//! an existing regular file (`mountpoint`), which any program can read,
//! write, `fallocate`, `fsync` and `lseek(SEEK_DATA/SEEK_HOLE)`.
//!
//! # Threads
//!
//! fuser reads the kernel's requests on a thread of its own (one per
//! export, named `fuse-<id>`); bexd's I/O is async on the tokio runtime
//! ([`block::BlockNode`]). The two meet in `image::ImageFile`: the reader
//! thread decodes a request, copies what it needs (a WRITE payload into an
//! [`block::IoBuf`]), spawns a task on the runtime that owns the request's
//! reply handle, and goes straight back to reading. The task awaits the
//! node and replies (a reply is one `writev` on `/dev/fuse`, which never
//! waits for the kernel). So the reader never blocks on I/O and never calls
//! `block_on` (which would tie a reader to one request and serialise them),
//! and requests run as concurrently as the kernel sends them: with
//! `FUSE_ASYNC_READ` and `FUSE_ASYNC_DIO`, fio's 32 queued O_DIRECT reads are
//! 32 tasks in flight. Requests that need no I/O (`getattr`, `open`) are
//! answered on the reader thread itself.
//!
//! # Removal
//!
//! `block-export-del` and exit stop the export in this order: new requests
//! fail (`EIO`, the node reference is dropped), the file is unmounted
//! (lazily, as libfuse does as root, so a process holding it open does not
//! make the removal fail), the requests already on the runtime finish, and
//! only then is the node hold released and `BLOCK_EXPORT_DELETED` sent. A
//! mount left behind by a killed bexd (`kill -9`) is found at the next
//! start by the mountpoint's `ENOTCONN` and unmounted if it is bexd's (see
//! `mountpoint.rs`).

mod image;
mod mountpoint;

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use block::{BlockNode, IoStats};
use fuser::{MountOption, SessionACL, SessionUnmounter};

use super::ExportKind;
use crate::config::{AllowOther, FuseExportConfig};
use crate::error::ExportError;
use image::{ImageFile, Shared};

/// What a mount is called in `/proc/self/mountinfo` (its source), so that a
/// stale one can be told apart from another program's.
const FS_NAME: &str = "bexd";

/// How long removal waits for the reader thread after the unmount: it ends
/// at once unless a process still holds the file open (then it ends when
/// that process closes it, and nothing waits for it).
const READER_EXIT_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct FuseExport {
    mountpoint: PathBuf,
    shared: Arc<Shared>,
    /// The reader thread, until the export stops.
    reader: Mutex<Option<JoinHandle<()>>>,
    /// fuser's handle on the mount, until the export stops. Unmounting
    /// through it also keeps fuser from trying again (and warning) when
    /// the session ends.
    unmounter: Mutex<Option<SessionUnmounter>>,
}

impl FuseExport {
    /// Mounts `node` over `config.mountpoint` and starts serving it.
    pub fn create(
        config: &FuseExportConfig,
        id: &str,
        node: &Arc<BlockNode>,
        writable: bool,
        stats: Arc<IoStats>,
    ) -> Result<Self, ExportError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| ExportError::FuseMount("no runtime to serve it".into()))?;
        mountpoint::check(&config.mountpoint)?;
        let (mut session, allow_other) = mount(config, node, writable, stats, runtime)?;
        let shared = session.shared.clone();
        let unmounter = session.inner.unmount_callable();
        let name = format!("fuse-{id}");
        let reader = std::thread::Builder::new()
            .name(name)
            .spawn(move || session.run())
            .map_err(|e| ExportError::FuseMount(e.to_string()))?;
        tracing::info!(
            id,
            mountpoint = %config.mountpoint.display(),
            allow_other,
            "FUSE export mounted"
        );
        Ok(Self {
            mountpoint: config.mountpoint.clone(),
            shared,
            reader: Mutex::new(Some(reader)),
            unmounter: Mutex::new(Some(unmounter)),
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Stops serving, unmounts and waits for the requests in flight; once
    /// only (removal or a failed add, whichever comes first).
    fn stop(&self) {
        let Some(reader) = lock(&self.reader).take() else {
            return;
        };
        self.shared.close();
        self.unmount();
        self.shared.wait_idle();
        let deadline = Instant::now() + READER_EXIT_WAIT;
        while !reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if reader.is_finished() {
            let _ = reader.join();
        } else {
            tracing::info!(
                mountpoint = %self.mountpoint.display(),
                "FUSE file still open after the unmount; its reader ends when it is closed"
            );
        }
    }

    /// fuser's plain unmount first (it knows whether its mount is still
    /// there, so it never unmounts a later mount on the same path); if a
    /// process holds the file open that fails with EBUSY, and the unmount
    /// is made lazy.
    fn unmount(&self) {
        let Some(mut unmounter) = lock(&self.unmounter).take() else {
            return;
        };
        let Err(busy) = unmounter.unmount() else {
            return;
        };
        tracing::debug!(mountpoint = %self.mountpoint.display(), "FUSE unmount: {busy}");
        if let Err(e) = mountpoint::unmount(&self.mountpoint) {
            tracing::warn!(mountpoint = %self.mountpoint.display(), "FUSE unmount failed: {e}");
        }
    }
}

/// A session mounted with the options asked for; with `allow-other=auto`,
/// `allow_other` first and without it if that mount fails, as QEMU does.
fn mount(
    config: &FuseExportConfig,
    node: &Arc<BlockNode>,
    writable: bool,
    stats: Arc<IoStats>,
    runtime: tokio::runtime::Handle,
) -> Result<(Session, bool), ExportError> {
    let attempt = |allow_other: bool| {
        let shared = Shared::new(node.clone(), writable, allow_other, stats.clone());
        let fs = ImageFile::new(shared, runtime.clone());
        Session::mount(fs, &config.mountpoint, allow_other)
    };
    let tries: &[bool] = match config.allow_other {
        AllowOther::On => &[true],
        AllowOther::Off => &[false],
        AllowOther::Auto => &[true, false],
    };
    let mut last = None;
    for &allow_other in tries {
        match attempt(allow_other) {
            Ok(session) => return Ok((session, allow_other)),
            Err(e) => {
                tracing::debug!(allow_other, "FUSE mount failed: {e}");
                last = Some(e);
            }
        }
    }
    let detail = last.map(|e| e.to_string()).unwrap_or_default();
    Err(ExportError::FuseMount(detail))
}

/// A mounted fuser session and the state its file system shares with the export.
struct Session {
    inner: fuser::Session<ImageFile>,
    shared: Arc<Shared>,
}

impl Session {
    fn mount(fs: ImageFile, at: &Path, allow_other: bool) -> std::io::Result<Self> {
        let shared = fs.shared().clone();
        let mut config = fuser::Config::default();
        // QEMU's options: default_permissions (the kernel checks the mode
        // bits, so setattr's mode changes are what guards access) and
        // allow_other when asked.
        config.mount_options = vec![
            MountOption::FSName(FS_NAME.into()),
            MountOption::DefaultPermissions,
        ];
        config.acl = match allow_other {
            true => SessionACL::All,
            false => SessionACL::Owner,
        };
        let inner = fuser::Session::new(fs, at, &config)?;
        Ok(Self { inner, shared })
    }

    fn run(self) {
        if let Err(e) = self.inner.run() {
            tracing::warn!("FUSE session ended: {e}");
        }
    }
}

impl ExportKind for FuseExport {
    fn type_name(&self) -> &'static str {
        "fuse"
    }

    fn clashes_with(&self, other: &dyn ExportKind) -> Option<ExportError> {
        let other = other.as_any().downcast_ref::<FuseExport>()?;
        (other.mountpoint == self.mountpoint)
            .then(|| ExportError::DuplicateFuseMount(self.mountpoint.display().to_string()))
    }

    fn release(&self) {
        self.stop();
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A FUSE export dropped without removal (its add failed after the mount,
/// on a duplicate id) must not leave its mount behind.
impl Drop for FuseExport {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The reader slot is only ever taken whole, so a poisoned lock still holds
/// a consistent value.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
