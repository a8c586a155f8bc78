//! QAPI arguments (crate `qmp`) turned into plain configuration
//! ([`crate::config`]), with QEMU's semantic checks and defaults. This is the
//! one place where wire shapes meet daemon types; both the CLI and QMP come
//! through here. It reads only: it imports nothing of the daemon but `config`.

use std::path::PathBuf;
use std::time::Duration;

use block::drivers::blkdebug::{BlkdebugOptions, InjectError, IoType, Limits, SetState};
use block::drivers::cbw::OnCbwError as CbwOnError;
use block::drivers::file::{AioMode, LockingMode};
use block::{DebugEvent, DetectZeroes};
use qmp::schema::block_core::BlockdevDelArgs;
use qmp::schema::block_core::{
    BlkdebugEvent, BlkdebugIOType, BlkdebugInjectError, BlkdebugSetState, BlockdevAioOptions,
    BlockdevDetectZeroesOptions, BlockdevDiscardOptions, BlockdevOptions, BlockdevOptionsBlkdebug,
    BlockdevOptionsNbd, BlockdevOptionsQcow2, BlockdevOptionsRbd, BlockdevRef, BlockdevRefOrNull,
    BlockdevSpecific, OnCbwError, OnOffAuto,
};
use qmp::schema::block_export::{
    read_removal, BlockDirtyBitmapOrStr, BlockExportIothreads, BlockExportOptions,
    BlockExportOptionsFuse, BlockExportOptionsNbd, BlockExportOptionsVhostUserBlk,
    BlockExportRemoveMode, BlockExportType, FuseExportAllowOther, NbdServerAddOptions,
    NbdServerOptions,
};
use qmp::schema::char::{ChardevOptions, ChardevSocket, MonitorOptions};
use qmp::schema::object::ObjectDelArgs;
use qmp::schema::sockets::{InetSocketAddress, SocketAddress};
use qmp::visitor::{from_value, Ctx, InputMode, Size};
use qmp::QmpError;
use serde_json::Value;

use crate::config::{
    is_well_formed_id, AllowOther, BackingSpec, BitmapRef, CbwSpec, ChardevAddr, ChardevBackend,
    ChardevConfig, ChildRef, ExportConfig, ExportKindConfig, FuseExportConfig, InetOptions,
    ListenAddr, NbdClientSpec, NbdExportConfig, NbdServerConfig, NodeOptions, NodeSpec, Qcow2Cache,
    RemoveMode, SocketChardev, VhostUserBlkExportConfig, DEFAULT_PAYLOAD_BUDGET,
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
        BlockdevSpecific::Blkdebug(b) => blkdebug_spec(b)?,
        BlockdevSpecific::Nbd(n) => NodeSpec::Nbd(nbd_client_spec(n)?),
        BlockdevSpecific::Qcow2(q) => {
            qcow2_spec(q, base.discard == Some(BlockdevDiscardOptions::Unmap))?
        }
        BlockdevSpecific::Rbd(r) => rbd_spec(r, cache.direct.unwrap_or(false))?,
        BlockdevSpecific::Throttle {
            throttle_group,
            file,
        } => NodeSpec::Throttle {
            file: child_ref(file)?,
            group: throttle_group,
        },
        BlockdevSpecific::CopyBeforeWrite(c) => NodeSpec::CopyBeforeWrite(CbwSpec {
            file: child_ref(c.file)?,
            target: child_ref(c.target)?,
            bitmap: c.bitmap.map(|b| (b.node, b.name)),
            on_error: match c.on_cbw_error {
                None | Some(OnCbwError::BreakGuestWrite) => CbwOnError::BreakGuestWrite,
                Some(OnCbwError::BreakSnapshot) => CbwOnError::BreakSnapshot,
            },
            timeout_secs: c.cbw_timeout.unwrap_or(0),
            min_cluster_size: c.min_cluster_size.map_or(0, |s| s.0),
        }),
        BlockdevSpecific::SnapshotAccess { file } => NodeSpec::SnapshotAccess {
            file: child_ref(file)?,
        },
    };
    let read_only = base.read_only.unwrap_or(false);
    let discard = base.discard == Some(BlockdevDiscardOptions::Unmap);
    let force_share = base.force_share.unwrap_or(false);
    if force_share && !read_only {
        return Err(QmpError::generic(
            "force-share=on can only be used with read-only images",
        ));
    }
    if base.active == Some(false) {
        return Err(QmpError::generic(
            "Parameter 'active': inactive nodes are not supported by bexd",
        ));
    }
    Ok(NodeOptions {
        node_name: base.node_name,
        read_only,
        auto_read_only: base.auto_read_only.unwrap_or(false),
        discard,
        cache_direct: cache.direct.unwrap_or(false),
        cache_no_flush: cache.no_flush.unwrap_or(false),
        force_share,
        detect_zeroes: detect_zeroes(base.detect_zeroes, discard)?,
        spec,
    })
}

