//! `--chardev stdio`: a monitor on the process's stdin and stdout, as a
//! parent that spawns the daemon with pipes uses it.
//!
//! Two plain threads move the bytes (stdin may be a pipe, a terminal or a
//! regular file, and a blocking read of it must not hold a runtime thread or
//! keep the runtime from shutting down). At EOF on stdin the monitor's one
//! session ends and the daemon serves on, as qemu-storage-daemon does.

use std::io::{Read, Write};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::runtime::Handle;

use super::{serve_client, started};
use crate::commands::Executor;
use crate::fds::MonitorFds;

pub fn start(exec: &Executor, fds: Arc<MonitorFds>, pretty: bool) {
    let exec = exec.clone();
    exec.tasks().clone().spawn(async move {
        if !started(&exec).await {
            return;
        }
        match stdio_stream() {
            Ok(stream) => serve_client(stream, &exec, &fds, pretty).await,
            Err(e) => tracing::warn!(error = %e, "cannot start the stdio monitor"),
        }
    });
}

/// One end of an in-memory pipe whose other end the threads connect to
/// stdin and stdout.
fn stdio_stream() -> std::io::Result<DuplexStream> {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (mut from_monitor, mut to_monitor) = tokio::io::split(theirs);
    let handle = Handle::current();
    let h = handle.clone();
    std::thread::Builder::new()
        .name("bexd-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if h.block_on(to_monitor.write_all(&buf[..n])).is_err() {
                    return;
                }
            }
            // EOF: the session sees its peer go.
            let _ = h.block_on(to_monitor.shutdown());
        })?;
    std::thread::Builder::new()
        .name("bexd-stdout".into())
        .spawn(move || {
            let mut stdout = std::io::stdout().lock();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match handle.block_on(from_monitor.read(&mut buf)) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if stdout
                    .write_all(&buf[..n])
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    return;
                }
            }
        })?;
    Ok(ours)
}
