//! A connection's life: read replies until it breaks, then reconnect (or
//! fail every request), until the node closes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::time::Instant;

use crate::inflight::LinkState;
use crate::link::{Link, RETRY_FIRST, RETRY_MAX};
use crate::transport::Stream;

/// The connection's life: read replies until it breaks, then reconnect
/// (or fail), until the node closes.
pub(crate) async fn run(link: Arc<Link>, mut stream: Stream) {
    loop {
        let (read_half, write_half) = tokio::io::split(stream);
        link.install(write_half).await;
        let ended = tokio::select! {
            e = crate::reader::run(&link, read_half) => e,
            _ = link.close.notified() => {
                link.disconnect().await;
                return;
            }
        };
        tracing::warn!(server = %link.params.addr, error = %ended, "NBD connection lost");
        link.uninstall().await;
        if link.params.reconnect_delay.is_zero() {
            let mut table = link.table();
            table.state = LinkState::Failing;
            table.fail_all(&ended);
            return;
        }
        match reconnect(&link).await {
            Some(s) => stream = s,
            None => return,
        }
    }
}

/// Tries again and again; requests wait for `reconnect-delay`, then fail
/// with EIO (and new ones at once) while the attempts go on, as QEMU's.
/// `None` when the node closed meanwhile.
async fn reconnect(link: &Link) -> Option<Stream> {
    link.table().state = LinkState::Waiting;
    let deadline = Instant::now() + link.params.reconnect_delay;
    let mut pause = RETRY_FIRST;
    loop {
        if link.closing.load(Ordering::Acquire) {
            link.disconnect().await;
            return None;
        }
        match link.reopen().await {
            Ok(stream) => {
                tracing::info!(server = %link.params.addr, "NBD connection re-established");
                return Some(stream);
            }
            Err(e) => tracing::debug!(error = %e, "NBD reconnect attempt failed"),
        }
        let now = Instant::now();
        let mut wake = now + pause;
        {
            let mut table = link.table();
            if table.state == LinkState::Waiting {
                if now >= deadline {
                    table.state = LinkState::Failing;
                    table.fail_all("reconnect-delay expired");
                } else {
                    wake = wake.min(deadline);
                }
            }
        }
        pause = (pause * 2).min(RETRY_MAX);
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = link.close.notified() => {
                link.disconnect().await;
                return None;
            }
        }
    }
}
