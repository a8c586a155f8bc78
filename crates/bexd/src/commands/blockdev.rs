//! blockdev-add and blockdev-del.

use std::sync::Arc;

use qmp::visitor::InputMode;
use qmp::QmpError;
use serde_json::Value;

use super::{ok, Args};
use crate::daemon::Daemon;

pub fn add(daemon: &Arc<Daemon>, value: Value, mode: InputMode) -> Result<Value, QmpError> {
    crate::blockdev::add(daemon, value, mode).map(|_| ok())
}

pub fn del(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let node_name = crate::qapi::node_name_arg(Value::Object(args))?;
    daemon.delete_node(&node_name).map(|()| ok())
}
