//! `bexd top SOCKET|HOST:PORT [--interval SECONDS]`: a live view of a
//! running daemon's exports over QMP (`x-query-export-stats`): per export its
//! clients, requests in flight, IOPS, read and write MiB/s and mean latency
//! over the last interval, and totals since it was added. `q`, Esc or
//! Ctrl-C quits.
//!
//! `client.rs` talks QMP, `rates.rs` turns two answers into rows, `view.rs`
//! draws them (ratatui on crossterm).

mod client;
mod rates;
mod view;

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use client::{Client, ClientError};

const USAGE: &str = "usage: bexd top SOCKET|HOST:PORT [--interval SECONDS]";

/// Why `bexd top` stopped short.
#[derive(Debug, thiserror::Error)]
enum TopError {
    #[error("{USAGE}")]
    Usage,
    #[error("--interval takes a number of seconds from 0.1 to 3600, not '{0}'")]
    Interval(String),
    #[error("bexd top needs a terminal")]
    NoTerminal,
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("terminal: {0}")]
    Terminal(#[from] std::io::Error),
}

struct Options {
    target: String,
    interval: Duration,
}

fn parse(args: &[String]) -> Result<Options, TopError> {
    let mut target = None;
    let mut interval = Duration::from_secs(1);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--interval" | "-d" => {
                let v = it.next().ok_or(TopError::Usage)?;
                interval = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| (0.1..=3600.0).contains(s))
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| TopError::Interval(v.clone()))?;
            }
            a if a.starts_with('-') => return Err(TopError::Usage),
            a if target.is_none() => target = Some(a.to_string()),
            _ => return Err(TopError::Usage),
        }
    }
    Ok(Options {
        target: target.ok_or(TopError::Usage)?,
        interval,
    })
}

/// Runs the view; returns the exit code.
pub fn main(args: &[String]) -> i32 {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return 0;
    }
    match parse(args).and_then(|o| run(&o)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bexd top: {e}");
            1
        }
    }
}

fn run(options: &Options) -> Result<(), TopError> {
    if !std::io::stdout().is_terminal() {
        return Err(TopError::NoTerminal);
    }
    let mut client = Client::connect(&options.target)?;
    let mut terminal = ratatui::init();
    let result = watch(&mut terminal, &mut client, options);
    ratatui::restore();
    result
}

/// Polls and redraws until a quit key or a failed query.
fn watch(
    terminal: &mut ratatui::DefaultTerminal,
    client: &mut Client,
    options: &Options,
) -> Result<(), TopError> {
    let mut before: Option<(serde_json::Value, Instant)> = None;
    loop {
        let now = client.execute("x-query-export-stats")?;
        let taken = Instant::now();
        let (old, seconds) = match &before {
            Some((v, t)) => (Some(v), taken.duration_since(*t).as_secs_f64()),
            None => (None, 0.0),
        };
        let rows = rates::rows(old, &now, seconds);
        let status = format!(
            "{} exports, every {:.1} s",
            rows.len(),
            options.interval.as_secs_f64()
        );
        terminal.draw(|f| view::draw(f, &options.target, &rows, &status))?;
        before = Some((now, taken));
        let deadline = taken + options.interval;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if !event::poll(left)? {
                break;
            }
            if let Event::Key(key) = event::read()? {
                let ctrl_c =
                    key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c');
                let quit = matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c;
                if key.kind == KeyEventKind::Press && quit {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn test_parse_takes_a_target_and_an_interval_and_refuses_the_rest() {
        let o = parse(&args(&["/run/q.sock", "--interval", "0.5"])).unwrap();
        assert_eq!(
            (o.target.as_str(), o.interval),
            ("/run/q.sock", Duration::from_millis(500))
        );
        assert!(matches!(parse(&args(&[])), Err(TopError::Usage)));
        assert!(matches!(parse(&args(&["a", "b"])), Err(TopError::Usage)));
        assert!(matches!(
            parse(&args(&["a", "--bogus"])),
            Err(TopError::Usage)
        ));
        assert!(matches!(
            parse(&args(&["a", "--interval", "0"])),
            Err(TopError::Interval(_))
        ));
        assert!(matches!(
            parse(&args(&["a", "--interval", "x"])),
            Err(TopError::Interval(_))
        ));
    }
}
