//! QMP command dispatch. Each family lives in its own file; this table is
//! the single list of what bexd implements (it also answers `query-commands`).

pub(crate) mod bitmap;
mod blockdev;
mod export;
mod introspection;
mod query;

pub use blockdev::add as blockdev_add;
pub use export::{block_export_add, nbd_server_start};

use std::sync::Arc;

use qmp::visitor::InputMode;
use qmp::{ErrorClass, QmpError};
use serde_json::{Map, Value};

use crate::daemon::Daemon;

/// Every command bexd answers, in the order `query-commands` lists them.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-qmp-schema",
    "quit",
    "blockdev-add",
    "blockdev-del",
    "query-named-block-nodes",
    "object-add",
    "object-del",
    "nbd-server-start",
    "nbd-server-stop",
    "nbd-server-add",
    "nbd-server-remove",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "transaction",
];

type Args = Map<String, Value>;

/// Runs one command (capabilities negotiation is the monitor's business).
pub async fn dispatch(daemon: &Arc<Daemon>, name: &str, args: Args) -> Result<Value, QmpError> {
    let json = InputMode::Json;
    match name {
        "query-version" => no_args(name, args).map(|()| query::version()),
        "query-commands" => no_args(name, args).map(|()| query::commands()),
        "query-qmp-schema" => no_args(name, args).map(|()| introspection::schema()),
        "quit" => no_args(name, args).map(|()| {
            // QEMU announces every export's deletion before the quit's return.
            daemon.remove_all_exports();
            ok()
        }),
        "blockdev-add" => blockdev::add(daemon, Value::Object(args), json),
        "blockdev-del" => blockdev::del(daemon, args),
        "query-named-block-nodes" => query::named_block_nodes(daemon, args),
        "object-add" => crate::objects::create(Value::Object(args), json)
            .and_then(|(id, object)| Ok(daemon.add_object(id, object).map(|()| ok())?)),
        "object-del" => crate::qapi::object_id_arg(Value::Object(args))
            .and_then(|id| Ok(daemon.delete_object(&id).map(|()| ok())?)),
        "nbd-server-start" => export::nbd_server_start(daemon, Value::Object(args), true, json),
        "nbd-server-stop" => no_args(name, args).and_then(|()| export::nbd_server_stop(daemon)),
        "nbd-server-add" => export::nbd_server_add(daemon, args),
        "nbd-server-remove" => export::nbd_server_remove(daemon, args),
        "block-export-add" => export::block_export_add(daemon, Value::Object(args), json),
        "block-export-del" => export::block_export_del(daemon, args),
        "query-block-exports" => no_args(name, args).map(|()| query::block_exports(daemon)),
        "transaction" => bitmap::transaction(daemon, args),
        n if n.starts_with("block-dirty-bitmap-") => bitmap::command(daemon, name, args),
        _ => Err(not_found(name)),
    }
}

/// The error for a command bexd does not have.
pub fn not_found(name: &str) -> QmpError {
    QmpError::new(
        ErrorClass::CommandNotFound,
        format!("The command {name} has not been found"),
    )
}

/// Commands without arguments still refuse unknown ones, as QEMU does.
fn no_args(_name: &str, args: Args) -> Result<(), QmpError> {
    match args.keys().next() {
        Some(key) => Err(QmpError::generic(format!(
            "Parameter '{key}' is unexpected"
        ))),
        None => Ok(()),
    }
}

fn ok() -> Value {
    Value::Object(Map::new())
}
