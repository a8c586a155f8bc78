//! The one file a FUSE export shows (inode 1, the mount's root): fuser's
//! callbacks, each answered on the reader thread when it needs no I/O and
//! otherwise handed to the runtime (see the module doc of `super`). Reads,
//! writes, flushes and fallocate's punches and zeroings are counted in the
//! export's and the node's statistics (`exports::counting`), as NBD
//! requests are: read, write, flush, unmap (a punched hole) and write (a
//! zeroed range).

use std::ffi::OsStr;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use block::{BlockError, BlockNode, IoBuf, IoKind, IoStats, Outcome, ZeroFlags};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;

use crate::exports::counting::Counted;
use crate::exports::inflight::{InFlight, InFlightGuard};

/// Requests the kernel may have in flight in the background (see `init`).
const MAX_BACKGROUND: u16 = 64;

/// How long the kernel may cache the file's attributes (QEMU's 1 s).
const ATTR_TTL: Duration = Duration::from_secs(1);

/// The export's state shared by the reader thread, the request tasks and
/// the export (which closes it at removal).
#[derive(Debug)]
pub struct Shared {
    /// `None` once the export is stopping: later requests fail with `EIO`.
    node: Mutex<Option<Arc<BlockNode>>>,
    writable: bool,
    /// Whether the mount has `allow_other`: only then may the mode give
    /// others access, and the owner change (QEMU's rules).
    allow_other: bool,
    owner: Mutex<Owner>,
    in_flight: Arc<InFlight>,
    /// The export's statistics (the node has its own).
    stats: Arc<IoStats>,
}

/// The file's permission bits and owner, which `chmod`/`chown` change in
/// memory only (as in QEMU).
#[derive(Clone, Copy, Debug)]
struct Owner {
    perm: u16,
    uid: u32,
    gid: u32,
}

