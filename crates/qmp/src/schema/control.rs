//! qapi/control.json and misc.json: what the monitor itself answers. These are
//! only described: the monitor reads `qmp_capabilities` itself (before any
//! command runs) and builds the replies with `json!`.

use serde_json::Value;

use crate::{qapi_enum, qapi_object};

qapi_enum!(QMPCapability { Oob = "oob" });

qapi_object! {
    /// qmp_capabilities' arguments.
    pub QmpCapabilitiesArgs {
        opt "enable": Vec<QMPCapability>,
    }
}

qapi_object! {
    pub VersionTriple {
        req "major": i64,
        req "minor": i64,
        req "micro": i64,
    }
}

qapi_object! {
    /// query-version's reply.
    pub VersionInfo {
        req "qemu": VersionTriple,
        req "package": String,
    }
}

qapi_object! {
    /// One entry of query-commands.
    pub CommandInfo {
        req "name": String,
    }
}

/// query-qmp-schema's reply: a list of SchemaInfo, described as `any` (as bexd always has).
pub type SchemaInfo = Value;
