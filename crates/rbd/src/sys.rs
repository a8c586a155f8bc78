//! The few functions of librados and librbd (Ceph 16, `rados/librados.h` and
//! `rbd/librbd.h`) this crate calls, declared by hand: no bindgen at build time
//! for two dozen prototypes. Every handle is an opaque pointer; every function
//! returns 0 or a byte count on success and a negative errno on failure.
//!
//! The libraries are loaded with `dlopen` when the first image is opened
//! ([`load`]), not linked: librbd pulls in two dozen more (boost, libceph-common,
//! cryptsetup, ibverbs...), which made every bexd process start 5x slower
//! than qemu-storage-daemon and hold 11 MiB more resident memory, and made
//! bexd fail to start at all on a machine without Ceph's libraries. QEMU
//! ships its rbd driver as a module for the same reason.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use libloading::Library;

/// `rados_t`: a cluster handle.
pub type RadosT = *mut c_void;
/// `rados_ioctx_t`: a pool (and namespace) context.
pub type RadosIoctxT = *mut c_void;
/// `rbd_image_t`: an open image.
pub type RbdImageT = *mut c_void;
/// `rbd_completion_t`: one asynchronous request's completion.
pub type RbdCompletionT = *mut c_void;
/// `rbd_callback_t`: called from a librbd thread when a request completes.
pub type RbdCallbackT = Option<unsafe extern "C" fn(c: RbdCompletionT, arg: *mut c_void)>;
/// `rbd_diff_iterate2`'s callback: offset, length, 1 if data exists.
pub type DiffCallbackT = Option<unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int>;

/// `RBD_FEATURE_FAST_DIFF`: the object map tracks which objects changed, so
/// `rbd_diff_iterate2` with `whole_object` answers from memory.
pub const RBD_FEATURE_FAST_DIFF: u64 = 1 << 4;
/// `RBD_FLAG_FAST_DIFF_INVALID`: the object map must be rebuilt before it can be trusted.
pub const RBD_FLAG_FAST_DIFF_INVALID: u64 = 1 << 1;

/// `rbd_image_info_t`.
#[repr(C)]
pub struct RbdImageInfo {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; 24],
    pub parent_pool: i64,
    pub parent_name: [c_char; 96],
}

/// `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`: zeroes are written, not deallocated.
pub const RBD_WRITE_ZEROES_FLAG_THICK_PROVISION: c_int = 1;

/// Declares the functions, the table of their addresses, and a wrapper of
/// each with the C prototype's name, so that callers read as plain FFI calls.
macro_rules! dynamic {
    ($(fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;)*) => {
        #[allow(non_snake_case)]
        struct Table {
            $($name: unsafe extern "C" fn($($ty),*) $(-> $ret)?,)*
        }

        impl Table {
            /// Looks every function up in the library its prefix names.
            fn resolve(rados: &Library, rbd: &Library) -> Result<Self, libloading::Error> {
                Ok(Self {
                    $($name: {
                        let lib = match stringify!($name).starts_with("rados_") {
                            true => rados,
                            false => rbd,
                        };
                        // SAFETY: the symbol has the prototype declared here (Ceph's headers).
                        unsafe { *lib.get(concat!(stringify!($name), "\0").as_bytes())? }
                    },)*
                })
            }
        }

        $(
            /// Calls the loaded function of this name.
            ///
            /// # Safety
            /// As the C function's; and [`load`] must have succeeded, which
            /// holds wherever a handle exists (only a loaded library makes one).
            #[allow(clippy::too_many_arguments)] // the C prototype's
            pub unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: the caller's, see above.
                unsafe { (loaded().$name)($($arg),*) }
            }
        )*
    };
}

