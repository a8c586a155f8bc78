//! `bexd serve IMAGE`: one image over NBD in one command, like qemu-nbd.
//!
//! It builds the same nodes, server and export the long form would
//! (`--blockdev file` + `raw` or `qcow2`, `--nbd-server`, `--export`), so
//! everything behaves identically; it only chooses sensible defaults (the
//! format from the image's first bytes, like qemu-nbd without `-f`) and
//! prints the URI.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use block::drivers::file::{AioMode, LockingMode};
use clap::Parser;

use crate::config::{
    BackingSpec, ChardevAddr, ChardevBackend, ChardevConfig, ChildRef, ExportConfig,
    ExportKindConfig, ListenAddr, NbdExportConfig, NbdServerConfig, NodeOptions, NodeSpec,
    Qcow2Cache, SocketChardev, DEFAULT_PAYLOAD_BUDGET,
};
use crate::daemon::Daemon;
use crate::process::PidFile;

#[derive(Debug, Parser)]
#[command(
    name = "bexd serve",
    about = "Serve one disk image over NBD (the one-image shortcut, like qemu-nbd)",
    version
)]
struct ServeArgs {
    /// The image file or block device to export.
    image: PathBuf,
    /// TCP port to listen on (default 10809).
    #[arg(short, long)]
    port: Option<u16>,
    /// Address to listen on (default 127.0.0.1).
    #[arg(short, long)]
    bind: Option<String>,
    /// Listen on this unix socket instead of TCP.
    #[arg(short = 'k', long)]
    socket: Option<PathBuf>,
    /// Export read-only.
    #[arg(short, long)]
    read_only: bool,
    /// Export name (default: empty, the default export).
    #[arg(short = 'x', long, default_value = "")]
    name: String,
    /// Export description.
    #[arg(short = 'D', long)]
    description: Option<String>,
    /// Image format: raw or qcow2 (default: qcow2 if the image starts with
    /// qcow2's magic, else raw).
    #[arg(short, long)]
    format: Option<String>,
    /// Maximum simultaneous clients (0 = unlimited; 1 disables multi-conn).
    #[arg(short = 'e', long, default_value_t = 100)]
    shared: u32,
    /// Bypass the host page cache (O_DIRECT).
    #[arg(long)]
    direct: bool,
    /// File I/O: threads (a thread pool), io_uring or native (both through
    /// an io_uring; the fastest on a disk, with --direct, which native
    /// requires, as in QEMU).
    #[arg(long, default_value = "threads", value_parser = ["threads", "io_uring", "native"])]
    aio: String,
    /// Let TRIM punch holes in the image.
    #[arg(long)]
    discard: bool,
    /// Also serve a QMP monitor on this unix socket.
    #[arg(long)]
    qmp: Option<PathBuf>,
    /// Write the process id here.
    #[arg(long)]
    pidfile: Option<PathBuf>,
}

/// Runs `bexd serve`; returns the exit code.
pub fn main(args: &[String]) -> i32 {
    let argv = std::iter::once("bexd serve".to_string()).chain(args.iter().cloned());
    let parsed = match ServeArgs::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    crate::process::raise_fd_limit();
    let rt = match crate::startup::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bexd serve: cannot start runtime: {e}");
            return 1;
        }
    };
    rt.block_on(async move {
        let signals = crate::startup::StopSignals::install();
        let daemon = Daemon::new();
        let pidfile = match set_up(&daemon, &parsed).await {
            Ok(p) => p,
            Err(message) => {
                eprintln!("bexd serve: {message}");
                return 1;
            }
        };
        crate::startup::run_until_shutdown(daemon, signals, None, pidfile).await
    })
}

