//! An io_uring engine for positional file I/O (`aio=io_uring` and `aio=native`).
//!
//! Why: on the thread pool every request costs two thread wake-ups and a
//! turn at the pool's shared lock. On an O_DIRECT disk image `perf` put that
//! at about 70 us of server CPU per 4 KiB read, and fio over NBD reached 16k
//! IOPS where fio on the file itself reaches 83k. Here the task that asks
//! pushes one submission entry and enters the kernel once. Completions are
//! reaped by a task on the runtime the ring was made in, woken through the
//! ring's descriptor by the runtime's own epoll (no thread of its own, so
//! no second wake-up per completion); a ring made outside a runtime (unit
//! tests) has a reaper thread instead.
//!
//! A caller that starts several requests in a row can defer their
//! submission through a [`Batch`] it passes down (see `batch.rs`): one
//! `io_uring_enter` then submits them all.
//!
//! A request's buffer moves into the ring's table of operations until its
//! completion arrives, so a caller that stops waiting (a dropped future)
//! cannot free memory the kernel still writes into: the reaper drops it.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use io_uring::{opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::oneshot;

use crate::buf::IoBuf;
use crate::run::FileRun;

mod batch;

pub use batch::Batch;

/// Submission entries per ring; more operations than this may be in flight
/// (the completion queue overflows into the kernel's backlog, never drops).
const ENTRIES: u32 = 256;
/// The user data of the entry that tells the reaper to stop.
const STOP: u64 = u64::MAX;

/// One io_uring instance and the thread that reaps its completions.
#[derive(Debug)]
pub struct Ring {
    shared: Arc<Shared>,
}

struct Shared {
    ring: IoUring,
    /// Held while pushing entries: the submission queue has one writer at a
    /// time. It guards no data, so a holder that panicked leaves nothing
    /// half-done and the lock is used poisoned (see [`lock`]).
    sq: Mutex<()>,
    /// Operations in flight. Every change is one map insert or remove,
    /// which a panic cannot leave half-done, so a poisoned lock is used as
    /// it is: refusing it would strand buffers the kernel still writes.
    ops: Mutex<Ops>,
    stopping: AtomicBool,
}

/// Takes one of the ring's locks, poisoned or not (see their fields for why
/// that is sound); they are on every request's path, where a panic must not
/// spread to every later request.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Ops {
    next: u64,
    in_flight: HashMap<u64, Op>,
}

/// An operation the kernel may still be using `buf` for.
struct Op {
    buf: IoBuf,
    done: oneshot::Sender<(IoBuf, i32)>,
}

#[derive(Clone, Copy)]
enum Kind {
    Read,
    Write { dsync: bool },
}

