//! What an export kind adds to the part every export shares.
//!
//! The shared part ([`super::Export`]) owns the id, the node hold,
//! writable/writethrough, the removal state and the client count; a kind
//! (NBD today; FUSE and vhost-user-blk next) owns how clients reach the
//! export and what it holds beyond the node.

use std::any::Any;
use std::fmt::Debug;

use crate::error::ExportError;

pub trait ExportKind: Send + Sync + Debug + 'static {
    /// QAPI's `BlockExportType` name, as `query-block-exports` shows it.
    fn type_name(&self) -> &'static str;

    /// Refuses to sit next to `other`, a live export, when the two would
    /// clash where clients find them (two NBD exports of one name).
    fn clashes_with(&self, _other: &dyn ExportKind) -> Option<ExportError> {
        None
    }

    /// The export is being freed (its last client is gone): give back what
    /// the kind holds, before `BLOCK_EXPORT_DELETED` is announced.
    fn release(&self) {}

    /// For the protocol server of this kind, which needs its own fields back.
    fn as_any(&self) -> &dyn Any;
}
