//! The shape of the command table and what is read from it: dispatch,
//! `query-commands` and `query-qmp-schema`. The table itself is in `mod.rs`.

use std::sync::Arc;

use qmp::introspect::{Schema, Ty};
use qmp::{ErrorClass, QmpError};
use serde_json::{Map, Value};

use super::{COMMANDS, EVENTS};
use crate::daemon::Daemon;

pub type Args = Map<String, Value>;

/// A command's code: the daemon and the arguments as the client sent them
/// (each handler reads them into its QAPI type).
pub type Handler = fn(&Arc<Daemon>, Args) -> Result<Value, QmpError>;

/// Adds a QAPI type to the schema and names it (`qmp::introspect::describe::<T>`).
pub type Describer = fn(&mut Schema) -> Ty;

/// One QMP command: everything bexd says about it, in one place.
pub struct Command {
    pub name: &'static str,
    /// The argument type, as `query-qmp-schema` describes it.
    pub args: Describer,
    /// The reply type.
    pub ret: Describer,
    /// QAPI features, e.g. `deprecated`.
    pub features: &'static [&'static str],
    pub handler: Handler,
}

/// One event bexd may emit, for `query-qmp-schema`.
pub struct Event {
    pub name: &'static str,
    pub data: Describer,
}

/// Builds [`COMMANDS`] from one line per command:
/// `"name" (ArgType) -> RetType [features] => handler`.
macro_rules! commands {
    ($( $name:literal ($args:ty) -> $ret:ty $([$($feature:literal),*])? => $handler:expr ),* $(,)?) => {
        /// Every command bexd answers, in the order `query-commands` lists them.
        pub static COMMANDS: &[Command] = &[$(
            Command {
                name: $name,
                args: qmp::introspect::describe::<$args>,
                ret: qmp::introspect::describe::<$ret>,
                features: &[$($($feature),*)?],
                handler: $handler,
            }
        ),*];
    };
}
pub(super) use commands;

pub fn find(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// Whether bexd has the command (QEMU checks this before refusing out-of-band execution).
pub fn exists(name: &str) -> bool {
    find(name).is_some()
}

/// Runs one command.
pub async fn dispatch(daemon: &Arc<Daemon>, name: &str, args: Args) -> Result<Value, QmpError> {
    match find(name) {
        Some(command) => (command.handler)(daemon, args),
        None => Err(not_found(name)),
    }
}

/// The error for a command bexd does not have.
pub fn not_found(name: &str) -> QmpError {
    QmpError::new(
        ErrorClass::CommandNotFound,
        format!("The command {name} has not been found"),
    )
}

/// `query-commands`.
pub fn command_list() -> Value {
    COMMANDS
        .iter()
        .map(|c| serde_json::json!({ "name": c.name }))
        .collect()
}

/// `query-qmp-schema`: the commands in table order, then the events.
pub fn schema() -> Value {
    let mut s = Schema::new();
    for c in COMMANDS {
        let args = (c.args)(&mut s);
        let ret = (c.ret)(&mut s);
        s.command(c.name, args, ret, c.features);
    }
    for e in EVENTS {
        let data = (e.data)(&mut s);
        s.event(e.name, data);
    }
    s.render()
}
