//! The dirty bitmap commands and `transaction` (bitmap actions,
//! `blockdev-backup` and `abort`).
//!
//! Every command is run as a transaction of one action, so the single
//! commands and `transaction` share one code path. A transaction applies its
//! actions in order, each seeing the effects of the ones before (QEMU's
//! prepare phase: `add` then `remove` of the same name works), and records
//! how to undo each. If one fails, the done ones are undone newest first and
//! the error is returned; otherwise the deferred parts (a `remove` frees its
//! bitmap only at commit, holding it busy until then) are carried out.

use std::sync::Arc;

use block::bitmap::{MAX_GRANULARITY, MIN_GRANULARITY};
use block::{BlockNode, DirtyBitmap};
use qmp::schema::bitmap::{
    ActionCompletionMode, BlockDirtyBitmap, BlockDirtyBitmapAdd, BlockDirtyBitmapMerge,
    Transaction, TransactionAction,
};
use qmp::schema::block_export::BlockDirtyBitmapOrStr;
use qmp::visitor::{from_value, FromQapi, InputMode};
use qmp::QmpError;
use serde_json::{json, Value};

use super::{ok, Args};
use crate::daemon::Daemon;
use crate::jobs::JobTxn;
use crate::nodes::bitmaps::{check_usable, find_on, Use};

/// QEMU's limit on bitmap names (BDRV_BITMAP_MAX_NAME_SIZE).
const MAX_NAME: usize = 1023;

/// The single bitmap commands, each a transaction of one action.
pub mod single {
    use super::*;

    pub fn add(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
        one(daemon, args, TransactionAction::Add)
    }

    pub fn remove(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
        one(daemon, args, TransactionAction::Remove)
    }

    pub fn clear(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
        one(daemon, args, TransactionAction::Clear)
    }

    pub fn enable(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
        one(daemon, args, TransactionAction::Enable)
    }

    pub fn disable(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
        one(daemon, args, TransactionAction::Disable)
    }

    pub fn merge(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
        one(daemon, args, TransactionAction::Merge)
    }
}

/// Runs one bitmap command as a transaction of one action.
fn one<T: FromQapi>(
    daemon: &Arc<Daemon>,
    args: Args,
    action: fn(T) -> TransactionAction,
) -> Result<Value, QmpError> {
    let action = action(read(Value::Object(args))?);
    run(daemon, vec![action], None).map(|()| ok())
}

fn read<T: FromQapi>(args: Value) -> Result<T, QmpError> {
    from_value(args, InputMode::Json)
}

pub fn transaction(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let t: Transaction = read(Value::Object(args))?;
    let mut txn = None;
    if t.completion_mode == Some(ActionCompletionMode::Grouped) {
        // Only backups can fail as a group (QEMU's rule).
        let alone = t
            .actions
            .iter()
            .find(|a| !matches!(a, TransactionAction::Backup(_)));
        if let Some(action) = alone {
            return Err(QmpError::generic(format!(
                "Action '{}' does not support transaction property completion-mode = grouped",
                action.type_name()
            )));
        }
        txn = Some(daemon.jobs.new_txn());
    }
    run(daemon, t.actions, txn).map(|()| ok())
}

/// How to take back one applied action.
enum Undo {
    /// An added bitmap: remove it again.
    Added(Arc<BlockNode>, String),
    /// Restore the bits (clear, merge target).
    Bits(Arc<DirtyBitmap>, Vec<u64>),
    /// Restore recording (enable, disable).
    Enabled(Arc<DirtyBitmap>, bool),
    /// A pending remove: the bitmap was held busy.
    Removing(Arc<DirtyBitmap>),
    /// A backup job created but not started.
    Job(u64),
}

/// Applies all actions or none; backup jobs start once all are applied.
fn run(
    daemon: &Arc<Daemon>,
    actions: Vec<TransactionAction>,
    txn: Option<JobTxn>,
) -> Result<(), QmpError> {
    let mut undo = Vec::new();
    let mut removals = Vec::new();
    for action in actions {
        if let Err(e) = apply(daemon, action, txn, &mut undo, &mut removals) {
            for u in undo.into_iter().rev() {
                rollback(daemon, u);
            }
            return Err(e);
        }
    }
    for (node, bitmap) in removals {
        bitmap.set_busy(false);
        node.bitmaps().remove(bitmap.name());
    }
    for u in undo {
        if let Undo::Job(serial) = u {
            daemon.jobs.start_drained(serial);
        }
    }
    Ok(())
}

fn rollback(daemon: &Daemon, u: Undo) {
    match u {
        Undo::Added(node, name) => {
            node.bitmaps().remove(&name);
        }
        Undo::Bits(b, words) => b.restore_words(words),
        Undo::Enabled(b, enabled) => b.set_enabled(enabled),
        Undo::Removing(b) => b.set_busy(false),
        Undo::Job(serial) => daemon.jobs.discard_unstarted(serial),
    }
}

type Removals = Vec<(Arc<BlockNode>, Arc<DirtyBitmap>)>;

