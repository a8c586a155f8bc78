//! `--chardev stdio|socket,...`: where a QMP monitor talks.

use std::path::PathBuf;
use std::time::Duration;

/// A chardev as `--chardev` describes it.
#[derive(Clone, Debug)]
pub struct ChardevConfig {
    pub id: String,
    pub backend: ChardevBackend,
}

#[derive(Clone, Debug)]
pub enum ChardevBackend {
    /// The process's stdin and stdout (one chardev at most, as in QEMU).
    Stdio,
    Socket(SocketChardev),
}

/// A socket chardev: it listens (`server=on`) or connects out (`server=off`).
#[derive(Clone, Debug)]
pub struct SocketChardev {
    pub addr: ChardevAddr,
    pub server: bool,
    /// Client mode only: how long to wait between connection attempts; with
    /// `None` a failed first connect is an error and a lost peer stays lost.
    pub reconnect: Option<Duration>,
}

#[derive(Clone, Debug)]
pub enum ChardevAddr {
    Unix(PathBuf),
    Tcp {
        host: String,
        port: u16,
    },
    /// An inherited listening socket (`fd=N`), checked when the monitor starts.
    Fd(String),
}
