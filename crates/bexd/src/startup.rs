//! From argv to a running daemon, and from a signal or `quit` to exit code 0.

use std::sync::Arc;
use std::time::Duration;

use qmp::visitor::InputMode;
use qmp::QmpError;
use serde_json::Value;

use crate::cli::CliOption;
use crate::daemon::Daemon;
use crate::error::ChardevError;
use crate::process::{self, Forked, PidFile, StartupNotifier};
use crate::{commands, monitor, qapi};

/// How long shutdown waits for in-flight requests before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Threads in the blocking pool, where driver calls that may wait for a
/// device run (one per request in flight). tokio's default is 512; QEMU's
/// thread pool stops at 64, and past that more threads only add contention on
/// the same disk and 8 MiB of stack reservation each. Requests beyond it queue
/// for a free thread. `--object main-loop,id=ID,thread-pool-max=N` sets it, as
/// in QEMU; without one, `BEXD_MAX_BLOCKING_THREADS` (documented in the
/// README) overrides the default.
const MAX_BLOCKING_THREADS: usize = crate::objects::DEFAULT_THREAD_POOL_MAX;

/// Builds the multi-threaded runtime every mode runs on.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    runtime_with_pool(None)
}

/// The runtime, its blocking pool sized by a main-loop's `thread-pool-max` if there is one.
fn runtime_with_pool(thread_pool_max: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = match thread_pool_max {
        Some(n) => n,
        None => blocking_threads(std::env::var("BEXD_MAX_BLOCKING_THREADS").ok().as_deref()),
    };
    // Driver calls run on the block layer's own pool; tokio's blocking pool
    // keeps the few other jobs that may block (closing nodes), capped alike.
    block::pool::set_max_threads(threads);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bexd")
        .max_blocking_threads(threads)
        .build()
}

/// The `thread-pool-max` of a `--object main-loop` among the options, read
/// before the runtime exists (the object itself is created in order later,
/// from the same text, so a bad one fails there with its option named).
fn main_loop_pool(options: &[CliOption]) -> Option<usize> {
    options.iter().find_map(|option| {
        let CliOption::Object(s) = option else {
            return None;
        };
        let (value, mode) = option_value(s, Some("qom-type")).ok()?;
        // Only a main-loop is read here: creating any other object loads files
        // (certificates, authz lists), which its turn in order does once.
        if value.get("qom-type").and_then(|t| t.as_str()) != Some("main-loop") {
            return None;
        }
        match crate::objects::create(value, mode) {
            Ok((_, crate::objects::Object::MainLoop { thread_pool_max })) => Some(thread_pool_max),
            _ => None,
        }
    })
}

/// The blocking pool's size: `env` if it is a positive number, else the default.
fn blocking_threads(env: Option<&str>) -> usize {
    match env.map(|v| v.trim().parse::<usize>()) {
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            tracing::warn!(
                "BEXD_MAX_BLOCKING_THREADS must be a positive number; using {MAX_BLOCKING_THREADS}"
            );
            MAX_BLOCKING_THREADS
        }
        None => MAX_BLOCKING_THREADS,
    }
}

/// The qemu-storage-daemon mode: applies the options in order, then serves
/// until a signal or `quit`; returns the exit code.
pub fn run(options: Vec<CliOption>) -> i32 {
    process::raise_fd_limit();
    let notifier = match options.contains(&CliOption::Daemonize) {
        false => None,
        true => match process::daemonize() {
            Ok(Forked::Parent(code)) => return code,
            Ok(Forked::Child(n)) => Some(n),
            Err(e) => {
                eprintln!("bexd: --daemonize: {e}");
                return 1;
            }
        },
    };
    let rt = match runtime_with_pool(main_loop_pool(&options)) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bexd: cannot start runtime: {e}");
            return 1;
        }
    };
    rt.block_on(async move {
        let signals = StopSignals::install();
        let daemon = Daemon::new();
        let pidfile = match apply_options(&daemon, &options).await {
            Ok(p) => p,
            Err(message) => {
                eprintln!("bexd: {message}");
                return 1;
            }
        };
        daemon.start_serving();
        run_until_shutdown(daemon, signals, notifier, pidfile).await
    })
}

/// Applies every option in order; the first failure names its option.
async fn apply_options(
    daemon: &Arc<Daemon>,
    options: &[CliOption],
) -> Result<Option<PidFile>, String> {
    let mut pidfile_path = None;
    for option in options {
        let described = |e: String| match option.argument() {
            Some(arg) => format!("{} {arg}: {e}", option.flag()),
            None => format!("{}: {e}", option.flag()),
        };
        match option {
            CliOption::Pidfile(p) => pidfile_path = Some(p.clone()),
            CliOption::Daemonize => {}
            // Applied before anything else, when logging starts (program.rs).
            CliOption::Trace(_) | CliOption::LogFormat(_) | CliOption::LogTarget(_) => {}
            _ => apply_one(daemon, option)
                .await
                .map_err(|e| described(e.desc))?,
        }
    }
    // Written once everything exists, before clients can rely on it (as QEMU does).
    pidfile_path
        .map(|p| PidFile::create(&p).map_err(|e| format!("--pidfile {}: {e}", p.display())))
        .transpose()
}

