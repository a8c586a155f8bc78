//! The `file` protocol driver: regular files and block devices, with
//! positional I/O (`pread`/`pwrite`), `fallocate` for discard and zeroing,
//! and `SEEK_DATA`/`SEEK_HOLE` for block status.
//!
//! `aio=threads` runs positional syscalls on the node's thread pool.
//! `aio=io_uring` and `aio=native` (QEMU's Linux AIO; the same asynchronous
//! I/O for our purposes; like QEMU, native insists on cache.direct=on) read
//! and write through an io_uring of the file's own (`uring.rs`): no thread
//! hop per request. Where the kernel refuses io_uring they fall back to the
//! pool, as do unaligned O_DIRECT requests (they need a bounce buffer) and
//! everything but reads and writes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::lock::{lock_image, PERM_READ, PERM_RESIZE, PERM_WRITE};
use crate::buf::{IoBuf, ALIGNMENT};
use crate::driver::{Capabilities, Driver, Extent, ZeroFlags};
use crate::error::{BlockError, BlockErrorKind, BlockResult};
use crate::mapping::{Access, FileMapping};
use crate::uring::Ring;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AioMode {
    #[default]
    Threads,
    IoUring,
    Native,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LockingMode {
    #[default]
    Auto,
    On,
    Off,
}

#[derive(Clone, Debug, Default)]
pub struct FileOptions {
    pub filename: PathBuf,
    pub read_only: bool,
    /// Open read-write if permitted, else fall back to read-only.
    pub auto_read_only: bool,
    /// O_DIRECT.
    pub cache_direct: bool,
    /// Ignore flushes (unsafe; QEMU's cache.no-flush).
    pub cache_no_flush: bool,
    pub aio: AioMode,
    pub locking: LockingMode,
    /// `discard=unmap`: TRIM punches holes.
    pub discard: bool,
    /// QEMU's `force-share` (read-only only): nothing is forbidden to others,
    /// so another process may write or resize the image meanwhile.
    pub force_share: bool,
}

/// Largest zero buffer written when zeroing has to fall back to writes.
const ZERO_CHUNK: usize = 1 << 20;
/// Linux ioctls for block devices.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

#[derive(Debug)]
pub struct FileDriver {
    file: File,
    /// For error messages (the ring's too, through `map_file`).
    path: PathBuf,
    size: u64,
    read_only: bool,
    direct: bool,
    no_flush: bool,
    discard: bool,
    block_device: bool,
    /// The file lives in memory (tmpfs, ramfs): I/O is a page-cache copy that
    /// never waits for a device, so the node may run small requests inline.
    memory_backed: bool,
    /// SEEK_DATA/SEEK_HOLE may run on the caller's thread (memory and local
    /// disk filesystems), as QEMU runs them in its main loop: a block status
    /// query is a seek, and a map of a sparse terabyte on a disk file spent
    /// most of its time waking pool threads for seeks that took microseconds
    /// (qemu-nbd did it in under half the time).
    seeks_inline: bool,
    /// `preadv2(RWF_NOWAIT)` works here; cleared the first time the kernel
    /// says it does not (EOPNOTSUPP), so unsupported files stop trying.
    nowait_reads: AtomicBool,
    /// Serialises read-modify-write of unaligned O_DIRECT writes. It guards
    /// no data, so a poisoned lock is taken as it is (see [`relock`]).
    rmw: Mutex<()>,
    /// The last data extent SEEK_DATA/SEEK_HOLE found. On tmpfs and others
    /// SEEK_HOLE walks the page cache up to the next hole, so without this a
    /// fully allocated image pays O(file size) per query. Writes only turn
    /// holes into data, so a cached data range stays true until a discard or
    /// hole punch, which clears it. (QEMU keeps the same kind of cache.)
    /// The value is replaced whole, never half-written, so a poisoned lock
    /// is taken as it is (see [`relock`]).
    data_cache: Mutex<Option<(u64, u64)>>,
    /// The io_uring of `aio=io_uring|native` (None: the thread pool).
    ring: Option<Ring>,
}

impl FileDriver {
    pub fn open(opts: &FileOptions) -> BlockResult<Self> {
        // QEMU's rule (Linux AIO needs O_DIRECT), kept so that a command
        // line qemu-storage-daemon refuses is refused here too.
        if opts.aio == AioMode::Native && !opts.cache_direct {
            return Err(BlockError::new(
                BlockErrorKind::InvalidArgument,
                "aio=native was specified, but it requires cache.direct=on, which was not specified.",
            ));
        }
        let (file, read_only) = open_file(opts)?;
        let meta = file.metadata().map_err(|e| {
            BlockError::io(format!("Could not stat '{}'", opts.filename.display()), e)
        })?;
        let block_device = meta.file_type().is_block_device();
        let size = match block_device {
            true => block_device_size(&file).map_err(|e| {
                BlockError::io(
                    format!("Could not get size of '{}'", opts.filename.display()),
                    e,
                )
            })?,
            false => meta.len(),
        };
        if opts.locking != LockingMode::Off {
            // A writer forbids other writers, as a QEMU block backend does by default.
            let (perms, unshared): (&[usize], &[usize]) = match (read_only, opts.force_share) {
                (true, true) => (&[PERM_READ], &[]),
                (true, false) => (&[PERM_READ], &[PERM_RESIZE]),
                (false, _) => (&[PERM_READ, PERM_WRITE], &[PERM_WRITE, PERM_RESIZE]),
            };
            lock_image(&file, perms, unshared)?;
        }
        let fs = match block_device {
            true => FsKind::Other,
            false => fs_kind(&file),
        };
        let memory_backed = fs == FsKind::Memory;
        let ring = match opts.aio {
            AioMode::Threads => None,
            AioMode::IoUring | AioMode::Native => match Ring::new() {
                Ok(ring) => Some(ring),
                Err(e) => {
                    tracing::warn!(file = %opts.filename.display(), error = %e,
                        "io_uring is not available; using the thread pool");
                    None
                }
            },
        };
        Ok(Self {
            file,
            path: opts.filename.clone(),
            size,
            read_only,
            direct: opts.cache_direct,
            no_flush: opts.cache_no_flush,
            discard: opts.discard,
            block_device,
            memory_backed,
            seeks_inline: fs != FsKind::Other,
            nowait_reads: AtomicBool::new(!opts.cache_direct && !memory_backed),
            rmw: Mutex::new(()),
            data_cache: Mutex::new(None),
            ring,
        })
    }

    /// True if the file was opened read-only (asked for, or auto-read-only fell back).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn io_err(&self, what: &str, e: io::Error) -> BlockError {
        BlockError::io(format!("{what} '{}'", self.path.display()), e)
    }

    fn is_aligned(&self, offset: u64, len: usize, ptr: *const u8) -> bool {
        let a = ALIGNMENT as u64;
        !self.direct
            || (offset.is_multiple_of(a)
                && (len as u64).is_multiple_of(a)
                && (ptr as usize).is_multiple_of(ALIGNMENT))
    }

    /// pread until `buf` is full; past the end of the file reads as zeroes.
    fn pread_full(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads through an aligned bounce buffer (O_DIRECT with unaligned requests).
    fn read_bounced(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (start, bounce_len) = aligned_span(offset, buf.len());
        let mut bounce = IoBuf::zeroed(bounce_len);
        self.pread_full(&mut bounce, start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_direct_unaligned(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let _guard = relock(&self.rmw);
        let (start, bounce_len) = aligned_span(offset, buf.len());
        let mut bounce = IoBuf::zeroed(bounce_len);
        self.pread_full(&mut bounce, start)?;
        let skip = (offset - start) as usize;
        bounce[skip..skip + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(&bounce, start)
    }

    /// A durable write: pwritev2(RWF_DSYNC) when the kernel has it, else write + fdatasync.
    fn write_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: iov describes `buf`, which outlives the call; the fd is open.
        let n = unsafe {
            libc::pwritev2(
                self.file.as_raw_fd(),
                &iov,
                1,
                offset as i64,
                libc::RWF_DSYNC,
            )
        };
        if n >= 0 && n as usize == buf.len() {
            return Ok(());
        }
        // Short write or no RWF_DSYNC: finish with plain writes, then sync.
        let done = n.max(0) as usize;
        self.file.write_all_at(&buf[done..], offset + done as u64)?;
        self.file.sync_data()
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on an open fd with plain integer arguments.
        match unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    }

    fn blk_ioctl(&self, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKDISCARD/BLKZEROOUT read a [u64; 2] range from the pointer.
        match unsafe { libc::ioctl(self.file.as_raw_fd(), request, range.as_ptr()) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> BlockResult<()> {
        let zeroes = IoBuf::zeroed(ZERO_CHUNK.min(len as usize));
        let mut pos = 0u64;
        while pos < len {
            let n = (len - pos).min(zeroes.len() as u64) as usize;
            self.write_at(&zeroes[..n], offset + pos, false)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn cached_data_end(&self, offset: u64) -> Option<u64> {
        let cache = relock(&self.data_cache);
        cache
            .filter(|&(start, end)| start <= offset && offset < end)
            .map(|(_, end)| end)
    }

    fn clear_data_cache(&self) {
        *relock(&self.data_cache) = None;
    }

    /// Remembers a data range, merged with the cached one when they touch
    /// (random queries into one big data extent then converge on all of it).
    fn remember_data(&self, start: u64, end: u64) {
        let mut cache = relock(&self.data_cache);
        *cache = match *cache {
            Some((s, e)) if start <= e && s <= end => Some((s.min(start), e.max(end))),
            _ => Some((start, end)),
        };
    }

    /// Block status from SEEK_DATA/SEEK_HOLE.
    fn seek_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        let data = Extent {
            len,
            allocated: true,
            zero: false,
            depth: 1,
        };
        let end = offset + len;
        let next_data = match self.seek(offset, libc::SEEK_DATA) {
            Ok(d) => d,
            // Filesystems without SEEK_DATA: everything is data.
            Err(_) => return Ok(data),
        };
        match next_data {
            Some(d) if d <= offset => {
                let hole = self
                    .seek(offset, libc::SEEK_HOLE)
                    .ok()
                    .flatten()
                    .unwrap_or(end);
                self.remember_data(offset, hole.max(offset + 1));
                Ok(Extent {
                    len: hole.clamp(offset + 1, end) - offset,
                    ..data
                })
            }
            Some(d) => Ok(Extent {
                len: d.min(end) - offset,
                allocated: false,
                zero: true,
                depth: 1,
            }),
            None => Ok(Extent {
                len,
                allocated: false,
                zero: true,
                depth: 1,
            }),
        }
    }

    fn seek(&self, offset: u64, whence: i32) -> io::Result<Option<u64>> {
        // SAFETY: lseek on an open fd.
        match unsafe { libc::lseek(self.file.as_raw_fd(), offset as i64, whence) } {
            -1 => match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
                e => Err(e),
            },
            n => Ok(Some(n as u64)),
        }
    }
}

/// Locks one of the driver's locks whose holders leave nothing half-done
/// (see each field): a panic elsewhere must not fail every later request.
fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn open_file(opts: &FileOptions) -> BlockResult<(File, bool)> {
    let try_open = |read_only: bool| {
        let mut o = OpenOptions::new();
        o.read(true).write(!read_only);
        let mut flags = libc::O_CLOEXEC;
        if opts.cache_direct {
            flags |= libc::O_DIRECT;
        }
        o.custom_flags(flags);
        o.open(&opts.filename)
    };
    let context = || format!("Could not open '{}'", opts.filename.display());
    if opts.read_only {
        return try_open(true)
            .map(|f| (f, true))
            .map_err(|e| BlockError::io(context(), e));
    }
    match try_open(false) {
        Ok(f) => Ok((f, false)),
        Err(e) if opts.auto_read_only && is_permission_error(&e) => try_open(true)
            .map(|f| (f, true))
            .map_err(|e| BlockError::io(context(), e)),
        Err(e) => Err(BlockError::io(context(), e)),
    }
}

fn is_permission_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EACCES | libc::EROFS | libc::EPERM)
    )
}

/// Where a file lives, as far as blocking goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FsKind {
    /// tmpfs or ramfs: reads and writes are memory copies.
    Memory,
    /// A local disk filesystem (ext4, xfs, btrfs, f2fs): data I/O waits
    /// for the device, but SEEK_DATA/SEEK_HOLE reads the extent map the
    /// kernel keeps for the open inode (at worst one metadata block).
    LocalDisk,
    /// Anything else (NFS, FUSE, ...), where even a seek may wait on a peer.
    Other,
}

fn fs_kind(file: &File) -> FsKind {
    const TMPFS_MAGIC: libc::c_long = 0x0102_1994;
    const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;
    const EXT4_MAGIC: libc::c_long = 0xef53;
    const XFS_MAGIC: libc::c_long = 0x5846_5342;
    const BTRFS_MAGIC: libc::c_long = 0x9123_683e;
    const F2FS_MAGIC: libc::c_long = 0xf2f5_2010;
    // SAFETY: an all-zero statfs is a valid value for fstatfs to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs through the pointer; the fd is open.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return FsKind::Other;
    }
    #[allow(clippy::unnecessary_cast)]
    match st.f_type as libc::c_long {
        TMPFS_MAGIC | RAMFS_MAGIC => FsKind::Memory,
        EXT4_MAGIC | XFS_MAGIC | BTRFS_MAGIC | F2FS_MAGIC => FsKind::LocalDisk,
        _ => FsKind::Other,
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    match unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) } {
        0 => Ok(size),
        _ => Err(io::Error::last_os_error()),
    }
}

