//! Progress on stderr: indicatif's bar on a terminal, a plain line per
//! quarter otherwise (logs stay readable), and the rate for the summary.
//!
//! The copy workers only add to an atomic counter; one task moves the bar.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

const MIB: f64 = 1048576.0;

pub struct Progress {
    pub done: Arc<AtomicU64>,
    total: u64,
    start: Instant,
    bar: Option<ProgressBar>,
    /// No terminal: print a line at each quarter instead.
    lines: bool,
}

impl Progress {
    pub fn new(total: u64, quiet: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = (tty && !quiet).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "[{bar:25}] {percent:>3}% {binary_bytes}/{binary_total_bytes} \
                 {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("#>.");
            bar.set_style(style);
            bar
        });
        Self {
            done: Arc::new(AtomicU64::new(0)),
            total,
            start: Instant::now(),
            bar,
            lines: !tty && !quiet,
        }
    }

    /// Follows `done` until `stop`; run as its own task.
    pub async fn run(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut quarter = 0;
        loop {
            let done = self.done.load(Ordering::Relaxed);
            if let Some(bar) = &self.bar {
                bar.set_position(done);
            } else if let Some(q) = (done * 4)
                .checked_div(self.total)
                .filter(|q| *q > quarter && self.lines)
            {
                quarter = q;
                eprintln!("{}", self.line(done));
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        if let Some(bar) = &self.bar {
            bar.set_position(self.done.load(Ordering::Relaxed));
            bar.finish();
        }
    }

    fn line(&self, done: u64) -> String {
        let pct = (done * 100).checked_div(self.total).unwrap_or(100).min(100);
        format!(
            "{pct:3}% {:.1}/{:.1} MiB {:.1} MiB/s",
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
