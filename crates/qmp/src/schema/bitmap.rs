//! qapi/block-core.json and transaction.json: the dirty bitmap commands and
//! the `transaction` command's bitmap actions.

use serde_json::Value;

use super::block_export::BlockDirtyBitmapOrStr;
use crate::visitor::{Ctx, Fields, FromQapi};
use crate::{qapi_enum, QmpError};

/// block-dirty-bitmap-add's arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDirtyBitmapAdd {
    pub node: String,
    pub name: String,
    pub granularity: Option<u32>,
    pub persistent: Option<bool>,
    pub disabled: Option<bool>,
}

impl FromQapi for BlockDirtyBitmapAdd {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        let mut f = Fields::new(value, ctx)?;
        let r = Self {
            node: f.required("node")?,
            name: f.required("name")?,
            granularity: f.optional("granularity")?,
            persistent: f.optional("persistent")?,
            disabled: f.optional("disabled")?,
        };
        f.finish()?;
        Ok(r)
    }
}

/// BlockDirtyBitmap: remove, clear, enable and disable name one bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDirtyBitmap {
    pub node: String,
    pub name: String,
}

impl FromQapi for BlockDirtyBitmap {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        let mut f = Fields::new(value, ctx)?;
        let r = Self {
            node: f.required("node")?,
            name: f.required("name")?,
        };
        f.finish()?;
        Ok(r)
    }
}

/// block-dirty-bitmap-merge: `bitmaps` are ORed into `target` on `node`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDirtyBitmapMerge {
    pub node: String,
    pub target: String,
    pub bitmaps: Vec<BlockDirtyBitmapOrStr>,
}

impl FromQapi for BlockDirtyBitmapMerge {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        let mut f = Fields::new(value, ctx)?;
        let r = Self {
            node: f.required("node")?,
            target: f.required("target")?,
            bitmaps: f.required("bitmaps")?,
        };
        f.finish()?;
        Ok(r)
    }
}

/// One action of `transaction` (only the bitmap ones are implemented).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransactionAction {
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
    fn test_merge_reads_both_bitmap_forms() {
        let v = json!({"node": "n", "target": "t", "bitmaps": ["a", {"node": "m", "name": "b"}]});
        let m: BlockDirtyBitmapMerge = from_value(v, InputMode::Json).unwrap();
        assert_eq!(m.bitmaps.len(), 2);
    }
}
