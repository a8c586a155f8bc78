//! `bexd serve`'s command line: qemu-nbd's options, same spelling, same
//! defaults and the same refusals (qemu-nbd's messages, which scripts and
//! people already know), checked before anything is opened.
//!
//! Parsing is clap's; the checks that qemu-nbd makes on the values (numbers,
//! modes, options that need another) are [`ServeArgs::check`], which turns the
//! raw strings into a [`ServePlan`] of plain values.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use nbd::consts::MAX_STRING;

use crate::log_output::{LogFormat, LogTarget};

/// qemu-nbd's default port (the IANA NBD port).
pub const DEFAULT_PORT: u16 = 10809;
/// qemu-nbd's default handshake limit, in seconds.
const DEFAULT_HANDSHAKE_LIMIT: u64 = 10;

#[derive(Debug, Parser)]
#[command(
    name = "bexd serve",
    about = "Serve one disk image over NBD: a drop-in qemu-nbd (same options, same defaults)",
    after_help = "bexd's own: --qmp PATH also serves a QMP monitor on a unix socket. The URI to \
                  connect to is printed on standard output once the server is ready.",
    version = crate::version::VERSION
)]
pub struct ServeArgs {
    /// The image file or block device to export (with --image-opts: its
    /// options, e.g. driver=qcow2,file.driver=file,file.filename=d.qcow2).
    pub image: Vec<String>,
    /// Port to listen on.
    #[arg(short, long, value_name = "PORT", allow_hyphen_values = true)]
    pub port: Option<String>,
    /// Interface to bind to (default 0.0.0.0, as qemu-nbd).
    #[arg(short, long, value_name = "IFACE")]
    pub bind: Option<String>,
    /// Listen on this unix socket instead of TCP.
    #[arg(short = 'k', long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Clients that may share the export at once (default 1; 0 = unlimited).
    /// More than one turns on multi-conn.
    #[arg(short = 'e', long, value_name = "NUM", allow_hyphen_values = true)]
    pub shared: Option<String>,
    /// Keep serving after the last client leaves (without it, bexd serve
    /// exits when the last client that reached transmission disconnects).
    #[arg(short = 't', long)]
    pub persistent: bool,
    /// Log more (info-level events on standard error).
    #[arg(short, long)]
    pub verbose: bool,
    /// Export name (default: empty, the default export).
    #[arg(short = 'x', long, value_name = "NAME")]
    pub export_name: Option<String>,
    /// A human-readable description of the export.
    #[arg(short = 'D', long, value_name = "TEXT")]
    pub description: Option<String>,
    /// Drop clients that have not finished the handshake after N seconds
    /// (default 10, 0 = no limit).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub handshake_limit: Option<String>,
    /// Serve the image from this byte offset on.
    #[arg(short, long, value_name = "OFFSET", allow_hyphen_values = true)]
    pub offset: Option<String>,
    /// Offer qemu:allocation-depth.
    #[arg(short = 'A', long)]
    pub allocation_depth: bool,
    /// Offer this persistent dirty bitmap as qemu:dirty-bitmap:NAME (repeatable).
    #[arg(short = 'B', long, value_name = "NAME")]
    pub bitmap: Vec<String>,
    /// List the exports of another NBD server (a client, like qemu-nbd -L).
    #[arg(short = 'L', long)]
    pub list: bool,
    #[arg(long, value_name = "type,id=ID,...", help = object_help())]
    pub object: Vec<String>,
    /// Serve over TLS with the credentials of this --object.
    #[arg(long, value_name = "ID")]
    pub tls_creds: Option<String>,
    /// Check clients against this authz --object.
    #[arg(long, value_name = "ID")]
    pub tls_authz: Option<String>,
    /// The host name to check the server's certificate against (with -L).
    #[arg(long, value_name = "HOSTNAME")]
    pub tls_hostname: Option<String>,
    /// QEMU trace event patterns.
    #[arg(
        short = 'T',
        long,
        value_name = "[[enable=]PATTERN][,events=FILE][,file=FILE]"
    )]
    pub trace: Vec<String>,
    /// Log as text (default) or as one JSON object a line (bexd's own).
    #[arg(long, value_name = "text|json")]
    pub log_format: Option<LogFormat>,
    /// Send the log to stderr (default), syslog (/dev/log) or the systemd
    /// journal, each line's level as its priority (bexd's own).
    #[arg(long, value_name = "stderr|syslog|journal")]
    pub log_target: Option<LogTarget>,
    /// Fork off the server and exit once it is ready.
    #[arg(long)]
    pub fork: bool,
    /// Write the server's process id here.
    #[arg(long, value_name = "PATH", alias = "pidfile")]
    pub pid_file: Option<PathBuf>,
    /// An SELinux label for the listening socket.
    #[arg(long, value_name = "LABEL")]
    pub selinux_label: Option<String>,
    /// Attach the image to this kernel NBD device.
    #[arg(short = 'c', long, value_name = "DEV")]
    pub connect: Option<PathBuf>,
    /// Detach the kernel NBD device named in place of the image.
    #[arg(short = 'd', long)]
    pub disconnect: bool,
    /// Image format: raw or qcow2 (default: qcow2 if the image starts with
    /// qcow2's magic, else raw).
    #[arg(short = 'f', long, value_name = "FORMAT")]
    pub format: Option<String>,
    /// Export read-only.
    #[arg(short = 'r', long)]
    pub read_only: bool,
    /// Serve a throwaway overlay: writes go to a temporary qcow2 file whose
    /// backing file is the image, deleted on exit.
    #[arg(short = 's', long)]
    pub snapshot: bool,
    /// Serve an internal snapshot, read-only.
    #[arg(short = 'l', long, value_name = "SNAPSHOT_PARAM")]
    pub load_snapshot: Option<String>,
    /// Bypass the host page cache (the same as --cache=none).
    #[arg(short = 'n', long, action = clap::ArgAction::Count)]
    pub nocache: u8,
    /// none, writeback (default), writethrough, directsync or unsafe.
    #[arg(long, value_name = "MODE")]
    pub cache: Vec<String>,
    /// threads (default), native or io_uring.
    #[arg(long, value_name = "MODE")]
    pub aio: Vec<String>,
    /// ignore (default) or unmap: whether TRIM punches holes.
    #[arg(long, value_name = "MODE")]
    pub discard: Vec<String>,
    /// off (default), on or unmap.
    #[arg(long, value_name = "MODE")]
    pub detect_zeroes: Option<String>,
    /// Read IMAGE as a set of block-device options.
    #[arg(long)]
    pub image_opts: bool,
    /// Also serve a QMP monitor on this unix socket (bexd's own).
    #[arg(long, value_name = "PATH")]
    pub qmp: Option<PathBuf>,
}

