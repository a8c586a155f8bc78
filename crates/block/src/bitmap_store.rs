//! Persistent dirty bitmaps as a format keeps them in its image.
//!
//! Only a format with a place for bitmaps (qcow2) implements this; every
//! other driver answers `None` to [`crate::Driver::bitmap_store`], which is
//! how `block-dirty-bitmap-add persistent=true` learns it must refuse. Kept
//! apart from `Driver` because none of it is I/O: these hooks run at open,
//! at close and from QMP commands, never on a request.

use std::sync::Arc;

use crate::bitmap::DirtyBitmap;
use crate::error::BlockResult;

/// A bitmap as the image describes it (QEMU's Qcow2BitmapInfo).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBitmap {
    pub name: String,
    pub granularity: u64,
    /// Not stored cleanly: the image is open for writing, or was not closed.
    pub in_use: bool,
    /// Records writes (enabled).
    pub auto: bool,
}

/// Where a format loads persistent bitmaps from and stores them to.
pub trait BitmapStore: Send + Sync {
    /// Why a new persistent bitmap could not be stored, checked when it is
    /// added (QEMU's bdrv_can_store_new_dirty_bitmap), so close cannot fail on it.
    fn check_new_persistent_bitmap(&self, name: &str, granularity: u64) -> Result<(), String>;
    /// The granularity of a bitmap added without one: QEMU's rule is the
    /// cluster size, kept between 4 KiB and 64 KiB.
    fn default_bitmap_granularity(&self) -> u64;
    /// The persistent bitmaps found at open; the node takes them once.
    fn take_loaded_bitmaps(&self) -> Vec<DirtyBitmap>;
    /// Drops a persistent bitmap from the image now (QEMU does not wait for close).
    fn remove_persistent_bitmap(&self, name: &str) -> BlockResult<()>;
    /// Writes the node's persistent bitmaps into the image; called at close.
    fn store_persistent_bitmaps(&self, bitmaps: &[Arc<DirtyBitmap>]) -> BlockResult<()>;
    /// The bitmaps the image holds right now, for query-named-block-nodes.
    fn stored_bitmaps(&self) -> Vec<StoredBitmap>;
}