/// The ALIGNMENT-aligned span covering `[offset, offset + len)`.
fn aligned_span(offset: u64, len: usize) -> (u64, usize) {
    let a = ALIGNMENT as u64;
    let start = offset / a * a;
    let end = (offset + len as u64).next_multiple_of(a);
    (start, (end - start) as usize)
}

impl Driver for FileDriver {
    fn driver_name(&self) -> &'static str {
        if self.block_device {
            "host_device"
        } else {
            "file"
        }
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn current_len(&self) -> Option<u64> {
        match self.block_device {
            true => None,
            false => self.file.metadata().ok().map(|m| m.len()),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            can_write: !self.read_only,
            can_discard: self.discard,
            can_write_zeroes_fast: true,
            request_alignment: if self.direct { 512 } else { 1 },
            max_transfer: 0,
            nonblocking: self.memory_backed,
            maps_page_cache: self.memory_backed && !self.direct,
            maps_ring: self.ring.is_some(),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let r = match self.is_aligned(offset, buf.len(), buf.as_ptr()) {
            true => self.pread_full(buf, offset),
            false => self.read_bounced(buf, offset),
        };
        r.map_err(|e| self.io_err("Could not read from", e))
    }

    /// A page-cache file (tmpfs, no O_DIRECT) answers reads of any range:
    /// past the file's end `sendfile` stops and the writer sends zeroes, as
    /// `read_at` would return. So a qcow2 image that grew after open (its
    /// file node's `size` is the size at open) sends the clusters it
    /// allocated since with `sendfile` too. Writes stay inside the size at
    /// open, where `write_at`'s callers put them. A file with a ring answers
    /// ranges aligned as O_DIRECT needs (buffers always are: `IoBuf`).
    fn map_file(&self, offset: u64, len: u64, access: Access) -> Option<FileMapping<'_>> {
        let inside = offset.checked_add(len).is_some_and(|end| end <= self.size);
        let page_cache = self.memory_backed && !self.direct && (inside || access == Access::Read);
        let a = ALIGNMENT as u64;
        let aligned = !self.direct || (offset.is_multiple_of(a) && len.is_multiple_of(a));
        let writable = access == Access::Read || !self.read_only;
        let ring = self.ring.as_ref().filter(|_| aligned && writable);
        if !page_cache && ring.is_none() {
            return None;
        }
        Some(FileMapping {
            page_cache,
            ring,
            ..FileMapping::one_run(self.file.as_fd(), &self.path, offset, len)
        })
    }

