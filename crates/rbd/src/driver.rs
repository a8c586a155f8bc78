//! `driver=rbd`: a Ceph RBD image as a block driver.
//!
//! Two faces over one open image. The node sends every request to the
//! asynchronous one ([`AsyncDriver`], librbd's AIO calls and completion
//! callbacks), so 32 requests in flight hold no thread. A format over this
//! node (qcow2) calls the synchronous one ([`Driver`]) from the blocking pool,
//! where librbd's synchronous calls are what that pool is for.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use block::{AsyncDriver, BlockResult, Capabilities, Driver, Extent, IoBuf, IoFuture, ZeroFlags};

use crate::completion::{submit, Raw};
use crate::error::io_result;
use crate::image::Image;
use crate::sys;

/// An open RBD image.
#[derive(Debug)]
pub struct RbdDriver {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    image: Arc<Image>,
    read_only: bool,
    /// `discard=unmap`: discards reach the image.
    discard: bool,
}

impl RbdDriver {
    /// Over an image opened by [`Image::open`].
    pub fn new(image: Image, read_only: bool, discard: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                image: Arc::new(image),
                read_only,
                discard,
            }),
        }
    }
}

/// librbd's zero flags for the block layer's: without `may_unmap` the zeroes
/// are written (thick), as QEMU asks.
fn zero_flags(flags: ZeroFlags) -> c_int {
    match flags.may_unmap {
        true => 0,
        false => sys::RBD_WRITE_ZEROES_FLAG_THICK_PROVISION,
    }
}

impl Driver for RbdDriver {
    fn driver_name(&self) -> &'static str {
        "rbd"
    }

    fn size(&self) -> u64 {
        self.inner.image.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            can_write: !self.inner.read_only,
            can_discard: self.inner.discard,
            can_write_zeroes_fast: true,
            request_alignment: 1,
            ..Capabilities::default()
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        // SAFETY: an open image and a writable buffer of the length passed.
        let r =
            unsafe { sys::rbd_read2(self.image(), offset, buf.len(), buf.as_mut_ptr().cast(), 0) };
        io_result("read", r)
    }

    /// Past the end only from a format over this node (the node checks its
    /// own requests): the image grows first.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.inner.image.grow_to(offset + buf.len() as u64)?;
        self.inner.image.known.mark(offset, buf.len() as u64);
        // SAFETY: an open image and a readable buffer of the length passed.
        let r = unsafe { sys::rbd_write2(self.image(), offset, buf.len(), buf.as_ptr().cast(), 0) };
        io_result("write", r)?;
        match fua {
            true => self.flush(),
            false => Ok(()),
        }
    }

    fn flush(&self) -> BlockResult<()> {
        // SAFETY: an open image.
        let r = unsafe { sys::rbd_flush(self.image()) };
        io_result("flush", r as isize)
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.inner.image.known.forget(offset, len);
        // SAFETY: an open image.
        let r = unsafe { sys::rbd_discard(self.image(), offset, len) };
        io_result("discard", r as isize)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.inner.image.grow_to(offset + len)?;
        self.inner.image.known.forget(offset, len);
        for (at, n) in chunks(offset, len) {
            // SAFETY: an open image.
            let r = unsafe { sys::rbd_write_zeroes(self.image(), at, n, zero_flags(flags), 0) };
            io_result("write zeroes", r)?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.inner.image.block_status(offset, len)
    }

    fn async_driver(&self) -> Option<Arc<dyn AsyncDriver>> {
        Some(self.inner.clone())
    }
}

impl RbdDriver {
    fn image(&self) -> sys::RbdImageT {
        self.inner.image.handle
    }
}

/// A zeroing range cut into `size_t`-sized pieces (one piece on 64-bit hosts).
fn chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize)> {
    const MAX: u64 = 1 << 30;
    (0..len.div_ceil(MAX)).map(move |i| {
        let at = offset + i * MAX;
        (at, (len - i * MAX).min(MAX) as usize)
    })
}

