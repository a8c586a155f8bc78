//! QAPI arguments (crate `qmp`) turned into plain configuration
//! ([`crate::config`]), with QEMU's semantic checks and defaults. This is the
//! one place where wire shapes meet daemon types; both the CLI and QMP come
//! through here. It reads only: it imports nothing of the daemon but `config`.

use std::path::PathBuf;
use std::time::Duration;

use block::drivers::blkdebug::{InjectError, IoType};
use block::drivers::file::{AioMode, LockingMode};
use qmp::schema::block_core::BlockdevDelArgs;
use qmp::schema::block_core::{
    BlkdebugIOType, BlkdebugInjectError, BlockdevAioOptions, BlockdevDiscardOptions,
    BlockdevOptions, BlockdevOptionsQcow2, BlockdevRef, BlockdevRefOrNull, BlockdevSpecific,
    OnOffAuto,
};
use qmp::schema::block_export::{
    read_removal, BlockDirtyBitmapOrStr, BlockExportIothreads, BlockExportOptions,
    BlockExportRemoveMode, BlockExportType, NbdServerAddOptions, NbdServerOptions,
};
use qmp::schema::char::{ChardevOptions, ChardevSocket, MonitorOptions};
use qmp::schema::object::ObjectDelArgs;
use qmp::schema::sockets::SocketAddress;
use qmp::visitor::{from_value, Ctx, InputMode, Size};
use qmp::QmpError;
use serde_json::Value;

use crate::config::{
    is_well_formed_id, BackingSpec, BitmapRef, ChardevAddr, ChardevBackend, ChardevConfig,
    ChildRef, ExportConfig, ExportKindConfig, ListenAddr, NbdExportConfig, NbdServerConfig,
    NodeOptions, NodeSpec, Qcow2Cache, RemoveMode, SocketChardev, DEFAULT_PAYLOAD_BUDGET,
};

// QEMU's limit on export names and descriptions (NBD_MAX_STRING_SIZE) is
// the protocol's string limit.
use nbd::consts::MAX_STRING;

/// null-co's default size.
const NULL_DEFAULT_SIZE: u64 = 1 << 30;

pub fn node_options(value: Value, mode: InputMode) -> Result<NodeOptions, QmpError> {
    convert_node(from_value::<BlockdevOptions>(value, mode)?)
}

fn convert_node(o: BlockdevOptions) -> Result<NodeOptions, QmpError> {
    let base = o.base;
    let cache = base.cache.unwrap_or_default();
    let spec = match o.specific {
        BlockdevSpecific::File(f) => NodeSpec::File {
            filename: PathBuf::from(f.filename),
            aio: match f.aio {
                None | Some(BlockdevAioOptions::Threads) => AioMode::Threads,
                Some(BlockdevAioOptions::Native) => AioMode::Native,
                Some(BlockdevAioOptions::IoUring) => AioMode::IoUring,
            },
            locking: match f.locking {
                None | Some(OnOffAuto::Auto) => LockingMode::Auto,
                Some(OnOffAuto::On) => LockingMode::On,
                Some(OnOffAuto::Off) => LockingMode::Off,
            },
        },
        BlockdevSpecific::Raw { file, offset, size } => NodeSpec::Raw {
            file: child_ref(file)?,
            offset: non_negative(offset.unwrap_or(0), "offset")?,
            size: size.map(|s| non_negative(s, "size")).transpose()?,
        },
        BlockdevSpecific::Null {
            size,
            read_zeroes,
            latency_ns,
        } => NodeSpec::Null {
            latency_ns: latency_ns.unwrap_or(0),
            size: size
                .map(|s| non_negative(s, "size"))
                .transpose()?
                .unwrap_or(NULL_DEFAULT_SIZE),
            read_zeroes: read_zeroes.unwrap_or(false),
        },
        BlockdevSpecific::Blkdebug {
            image,
            inject_error,
        } => NodeSpec::Blkdebug {
            image: child_ref(image)?,
            rules: inject_error
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(i, r)| blkdebug_rule(r, i))
                .collect::<Result<_, _>>()?,
        },
        BlockdevSpecific::Qcow2(q) => qcow2_spec(q)?,
    };
    Ok(NodeOptions {
        node_name: base.node_name,
        read_only: base.read_only.unwrap_or(false),
        auto_read_only: base.auto_read_only.unwrap_or(false),
        discard: base.discard == Some(BlockdevDiscardOptions::Unmap),
        cache_direct: cache.direct.unwrap_or(false),
        cache_no_flush: cache.no_flush.unwrap_or(false),
        spec,
    })
}

