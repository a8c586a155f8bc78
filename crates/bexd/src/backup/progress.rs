//! Progress on stderr: a bar redrawn in place on a terminal, a plain line
//! per quarter otherwise (logs stay readable), and the final summary.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: f64 = 1048576.0;

pub struct Progress {
    pub done: Arc<AtomicU64>,
    total: u64,
    start: Instant,
    tty: bool,
    quiet: bool,
}

impl Progress {
    pub fn new(total: u64, quiet: bool) -> Self {
        Self {
            done: Arc::new(AtomicU64::new(0)),
            total,
            start: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            quiet,
        }
    }

    /// Redraws until `done` reaches the total; run as its own task.
    pub async fn run(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut quarter = 0;
        loop {
            let done = self.done.load(Ordering::Relaxed);
            if !self.quiet {
                if self.tty {
                    eprint!("\r{}", self.bar(done));
                    let _ = std::io::stderr().flush();
                } else if let Some(q) = (done * 4).checked_div(self.total).filter(|q| *q > quarter)
                {
                    quarter = q;
                    eprintln!("{}", self.bar(done));
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        if self.tty && !self.quiet {
            eprintln!("\r{}", self.bar(self.done.load(Ordering::Relaxed)));
        }
    }

    fn bar(&self, done: u64) -> String {
        let pct = (done * 100).checked_div(self.total).unwrap_or(100).min(100);
        let filled = (pct / 4) as usize;
        format!(
            "[{}{}] {pct:3}% {:.1}/{:.1} MiB {:.1} MiB/s",
            "#".repeat(filled),
            ".".repeat(25 - filled.min(25)),
            done as f64 / MIB,
            self.total as f64 / MIB,
            rate(done, self.start.elapsed())
        )
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

pub fn rate(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64().max(1e-6);
    bytes as f64 / MIB / secs
}
