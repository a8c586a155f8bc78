//! `--trace`/`-T [[enable=]PATTERN][,events=FILE][,file=FILE]`, as
//! qemu-storage-daemon takes it, mapped onto bexd's log targets.
//!
//! QEMU's trace events are named by subsystem (`nbd_*`, `qmp_*`, `bdrv_*`,
//! ...); bexd has no per-event trace points, but its `tracing` targets follow
//! the same subsystems. A pattern turns on TRACE level for every bexd target
//! of the subsystems it can match, so `-T 'nbd_*'` shows what the NBD server
//! logs. A pattern that matches none of them is refused (QEMU only warns
//! about an unknown event), so a trace that shows nothing is never silent.
//! `file=FILE` sends the log there instead of stderr; `events=FILE` reads
//! one pattern a line (`#` comments, a leading `-` turns a subsystem off).

use std::path::PathBuf;

use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::log_output::{DatagramLog, LogFormat, LogTarget};

/// QEMU event-name prefixes and the bexd log targets of that subsystem.
const AREAS: &[(&str, &[&str])] = &[
    ("nbd_", &["bexd::nbd_server", "nbd"]),
    ("qmp_", &["bexd::monitor", "bexd::commands"]),
    ("monitor_", &["bexd::monitor"]),
    ("handle_qmp_command", &["bexd::monitor"]),
    ("bdrv_", &["block", "bexd::nodes"]),
    ("blk_", &["block", "bexd::nodes"]),
    ("qcow2_", &["block::drivers::qcow2"]),
    ("file_", &["block::drivers::file"]),
    ("raw_", &["block::drivers::raw"]),
    ("blkdebug_", &["block::drivers::blkdebug"]),
    ("luring_", &["block::uring"]),
    ("block_export_", &["bexd::exports"]),
    ("qio_channel_tls_", &["bexd::tls", "bexd::nbd_server::tls"]),
    ("qcrypto_tls_", &["bexd::tls"]),
];

/// What the `--trace` options ask for, as `tracing` filter directives,
/// and where the log goes (`--log-target`, `--log-format`, see
/// `log_output.rs`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TraceConfig {
    pub directives: Vec<String>,
    pub file: Option<PathBuf>,
    pub format: LogFormat,
    pub target: LogTarget,
}

/// Adds one `--trace` argument to `config`; the error is one line.
pub fn apply(config: &mut TraceConfig, arg: &str) -> Result<(), String> {
    let mut pattern = None;
    for (i, item) in arg.split(',').enumerate() {
        match item.split_once('=') {
            Some(("enable", v)) => pattern = Some(v.to_string()),
            Some(("events", f)) => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| format!("{f}: {}", crate::util::strerror(&e)))?;
                for line in text.lines().map(str::trim) {
                    if !line.is_empty() && !line.starts_with('#') {
                        add_pattern(config, line)?;
                    }
                }
            }
            Some(("file", f)) => config.file = Some(PathBuf::from(f)),
            Some((key, _)) => return Err(format!("Invalid parameter '{key}'")),
            None if i == 0 => pattern = Some(item.to_string()),
            None => return Err(format!("Invalid parameter '{item}'")),
        }
    }
    match pattern.as_deref() {
        None | Some("") => Ok(()),
        Some(p) => add_pattern(config, p),
    }
}

