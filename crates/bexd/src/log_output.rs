//! Where the log goes and in what form: `--log-target=stderr|syslog|journal`
//! and `--log-format=text|json` (bexd's own options; QEMU only writes to
//! stderr). Under systemd stderr already reaches the journal, but without
//! levels; the journal and syslog targets send each event as one datagram
//! with its priority, so `journalctl -p warning` and syslog filters work.
//!
//! syslog: RFC 3164's `<PRI>bexd[PID]: message` to `/dev/log`, facility
//! daemon. journal: systemd's native protocol (`MESSAGE`, `PRIORITY`,
//! `SYSLOG_IDENTIFIER`, `SYSLOG_PID`, `BEXD_TARGET`) to
//! `/run/systemd/journal/socket`. `BEXD_SYSLOG_SOCKET` and
//! `BEXD_JOURNAL_SOCKET` override the paths (tests).

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Arc;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object a line (tracing-subscriber's: timestamp, level,
    /// target, fields).
    Json,
}

/// `--log-target`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogTarget {
    #[default]
    Stderr,
    Syslog,
    Journal,
}

/// A bad `--log-format`/`--log-target` value, naming the option.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogOptionError {
    #[error("--log-format: '{0}' is not one of text, json")]
    Format(String),
    #[error("--log-target: '{0}' is not one of stderr, syslog, journal")]
    Target(String),
}

impl std::str::FromStr for LogFormat {
    type Err = LogOptionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(LogOptionError::Format(s.to_string())),
        }
    }
}

impl std::str::FromStr for LogTarget {
    type Err = LogOptionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stderr" => Ok(Self::Stderr),
            "syslog" => Ok(Self::Syslog),
            "journal" => Ok(Self::Journal),
            _ => Err(LogOptionError::Target(s.to_string())),
        }
    }
}

impl LogFormat {
    /// The option's value as written.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

impl LogTarget {
    /// The option's value as written.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stderr => "stderr",
            Self::Syslog => "syslog",
            Self::Journal => "journal",
        }
    }

    /// The socket this target sends to; `None` for stderr.
    pub fn socket_path(self) -> Option<PathBuf> {
        let (var, default) = match self {
            Self::Stderr => return None,
            Self::Syslog => ("BEXD_SYSLOG_SOCKET", "/dev/log"),
            Self::Journal => ("BEXD_JOURNAL_SOCKET", "/run/systemd/journal/socket"),
        };
        Some(std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from))
    }
}

/// Sends each log event as one datagram to syslog or the journal.
#[derive(Clone, Debug)]
pub struct DatagramLog {
    socket: Arc<UnixDatagram>,
    target: LogTarget,
    pid: u32,
}

impl DatagramLog {
    /// Connects to `target`'s socket; the error is one line naming it.
    pub fn connect(target: LogTarget) -> Result<Self, String> {
        let path = target
            .socket_path()
            .ok_or_else(|| "stderr is no datagram target".to_string())?;
        Self::connect_to(target, &path)
    }

    /// [`Self::connect`] to the socket at `path`.
    pub fn connect_to(target: LogTarget, path: &std::path::Path) -> Result<Self, String> {
        let fail = |e: std::io::Error| {
            format!(
                "--log-target: cannot reach {}: {}",
                path.display(),
                crate::util::strerror(&e)
            )
        };
        let socket = UnixDatagram::unbound().map_err(fail)?;
        socket.connect(path).map_err(fail)?;
        Ok(Self {
            socket: Arc::new(socket),
            target,
            pid: std::process::id(),
        })
    }
}

/// syslog's severity for a tracing level (TRACE has none below debug).
fn severity(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// syslog's facility `daemon`.
const FACILITY_DAEMON: u8 = 3;

/// One event being formatted; sent when the formatter drops it.
pub struct Datagram<'a> {
    log: &'a DatagramLog,
    severity: u8,
    target: String,
    text: Vec<u8>,
}

impl Write for Datagram<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Datagram<'_> {
    fn drop(&mut self) {
        while self.text.last() == Some(&b'\n') {
            self.text.pop();
        }
        if self.text.is_empty() {
            return;
        }
        let packet = match self.log.target {
            LogTarget::Journal => {
                journal_packet(&self.text, self.severity, &self.target, self.log.pid)
            }
            _ => syslog_packet(&self.text, self.severity, self.log.pid),
        };
        // Nowhere to report a lost log line; the daemon serves on.
        let _ = self.log.socket.send(&packet);
    }
}

/// RFC 3164 without timestamp and host, which the receiver adds:
/// `<PRI>bexd[PID]: text`.
pub fn syslog_packet(text: &[u8], severity: u8, pid: u32) -> Vec<u8> {
    let mut p = format!("<{}>bexd[{pid}]: ", FACILITY_DAEMON * 8 + severity).into_bytes();
    p.extend_from_slice(text);
    p
}

/// systemd's native journal protocol. MESSAGE uses the binary form (name,
/// newline, 64-bit little-endian length, bytes, newline) so that a message
/// with newlines stays one field.
pub fn journal_packet(text: &[u8], severity: u8, target: &str, pid: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(text.len() + 128);
    p.extend_from_slice(b"MESSAGE\n");
    p.extend_from_slice(&(text.len() as u64).to_le_bytes());
    p.extend_from_slice(text);
    p.extend_from_slice(
        format!(
            "\nPRIORITY={severity}\nSYSLOG_IDENTIFIER=bexd\nSYSLOG_PID={pid}\nBEXD_TARGET={target}\n"
        )
        .as_bytes(),
    );
    p
}

impl<'a> MakeWriter<'a> for DatagramLog {
    type Writer = Datagram<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Datagram {
            log: self,
            severity: 6,
            target: "bexd".to_string(),
            text: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        Datagram {
            log: self,
            severity: severity(meta.level()),
            target: meta.target().to_string(),
            text: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_values_parse_and_bad_ones_name_the_option() {
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert_eq!("journal".parse(), Ok(LogTarget::Journal));
        assert_eq!(
            "xml".parse::<LogFormat>().unwrap_err().to_string(),
            "--log-format: 'xml' is not one of text, json"
        );
        assert_eq!(
            "file".parse::<LogTarget>().unwrap_err().to_string(),
            "--log-target: 'file' is not one of stderr, syslog, journal"
        );
    }

    #[test]
    fn test_syslog_packet_has_daemon_facility_and_pid() {
        assert_eq!(syslog_packet(b"hello", 4, 42), b"<28>bexd[42]: hello");
    }

    #[test]
    fn test_journal_packet_keeps_newlines_in_one_field() {
        let p = journal_packet(b"a\nb", 3, "bexd::x", 7);
        assert!(p.starts_with(b"MESSAGE\n\x03\0\0\0\0\0\0\0a\nb\n"));
        assert!(
            p.ends_with(b"PRIORITY=3\nSYSLOG_IDENTIFIER=bexd\nSYSLOG_PID=7\nBEXD_TARGET=bexd::x\n")
        );
    }

    #[test]
    fn test_events_arrive_one_datagram_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let listener = UnixDatagram::bind(&path).unwrap();
        let log = DatagramLog::connect_to(LogTarget::Syslog, &path).unwrap();
        {
            let mut w = log.make_writer();
            w.write_all(b"part one, ").unwrap();
            w.write_all(b"part two\n").unwrap();
        }
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        let expected = format!("<30>bexd[{}]: part one, part two", std::process::id());
        assert_eq!(&buf[..n], expected.as_bytes());
    }
}
