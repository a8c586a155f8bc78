//! `nbd-server-start` / `--nbd-server`: where and how the NBD server listens.

use std::path::PathBuf;
use std::time::Duration;

/// The server-wide budget of bytes pinned by requests in flight, when the
/// user names none: 1 GiB (see `nbd_server/budget.rs` for what it bounds).
pub const DEFAULT_PAYLOAD_BUDGET: u64 = 1 << 30;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp {
        host: String,
        port: String,
        inet: InetOptions,
    },
    Unix {
        path: PathBuf,
    },
    /// A Linux abstract-namespace unix socket (`abstract=on`): no file;
    /// `tight` (QEMU's default) gives the address length without the
    /// trailing zeroes of `sun_path`.
    UnixAbstract {
        name: String,
        tight: bool,
    },
    /// An already listening socket: a descriptor number, or a name given
    /// to one with `getfd` (resolved, and checked, when the server starts).
    Fd {
        fd: String,
    },
}

impl ListenAddr {
    /// The address in NBD URI form, for messages (`bexd serve` prints it).
    pub fn uri(&self, export_name: &str) -> String {
        match self {
            Self::Tcp { host, port, .. } if host.contains(':') => {
                format!("nbd://[{host}]:{port}/{export_name}")
            }
            Self::Tcp { host, port, .. } => format!("nbd://{host}:{port}/{export_name}"),
            Self::Unix { path } => {
                format!("nbd+unix:///{export_name}?socket={}", path.display())
            }
            Self::UnixAbstract { name, .. } => {
                format!("nbd+unix:///{export_name}?socket=@{name}")
            }
            Self::Fd { fd } => format!("fd:{fd}"),
        }
    }
}

/// QEMU's InetSocketAddress members beyond host and port, for listening.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InetOptions {
    /// `numeric`: the host must be an address literal (no name lookup).
    pub numeric: bool,
    /// `to`: the last port of a range; the first free port from `port` on is taken.
    pub to: Option<u16>,
    /// The address family (`ipv4`/`ipv6`); `None` takes both.
    pub family: Option<Family>,
    /// `keep-alive`: SO_KEEPALIVE on every accepted connection.
    pub keep_alive: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// QEMU's family rule: both off is an error, `ipv6=on` or `ipv4=off` means
/// IPv6 only, `ipv4=on` or `ipv6=off` IPv4 only, both on (or neither) any.
pub fn inet_family(ipv4: Option<bool>, ipv6: Option<bool>) -> Result<Option<Family>, String> {
    match (ipv4, ipv6) {
        (Some(false), Some(false)) => Err("Cannot disable IPv4 and IPv6 at same time".into()),
        (Some(true), Some(true)) | (None, None) => Ok(None),
        (_, Some(true)) | (Some(false), _) => Ok(Some(Family::V6)),
        (Some(true), _) | (_, Some(false)) => Ok(Some(Family::V4)),
    }
}

/// `nbd-server-start` / `--nbd-server` options, with QEMU's defaults applied.
#[derive(Clone, Debug)]
pub struct NbdServerConfig {
    pub addr: ListenAddr,
    /// The id of the `tls-creds-*` object; the daemon resolves it when the server starts.
    pub tls_creds: Option<String>,
    /// Looked up at each connection; a missing object denies.
    pub tls_authz: Option<String>,
    /// 0 means unlimited. QEMU's default is 100.
    pub max_connections: u32,
    /// Clients that have not finished the handshake by then are dropped; `None` = no limit.
    pub handshake_max: Option<Duration>,
    /// `x-payload-budget` (bexd's own member: QEMU has no such bound): bytes
    /// all connections together may pin in requests in flight.
    pub payload_budget: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_family_rules_are_qemus() {
        assert!(inet_family(Some(false), Some(false)).is_err());
        assert_eq!(inet_family(None, None), Ok(None));
        assert_eq!(inet_family(Some(true), Some(true)), Ok(None));
        assert_eq!(inet_family(None, Some(true)), Ok(Some(Family::V6)));
        assert_eq!(inet_family(Some(false), None), Ok(Some(Family::V6)));
        assert_eq!(inet_family(Some(true), None), Ok(Some(Family::V4)));
        assert_eq!(inet_family(None, Some(false)), Ok(Some(Family::V4)));
    }
}