impl Shared {
    pub fn new(
        node: Arc<BlockNode>,
        writable: bool,
        allow_other: bool,
        stats: Arc<IoStats>,
    ) -> Arc<Self> {
        // SAFETY: getuid and getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Arc::new(Self {
            node: Mutex::new(Some(node)),
            writable,
            allow_other,
            owner: Mutex::new(Owner {
                perm: if writable { 0o600 } else { 0o400 },
                uid,
                gid,
            }),
            in_flight: Arc::default(),
            stats,
        })
    }

    /// No request gets the node from now on.
    pub fn close(&self) {
        lock(&self.node).take();
    }

    /// Returns once every request that got the node has replied.
    pub fn wait_idle(&self) {
        self.in_flight.wait_idle();
    }

    /// The node for one request, counted in flight until the guard drops.
    /// Counted before the node is taken, so that [`Self::close`] followed
    /// by [`Self::wait_idle`] cannot miss a request that got it.
    fn begin(&self) -> Option<(Arc<BlockNode>, InFlightGuard)> {
        let guard = self.in_flight.enter();
        let node = lock(&self.node).clone()?;
        Some((node, guard))
    }

    /// [`Self::begin`], and the request counted in the statistics.
    fn begin_counted(&self) -> Option<(Arc<BlockNode>, Counted, InFlightGuard)> {
        let (node, guard) = self.begin()?;
        let count = Counted::begin(&self.stats, &node);
        Some((node, count, guard))
    }

    /// Counts a request of `kind` refused before it reached the node
    /// (a write to a read-only export), while the export serves.
    fn count_refused(&self, kind: IoKind, range: (u64, u64), errno: Errno) {
        if let Some(node) = lock(&self.node).clone() {
            Counted::refused(&self.stats, &node, kind, range, errno.code());
        }
    }

    fn attr(&self, node: &BlockNode) -> FileAttr {
        let owner = *lock(&self.owner);
        let now = SystemTime::now();
        let size = node.size();
        FileAttr {
            ino: INodeNo::ROOT,
            size,
            blocks: size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: FileType::RegularFile,
            perm: owner.perm,
            nlink: 1,
            uid: owner.uid,
            gid: owner.gid,
            rdev: 0,
            blksize: node.capabilities().request_alignment.max(1),
            flags: 0,
        }
    }

    /// `chmod`/`chown` as QEMU allows them: no access for others without
    /// `allow_other`, no write bits on a read-only export.
    fn set_owner(
        &self,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<(), Errno> {
        let mut owner = lock(&self.owner);
        if let Some(mode) = mode {
            if !self.allow_other && mode & 0o077 != 0 {
                return Err(Errno::EPERM);
            }
            if !self.writable && mode & 0o222 != 0 {
                return Err(Errno::EROFS);
            }
            owner.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = uid {
            owner.uid = uid;
        }
        if let Some(gid) = gid {
            owner.gid = gid;
        }
        Ok(())
    }
}

/// fuser's view of the export.
#[derive(Debug)]
pub struct ImageFile {
    shared: Arc<Shared>,
    runtime: Handle,
}

impl ImageFile {
    pub fn new(shared: Arc<Shared>, runtime: Handle) -> Self {
        Self { shared, runtime }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Runs one request's I/O on the runtime, counted in flight until it
    /// has replied.
    fn run(&self, guard: InFlightGuard, io: impl Future<Output = ()> + Send + 'static) {
        self.runtime.spawn(async move {
            io.await;
            drop(guard);
        });
    }
}

fn errno(e: &BlockError) -> Errno {
    Errno::from_i32(e.errno())
}

/// A flush (`fsync`, and `flush` at each `close()`), counted, then answered.
async fn flush(node: Arc<BlockNode>, count: Counted, reply: ReplyEmpty) {
    let r = node.flush().await;
    count.end_with(IoKind::Flush, (0, 0), &r);
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

impl Filesystem for ImageFile {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Without it the kernel sends an O_DIRECT file's requests one at a
        // time; a kernel that lacks it still works, only slower.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        // Asynchronous reads and O_DIRECT requests are "background" requests,
        // of which the kernel keeps 12 in flight by default: too few for a
        // queue depth of 32. A value the kernel refuses leaves its default.
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        Ok(())
    }

    /// A regular file is always ready. ENOSYS tells the kernel to stop
    /// asking and answer polls itself with "ready" (io_uring polls before
    /// it reads).
    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        _flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        reply.error(Errno::ENOSYS);
    }

    /// No extended attributes, as in QEMU; ENOSYS makes the kernel stop
    /// asking (fuser's default answer is the same, with a warning each
    /// time, and `cp` or `ls` ask for security labels on every file).
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    /// No ioctls, as in QEMU (fio and cp probe some); quietly.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOSYS);
    }

    /// The mount is one file, not a directory: nothing to look up.
    fn lookup(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::ENOENT);
    }

    fn getattr(&self, _req: &Request, _ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match lock(&self.shared.node).clone() {
            Some(node) => reply.attr(&ATTR_TTL, &self.shared.attr(&node)),
            None => reply.error(Errno::EIO),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        crtime: Option<SystemTime>,
        chgtime: Option<SystemTime>,
        bkuptime: Option<SystemTime>,
        flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let times = atime.is_some() || mtime.is_some() || ctime.is_some();
        let other = crtime.is_some() || chgtime.is_some() || bkuptime.is_some() || flags.is_some();
        let owner_change = uid.is_some() || gid.is_some();
        if times || other || (owner_change && !self.shared.allow_other) {
            return reply.error(Errno::ENOTSUP);
        }
        let Some(node) = lock(&self.shared.node).clone() else {
            return reply.error(Errno::EIO);
        };
        if let Some(size) = size {
            if !self.shared.writable {
                return reply.error(Errno::EACCES);
            }
            // Resizing needs a block-layer resize bexd does not have yet;
            // truncating to the current size (O_TRUNC is not that) is a no-op.
            if size != node.size() {
                return reply.error(Errno::EOPNOTSUPP);
            }
        }
        match self.shared.set_owner(mode, uid, gid) {
            Ok(()) => reply.attr(&ATTR_TTL, &self.shared.attr(&node)),
            Err(e) => reply.error(e),
        }
    }

    /// QEMU's open: no `direct_io`, no `keep_cache`; the kernel's page cache
    /// serves buffered readers, O_DIRECT goes straight to the export.
    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some((node, count, guard)) = self.shared.begin_counted() else {
            return reply.error(Errno::EIO);
        };
        self.run(guard, read(node, count, offset, size, reply));
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if !self.shared.writable {
            let range = (offset, data.len() as u64);
            self.shared
                .count_refused(IoKind::Write, range, Errno::EACCES);
            return reply.error(Errno::EACCES);
        }
        let Some((node, count, guard)) = self.shared.begin_counted() else {
            return reply.error(Errno::EIO);
        };
        // Short at the end of the image: it does not grow (no `growable`).
        let len = (data.len() as u64).min(node.size().saturating_sub(offset)) as usize;
        if len == 0 {
            return reply.written(0);
        }
        // The reader thread reuses its buffer for the next request.
        let mut buf = IoBuf::for_overwrite(len);
        buf.copy_from_slice(&data[..len]);
        self.run(guard, write(node, count, buf, offset, reply));
    }

    /// Called at each `close()`; QEMU flushes there, so a writer that closes
    /// without `fsync` still has its data on disk.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let Some((node, count, guard)) = self.shared.begin_counted() else {
            return reply.error(Errno::EIO);
        };
        self.run(guard, flush(node, count, reply));
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some((node, count, guard)) = self.shared.begin_counted() else {
            return reply.error(Errno::EIO);
        };
        self.run(guard, flush(node, count, reply));
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let kind = fallocate_kind(mode);
        if !self.shared.writable {
            if let Some(kind) = kind {
                self.shared
                    .count_refused(kind, (offset, length), Errno::EACCES);
            }
            return reply.error(Errno::EACCES);
        }
        let Some((node, count, guard)) = self.shared.begin_counted() else {
            return reply.error(Errno::EIO);
        };
        self.run(guard, async move {
            let in_image = length.min(node.size().saturating_sub(offset));
            let r = fallocate(&node, offset, length, mode).await;
            if let Some(kind) = kind {
                count.end(kind, (offset, in_image), r.outcome());
            }
            match r {
                Allocated::Done => reply.ok(),
                Allocated::Refused(e) | Allocated::Failed(e) => reply.error(e),
            }
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return reply.error(Errno::EINVAL);
        }
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::ENXIO);
        };
        let Some((node, guard)) = self.shared.begin() else {
            return reply.error(Errno::EIO);
        };
        self.run(guard, async move {
            let want_data = whence == libc::SEEK_DATA;
            match seek(&node, offset, want_data).await {
                Ok(found) => reply.offset(found as i64),
                Err(e) => reply.error(e),
            }
        });
    }
}

