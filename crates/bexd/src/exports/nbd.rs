//! The NBD export kind: a name clients ask for, a description, and the meta
//! contexts it offers (allocation depth, dirty bitmaps).
//!
//! The NBD server (`crate::nbd_server`) finds these in the export table by
//! name; creating one needs no server, only the daemon's check that one runs.

use std::any::Any;
use std::sync::{Arc, Mutex};

use block::{BitmapLease, BlockNode, DirtyBitmap};
use nbd::consts::MAX_PAYLOAD;
use nbd::export::{BlockSize, ExportInfo, MetaContext};

use super::{Export, ExportKind};
use crate::config::NbdExportConfig;
use crate::error::ExportError;
use crate::nodes::NodeTable;

#[derive(Debug)]
pub struct NbdExport {
    pub name: String,
    pub description: Option<String>,
    allocation_depth: bool,
    /// The exported bitmaps, in context-id order (fixed at creation).
    bitmaps: Vec<Arc<DirtyBitmap>>,
    /// They are held busy until the export is freed (QEMU's rule: an exported
    /// bitmap cannot be changed or removed under its readers).
    leases: Mutex<Vec<BitmapLease>>,
}

impl NbdExport {
    /// The NBD part of an export of `node`, its bitmaps resolved (and held busy from now on).
    pub fn create(
        config: &NbdExportConfig,
        node: &Arc<BlockNode>,
        writable: bool,
        nodes: &NodeTable,
    ) -> Result<Self, ExportError> {
        let bitmaps = super::bitmaps::resolve(nodes, &config.bitmaps, node, writable)?;
        let leases = bitmaps.iter().cloned().map(BitmapLease::new).collect();
        Ok(Self {
            name: config.name.clone(),
            description: config.description.clone(),
            allocation_depth: config.allocation_depth,
            bitmaps,
            leases: Mutex::new(leases),
        })
    }

    /// The exported bitmap behind `qemu:dirty-bitmap:NAME`.
    pub fn bitmap(&self, name: &str) -> Option<&Arc<DirtyBitmap>> {
        self.bitmaps.iter().find(|b| b.name() == name)
    }

    /// The NBD view of `export` (whose NBD part this is), as QEMU's server advertises it.
    pub fn info(&self, export: &Export, multi_conn: bool) -> ExportInfo {
        let caps = export.node.capabilities();
        let min = caps.request_alignment.max(1);
        let max = match caps.max_transfer {
            0 => MAX_PAYLOAD,
            n => n.min(MAX_PAYLOAD),
        };
        let mut meta_contexts = vec![MetaContext::BaseAllocation];
        if self.allocation_depth {
            meta_contexts.push(MetaContext::AllocationDepth);
        }
        for b in &self.bitmaps {
            meta_contexts.push(MetaContext::DirtyBitmap(b.name().to_string()));
        }
        let writable = export.config.writable;
        ExportInfo {
            name: self.name.clone(),
            description: self.description.clone(),
            // QEMU exports whole 512-byte sectors only.
            size: export.node.size() & !511,
            read_only: !writable,
            can_trim: writable,
            can_write_zeroes: writable,
            can_fast_zero: writable,
            can_multi_conn: multi_conn,
            can_cache: true,
            block_size: BlockSize {
                min,
                preferred: min.max(4096),
                max: max.max(min),
            },
            meta_contexts,
        }
    }
}

impl ExportKind for NbdExport {
    fn type_name(&self) -> &'static str {
        "nbd"
    }

    fn clashes_with(&self, other: &dyn ExportKind) -> Option<ExportError> {
        let other = other.as_any().downcast_ref::<NbdExport>()?;
        (other.name == self.name).then(|| ExportError::DuplicateNbdName(self.name.clone()))
    }

    fn release(&self) {
        // A poisoned lock still holds the leases; dropping them is what matters.
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