/// `--cache`: QEMU's cache modes as the three switches they set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheMode {
    /// O_DIRECT on the image file.
    pub direct: bool,
    /// The export caches writes (false: every write is FUA, "writethrough").
    pub writeback: bool,
    /// Flushes are dropped ("unsafe").
    pub no_flush: bool,
}

impl CacheMode {
    /// QEMU's `bdrv_parse_cache_mode`: the mode names and what each sets.
    fn parse(mode: &str) -> Option<Self> {
        let (direct, writeback, no_flush) = match mode {
            "none" | "off" => (true, true, false),
            "writeback" => (false, true, false),
            "writethrough" => (false, false, false),
            "directsync" => (true, false, false),
            "unsafe" => (false, true, true),
            _ => return None,
        };
        Some(Self {
            direct,
            writeback,
            no_flush,
        })
    }
}

/// Where to listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
    /// Socket activation: descriptor 3 is a listening socket systemd (or
    /// `systemd-socket-activate`) made for us.
    Activated,
}

/// What bexd serve is asked to do, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServePlan {
    /// `-L`: list another server's exports.
    List(ListPlan),
    /// `-d DEV`: detach a kernel NBD device.
    Disconnect(PathBuf),
    /// Serve the image.
    Serve(Box<ImagePlan>),
}

/// `-L`: the server to ask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListPlan {
    pub listen: Listen,
    pub tls_creds: Option<String>,
    pub tls_hostname: Option<String>,
    pub objects: Vec<String>,
}

