//! `--chardev socket,...`: where a QMP monitor listens.

use std::path::PathBuf;

/// A socket chardev as `--chardev socket,...` describes it.
#[derive(Clone, Debug)]
pub struct ChardevConfig {
    pub id: String,
    pub addr: ChardevAddr,
}

#[derive(Clone, Debug)]
pub enum ChardevAddr {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}
