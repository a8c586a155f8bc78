//! A blocking QMP client for bexd's own tools (`bexd qmp`, `bexd top`):
//! connect to a monitor on a unix socket or `HOST:PORT`, take the greeting,
//! leave capabilities negotiation, run commands. One JSON document per line
//! each way, as QEMU's monitor writes them.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};

/// A QMP connection in command mode.
pub struct QmpClient {
    reader: BufReader<Box<dyn std::io::Read>>,
    writer: Box<dyn Write>,
    set_timeout: Box<dyn Fn(Option<Duration>) -> std::io::Result<()>>,
    /// The greeting's `QMP` member (version, capabilities).
    pub greeting: Value,
}

/// A command's `error` reply: QEMU's class and description.
#[derive(Debug, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct CommandError {
    pub class: String,
    pub desc: String,
}

/// What can go wrong talking to a monitor.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(std::io::Error),
    #[error("the monitor closed the connection")]
    Closed,
    #[error("not a QMP greeting: {0}")]
    NoGreeting(String),
    #[error(transparent)]
    Command(#[from] CommandError),
}

impl From<std::io::Error> for ClientError {
    /// A peer that went away is [`ClientError::Closed`], however the
    /// kernel said it (end of stream, EPIPE on a write, a reset).
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
        match e.kind() {
            BrokenPipe | ConnectionReset | ConnectionAborted => Self::Closed,
            _ => Self::Io(e),
        }
    }
}

impl QmpClient {
    /// Connects to `target` (a unix socket path, or `HOST:PORT`) and reads
    /// the greeting, without leaving capabilities negotiation.
    pub fn connect(target: &str) -> Result<Self, ClientError> {
        let connect_error = |source| ClientError::Connect {
            target: target.to_string(),
            source,
        };
        let (r, w, timeout): (Box<dyn std::io::Read>, Box<dyn Write>, _) =
            if target.contains('/') || !target.contains(':') {
                let s = UnixStream::connect(target).map_err(connect_error)?;
                let (r, w) = (s.try_clone()?, s.try_clone()?);
                let t: Box<dyn Fn(Option<Duration>) -> std::io::Result<()>> =
                    Box::new(move |d| s.set_read_timeout(d));
                (Box::new(r), Box::new(w), t)
            } else {
                let s = TcpStream::connect(target).map_err(connect_error)?;
                let (r, w) = (s.try_clone()?, s.try_clone()?);
                let t: Box<dyn Fn(Option<Duration>) -> std::io::Result<()>> =
                    Box::new(move |d| s.set_read_timeout(d));
                (Box::new(r), Box::new(w), t)
            };
        let mut client = Self {
            reader: BufReader::new(r),
            writer: w,
            set_timeout: timeout,
            greeting: Value::Null,
        };
        let greeting = client.read()?.ok_or(ClientError::Closed)?;
        match greeting.get("QMP") {
            Some(qmp) => client.greeting = qmp.clone(),
            None => return Err(ClientError::NoGreeting(greeting.to_string())),
        }
        Ok(client)
    }

    /// [`Self::connect`], then `qmp_capabilities`.
    pub fn connect_ready(target: &str) -> Result<Self, ClientError> {
        let mut client = Self::connect(target)?;
        client.command("qmp_capabilities", json!({}))?;
        Ok(client)
    }

    /// The next document from the monitor; `None` at end of stream.
    pub fn read(&mut self) -> Result<Option<Value>, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e).into())
    }

    pub fn send(&mut self, v: &Value) -> Result<(), ClientError> {
        writeln!(self.writer, "{v}")?;
        self.writer.flush()?;
        Ok(())
    }

    /// Sends `request` and returns its reply whole (`return` or `error`),
    /// handing events that arrive first to `on_event`.
    pub fn execute(
        &mut self,
        request: &Value,
        mut on_event: impl FnMut(&Value),
    ) -> Result<Value, ClientError> {
        self.send(request)?;
        loop {
            match self.read()? {
                Some(m) if m.get("event").is_some() => on_event(&m),
                Some(reply) => return Ok(reply),
                None => return Err(ClientError::Closed),
            }
        }
    }

    /// Runs `name` with `arguments` and returns its `return` value; an
    /// error reply becomes [`CommandError`]. Events are dropped.
    pub fn command(&mut self, name: &str, arguments: Value) -> Result<Value, ClientError> {
        let reply = self.execute(&json!({"execute": name, "arguments": arguments}), |_| {})?;
        if let Some(e) = reply.get("error") {
            return Err(CommandError {
                class: e["class"].as_str().unwrap_or("?").to_string(),
                desc: e["desc"].as_str().unwrap_or("?").to_string(),
            }
            .into());
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Hands events that already arrived (within `wait`) to `on_event`.
    pub fn drain_events(
        &mut self,
        wait: Duration,
        mut on_event: impl FnMut(&Value),
    ) -> Result<(), ClientError> {
        (self.set_timeout)(Some(wait))?;
        let result = loop {
            match self.read() {
                Ok(Some(m)) => on_event(&m),
                Ok(None) => break Ok(()),
                Err(ClientError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break Ok(())
                }
                Err(e) => break Err(e),
            }
        };
        (self.set_timeout)(None)?;
        result
    }
}
