//! object-add and object-del.

use std::sync::Arc;

use qmp::visitor::InputMode;
use qmp::QmpError;
use serde_json::Value;

use super::{ok, Args};
use crate::daemon::Daemon;

pub fn add(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    crate::objects::create(Value::Object(args), InputMode::Json)
        .and_then(|(id, object)| Ok(daemon.objects.add(id, object).map(|()| ok())?))
}

pub fn del(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    crate::qapi::object_id_arg(Value::Object(args))
        .and_then(|id| Ok(daemon.objects.delete(&id).map(|()| ok())?))
}