async fn read(node: Arc<BlockNode>, count: Counted, offset: u64, size: u32, reply: ReplyData) {
    // Short at the end of the image, as a reader expects at EOF.
    let len = u64::from(size).min(node.size().saturating_sub(offset));
    if len == 0 {
        return reply.data(&[]);
    }
    let (buf, r) = node.read(IoBuf::for_overwrite(len as usize), offset).await;
    count.end_with(IoKind::Read, (offset, len), &r);
    match r {
        Ok(()) => reply.data(&buf),
        Err(e) => reply.error(errno(&e)),
    }
}

async fn write(node: Arc<BlockNode>, count: Counted, buf: IoBuf, offset: u64, reply: ReplyWrite) {
    let len = buf.len() as u32;
    let r = node.write(buf, offset, false).await.1;
    count.end_with(IoKind::Write, (offset, u64::from(len)), &r);
    match r {
        Ok(()) => reply.written(len),
        Err(e) => reply.error(errno(&e)),
    }
}

/// How a fallocate request is counted: a punched hole as an unmap, a
/// zeroed range as a write (as NBD's TRIM and WRITE_ZEROES); other modes
/// move no data and are not counted.
fn fallocate_kind(mode: i32) -> Option<IoKind> {
    if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
        Some(IoKind::Unmap)
    } else if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
        Some(IoKind::Write)
    } else {
        None
    }
}

/// How a fallocate request ended.
enum Allocated {
    Done,
    /// Refused before it reached the node.
    Refused(Errno),
    /// The node failed it.
    Failed(Errno),
}

impl Allocated {
    fn outcome(&self) -> Outcome {
        match self {
            Allocated::Done => Outcome::Done,
            Allocated::Refused(e) => Outcome::Invalid(e.code()),
            Allocated::Failed(e) => Outcome::Failed(e.code()),
        }
    }
}

/// QEMU's fallocate modes on an image that does not grow: punching a hole
/// (with KEEP_SIZE, as Linux requires) deallocates if the node can do so
/// cheaply and fails with EOPNOTSUPP otherwise; zeroing a range writes
/// zeroes; plain preallocation only makes sense past the end, which would
/// grow the image.
async fn fallocate(node: &BlockNode, offset: u64, length: u64, mode: i32) -> Allocated {
    let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
    let size = node.size();
    let in_image = length.min(size.saturating_sub(offset));
    match fallocate_kind(mode) {
        Some(IoKind::Unmap) if !keep_size => Allocated::Refused(Errno::EINVAL),
        Some(IoKind::Unmap) => {
            let flags = ZeroFlags {
                may_unmap: true,
                fast: true,
            };
            zero(node, offset, in_image, flags).await
        }
        Some(_) if !keep_size && offset.saturating_add(length) > size => {
            Allocated::Refused(Errno::EOPNOTSUPP)
        }
        Some(_) => zero(node, offset, in_image, ZeroFlags::default()).await,
        None => Allocated::Refused(Errno::EOPNOTSUPP),
    }
}

async fn zero(node: &BlockNode, offset: u64, len: u64, flags: ZeroFlags) -> Allocated {
    if len == 0 {
        return Allocated::Done;
    }
    match node.write_zeroes(offset, len, flags).await {
        Ok(()) => Allocated::Done,
        Err(e) => Allocated::Failed(errno(&e)),
    }
}

/// SEEK_DATA / SEEK_HOLE from the node's block status, as QEMU answers
/// them: the end of the image is a hole, and past it there is nothing.
async fn seek(node: &BlockNode, mut offset: u64, want_data: bool) -> Result<u64, Errno> {
    let size = node.size();
    while offset < size {
        let extent = node
            .block_status(offset, size - offset)
            .await
            .map_err(|e| errno(&e))?;
        if extent.allocated == want_data {
            return Ok(offset);
        }
        offset += extent.len.max(1);
    }
    match offset == size && !want_data {
        true => Ok(size),
        false => Err(Errno::ENXIO),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