/// QEMU's rule: `unmap` is refused unless the node passes discards down.
fn detect_zeroes(
    option: Option<BlockdevDetectZeroesOptions>,
    discard: bool,
) -> Result<DetectZeroes, QmpError> {
    match option {
        None | Some(BlockdevDetectZeroesOptions::Off) => Ok(DetectZeroes::Off),
        Some(BlockdevDetectZeroesOptions::On) => Ok(DetectZeroes::On),
        Some(BlockdevDetectZeroesOptions::Unmap) if discard => Ok(DetectZeroes::Unmap),
        Some(BlockdevDetectZeroesOptions::Unmap) => Err(QmpError::generic(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
        )),
    }
}

/// qcow2's members bexd does not act on, refused when they ask for anything
/// else than what bexd does. Freed clusters go down to the file exactly when
/// the node has `discard=unmap` (so each `pass-discard-*` must say so), and
/// bexd makes no metadata overlap checks, has no encryption and no external
/// data files.
fn qcow2_refusals(q: &BlockdevOptionsQcow2, discard: bool) -> Result<(), QmpError> {
    let unsupported = |member: &str, why: &str| {
        Err(QmpError::generic(format!(
            "Parameter '{member}': {why} (not supported by bexd)"
        )))
    };
    for (member, value) in [
        ("pass-discard-request", q.pass_discard_request),
        ("pass-discard-snapshot", q.pass_discard_snapshot),
        ("pass-discard-other", q.pass_discard_other),
    ] {
        if value.is_some_and(|v| v != discard) {
            return unsupported(
                member,
                "freed clusters are discarded in the file exactly when discard=unmap",
            );
        }
    }
    if q.discard_no_unref == Some(true) {
        return unsupported("discard-no-unref", "discarded clusters are always freed");
    }
    match &q.overlap_check {
        None => {}
        Some(Value::String(s)) if s == "none" => {}
        Some(_) => return unsupported("overlap-check", "only 'none' (no overlap checks)"),
    }
    if q.l2_cache_entry_size.is_some() {
        return unsupported("l2-cache-entry-size", "L2 tables are cached whole");
    }
    if q.encrypt.is_some() {
        return unsupported("encrypt", "encrypted images");
    }
    if q.data_file.is_some() {
        return unsupported("data-file", "external data files");
    }
    Ok(())
}

/// `driver=nbd`: inet and unix servers (QEMU also takes `fd`, and vsock
/// in its socket layer; bexd refuses those rather than ignore them).
fn nbd_client_spec(n: BlockdevOptionsNbd) -> Result<NbdClientSpec, QmpError> {
    let server = match n.server {
        SocketAddress::Inet(i) => nbd_client::ServerAddr::Inet {
            host: i.host,
            port: i.port,
        },
        SocketAddress::Unix(u) if u.r#abstract != Some(true) => {
            nbd_client::ServerAddr::Unix(PathBuf::from(u.path))
        }
        SocketAddress::Unix(_) => return Err(QmpError::generic(
            "Parameter 'server.abstract': abstract sockets are not supported by bexd's nbd driver",
        )),
        SocketAddress::Vsock { .. } | SocketAddress::Fd { .. } => {
            return Err(QmpError::generic(
                "Parameter 'server.type': bexd's nbd driver connects to inet and unix servers only",
            ))
        }
    };
    Ok(NbdClientSpec {
        server,
        export: n.export,
        tls_creds: n.tls_creds,
        tls_hostname: n.tls_hostname,
        tls: None,
        dirty_bitmap: n.x_dirty_bitmap,
        reconnect_delay: Duration::from_secs(n.reconnect_delay.unwrap_or(0).into()),
        open_timeout: Duration::from_secs(n.open_timeout.unwrap_or(0).into()),
    })
}