/// Serving one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImagePlan {
    /// The image path, or with --image-opts its options.
    pub image: String,
    pub image_opts: bool,
    pub format: Option<String>,
    pub read_only: bool,
    pub snapshot: bool,
    pub load_snapshot: Option<String>,
    pub offset: u64,
    pub cache: CacheMode,
    pub aio: String,
    pub discard_unmap: bool,
    pub detect_zeroes: String,
    pub listen: Listen,
    /// 0 = unlimited.
    pub shared: u32,
    pub persistent: bool,
    pub export_name: String,
    pub description: Option<String>,
    pub allocation_depth: bool,
    pub bitmaps: Vec<String>,
    pub handshake_limit: Option<Duration>,
    pub objects: Vec<String>,
    pub tls_creds: Option<String>,
    pub tls_authz: Option<String>,
    pub connect: Option<PathBuf>,
    pub fork: bool,
    pub pid_file: Option<PathBuf>,
    pub verbose: bool,
    pub trace: Vec<String>,
    pub log_format: LogFormat,
    pub log_target: LogTarget,
    pub qmp: Option<PathBuf>,
}

/// A refusal: the one line qemu-nbd prints (without its program name).
pub type Refusal = String;

impl ServeArgs {
    /// qemu-nbd's checks, in qemu-nbd's order where one command line could
    /// fail several.
    pub fn check(self) -> Result<ServePlan, Refusal> {
        let values = self.values()?;
        if self.list {
            return self.list_plan();
        }
        let image = match <[String; 1]>::try_from(self.image.clone()) {
            Ok([image]) => image,
            Err(_) => return Err("Invalid number of arguments".into()),
        };
        self.check_tls(false)?;
        self.check_selinux()?;
        if self.disconnect {
            return Ok(ServePlan::Disconnect(PathBuf::from(image)));
        }
        let listen = self.listen(socket_activation())?;
        Ok(ServePlan::Serve(Box::new(ImagePlan {
            image,
            image_opts: self.image_opts,
            format: self.format,
            // -l implies -r, as in qemu-nbd.
            read_only: self.read_only || self.load_snapshot.is_some(),
            snapshot: self.snapshot,
            load_snapshot: self.load_snapshot,
            offset: values.offset,
            cache: values.cache,
            aio: values.aio,
            discard_unmap: values.discard_unmap,
            detect_zeroes: values.detect_zeroes,
            listen,
            shared: values.shared,
            persistent: self.persistent,
            export_name: self.export_name.unwrap_or_default(),
            description: self.description,
            allocation_depth: self.allocation_depth,
            bitmaps: self.bitmap,
            handshake_limit: values.handshake_limit,
            objects: self.object,
            tls_creds: self.tls_creds,
            tls_authz: self.tls_authz,
            connect: self.connect,
            fork: self.fork,
            pid_file: self.pid_file,
            verbose: self.verbose,
            trace: self.trace,
            log_format: self.log_format.unwrap_or_default(),
            log_target: self.log_target.unwrap_or_default(),
            qmp: self.qmp,
        })))
    }

