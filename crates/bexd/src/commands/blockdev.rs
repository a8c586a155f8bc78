//! blockdev-add and blockdev-del.

use std::sync::Arc;

use qmp::visitor::InputMode;
use qmp::QmpError;
use serde_json::Value;

use super::{ok, Args};
use crate::daemon::Daemon;

/// `blockdev-add` and `--blockdev`: typed arguments from JSON or keyval, then the node table.
pub fn add(daemon: &Arc<Daemon>, value: Value, mode: InputMode) -> Result<Value, QmpError> {
    let options = crate::qapi::node_options(value, mode)?;
    if options.node_name.is_none() {
        return Err(QmpError::generic(
            "'node-name' must be specified for the root node",
        ));
    }
    crate::nodes::open(&daemon.nodes, options, false)?;
    Ok(ok())
}

/// `blockdev-add` from QMP.
pub fn add_qmp(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    add(daemon, Value::Object(args), InputMode::Json)
}

pub fn del(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let node_name = crate::qapi::node_name_arg(Value::Object(args))?;
    daemon.nodes.delete(&node_name)?;
    Ok(ok())
}
