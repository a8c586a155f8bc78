//! qapi/block-export.json: NBD server options, export options, removal.

use serde_json::Value;

use super::bitmap::BlockDirtyBitmap;
use super::sockets::{SocketAddress, SocketAddressLegacy};
use crate::introspect::{bool, describe, int, named, opt, req, str, Describe, Schema, Ty};
use crate::visitor::{Ctx, Fields, FromQapi, Size};
use crate::{qapi_enum, qapi_object, qapi_struct, QmpError};

/// NbdServerOptions / NbdServerOptionsLegacy: the same members, two address forms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdServerOptions {
    pub addr: SocketAddress,
    pub tls_creds: Option<String>,
    pub tls_authz: Option<String>,
    pub max_connections: Option<u32>,
    pub handshake_max_seconds: Option<u32>,
    /// bexd's own (QEMU has no such bound): bytes all connections together
    /// may pin in requests in flight.
    pub x_payload_budget: Option<Size>,
}

impl NbdServerOptions {
    /// Reads the options; `legacy` selects SocketAddressLegacy for `addr` (QMP's form).
    pub fn read(value: Value, ctx: &Ctx, legacy: bool) -> Result<Self, QmpError> {
        let mut f = Fields::new(value, ctx)?;
        let addr = match legacy {
            true => f.required::<SocketAddressLegacy>("addr")?.0,
            false => f.required("addr")?,
        };
        let options = Self {
            addr,
            tls_creds: f.optional("tls-creds")?,
            tls_authz: f.optional("tls-authz")?,
            max_connections: f.optional("max-connections")?,
            handshake_max_seconds: f.optional("handshake-max-seconds")?,
            x_payload_budget: f.optional("x-payload-budget")?,
        };
        f.finish()?;
        Ok(options)
    }
}

/// nbd-server-start's arguments: the options with the legacy (`data`-wrapped) address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdServerOptionsLegacy(pub NbdServerOptions);

impl FromQapi for NbdServerOptionsLegacy {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        NbdServerOptions::read(value, ctx, true).map(Self)
    }
}

/// Listed in QEMU's order (NbdServerOptionsBase, then `addr`); the reader
/// takes `addr` first.
impl Describe for NbdServerOptionsLegacy {
    fn ty() -> Ty {
        named("NbdServerOptionsLegacy")
    }
    fn define(s: &mut Schema) {
        let addr = describe::<SocketAddressLegacy>(s);
        s.object(
            "NbdServerOptionsLegacy",
            vec![
                opt("handshake-max-seconds", int()),
                opt("tls-creds", str()),
                opt("tls-authz", str()),
                opt("max-connections", int()),
                req("addr", addr),
                opt("x-payload-budget", int()),
            ],
        );
    }
}

// The reader knows QEMU's other export types to refuse them by name;
// introspection lists the ones bexd implements.
qapi_enum!(
    BlockExportType { Nbd = "nbd", VhostUserBlk = "vhost-user-blk", Fuse = "fuse", VduseBlk = "vduse-blk" }
    advertises ["nbd", "vhost-user-blk", "fuse"]
);
qapi_enum!(FuseExportAllowOther { Off = "off", On = "on", Auto = "auto" });
qapi_enum!(BlockExportRemoveMode { Safe = "safe", Hard = "hard" });

/// BlockDirtyBitmapOrStr: a bitmap on the exported node by name, or `{node, name}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockDirtyBitmapOrStr {
    Local(String),
    External { node: String, name: String },
}

impl FromQapi for BlockDirtyBitmapOrStr {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        if value.is_string() {
            return String::from_qapi(value, ctx).map(Self::Local);
        }
        if !value.is_object() {
            // QEMU's generated alternate check names the bare member, or
            // "null" for a list element, not the full path.
            let name = match ctx.path.rsplit('.').next() {
                Some(last) if !last.is_empty() && !last.ends_with(']') => last,
                _ => "null",
            };
            return Err(QmpError::generic(format!(
                "Invalid parameter type for '{name}', expected: BlockDirtyBitmapOrStr"
            )));
        }
        let mut f = Fields::new(value, ctx)?;
        let r = Self::External {
            node: f.required("node")?,
            name: f.required("name")?,
        };
        f.finish()?;
        Ok(r)
    }
}

