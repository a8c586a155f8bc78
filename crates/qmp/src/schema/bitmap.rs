//! qapi/block-core.json and transaction.json: the dirty bitmap commands and
//! the `transaction` command's actions.

use serde_json::Value;

use super::block_export::BlockDirtyBitmapOrStr;
use super::job::BlockdevBackup;
use crate::introspect::{describe, named, opt, req, Describe, Schema, Ty};
use crate::visitor::{Ctx, Fields, FromQapi};
use crate::{qapi_enum, qapi_struct, QmpError};

qapi_struct! {
    /// block-dirty-bitmap-add's arguments.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BlockDirtyBitmapAdd {
        req "node" node: String,
        req "name" name: String,
        opt "granularity" granularity: u32,
        opt "persistent" persistent: bool,
        opt "disabled" disabled: bool,
    }
}

qapi_struct! {
    /// BlockDirtyBitmap: remove, clear, enable and disable name one bitmap.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BlockDirtyBitmap {
        req "node" node: String,
        req "name" name: String,
    }
}

qapi_struct! {
    /// block-dirty-bitmap-merge: `bitmaps` are ORed into `target` on `node`.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BlockDirtyBitmapMerge {
        req "node" node: String,
        req "target" target: String,
        req "bitmaps" bitmaps: Vec<BlockDirtyBitmapOrStr>,
    }
}

/// The `abort` action's data: an empty object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Abort;

impl FromQapi for Abort {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        Fields::new(value, ctx)?.finish()?;
        Ok(Self)
    }
}

impl Describe for Abort {
    fn ty() -> Ty {
        named("Abort")
    }
    fn define(s: &mut Schema) {
        s.object("Abort", vec![]);
    }
}

/// One action of `transaction`: the bitmap ones, `blockdev-backup` and `abort`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransactionAction {
    Abort(Abort),
    Backup(Box<BlockdevBackup>),
    Add(BlockDirtyBitmapAdd),
    Remove(BlockDirtyBitmap),
    Clear(BlockDirtyBitmap),
    Enable(BlockDirtyBitmap),
    Disable(BlockDirtyBitmap),
    Merge(BlockDirtyBitmapMerge),
}

impl TransactionAction {
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Add(_) => "block-dirty-bitmap-add",
            Self::Remove(_) => "block-dirty-bitmap-remove",
            Self::Clear(_) => "block-dirty-bitmap-clear",
            Self::Enable(_) => "block-dirty-bitmap-enable",
            Self::Disable(_) => "block-dirty-bitmap-disable",
            Self::Merge(_) => "block-dirty-bitmap-merge",
            Self::Abort(_) => "abort",
            Self::Backup(_) => "blockdev-backup",
        }
    }
}

const ACTION_TYPES: &[&str] = &[
    "abort",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "blockdev-backup",
    "blockdev-snapshot",
    "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-sync",
    "drive-backup",
];

impl FromQapi for TransactionAction {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        let mut f = Fields::new(value, ctx)?;
        // QEMU names the discriminator without its path when it is wrong.
        let root = Ctx::root(ctx.mode).member("type");
        let kind = crate::visitor::enum_str(f.required::<Value>("type")?, &root, ACTION_TYPES)?;
        let action = match kind.as_str() {
            "block-dirty-bitmap-add" => Self::Add(f.required("data")?),
            "block-dirty-bitmap-remove" => Self::Remove(f.required("data")?),
            "block-dirty-bitmap-clear" => Self::Clear(f.required("data")?),
            "block-dirty-bitmap-enable" => Self::Enable(f.required("data")?),
            "block-dirty-bitmap-disable" => Self::Disable(f.required("data")?),
            "block-dirty-bitmap-merge" => Self::Merge(f.required("data")?),
            "abort" => Self::Abort(f.required("data")?),
            "blockdev-backup" => Self::Backup(Box::new(f.required("data")?)),
            other => {
                return Err(QmpError::generic(format!(
                    "Transaction action '{other}' is not supported by bexd"
                )))
            }
        };
        f.finish()?;
        Ok(action)
    }
}

/// The action kinds bexd implements (the reader knows QEMU's others, to refuse them by name).
const IMPLEMENTED_ACTIONS: &[&str] = &[
    "abort",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "blockdev-backup",
];