async fn set_up(daemon: &Arc<Daemon>, args: &ServeArgs) -> Result<Option<PidFile>, String> {
    let format = match &args.format {
        Some(f) => f.clone(),
        None => probe_format(&args.image).to_string(),
    };
    let aio = match args.aio.as_str() {
        "io_uring" => AioMode::IoUring,
        "native" => AioMode::Native,
        _ => AioMode::Threads,
    };
    let file = NodeOptions {
        node_name: None,
        read_only: args.read_only,
        auto_read_only: false,
        discard: args.discard,
        cache_direct: args.direct,
        cache_no_flush: false,
        force_share: false,
        detect_zeroes: block::DetectZeroes::Off,
        spec: NodeSpec::File {
            filename: args.image.clone(),
            aio,
            locking: LockingMode::Auto,
        },
    };
    let file = ChildRef::Inline(Box::new(file));
    let spec = match format.as_str() {
        "raw" => NodeSpec::Raw {
            file,
            offset: 0,
            size: None,
        },
        "qcow2" => NodeSpec::Qcow2 {
            file,
            backing: BackingSpec::FromHeader,
            cache: Qcow2Cache::default(),
            lazy_refcounts: None,
        },
        other => {
            return Err(format!(
                "unsupported format '{other}' (supported: raw, qcow2)"
            ))
        }
    };
    let disk = NodeOptions {
        node_name: Some("disk0".into()),
        read_only: args.read_only,
        discard: args.discard,
        spec,
        ..NodeOptions::default()
    };
    crate::nodes::open(&daemon.nodes, disk, false).map_err(|e| e.to_string())?;
    let addr = match (socket_activation()?, &args.socket) {
        (Some(addr), _) => {
            // qemu-nbd's checks and texts: the socket is systemd's.
            if args.socket.is_some() {
                return Err("Unix socket can't be set when using socket activation".into());
            }
            if args.bind.is_some() {
                return Err("The interface can't be set when using socket activation".into());
            }
            if args.port.is_some() {
                return Err("TCP port number can't be set when using socket activation".into());
            }
            addr
        }
        (None, Some(path)) => ListenAddr::Unix { path: path.clone() },
        (None, None) => ListenAddr::Tcp {
            host: args.bind.clone().unwrap_or_else(|| "127.0.0.1".into()),
            port: args.port.unwrap_or(10809).to_string(),
            inet: Default::default(),
        },
    };
    daemon
        .start_nbd_server(NbdServerConfig {
            addr: addr.clone(),
            tls_creds: None,
            tls_authz: None,
            max_connections: args.shared,
            handshake_max: Some(Duration::from_secs(10)),
            payload_budget: DEFAULT_PAYLOAD_BUDGET,
        })
        .map_err(|e| e.to_string())?;
    let export = ExportConfig {
        id: "disk0".into(),
        node_name: "disk0".into(),
        writable: !args.read_only,
        writethrough: false,
        iothread: None,
        kind: ExportKindConfig::Nbd(NbdExportConfig {
            name: args.name.clone(),
            description: args.description.clone(),
            allocation_depth: false,
            bitmaps: Vec::new(),
        }),
    };
    daemon.add_export(export).map_err(|e| e.to_string())?;
    if let Some(path) = &args.qmp {
        let chardev = ChardevConfig {
            id: "qmp0".into(),
            backend: ChardevBackend::Socket(SocketChardev {
                addr: ChardevAddr::Unix(path.clone()),
                server: true,
                reconnect: None,
            }),
        };
        let chardev = daemon.chardevs.add(chardev).map_err(|e| e.to_string())?;
        crate::monitor::open_chardev(&chardev)
            .await
            .map_err(|e| e.to_string())?;
        crate::monitor::start_monitor(&crate::commands::Executor::new(daemon), chardev, false)
            .map_err(|e| e.to_string())?;
    }
    daemon.start_serving();
    let pidfile = args.pidfile.as_deref().map(PidFile::create).transpose()?;
    let bound = daemon.nbd_server_addr();
    println!("{}", bound.unwrap_or(addr).uri(&args.name));
    Ok(pidfile)
}

/// Socket activation as qemu-nbd and nbdkit read it: `LISTEN_PID` names this
/// process and `LISTEN_FDS` is 1, so descriptor 3 is the listening socket
/// (checked, like any `addr.type=fd`, when the server takes it).
fn socket_activation() -> Result<Option<ListenAddr>, String> {
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    if !for_us {
        return Ok(None);
    }
    match std::env::var("LISTEN_FDS").ok().as_deref() {
        Some("1") => Ok(Some(ListenAddr::Fd { fd: "3".into() })),
        other => Err(format!(
            "Unexpected value for LISTEN_FDS: {}",
            other.unwrap_or("(unset)")
        )),
    }
}

/// qcow2 if the image starts with qcow2's magic ("QFI\xfb"), else raw: what
/// qemu-nbd picks without `-f` for these two formats. An image that cannot
/// be read is left to the open that follows, which names the error.
fn probe_format(image: &std::path::Path) -> &'static str {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(image)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"QFI\xfb";
    if is_qcow2 {
        "qcow2"
    } else {
        "raw"
    }
}