impl Describe for BlockDirtyBitmapOrStr {
    fn ty() -> Ty {
        named("BlockDirtyBitmapOrStr")
    }
    fn define(s: &mut Schema) {
        let external = describe::<BlockDirtyBitmap>(s);
        s.alternate("BlockDirtyBitmapOrStr", vec![str(), external]);
    }
}

/// BlockExportIothreads: one iothread name or a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockExportIothreads {
    Single(String),
    Multi(Vec<String>),
}

impl FromQapi for BlockExportIothreads {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        match value {
            Value::Array(_) => Vec::from_qapi(value, ctx).map(Self::Multi),
            other => String::from_qapi(other, ctx).map(Self::Single),
        }
    }
}

qapi_struct! {
    /// The NBD branch of BlockExportOptions.
    #[derive(Clone, Debug, PartialEq, Eq, Default)]
    pub struct BlockExportOptionsNbd {
        opt "name" name: String,
        opt "description" description: String,
        opt "bitmaps" bitmaps: Vec<BlockDirtyBitmapOrStr>,
        opt "allocation-depth" allocation_depth: bool,
    }
}

qapi_struct! {
    /// The FUSE branch of BlockExportOptions.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BlockExportOptionsFuse {
        req "mountpoint" mountpoint: String,
        opt "growable" growable: bool,
        opt "allow-other" allow_other: FuseExportAllowOther,
    }
}

qapi_struct! {
    /// The vhost-user-blk branch of BlockExportOptions.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BlockExportOptionsVhostUserBlk {
        req "addr" addr: SocketAddress,
        opt "logical-block-size" logical_block_size: Size,
        opt "num-queues" num_queues: u16,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockExportOptions {
    pub r#type: BlockExportType,
    pub id: String,
    pub node_name: String,
    pub writable: Option<bool>,
    pub writethrough: Option<bool>,
    pub iothread: Option<BlockExportIothreads>,
    pub fixed_iothread: Option<bool>,
    pub allow_inactive: Option<bool>,
    /// Present for `type: nbd`.
    pub nbd: Option<BlockExportOptionsNbd>,
    /// Present for `type: fuse`.
    pub fuse: Option<BlockExportOptionsFuse>,
    /// Present for `type: vhost-user-blk`; `vduse-blk` is read but not implemented.
    pub vhost_user_blk: Option<BlockExportOptionsVhostUserBlk>,
}

impl FromQapi for BlockExportOptions {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        let mut f = Fields::new(value, ctx)?;
        let r#type: BlockExportType = f.required("type")?;
        let mut options = Self {
            r#type,
            id: f.required("id")?,
            fixed_iothread: f.optional("fixed-iothread")?,
            iothread: f.optional("iothread")?,
            node_name: f.required("node-name")?,
            writable: f.optional("writable")?,
            writethrough: f.optional("writethrough")?,
            allow_inactive: f.optional("allow-inactive")?,
            nbd: None,
            fuse: None,
            vhost_user_blk: None,
        };
        match r#type {
            BlockExportType::Nbd => {
                options.nbd = Some(BlockExportOptionsNbd::read_members(&mut f)?);
            }
            BlockExportType::Fuse => {
                options.fuse = Some(BlockExportOptionsFuse::read_members(&mut f)?);
            }
            BlockExportType::VhostUserBlk => {
                let o = BlockExportOptionsVhostUserBlk::read_members(&mut f)?;
                options.vhost_user_blk = Some(o);
            }
            BlockExportType::VduseBlk => {
                f.discard_rest();
                return Ok(options);
            }
        }
        f.finish()?;
        Ok(options)
    }
}

/// A flat union on `type`; `iothread` is described as QEMU 10.0 lists it
/// (a string), though the reader also takes a list to refuse it with QEMU's text.
impl Describe for BlockExportOptions {
    fn ty() -> Ty {
        named("BlockExportOptions")
    }
    fn define(s: &mut Schema) {
        let kind = describe::<BlockExportType>(s);
        let nbd = describe::<BlockExportOptionsNbd>(s);
        let fuse = describe::<BlockExportOptionsFuse>(s);
        let vhost = describe::<BlockExportOptionsVhostUserBlk>(s);
        s.union(
            "BlockExportOptions",
            vec![
                req("type", kind),
                req("id", str()),
                opt("fixed-iothread", bool()),
                opt("iothread", str()),
                req("node-name", str()),
                opt("writable", bool()),
                opt("writethrough", bool()),
                opt("allow-inactive", bool()),
            ],
            "type",
            vec![("nbd", nbd), ("vhost-user-blk", vhost), ("fuse", fuse)],
        );
    }
}

