//! The dirty bitmaps an NBD export offers: resolving `bitmaps` / `bitmap`
//! when the export is added, with QEMU's checks, and turning a bitmap into
//! `qemu:dirty-bitmap:NAME` extents for BLOCK_STATUS.

use std::sync::Arc;

use block::{BlockNode, DirtyBitmap};
use nbd::reply::dirty_status;

use crate::config::BitmapRef;
use crate::error::ExportError;
use crate::nodes::bitmaps::{check_usable, lookup, Use};
use crate::nodes::NodeTable;

/// The bitmaps `refs` names on `node`, checked in QEMU's order per bitmap:
/// found, not busy or inconsistent, and not recording if the export is read-only while
/// the node is writable (the client would read a bitmap that keeps changing).
pub fn resolve(
    nodes: &NodeTable,
    refs: &[BitmapRef],
    node: &Arc<BlockNode>,
    writable: bool,
) -> Result<Vec<Arc<DirtyBitmap>>, ExportError> {
    let qmp = |e: qmp::QmpError| ExportError::Bitmap(e.desc);
    let mut found = Vec::with_capacity(refs.len());
    for r in refs {
        let bitmap = match r {
            // bexd has no filter or backing chains, so "down the chain" is the node itself.
            BitmapRef::Local(name) => node
                .bitmaps()
                .find(name)
                .ok_or_else(|| ExportError::Bitmap(format!("Bitmap '{name}' is not found")))?,
            BitmapRef::External { node, name } => lookup(nodes, node, name).map_err(qmp)?.1,
        };
        check_usable(&bitmap, Use::Read).map_err(qmp)?;
        if !writable && !node.read_only() && bitmap.enabled() {
            return Err(ExportError::Bitmap(format!(
                "Enabled bitmap '{}' incompatible with readonly export",
                bitmap.name()
            )));
        }
        found.push(bitmap);
    }
    Ok(found)
}

/// `qemu:dirty-bitmap` extents for `[offset, offset+len)`: (length, flags),
/// at most `max`, in granularity-aligned runs (the first and last clipped to
/// the request), as QEMU sends them.
pub fn extents(bitmap: &DirtyBitmap, offset: u64, len: u64, max: usize) -> Vec<(u64, u32)> {
    let runs = bitmap.extents(offset, len, max);
    let mut out: Vec<(u64, u32)> = runs
        .into_iter()
        .map(|(l, dirty)| (l, dirty_status(dirty)))
        .collect();
    // A request past the bitmap (cannot happen: both have the node's size) still gets an answer.
    if out.is_empty() {
        out.push((len, dirty_status(false)));
    }
    out
}
