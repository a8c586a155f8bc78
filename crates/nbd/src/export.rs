//! What the handshake needs to know about an export, supplied by the daemon.

use crate::consts::*;

/// A metadata context an export can offer (NBD_OPT_*_META_CONTEXT).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaContext {
    BaseAllocation,
    AllocationDepth,
    DirtyBitmap(String),
}

impl MetaContext {
    /// The context's name on the wire.
    pub fn name(&self) -> String {
        match self {
            Self::BaseAllocation => "base:allocation".into(),
            Self::AllocationDepth => "qemu:allocation-depth".into(),
            Self::DirtyBitmap(b) => format!("qemu:dirty-bitmap:{b}"),
        }
    }
}

/// NBD_INFO_BLOCK_SIZE constraints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

/// One export as clients see it.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    pub name: String,
    pub description: Option<String>,
    pub size: u64,
    pub read_only: bool,
    pub can_trim: bool,
    pub can_write_zeroes: bool,
    pub can_fast_zero: bool,
    pub can_multi_conn: bool,
    pub can_cache: bool,
    pub block_size: BlockSize,
    /// Contexts offered, in QEMU's id order: base:allocation, allocation-depth, bitmaps.
    pub meta_contexts: Vec<MetaContext>,
}

impl ExportInfo {
    /// The transmission flags QEMU's server sends for this export.
    pub fn transmission_flags(&self, structured_replies: bool) -> u16 {
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
        if self.can_cache {
            flags |= FLAG_SEND_CACHE;
        }
        if self.can_multi_conn {
            flags |= FLAG_CAN_MULTI_CONN;
        }
        if self.read_only {
            flags |= FLAG_READ_ONLY;
        } else {
            if self.can_trim {
                flags |= FLAG_SEND_TRIM;
            }
            if self.can_write_zeroes {
                flags |= FLAG_SEND_WRITE_ZEROES;
                if self.can_fast_zero {
                    flags |= FLAG_SEND_FAST_ZERO;
                }
            }
        }
        if structured_replies {
            flags |= FLAG_SEND_DF;
        }
        flags
    }

    /// The id a context gets on this export: its index in `meta_contexts`,
    /// with base:allocation 0, allocation-depth 1, bitmaps from 2, as QEMU numbers them.
    pub fn context_id(&self, context: &MetaContext) -> Option<u32> {
        let index = self.meta_contexts.iter().position(|c| c == context)?;
        let id = match context {
            MetaContext::BaseAllocation => 0,
            MetaContext::AllocationDepth => 1,
            MetaContext::DirtyBitmap(_) => {
                let bitmaps_before = self.meta_contexts[..index]
                    .iter()
                    .filter(|c| matches!(c, MetaContext::DirtyBitmap(_)))
                    .count();
                2 + bitmaps_before as u32
            }
        };
        Some(id)
    }
}

/// The daemon's exports, as the handshake looks them up.
pub trait ExportCatalog {
    /// Every visible export: name and description.
    fn list(&self) -> Vec<(String, Option<String>)>;
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn writable_export() -> ExportInfo {
        ExportInfo {
            name: "disk".into(),
            description: Some("a disk".into()),
            size: 1 << 20,
            read_only: false,
            can_trim: true,
            can_write_zeroes: true,
            can_fast_zero: true,
            can_multi_conn: true,
            can_cache: true,
            block_size: BlockSize {
                min: 1,
                preferred: 4096,
                max: MAX_PAYLOAD,
            },
            meta_contexts: vec![
                MetaContext::BaseAllocation,
                MetaContext::DirtyBitmap("b0".into()),
            ],
        }
    }

    #[test]
    fn test_transmission_flags_when_writable_structured_returns_qemu_0xded() {
        assert_eq!(writable_export().transmission_flags(true), 0xded);
    }

    #[test]
    fn test_transmission_flags_when_writable_simple_returns_qemu_0xd6d() {
        assert_eq!(writable_export().transmission_flags(false), 0xd6d);
    }

    #[test]
    fn test_context_id_when_bitmap_returns_2_plus_index() {
        let e = writable_export();
        assert_eq!(
            e.context_id(&MetaContext::DirtyBitmap("b0".into())),
            Some(2)
        );
    }

    #[test]
    fn test_transmission_flags_when_read_only_omits_write_flags() {
        let mut e = writable_export();
        e.read_only = true;
        assert_eq!(e.transmission_flags(false), 0x50f);
    }

    #[test]
    fn test_transmission_flags_when_single_connection_omits_multi_conn() {
        let mut e = writable_export();
        e.can_multi_conn = false;
        assert_eq!(e.transmission_flags(true) & FLAG_CAN_MULTI_CONN, 0);
    }

    #[test]
    fn test_context_id_when_allocation_depth_absent_still_numbers_bitmaps_from_2() {
        let mut e = writable_export();
        e.meta_contexts.push(MetaContext::DirtyBitmap("b1".into()));
        assert_eq!(
            e.context_id(&MetaContext::DirtyBitmap("b1".into())),
            Some(3)
        );
    }

    #[test]
    fn test_name_when_bitmap_returns_qemu_dirty_bitmap_prefix() {
        let name = MetaContext::DirtyBitmap("b0".into()).name();
        assert_eq!(name, "qemu:dirty-bitmap:b0");
    }
}
