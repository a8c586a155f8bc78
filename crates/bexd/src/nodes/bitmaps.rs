//! The rules for using a node's dirty bitmaps, shared by the bitmap
//! commands and the exports that serve bitmaps: QEMU's lookup (node, then
//! bitmap) and its usability check (busy, readonly, inconsistent).

use std::sync::Arc;

use block::{BlockNode, DirtyBitmap};
use qmp::QmpError;

use super::NodeTable;

/// QEMU's block_dirty_bitmap_lookup: the node, then the bitmap on it.
pub fn lookup(
    nodes: &NodeTable,
    node: &str,
    name: &str,
) -> Result<(Arc<BlockNode>, Arc<DirtyBitmap>), QmpError> {
    let node = nodes
        .find(node)
        .ok_or_else(|| QmpError::generic(format!("Node '{node}' not found")))?;
    let bitmap = find_on(&node, name)?;
    Ok((node, bitmap))
}

/// The bitmap `name` on `node`.
pub fn find_on(node: &BlockNode, name: &str) -> Result<Arc<DirtyBitmap>, QmpError> {
    node.bitmaps()
        .find(name)
        .ok_or_else(|| QmpError::generic(format!("Dirty bitmap '{name}' not found")))
}

/// What a command may do to a bitmap; QEMU's BDRV_BITMAP_* check flags.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Change its bits (clear, merge target): not busy, readonly or inconsistent.
    Modify,
    /// Read it or switch recording (export, merge source, enable, disable):
    /// a readonly bitmap is fine.
    Read,
    /// Remove it: an inconsistent bitmap may be removed, that is all it is good for.
    Remove,
}

/// QEMU's bdrv_dirty_bitmap_check: busy first, then readonly, then inconsistent.
pub fn check_usable(b: &DirtyBitmap, usage: Use) -> Result<(), QmpError> {
    if b.busy() {
        return Err(busy(b.name()));
    }
    if b.is_readonly() && usage != Use::Read {
        return Err(QmpError::generic(format!(
            "Bitmap '{}' is readonly and cannot be modified",
            b.name()
        )));
    }
    if b.is_inconsistent() && usage != Use::Remove {
        return Err(QmpError::generic(format!(
            "Bitmap '{}' is inconsistent and cannot be used",
            b.name()
        )));
    }
    Ok(())
}

pub fn busy(name: &str) -> QmpError {
    QmpError::generic(format!(
        "Bitmap '{name}' is currently in use by another operation and cannot be used"
    ))
}
