//! `blockdev-reopen`: what image fleecing needs of it. A raw or qcow2
//! node's `file` child may be replaced by a copy-before-write filter whose
//! `file` is that child, and back again, while exports keep serving the
//! node. Every other member must keep the value the node has; a change is
//! refused naming the member, as QEMU refuses the ones it cannot change.
//!
//! The replacement happens in a drained section, as in QEMU: new writes to
//! the node wait at a gate (`block::before_write::WriteGate`), the writes
//! already running are waited for, the node is flushed (so a qcow2 image's
//! metadata is in its file before the filter freezes that file), and then
//! the child is swapped.

use std::sync::Arc;

use block::before_write::WriteGate;
use block::BlockNode;
use qmp::schema::block_core::{BlockdevOptions, BlockdevRef, BlockdevReopenArgs};
use qmp::visitor::{from_value, InputMode};
use qmp::QmpError;
use serde_json::Value;

use super::{ok, Args};
use crate::config::{ChildRef, NodeOptions, NodeSpec};
use crate::daemon::Daemon;
use crate::nodes::Reopenable;

/// One node's reopen, checked and ready to apply.
struct Plan {
    name: String,
    node: Arc<BlockNode>,
    reopen: Option<Reopenable>,
    old_child: Option<String>,
    new_child: Option<(String, Arc<BlockNode>)>,
}

pub fn reopen(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let items = match args.get("options") {
        Some(Value::Array(items)) => items.clone(),
        _ => Vec::new(),
    };
    let typed: BlockdevReopenArgs = from_value(Value::Object(args), InputMode::Json)?;
    // Every node is checked before anything changes (QEMU's reopen queue).
    let plans = typed
        .options
        .into_iter()
        .zip(items)
        .map(|(o, item)| plan(daemon, o, item))
        .collect::<Result<Vec<_>, _>>()?;
    for p in plans {
        apply(daemon, p)?;
    }
    Ok(ok())
}

fn cannot_change(member: &str) -> QmpError {
    QmpError::generic(format!("Cannot change the option '{member}'"))
}

fn plan(daemon: &Arc<Daemon>, o: BlockdevOptions, item: Value) -> Result<Plan, QmpError> {
    let Some(name) = o.base.node_name.clone() else {
        return Err(QmpError::generic("node-name not specified"));
    };
    let new_file = match &o.specific {
        qmp::schema::block_core::BlockdevSpecific::Raw { file, .. } => Some(file.clone()),
        qmp::schema::block_core::BlockdevSpecific::Qcow2(q) => Some(q.file.clone()),
        _ => None,
    };
    let new = crate::qapi::node_options(item, InputMode::Json)?;
    let (node, current, reopen, children) = {
        let nodes = daemon.nodes.lock();
        let entry = nodes.get(&name).ok_or_else(|| {
            QmpError::generic(format!("Failed to find node with node-name='{name}'"))
        })?;
        (
            entry.node.clone(),
            entry.options.clone(),
            entry.reopen.clone(),
            entry.children.clone(),
        )
    };
    let current = current.ok_or_else(|| cannot_change("driver"))?;
    compare(&current, &new)?;
    let mut plan = Plan {
        name: name.clone(),
        node,
        reopen,
        old_child: children.first().cloned(),
        new_child: None,
    };
    let Some(file) = new_file else {
        return Ok(plan);
    };
    let file = match file {
        BlockdevRef::Reference(f) => f,
        BlockdevRef::Definition(_) => return Err(cannot_change("file.driver")),
    };
    let child = daemon.nodes.find(&file).ok_or_else(|| {
        QmpError::generic(format!("Cannot find device='' nor node-name='{file}'"))
    })?;
    if plan.old_child.as_deref() == Some(file.as_str()) {
        return Ok(plan);
    }
    if daemon.nodes.reaches(&file, &name) {
        return Err(QmpError::generic(format!(
            "Making '{file}' a file child of '{name}' would create a cycle"
        )));
    }
    let old = plan.old_child.clone().unwrap_or_default();
    // bexd replaces a child only by a filter over it, or a filter by its child.
    let over = |top: &str, below: &str| {
        let nodes = daemon.nodes.lock();
        nodes.get(top).is_some_and(|e| {
            e.cbw.is_some() && e.children.first().map(String::as_str) == Some(below)
        })
    };
    if !over(&file, &old) && !over(&old, &file) {
        return Err(QmpError::generic(format!(
            "Cannot change the option 'file': bexd replaces the file child of '{name}' only by a copy-before-write filter over it, or such a filter by its file"
        )));
    }
    if plan.reopen.is_none() || child.async_driver().is_some() {
        return Err(cannot_change("file"));
    }
    plan.new_child = Some((file, child));
    Ok(plan)
}

