//! The `query-*` commands.

use std::sync::Arc;

use serde_json::{json, Value};

use super::{no_args, Args, COMMANDS};
use crate::daemon::Daemon;
use qmp::QmpError;

pub fn version() -> Value {
    let (major, minor, micro) = crate::QEMU_VERSION;
    json!({
        "qemu": { "major": major, "minor": minor, "micro": micro },
        "package": crate::PACKAGE,
    })
}

pub fn commands() -> Value {
    Value::Array(
        COMMANDS
            .iter()
            .map(|name| json!({ "name": name }))
            .collect(),
    )
}

/// Newest first, as QEMU lists them; exports still shutting down included.
pub fn block_exports(daemon: &Daemon) -> Value {
    let state = daemon.state();
    let list = state
        .exports
        .iter()
        .rev()
        .map(|e| {
            json!({
                "id": e.id(),
                "type": "nbd",
                "node-name": e.node.node_name(),
                "shutting-down": e.is_shutting_down(),
            })
        })
        .collect();
    Value::Array(list)
}

/// The subset of QEMU's BlockDeviceInfo that describes bexd's nodes.
pub fn named_block_nodes(daemon: &Arc<Daemon>, mut args: Args) -> Result<Value, QmpError> {
    // `flat` only changes whether backing images nest; bexd has no backing chains yet.
    if let Some(flat) = args.remove("flat") {
        if !flat.is_boolean() {
            return Err(QmpError::generic(
                "Invalid parameter type for 'flat', expected: boolean",
            ));
        }
    }
    no_args("query-named-block-nodes", args)?;
    let state = daemon.state();
    let list = state
        .nodes
        .iter()
        .map(|(name, entry)| {
            let node = &entry.node;
            let caps = node.capabilities();
            let mut shown = json!({
                "node-name": name,
                "drv": node.driver_name(),
                "ro": node.read_only(),
                "file": entry.filename,
                "encrypted": false,
                "detect_zeroes": "off",
                "backing_file_depth": 0,
                "write_threshold": 0,
                "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
                "cache": {
                    "writeback": true,
                    "direct": caps.request_alignment > 1,
                    "no-flush": false,
                },
                "image": {
                    "filename": entry.filename,
                    "format": node.driver_name(),
                    "virtual-size": node.size(),
                },
            });
            if let (Some(bitmaps), Some(map)) = (super::bitmap::query(node), shown.as_object_mut())
            {
                map.insert("dirty-bitmaps".into(), bitmaps);
            }
            shown
        })
        .collect();
    Ok(Value::Array(list))
}
