//! Connecting to a cluster and opening an image: QEMU's `qemu_rbd_connect` and
//! `qemu_rbd_open`, step for step, with the same error texts.

use std::ffi::{c_char, CString};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::RbdError;
use crate::sys;

/// How long connecting (monitor handshake, authentication) and each monitor
/// request may take, in seconds. librados waits 300 s by default (QEMU keeps
/// that, and its monitor hangs as long); bexd opens nodes from its QMP
/// monitor, which must never hang, so a dead monitor or a wrong key fails
/// `blockdev-add` with "error connecting: Connection timed out" after this.
pub const CONNECT_TIMEOUT_SECS: u32 = 10;

/// QEMU's `BlockdevOptionsRbd`, with the key already taken from its secret.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RbdOptions {
    pub pool: String,
    pub namespace: Option<String>,
    pub image: String,
    /// A Ceph config file; without one, Ceph's default search (its absence is no error).
    pub conf: Option<String>,
    /// A snapshot to open, read-only.
    pub snapshot: Option<String>,
    /// The cephx user (`client.USER`); librados's default (`admin`) without one.
    pub user: Option<String>,
    /// `auth-client-required`: `cephx`, `none`.
    pub auth_client_required: Vec<String>,
    /// The base64 cephx key (from `key-secret`), instead of a keyring.
    pub key: Option<String>,
    /// Monitors (`server`), as host and port, instead of the config's `mon_host`.
    pub servers: Vec<(String, String)>,
    /// librbd's own cache (`rbd_cache`): QEMU turns it on for writeback
    /// (the default) and off for `cache.direct=on`.
    pub rbd_cache: bool,
}

/// An open image, with the cluster connection and pool context it lives on.
/// librados and librbd handles may be used from any thread at once.
#[derive(Debug)]
pub struct Image {
    cluster: sys::RadosT,
    ioctx: sys::RadosIoctxT,
    pub(crate) handle: sys::RbdImageT,
    /// Grows when a format writes past the end (see [`Image::grow_to`]).
    pub(crate) size: AtomicU64,
    /// Serialises growing, so two writes past the end never shrink the image.
    grow: Mutex<()>,
    pub(crate) object_size: u64,
    /// Objects known to hold data (block status from memory).
    pub(crate) known: crate::known::KnownData,
}

// SAFETY: librados and librbd handles are thread-safe (librbd serialises
// what it must itself); Image only hands them to librbd calls.
unsafe impl Send for Image {}
// SAFETY: as above: concurrent librbd calls on one image are supported.
unsafe impl Sync for Image {}

/// A connected cluster handle, shut down on drop unless taken into an [`Image`].
struct Cluster(sys::RadosT);

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create and is shut down once.
        unsafe { sys::rados_shutdown(self.0) }
    }
}

/// A pool context, destroyed on drop unless taken into an [`Image`].
struct Ioctx(sys::RadosIoctxT);

impl Drop for Ioctx {
    fn drop(&mut self) {
        // SAFETY: the context came from rados_ioctx_create and is destroyed once.
        unsafe { sys::rados_ioctx_destroy(self.0) }
    }
}

fn cstring(what: &str, s: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Option(format!("'{what}' contains a NUL byte")))
}

fn check(r: i32, context: impl FnOnce() -> String) -> Result<(), RbdError> {
    match r {
        r if r < 0 => Err(RbdError::errno(context(), -r)),
        _ => Ok(()),
    }
}

fn conf_set(cluster: &Cluster, option: &str, value: &str) -> Result<(), RbdError> {
    let (o, v) = (cstring(option, option)?, cstring(option, value)?);
    // SAFETY: a live cluster handle, two NUL-terminated strings that outlive the call.
    let r = unsafe { sys::rados_conf_set(cluster.0, o.as_ptr(), v.as_ptr()) };
    check(r, || format!("Could not set '{option}'"))
}

/// `mon_host` from the `server` list: `host:port` joined by `;`, IPv6 addresses bracketed.
fn mon_host(servers: &[(String, String)]) -> String {
    servers
        .iter()
        .map(|(host, port)| match host.contains(':') {
            true => format!("[{host}]:{port}"),
            false => format!("{host}:{port}"),
        })
        .collect::<Vec<_>>()
        .join(";")
}

fn connect(o: &RbdOptions) -> Result<Cluster, RbdError> {
    sys::load().map_err(RbdError::Open)?;
    let user = o.user.as_deref().map(|u| cstring("user", u)).transpose()?;
    let mut handle: sys::RadosT = ptr::null_mut();
    // SAFETY: `handle` is written on success; `user` is NULL or a C string.
    let r = unsafe {
        sys::rados_create(
            &mut handle,
            user.as_ref().map_or(ptr::null(), |u| u.as_ptr()),
        )
    };
    check(r, || "error initializing".to_string())?;
    let cluster = Cluster(handle);

    match &o.conf {
        Some(path) => {
            let c = cstring("conf", path)?;
            // SAFETY: a live, unconnected handle and a C string.
            let r = unsafe { sys::rados_conf_read_file(cluster.0, c.as_ptr()) };
            check(r, || format!("error reading conf file {path}"))?;
        }
        None => {
            // Ceph's default search; a machine without a config is fine (QEMU ignores it too).
            // SAFETY: a live, unconnected handle; NULL asks for the default search.
            let _ = unsafe { sys::rados_conf_read_file(cluster.0, ptr::null()) };
        }
    }
    conf_set(
        &cluster,
        "rbd_cache",
        if o.rbd_cache { "true" } else { "false" },
    )?;
    if !o.servers.is_empty() {
        conf_set(&cluster, "mon_host", &mon_host(&o.servers))?;
    }
    if let Some(key) = &o.key {
        conf_set(&cluster, "key", key)?;
    }
    if !o.auth_client_required.is_empty() {
        conf_set(
            &cluster,
            "auth_client_required",
            &o.auth_client_required.join(";"),
        )?;
    }
    let timeout = CONNECT_TIMEOUT_SECS.to_string();
    conf_set(&cluster, "client_mount_timeout", &timeout)?;
    conf_set(&cluster, "rados_mon_op_timeout", &timeout)?;

    // SAFETY: a live, configured handle; connects once.
    let r = unsafe { sys::rados_connect(cluster.0) };
    check(r, || "error connecting".to_string())?;
    Ok(cluster)
}