fn qcow2_spec(q: BlockdevOptionsQcow2) -> Result<NodeSpec, QmpError> {
    let size = |v: Option<i64>, name: &str| v.map(|v| non_negative(v, name)).transpose();
    Ok(NodeSpec::Qcow2 {
        file: child_ref(q.file)?,
        backing: match q.backing {
            None => BackingSpec::FromHeader,
            Some(BlockdevRefOrNull::Null) => BackingSpec::None,
            Some(BlockdevRefOrNull::Ref(r)) => BackingSpec::Node(child_ref(r)?),
        },
        cache: Qcow2Cache {
            cache_size: size(q.cache_size, "cache-size")?,
            l2_cache_size: size(q.l2_cache_size, "l2-cache-size")?,
            refcount_cache_size: size(q.refcount_cache_size, "refcount-cache-size")?,
            cache_clean_interval: size(q.cache_clean_interval, "cache-clean-interval")?,
        },
        lazy_refcounts: q.lazy_refcounts,
    })
}

/// One blkdebug rule. Rules are always armed (no event state machine), so
/// the event only picks the I/O type when `iotype` is not given.
fn blkdebug_rule(r: BlkdebugInjectError, index: usize) -> Result<InjectError, QmpError> {
    let member = |m: &str| format!("inject-error[{index}].{m}");
    if r.state.is_some_and(|s| s != 1) {
        return Err(QmpError::generic(format!(
            "Parameter '{}': blkdebug states are not supported by bexd",
            member("state")
        )));
    }
    let errno = r.errno.unwrap_or(i64::from(libc::EIO));
    let errno = i32::try_from(errno)
        .ok()
        .filter(|e| (1..4096).contains(e))
        .ok_or_else(|| {
            QmpError::generic(format!(
                "Parameter '{}' expects a positive errno",
                member("errno")
            ))
        })?;
    let sector = match r.sector {
        Some(s) => Some(u64::try_from(s).map_err(|_| {
            QmpError::generic(format!(
                "Parameter '{}' must not be negative",
                member("sector")
            ))
        })?),
        None => None,
    };
    let iotypes = match r.iotype {
        Some(t) => vec![io_type(t)],
        None => event_io_types(&r.event),
    };
    Ok(InjectError {
        iotypes,
        errno,
        sector,
        once: r.once.unwrap_or(false),
        after: r.x_after.unwrap_or(0),
    })
}

fn io_type(t: BlkdebugIOType) -> IoType {
    match t {
        BlkdebugIOType::Read => IoType::Read,
        BlkdebugIOType::Write => IoType::Write,
        BlkdebugIOType::WriteZeroes => IoType::WriteZeroes,
        BlkdebugIOType::Discard => IoType::Discard,
        BlkdebugIOType::Flush => IoType::Flush,
        BlkdebugIOType::BlockStatus => IoType::BlockStatus,
    }
}

/// The I/O a QEMU blkdebug event stands for; other events mean any data I/O.
fn event_io_types(event: &str) -> Vec<IoType> {
    match event {
        "read_aio" | "read_backing_aio" | "read_compressed" => vec![IoType::Read],
        "write_aio" | "pwritev" | "pwritev_rmw_head" | "pwritev_rmw_tail" => vec![IoType::Write],
        "pwritev_zero" => vec![IoType::WriteZeroes],
        "flush_to_os" | "flush_to_disk" => vec![IoType::Flush],
        _ => vec![
            IoType::Read,
            IoType::Write,
            IoType::WriteZeroes,
            IoType::Discard,
            IoType::Flush,
        ],
    }
}

fn child_ref(r: BlockdevRef) -> Result<ChildRef, QmpError> {
    match r {
        BlockdevRef::Reference(name) => Ok(ChildRef::Name(name)),
        BlockdevRef::Definition(o) => convert_node(*o).map(|n| ChildRef::Inline(Box::new(n))),
    }
}