fn qcow2_spec(q: BlockdevOptionsQcow2, discard: bool) -> Result<NodeSpec, QmpError> {
    qcow2_refusals(&q, discard)?;
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

/// rbd: QEMU's members as librados options. librbd's cache is on unless
/// `cache.direct=on`, as QEMU sets `rbd_cache`.
fn rbd_spec(r: BlockdevOptionsRbd, cache_direct: bool) -> Result<NodeSpec, QmpError> {
    if r.encrypt.is_some() {
        return Err(QmpError::generic(
            "Parameter 'encrypt': encrypted rbd images (librbd's LUKS) are not supported by bexd",
        ));
    }
    let options = rbd::RbdOptions {
        pool: r.pool,
        namespace: r.namespace,
        image: r.image,
        conf: r.conf,
        snapshot: r.snapshot,
        user: r.user,
        auth_client_required: r
            .auth_client_required
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.as_str().to_string())
            .collect(),
        key: None,
        servers: r
            .server
            .unwrap_or_default()
            .into_iter()
            .map(|s| (s.host, s.port))
            .collect(),
        rbd_cache: !cache_direct,
    };
    Ok(NodeSpec::Rbd {
        options,
        key_secret: r.key_secret,
    })
}

/// blkdebug: rules and limits; the configuration file is read at open, as
/// QEMU reads it then (after these checks, which its QAPI layer makes).
fn blkdebug_spec(b: BlockdevOptionsBlkdebug) -> Result<NodeSpec, QmpError> {
    let limit = |v: Option<i32>, name: &str| -> Result<u64, QmpError> {
        v.map_or(Ok(0), |v| non_negative(i64::from(v), name))
    };
    let limits = Limits {
        align: b.align.map_or(Ok(0), |v| non_negative(v, "align"))?,
        max_transfer: limit(b.max_transfer, "max-transfer")?,
        opt_write_zero: limit(b.opt_write_zero, "opt-write-zero")?,
        max_write_zero: limit(b.max_write_zero, "max-write-zero")?,
        opt_discard: limit(b.opt_discard, "opt-discard")?,
        max_discard: limit(b.max_discard, "max-discard")?,
    };
    let inject = b
        .inject_error
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, r)| blkdebug_rule(r, i))
        .collect::<Result<_, _>>()?;
    let set_state = b
        .set_state
        .unwrap_or_default()
        .into_iter()
        .map(set_state_rule)
        .collect();
    Ok(NodeSpec::Blkdebug {
        image: child_ref(b.image)?,
        options: BlkdebugOptions {
            config: b.config.map(PathBuf::from),
            inject,
            set_state,
            limits,
        },
    })
}

/// One inject-error rule. QEMU accepts any errno and sector; bexd refuses
/// those that cannot mean anything (a negative errno, a negative sector
/// other than QEMU's -1 for "any"), since such a rule would be accepted
/// and then never fail a request as asked.
fn blkdebug_rule(r: BlkdebugInjectError, index: usize) -> Result<InjectError, QmpError> {
    let member = |m: &str| format!("inject-error[{index}].{m}");
    let errno = r.errno.unwrap_or(i64::from(libc::EIO));
    let errno = i32::try_from(errno)
        .ok()
        .filter(|e| (0..4096).contains(e))
        .ok_or_else(|| {
            QmpError::generic(format!(
                "Parameter '{}' expects an errno from 0 to 4095",
                member("errno")
            ))
        })?;
    let sector = match r.sector {
        None | Some(-1) => None,
        Some(s) => Some(u64::try_from(s).map_err(|_| {
            QmpError::generic(format!(
                "Parameter '{}' expects a sector number or -1 (any sector)",
                member("sector")
            ))
        })?),
    };
    let iotypes = match r.iotype {
        Some(t) => vec![io_type(t.0)],
        None => IoType::DEFAULT.to_vec(),
    };
    Ok(InjectError {
        event: debug_event(r.event.0),
        state: r.state.unwrap_or(0),
        iotypes,
        errno,
        sector,
        once: r.once.unwrap_or(false),
        immediately: r.immediately.unwrap_or(false),
        after: r.x_after.unwrap_or(0),
    })
}