/// QAPI wraps each action's arguments in `data` (a "simple union").
impl Describe for TransactionAction {
    fn ty() -> Ty {
        named("TransactionAction")
    }
    fn define(s: &mut Schema) {
        s.enumeration("TransactionActionKind", IMPLEMENTED_ACTIONS.to_vec());
        let mut wrapper = |key: &'static str, data: Ty| {
            s.object(key, vec![req("data", data)]);
            named(key)
        };
        let add = wrapper("BlockDirtyBitmapAddWrapper", BlockDirtyBitmapAdd::ty());
        let one = wrapper("BlockDirtyBitmapWrapper", BlockDirtyBitmap::ty());
        let merge = wrapper("BlockDirtyBitmapMergeWrapper", BlockDirtyBitmapMerge::ty());
        let abort = wrapper("AbortWrapper", Abort::ty());
        let backup = wrapper("BlockdevBackupWrapper", BlockdevBackup::ty());
        let branch = |kind: &str| match kind {
            "block-dirty-bitmap-add" => add.clone(),
            "block-dirty-bitmap-merge" => merge.clone(),
            "abort" => abort.clone(),
            "blockdev-backup" => backup.clone(),
            _ => one.clone(),
        };
        let variants = IMPLEMENTED_ACTIONS
            .iter()
            .map(|k| (*k, branch(k)))
            .collect();
        s.union(
            "TransactionAction",
            vec![req("type", named("TransactionActionKind"))],
            "type",
            variants,
        );
        BlockDirtyBitmapAdd::define(s);
        BlockDirtyBitmap::define(s);
        BlockDirtyBitmapMerge::define(s);
        Abort::define(s);
        BlockdevBackup::define(s);
    }
}

qapi_enum!(ActionCompletionMode { Individual = "individual", Grouped = "grouped" });

/// transaction's arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    pub actions: Vec<TransactionAction>,
    pub completion_mode: Option<ActionCompletionMode>,
}

impl FromQapi for Transaction {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        let mut f = Fields::new(value, ctx)?;
        let actions = f.required("actions")?;
        let completion_mode = match f.optional::<Value>("properties")? {
            Some(p) => {
                let mut pf = Fields::new(p, &ctx.member("properties"))?;
                let mode = pf.optional("completion-mode")?;
                pf.finish()?;
                mode
            }
            None => None,
        };
        f.finish()?;
        Ok(Self {
            actions,
            completion_mode,
        })
    }
}

/// transaction's arguments as QEMU declares them (`properties` is an object
/// of its own, read inline above).
impl Describe for Transaction {
    fn ty() -> Ty {
        named("TransactionArgs")
    }
    fn define(s: &mut Schema) {
        let completion = describe::<ActionCompletionMode>(s);
        s.object(
            "TransactionProperties",
            vec![opt("completion-mode", completion)],
        );
        let actions = describe::<Vec<TransactionAction>>(s);
        s.object(
            "TransactionArgs",
            vec![
                req("actions", actions),
                opt("properties", named("TransactionProperties")),
            ],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::visitor::{from_value, InputMode};
    use serde_json::json;

    #[test]
    fn test_transaction_unknown_type_names_bare_member() {
        let v = json!({"actions": [{"type": "bogus", "data": {}}]});
        let e = from_value::<Transaction>(v, InputMode::Json).unwrap_err();
        assert_eq!(e.desc, "Parameter 'type' does not accept value 'bogus'");
    }

    #[test]
    fn test_transaction_missing_member_has_full_path() {
        let v = json!({"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "n"}}]});
        let e = from_value::<Transaction>(v, InputMode::Json).unwrap_err();
        assert_eq!(e.desc, "Parameter 'actions[0].data.name' is missing");
    }

    #[test]
    fn test_transaction_reader_accepts_every_described_member() {
        crate::introspect::agreement::check::<Transaction>();
        crate::introspect::agreement::check::<TransactionAction>();
    }

    #[test]
    fn test_implemented_actions_are_all_read() {
        for kind in IMPLEMENTED_ACTIONS {
            assert!(ACTION_TYPES.contains(kind));
        }
    }

    #[test]
    fn test_merge_reads_both_bitmap_forms() {
        let v = json!({"node": "n", "target": "t", "bitmaps": ["a", {"node": "m", "name": "b"}]});
        let m: BlockDirtyBitmapMerge = from_value(v, InputMode::Json).unwrap();
        assert_eq!(m.bitmaps.len(), 2);
    }
}