impl Ring {
    /// A ring and its reaper (a task on the current runtime, or a thread
    /// outside one); an error where the kernel (or a seccomp filter) refuses
    /// io_uring, and the caller falls back to the thread pool.
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::new(ENTRIES)?;
        let shared = Arc::new(Shared {
            ring,
            sq: Mutex::new(()),
            ops: Mutex::new(Ops::default()),
            stopping: AtomicBool::new(false),
        });
        let reaper = shared.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let _in_runtime = runtime.enter();
                let fd = RingFd(shared.ring.as_raw_fd());
                // SAFETY: the descriptor is the ring's, and the task that owns
                // this AsyncFd also holds the ring (`reaper`), so it stays open
                // and the same for the AsyncFd's whole life.
                let readable = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
                runtime.spawn(reaper.reap_on_runtime(readable));
            }
            Err(_) => {
                std::thread::Builder::new()
                    .name("bexd-uring".into())
                    .spawn(move || reaper.reap())?;
            }
        }
        Ok(Self { shared })
    }

    /// Reads `buf.len()` bytes from `fd` at `offset`; past the end of the
    /// file reads as zeroes (as `pread` loops do).
    pub async fn read(
        &self,
        fd: BorrowedFd<'_>,
        buf: IoBuf,
        offset: u64,
        batch: Option<&Batch>,
    ) -> (IoBuf, io::Result<()>) {
        let len = buf.len() as u64;
        self.read_runs(fd, buf, &[FileRun { offset, len }], batch)
            .await
    }

    /// Fills `buf` from `runs` of `fd`, in order (their lengths add up to
    /// the buffer's); past the end of the file reads as zeroes. The first
    /// entry goes through `batch` (see `batch.rs`); the ones after it are
    /// pushed at once, since by then the batch's owner may be waiting.
    pub async fn read_runs(
        &self,
        fd: BorrowedFd<'_>,
        mut buf: IoBuf,
        runs: &[FileRun],
        mut batch: Option<&Batch>,
    ) -> (IoBuf, io::Result<()>) {
        let mut at = 0usize;
        for run in runs {
            let end = at + run.len as usize;
            let mut done = at;
            while done < end {
                let pos = run.offset + (done - at) as u64;
                let (back, res) = self
                    .submit(Kind::Read, fd, buf, done, end, pos, batch.take())
                    .await;
                buf = back;
                match res {
                    0 => {
                        buf[done..end].fill(0);
                        break;
                    }
                    n if n > 0 => done += n as usize,
                    e if e == -libc::EINTR || e == -libc::EAGAIN => {}
                    e => return (buf, Err(io::Error::from_raw_os_error(-e))),
                }
            }
            at = end;
        }
        (buf, Ok(()))
    }

    /// Writes all of `buf` to `fd` at `offset`; with `dsync`, durably
    /// (RWF_DSYNC, as `pwritev2` does for FUA). The first entry goes
    /// through `batch`, as for [`Self::read_runs`].
    pub async fn write(
        &self,
        fd: BorrowedFd<'_>,
        mut buf: IoBuf,
        offset: u64,
        dsync: bool,
        mut batch: Option<&Batch>,
    ) -> (IoBuf, io::Result<()>) {
        let mut done = 0;
        while done < buf.len() {
            let (end, pos) = (buf.len(), offset + done as u64);
            let (back, res) = self
                .submit(Kind::Write { dsync }, fd, buf, done, end, pos, batch.take())
                .await;
            buf = back;
            match res {
                0 => return (buf, Err(io::ErrorKind::WriteZero.into())),
                n if n > 0 => done += n as usize,
                e if e == -libc::EINTR || e == -libc::EAGAIN => {}
                e => return (buf, Err(io::Error::from_raw_os_error(-e))),
            }
        }
        (buf, Ok(()))
    }

    /// One read or write of `buf[at..end]` at file offset `pos`: the
    /// buffer and the kernel's result (bytes, or minus an errno).
    #[allow(clippy::too_many_arguments)]
    async fn submit(
        &self,
        kind: Kind,
        fd: BorrowedFd<'_>,
        mut buf: IoBuf,
        at: usize,
        end: usize,
        pos: u64,
        batch: Option<&Batch>,
    ) -> (IoBuf, i32) {
        assert!(
            at < end && end <= buf.len(),
            "a ring I/O names bytes of its buffer"
        );
        let len = (end - at).min(u32::MAX as usize & !4095) as u32;
        // SAFETY: `at < buf.len()` (asserted), so the pointer stays inside the buffer.
        let ptr = unsafe { buf.as_mut_ptr().add(at) };
        let entry = match kind {
            Kind::Read => opcode::Read::new(types::Fd(fd.as_raw_fd()), ptr, len)
                .offset(pos)
                .build(),
            Kind::Write { dsync } => opcode::Write::new(types::Fd(fd.as_raw_fd()), ptr, len)
                .offset(pos)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
        };
        let (tx, rx) = oneshot::channel();
        let key = {
            let mut ops = lock(&self.shared.ops);
            let key = ops.next;
            ops.next = (ops.next + 1) % STOP;
            // The buffer lives here until the completion, whatever the caller does.
            ops.in_flight.insert(key, Op { buf, done: tx });
            key
        };
        let entry = entry.user_data(key);
        if !batch.is_some_and(|b| b.defer(&self.shared, &entry)) {
            self.shared.push_now(&entry);
        }
        match rx.await {
            Ok(done) => done,
            // The reaper is gone (the ring failed, or its runtime ended) and
            // kept the buffer, which the kernel may still write into.
            Err(_) => (IoBuf::zeroed(len as usize), -libc::EIO),
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        let stop = opcode::Nop::new().build().user_data(STOP);
        // Never deferred: nobody may be left to submit it.
        self.shared.push_now(&stop);
    }
}

impl Shared {
    /// Queues `entry` and enters the kernel to submit it. Once queued, the
    /// entry completes (a failed one with an error result), so its buffer
    /// stays in the table until then; this never fails.
    fn push_now(&self, entry: &squeue::Entry) {
        let _one_writer = self.queue(entry);
        self.submit_queued();
    }

    /// Enters the kernel for what others queued (a [`Batch`]'s entries).
    fn submit_now(&self) {
        let _one_writer = lock(&self.sq);
        self.submit_queued();
    }