fn non_negative(v: i64, name: &str) -> Result<u64, QmpError> {
    u64::try_from(v).map_err(|_| {
        QmpError::generic(format!(
            "Value '{v}' is out of range for parameter '{name}'"
        ))
    })
}

pub fn nbd_server_config(
    value: Value,
    legacy: bool,
    mode: InputMode,
) -> Result<NbdServerConfig, QmpError> {
    let o = NbdServerOptions::read(value, &Ctx::root(mode), legacy)?;
    let addr = match o.addr {
        SocketAddress::Inet(i) => ListenAddr::Tcp {
            host: i.host,
            port: i.port,
        },
        SocketAddress::Unix(u) => ListenAddr::Unix {
            path: PathBuf::from(u.path),
        },
        SocketAddress::Fd { str } => ListenAddr::Fd { fd: str },
        SocketAddress::Vsock { .. } => {
            return Err(QmpError::generic(
                "vsock addresses are not supported by bexd",
            ))
        }
    };
    Ok(NbdServerConfig {
        addr,
        tls_creds: o.tls_creds,
        tls_authz: o.tls_authz,
        payload_budget: match o.x_payload_budget {
            None => DEFAULT_PAYLOAD_BUDGET,
            Some(Size(0)) => {
                return Err(QmpError::generic(
                    "Parameter 'x-payload-budget' must be a positive size",
                ))
            }
            Some(Size(bytes)) => bytes,
        },
        max_connections: o.max_connections.unwrap_or(100),
        handshake_max: match o.handshake_max_seconds.unwrap_or(10) {
            0 => None,
            s => Some(Duration::from_secs(u64::from(s))),
        },
    })
}

/// block-export-add / --export.
pub fn export_config(value: Value, mode: InputMode) -> Result<ExportConfig, QmpError> {
    let o: BlockExportOptions = from_value(value, mode)?;
    if o.r#type != BlockExportType::Nbd {
        return Err(QmpError::generic(format!(
            "Export type '{}' is not supported by bexd (only 'nbd')",
            o.r#type.as_str()
        )));
    }
    if !is_well_formed_id(&o.id) {
        return Err(QmpError::generic("Invalid block export id"));
    }
    match &o.iothread {
        Some(BlockExportIothreads::Multi(_)) => {
            return Err(QmpError::generic(
                "NBD export does not support multi-threading",
            ))
        }
        Some(BlockExportIothreads::Single(_)) | None => {}
    }
    let iothread = match o.iothread {
        Some(BlockExportIothreads::Single(name)) => Some(name),
        _ => None,
    };
    let nbd = o.nbd.unwrap_or_default();
    let bitmaps = nbd
        .bitmaps
        .unwrap_or_default()
        .into_iter()
        .map(|b| match b {
            BlockDirtyBitmapOrStr::Local(name) => BitmapRef::Local(name),
            BlockDirtyBitmapOrStr::External { node, name } => BitmapRef::External { node, name },
        })
        .collect();
    let nbd = checked_nbd(
        nbd.name.unwrap_or_else(|| o.node_name.clone()),
        nbd.description,
        nbd.allocation_depth.unwrap_or(false),
        bitmaps,
    )?;
    Ok(ExportConfig {
        id: o.id,
        node_name: o.node_name,
        writable: o.writable.unwrap_or(false),
        writethrough: o.writethrough.unwrap_or(false),
        iothread,
        kind: ExportKindConfig::Nbd(nbd),
    })
}

/// nbd-server-add: the export's id is its name, which defaults to the device.
pub fn nbd_server_add_config(value: Value) -> Result<ExportConfig, QmpError> {
    let o: NbdServerAddOptions = from_value(value, InputMode::Json)?;
    let name = o.name.unwrap_or_else(|| o.device.clone());
    let bitmaps = o.bitmap.into_iter().map(BitmapRef::Local).collect();
    let nbd = checked_nbd(name.clone(), o.description, false, bitmaps)?;
    Ok(ExportConfig {
        id: name,
        node_name: o.device,
        writable: o.writable.unwrap_or(false),
        writethrough: false,
        iothread: None,
        kind: ExportKindConfig::Nbd(nbd),
    })
}

