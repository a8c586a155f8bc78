//! qom-get and qom-set: the properties of user-created objects (bexd
//! models those of throttle groups, the ones QEMU lets change live).

use std::sync::Arc;

use qmp::schema::object::{QomGetArgs, QomSetArgs};
use qmp::visitor::{from_value, InputMode};
use qmp::QmpError;
use serde_json::Value;

use super::{ok, Args};
use crate::daemon::Daemon;

pub fn get(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let a: QomGetArgs = from_value(Value::Object(args), InputMode::Json)?;
    Ok(daemon.objects.qom_get(&a.path, &a.property)?)
}

pub fn set(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let a: QomSetArgs = from_value(Value::Object(args), InputMode::Json)?;
    daemon.objects.qom_set(&a.path, &a.property, a.value)?;
    Ok(ok())
}