fn set_state_rule(r: BlkdebugSetState) -> SetState {
    SetState {
        event: debug_event(r.event.0),
        state: r.state.unwrap_or(0),
        new_state: r.new_state,
    }
}

/// The schema's event is the block layer's, by name (a test checks every one maps).
fn debug_event(e: BlkdebugEvent) -> DebugEvent {
    DebugEvent::from_name(e.as_str()).unwrap_or(DebugEvent::None)
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
        SocketAddress::Inet(i) => inet_listen_addr(i)?,
        SocketAddress::Unix(u) if u.r#abstract == Some(true) => ListenAddr::UnixAbstract {
            name: u.path,
            tight: u.tight.unwrap_or(true),
        },
        // Without `abstract`, QEMU ignores `tight` too.
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

/// An inet address to listen on, with QEMU's family rule; `mptcp` is refused.
fn inet_listen_addr(i: InetSocketAddress) -> Result<ListenAddr, QmpError> {
    if i.mptcp == Some(true) {
        return Err(QmpError::generic(
            "Parameter 'addr.mptcp': MPTCP is not supported by bexd",
        ));
    }
    Ok(ListenAddr::Tcp {
        inet: InetOptions {
            numeric: i.numeric.unwrap_or(false),
            to: i.to,
            family: crate::config::inet_family(i.ipv4, i.ipv6).map_err(QmpError::generic)?,
            keep_alive: i.keep_alive.unwrap_or(false),
        },
        host: i.host,
        port: i.port,
    })
}

/// block-export-add / --export.
pub fn export_config(value: Value, mode: InputMode) -> Result<ExportConfig, QmpError> {
    let o: BlockExportOptions = from_value(value, mode)?;
    if o.r#type == BlockExportType::VduseBlk {
        return Err(QmpError::generic(format!(
            "Export type '{}' is not supported by bexd (only 'nbd', 'vhost-user-blk' and 'fuse')",
            o.r#type.as_str()
        )));
    }
    if !is_well_formed_id(&o.id) {
        return Err(QmpError::generic("Invalid block export id"));
    }
    match &o.iothread {
        Some(BlockExportIothreads::Multi(_)) => {
            return Err(QmpError::generic(format!(
                "{} export does not support multi-threading",
                o.r#type.as_str().to_uppercase()
            )))
        }
        Some(BlockExportIothreads::Single(_)) | None => {}
    }
    let iothread = match o.iothread {
        Some(BlockExportIothreads::Single(name)) => Some(name),
        _ => None,
    };
    let kind = match (o.fuse, o.vhost_user_blk) {
        (Some(fuse), _) => ExportKindConfig::Fuse(fuse_config(fuse)?),
        (_, Some(vhost)) => ExportKindConfig::VhostUserBlk(vhost_user_blk_config(vhost)?),
        _ => ExportKindConfig::Nbd(nbd_config(o.nbd.unwrap_or_default(), &o.node_name)?),
    };
    Ok(ExportConfig {
        id: o.id,
        node_name: o.node_name,
        writable: o.writable.unwrap_or(false),
        writethrough: o.writethrough.unwrap_or(false),
        iothread,
        kind,
    })
}

/// The FUSE branch. Growing the image needs a resize the block layer does
/// not have yet, so `growable=on` is refused rather than ignored.
fn fuse_config(o: BlockExportOptionsFuse) -> Result<FuseExportConfig, QmpError> {
    if o.growable == Some(true) {
        return Err(QmpError::generic(
            "Parameter 'growable': growable FUSE exports are not supported by bexd",
        ));
    }
    Ok(FuseExportConfig {
        mountpoint: PathBuf::from(o.mountpoint),
        allow_other: match o.allow_other {
            Some(FuseExportAllowOther::On) => AllowOther::On,
            Some(FuseExportAllowOther::Off) => AllowOther::Off,
            Some(FuseExportAllowOther::Auto) | None => AllowOther::Auto,
        },
    })
}