    /// The checks qemu-nbd makes while it reads each option.
    fn values(&self) -> Result<Values, Refusal> {
        let once = |given: usize, message: &str| match given {
            0 | 1 => Ok(()),
            _ => Err(message.to_string()),
        };
        once(
            self.cache.len() + usize::from(self.nocache),
            "-n and --cache can only be specified once",
        )?;
        once(self.aio.len(), "--aio can only be specified once")?;
        once(self.discard.len(), "--discard can only be specified once")?;
        let cache = match self.cache.first() {
            Some(mode) => {
                CacheMode::parse(mode).ok_or_else(|| format!("Invalid cache mode `{mode}'"))?
            }
            None if self.nocache > 0 => NO_CACHE,
            None => DEFAULT_CACHE,
        };
        let aio = match self.aio.first().map(String::as_str) {
            None => "threads".to_string(),
            Some(m @ ("threads" | "native" | "io_uring")) => m.to_string(),
            Some(m) => return Err(format!("Invalid aio mode '{m}'")),
        };
        let discard_unmap = match self.discard.first().map(String::as_str) {
            None | Some("ignore" | "off") => false,
            Some("unmap" | "on") => true,
            Some(m) => return Err(format!("Invalid discard mode `{m}'")),
        };
        let detect_zeroes = match self.detect_zeroes.as_deref() {
            None => "off".to_string(),
            Some(m @ ("off" | "on" | "unmap")) => m.to_string(),
            Some(m) => {
                return Err(format!(
                    "Failed to parse detect_zeroes mode: invalid parameter value: {m}"
                ))
            }
        };
        if detect_zeroes == "unmap" && !discard_unmap {
            return Err("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".into());
        }
        let offset = match &self.offset {
            None => 0,
            Some(s) => parse_offset(s)?,
        };
        if self.socket.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err("socket path must be absolute".into());
        }
        let shared = match &self.shared {
            None => 1,
            Some(s) => parse_c_integer(s)
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| i32::try_from(*n).is_ok())
                .ok_or_else(|| format!("Invalid shared device number '{s}'"))?,
        };
        if let Some(name) = self.export_name.as_ref().filter(|n| n.len() > MAX_STRING) {
            return Err(format!("export name '{name}' too long"));
        }
        if let Some(text) = self.description.as_ref().filter(|d| d.len() > MAX_STRING) {
            return Err(format!("export description '{text}' too long"));
        }
        let handshake_limit = match &self.handshake_limit {
            None => Some(Duration::from_secs(DEFAULT_HANDSHAKE_LIMIT)),
            Some(s) => match s.parse::<u32>() {
                Ok(0) => None,
                Ok(n) => Some(Duration::from_secs(u64::from(n))),
                Err(_) => return Err(format!("Invalid handshake limit '{s}'")),
            },
        };
        Ok(Values {
            cache,
            aio,
            discard_unmap,
            detect_zeroes,
            offset,
            shared,
            handshake_limit,
        })
    }

    /// `-L`: nothing about an image may be given.
    fn list_plan(&self) -> Result<ServePlan, Refusal> {
        if !self.image.is_empty() {
            return Err("List mode is incompatible with a file name".into());
        }
        let per_device = self.export_name.is_some()
            || self.description.is_some()
            || self.offset.is_some()
            || self.connect.is_some()
            || self.disconnect
            || self.format.is_some()
            || self.load_snapshot.is_some()
            || !self.bitmap.is_empty()
            || self.allocation_depth
            || !self.aio.is_empty()
            || !self.discard.is_empty()
            || !self.cache.is_empty()
            || self.nocache > 0;
        if per_device {
            return Err("List mode is incompatible with per-device settings".into());
        }
        if self.fork {
            return Err("List mode is incompatible with forking".into());
        }
        self.check_tls(true)?;
        self.check_selinux()?;
        Ok(ServePlan::List(ListPlan {
            listen: self.listen(0)?,
            tls_creds: self.tls_creds.clone(),
            tls_hostname: self.tls_hostname.clone(),
            objects: self.object.clone(),
        }))
    }

    fn check_tls(&self, list: bool) -> Result<(), Refusal> {
        if self.tls_creds.is_none() {
            if self.tls_authz.is_some() {
                return Err("--tls-authz is not permitted without --tls-creds".into());
            }
            if self.tls_hostname.is_some() {
                return Err("--tls-hostname is not permitted without --tls-creds".into());
            }
            return Ok(());
        }
        if self.connect.is_some() {
            return Err("TLS is not supported with a host device".into());
        }
        if self.tls_authz.is_some() && list {
            return Err("TLS authorization is incompatible with export list".into());
        }
        if self.tls_hostname.is_some() && !list {
            return Err("TLS hostname is only supported with export list".into());
        }
        Ok(())
    }

    /// qemu-nbd built with SELinux wants a socket for the label; bexd cannot
    /// label sockets, and says so as a qemu-nbd built without SELinux does.
    fn check_selinux(&self) -> Result<(), Refusal> {
        match &self.selinux_label {
            None => Ok(()),
            Some(_) if self.socket.is_none() && self.connect.is_none() => {
                Err("--selinux-label is not permitted without --socket".into())
            }
            Some(_) => Err("SELinux support not enabled in this binary".into()),
        }
    }

    /// Under socket activation the socket is systemd's and -k/-b/-p are
    /// refused (qemu-nbd's texts); otherwise a unix socket with -k (it wins
    /// over -b/-p, as in qemu-nbd), else TCP on -b (0.0.0.0) and -p (10809).
    /// `activated` is how many descriptors were passed (LISTEN_FDS).
    fn listen(&self, activated: u32) -> Result<Listen, Refusal> {
        if activated > 0 {
            let given = [
                (self.connect.is_some(), "NBD device"),
                (self.socket.is_some(), "Unix socket"),
                (self.bind.is_some(), "The interface"),
                (self.port.is_some(), "TCP port number"),
                (self.selinux_label.is_some(), "SELinux label"),
            ];
            if let Some((_, what)) = given.iter().find(|(given, _)| *given) {
                return Err(format!("{what} can't be set when using socket activation"));
            }
            if activated > 1 {
                return Err(
                    "qemu-nbd does not support socket activation with LISTEN_FDS > 1".into(),
                );
            }
            return Ok(Listen::Activated);
        }
        if let Some(path) = &self.socket {
            return Ok(Listen::Unix(path.clone()));
        }
        let host = self.bind.clone().unwrap_or_else(|| "0.0.0.0".into());
        let port = match &self.port {
            None => DEFAULT_PORT,
            Some(p) => p.parse::<u16>().map_err(|_| {
                format!("address resolution failed for {host}:{p}: Servname not supported for ai_socktype")
            })?,
        };
        Ok(Listen::Tcp { host, port })
    }
}