impl AsyncDriver for Inner {
    fn read(&self, buf: IoBuf, offset: u64) -> IoFuture<(IoBuf, BlockResult<()>)> {
        let request = submit(&self.image, Some(buf), |image, b: Raw, c| {
            // SAFETY: the buffer lives in the request's slot until the callback ran.
            unsafe { sys::rbd_aio_read2(image, offset, b.len, b.ptr.cast(), c, 0) }
        });
        Box::pin(async move {
            let (buf, r) = request.await;
            (
                buf.expect("a read's buffer comes back"),
                io_result("read", r),
            )
        })
    }

    fn write(&self, buf: IoBuf, offset: u64, fua: bool) -> IoFuture<(IoBuf, BlockResult<()>)> {
        let image = self.image.clone();
        image.known.mark(offset, buf.len() as u64);
        let request = submit(&self.image, Some(buf), |handle, b: Raw, c| {
            // SAFETY: the buffer lives in the request's slot until the callback ran.
            unsafe { sys::rbd_aio_write2(handle, offset, b.len, b.ptr.cast(), c, 0) }
        });
        Box::pin(async move {
            let (buf, r) = request.await;
            let buf = buf.expect("a write's buffer comes back");
            let mut result = io_result("write", r);
            // FUA: librbd has no per-request FUA through its cache, so a flush follows.
            if fua && result.is_ok() {
                result = flush(&image).await;
            }
            (buf, result)
        })
    }

    fn flush(&self) -> IoFuture<BlockResult<()>> {
        Box::pin(flush(&self.image))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<BlockResult<()>> {
        self.image.known.forget(offset, len);
        let request = submit(&self.image, None, |image, _, c| {
            // SAFETY: an open image and a fresh completion.
            unsafe { sys::rbd_aio_discard(image, offset, len, c) }
        });
        Box::pin(async move { io_result("discard", request.await.1) })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<BlockResult<()>> {
        self.image.known.forget(offset, len);
        let requests: Vec<_> = chunks(offset, len)
            .map(|(at, n)| {
                submit(&self.image, None, |image, _, c| {
                    // SAFETY: an open image and a fresh completion.
                    unsafe { sys::rbd_aio_write_zeroes(image, at, n, c, zero_flags(flags), 0) }
                })
            })
            .collect();
        Box::pin(async move {
            for request in requests {
                io_result("write zeroes", request.await.1)?;
            }
            Ok(())
        })
    }

    /// From memory for objects known to hold data; otherwise librbd's diff
    /// iteration, which is synchronous (it reads the object map from the
    /// cluster), on the blocking pool.
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<BlockResult<Extent>> {
        if let Some(run) = self.image.known.data_run(offset, len) {
            return Box::pin(std::future::ready(Ok(data(run))));
        }
        let image = self.image.clone();
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || image.block_status(offset, len)).await {
                Ok(r) => r,
                Err(e) => Err(block::BlockError::new(
                    block::BlockErrorKind::Io,
                    format!("rbd block status: {e}"),
                )),
            }
        })
    }
}

fn data(len: u64) -> Extent {
    Extent {
        len,
        allocated: true,
        zero: false,
        depth: 1,
    }
}

fn flush(image: &Arc<Image>) -> impl std::future::Future<Output = BlockResult<()>> {
    let request = submit(image, None, |handle, _, c| {
        // SAFETY: an open image and a fresh completion.
        unsafe { sys::rbd_aio_flush(handle, c) }
    });
    async move { io_result("flush", request.await.1) }
}

/// What `rbd_diff_iterate2`'s callback gathers: the extent starting at `start`.
struct DiffWalk {
    start: u64,
    /// Bytes of the first run found so far, and whether it is data.
    len: u64,
    data: bool,
}

/// Stops the iteration once the first run's end is known (QEMU uses the same
/// kind of private value; librbd passes it back as the call's result).
const STOP: c_int = -9000;

