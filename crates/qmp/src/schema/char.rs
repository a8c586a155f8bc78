//! The socket chardev and monitor options of the command line.

use serde_json::Value;

use crate::visitor::{Ctx, Fields, FromQapi};
use crate::{qapi_enum, qapi_object, qapi_struct, QmpError};

/// A `--chardev` of a backend bexd has (`stdio` or `socket`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChardevOptions {
    /// `--chardev stdio,id=ID[,signal=on|off]`: a monitor on stdin/stdout.
    Stdio {
        id: String,
        signal: Option<bool>,
    },
    Socket(ChardevSocket),
}

/// The backends QEMU has but bexd does not: refused by name, not as unknown.
const OTHER_QEMU_BACKENDS: &[&str] = &[
    "hub",
    "serial",
    "mux",
    "pipe",
    "parallel",
    "null",
    "ringbuf",
    "memory",
    "udp",
    "file",
    "pty",
    "vc",
    "msmouse",
    "wctablet",
    "braille",
    "testdev",
    "spicevmc",
    "spiceport",
    "qemu-vdagent",
    "dbus",
    "tty",
    "console",
];

impl FromQapi for ChardevOptions {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        let mut f = Fields::new(value, ctx)?;
        let backend: String = f.required("backend")?;
        match backend.as_str() {
            "stdio" => {
                let r = Self::Stdio {
                    id: chardev_id(&mut f)?,
                    signal: f.optional("signal")?,
                };
                finish(f)?;
                Ok(r)
            }
            "socket" => ChardevSocket::read(f).map(Self::Socket),
            b if OTHER_QEMU_BACKENDS.contains(&b) => Err(QmpError::generic(format!(
                "chardev backend '{b}' is not supported by bexd (only 'stdio' and 'socket')"
            ))),
            b => Err(QmpError::generic(format!(
                "'{b}' is not a valid char driver name"
            ))),
        }
    }
}

/// `--chardev socket,id=..,path=..|host=..,port=..|fd=..,server=on|off,...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChardevSocket {
    pub id: String,
    pub path: Option<String>,
    pub host: Option<String>,
    pub port: Option<String>,
    /// An inherited listening socket, by number (QEMU's legacy `fd=`).
    pub fd: Option<String>,
    pub server: Option<bool>,
    pub wait: Option<bool>,
    /// Seconds between connection attempts in client mode (QEMU's older spelling).
    pub reconnect: Option<i64>,
    /// The same in milliseconds (QEMU 9.2 and later).
    pub reconnect_ms: Option<i64>,
}

impl ChardevSocket {
    fn read(mut f: Fields) -> Result<Self, QmpError> {
        let r = Self {
            id: chardev_id(&mut f)?,
            path: f.optional("path")?,
            host: f.optional("host")?,
            port: f.optional("port")?,
            fd: f.optional("fd")?,
            server: f.optional("server")?,
            wait: f.optional("wait")?,
            reconnect: opts_number(&mut f, "reconnect")?,
            reconnect_ms: opts_number(&mut f, "reconnect-ms")?,
        };
        refuse_unsupported(&mut f)?;
        finish(f)?;
        Ok(r)
    }
}

/// Socket chardev members bexd's monitors do not act on: each is taken only
/// with the value bexd behaves as (accepted sockets always get TCP_NODELAY;
/// no telnet, no multiplexing, no abstract socket), and refused otherwise,
/// naming the member, rather than read and dropped.
fn refuse_unsupported(f: &mut Fields) -> Result<(), QmpError> {
    for (key, what_bexd_does) in [
        ("nodelay", true),
        ("tight", true),
        ("abstract", false),
        ("telnet", false),
        ("logappend", false),
        ("mux", false),
    ] {
        let given: Option<bool> = f.optional(key)?;
        if given.is_some_and(|v| v != what_bexd_does) {
            return Err(unsupported(key));
        }
    }
    for key in ["ipv4", "ipv6", "to", "logfile"] {
        let given: Option<Value> = f.optional(key)?;
        if given.is_some() {
            return Err(unsupported(key));
        }
    }
    Ok(())
}

fn unsupported(key: &str) -> QmpError {
    QmpError::generic(format!(
        "Parameter '{key}' is not supported by bexd's socket chardevs"
    ))
}

/// The chardev's id, with QEMU's texts (`--chardev` is read as QemuOpts there).
fn chardev_id(f: &mut Fields) -> Result<String, QmpError> {
    let id: String = f
        .optional("id")?
        .ok_or_else(|| QmpError::generic("chardev: no id specified"))?;
    let mut chars = id.chars();
    let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if !well_formed {
        return Err(QmpError::generic("Parameter 'id' expects an identifier"));
    }
    Ok(id)
}

/// A QemuOpts number (keyval input is all strings), with QemuOpts' text.
fn opts_number(f: &mut Fields, key: &str) -> Result<Option<i64>, QmpError> {
    let Some(text) = f.optional::<String>(key)? else {
        return Ok(None);
    };
    text.parse()
        .map(Some)
        .map_err(|_| QmpError::generic(format!("Parameter '{key}' expects a number")))
}

/// A member the backend does not have: QemuOpts' text.
fn finish(f: Fields) -> Result<(), QmpError> {
    match f.first_left() {
        Some(key) => Err(QmpError::generic(format!("Invalid parameter '{key}'"))),
        None => Ok(()),
    }
}

qapi_enum!(MonitorMode { Readline = "readline", Control = "control" });

qapi_struct! {
    /// `--monitor [chardev=]ID[,mode=control][,pretty=on|off]`.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct MonitorOptions {
        opt "id" id: String,
        opt "mode" mode: MonitorMode,
        opt "pretty" pretty: bool,
        req "chardev" chardev: String,
    }
}

qapi_object! {
    /// One entry of query-chardev.
    pub ChardevInfo {
        req "label": String,
        req "filename": String,
        req "frontend-open": bool,
    }
}

qapi_object! {
    /// One entry of query-chardev-backends.
    pub ChardevBackendInfo {
        req "name": String,
    }
}

qapi_struct! {
    /// `getfd`: names the descriptor passed with the command (SCM_RIGHTS).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct GetfdArgs {
        req "fdname" fdname: String,
    }
}

qapi_struct! {
    /// `closefd`: closes a descriptor `getfd` named.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct ClosefdArgs {
        req "fdname" fdname: String,
    }
}
