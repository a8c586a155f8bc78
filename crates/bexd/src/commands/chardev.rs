//! Chardev and descriptor commands: query-chardev, query-chardev-backends,
//! getfd and closefd (the last two act on the calling monitor's descriptors).

use std::sync::Arc;

use qmp::schema::char::{ClosefdArgs, GetfdArgs};
use qmp::visitor::{from_value, InputMode};
use qmp::QmpError;
use serde_json::Value;

use super::{no_args, ok, Args};
use crate::daemon::Daemon;

/// The backends bexd can run a monitor on.
const BACKENDS: &[&str] = &["socket", "stdio"];

pub fn query(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    no_args(args)?;
    Ok(Value::Array(daemon.chardevs.infos()))
}

pub fn query_backends(_daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    no_args(args)?;
    Ok(BACKENDS
        .iter()
        .map(|name| serde_json::json!({ "name": name }))
        .collect())
}

/// qemu-storage-daemon has no getfd ("only QEMU supports file descriptor
/// passing"); bexd takes QEMU's, so a client can hand over a listening
/// socket for `nbd-server-start` with `addr.type=fd`.
pub fn getfd(_daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let a: GetfdArgs = from_value(Value::Object(args), InputMode::Json)?;
    crate::fds::getfd(&a.fdname)?;
    Ok(ok())
}

pub fn closefd(_daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let a: ClosefdArgs = from_value(Value::Object(args), InputMode::Json)?;
    crate::fds::closefd(&a.fdname)?;
    Ok(ok())
}
