//! `metrics-http`: a Prometheus endpoint (`GET /metrics`) serving the
//! counters of every export and node (see `render.rs`) in the text
//! exposition format (`exposition.rs`), over a small HTTP/1.1 responder
//! (`http.rs`). The object (in `objects`) says where to listen; this module
//! binds when the object is added, so a bad address fails `object-add`, and
//! serves until the object is deleted or the daemon stops.
//!
//! Rendering reads the counters' shards, never a lock the data path takes,
//! so a scrape cannot slow requests down beyond the cache traffic of the read.

mod exposition;
mod http;
mod render;

use std::sync::{Arc, Weak};

use qmp::QmpError;
use tokio_util::sync::CancellationToken;

use crate::config::InetOptions;
use crate::daemon::Daemon;
use crate::net::inet::InetListener;

pub use render::render;

/// Binds `host`:`port` (as QEMU resolves a listening inet address) and
/// serves scrapes until `stop` fires (the `metrics-http` object is deleted)
/// or the daemon shuts down. The server holds the daemon weakly: the daemon
/// owns the object that owns `stop`.
pub fn start(
    daemon: &Arc<Daemon>,
    host: &str,
    port: &str,
    stop: CancellationToken,
) -> Result<(), QmpError> {
    let listener = InetListener::bind(host, port, &InetOptions::default())
        .map_err(|e| QmpError::generic(format!("metrics-http: {e}")))?;
    tracing::info!(host, port = ?listener.port(), "metrics endpoint listening");
    let shutdown = daemon.shutdown.clone();
    tokio::spawn(accept_loop(
        listener,
        Arc::downgrade(daemon),
        stop,
        shutdown,
    ));
    Ok(())
}

async fn accept_loop(
    listener: InetListener,
    daemon: Weak<Daemon>,
    stop: CancellationToken,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            s = listener.accept() => s,
            _ = stop.cancelled() => return,
            _ = shutdown.cancelled() => return,
        };
        let Ok(stream) = stream else {
            // Out of descriptors or a client gone before accept: try again shortly.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let daemon = daemon.clone();
        tokio::spawn(http::serve(stream, move || {
            daemon.upgrade().map(|d| render(&d)).unwrap_or_default()
        }));
    }
}
