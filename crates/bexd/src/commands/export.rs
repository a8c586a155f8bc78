//! The NBD server and export commands: nbd-server-start/stop, block-export-add/del,
//! and the deprecated nbd-server-add/remove.

use std::sync::Arc;

use qmp::visitor::InputMode;
use qmp::QmpError;
use serde_json::Value;

use super::{ok, Args};
use crate::daemon::Daemon;
use crate::qapi;

/// `nbd-server-start` (legacy address form) and `--nbd-server` (flat form).
pub fn nbd_server_start(
    daemon: &Arc<Daemon>,
    value: Value,
    legacy: bool,
    mode: InputMode,
) -> Result<Value, QmpError> {
    let config = qapi::nbd_server_config(value, legacy, mode)?;
    daemon.start_nbd_server(config).map(|()| ok())
}

pub fn nbd_server_stop(daemon: &Arc<Daemon>) -> Result<Value, QmpError> {
    daemon.stop_nbd_server().map(|()| ok())
}

pub fn block_export_add(
    daemon: &Arc<Daemon>,
    value: Value,
    mode: InputMode,
) -> Result<Value, QmpError> {
    let (config, node_name) = qapi::export_config(value, mode)?;
    daemon.add_export_config(config, &node_name).map(|()| ok())
}

pub fn block_export_del(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let (id, mode) = qapi::export_removal(Value::Object(args), "id")?;
    daemon.remove_export(&id, mode).map(|()| ok())
}

/// Deprecated: the export's id is its name, which defaults to the device.
pub fn nbd_server_add(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let (config, device) = qapi::nbd_server_add_config(Value::Object(args))?;
    // `device` may name a device or a node; bexd has only nodes, but the text is QEMU's.
    if daemon.state().nbd.is_some() && daemon.find_node(&device).is_none() {
        return Err(QmpError::generic(format!(
            "Cannot find device='{device}' nor node-name='{device}'"
        )));
    }
    daemon.add_export_config(config, &device).map(|()| ok())
}

/// Deprecated: `name` is looked up as an export id, as QEMU does.
pub fn nbd_server_remove(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let (id, mode) = qapi::export_removal(Value::Object(args), "name")?;
    if daemon.state().nbd.is_none() {
        return Err(QmpError::generic("NBD server not running"));
    }
    daemon.remove_export(&id, mode).map(|()| ok())
}
