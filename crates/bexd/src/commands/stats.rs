//! `query-blockstats` (QEMU's) and `x-query-export-stats` (bexd's own).
//!
//! qemu-storage-daemon lists no devices (exports are not devices), so
//! `query-blockstats` without `query-nodes` answers `[]` here too. With
//! `query-nodes=true` every node gets QEMU's entry: its counters, its file
//! child as `parent` (nested whole) and `driver-specific` for file nodes.
//! QEMU nests a backing node as `backing` only in device entries, never in
//! node entries, so neither does bexd. Unlike qemu-storage-daemon, whose
//! node counters stay at zero under NBD traffic, bexd counts each export's
//! requests on the node it exports (see `block::stats`).

use std::sync::Arc;

use block::{IoKind, StatsSnapshot};
use qmp::schema::block_stats::QueryBlockstatsArgs;
use qmp::visitor::{from_value, InputMode};
use qmp::QmpError;
use serde_json::{json, Map, Value};

use super::{no_args, Args};
use crate::daemon::Daemon;
use crate::nodes::{NodeEntry, Nodes};

/// Nesting deeper than this is a loop in the graph, not a chain.
const MAX_DEPTH: usize = 1000;

pub fn query_blockstats(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let args: QueryBlockstatsArgs = from_value(Value::Object(args), InputMode::Json)?;
    if !args.query_nodes.unwrap_or(false) {
        return Ok(json!([]));
    }
    let nodes = daemon.nodes.lock();
    let list = nodes
        .iter()
        .map(|(name, entry)| node_stats(&nodes, name, entry, 0))
        .collect();
    Ok(Value::Array(list))
}

/// One node's BlockStats, its file child nested as QEMU nests it.
fn node_stats(nodes: &Nodes, name: &str, entry: &NodeEntry, depth: usize) -> Value {
    let snap = entry.node.stats().snapshot();
    let mut out = Map::new();
    out.insert("node-name".into(), json!(name));
    out.insert("stats".into(), device_stats(&snap));
    if entry.node.driver_name() == "file" {
        let unmap = snap.kind(IoKind::Unmap);
        out.insert(
            "driver-specific".into(),
            json!({
                "driver": "file",
                "discard-nb-ok": unmap.ops,
                "discard-nb-failed": unmap.failed,
                "discard-bytes-ok": unmap.bytes,
            }),
        );
    }
    if depth < MAX_DEPTH {
        let backing = entry.format.as_ref().and_then(|f| f.backing_node.as_ref());
        let file = entry.children.iter().find(|c| Some(*c) != backing);
        if let Some((file_name, file)) = file.and_then(|c| nodes.get_key_value(c)) {
            out.insert(
                "parent".into(),
                node_stats(nodes, file_name, file, depth + 1),
            );
        }
    }
    Value::Object(out)
}

/// QEMU's BlockDeviceStats from a snapshot. bexd merges no requests, serves
/// no zone appends and keeps no timed intervals, so those stay zero/empty.
pub fn device_stats(snap: &StatsSnapshot) -> Value {
    let mut out = Map::new();
    let prefixes = [
        (IoKind::Read, "rd"),
        (IoKind::Write, "wr"),
        (IoKind::Flush, "flush"),
        (IoKind::Unmap, "unmap"),
    ];
    for (kind, p) in prefixes {
        let k = snap.kind(kind);
        if kind != IoKind::Flush {
            out.insert(format!("{p}_bytes"), json!(k.bytes));
            out.insert(format!("{p}_merged"), json!(0));
        }
        out.insert(format!("{p}_operations"), json!(k.ops));
        out.insert(format!("{p}_total_time_ns"), json!(k.total_ns));
        out.insert(format!("failed_{p}_operations"), json!(k.failed));
        out.insert(format!("invalid_{p}_operations"), json!(k.invalid));
    }
    for key in ["bytes", "operations", "total_time_ns", "merged"] {
        out.insert(format!("zone_append_{key}"), json!(0));
    }
    for key in ["failed", "invalid"] {
        out.insert(format!("{key}_zone_append_operations"), json!(0));
    }
    out.insert("wr_highest_offset".into(), json!(snap.wr_highest_offset));
    if let Some(idle) = snap.idle_time_ns {
        out.insert("idle_time_ns".into(), json!(idle));
    }
    out.insert("account_invalid".into(), json!(true));
    out.insert("account_failed".into(), json!(true));
    out.insert("timed_stats".into(), json!([]));
    Value::Object(out)
}

/// bexd's own: each export's counters and clients, oldest export first.
pub fn export_stats(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    no_args(args)?;
    let list = daemon
        .exports
        .all()
        .iter()
        .map(|e| {
            let snap = e.stats.snapshot();
            json!({
                "id": e.id(),
                "node-name": e.node.node_name(),
                "connections": e.connection_count(),
                "connections-total": e.connections_total(),
                "in-flight": snap.in_flight,
                "stats": device_stats(&snap),
            })
        })
        .collect();
    Ok(Value::Array(list))
}
