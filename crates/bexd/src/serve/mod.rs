//! `bexd serve IMAGE`: one image over NBD in one command, a drop-in qemu-nbd.
//!
//! It takes qemu-nbd's options with qemu-nbd's defaults and refusals
//! (`args.rs`), builds the same nodes, server and export the long form would
//! (`image.rs`; `--blockdev file` + `raw` or `qcow2`, `--nbd-server`,
//! `--export`), so everything behaves identically, and like qemu-nbd it exits
//! when the last client leaves unless `-t` is given. It also prints the URI
//! to connect to. `-L` lists another server's exports (`list.rs`); `-c`/`-d`
//! are the kernel NBD device (`kernel.rs`).

mod args;
mod image;
mod kernel;
mod list;

use std::sync::Arc;

use clap::Parser;

use crate::config::{
    ExportConfig, ExportKindConfig, ListenAddr, NbdExportConfig, NbdServerConfig,
    DEFAULT_PAYLOAD_BUDGET,
};
use crate::daemon::Daemon;
use crate::process::{self, Forked, PidFile};

use args::{ImagePlan, Listen, ServeArgs, ServePlan};

/// The id and node name of the one export.
const EXPORT_ID: &str = "disk0";

/// Runs `bexd serve`; returns the exit code.
pub fn main(args: &[String]) -> i32 {
    let argv = std::iter::once("bexd serve".to_string()).chain(args.iter().cloned());
    let plan = match ServeArgs::try_parse_from(argv) {
        Ok(a) => a.check(),
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    if let Ok(ServePlan::Serve(plan)) = &plan {
        if let Err(message) = tracing_for(plan) {
            return fail(&message);
        }
    } else if let Err(message) = crate::trace::init(&Default::default(), "warn") {
        return fail(&message);
    }
    match plan {
        Err(message) => fail(&message),
        Ok(ServePlan::Disconnect(device)) => kernel::disconnect(&device),
        Ok(ServePlan::List(plan)) => list::main(&plan),
        Ok(ServePlan::Serve(plan)) => serve(*plan),
    }
}

/// qemu-nbd's `-T` (QEMU trace patterns, as `--trace` in the daemon form)
/// and `-v` ("extra debugging information": bexd's info-level log, unless
/// `BEXD_LOG` says otherwise).
fn tracing_for(plan: &ImagePlan) -> Result<(), String> {
    let mut config = crate::trace::TraceConfig::default();
    for arg in &plan.trace {
        crate::trace::apply(&mut config, arg).map_err(|e| format!("-T {arg}: {e}"))?;
    }
    config.format = plan.log_format;
    config.target = plan.log_target;
    let level = if plan.verbose { "info" } else { "warn" };
    crate::trace::init(&config, level)
}

/// Prints qemu-nbd's one-line refusal and returns its exit code.
fn fail(message: &str) -> i32 {
    eprintln!("bexd serve: {message}");
    1
}

fn serve(plan: ImagePlan) -> i32 {
    process::raise_fd_limit();
    // Forked before any thread exists; the parent exits once the server is
    // ready (0) or the child failed (1), whose error reached the shared stderr.
    let notifier = match plan.fork {
        false => None,
        true => match process::daemonize() {
            Ok(Forked::Parent(code)) => return code,
            Ok(Forked::Child(n)) => Some(n),
            Err(e) => return fail(&format!("Failed to fork: {e}")),
        },
    };
    let rt = match crate::startup::runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start runtime: {e}")),
    };
    rt.block_on(async move {
        let signals = crate::startup::StopSignals::install();
        let daemon = Daemon::new();
        let pidfile = match set_up(&daemon, &plan).await {
            Ok(p) => p,
            Err(message) => return fail(&message),
        };
        if !plan.persistent {
            exit_after_last_client(&daemon);
        }
        crate::startup::run_until_shutdown(daemon, signals, notifier, pidfile).await
    })
}