async fn apply_one(daemon: &Arc<Daemon>, option: &CliOption) -> Result<(), QmpError> {
    match option {
        CliOption::Blockdev(s) => {
            let (value, mode) = option_value(s, Some("driver"))?;
            commands::blockdev_add(daemon, value, mode).map(drop)
        }
        CliOption::NbdServer(s) => {
            let (value, mode) = option_value(s, None)?;
            commands::nbd_server_start(daemon, value, false, mode).map(drop)
        }
        CliOption::Export(s) => {
            let (value, mode) = option_value(s, Some("type"))?;
            commands::block_export_add(daemon, value, mode).map(drop)
        }
        CliOption::Chardev(s) => {
            let value = qmp::keyval::parse_keyval(s, Some("backend"))
                .map_err(|e| QmpError::generic(e.to_string()))?;
            let chardev = qapi::chardev_config(value)?;
            let chardev = daemon.chardevs.add(chardev)?;
            Ok(monitor::open_chardev(&chardev).await?)
        }
        CliOption::Monitor(s) => {
            let (value, mode) = option_value(s, Some("chardev"))?;
            let (chardev_id, pretty) = qapi::monitor_chardev(value, mode)?;
            let chardev = daemon
                .chardevs
                .get(&chardev_id)
                .ok_or(ChardevError::NotFound(chardev_id))?;
            Ok(monitor::start_monitor(
                &commands::Executor::new(daemon),
                chardev,
                pretty,
            )?)
        }
        CliOption::Object(s) => {
            let (value, mode) = option_value(s, Some("qom-type"))?;
            commands::create_and_add_object(daemon, value, mode)
        }
        CliOption::Pidfile(_)
        | CliOption::Daemonize
        | CliOption::Trace(_)
        | CliOption::LogFormat(_)
        | CliOption::LogTarget(_) => Ok(()),
    }
}

/// An option's argument as a JSON tree: QEMU's JSON form when it starts with
/// `{`, its keyval form otherwise (leaves are strings, typed later).
pub fn option_value(s: &str, implied_key: Option<&str>) -> Result<(Value, InputMode), QmpError> {
    if s.trim_start().starts_with('{') {
        let v = serde_json::from_str(s)
            .map_err(|e| QmpError::generic(format!("JSON parse error, {e}")))?;
        return Ok((v, InputMode::Json));
    }
    let v =
        qmp::keyval::parse_keyval(s, implied_key).map_err(|e| QmpError::generic(e.to_string()))?;
    Ok((v, InputMode::Keyval))
}

/// Serves until SIGTERM, SIGINT or `quit`; then drains, flushes and returns 0.
pub async fn run_until_shutdown(
    daemon: Arc<Daemon>,
    signals: StopSignals,
    notifier: Option<StartupNotifier>,
    pidfile: Option<PidFile>,
) -> i32 {
    if let Some(n) = notifier {
        n.success();
        let _ = std::env::set_current_dir("/");
    }
    signals.wait(&daemon).await;
    shut_down(&daemon).await;
    drop(pidfile);
    0
}

/// The signals that stop the daemon gracefully.
///
/// Installed before any option is applied: a supervisor may send SIGTERM as
/// soon as the pid file or a socket exists, and until a handler is installed
/// the default action kills the process without flushing or removing the pid
/// file.
#[derive(Debug)]
pub struct StopSignals {
    streams: Option<[tokio::signal::unix::Signal; 3]>,
}

impl StopSignals {
    /// Must be called inside the runtime.
    pub fn install() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let streams = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => Some([term, int, hup]),
            _ => None,
        };
        Self { streams }
    }

    /// Returns on SIGTERM, SIGINT, SIGHUP or `quit`.
    async fn wait(self, daemon: &Daemon) {
        let Some([mut term, mut int, mut hup]) = self.streams else {
            daemon.shutdown.cancelled().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            _ = hup.recv() => tracing::info!("SIGHUP: shutting down"),
            _ = daemon.shutdown.cancelled() => tracing::info!("quit: shutting down"),
        }
    }
}

/// Stops accepting, lets in-flight requests finish, flushes every node.
pub async fn shut_down(daemon: &Arc<Daemon>) {
    daemon.shutdown.cancel();
    // Requests waiting for a throttle group's limit go now, so a low limit
    // cannot hold the exit (qemu-storage-daemon keeps throttling them).
    daemon.nodes.throttle_groups().drain_all();
    daemon.tasks.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, daemon.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within {DRAIN_TIMEOUT:?}");
    }
    daemon.wind_down().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_blocking_threads_when_unset_is_qemus_64() {
        assert_eq!(blocking_threads(None), 64);
    }

    #[test]
    fn test_blocking_threads_when_set_takes_the_number() {
        assert_eq!(blocking_threads(Some("8")), 8);
        assert_eq!(blocking_threads(Some(" 512 ")), 512);
    }

    #[test]
    fn test_blocking_threads_when_zero_or_garbage_keeps_the_default() {
        assert_eq!(blocking_threads(Some("0")), 64);
        assert_eq!(blocking_threads(Some("many")), 64);
    }
}