/// `--object`'s help, naming every type the parser takes.
fn object_help() -> String {
    format!(
        "Define an object ({}).",
        qmp::schema::object::OBJECT_TYPES.join(", ")
    )
}

/// How many listening sockets systemd passed, read as qemu-nbd and nbdkit
/// read it: `LISTEN_PID` must name this process and `LISTEN_FDS` be a number
/// (anything else means no activation). The variables are then removed so no
/// child inherits them, as qemu-nbd does.
fn socket_activation() -> u32 {
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    if !for_us {
        return 0;
    }
    let Some(fds) = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
    else {
        return 0;
    };
    for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    fds
}

/// The option values [`ServeArgs::values`] checked.
struct Values {
    cache: CacheMode,
    aio: String,
    discard_unmap: bool,
    detect_zeroes: String,
    offset: u64,
    shared: u32,
    handshake_limit: Option<Duration>,
}

const NO_CACHE: CacheMode = CacheMode {
    direct: true,
    writeback: true,
    no_flush: false,
};

const DEFAULT_CACHE: CacheMode = CacheMode {
    direct: false,
    writeback: true,
    no_flush: false,
};

/// `-o`: a C integer (decimal, 0x hex or 0 octal, as qemu-nbd's
/// `qemu_strtou64`). A negative one wraps there and the raw driver then
/// refuses it; bexd refuses it up front with the same words.
fn parse_offset(s: &str) -> Result<u64, Refusal> {
    if s.trim_start().starts_with('-') {
        return Err(format!(
            "Value '{s}' is out of range for parameter 'offset'"
        ));
    }
    parse_c_integer(s).ok_or_else(|| format!("Invalid offset '{s}'"))
}