/// Called for each allocated extent, in order (no `fromsnapname`, so never a hole).
unsafe extern "C" fn on_diff(offset: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the DiffWalk that `block_status` passed, alive for the call.
    let walk = unsafe { &mut *(arg as *mut DiffWalk) };
    let (offset, end) = (offset, offset + len as u64);
    if end <= walk.start || exists == 0 {
        return 0;
    }
    let run_end = walk.start + walk.len;
    if walk.data {
        if offset > run_end {
            return STOP; // a hole after the data run
        }
        walk.len = end.max(run_end) - walk.start;
        return 0;
    }
    if offset > walk.start {
        walk.len = offset - walk.start; // a hole up to the first data
        return STOP;
    }
    walk.data = true;
    walk.len = end - walk.start;
    0
}

impl Image {
    /// The extent at `offset` (at most `len`): data where the object map says
    /// an object exists, a hole reading zeroes elsewhere. As QEMU does, only
    /// with fast-diff and a valid object map (whole objects, answered from
    /// memory); without, everything is data.
    pub(crate) fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        if let Some(run) = self.known.data_run(offset, len) {
            return Ok(data(run));
        }
        let all_data = data(len);
        let (mut features, mut flags) = (0u64, 0u64);
        // SAFETY: an open image; the two integers are written on success.
        let usable = unsafe {
            sys::rbd_get_features(self.handle, &mut features) == 0
                && sys::rbd_get_flags(self.handle, &mut flags) == 0
        };
        if !usable
            || features & sys::RBD_FEATURE_FAST_DIFF == 0
            || flags & sys::RBD_FLAG_FAST_DIFF_INVALID != 0
        {
            return Ok(all_data);
        }
        // librbd before 17 (Ceph quincy) reports wrong offsets from an offset
        // inside an object (tracker.ceph.com/issues/53784): start at the object.
        let head = offset % self.object_size;
        let mut walk = DiffWalk {
            start: offset,
            len: 0,
            data: false,
        };
        // SAFETY: an open image; `walk` outlives the call, which runs the callback synchronously.
        let r = unsafe {
            sys::rbd_diff_iterate2(
                self.handle,
                std::ptr::null(),
                offset - head,
                len + head,
                1,
                1,
                Some(on_diff),
                (&mut walk as *mut DiffWalk).cast(),
            )
        };
        if r < 0 && r != STOP {
            return Err(block::BlockError::io(
                "rbd block status",
                std::io::Error::from_raw_os_error(-r),
            ));
        }
        let len = match walk.len {
            0 => len, // no data at all in the range
            n => n.min(len),
        };
        if walk.data {
            self.known.mark(offset, len);
        }
        Ok(Extent {
            len,
            allocated: walk.data,
            zero: !walk.data,
            depth: 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroing_ranges_are_cut_at_one_gib() {
        let pieces: Vec<_> = chunks(10, (1 << 31) + 5).collect();
        assert_eq!(
            pieces,
            vec![
                (10, 1 << 30),
                (10 + (1 << 30), 1 << 30),
                (10 + (1 << 31), 5)
            ]
        );
        assert_eq!(chunks(0, 0).count(), 0);
    }

    fn walk(start: u64, extents: &[(u64, usize)]) -> (u64, bool) {
        let mut w = DiffWalk {
            start,
            len: 0,
            data: false,
        };
        for &(o, l) in extents {
            // SAFETY: `w` is a live DiffWalk.
            if unsafe { on_diff(o, l, 1, (&mut w as *mut DiffWalk).cast()) } == STOP {
                break;
            }
        }
        (w.len, w.data)
    }

    #[test]
    fn diff_walk_finds_the_first_run() {
        // Data from before the start, merged with the next adjacent object.
        assert_eq!(
            walk(100, &[(0, 4096), (4096, 4096), (16384, 10)]),
            (8092, true)
        );
        // A hole up to the first data.
        assert_eq!(walk(0, &[(8192, 4096)]), (8192, false));
        // Extents ending before the start are ignored.
        assert_eq!(walk(8192, &[(0, 4096), (12288, 1)]), (4096, false));
        // Nothing at all: length 0, the caller answers the whole range as a hole.
        assert_eq!(walk(0, &[]), (0, false));
    }
}
