//! `IoBuf`: an owned byte buffer aligned for O_DIRECT.
//!
//! I/O operations take ownership of the buffer and hand it back on
//! completion; that is the only buffer discipline that stays sound when the
//! kernel (io_uring) or another thread writes into it while the caller waits.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use pool::{Parked, Source};

mod pool;

/// Alignment of every buffer: enough for O_DIRECT on any common device.
pub const ALIGNMENT: usize = 4096;

/// Buffers at least this large come straight from mmap: zero-filled by the
/// kernel and populated lazily, so a 32 MiB payload buffer for a client that
/// then sends 4 KiB pins 4 KiB, not 32 MiB (an aligned calloc would memset it all).
const MMAP_MIN: usize = 128 * 1024;

pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Size of the allocation and where it came from.
    source: Source,
}

// SAFETY: IoBuf uniquely owns its allocation (like Vec<u8>); moving it to
// another thread moves that ownership.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only allow reads of initialised bytes.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let size = len.max(1).next_multiple_of(ALIGNMENT);
        if size >= MMAP_MIN {
            if let Some(ptr) = map_anonymous(size) {
                return Self {
                    ptr,
                    len,
                    source: Source::Mmap(size),
                };
            }
        }
        let layout = match Layout::from_size_align(size, ALIGNMENT) {
            Ok(l) => l,
            Err(_) => alloc::handle_alloc_error(Layout::new::<u8>()),
        };
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout);
        };
        Self {
            ptr,
            len,
            source: Source::Heap(layout),
        }
    }

    /// A buffer about to be filled completely (a WRITE payload, a READ from a
    /// driver): its bytes are initialised but not necessarily zero, which lets
    /// large buffers be reused from a pool.
    pub fn for_overwrite(len: usize) -> Self {
        let size = len.max(1).next_multiple_of(ALIGNMENT);
        if size >= pool::LARGE_MIN || size == ALIGNMENT {
            if let Some(p) = pool::take(size) {
                return Self {
                    ptr: p.ptr,
                    len,
                    source: p.source,
                };
            }
        }
        Self::zeroed(len)
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    /// Shortens the visible length (the allocation is kept).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// Private anonymous memory: page-aligned (ALIGNMENT is the page size) and zero.
fn map_anonymous(size: usize) -> Option<NonNull<u8>> {
    // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    NonNull::new(raw.cast::<u8>())
}

impl Deref for IoBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to an allocation of at least `len` initialised
        // (zeroed at allocation) bytes that this value owns.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let parked = Parked {
            ptr: self.ptr,
            source: self.source,
        };
        if let Err(p) = pool::park(parked) {
            p.release();
        }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_zeroed_is_aligned_and_zero() {
        let b = IoBuf::zeroed(5000);
        assert_eq!(b.as_ptr() as usize % ALIGNMENT, 0);
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(b.len(), 5000);
    }

    #[test]
    fn test_zero_length_buffer_is_valid() {
        let b = IoBuf::zeroed(0);
        assert!(b.is_empty());
    }

    #[test]
    fn test_large_buffer_is_mapped_aligned_and_zero() {
        let mut b = IoBuf::zeroed(1 << 20);
        assert_eq!(b.as_ptr() as usize % ALIGNMENT, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[(1 << 20) - 1] = 7;
        assert_eq!(b[(1 << 20) - 1], 7);
    }

    #[test]
    fn test_for_overwrite_reuses_a_dropped_large_buffer() {
        let size = 3 << 20; // a size no other test uses, so the pool entry is ours
        let first = IoBuf::for_overwrite(size);
        let addr = first.as_ptr() as usize;
        drop(first);
        let second = IoBuf::for_overwrite(size);
        assert_eq!(second.as_ptr() as usize, addr);
        assert_eq!(second.len(), size);
    }

    #[test]
    fn test_zeroed_never_returns_stale_bytes() {
        let size = 5 << 20;
        let mut dirty = IoBuf::for_overwrite(size);
        dirty.fill(0xaa);
        drop(dirty);
        assert!(IoBuf::zeroed(size).iter().all(|&b| b == 0));
    }

    #[test]
    fn test_from_slice_copies() {
        let b = IoBuf::from_slice(b"abc");
        assert_eq!(&b[..], b"abc");
    }
}