/// A non-negative C integer literal with base prefix: `0x1f`, `017`, `42`.
fn parse_c_integer(s: &str) -> Option<u64> {
    let (digits, radix) = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (hex, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(args: &[&str]) -> Result<ServePlan, Refusal> {
        let argv = std::iter::once("bexd serve").chain(args.iter().copied());
        ServeArgs::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .check()
    }

    fn image(args: &[&str]) -> ImagePlan {
        match check(args) {
            Ok(ServePlan::Serve(p)) => *p,
            other => panic!("not a serve plan: {other:?}"),
        }
    }

    #[test]
    fn test_defaults_are_qemu_nbds() {
        let p = image(&["d.img"]);
        assert_eq!(
            p.listen,
            Listen::Tcp {
                host: "0.0.0.0".into(),
                port: 10809
            }
        );
        assert_eq!(p.shared, 1);
        assert!(!p.persistent);
        assert_eq!(p.cache, DEFAULT_CACHE);
        assert_eq!(p.aio, "threads");
        assert_eq!(p.detect_zeroes, "off");
        assert_eq!(p.handshake_limit, Some(Duration::from_secs(10)));
        assert_eq!(p.export_name, "");
    }

    #[test]
    fn test_cache_modes_set_what_qemu_sets() {
        let c = |m: &str| image(&["--cache", m, "d.img"]).cache;
        assert!(c("none").direct && c("none").writeback);
        assert!(c("directsync").direct && !c("directsync").writeback);
        assert!(!c("writethrough").direct && !c("writethrough").writeback);
        assert!(c("unsafe").no_flush);
        assert_eq!(image(&["-n", "d.img"]).cache, c("none"));
        assert_eq!(
            check(&["--cache=bogus", "d.img"]),
            Err("Invalid cache mode `bogus'".into())
        );
    }

    #[test]
    fn test_bad_values_get_qemu_nbds_messages() {
        let cases: &[(&[&str], &str)] = &[
            (&["-e", "-1", "d"], "Invalid shared device number '-1'"),
            (&["-e", "x", "d"], "Invalid shared device number 'x'"),
            (&["--aio=bogus", "d"], "Invalid aio mode 'bogus'"),
            (&["--discard=bogus", "d"], "Invalid discard mode `bogus'"),
            (
                &["--detect-zeroes=bogus", "d"],
                "Failed to parse detect_zeroes mode: invalid parameter value: bogus",
            ),
            (
                &["--detect-zeroes=unmap", "d"],
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
            ),
            (&["--handshake-limit=-1", "d"], "Invalid handshake limit '-1'"),
            (&["--handshake-limit=x", "d"], "Invalid handshake limit 'x'"),
            (
                &["--tls-authz=a", "d"],
                "--tls-authz is not permitted without --tls-creds",
            ),
            (
                &["--tls-hostname=a", "d"],
                "--tls-hostname is not permitted without --tls-creds",
            ),
            (
                &["--selinux-label=x", "d"],
                "--selinux-label is not permitted without --socket",
            ),
            (&["-o", "-5", "d"], "Value '-5' is out of range for parameter 'offset'"),
            (&["-o", "x", "d"], "Invalid offset 'x'"),
            (&["-n", "--cache=none", "d"], "-n and --cache can only be specified once"),
            (&["--aio=threads", "--aio=threads", "d"], "--aio can only be specified once"),
            (&["-k", "rel", "d"], "socket path must be absolute"),
            (&["-L", "-x", "foo"], "List mode is incompatible with per-device settings"),
            (&["-L", "-n"], "List mode is incompatible with per-device settings"),
            (&["-L", "--fork"], "List mode is incompatible with forking"),
            (
                &["--tls-creds=t", "--tls-hostname=h", "d"],
                "TLS hostname is only supported with export list",
            ),
            (
                &["-L", "--tls-creds=t", "--tls-authz=a"],
                "TLS authorization is incompatible with export list",
            ),
            (&[], "Invalid number of arguments"),
            (&["a", "b"], "Invalid number of arguments"),
            (&["-L", "d"], "List mode is incompatible with a file name"),
        ];
        for (args, want) in cases {
            assert_eq!(check(args), Err(want.to_string()), "{args:?}");
        }
    }

    #[test]
    fn test_socket_wins_over_bind_and_port() {
        let p = image(&["-k", "/tmp/s", "-p", "1234", "-b", "127.0.0.1", "d"]);
        assert_eq!(p.listen, Listen::Unix("/tmp/s".into()));
    }

    #[test]
    fn test_numbers_take_c_prefixes_and_handshake_zero_is_no_limit() {
        let p = image(&["-o", "0x100000", "-e", "0x2", "--handshake-limit", "0", "d"]);
        assert_eq!(p.offset, 1 << 20);
        assert_eq!(p.shared, 2);
        assert_eq!(p.handshake_limit, None);
    }

    #[test]
    fn test_list_mode_needs_no_image() {
        let plan = check(&["-L", "-k", "/tmp/s"]);
        assert!(matches!(plan, Ok(ServePlan::List(_))), "{plan:?}");
    }
}