/// The vhost-user-blk branch, with QEMU's checks and defaults (512-byte
/// sectors, one queue). Only a unix socket path is taken: QEMU also takes
/// an inherited descriptor (`fd`), which bexd does not yet.
fn vhost_user_blk_config(
    o: BlockExportOptionsVhostUserBlk,
) -> Result<VhostUserBlkExportConfig, QmpError> {
    let socket = match o.addr {
        SocketAddress::Unix(u) if u.r#abstract != Some(true) => PathBuf::from(u.path),
        SocketAddress::Unix(_) | SocketAddress::Fd { .. } => {
            return Err(QmpError::generic(
                "Parameter 'addr': vhost-user-blk exports take a unix socket path in bexd",
            ))
        }
        SocketAddress::Inet(_) | SocketAddress::Vsock { .. } => {
            return Err(QmpError::generic(
                "Only socket address types 'unix' and 'fd' are supported",
            ))
        }
    };
    let logical_block_size = o.logical_block_size.map_or(512, |s| s.0);
    if !logical_block_size.is_power_of_two() || !(512..=2 << 20).contains(&logical_block_size) {
        return Err(QmpError::generic(
            "parameter logical-block-size must be a power of 2 between 512 and 2097152",
        ));
    }
    let num_queues = o.num_queues.unwrap_or(1);
    if num_queues == 0 {
        return Err(QmpError::generic("num-queues must be greater than 0"));
    }
    Ok(VhostUserBlkExportConfig {
        socket,
        logical_block_size: logical_block_size as u32,
        num_queues,
    })
}

/// The NBD branch, its name defaulting to the node's.
fn nbd_config(nbd: BlockExportOptionsNbd, node_name: &str) -> Result<NbdExportConfig, QmpError> {
    let bitmaps = nbd
        .bitmaps
        .unwrap_or_default()
        .into_iter()
        .map(|b| match b {
            BlockDirtyBitmapOrStr::Local(name) => BitmapRef::Local(name),
            BlockDirtyBitmapOrStr::External { node, name } => BitmapRef::External { node, name },
        })
        .collect();
    checked_nbd(
        nbd.name.unwrap_or_else(|| node_name.to_string()),
        nbd.description,
        nbd.allocation_depth.unwrap_or(false),
        bitmaps,
    )
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

/// `--monitor`: the chardev it runs on (only QMP monitors exist in a storage
/// daemon) and whether its output is pretty-printed.
pub fn monitor_chardev(value: Value, mode: InputMode) -> Result<(String, bool), QmpError> {
    let m: MonitorOptions = from_value(value, mode)?;
    if m.mode == Some(qmp::schema::char::MonitorMode::Readline) {
        return Err(QmpError::generic("Only QMP is supported"));
    }
    Ok((m.chardev, m.pretty.unwrap_or(false)))
}

#[cfg(test)]
mod blkdebug_tests {
    use super::*;

    #[test]
    fn test_every_schema_event_is_a_block_layer_event() {
        assert_eq!(BlkdebugEvent::NAMES.len(), DebugEvent::ALL.len());
        for name in BlkdebugEvent::NAMES {
            assert!(DebugEvent::from_name(name).is_some(), "{name}");
        }
    }

    #[test]
    fn test_bad_rule_values_are_named_as_qemu_names_them() {
        let add = |rules: Value| {
            let mut v = serde_json::json!({"driver": "blkdebug", "node-name": "d", "image": "f"});
            v.as_object_mut()
                .unwrap()
                .extend(rules.as_object().unwrap().clone());
            node_options(v, InputMode::Json).unwrap_err().to_string()
        };
        let e = add(serde_json::json!({"inject-error": [{"event": "bogus"}]}));
        assert!(
            e.contains("Parameter 'event' does not accept value 'bogus'"),
            "{e}"
        );
        let e = add(serde_json::json!({"inject-error": [{"event": "none", "iotype": "x"}]}));
        assert!(
            e.contains("Parameter 'iotype' does not accept value 'x'"),
            "{e}"
        );
        let e = add(serde_json::json!({"set-state": [{"event": "none"}]}));
        assert!(
            e.contains("Parameter 'set-state[0].new_state' is missing"),
            "{e}"
        );
        let e = add(serde_json::json!({"max-transfer": 2147483648u64}));
        assert!(
            e.contains("Parameter 'max-transfer' expects int32_t"),
            "{e}"
        );
        let e = add(serde_json::json!({"align": -1}));
        assert!(
            e.contains("Value '-1' is out of range for parameter 'align'"),
            "{e}"
        );
    }
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