qapi_struct! {
    /// nbd-server-add's arguments (deprecated command): BlockExportOptionsNbdBase's
    /// members, then its own.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct NbdServerAddOptions {
        opt "name" name: String,
        opt "description" description: String,
        req "device" device: String,
        opt "writable" writable: bool,
        opt "bitmap" bitmap: String,
    }
}

qapi_struct! {
    /// block-export-del's arguments.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BlockExportDelArgs {
        req "id" id: String,
        opt "mode" mode: BlockExportRemoveMode,
    }
}

qapi_struct! {
    /// nbd-server-remove's arguments (deprecated command).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct NbdServerRemoveArgs {
        req "name" name: String,
        opt "mode" mode: BlockExportRemoveMode,
    }
}

/// block-export-del (`id`) and nbd-server-remove (`name`): the key plus an optional mode.
pub fn read_removal(
    value: Value,
    ctx: &Ctx,
    key: &str,
) -> Result<(String, Option<BlockExportRemoveMode>), QmpError> {
    match key {
        "name" => NbdServerRemoveArgs::from_qapi(value, ctx).map(|a| (a.name, a.mode)),
        _ => BlockExportDelArgs::from_qapi(value, ctx).map(|a| (a.id, a.mode)),
    }
}

qapi_object! {
    /// One entry of query-block-exports.
    pub BlockExportInfo {
        req "id": String,
        req "type": BlockExportType,
        req "node-name": String,
        req "shutting-down": bool,
    }
}

qapi_object! {
    /// BLOCK_EXPORT_DELETED's data.
    pub BlockExportDeletedEvent {
        req "id": String,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::visitor::{from_value, InputMode};
    use serde_json::json;

    #[test]
    fn test_export_missing_id() {
        let e = from_value::<BlockExportOptions>(
            json!({"type": "nbd", "node-name": "n"}),
            InputMode::Json,
        )
        .unwrap_err();
        assert_eq!(e.desc, "Parameter 'id' is missing");
    }

    #[test]
    fn test_export_keyval_writable_on() {
        let v = json!({"type": "nbd", "id": "e", "node-name": "n", "writable": "on", "bitmaps": ["b0"]});
        let o: BlockExportOptions = from_value(v, InputMode::Keyval).unwrap();
        assert_eq!(o.writable, Some(true));
        assert_eq!(
            o.nbd.unwrap().bitmaps,
            Some(vec![BlockDirtyBitmapOrStr::Local("b0".into())])
        );
    }

    #[test]
    fn test_export_json_writable_string_is_type_error() {
        let v = json!({"type": "nbd", "id": "e", "node-name": "n", "writable": "yes"});
        let e = from_value::<BlockExportOptions>(v, InputMode::Json).unwrap_err();
        assert_eq!(
            e.desc,
            "Invalid parameter type for 'writable', expected: boolean"
        );
    }

    #[test]
    fn test_export_unexpected_member() {
        let v = json!({"type": "nbd", "id": "e", "node-name": "n", "bogus": 1});
        let e = from_value::<BlockExportOptions>(v, InputMode::Json).unwrap_err();
        assert_eq!(e.desc, "Parameter 'bogus' is unexpected");
    }

    #[test]
    fn test_hand_written_readers_accept_every_described_member() {
        use crate::introspect::agreement::check;
        check::<BlockExportOptions>();
        check::<NbdServerOptionsLegacy>();
        check::<BlockDirtyBitmapOrStr>();
    }

    #[test]
    fn test_removal_reads_the_named_key() {
        let v = json!({"name": "e", "mode": "hard"});
        let r = read_removal(v, &Ctx::root(InputMode::Json), "name").unwrap();
        assert_eq!(r, ("e".to_string(), Some(BlockExportRemoveMode::Hard)));
        let e = read_removal(json!({}), &Ctx::root(InputMode::Json), "id").unwrap_err();
        assert_eq!(e.desc, "Parameter 'id' is missing");
    }

    #[test]
    fn test_server_options_legacy_inet() {
        let v = json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "10809"}}});
        let o = NbdServerOptions::read(v, &Ctx::root(InputMode::Json), true).unwrap();
        assert!(matches!(o.addr, SocketAddress::Inet(ref i) if i.port == "10809"));
    }
}