/// The NBD part, with QEMU's length limits on the name and description.
fn checked_nbd(
    name: String,
    description: Option<String>,
    allocation_depth: bool,
    bitmaps: Vec<BitmapRef>,
) -> Result<NbdExportConfig, QmpError> {
    if name.len() > MAX_STRING {
        return Err(QmpError::generic(format!("export name '{name}' too long")));
    }
    if let Some(d) = description.as_ref().filter(|d| d.len() > MAX_STRING) {
        return Err(QmpError::generic(format!("description '{d}' too long")));
    }
    Ok(NbdExportConfig {
        name,
        description,
        allocation_depth,
        bitmaps,
    })
}

/// block-export-del (`key` = "id") and nbd-server-remove (`key` = "name").
pub fn export_removal(value: Value, key: &str) -> Result<(String, RemoveMode), QmpError> {
    let (id, mode) = read_removal(value, &Ctx::root(InputMode::Json), key)?;
    let mode = match mode {
        None | Some(BlockExportRemoveMode::Safe) => RemoveMode::Safe,
        Some(BlockExportRemoveMode::Hard) => RemoveMode::Hard,
    };
    Ok((id, mode))
}

/// object-del's single argument.
pub fn object_id_arg(value: Value) -> Result<String, QmpError> {
    Ok(from_value::<ObjectDelArgs>(value, InputMode::Json)?.id)
}

/// blockdev-del's single argument.
pub fn node_name_arg(value: Value) -> Result<String, QmpError> {
    Ok(from_value::<BlockdevDelArgs>(value, InputMode::Json)?.node_name)
}

/// `--chardev stdio|socket,...` (keyval only, as in qemu-storage-daemon).
pub fn chardev_config(value: Value) -> Result<ChardevConfig, QmpError> {
    let c = match from_value::<ChardevOptions>(value, InputMode::Keyval)? {
        ChardevOptions::Stdio { id, signal } => {
            // bexd never puts the terminal in raw mode, so ^C always signals:
            // signal=off (^C as input) cannot be honoured.
            if signal == Some(false) {
                return Err(QmpError::generic(
                    "Parameter 'signal': signal=off is not supported by bexd",
                ));
            }
            return Ok(ChardevConfig {
                id,
                backend: ChardevBackend::Stdio,
            });
        }
        ChardevOptions::Socket(c) => c,
    };
    let server = c.server.unwrap_or(true);
    let reconnect = socket_reconnect(&c, server)?;
    let addr = match (c.path, c.host, c.port, c.fd) {
        (Some(path), None, None, None) => ChardevAddr::Unix(PathBuf::from(path)),
        (None, host, Some(port), None) => ChardevAddr::Tcp {
            host: host.unwrap_or_else(|| "0.0.0.0".into()),
            port: port.parse().map_err(|_| {
                QmpError::generic(format!(
                    "Parameter 'port' expects a port number, got '{port}'"
                ))
            })?,
        },
        (None, None, None, Some(fd)) if server => ChardevAddr::Fd(fd),
        (None, None, None, Some(_)) => {
            return Err(QmpError::generic(
                "Parameter 'fd': bexd takes only a listening socket (server=on)",
            ))
        }
        (None, None, None, None) => {
            return Err(QmpError::generic(
                "chardev: socket needs either 'path', 'fd', or 'host' and 'port'",
            ))
        }
        _ => {
            return Err(QmpError::generic(
                "None or one of 'path', 'fd' or 'host' option required.",
            ))
        }
    };
    Ok(ChardevConfig {
        id: c.id,
        backend: ChardevBackend::Socket(SocketChardev {
            addr,
            server,
            reconnect,
        }),
    })
}

