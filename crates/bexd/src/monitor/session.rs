//! One QMP session over any byte stream: greeting, negotiation, commands
//! and events, until the peer goes or the daemon shuts down.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use qmp::wire::{self, JsonStream, Request};
use qmp::{ErrorClass, QmpError};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::broadcast;

use crate::commands::{self, Executor};
use crate::events::QmpEvent;
use crate::fds::MonitorFds;

/// A monitor's byte stream. Unix sockets also carry descriptors (SCM_RIGHTS).
pub trait MonitorStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Descriptors that came with the bytes read since the last call.
    fn take_fds(&mut self) -> Vec<OwnedFd> {
        Vec::new()
    }
}

impl MonitorStream for tokio::net::TcpStream {}
impl MonitorStream for tokio::io::DuplexStream {}

/// Per-client QMP session state.
struct Session {
    negotiated: bool,
    oob: bool,
    events: Option<broadcast::Receiver<QmpEvent>>,
}

/// Serves one QMP client until it disconnects or the daemon shuts down.
/// `fds` are the monitor's descriptors (`getfd`), kept across its clients;
/// `pretty` is the monitor's `pretty=on`: replies and events laid out as
/// QEMU's pretty printer does (see [`wire::pretty`]).
pub async fn serve_client<S: MonitorStream>(
    mut stream: S,
    exec: &Executor,
    fds: &Arc<MonitorFds>,
    pretty: bool,
) {
    let layout = |text: String| match pretty {
        true => wire::pretty(&text),
        false => text,
    };
    let shutdown = exec.shutdown();
    let (major, minor, micro) = crate::QEMU_VERSION;
    let greeting = layout(wire::greeting(major, minor, micro, crate::PACKAGE));
    if stream.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    let mut session = Session {
        negotiated: false,
        oob: false,
        events: None,
    };
    let mut parser = JsonStream::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut out = String::new();
        tokio::select! {
            n = stream.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    fds.received(stream.take_fds());
                    parser.feed(&buf[..n]);
                    while let Some(item) = parser.next() {
                        fds.scope(handle_item(exec, &mut session, item, &mut out)).await;
                    }
                }
            },
            ev = next_event(&mut session.events) => {
                if let Some(ev) = ev {
                    out.push_str(&wire::encode_event(ev.name, ev.data.as_ref(), ev.time));
                }
            }
            _ = shutdown.cancelled() => {
                let _ = stream.flush().await;
                return;
            }
        }
        if !out.is_empty() && stream.write_all(layout(out).as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn next_event(events: &mut Option<broadcast::Receiver<QmpEvent>>) -> Option<QmpEvent> {
    let Some(rx) = events else {
        return std::future::pending().await;
    };
    loop {
        match rx.recv().await {
            Ok(ev) => return Some(ev),
            // A monitor that fell behind loses the oldest events, as QEMU's would.
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

/// Handles one parsed JSON document, appending every line to send to `out`.
async fn handle_item(
    exec: &Executor,
    session: &mut Session,
    item: Result<Value, QmpError>,
    out: &mut String,
) {
    let parsed = item
        .map_err(|e| (e, None))
        .and_then(|v| wire::parse_request(v, session.oob));
    let request = match parsed {
        Ok(r) => r,
        Err((e, id)) => {
            out.push_str(&wire::encode_error(&e, id.as_ref()));
            return;
        }
    };
    let result = execute(exec, session, &request).await;
    // Events the command caused (e.g. BLOCK_EXPORT_DELETED on a safe removal)
    // go out before its return, as QEMU orders them.
    drain_events(session, out);
    // Only a quit that ran ends the daemon: one refused (unexpected arguments,
    // before negotiation, out of band) leaves it serving, as in QEMU.
    let quitting = request.command == "quit" && result.is_ok();
    match result {
        Ok(value) => out.push_str(&wire::encode_return(&value, request.id.as_ref())),
        Err(e) => out.push_str(&wire::encode_error(&e, request.id.as_ref())),
    }
    if quitting {
        exec.quit();
    }
}

fn drain_events(session: &mut Session, out: &mut String) {
    let Some(rx) = &mut session.events else {
        return;
    };
    loop {
        match rx.try_recv() {
            Ok(ev) => out.push_str(&wire::encode_event(ev.name, ev.data.as_ref(), ev.time)),
            Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(_) => return,
        }
    }
}

async fn execute(
    exec: &Executor,
    session: &mut Session,
    request: &Request,
) -> Result<Value, QmpError> {
    if !session.negotiated {
        return match request.command.as_str() {
            "qmp_capabilities" => negotiate(exec, session, request),
            _ => Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            )),
        };
    }
    // QEMU's order: an unknown command, then one that cannot run out of band,
    // then the command itself (qmp_capabilities refuses a second negotiation).
    if request.oob {
        return Err(match exec.exists(&request.command) {
            true => QmpError::generic(format!(
                "The command {} does not support OOB",
                request.command
            )),
            false => commands::not_found(&request.command),
        });
    }
    exec.run(&request.command, request.arguments.clone()).await
}

fn negotiate(exec: &Executor, session: &mut Session, request: &Request) -> Result<Value, QmpError> {
    let mut oob = false;
    for (key, value) in &request.arguments {
        if key != "enable" {
            return Err(QmpError::generic(format!(
                "Parameter '{key}' is unexpected"
            )));
        }
        let Some(list) = value.as_array() else {
            return Err(QmpError::generic(
                "Invalid parameter type for 'enable', expected: array",
            ));
        };
        for cap in list {
            match cap.as_str() {
                Some("oob") => oob = true,
                Some(other) => {
                    return Err(QmpError::generic(format!(
                        "Parameter 'enable[0]' does not accept value '{other}'"
                    )))
                }
                None => {
                    return Err(QmpError::generic(
                        "Invalid parameter type for 'enable[0]', expected: string",
                    ))
                }
            }
        }
    }
    session.negotiated = true;
    session.oob = oob;
    session.events = Some(exec.events());
    Ok(json!({}))
}