/// Members that must keep their value (everything but `file`).
fn compare(current: &NodeOptions, new: &NodeOptions) -> Result<(), QmpError> {
    let checks: [(&str, bool); 7] = [
        ("read-only", current.read_only == new.read_only),
        (
            "auto-read-only",
            current.auto_read_only == new.auto_read_only,
        ),
        ("discard", current.discard == new.discard),
        ("cache.direct", current.cache_direct == new.cache_direct),
        (
            "cache.no-flush",
            current.cache_no_flush == new.cache_no_flush,
        ),
        ("force-share", current.force_share == new.force_share),
        ("detect-zeroes", current.detect_zeroes == new.detect_zeroes),
    ];
    if let Some((member, _)) = checks.iter().find(|(_, same)| !same) {
        return Err(cannot_change(member));
    }
    if std::mem::discriminant(&current.spec) != std::mem::discriminant(&new.spec) {
        return Err(cannot_change("driver"));
    }
    for (member, a, b) in spec_members(&current.spec)
        .into_iter()
        .zip(spec_members(&new.spec))
        .map(|((m, a), (_, b))| (m, a, b))
    {
        if a != b {
            return Err(cannot_change(member));
        }
    }
    Ok(())
}

/// A spec's members other than `file`, by name, as comparable text.
fn spec_members(spec: &NodeSpec) -> Vec<(&'static str, String)> {
    let child = |c: &ChildRef| match c {
        ChildRef::Name(n) => n.clone(),
        ChildRef::Inline(o) => format!("{o:?}"),
    };
    match spec {
        NodeSpec::Raw { offset, size, .. } => {
            vec![
                ("offset", offset.to_string()),
                ("size", format!("{size:?}")),
            ]
        }
        NodeSpec::Qcow2 {
            backing,
            cache,
            lazy_refcounts,
            ..
        } => vec![
            ("backing", format!("{backing:?}")),
            ("cache-size", format!("{:?}", cache.cache_size)),
            ("l2-cache-size", format!("{:?}", cache.l2_cache_size)),
            (
                "refcount-cache-size",
                format!("{:?}", cache.refcount_cache_size),
            ),
            (
                "cache-clean-interval",
                format!("{:?}", cache.cache_clean_interval),
            ),
            ("lazy-refcounts", format!("{lazy_refcounts:?}")),
        ],
        NodeSpec::Null {
            size,
            read_zeroes,
            latency_ns,
        } => vec![
            ("size", size.to_string()),
            ("read-zeroes", read_zeroes.to_string()),
            ("latency-ns", latency_ns.to_string()),
        ],
        NodeSpec::File {
            filename,
            aio,
            locking,
        } => vec![
            ("filename", filename.display().to_string()),
            ("aio", format!("{aio:?}")),
            ("locking", format!("{locking:?}")),
        ],
        NodeSpec::SnapshotAccess { file } | NodeSpec::Throttle { file, .. } => {
            vec![("file", child(file))]
        }
        NodeSpec::CopyBeforeWrite(c) => vec![
            ("file", child(&c.file)),
            ("target", child(&c.target)),
            ("bitmap", format!("{:?}", c.bitmap)),
            ("on-cbw-error", format!("{:?}", c.on_error)),
            ("cbw-timeout", c.timeout_secs.to_string()),
            ("min-cluster-size", c.min_cluster_size.to_string()),
        ],
        other => vec![("driver", format!("{other:?}"))],
    }
}

fn apply(daemon: &Arc<Daemon>, p: Plan) -> Result<(), QmpError> {
    let (Some((new_name, new)), Some(reopen)) = (p.new_child, p.reopen) else {
        return Ok(());
    };
    let slot = reopen.slot();
    if p.node.before_write().is_armed() {
        return Err(QmpError::generic(format!(
            "Node '{}' is busy: block device is in use by block job: backup",
            p.name
        )));
    }
    let gate = Arc::new(WriteGate::default());
    p.node.before_write().arm(gate.clone());
    let swap = || {
        p.node.before_write().drain_unhooked_blocking();
        p.node.driver().flush().map(|()| slot.replace(new))
    };
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    let swapped = match multi_thread {
        true => tokio::task::block_in_place(swap),
        false => swap(),
    };
    gate.open();
    p.node.before_write().disarm();
    swapped.map_err(|e| QmpError::generic(format!("Error flushing drive: {e}")))?;
    let old = p.old_child.unwrap_or_default();
    daemon.nodes.replace_child(&p.name, &old, &new_name);
    tracing::info!(node = %p.name, from = %old, to = %new_name, "file child replaced");
    Ok(())
}
