//! bexd's block layer. It knows nothing of NBD or QMP.
//!
//! ```text
//!   BlockNode (async edge: owned IoBuf in, IoBuf + result out, runs on the blocking pool)
//!      │
//!      ▼
//!   Driver (sync, positional I/O)   raw ──► BlockNode(file) ──► Driver(file) ──► pread/pwrite
//! ```
//!
//! Drivers are synchronous so that formats compose as plain calls (raw over
//! file, later qcow2 over file) and a request hops onto a worker thread once,
//! at the node. The node's API already has the owned-buffer shape that an
//! io_uring engine needs, so the engine can change without touching callers.
//!
//! Modules import one way (no cycle): `node` → `driver` → `mapping` (where
//! a range lies in a file) → `uring` (the ring and its `Batch`) → `run`
//! (`FileRun`); `bitmap_store` holds the persistent-bitmap trait a format
//! may offer beside `Driver`; `buf` owns `IoBuf` and its buffer pool;
//! `debug_event` names the events a driver reports to a blkdebug node below,
//! `write_gen` the write generations that decide the flush events, and
//! `stats` the lock-free I/O counters a node (and the daemon's exports) keep,
//! `throttle` QEMU's I/O limits (groups, leaky buckets), which the node
//! applies before a request of a throttle node runs, and
//! `observer` what a node reports up to the daemon (write threshold,
//! corruption). `driver` also holds `AsyncDriver`, the face of a driver whose
//! requests complete without a thread waiting (storage behind a network),
//! which the node uses instead of the pool where a driver offers it. `pool`
//! is that pool: the worker threads a request that may block runs on (not
//! tokio's blocking pool, which woke a thread per request; see its doc).

pub mod before_write;
pub mod bitmap;
pub mod bitmap_store;
pub mod block_copy;
pub mod buf;
pub mod debug_event;
pub mod driver;
pub mod drivers;
pub mod error;
pub mod mapping;
pub mod node;
pub mod observer;
pub mod pool;
pub mod run;
pub mod stats;
pub mod throttle;
pub mod uring;
pub mod write_gen;
pub mod write_threshold;
pub mod zeroes;

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

pub use bitmap::{BitmapLease, BitmapSet, DirtyBitmap};
pub use bitmap_store::{BitmapStore, StoredBitmap};
pub use buf::IoBuf;
pub use debug_event::DebugEvent;
pub use driver::{AsyncDriver, Capabilities, Driver, Extent, IoFuture, ZeroFlags};
pub use error::{BlockError, BlockErrorKind, BlockResult};
pub use mapping::{Access, FileMapping, MappingLease};
pub use node::{BlockNode, ExtentSink, FileSlice};
pub use observer::{Corruption, NodeObserver};
pub use run::FileRun;
pub use stats::{IoKind, IoStats, Outcome, Started, StatsSnapshot};
pub use zeroes::DetectZeroes;