fn add_pattern(config: &mut TraceConfig, pattern: &str) -> Result<(), String> {
    let (level, glob) = match pattern.strip_prefix('-') {
        Some(rest) => ("off", rest),
        None => ("trace", pattern),
    };
    let targets = targets_for(glob);
    if targets.is_empty() {
        return Err(format!(
            "trace pattern '{glob}' matches no bexd trace target (bexd maps {})",
            AREAS
                .iter()
                .map(|(p, _)| format!("{p}*"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for t in targets {
        config.directives.push(format!("{t}={level}"));
    }
    Ok(())
}

/// The targets of every area an event matching `glob` could belong to: the
/// glob's literal head (up to its first `*` or `?`) and the area's prefix
/// must agree as far as both go.
fn targets_for(glob: &str) -> Vec<&'static str> {
    let head = glob.split(['*', '?']).next().unwrap_or("");
    let whole = head.len() == glob.len();
    let mut out = Vec::new();
    for (prefix, targets) in AREAS {
        let agrees = match whole {
            // An exact event name: it must lie in the area.
            true => head.starts_with(prefix),
            false => head.starts_with(prefix) || prefix.starts_with(head),
        };
        if agrees {
            for t in *targets {
                if !out.contains(t) {
                    out.push(*t);
                }
            }
        }
    }
    out
}

/// Installs the log: `BEXD_LOG` (else `default_level`) plus what `--trace`
/// turned on, to stderr, the trace's `file=`, syslog or the journal, as
/// text or JSON.
pub fn init(trace: &TraceConfig, default_level: &str) -> Result<(), String> {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("BEXD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    for d in &trace.directives {
        let directive = d
            .parse()
            .map_err(|e| format!("--trace: bad filter '{d}': {e}"))?;
        filter = filter.add_directive(directive);
    }
    let (writer, ansi, timestamped) = match (&trace.file, trace.target) {
        (Some(_), LogTarget::Syslog | LogTarget::Journal) => {
            return Err("--trace file= and --log-target both say where the log goes".into())
        }
        // Colour only for a person at a terminal, not in a captured log.
        (None, LogTarget::Stderr) => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            true,
        ),
        (Some(path), LogTarget::Stderr) => {
            let file = std::fs::File::create(path)
                .map_err(|e| format!("--trace file={}: {e}", path.display()))?;
            (BoxMakeWriter::new(std::sync::Mutex::new(file)), false, true)
        }
        // The receiver stamps the time and keeps the level as the priority.
        (None, target) => (
            BoxMakeWriter::new(DatagramLog::connect(target)?),
            false,
            false,
        ),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match (trace.format, timestamped) {
        (LogFormat::Json, _) => registry.with(layer.json()).try_init(),
        (LogFormat::Text, true) => registry.with(layer).try_init(),
        (LogFormat::Text, false) => registry
            .with(layer.without_time().with_level(false))
            .try_init(),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<TraceConfig, String> {
        let mut c = TraceConfig::default();
        for a in args {
            apply(&mut c, a)?;
        }
        Ok(c)
    }

    #[test]
    fn test_nbd_pattern_enables_the_nbd_targets() {
        let c = config(&["nbd_*"]).unwrap();
        assert_eq!(c.directives, ["bexd::nbd_server=trace", "nbd=trace"]);
        assert_eq!(c.file, None);
    }

    #[test]
    fn test_exact_event_maps_to_its_area() {
        let c = config(&["enable=nbd_co_send_simple_reply,file=/tmp/t.log"]).unwrap();
        assert_eq!(c.directives, ["bexd::nbd_server=trace", "nbd=trace"]);
        assert_eq!(c.file, Some(PathBuf::from("/tmp/t.log")));
    }

    #[test]
    fn test_star_enables_everything_mapped() {
        let c = config(&["*"]).unwrap();
        assert!(c.directives.contains(&"block=trace".to_string()));
        assert!(c.directives.contains(&"bexd::monitor=trace".to_string()));
    }

    #[test]
    fn test_unmapped_pattern_is_refused() {
        let e = config(&["vfio_*"]).unwrap_err();
        assert!(e.starts_with("trace pattern 'vfio_*' matches no bexd trace target"));
        assert!(config(&["nbdx"]).is_err());
    }

    #[test]
    fn test_bad_key_is_qemus_error() {
        assert_eq!(
            config(&["nbd_*,bogus=1"]).unwrap_err(),
            "Invalid parameter 'bogus'"
        );
    }

    #[test]
    fn test_events_file_with_comments_and_negation() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ev");
        std::fs::write(&f, "# nbd\nnbd_*\n\n-qcow2_*\n").unwrap();
        let c = config(&[&format!("events={}", f.display())]).unwrap();
        assert_eq!(
            c.directives,
            [
                "bexd::nbd_server=trace",
                "nbd=trace",
                "block::drivers::qcow2=off"
            ]
        );
    }

    #[test]
    fn test_missing_events_file_is_an_error() {
        let e = config(&["events=/nonexistent/ev"]).unwrap_err();
        assert_eq!(e, "/nonexistent/ev: No such file or directory");
    }
}
