//! object-add and object-del.

use std::sync::Arc;

use qmp::visitor::InputMode;
use qmp::QmpError;
use serde_json::Value;

use super::{ok, Args};
use crate::daemon::Daemon;
use crate::objects::Object;

pub fn add(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    create_and_add(daemon, Value::Object(args), InputMode::Json).map(|()| ok())
}

/// Creates an object and adds it to the table (`object-add`, `--object`).
/// A `metrics-http` object's server starts once the object is in the table
/// (so a duplicate id is refused before anything binds); if it cannot bind,
/// the object is taken out again and the error returned.
pub fn create_and_add(daemon: &Arc<Daemon>, value: Value, mode: InputMode) -> Result<(), QmpError> {
    let (id, object) = crate::objects::create(value, mode)?;
    let endpoint = match &object {
        Object::MetricsHttp(m) => Some((m.host.clone(), m.port.clone(), m.stop.clone())),
        _ => None,
    };
    daemon.objects.add(id.clone(), object)?;
    if let Some((host, port, stop)) = endpoint {
        if let Err(e) = crate::metrics::start(daemon, &host, &port, stop) {
            let _ = daemon.objects.delete(&id);
            return Err(e);
        }
    }
    Ok(())
}

pub fn del(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    crate::qapi::object_id_arg(Value::Object(args))
        .and_then(|id| Ok(daemon.objects.delete(&id).map(|()| ok())?))
}
