//! QMP monitors on chardevs: `--monitor chardev=ID` serves QMP on the
//! chardev's stdin/stdout, on a socket it listens on (one client at a time,
//! as in QEMU), or on a connection it makes out to a listening peer
//! (`server=off`, reconnecting with `reconnect`/`reconnect-ms`). Several
//! monitors serve concurrently, and every negotiated monitor gets every event.
//! Each waits for the daemon's start gate before it reads its first command.

mod client;
mod listen;
mod scm;
mod session;
mod stdio;

use std::sync::Arc;

pub use session::{serve_client, MonitorStream};

use crate::chardevs::{Chardev, Opened};
use crate::commands::Executor;
use crate::config::ChardevBackend;
use crate::error::ChardevError;
use crate::fds::MonitorFds;

/// Opens a socket chardev as `--chardev` creates it: binds (or takes the
/// descriptor) or connects now, so errors name the option and
/// `query-chardev` shows the real address; a monitor serves on it later.
pub async fn open_chardev(chardev: &Chardev) -> Result<(), ChardevError> {
    let opened = match &chardev.config.backend {
        ChardevBackend::Stdio => return Ok(()),
        ChardevBackend::Socket(s) if s.server => listen::open(chardev, s).await?,
        ChardevBackend::Socket(s) => client::open(chardev, s).await?,
    };
    chardev.set_opened(opened);
    Ok(())
}

/// Starts a monitor on an opened `chardev`; it serves QMP from when start-up
/// is complete until shutdown. `pretty` is the monitor's `pretty=on`.
pub fn start_monitor(
    exec: &Executor,
    chardev: Arc<Chardev>,
    pretty: bool,
) -> Result<(), ChardevError> {
    chardev.attach_frontend()?;
    // The monitor's named descriptors outlive each client, as QEMU's do.
    let fds = Arc::new(MonitorFds::default());
    let socket = match &chardev.config.backend {
        ChardevBackend::Stdio => {
            stdio::start(exec, fds, pretty);
            return Ok(());
        }
        ChardevBackend::Socket(s) => s.clone(),
    };
    match chardev.take_opened() {
        Some(Opened::Listening(l, file)) => listen::serve(exec, chardev, l, file, fds, pretty),
        Some(Opened::Connecting(first)) => {
            client::serve(exec, chardev, &socket, first, fds, pretty)
        }
        None => {
            return Err(ChardevError::Socket(format!(
                "chardev '{}' was not opened",
                chardev.id()
            )))
        }
    }
    Ok(())
}

/// Waits for the start gate; false if the daemon shuts down first.
async fn started(exec: &Executor) -> bool {
    let shutdown = exec.shutdown();
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = exec.gate().wait() => true,
    }
}