dynamic! {
    fn rados_create(cluster: *mut RadosT, id: *const c_char) -> c_int;
    fn rados_conf_read_file(cluster: RadosT, path: *const c_char) -> c_int;
    fn rados_conf_set(cluster: RadosT, option: *const c_char, value: *const c_char) -> c_int;
    fn rados_connect(cluster: RadosT) -> c_int;
    fn rados_shutdown(cluster: RadosT);
    fn rados_ioctx_create(cluster: RadosT, pool: *const c_char, io: *mut RadosIoctxT) -> c_int;
    fn rados_ioctx_destroy(io: RadosIoctxT);
    fn rados_ioctx_set_namespace(io: RadosIoctxT, nspace: *const c_char);
    fn rbd_namespace_exists(io: RadosIoctxT, name: *const c_char, exists: *mut bool) -> c_int;
    fn rbd_open(io: RadosIoctxT, name: *const c_char, image: *mut RbdImageT, snap_name: *const c_char) -> c_int;
    fn rbd_open_read_only(io: RadosIoctxT, name: *const c_char, image: *mut RbdImageT, snap_name: *const c_char) -> c_int;
    fn rbd_close(image: RbdImageT) -> c_int;
    fn rbd_resize(image: RbdImageT, size: u64) -> c_int;
    fn rbd_stat(image: RbdImageT, info: *mut RbdImageInfo, infosize: usize) -> c_int;
    fn rbd_get_features(image: RbdImageT, features: *mut u64) -> c_int;
    fn rbd_get_flags(image: RbdImageT, flags: *mut u64) -> c_int;
    fn rbd_read2(image: RbdImageT, ofs: u64, len: usize, buf: *mut c_char, op_flags: c_int) -> isize;
    fn rbd_write2(image: RbdImageT, ofs: u64, len: usize, buf: *const c_char, op_flags: c_int) -> isize;
    fn rbd_flush(image: RbdImageT) -> c_int;
    fn rbd_discard(image: RbdImageT, ofs: u64, len: u64) -> c_int;
    fn rbd_write_zeroes(image: RbdImageT, ofs: u64, len: usize, zero_flags: c_int, op_flags: c_int) -> isize;
    fn rbd_diff_iterate2(image: RbdImageT, fromsnapname: *const c_char, ofs: u64, len: u64, include_parent: u8, whole_object: u8, cb: DiffCallbackT, arg: *mut c_void) -> c_int;
    fn rbd_aio_create_completion(cb_arg: *mut c_void, complete_cb: RbdCallbackT, c: *mut RbdCompletionT) -> c_int;
    fn rbd_aio_get_return_value(c: RbdCompletionT) -> isize;
    fn rbd_aio_release(c: RbdCompletionT);
    fn rbd_aio_read2(image: RbdImageT, off: u64, len: usize, buf: *mut c_char, c: RbdCompletionT, op_flags: c_int) -> c_int;
    fn rbd_aio_write2(image: RbdImageT, off: u64, len: usize, buf: *const c_char, c: RbdCompletionT, op_flags: c_int) -> c_int;
    fn rbd_aio_flush(image: RbdImageT, c: RbdCompletionT) -> c_int;
    fn rbd_aio_discard(image: RbdImageT, off: u64, len: u64, c: RbdCompletionT) -> c_int;
    fn rbd_aio_write_zeroes(image: RbdImageT, off: u64, len: usize, c: RbdCompletionT, zero_flags: c_int, op_flags: c_int) -> c_int;
}

/// The libraries (kept open for the life of the process) and the functions.
struct Loaded {
    table: Table,
    _rados: Library,
    _rbd: Library,
}

static LOADED: OnceLock<Result<Loaded, String>> = OnceLock::new();

/// The sonames of Ceph 16 and later (Debian's librados2 and librbd1).
const RADOS_SONAME: &str = "librados.so.2";
const RBD_SONAME: &str = "librbd.so.1";

/// Loads librados and librbd once; the error says which library is missing
/// and which Debian package has it.
pub fn load() -> Result<(), String> {
    let loaded = LOADED.get_or_init(|| {
        let open = |soname: &str| {
            // SAFETY: loading runs the libraries' initialisers, which is what
            // linking them did before; they have no other requirement.
            unsafe { Library::new(soname) }
                .map_err(|e| format!("driver 'rbd' needs {soname} (Debian package librbd1): {e}"))
        };
        let rados = open(RADOS_SONAME)?;
        let rbd = open(RBD_SONAME)?;
        let table = Table::resolve(&rados, &rbd)
            .map_err(|e| format!("driver 'rbd': {RBD_SONAME} lacks a function bexd calls: {e}"))?;
        Ok(Loaded {
            table,
            _rados: rados,
            _rbd: rbd,
        })
    });
    loaded.as_ref().map(|_| ()).map_err(Clone::clone)
}

fn loaded() -> &'static Table {
    match LOADED.get() {
        Some(Ok(l)) => &l.table,
        // Unreachable: every caller holds a handle that only a loaded library made.
        _ => unreachable!("librbd called before rbd::sys::load succeeded"),
    }
}