/// `reconnect` (seconds) or `reconnect-ms`, with QEMU's checks; 0 or less
/// means no reconnecting, as in QEMU.
fn socket_reconnect(c: &ChardevSocket, server: bool) -> Result<Option<Duration>, QmpError> {
    if server {
        // QEMU checks only `reconnect` here and then ignores `reconnect-ms`
        // on a listening socket; bexd refuses both rather than ignore one.
        for (name, given) in [
            ("reconnect", c.reconnect.is_some()),
            ("reconnect-ms", c.reconnect_ms.is_some()),
        ] {
            if given {
                return Err(QmpError::generic(format!(
                    "'{name}' option is incompatible with socket in server listen mode"
                )));
            }
        }
        return Ok(None);
    }
    if c.wait.is_some() {
        return Err(QmpError::generic(
            "'wait' option is incompatible with socket in client connect mode",
        ));
    }
    let ms = match (c.reconnect, c.reconnect_ms) {
        (Some(_), Some(_)) => {
            return Err(QmpError::generic(
                "'reconnect' and 'reconnect-ms' are mutually exclusive",
            ))
        }
        (Some(s), None) => s.saturating_mul(1000),
        (None, Some(ms)) => ms,
        (None, None) => 0,
    };
    Ok(u64::try_from(ms)
        .ok()
        .filter(|&ms| ms > 0)
        .map(Duration::from_millis))
}

/// `--monitor`: the chardev it runs on (only QMP monitors exist in a storage daemon).
pub fn monitor_chardev(value: Value, mode: InputMode) -> Result<String, QmpError> {
    let m: MonitorOptions = from_value(value, mode)?;
    if m.mode == Some(qmp::schema::char::MonitorMode::Readline) {
        return Err(QmpError::generic("Only QMP is supported"));
    }
    Ok(m.chardev)
}

#[cfg(test)]
mod chardev_tests {
    use super::*;

    fn chardev(s: &str) -> Result<ChardevConfig, String> {
        let v = qmp::keyval::parse_keyval(s, Some("backend")).map_err(|e| e.to_string())?;
        chardev_config(v).map_err(|e| e.desc)
    }

    fn socket(s: &str) -> SocketChardev {
        match chardev(s).expect("accepted").backend {
            ChardevBackend::Socket(s) => s,
            ChardevBackend::Stdio => panic!("not a socket"),
        }
    }

    #[test]
    fn test_chardev_stdio_is_accepted_and_signal_off_refused() {
        let c = chardev("stdio,id=m0").expect("stdio");
        assert!(matches!(c.backend, ChardevBackend::Stdio));
        assert!(chardev("stdio,id=m0,signal=on").is_ok());
        assert!(chardev("stdio,id=m0,signal=off")
            .expect_err("refused")
            .contains("'signal'"));
    }

    #[test]
    fn test_chardev_unknown_backend_has_qemus_text() {
        assert_eq!(
            chardev("bogus,id=c").err().as_deref(),
            Some("'bogus' is not a valid char driver name")
        );
    }

    #[test]
    fn test_chardev_client_mode_reconnect_in_seconds_or_ms() {
        let s = socket("socket,id=c,path=/s,server=off,reconnect=2");
        assert!(!s.server);
        assert_eq!(s.reconnect, Some(Duration::from_secs(2)));
        let s = socket("socket,id=c,host=h,port=1,server=off,reconnect-ms=250");
        assert_eq!(s.reconnect, Some(Duration::from_millis(250)));
        let s = socket("socket,id=c,path=/s,server=off,reconnect=-1");
        assert_eq!(s.reconnect, None);
    }

    #[test]
    fn test_chardev_socket_option_clashes_have_qemus_texts() {
        let err = |s| chardev(s).expect_err("refused");
        assert_eq!(
            err("socket,id=c,path=/s,server=off,reconnect=1,reconnect-ms=5"),
            "'reconnect' and 'reconnect-ms' are mutually exclusive"
        );
        assert_eq!(
            err("socket,id=c,path=/s,server=off,wait=off"),
            "'wait' option is incompatible with socket in client connect mode"
        );
        assert_eq!(
            err("socket,id=c,path=/s,server=on,wait=off,reconnect=1"),
            "'reconnect' option is incompatible with socket in server listen mode"
        );
        assert_eq!(
            err("socket,id=c,path=/s,fd=3,server=on,wait=off"),
            "None or one of 'path', 'fd' or 'host' option required."
        );
    }

    #[test]
    fn test_chardev_fd_is_a_listening_socket_by_number() {
        let s = socket("socket,id=c,fd=3,server=on,wait=off");
        assert!(matches!(s.addr, ChardevAddr::Fd(ref n) if n == "3"));
    }
}
