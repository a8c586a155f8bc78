//! `bexd top`: a live view of a running daemon's exports over QMP (per
//! export IOPS, MiB/s, mean latency, clients, totals), for the person on the
//! machine. It reads bexd's `x-query-export-stats` once per interval and
//! shows the differences; `--batch` prints the same table as text, as
//! `top -b` does, for scripts and logs.

mod sample;
mod view;

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use clap::Parser;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use serde_json::json;

use crate::qmp_client::{ClientError, QmpClient};
use sample::Sample;

#[derive(Debug, Parser)]
#[command(
    name = "bexd top",
    about = "A live view of a running bexd's exports (IOPS, MiB/s, latency, clients)",
    version
)]
struct TopArgs {
    /// The daemon's QMP monitor: a unix socket path or HOST:PORT.
    monitor: String,
    /// Seconds between updates.
    #[arg(short = 'd', long = "delay", default_value_t = 1.0, value_parser = parse_delay)]
    delay: f64,
    /// Stop after this many updates.
    #[arg(short = 'n', long = "iterations", value_parser = clap::value_parser!(u64).range(1..))]
    iterations: Option<u64>,
    /// Print plain text to standard output instead of drawing the screen
    /// (also what happens when standard output is not a terminal).
    #[arg(short = 'b', long = "batch")]
    batch: bool,
}

fn parse_delay(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(d) if d.is_finite() && (0.01..=86_400.0).contains(&d) => Ok(d),
        _ => Err(format!(
            "'{s}' is not a delay in seconds between 0.01 and 86400"
        )),
    }
}

/// Runs `bexd top`; returns the exit code.
pub fn main(args: &[String]) -> i32 {
    let argv = std::iter::once("bexd top".to_string()).chain(args.iter().cloned());
    let args = match TopArgs::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return 0;
        }
        Err(e) => {
            // One line, as every bexd command-line error.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("bexd top: {}", first.trim_start_matches("error: "));
            return 1;
        }
    };
    let outcome = QmpClient::connect_ready(&args.monitor).and_then(|client| {
        let watch = Watch {
            client,
            args: &args,
            last: None,
        };
        match args.batch || !std::io::stdout().is_terminal() {
            true => watch.batch(),
            false => watch.screen(),
        }
    });
    match outcome {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bexd top: {e}");
            1
        }
    }
}

/// The monitor being watched and the previous reading.
struct Watch<'a> {
    client: QmpClient,
    args: &'a TopArgs,
    last: Option<Sample>,
}

impl Watch<'_> {
    /// Reads the counters and returns the title and rows to show.
    fn update(&mut self) -> Result<(String, Vec<sample::ExportRow>), ClientError> {
        let reply = self.client.command("x-query-export-stats", json!({}))?;
        let now = sample::parse(&reply, Instant::now())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let rows = sample::rows(self.last.as_ref(), &now);
        self.last = Some(now);
        let title = view::title(&self.args.monitor, self.args.delay, &rows);
        Ok((title, rows))
    }

    fn batch(mut self) -> Result<(), ClientError> {
        let mut done = 0;
        loop {
            let (title, rows) = self.update()?;
            println!("{}", view::text(&title, &rows));
            done += 1;
            if self.args.iterations.is_some_and(|n| done >= n) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs_f64(self.args.delay));
        }
    }

    /// The full-screen view until `q`, Esc or Ctrl-C (or `--iterations`);
    /// the terminal is given back as it was, also on an error.
    fn screen(mut self) -> Result<(), ClientError> {
        let mut terminal = ratatui::init();
        let result = (|| {
            let mut done = 0;
            loop {
                let (title, rows) = self.update()?;
                terminal.draw(|frame| view::draw(frame, &title, &rows))?;
                done += 1;
                if self.args.iterations.is_some_and(|n| done >= n) {
                    return Ok(());
                }
                if quit_pressed_within(Duration::from_secs_f64(self.args.delay))? {
                    return Ok(());
                }
            }
        })();
        ratatui::restore();
        result
    }
}

/// Waits up to `wait` for a key; true if it asks to quit.
fn quit_pressed_within(wait: Duration) -> std::io::Result<bool> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if !event::poll(left)? {
            return Ok(false);
        }
        if let Event::Key(key) = event::read()? {
            let ctrl_c =
                key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
            let quit = matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c;
            if key.kind == KeyEventKind::Press && quit {
                return Ok(true);
            }
        }
    }
}