    /// Puts `entry` in the submission queue, submitting what it holds first
    /// if it is full; the returned guard keeps other writers out.
    fn queue(&self, entry: &squeue::Entry) -> std::sync::MutexGuard<'_, ()> {
        let one_writer = lock(&self.sq);
        // SAFETY: the `sq` lock makes this the only submission queue in use,
        // and the buffer `entry` points into lives in `ops` (or, for a NOP,
        // there is none) until the entry's completion has been reaped.
        while unsafe { self.ring.submission_shared().push(entry).is_err() } {
            self.submit_queued();
        }
        one_writer
    }

    /// Enters the kernel for the queued entries, again while it is busy or
    /// interrupted. Another error leaves them queued for the reaper's next
    /// enter (it submits too) and is logged.
    fn submit_queued(&self) {
        loop {
            match self.ring.submit() {
                Ok(_) => return,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR)) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                    std::thread::yield_now();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring submit failed; the reaper retries");
                    return;
                }
            }
        }
    }

    /// The reaper thread: waits for completions and hands each buffer and
    /// result back, until told to stop and nothing is in flight.
    fn reap(&self) {
        let mut stop = false;
        while !(stop && self.idle()) {
            // Also submits whatever a submitter left queued (EBUSY above).
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return self.abandon(&e),
            }
            stop |= self.complete();
        }
    }

    /// The reaper task: waits until the ring's descriptor is readable (a
    /// completion is queued), then hands the completions out.
    async fn reap_on_runtime(self: Arc<Self>, readable: AsyncFd<RingFd>) {
        let mut stop = false;
        while !(stop && self.idle()) {
            let mut ready = match readable.readable().await {
                Ok(ready) => ready,
                Err(e) => return self.abandon(&e),
            };
            // Cleared before the queue is read: a completion posted after
            // that makes the descriptor readable again.
            ready.clear_ready();
            stop |= self.complete();
        }
    }

    fn idle(&self) -> bool {
        lock(&self.ops).in_flight.is_empty()
    }

    /// Hands every queued completion to its waiter; true once the stop
    /// entry was among them (or the ring is being dropped and idle).
    fn complete(&self) -> bool {
        // SAFETY: only the one reaper ever reads the completion queue.
        let completions: Vec<(u64, i32)> = unsafe { self.ring.completion_shared() }
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        let mut stop = false;
        let mut ops = lock(&self.ops);
        for (key, result) in completions {
            if key == STOP {
                stop = true;
            } else if let Some(op) = ops.in_flight.remove(&key) {
                // The caller may have stopped waiting; the buffer then drops here.
                let _ = op.done.send((op.buf, result));
            }
        }
        stop || (self.stopping.load(Ordering::Acquire) && ops.in_flight.is_empty())
    }

    /// The ring failed: every waiter gets EIO; the buffers are leaked, since
    /// the kernel may still write into them.
    fn abandon(&self, e: &io::Error) {
        tracing::error!(error = %e, "io_uring wait failed");
        let ops = std::mem::take(&mut lock(&self.ops).in_flight);
        for (_, op) in ops {
            std::mem::forget(op.buf);
        }
    }
}

impl Drop for Shared {
    /// Only with operations in flight if the reaper was dropped with them
    /// (its runtime ended): their buffers may still be written into.
    fn drop(&mut self) {
        let ops = std::mem::take(
            &mut self
                .ops
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .in_flight,
        );
        for (_, op) in ops {
            std::mem::forget(op.buf);
        }
    }
}