fn open_pool(cluster: &Cluster, o: &RbdOptions) -> Result<Ioctx, RbdError> {
    let pool = cstring("pool", &o.pool)?;
    let mut handle: sys::RadosIoctxT = ptr::null_mut();
    // SAFETY: a connected cluster, a C string, `handle` written on success.
    let r = unsafe { sys::rados_ioctx_create(cluster.0, pool.as_ptr(), &mut handle) };
    check(r, || format!("error opening pool {}", o.pool))?;
    let ioctx = Ioctx(handle);
    let namespace = o.namespace.as_deref().unwrap_or("");
    let ns = cstring("namespace", namespace)?;
    // SAFETY: a live context and a C string, copied by librados.
    unsafe { sys::rados_ioctx_set_namespace(ioctx.0, ns.as_ptr()) };
    if !namespace.is_empty() {
        let mut exists = false;
        // SAFETY: a live context, a C string, `exists` written on success.
        let r = unsafe { sys::rbd_namespace_exists(ioctx.0, ns.as_ptr(), &mut exists) };
        check(r, || format!("error checking namespace {namespace}"))?;
        if !exists {
            return Err(RbdError::Open(format!(
                "namespace '{namespace}' does not exist"
            )));
        }
    }
    Ok(ioctx)
}

impl Image {
    /// Connects and opens the image. `read_only` opens it without a header
    /// watch and never takes the exclusive lock; a writable open takes the lock
    /// when the first write comes, or at once when the image is written by
    /// another client first (librbd's cooperative lock hand-over).
    ///
    /// Blocks for up to [`CONNECT_TIMEOUT_SECS`] per monitor round trip.
    pub fn open(o: &RbdOptions, read_only: bool) -> Result<Image, RbdError> {
        let cluster = connect(o)?;
        let ioctx = open_pool(&cluster, o)?;
        let name = cstring("image", &o.image)?;
        let snap = o
            .snapshot
            .as_deref()
            .map(|s| cstring("snapshot", s))
            .transpose()?;
        let snap_ptr: *const c_char = snap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut handle: sys::RbdImageT = ptr::null_mut();
        // SAFETY: a live context, C strings that outlive the call, `handle` written on success.
        let r = unsafe {
            match read_only {
                true => sys::rbd_open_read_only(ioctx.0, name.as_ptr(), &mut handle, snap_ptr),
                false => sys::rbd_open(ioctx.0, name.as_ptr(), &mut handle, snap_ptr),
            }
        };
        check(r, || format!("error reading header from {}", o.image))?;
        let mut image = Image {
            cluster: cluster.0,
            ioctx: ioctx.0,
            handle,
            size: AtomicU64::new(0),
            grow: Mutex::new(()),
            object_size: 0,
            known: crate::known::KnownData::new(1),
        };
        // Image's Drop now owns both.
        std::mem::forget(ioctx);
        std::mem::forget(cluster);

        // SAFETY: an all-zero rbd_image_info_t is valid (integers and char arrays).
        let mut info: sys::RbdImageInfo = unsafe { std::mem::zeroed() };
        // SAFETY: an open image; `info` is a writable struct of the size passed.
        let r = unsafe {
            sys::rbd_stat(
                image.handle,
                &mut info,
                std::mem::size_of::<sys::RbdImageInfo>(),
            )
        };
        check(r, || format!("error getting image info from {}", o.image))?;
        image.size = AtomicU64::new(info.size);
        image.object_size = info.obj_size.max(512);
        image.known = crate::known::KnownData::new(image.object_size);
        Ok(image)
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Makes the image at least `end` bytes long. A format over this image
    /// (qcow2) allocates clusters past its end, as it does in a file; QEMU's
    /// rbd driver grows the image for such writes the same way.
    pub(crate) fn grow_to(&self, end: u64) -> block::BlockResult<()> {
        if end <= self.size() {
            return Ok(());
        }
        let _serial = self.grow.lock().unwrap_or_else(|e| e.into_inner());
        if end <= self.size() {
            return Ok(());
        }
        // SAFETY: an open image.
        let r = unsafe { sys::rbd_resize(self.handle, end) };
        crate::error::io_result("resize", r as isize)?;
        self.size.store(end, Ordering::Release);
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: each handle is live and released once, image before pool before cluster.
        // rbd_close flushes librbd's cache and waits for requests still in flight.
        unsafe {
            sys::rbd_close(self.handle);
            sys::rados_ioctx_destroy(self.ioctx);
            sys::rados_shutdown(self.cluster);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mon_host_brackets_ipv6_and_joins_with_semicolons() {
        let servers = vec![
            ("127.0.0.1".to_string(), "6789".to_string()),
            ("::1".to_string(), "3300".to_string()),
        ];
        assert_eq!(mon_host(&servers), "127.0.0.1:6789;[::1]:3300");
    }
}
