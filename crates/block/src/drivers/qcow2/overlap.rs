//! QEMU's metadata overlap check (`overlap-check=cached`, its default) for
//! writes of guest data: a data cluster an L2 entry shares with metadata
//! would otherwise let a guest write overwrite the image's own tables.
//! Checked against what is in memory: the header cluster, the active L1
//! table, the L2 tables it names, the refcount table and the refcount
//! blocks it names. Inactive (snapshot) tables and the bitmap directory are
//! not checked.

use super::corruption::c_hex;
use super::meta::Meta;
use crate::error::BlockError;

impl Meta {
    /// The corruption a data write of `len` bytes at host `offset` would
    /// cause, in QEMU's words, or `None`.
    pub fn check_data_write(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        match self.overlapped_metadata(offset, len) {
            None => Ok(()),
            Some(what) => Err(BlockError::corruption(
                format!("Preventing invalid write on metadata (overlaps with {what})"),
                Some(offset),
                Some(len),
            )),
        }
    }

    /// The first metadata structure (QEMU's order and names) that
    /// `[offset, offset+len)` overlaps.
    fn overlapped_metadata(&self, offset: u64, len: u64) -> Option<&'static str> {
        let cs = self.geom.cluster_size();
        let end = offset.saturating_add(len);
        let hits = |start: u64, size: u64| start < end && offset < start.saturating_add(size);
        let tables = |entries: &[u64]| {
            entries
                .iter()
                .map(|e| e & super::l2::OFFSET_MASK)
                .any(|t| t != 0 && hits(t, cs))
        };
        if hits(0, cs) {
            Some("qcow2_header")
        } else if hits(self.l1_offset, self.l1.len() as u64 * 8) {
            Some("active L1 table")
        } else if tables(&self.l1) {
            Some("active L2 table")
        } else if hits(self.rc_table_offset, u64::from(self.rc_table_clusters) * cs) {
            Some("refcount table")
        } else if tables(&self.rc_table) {
            Some("refcount block")
        } else {
            None
        }
    }
}

/// QEMU's message for an L2 entry whose data cluster is not cluster-aligned.
pub(super) fn unaligned_data_cluster(host: u64, l2_table: u64, l2_index: u64) -> BlockError {
    BlockError::corruption(
        format!(
            "Cluster allocation offset {} unaligned (L2 offset: {}, L2 index: {})",
            c_hex(host),
            c_hex(l2_table),
            c_hex(l2_index)
        ),
        None,
        None,
    )
}

/// QEMU's message for an L1 entry whose L2 table is not cluster-aligned.
pub(super) fn unaligned_l2_table(table: u64, l1_index: u64) -> BlockError {
    BlockError::corruption(
        format!(
            "L2 table offset {} unaligned (L1 index: {})",
            c_hex(table),
            c_hex(l1_index)
        ),
        None,
        None,
    )
}
