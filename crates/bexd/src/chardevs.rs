//! The chardev table: every `--chardev` by id, with what `query-chardev`
//! reports of it (its address as QEMU prints it, and whether a monitor uses
//! it). Monitors update the state as peers come and go.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::config::{ChardevAddr, ChardevBackend, ChardevConfig};
use crate::error::ChardevError;
use crate::net::{ClientStream, Listener};

/// A socket chardev once opened (at `--chardev`, as QEMU opens it): what the
/// monitor that takes it serves on.
#[derive(Debug)]
pub enum Opened {
    /// Bound and listening; the socket file to remove when it closes.
    Listening(Listener, Option<std::path::PathBuf>),
    /// Client mode: the connection, or `None` while reconnecting.
    Connecting(Option<ClientStream>),
}

/// One chardev and its live state.
#[derive(Debug)]
pub struct Chardev {
    pub config: ChardevConfig,
    /// Every update replaces whole fields, so a poisoned lock still guards a
    /// consistent value and is used as is.
    state: Mutex<State>,
    /// Set when the socket is opened, taken by the monitor that uses it.
    opened: Mutex<Option<Opened>>,
}

#[derive(Debug)]
struct State {
    /// QEMU's `filename`: `disconnected:ADDR` while no peer is connected.
    filename: String,
    /// A monitor (QEMU's frontend) is attached.
    frontend_open: bool,
}

impl Chardev {
    fn new(config: ChardevConfig) -> Self {
        let filename = match &config.backend {
            ChardevBackend::Stdio => "stdio".to_string(),
            ChardevBackend::Socket(s) => disconnected(&addr_text(&s.addr), s.server),
        };
        Self {
            config,
            state: Mutex::new(State {
                filename,
                frontend_open: false,
            }),
            opened: Mutex::new(None),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// The chardev's `filename` now.
    pub fn set_filename(&self, filename: String) {
        self.state().filename = filename;
    }

    /// The socket, once opened: kept until a monitor takes it.
    pub fn set_opened(&self, opened: Opened) {
        *self.opened.lock().unwrap_or_else(|e| e.into_inner()) = Some(opened);
    }

    pub fn take_opened(&self) -> Option<Opened> {
        self.opened.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// A monitor takes the chardev; QEMU refuses a second frontend.
    pub fn attach_frontend(&self) -> Result<(), ChardevError> {
        let mut state = self.state();
        if state.frontend_open {
            return Err(ChardevError::InUse(self.config.id.clone()));
        }
        state.frontend_open = true;
        Ok(())
    }

    /// `query-chardev`'s entry: QEMU's ChardevInfo.
    pub fn info(&self) -> serde_json::Value {
        let state = self.state();
        serde_json::json!({
            "label": self.config.id,
            "filename": state.filename,
            "frontend-open": state.frontend_open,
        })
    }
}

/// `disconnected:ADDR` (`,server=on` for a listening socket), as QEMU prints
/// a socket chardev with no peer.
pub fn disconnected(addr: &str, server: bool) -> String {
    format!("disconnected:{addr}{}", server_suffix(server))
}

pub fn server_suffix(server: bool) -> &'static str {
    if server {
        ",server=on"
    } else {
        ""
    }
}

/// The configured address in QEMU's `SocketAddress` text form.
pub fn addr_text(addr: &ChardevAddr) -> String {
    match addr {
        ChardevAddr::Unix(path) => format!("unix:{}", path.display()),
        ChardevAddr::Tcp { host, port } => format!("tcp:{host}:{port}"),
        ChardevAddr::Fd(fd) => format!("fd:{fd}"),
    }
}

/// The chardevs by id.
#[derive(Debug, Default)]
pub struct ChardevTable {
    map: Mutex<BTreeMap<String, Arc<Chardev>>>,
}

impl ChardevTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// `--chardev`: ids are unique, and only one chardev may use stdio.
    pub fn add(&self, config: ChardevConfig) -> Result<Arc<Chardev>, ChardevError> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(&config.id) {
            return Err(ChardevError::Duplicate(config.id));
        }
        let stdio = |c: &ChardevConfig| matches!(c.backend, ChardevBackend::Stdio);
        if stdio(&config) && map.values().any(|c| stdio(&c.config)) {
            return Err(ChardevError::StdioTaken);
        }
        let chardev = Arc::new(Chardev::new(config));
        map.insert(chardev.config.id.clone(), chardev.clone());
        Ok(chardev)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Chardev>> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(id).cloned()
    }

    /// `query-chardev`.
    pub fn infos(&self) -> Vec<serde_json::Value> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.values().map(|c| c.info()).collect()
    }
}
