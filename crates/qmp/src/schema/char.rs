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
        for key in [
            "nodelay",
            "ipv4",
            "ipv6",
            "to",
            "tight",
            "abstract",
            "telnet",
            "logfile",
            "logappend",
            "mux",
        ] {
            let _: Option<Value> = f.optional(key)?;
        }
        f.finish()?;
        Ok(r)
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
