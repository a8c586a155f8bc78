//! Where a node's bytes lie in a file, for the paths that skip the driver's
//! `read_at`/`write_at`: `sendfile`/`splice` from and into the page cache,
//! and reads and writes through the file's io_uring.
//!
//! A driver answers one question ([`crate::Driver::map_file`]): which file
//! runs hold this range, and what that file can do. The node picks the path
//! (see `node.rs`): the driver says what is possible, not what to do.

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::run::FileRun;
use crate::uring::Ring;

/// What a [`crate::Driver::map_file`] caller will do with the range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// A range's bytes in a file, and how that file can be reached.
#[derive(Debug)]
pub struct FileMapping<'a> {
    pub fd: BorrowedFd<'a>,
    /// The file, for error messages.
    pub path: &'a Path,
    /// The range's bytes, in order: their lengths add up to the range's.
    pub runs: Vec<FileRun>,
    /// Reads of the file can neither block nor fail (tmpfs without
    /// O_DIRECT): its bytes may go out with `sendfile`, or, for a write,
    /// be spliced in.
    pub page_cache: bool,
    /// The file's io_uring (`aio=io_uring|native`), when the range is
    /// aligned as the file needs.
    pub ring: Option<&'a Ring>,
    /// Held until the bytes have moved: a format's mapping (qcow2) stays
    /// valid while it lives, since the clusters it names are not freed.
    pub lease: Option<MappingLease>,
}

impl<'a> FileMapping<'a> {
    /// `len` bytes of a file from `offset`: one run, no lease.
    pub fn one_run(fd: BorrowedFd<'a>, path: &'a Path, offset: u64, len: u64) -> Self {
        Self {
            fd,
            path,
            runs: vec![FileRun { offset, len }],
            page_cache: false,
            ring: None,
            lease: None,
        }
    }

    /// Bytes the runs cover.
    pub fn len(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One use of a format driver's mapping, counted until dropped.
#[derive(Debug)]
pub struct MappingLease(Arc<AtomicUsize>);

impl MappingLease {
    /// Counts one more use; the driver takes it under the lock its frees
    /// check the count under.
    pub fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for MappingLease {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
