//! NBD URIs as qemu and libnbd write them: `nbd://HOST[:PORT]/EXPORT` and
//! `nbd+unix:///EXPORT?socket=PATH`; server addresses as `bexd backup --live`
//! takes them (`unix:PATH`, `PATH`, `HOST:PORT`); and what a connection
//! needs besides the address, its TLS.

use std::path::PathBuf;
use std::sync::Arc;

use nbd_client::TlsConnect;

use super::error::BackupError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Unix {
        socket: PathBuf,
        export: String,
    },
    Tcp {
        host: String,
        port: u16,
        export: String,
    },
}

impl Target {
    pub fn export(&self) -> &str {
        match self {
            Self::Unix { export, .. } | Self::Tcp { export, .. } => export,
        }
    }
}

/// Where to connect and how: the address and export, and the TLS upgrade
/// (STARTTLS before anything else) when credentials were given.
#[derive(Clone)]
pub struct Source {
    pub target: Target,
    pub tls: Option<Arc<dyn TlsConnect>>,
}

/// A server address: `unix:PATH`, a path (it has a `/`), or `HOST:PORT`
/// (`[V6]:PORT` too); `export` is the export's name on it.
pub fn parse_addr(addr: &str, export: &str) -> Result<Target, BackupError> {
    let bad = || {
        BackupError::Usage(format!(
            "cannot parse address '{addr}' (unix:PATH, PATH or HOST:PORT)"
        ))
    };
    if let Some(path) = addr.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(bad());
        }
        return Ok(Target::Unix {
            socket: PathBuf::from(path),
            export: export.to_string(),
        });
    }
    if addr.contains('/') {
        return Ok(Target::Unix {
            socket: PathBuf::from(addr),
            export: export.to_string(),
        });
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Target::Tcp {
        host: host.to_string(),
        port,
        export: export.to_string(),
    })
}

pub fn parse(uri: &str) -> Result<Target, BackupError> {
    let bad = || BackupError::Usage(format!("cannot parse NBD URI '{uri}'"));
    if let Some(rest) = uri.strip_prefix("nbd+unix://") {
        let (path, query) = rest.split_once('?').ok_or_else(bad)?;
        let export = path.strip_prefix('/').unwrap_or(path).to_string();
        let socket = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("socket="))
            .ok_or_else(bad)?;
        return Ok(Target::Unix {
            socket: PathBuf::from(socket),
            export,
        });
    }
    let rest = uri.strip_prefix("nbd://").ok_or_else(bad)?;
    let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| bad())?),
        None => (authority, 10809),
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Target::Tcp {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
        export: export.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_unix_uri() {
        let t = parse("nbd+unix:///disk0?socket=/run/n.sock").unwrap();
        assert_eq!(
            t,
            Target::Unix {
                socket: "/run/n.sock".into(),
                export: "disk0".into()
            }
        );
    }

    #[test]
    fn test_tcp_uri_default_port_and_empty_export() {
        let t = parse("nbd://example.org").unwrap();
        assert_eq!(
            t,
            Target::Tcp {
                host: "example.org".into(),
                port: 10809,
                export: String::new()
            }
        );
        let t = parse("nbd://127.0.0.1:10810/d").unwrap();
        assert_eq!(
            t,
            Target::Tcp {
                host: "127.0.0.1".into(),
                port: 10810,
                export: "d".into()
            }
        );
    }

    #[test]
    fn test_addresses() {
        assert_eq!(
            parse_addr("unix:/run/n.sock", "e").unwrap(),
            Target::Unix {
                socket: "/run/n.sock".into(),
                export: "e".into()
            }
        );
        assert_eq!(
            parse_addr("./n.sock", "e").unwrap(),
            Target::Unix {
                socket: "./n.sock".into(),
                export: "e".into()
            }
        );
        assert_eq!(
            parse_addr("[::1]:10809", "e").unwrap(),
            Target::Tcp {
                host: "::1".into(),
                port: 10809,
                export: "e".into()
            }
        );
        for a in ["unix:", "host", "host:port", ":10809"] {
            assert!(parse_addr(a, "e").is_err(), "{a}");
        }
    }

    #[test]
    fn test_bad_uris_are_errors() {
        for u in ["http://x/", "nbd+unix:///d", "nbd://:1/d", "nbd://h:port/d"] {
            assert!(parse(u).is_err(), "{u}");
        }
    }
}
