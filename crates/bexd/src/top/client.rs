//! The QMP side of `bexd top`: a blocking line-per-message client that
//! negotiates capabilities and asks for `x-query-export-stats`, skipping
//! events (the view has no place for them).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

use serde_json::{json, Value};

/// Why the monitor could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("monitor connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the monitor closed the connection")]
    Closed,
    #[error("the monitor sent something that is not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("{command} failed: {desc}")]
    Command { command: String, desc: String },
}

pub struct Client {
    reader: BufReader<Box<dyn std::io::Read + Send>>,
    writer: Box<dyn Write + Send>,
}

impl Client {
    /// Connects to a unix socket path or HOST:PORT and negotiates.
    pub fn connect(target: &str) -> Result<Self, ClientError> {
        let connect_error = |source| ClientError::Connect {
            target: target.to_string(),
            source,
        };
        let (r, w): (Box<dyn std::io::Read + Send>, Box<dyn Write + Send>) =
            if target.contains('/') || !target.contains(':') {
                let s = UnixStream::connect(target).map_err(connect_error)?;
                (Box::new(s.try_clone()?), Box::new(s))
            } else {
                let s = TcpStream::connect(target).map_err(connect_error)?;
                (Box::new(s.try_clone()?), Box::new(s))
            };
        let mut client = Self {
            reader: BufReader::new(r),
            writer: w,
        };
        client.read()?; // the greeting
        client.execute("qmp_capabilities")?;
        Ok(client)
    }

    fn read(&mut self) -> Result<Value, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Closed);
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs a command without arguments; its `return` value.
    pub fn execute(&mut self, command: &str) -> Result<Value, ClientError> {
        writeln!(self.writer, "{}", json!({ "execute": command }))?;
        self.writer.flush()?;
        loop {
            let mut reply = self.read()?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(ret) = reply.get_mut("return") {
                return Ok(ret.take());
            }
            let desc = reply["error"]["desc"]
                .as_str()
                .unwrap_or("no reply")
                .to_string();
            return Err(ClientError::Command {
                command: command.to_string(),
                desc,
            });
        }
    }
}
