//! SocketAddress (flat union) and SocketAddressLegacy (the `data`-wrapped form).

use serde_json::Value;

use crate::visitor::{Ctx, Fields, FromQapi};
use crate::{qapi_enum, QmpError};

qapi_enum!(SocketAddressType { Inet = "inet", Unix = "unix", Vsock = "vsock", Fd = "fd" });

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InetSocketAddress {
    pub host: String,
    pub port: String,
    pub numeric: Option<bool>,
    pub to: Option<u16>,
    pub ipv4: Option<bool>,
    pub ipv6: Option<bool>,
    pub keep_alive: Option<bool>,
    pub mptcp: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixSocketAddress {
    pub path: String,
    pub r#abstract: Option<bool>,
    pub tight: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketAddress {
    Inet(InetSocketAddress),
    Unix(UnixSocketAddress),
    Vsock { cid: String, port: String },
    Fd { str: String },
}

fn inet_members(f: &mut Fields) -> Result<InetSocketAddress, QmpError> {
    Ok(InetSocketAddress {
        numeric: f.optional("numeric")?,
        host: f.required("host")?,
        port: f.required("port")?,
        to: f.optional("to")?,
        ipv4: f.optional("ipv4")?,
        ipv6: f.optional("ipv6")?,
        keep_alive: f.optional("keep-alive")?,
        mptcp: f.optional("mptcp")?,
    })
}

fn unix_members(f: &mut Fields) -> Result<UnixSocketAddress, QmpError> {
    Ok(UnixSocketAddress {
        path: f.required("path")?,
        r#abstract: f.optional("abstract")?,
        tight: f.optional("tight")?,
    })
}

/// Reads the members of one variant from `f` (the discriminator already consumed).
fn variant(kind: SocketAddressType, f: &mut Fields) -> Result<SocketAddress, QmpError> {
    Ok(match kind {
        SocketAddressType::Inet => SocketAddress::Inet(inet_members(f)?),
        SocketAddressType::Unix => SocketAddress::Unix(unix_members(f)?),
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
    fn test_bad_type_is_refused() {
        let e =
            from_value::<SocketAddress>(json!({"type": "bogus"}), InputMode::Keyval).unwrap_err();
        assert_eq!(e.desc, "Parameter 'type' does not accept value 'bogus'");
    }
}