/// The ring's descriptor, for the runtime's epoll (the ring owns it).
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::os::fd::{AsFd, AsRawFd};
    use std::os::unix::fs::FileExt;

    use super::*;

    fn ring_or_skip() -> Option<Ring> {
        match Ring::new() {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("no io_uring here ({e}); the thread pool serves instead");
                None
            }
        }
    }

    #[tokio::test]
    async fn test_reads_and_writes_land_where_pread_and_pwrite_would() {
        let Some(ring) = ring_or_skip() else { return };
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(&[7u8; 10000], 0).unwrap();
        let fd = file.as_fd();
        let (_, r) = ring
            .write(fd, IoBuf::from_slice(&[1u8; 5000]), 3000, false, None)
            .await;
        r.unwrap();
        let (_, r) = ring
            .write(fd, IoBuf::from_slice(b"fua"), 20000, true, None)
            .await;
        r.unwrap();
        let (buf, r) = ring.read(fd, IoBuf::for_overwrite(9000), 1000, None).await;
        r.unwrap();
        assert_eq!(&buf[..2000], &[7u8; 2000][..]);
        assert_eq!(&buf[2000..7000], &[1u8; 5000][..]);
        assert_eq!(&buf[7000..], &[7u8; 2000][..]);
        // Past the end of the file: zeroes after the last byte.
        let (buf, r) = ring.read(fd, IoBuf::for_overwrite(100), 19990, None).await;
        r.unwrap();
        assert_eq!(&buf[..10], &[0u8; 10][..]);
        assert_eq!(&buf[10..13], b"fua");
        assert_eq!(&buf[13..], &[0u8; 87][..]);
    }

    #[test]
    fn test_a_ring_made_outside_a_runtime_reaps_on_its_own_thread() {
        let Some(ring) = ring_or_skip() else { return };
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(b"thread", 4096).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (buf, r) = rt.block_on(ring.read(file.as_fd(), IoBuf::for_overwrite(6), 4096, None));
        r.unwrap();
        assert_eq!(&buf[..], b"thread");
        drop(ring);
    }

    #[tokio::test]
    async fn test_errors_come_back_as_the_errno() {
        let Some(ring) = ring_or_skip() else { return };
        let file = tempfile::tempfile().unwrap();
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let wo = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let (_, r) = ring
            .read(wo.as_fd(), IoBuf::for_overwrite(512), 0, None)
            .await;
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF));
        let ro = std::fs::File::open(&path).unwrap();
        let (_, r) = ring
            .write(ro.as_fd(), IoBuf::from_slice(b"x"), 0, false, None)
            .await;
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_many_in_flight_more_than_the_ring_holds() {
        let Some(ring) = ring_or_skip() else { return };
        let ring = Arc::new(ring);
        let file = Arc::new(tempfile::tempfile().unwrap());
        let n = 2000u64;
        let mut tasks = Vec::new();
        for i in 0..n {
            let (ring, file) = (ring.clone(), file.clone());
            tasks.push(tokio::spawn(async move {
                let data = IoBuf::from_slice(&i.to_le_bytes());
                let (_, r) = ring.write(file.as_fd(), data, i * 8, false, None).await;
                r.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let (buf, r) = ring
            .read(file.as_fd(), IoBuf::for_overwrite(n as usize * 8), 0, None)
            .await;
        r.unwrap();
        for i in 0..n as usize {
            assert_eq!(buf[i * 8..i * 8 + 8], (i as u64).to_le_bytes());
        }
    }

    #[tokio::test]
    async fn test_entries_through_a_plugged_batch_wait_for_submit() {
        let Some(ring) = ring_or_skip() else { return };
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(b"deferred", 0).unwrap();
        // One read first, then a pause, so nothing else is under way.
        ring.read(file.as_fd(), IoBuf::for_overwrite(8), 0, None)
            .await
            .1
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let batch = Batch::new();
        let mut read = Box::pin(ring.read(file.as_fd(), IoBuf::for_overwrite(8), 0, Some(&batch)));
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        // Queued while plugged, and submitted by nobody.
        assert!(batch.plugged(|| read.as_mut().poll(&mut cx)).is_pending());
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            read.as_mut().poll(&mut cx).is_pending(),
            "submitted before Batch::submit"
        );
        batch.submit();
        let (buf, r) = read.await;
        r.unwrap();
        assert_eq!(&buf[..], b"deferred");
    }

    #[tokio::test]
    async fn test_an_unplugged_batch_submits_at_once() {
        let Some(ring) = ring_or_skip() else { return };
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(b"at once", 0).unwrap();
        let batch = Batch::new();
        // Nobody calls submit: the push itself entered the kernel.
        let read = ring.read(file.as_fd(), IoBuf::for_overwrite(7), 0, Some(&batch));
        let (buf, r) = tokio::time::timeout(std::time::Duration::from_secs(10), read)
            .await
            .expect("an unplugged push is submitted");
        r.unwrap();
        assert_eq!(&buf[..], b"at once");
    }

    #[tokio::test]
    async fn test_a_dropped_wait_leaves_the_buffer_to_the_reaper() {
        let Some(ring) = ring_or_skip() else { return };
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(&[5u8; 1 << 20], 0).unwrap();
        for _ in 0..100 {
            let read = ring.read(file.as_fd(), IoBuf::for_overwrite(1 << 20), 0, None);
            // Polled once (submitted), then dropped.
            let _ = tokio::time::timeout(std::time::Duration::ZERO, read).await;
        }
        let (buf, r) = ring
            .read(file.as_fd(), IoBuf::for_overwrite(16), 0, None)
            .await;
        r.unwrap();
        assert_eq!(&buf[..], &[5u8; 16][..]);
        drop(ring);
    }
}
