//! The NBD server and export commands: nbd-server-start/stop, block-export-add/del,
//! and the deprecated nbd-server-add/remove.

use std::sync::Arc;

use qmp::visitor::InputMode;
use qmp::QmpError;
use serde_json::Value;

use super::{no_args, ok, Args};
use crate::daemon::Daemon;
use crate::error::{NodeError, ServerError};
use crate::qapi;

/// `nbd-server-start` (legacy address form) and `--nbd-server` (flat form).
pub fn nbd_server_start(
    daemon: &Arc<Daemon>,
    value: Value,
    legacy: bool,
    mode: InputMode,
) -> Result<Value, QmpError> {
    let config = qapi::nbd_server_config(value, legacy, mode)?;
    daemon.start_nbd_server(config)?;
    Ok(ok())
}

/// `nbd-server-start` from QMP.
pub fn nbd_server_start_qmp(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    nbd_server_start(daemon, Value::Object(args), true, InputMode::Json)
}

pub fn nbd_server_stop(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    no_args(args)?;
    daemon.stop_nbd_server()?;
    Ok(ok())
}

pub fn block_export_add(
    daemon: &Arc<Daemon>,
    value: Value,
    mode: InputMode,
) -> Result<Value, QmpError> {
    let config = qapi::export_config(value, mode)?;
    daemon.add_export(config)?;
    Ok(ok())
}

/// `block-export-add` from QMP.
pub fn block_export_add_qmp(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    block_export_add(daemon, Value::Object(args), InputMode::Json)
}

pub fn block_export_del(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let (id, mode) = qapi::export_removal(Value::Object(args), "id")?;
    daemon.exports.remove(&id, mode)?;
    Ok(ok())
}

/// Deprecated: the export's id is its name, which defaults to the device.
pub fn nbd_server_add(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let config = qapi::nbd_server_add_config(Value::Object(args))?;
    let device = &config.node_name;
    // `device` may name a device or a node; bexd has only nodes, but the text is QEMU's.
    if daemon.nbd_server_running() && daemon.nodes.find(device).is_none() {
        return Err(NodeError::NoSuchNode(device.clone()).into());
    }
    daemon.add_export(config)?;
    Ok(ok())
}

/// Deprecated: `name` is looked up as an export id, as QEMU does.
pub fn nbd_server_remove(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let (id, mode) = qapi::export_removal(Value::Object(args), "name")?;
    if !daemon.nbd_server_running() {
        return Err(ServerError::NotRunning.into());
    }
    daemon.exports.remove(&id, mode)?;
    Ok(ok())
}
