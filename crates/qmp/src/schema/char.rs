//! The socket chardev and monitor options of the command line.

use serde_json::Value;

use crate::visitor::{Ctx, Fields, FromQapi};
use crate::{qapi_enum, qapi_struct, QmpError};

/// `--chardev socket,id=..,path=..|host=..,port=..,server=on,wait=off`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChardevSocket {
    pub id: String,
    pub path: Option<String>,
    pub host: Option<String>,
    pub port: Option<String>,
    pub server: Option<bool>,
    pub wait: Option<bool>,
}

impl FromQapi for ChardevSocket {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        let mut f = Fields::new(value, ctx)?;
        let backend: String = f.required("backend")?;
        if backend != "socket" {
            return Err(QmpError::generic(format!(
                "chardev backend '{backend}' is not supported (bexd monitors use 'socket')"
            )));
        }
        let r = Self {
            id: f.required("id")?,
            path: f.optional("path")?,
            host: f.optional("host")?,
            port: f.optional("port")?,
            server: f.optional("server")?,
            wait: f.optional("wait")?,
        };
        refuse_unsupported(&mut f)?;
        f.finish()?;
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