async fn set_up(daemon: &Arc<Daemon>, plan: &ImagePlan) -> Result<Option<PidFile>, String> {
    for object in &plan.objects {
        let (value, mode) =
            crate::startup::option_value(object, Some("qom-type")).map_err(|e| e.desc)?;
        crate::commands::create_and_add_object(daemon, value, mode).map_err(|e| e.desc)?;
    }
    image::open(daemon, plan, EXPORT_ID)?;
    daemon
        .start_nbd_server(NbdServerConfig {
            addr: listen_addr(&plan.listen),
            tls_creds: plan.tls_creds.clone(),
            tls_authz: plan.tls_authz.clone(),
            max_connections: plan.shared,
            handshake_max: plan.handshake_limit,
            payload_budget: DEFAULT_PAYLOAD_BUDGET,
        })
        .map_err(|e| match &plan.tls_creds {
            Some(_) if e.to_string().contains("TLS") || e.to_string().contains("credentials") => {
                format!("Failed to get TLS creds: {e}")
            }
            _ => e.to_string(),
        })?;
    let export = ExportConfig {
        id: EXPORT_ID.into(),
        node_name: EXPORT_ID.into(),
        writable: !plan.read_only,
        writethrough: !plan.cache.writeback,
        iothread: None,
        kind: ExportKindConfig::Nbd(NbdExportConfig {
            name: plan.export_name.clone(),
            description: plan.description.clone(),
            allocation_depth: plan.allocation_depth,
            bitmaps: plan
                .bitmaps
                .iter()
                .cloned()
                .map(crate::config::BitmapRef::Local)
                .collect(),
        }),
    };
    daemon.add_export(export).map_err(|e| e.to_string())?;
    if let Some(device) = &plan.connect {
        kernel::connect(device)?;
    }
    if let Some(path) = &plan.qmp {
        let chardev = crate::config::ChardevConfig {
            id: "qmp0".into(),
            backend: crate::config::ChardevBackend::Socket(crate::config::SocketChardev {
                addr: crate::config::ChardevAddr::Unix(path.clone()),
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
    let pidfile = plan.pid_file.as_deref().map(PidFile::create).transpose()?;
    let bound = daemon
        .nbd_server_addr()
        .unwrap_or_else(|| listen_addr(&plan.listen));
    println!("{}", connectable(bound).uri(&plan.export_name));
    Ok(pidfile)
}

fn listen_addr(listen: &Listen) -> ListenAddr {
    match listen {
        Listen::Unix(path) => ListenAddr::Unix { path: path.clone() },
        Listen::Tcp { host, port } => ListenAddr::Tcp {
            host: host.clone(),
            port: port.to_string(),
            inet: Default::default(),
        },
        // Checked, like any addr.type=fd, when the server takes it.
        Listen::Activated => ListenAddr::Fd { fd: "3".into() },
    }
}

/// The printed URI names an address a client can connect to: a wildcard bind
/// (qemu-nbd's default 0.0.0.0) is reached on the loopback address.
fn connectable(addr: ListenAddr) -> ListenAddr {
    match addr {
        ListenAddr::Tcp { host, port, inet } => {
            let host = match host.trim_start_matches('[').trim_end_matches(']') {
                "" | "0.0.0.0" => "127.0.0.1".to_string(),
                "::" => "::1".to_string(),
                _ => host,
            };
            ListenAddr::Tcp { host, port, inet }
        }
        other => other,
    }
}

/// Without `-t`, qemu-nbd exits when the last client that got as far as
/// transmission disconnects (a client that only listed exports or failed the
/// handshake does not count). Shutdown then drains and flushes as on SIGTERM.
fn exit_after_last_client(daemon: &Arc<Daemon>) {
    let Some(export) = daemon.exports.all().into_iter().next() else {
        return;
    };
    let daemon = daemon.clone();
    tokio::spawn(async move {
        export.wait_until_idle().await;
        tracing::info!("the last client disconnected: exiting (no -t/--persistent)");
        daemon.begin_quit();
    });
}

/// `bexd serve`'s clap definition, for the man page (`man.rs`).
pub fn command() -> clap::Command {
    <ServeArgs as clap::CommandFactory>::command()
}
