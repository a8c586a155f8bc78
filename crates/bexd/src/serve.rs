//! `bexd serve IMAGE`: one image over NBD in one command, like qemu-nbd.
//!
//! It builds the same nodes, server and export the long form would
//! (`--blockdev file` + `raw`, `--nbd-server`, `--export`), so everything
//! behaves identically; it only chooses sensible defaults and prints the URI.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use block::drivers::file::{AioMode, LockingMode};
use clap::Parser;

use crate::blockdev::{self, ChildRef, NodeOptions, NodeSpec};
use crate::daemon::Daemon;
use crate::export::ExportConfig;
use crate::monitor::{ChardevAddr, ChardevConfig};
use crate::nbd_server::{ListenAddr, NbdServerConfig};
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
    /// TCP port to listen on.
    #[arg(short, long, default_value_t = 10809)]
    port: u16,
    /// Address to listen on.
    #[arg(short, long, default_value = "127.0.0.1")]
    bind: String,
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
    /// Image format (only raw so far).
    #[arg(short, long, default_value = "raw")]
    format: String,
    /// Maximum simultaneous clients (0 = unlimited; 1 disables multi-conn).
    #[arg(short = 'e', long, default_value_t = 100)]
    shared: u32,
    /// Bypass the host page cache (O_DIRECT).
    #[arg(long)]
    direct: bool,
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
    if args.format != "raw" {
        return Err(format!(
            "unsupported format '{}' (supported: raw)",
            args.format
        ));
    }
    let file = NodeOptions {
        node_name: None,
        read_only: args.read_only,
        auto_read_only: false,
        discard: args.discard,
        cache_direct: args.direct,
        cache_no_flush: false,
        spec: NodeSpec::File {
            filename: args.image.clone(),
            aio: AioMode::Threads,
            locking: LockingMode::Auto,
        },
    };
    let disk = NodeOptions {
        node_name: Some("disk0".into()),
        read_only: args.read_only,
        discard: args.discard,
        spec: NodeSpec::Raw {
            file: ChildRef::Inline(Box::new(file)),
            offset: 0,
            size: None,
        },
        ..NodeOptions::default()
    };
    blockdev::open(daemon, disk, false).map_err(|e| e.desc)?;
    let addr = match &args.socket {
        Some(path) => ListenAddr::Unix { path: path.clone() },
        None => ListenAddr::Tcp {
            host: args.bind.clone(),
            port: args.port.to_string(),
        },
    };
    daemon
        .start_nbd_server(NbdServerConfig {
            addr: addr.clone(),
            tls_creds: None,
            tls_authz: None,
            tls: None,
            max_connections: args.shared,
            handshake_max: Some(Duration::from_secs(10)),
        })
        .map_err(|e| e.desc)?;
    let export = ExportConfig {
        id: "disk0".into(),
        name: args.name.clone(),
        description: args.description.clone(),
        writable: !args.read_only,
        writethrough: false,
        allocation_depth: false,
        bitmaps: Vec::new(),
        iothread: None,
    };
    daemon
        .add_export_config(export, "disk0")
        .map_err(|e| e.desc)?;
    if let Some(path) = &args.qmp {
        let chardev = ChardevConfig {
            id: "qmp0".into(),
            addr: ChardevAddr::Unix(path.clone()),
        };
        crate::monitor::start_monitor(daemon, &chardev)
            .await
            .map_err(|e| e.desc)?;
    }
    let pidfile = args.pidfile.as_deref().map(PidFile::create).transpose()?;
    let bound = daemon.state().nbd.as_ref().map(|s| s.bound_addr().clone());
    println!("{}", bound.unwrap_or(addr).uri(&args.name));
    Ok(pidfile)
}