fn apply(
    daemon: &Arc<Daemon>,
    action: TransactionAction,
    txn: Option<JobTxn>,
    undo: &mut Vec<Undo>,
    removals: &mut Removals,
) -> Result<(), QmpError> {
    match action {
        TransactionAction::Add(a) => {
            let node = add(daemon, &a)?;
            undo.push(Undo::Added(node, a.name));
        }
        TransactionAction::Remove(r) => {
            let (node, b) = lookup(daemon, &r)?;
            check_usable(&b, Use::Remove)?;
            if let Some(store) = node.driver().bitmap_store().filter(|_| b.persistent()) {
                // QEMU drops it from the image at once, not at commit.
                store
                    .remove_persistent_bitmap(b.name())
                    .map_err(|e| QmpError::generic(e.to_string()))?;
            }
            b.set_busy(true);
            undo.push(Undo::Removing(b.clone()));
            removals.push((node, b));
        }
        TransactionAction::Clear(r) => {
            let (_, b) = lookup(daemon, &r)?;
            check_usable(&b, Use::Modify)?;
            undo.push(Undo::Bits(b.clone(), b.words()));
            b.clear();
        }
        TransactionAction::Enable(r) => set_enabled(daemon, &r, true, undo)?,
        TransactionAction::Disable(r) => set_enabled(daemon, &r, false, undo)?,
        TransactionAction::Merge(m) => merge(daemon, &m, undo)?,
        TransactionAction::Abort(_) => {
            return Err(QmpError::generic("Transaction aborted using Abort action"))
        }
        TransactionAction::Backup(b) => {
            undo.push(Undo::Job(super::backup::prepare(daemon, *b, txn)?));
        }
    }
    Ok(())
}

fn add(daemon: &Daemon, a: &BlockDirtyBitmapAdd) -> Result<Arc<BlockNode>, QmpError> {
    if a.name.is_empty() {
        return Err(QmpError::generic("Bitmap name cannot be empty"));
    }
    let node = daemon.nodes.find(&a.node).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{0}' nor node-name='{0}'",
            a.node
        ))
    })?;
    let granularity = match a.granularity {
        Some(g) => {
            let g = u64::from(g);
            if !g.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&g) {
                return Err(QmpError::generic(
                    "Granularity must be power of 2 and at least 512",
                ));
            }
            g
        }
        None => node.default_bitmap_granularity(),
    };
    let persistent = a.persistent.unwrap_or(false);
    let store = node.driver().bitmap_store();
    if persistent && store.is_none() {
        return Err(QmpError::generic(format!(
            "Can't store persistent bitmaps to {}: Operation not supported",
            a.node
        )));
    }
    if let Some(store) = store.filter(|_| persistent) {
        store
            .check_new_persistent_bitmap(&a.name, granularity)
            .map_err(|why| {
                QmpError::generic(format!(
                    "Can't make bitmap '{}' persistent in '{}': {why}",
                    a.name, a.node
                ))
            })?;
    }
    if a.name.len() > MAX_NAME {
        return Err(QmpError::generic(format!(
            "Bitmap name too long: {}",
            a.name
        )));
    }
    if node.bitmaps().find(&a.name).is_some() {
        return Err(QmpError::generic(format!(
            "Bitmap already exists: {}",
            a.name
        )));
    }
    let enabled = !a.disabled.unwrap_or(false);
    let bitmap = DirtyBitmap::new(
        a.name.clone(),
        node.size(),
        granularity,
        enabled,
        persistent,
    );
    node.bitmaps().insert(Arc::new(bitmap));
    Ok(node)
}

/// QEMU's block_dirty_bitmap_lookup on the daemon's nodes.
fn lookup(
    daemon: &Daemon,
    r: &BlockDirtyBitmap,
) -> Result<(Arc<BlockNode>, Arc<DirtyBitmap>), QmpError> {
    crate::nodes::bitmaps::lookup(&daemon.nodes, &r.node, &r.name)
}

fn set_enabled(
    daemon: &Daemon,
    r: &BlockDirtyBitmap,
    enabled: bool,
    undo: &mut Vec<Undo>,
) -> Result<(), QmpError> {
    let (_, b) = lookup(daemon, r)?;
    check_usable(&b, Use::Read)?;
    undo.push(Undo::Enabled(b.clone(), b.enabled()));
    b.set_enabled(enabled);
    Ok(())
}

fn merge(daemon: &Daemon, m: &BlockDirtyBitmapMerge, undo: &mut Vec<Undo>) -> Result<(), QmpError> {
    let (node, target) = lookup(
        daemon,
        &BlockDirtyBitmap {
            node: m.node.clone(),
            name: m.target.clone(),
        },
    )?;
    check_usable(&target, Use::Modify)?;
    undo.push(Undo::Bits(target.clone(), target.words()));
    for source in &m.bitmaps {
        let source = match source {
            BlockDirtyBitmapOrStr::Local(name) => find_on(&node, name)?,
            BlockDirtyBitmapOrStr::External { node, name } => {
                lookup(
                    daemon,
                    &BlockDirtyBitmap {
                        node: node.clone(),
                        name: name.clone(),
                    },
                )?
                .1
            }
        };
        check_usable(&source, Use::Read)?;
        target
            .merge_from(&source)
            .map_err(|e| QmpError::generic(e.to_string()))?;
    }
    Ok(())
}

/// The `dirty-bitmaps` member of a node in query-named-block-nodes.
pub fn query(node: &BlockNode) -> Option<Value> {
    let list = node.bitmaps().list();
    if list.is_empty() {
        return None;
    }
    let shown = list
        .iter()
        .map(|b| {
            let mut shown = json!({
                "name": b.name(),
                "recording": b.enabled(),
                "persistent": b.persistent(),
                "busy": b.busy(),
                "granularity": b.granularity(),
                "count": b.count(),
            });
            if b.is_inconsistent() {
                shown["inconsistent"] = json!(true);
            }
            shown
        })
        .collect();
    Some(Value::Array(shown))
}

#[cfg(test)]
#[path = "bitmap_tests.rs"]
mod tests;
