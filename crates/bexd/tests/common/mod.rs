//! Starting the real `bexd` binary for integration tests, and talking to it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A running bexd with a unix NBD socket and a unix QMP socket in a temp dir.
pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub nbd_socket: PathBuf,
    pub qmp_socket: PathBuf,
}

impl Daemon {
    /// Starts bexd with `extra` options after the NBD server and the monitor.
    pub fn start(server_opts: &str, extra: &[String]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let nbd_socket = dir.path().join("nbd.sock");
        let qmp_socket = dir.path().join("qmp.sock");
        let mut args = vec![
            "--chardev".to_string(),
            format!(
                "socket,id=m0,path={},server=on,wait=off",
                qmp_socket.display()
            ),
            "--monitor".to_string(),
            "chardev=m0".to_string(),
            "--nbd-server".to_string(),
            format!(
                "addr.type=unix,addr.path={}{server_opts}",
                nbd_socket.display()
            ),
        ];
        args.extend(extra.iter().cloned());
        let child = Command::new(env!("CARGO_BIN_EXE_bexd"))
            .args(&args)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn bexd");
        let d = Self {
            child,
            dir,
            nbd_socket,
            qmp_socket,
        };
        wait_for_socket(&d.nbd_socket);
        wait_for_socket(&d.qmp_socket);
        d
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn nbd(&self) -> UnixStream {
        let s = UnixStream::connect(&self.nbd_socket).expect("connect nbd");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp_socket)
    }

    /// SIGTERM, then the exit code.
    pub fn stop(mut self) -> Option<i32> {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!("bexd did not exit after SIGTERM");
    }

    pub fn is_alive(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if UnixStream::connect(path).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{} never accepted connections", path.display());
}

/// A minimal synchronous QMP client (the Python suite uses qemu.qmp).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub greeting: Value,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path) -> Self {
        let s = UnixStream::connect(path).expect("connect qmp");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let writer = s.try_clone().unwrap();
        let mut q = Self {
            reader: BufReader::new(s),
            writer,
            greeting: Value::Null,
        };
        q.greeting = q.read();
        let r = q.execute("qmp_capabilities", json!({}));
        assert_eq!(r, json!({"return": {}}));
        q
    }

    pub fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read qmp line");
        assert!(line.ends_with("\r\n"), "QMP lines end in CRLF: {line:?}");
        serde_json::from_str(&line).expect("qmp json")
    }

    pub fn send_raw(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).unwrap();
    }

    /// Sends a command; returns the response, skipping (and keeping) events.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Value {
        let msg = json!({"execute": command, "arguments": arguments});
        self.send_raw(&format!("{msg}\n"));
        loop {
            let v = self.read();
            if v.get("event").is_none() {
                return v;
            }
        }
    }
}

/// Reads exactly `n` bytes.
pub fn read_n(s: &mut impl Read, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).expect("read");
    buf
}
