//! The `query-*` commands.

use std::sync::Arc;

use serde_json::{json, Value};

use super::{no_args, registry, Args};
use crate::daemon::Daemon;
use qmp::schema::block_core::QueryNamedBlockNodesArgs;
use qmp::visitor::{from_value, InputMode};
use qmp::QmpError;

pub fn version(_daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    no_args(args)?;
    let (major, minor, micro) = crate::QEMU_VERSION;
    Ok(json!({
        "qemu": { "major": major, "minor": minor, "micro": micro },
        "package": crate::PACKAGE,
    }))
}

pub fn commands(_daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    no_args(args)?;
    Ok(registry::command_list())
}

pub fn schema(_daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    no_args(args)?;
    Ok(registry::schema())
}

/// Newest first, as QEMU lists them; exports still shutting down included.
pub fn block_exports(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    no_args(args)?;
    Ok(Value::Array(
        daemon
            .exports
            .all()
            .iter()
            .rev()
            .map(|e| e.query())
            .collect(),
    ))
}

/// The subset of QEMU's BlockDeviceInfo that describes bexd's nodes.
pub fn named_block_nodes(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    // `flat` only changes whether backing images nest in `image`.
    let args: QueryNamedBlockNodesArgs = from_value(Value::Object(args), InputMode::Json)?;
    let flat = args.flat.unwrap_or(false);
    let nodes = daemon.nodes.lock();
    // As QEMU: a node whose driver gave up (a qcow2 image found corrupt)
    // fails the whole query.
    if let Some(name) = nodes
        .iter()
        .find_map(|(n, e)| e.node.driver().unusable().then_some(n))
    {
        return Err(QmpError::generic(format!("Block device {name} is ejected")));
    }
    let list = nodes
        .iter()
        .map(|(name, entry)| node_info(&nodes, name, entry, flat))
        .collect();
    Ok(Value::Array(list))
}

use crate::nodes::{NodeEntry, Nodes};

fn node_info(nodes: &Nodes, name: &str, entry: &NodeEntry, flat: bool) -> Value {
    let node = &entry.node;
    let caps = node.capabilities();
    let mut info = json!({
        "node-name": name,
        "drv": node.driver_name(),
        "ro": node.read_only(),
        "file": entry.filename,
        "encrypted": false,
        "detect_zeroes": node.detect_zeroes().as_str(),
        "backing_file_depth": backing_depth(nodes, entry),
        // An int in QAPI: QEMU shows thresholds past 2^63 as negative.
        "write_threshold": node.write_threshold() as i64,
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "cache": {
            "writeback": true,
            "direct": caps.request_alignment > 1,
            "no-flush": false,
        },
        "image": image_info(nodes, entry, flat),
    });
    if let Some(full) = entry
        .format
        .as_ref()
        .and_then(|f| f.full_backing_filename.clone())
    {
        info["backing_file"] = json!(full);
    }
    if let Some(bitmaps) = super::bitmap::query(node) {
        info["dirty-bitmaps"] = bitmaps;
    }
    info
}

/// How many backing layers lie below a node (QEMU's backing_file_depth).
fn backing_depth(nodes: &Nodes, entry: &NodeEntry) -> u64 {
    let mut depth = 0;
    let mut cur = entry;
    while let Some(next) = cur
        .format
        .as_ref()
        .and_then(|f| f.backing_node.as_ref())
        .and_then(|b| nodes.get(b))
    {
        depth += 1;
        cur = next;
        if depth > 1000 {
            break;
        }
    }
    depth
}

/// QEMU's ImageInfoSpecificQCow2: version 2 images have only three members;
/// `bitmaps` lists what the image holds now, when it holds any.
fn qcow2_specific(q: &block::drivers::qcow2::Qcow2Info, stored: &[block::StoredBitmap]) -> Value {
    if q.compat == "0.10" {
        return json!({
            "compat": q.compat,
            "compression-type": q.compression_type,
            "refcount-bits": q.refcount_bits,
        });
    }
    let mut data = json!({
        "compat": q.compat,
        "compression-type": q.compression_type,
        "lazy-refcounts": q.lazy_refcounts,
    });
    if !stored.is_empty() {
        let bitmaps: Vec<Value> = stored
            .iter()
            .map(|b| {
                let flags: Vec<&str> = [(b.in_use, "in-use"), (b.auto, "auto")]
                    .iter()
                    .filter_map(|&(set, name)| set.then_some(name))
                    .collect();
                json!({"flags": flags, "name": b.name, "granularity": b.granularity})
            })
            .collect();
        data["bitmaps"] = json!(bitmaps);
    }
    data["refcount-bits"] = json!(q.refcount_bits);
    data["corrupt"] = json!(q.corrupt);
    data["extended-l2"] = json!(q.extended_l2);
    data
}

/// QEMU's ImageInfo: for qcow2 with format-specific data and, unless
/// `flat`, the backing image nested.
fn image_info(nodes: &Nodes, entry: &NodeEntry, flat: bool) -> Value {
    let node = &entry.node;
    let mut image = json!({
        "filename": entry.filename,
        "format": node.driver_name(),
        "virtual-size": node.size(),
        "dirty-flag": false,
    });
    let Some(f) = &entry.format else {
        return image;
    };
    let q = &f.qcow2;
    image["cluster-size"] = json!(q.cluster_size);
    image["format-specific"] = json!({
        "type": "qcow2",
        "data": qcow2_specific(q, &node.driver().bitmap_store().map(|s| s.stored_bitmaps()).unwrap_or_default()),
    });
    if let Some(b) = &q.backing_file {
        image["backing-filename"] = json!(b);
    }
    if let Some(b) = &f.full_backing_filename {
        image["full-backing-filename"] = json!(b);
    }
    if let Some(fmt) = &q.backing_format {
        image["backing-filename-format"] = json!(fmt);
    }
    let below = f.backing_node.as_ref().and_then(|b| nodes.get(b));
    if let (false, Some(b)) = (flat, below) {
        image["backing-image"] = image_info(nodes, b, flat);
    }
    image
}
