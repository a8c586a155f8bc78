//! One librbd asynchronous request as a future: librbd calls back from its own
//! thread when the request completes, the callback stores the result and wakes
//! the task. No thread waits while a request is in flight.
//!
//! The buffer librbd reads into or writes from lives in the shared [`Slot`],
//! not in the future: a future dropped early (a client gone) leaves the buffer
//! alive until librbd's callback has run, so librbd never touches freed memory.

use std::ffi::{c_int, c_void};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use block::IoBuf;

use crate::image::Image;
use crate::sys;

/// What the callback and the future share.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    result: Option<isize>,
    waker: Option<Waker>,
    buf: Option<IoBuf>,
}

/// librbd's completion callback. `arg` is the `Arc<Slot>` leaked by [`submit`].
unsafe extern "C" fn on_complete(c: sys::RbdCompletionT, arg: *mut c_void) {
    // SAFETY: `c` is the completion this callback was registered with; it is
    // read and released once, here, as librbd allows from its callback.
    let r = unsafe {
        let r = sys::rbd_aio_get_return_value(c);
        sys::rbd_aio_release(c);
        r
    };
    // SAFETY: `arg` came from Arc::into_raw in `submit`, and librbd calls
    // the callback exactly once, so the reference is taken back once.
    let slot = unsafe { Arc::from_raw(arg as *const Slot) };
    let waker = {
        let mut s = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        s.result = Some(r);
        s.waker.take()
    };
    if let Some(w) = waker {
        w.wake();
    }
}

/// A request in flight; resolves to its buffer (if it had one) and librbd's result.
pub struct Request {
    slot: Arc<Slot>,
    /// Keeps the image open while the request is awaited.
    _image: Arc<Image>,
}

impl Future for Request {
    type Output = (Option<IoBuf>, isize);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.result {
            Some(r) => Poll::Ready((s.buf.take(), r)),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// The pointer and length of a request's buffer, for `start`.
#[derive(Clone, Copy)]
pub struct Raw {
    pub ptr: *mut u8,
    pub len: usize,
}

/// Starts one request: `start` hands librbd the image, the buffer and the
/// completion, and returns librbd's submission result.
pub fn submit(
    image: &Arc<Image>,
    buf: Option<IoBuf>,
    start: impl FnOnce(sys::RbdImageT, Raw, sys::RbdCompletionT) -> c_int,
) -> Request {
    let slot = Arc::new(Slot::default());
    let raw = {
        let mut s = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        s.buf = buf;
        match s.buf.as_mut() {
            Some(b) => Raw {
                ptr: b.as_mut_ptr(),
                len: b.len(),
            },
            None => Raw {
                ptr: std::ptr::null_mut(),
                len: 0,
            },
        }
    };
    let request = Request {
        slot: slot.clone(),
        _image: image.clone(),
    };
    let arg = Arc::into_raw(slot) as *mut c_void;
    let mut c: sys::RbdCompletionT = std::ptr::null_mut();
    // SAFETY: `arg` stays valid until the callback takes it back; `c` is written on success.
    let r = unsafe { sys::rbd_aio_create_completion(arg, Some(on_complete), &mut c) };
    if r < 0 {
        // SAFETY: no completion exists, so no callback will take `arg` back.
        drop(unsafe { Arc::from_raw(arg as *const Slot) });
        fail(&request, r as isize);
        return request;
    }
    let r = start(image.handle, raw, c);
    if r < 0 {
        // librbd refused the request (its C API in fact reports every failure
        // through the completion). Whether the callback still runs is not
        // documented, so the completion and the slot's reference are left to
        // it rather than risk releasing them twice.
        fail(&request, r as isize);
    }
    request
}

fn fail(request: &Request, r: isize) {
    let mut s = request.slot.state.lock().unwrap_or_else(|e| e.into_inner());
    s.result = Some(r);
}
