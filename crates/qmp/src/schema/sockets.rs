//! SocketAddress (flat union) and SocketAddressLegacy (the `data`-wrapped form).

use serde_json::Value;

use crate::introspect::{describe, named, req, str, Describe, Schema, Ty};
use crate::visitor::{Ctx, Fields, FromQapi};
use crate::{qapi_enum, qapi_struct, QmpError};

qapi_enum!(SocketAddressType { Inet = "inet", Unix = "unix", Vsock = "vsock", Fd = "fd" });

qapi_struct! {
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct InetSocketAddress {
        opt "numeric" numeric: bool,
        req "host" host: String,
        req "port" port: String,
        opt "to" to: u16,
        opt "ipv4" ipv4: bool,
        opt "ipv6" ipv6: bool,
        opt "keep-alive" keep_alive: bool,
        opt "mptcp" mptcp: bool,
    }
}

qapi_struct! {
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct UnixSocketAddress {
        req "path" path: String,
        opt "abstract" r#abstract: bool,
        opt "tight" tight: bool,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketAddress {
    Inet(InetSocketAddress),
    Unix(UnixSocketAddress),
    Vsock { cid: String, port: String },
    Fd { str: String },
}

/// Reads the members of one variant from `f` (the discriminator already consumed).
fn variant(kind: SocketAddressType, f: &mut Fields) -> Result<SocketAddress, QmpError> {
    Ok(match kind {
        SocketAddressType::Inet => SocketAddress::Inet(InetSocketAddress::read_members(f)?),
        SocketAddressType::Unix => SocketAddress::Unix(UnixSocketAddress::read_members(f)?),
        SocketAddressType::Vsock => SocketAddress::Vsock {
            cid: f.required("cid")?,
            port: f.required("port")?,
        },
        SocketAddressType::Fd => SocketAddress::Fd {
            str: f.required("str")?,
        },
    })
}

impl FromQapi for SocketAddress {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        let mut f = Fields::new(value, ctx)?;
        let kind: SocketAddressType = f.required("type")?;
        let addr = variant(kind, &mut f)?;
        f.finish()?;
        Ok(addr)
    }
}

/// The flat union (`blockdev-add`'s nbd `server`, vhost-user-blk's `addr`):
/// the branch's members beside `type`.
impl Describe for SocketAddress {
    fn ty() -> Ty {
        named("SocketAddress")
    }
    fn define(s: &mut Schema) {
        let kind = describe::<SocketAddressType>(s);
        let inet = describe::<InetSocketAddress>(s);
        let unix = describe::<UnixSocketAddress>(s);
        s.object(
            "VsockSocketAddress",
            vec![req("cid", str()), req("port", str())],
        );
        s.object("FdSocketAddress", vec![req("str", str())]);
        let variants = vec![
            ("inet", inet),
            ("unix", unix),
            ("vsock", named("VsockSocketAddress")),
            ("fd", named("FdSocketAddress")),
        ];
        s.union("SocketAddress", vec![req("type", kind)], "type", variants);
    }
}

/// `{"type": "unix", "data": {"path": ...}}`, as `nbd-server-start` takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketAddressLegacy(pub SocketAddress);

impl FromQapi for SocketAddressLegacy {
    fn from_qapi(value: Value, ctx: &Ctx) -> Result<Self, QmpError> {
        let mut f = Fields::new(value, ctx)?;
        let kind: SocketAddressType = f.required("type")?;
        let data: Value = f.required("data")?;
        f.finish()?;
        let mut inner = Fields::new(data, &ctx.member("data"))?;
        let addr = variant(kind, &mut inner)?;
        inner.finish()?;
        Ok(Self(addr))
    }
}

/// The legacy union: each branch wraps its address in `data`.
impl Describe for SocketAddressLegacy {
    fn ty() -> Ty {
        named("SocketAddressLegacy")
    }
    fn define(s: &mut Schema) {
        let kind = describe::<SocketAddressType>(s);
        let inet = describe::<InetSocketAddress>(s);
        let unix = describe::<UnixSocketAddress>(s);
        s.object(
            "VsockSocketAddress",
            vec![req("cid", str()), req("port", str())],
        );
        s.object("FdSocketAddress", vec![req("str", str())]);
        let mut wrapper = |key: &'static str, data: Ty| {
            s.object(key, vec![req("data", data)]);
            named(key)
        };
        let variants = vec![
            ("inet", wrapper("InetSocketAddressWrapper", inet)),
            ("unix", wrapper("UnixSocketAddressWrapper", unix)),
            (
                "vsock",
                wrapper("VsockSocketAddressWrapper", named("VsockSocketAddress")),
            ),
            (
                "fd",
                wrapper("FdSocketAddressWrapper", named("FdSocketAddress")),
            ),
        ];
        s.union(
            "SocketAddressLegacy",
            vec![req("type", kind)],
            "type",
            variants,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::visitor::{from_value, InputMode};
    use serde_json::json;

    #[test]
    fn test_flat_unix_address() {
        let a: SocketAddress =
            from_value(json!({"type": "unix", "path": "/s"}), InputMode::Json).unwrap();
        assert!(matches!(a, SocketAddress::Unix(u) if u.path == "/s"));
    }

    #[test]
    fn test_legacy_without_data_is_missing_data() {
        let ctx = Ctx::root(InputMode::Json).member("addr");
        let e = SocketAddressLegacy::from_qapi(json!({"type": "unix"}), &ctx).unwrap_err();
        assert_eq!(e.desc, "Parameter 'addr.data' is missing");
    }

    #[test]
    fn test_legacy_reader_accepts_every_described_member() {
        crate::introspect::agreement::check::<SocketAddressLegacy>();
        crate::introspect::agreement::check::<SocketAddress>();
    }

    #[test]
    fn test_bad_type_is_refused() {
        let e =
            from_value::<SocketAddress>(json!({"type": "bogus"}), InputMode::Keyval).unwrap_err();
        assert_eq!(e.desc, "Parameter 'type' does not accept value 'bogus'");
    }
}
