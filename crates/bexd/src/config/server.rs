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
    },
    Unix {
        path: PathBuf,
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
            Self::Tcp { host, port } if host.contains(':') => {
                format!("nbd://[{host}]:{port}/{export_name}")
            }
            Self::Tcp { host, port } => format!("nbd://{host}:{port}/{export_name}"),
            Self::Unix { path } => {
                format!("nbd+unix:///{export_name}?socket={}", path.display())
            }
            Self::Fd { fd } => format!("fd:{fd}"),
        }
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