    fn try_read_now(&self, buf: &mut [u8], offset: u64) -> Option<BlockResult<()>> {
        if !self.nowait_reads.load(Ordering::Relaxed) {
            return None;
        }
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: one iovec describing `buf`, which stays borrowed mutably for the call.
        let n = unsafe {
            libc::preadv2(
                self.file.as_raw_fd(),
                &iov,
                1,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n >= 0 {
            // A short read is partly cached or at EOF: the pool reads it whole.
            return (n as usize == buf.len()).then_some(Ok(()));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EINTR) => None,
            Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS) => {
                self.nowait_reads.store(false, Ordering::Relaxed);
                None
            }
            _ => Some(Err(self.io_err("Could not read from", e))),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        let aligned = self.is_aligned(offset, buf.len(), buf.as_ptr());
        let r = match (aligned, fua) {
            (true, true) => self.write_durable(buf, offset),
            (true, false) => self.file.write_all_at(buf, offset),
            (false, _) => self.write_direct_unaligned(buf, offset).and_then(|()| {
                if fua {
                    self.file.sync_data()
                } else {
                    Ok(())
                }
            }),
        };
        r.map_err(|e| self.io_err("Could not write to", e))
    }

    fn flush(&self) -> BlockResult<()> {
        if self.no_flush || self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| self.io_err("Could not flush", e))
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        if !self.discard || len == 0 {
            return Ok(());
        }
        self.clear_data_cache();
        let r = match self.block_device {
            true => self.blk_ioctl(BLKDISCARD, offset, len),
            false => self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
        };
        // Discard is advisory: a filesystem that can't punch holes just keeps the data.
        match r {
            Err(e)
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL)
                ) =>
            {
                Err(self.io_err("Could not discard on", e))
            }
            _ => Ok(()),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        if len == 0 {
            return Ok(());
        }
        self.clear_data_cache();
        let cheap = match (self.block_device, flags.may_unmap && self.discard) {
            (false, true) => self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
            (false, false) => self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
            (true, _) if flags.fast => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
            (true, _) => self.blk_ioctl(BLKZEROOUT, offset, len),
        };
        match cheap {
            Ok(()) => Ok(()),
            Err(_) if flags.fast => Err(BlockError::new(
                BlockErrorKind::NotSupported,
                "fast zeroing is not supported here",
            )),
            Err(_) => self.write_zero_buffers(offset, len),
        }
    }

    fn try_block_status_now(&self, offset: u64, len: u64) -> Option<BlockResult<Extent>> {
        let data = Extent {
            len,
            allocated: true,
            zero: false,
            depth: 1,
        };
        if self.block_device || len == 0 {
            return Some(Ok(data));
        }
        match self.cached_data_end(offset) {
            Some(data_end) => Some(Ok(Extent {
                len: data_end.min(offset + len) - offset,
                ..data
            })),
            None if self.seeks_inline => Some(self.seek_status(offset, len)),
            None => None,
        }
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        if let Some(known) = self.try_block_status_now(offset, len) {
            return known;
        }
        self.seek_status(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        // SAFETY: posix_fadvise on an open fd with plain integer arguments.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as i64,
                len as i64,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        Ok(())
    }
}
