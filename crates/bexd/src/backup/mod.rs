//! `bexd backup`: pulls a full or an incremental backup from any NBD export
//! (bexd's or QEMU's) into a local file.
//!
//! ```text
//!  plan (one connection): BLOCK_STATUS over the export, base:allocation (full)
//!        or qemu:dirty-bitmap:NAME (incremental) -> ranges -> READ-sized requests
//!  copy (N connections if the server allows multi-conn): workers take requests
//!        from a shared queue, READ, pwrite into the output at the same offset
//!  verify (optional): re-read every copied range and compare with the output
//! ```
//!
//! A full backup goes into a sparse raw file: zero extents are not read. An
//! incremental needs a previous state to land on: `--base FULL` copies FULL
//! to the output first (or, with `--base` equal to `--output`, updates it in
//! place), then writes the dirty ranges, zeroes included, so the output is the
//! export's current content. Without `--base` an incremental is a sparse file
//! holding only the dirty ranges, listed in `FILE.extents.json`, and
//! `--apply FILE --base FULL --output NEW` puts it onto a full later. `--format qcow2` writes raw next to the
//! output and converts it with `qemu-img convert` at the end: a qcow2 writer of
//! our own is the qcow2 driver's job, and qemu-img's is the reference one.
//!
//! `--live` backs up a node of a running daemon through its QMP monitor:
//! it exports a point-in-time view of the node (fleecing, `live.rs`) and
//! pulls that the same way. `--tls-x509 DIR` / `--tls-psk DIR` upgrade every
//! NBD connection with STARTTLS, with the client side of the daemon's
//! credential files.

mod apply;
mod conn;
mod error;
mod live;
mod plan;
mod progress;
mod uri;

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use clap::Parser;
use nbd::consts::FLAG_CAN_MULTI_CONN;
use nbd_client::TlsConnect;

use conn::{Conn, Piece};
pub use error::BackupError;
use plan::Mode;
use progress::Progress;

#[derive(Debug, Parser)]
#[command(
    name = "bexd backup",
    about = "Pull a full or incremental backup from an NBD export, or a point-in-time \
             backup of a node a running daemon serves (--live)",
    version
)]
struct BackupArgs {
    /// The export: nbd+unix:///NAME?socket=PATH or nbd://HOST[:PORT]/NAME.
    #[arg(long, required_unless_present_any = ["apply", "live"], conflicts_with = "live")]
    uri: Option<String>,
    /// Instead of pulling: write the incremental INC (pulled without --base) onto --base.
    #[arg(long, value_name = "INC", conflicts_with_all = ["uri", "bitmap", "verify", "live"], requires = "base")]
    apply: Option<PathBuf>,
    /// Where the backup goes.
    #[arg(short, long)]
    output: PathBuf,
    /// Incremental: copy only what qemu:dirty-bitmap:BITMAP marks dirty. With --live: the
    /// node's bitmap that tracks writes for the next incremental (made by a full backup,
    /// read by --incremental).
    #[arg(short, long)]
    bitmap: Option<String>,
    /// The previous full backup the incremental is applied onto (may be the output itself).
    #[arg(long)]
    base: Option<PathBuf>,
    /// Output format: raw, or qcow2 (converted by qemu-img at the end).
    #[arg(short, long, default_value = "raw")]
    format: String,
    /// Connections to use when the server advertises multi-conn.
    #[arg(short, long, default_value_t = 4)]
    connections: usize,
    /// Re-read the copied ranges and compare them with the output.
    #[arg(long)]
    verify: bool,
    /// No progress output, only the summary.
    #[arg(short, long)]
    quiet: bool,
    /// Back up --node of a running bexd or qemu-storage-daemon while it is written: freeze
    /// a point-in-time view through QMP, pull it over NBD, take it down.
    #[arg(long, requires_all = ["qmp", "node", "nbd"])]
    live: bool,
    /// --live: the daemon's QMP monitor, unix:PATH, PATH or HOST:PORT.
    #[arg(long, value_name = "ADDR", requires = "live")]
    qmp: Option<String>,
    /// --live: the format node (raw or qcow2) to back up.
    #[arg(long, value_name = "NODE", requires = "live")]
    node: Option<String>,
    /// --live: the daemon's NBD server, unix:PATH, PATH or HOST:PORT.
    #[arg(long, value_name = "ADDR", requires = "live")]
    nbd: Option<String>,
    /// --live: start the daemon's NBD server on --nbd (no TLS) and stop it afterwards.
    #[arg(long, requires = "live", conflicts_with_all = ["tls_x509", "tls_psk"])]
    start_nbd_server: bool,
    /// --live: copy only what --bitmap marks dirty since the last live backup.
    #[arg(long, requires_all = ["live", "bitmap"])]
    incremental: bool,
    /// --live: where the daemon keeps the old data of blocks written during the backup
    /// (default: the node's image's directory); the daemon must see the same path.
    #[arg(long, value_name = "DIR", requires = "live")]
    scratch: Option<PathBuf>,
    /// TLS with x509 certificates from DIR: ca-cert.pem, and client-cert.pem with
    /// client-key.pem if the server asks for a certificate.
    #[arg(long, value_name = "DIR", conflicts_with = "tls_psk")]
    tls_x509: Option<PathBuf>,
    /// TLS with a pre-shared key from DIR/keys.psk (lines USER:HEXKEY).
    #[arg(long, value_name = "DIR")]
    tls_psk: Option<PathBuf>,
    /// The PSK user whose key is used (default: qemu, as QEMU's).
    #[arg(long, value_name = "NAME", requires = "tls_psk")]
    tls_username: Option<String>,
    /// The name the server's certificate must carry (default: the host, or localhost for a
    /// unix socket).
    #[arg(long, value_name = "NAME", requires = "tls_x509")]
    tls_hostname: Option<String>,
}

/// `bexd backup`'s clap definition, for the man page (`man.rs`).
pub fn command() -> clap::Command {
    <BackupArgs as clap::CommandFactory>::command()
}

pub fn main(args: &[String]) -> i32 {
    let argv = std::iter::once("bexd backup".to_string()).chain(args.iter().cloned());
    let parsed = match BackupArgs::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) if e.use_stderr() => {
            // One line, as for any other bad input.
            let text = e.render().to_string();
            let what: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!(
                "bexd backup: {}",
                what.join(" ").trim_start_matches("error: ")
            );
            return 1;
        }
        Err(e) => {
            let _ = e.print();
            return 0;
        }
    };
    let rt = match crate::startup::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bexd backup: cannot start runtime: {e}");
            return 1;
        }
    };
    let result = match parsed.live {
        true => live_backup(&parsed, &rt),
        false => rt.block_on(run(parsed)),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bexd backup: {e}");
            1
        }
    }
}

/// Totals for the summary.
#[derive(Debug, Default)]
struct Summary {
    read: u64,
    skipped: u64,
    requests: usize,
    connections: usize,
}

/// Checks that hold for both modes.
fn check(args: &BackupArgs) -> Result<(), BackupError> {
    if args.format != "raw" && args.format != "qcow2" {
        return Err(BackupError::Usage(format!(
            "unknown output format '{}'",
            args.format
        )));
    }
    let incremental = incremental(args);
    if args.base.is_some() && !incremental && args.apply.is_none() {
        return Err(BackupError::Usage(match args.live {
            true => "--base needs --incremental (it applies an incremental)".into(),
            false => "--base needs --bitmap (it applies an incremental)".into(),
        }));
    }
    if args.format != "raw" && (args.apply.is_some() || (incremental && args.base.is_none())) {
        return Err(BackupError::Usage(
            "a stand-alone incremental and --apply work on raw files only".into(),
        ));
    }
    Ok(())
}

/// Whether this run copies only a bitmap's dirty blocks.
fn incremental(args: &BackupArgs) -> bool {
    match args.live {
        true => args.incremental,
        false => args.bitmap.is_some(),
    }
}

/// The TLS upgrade the arguments ask for.
fn tls(
    args: &BackupArgs,
    target: &uri::Target,
) -> Result<Option<Arc<dyn TlsConnect>>, BackupError> {
    use crate::tls::{ClientCreds, NbdTlsClient};
    let creds = match (&args.tls_x509, &args.tls_psk) {
        (Some(dir), _) => ClientCreds::x509(dir),
        (None, Some(dir)) => ClientCreds::psk(dir, args.tls_username.as_deref().unwrap_or("qemu")),
        (None, None) => return Ok(None),
    }
    .map_err(|e| BackupError::Tls(e.to_string()))?;
    let hostname = args.tls_hostname.clone().unwrap_or_else(|| match target {
        uri::Target::Tcp { host, .. } => host.clone(),
        uri::Target::Unix { .. } => "localhost".into(),
    });
    Ok(Some(Arc::new(NbdTlsClient::new(
        Arc::new(creds),
        Some(hostname),
    ))))
}

async fn run(args: BackupArgs) -> Result<(), BackupError> {
    check(&args)?;
    if let Some(inc) = &args.apply {
        let base = args.base.as_deref().unwrap_or(&args.output);
        let applied = apply::apply(inc, base, &args.output)?;
        eprintln!(
            "bexd backup: applied {applied} bytes of {} onto {}",
            inc.display(),
            args.output.display()
        );
        return Ok(());
    }
    let target = uri::parse(args.uri.as_deref().unwrap_or_default())?;
    let source = uri::Source {
        tls: tls(&args, &target)?,
        target,
    };
    pull(&source, &args).await
}

/// `--live`: cleanup of an earlier run, fleecing set up, pull, teardown.
fn live_backup(args: &BackupArgs, rt: &tokio::runtime::Runtime) -> Result<(), BackupError> {
    check(args)?;
    let (Some(qmp), Some(node), Some(nbd)) = (&args.qmp, &args.node, &args.nbd) else {
        return Err(BackupError::Usage(
            "--live needs --qmp, --node and --nbd".into(),
        ));
    };
    let target = uri::parse_addr(nbd, live::EXPORT)?;
    let start_server = match (&target, args.start_nbd_server) {
        (_, false) => None,
        (uri::Target::Unix { socket, .. }, true) => Some(serde_json::json!(
            {"type": "unix", "data": {"path": socket.display().to_string()}}
        )),
        (uri::Target::Tcp { host, port, .. }, true) => Some(serde_json::json!(
            {"type": "inet", "data": {"host": host, "port": port.to_string()}}
        )),
    };
    let source = uri::Source {
        tls: tls(args, &target)?,
        target,
    };
    let bitmap = args.bitmap.as_ref().map(|name| live::BitmapPlan {
        name: name.clone(),
        incremental: args.incremental,
    });
    let mut session = live::Session::connect(qmp)?;
    if session.cleanup(node)? {
        eprintln!("bexd backup: removed what an earlier live backup left behind");
    }
    let plan = live::Plan {
        node,
        bitmap: bitmap.clone(),
        scratch: args.scratch.as_deref(),
        start_server,
    };
    if let Err(e) = session.setup(&plan) {
        let _ = session.teardown(node, bitmap.as_ref(), false);
        return Err(e);
    }
    eprintln!(
        "bexd backup: point-in-time view of {node} exported as {}",
        live::EXPORT
    );
    let result = rt.block_on(async {
        tokio::select! {
            r = pull(&source, args) => r,
            s = interrupted() => Err(BackupError::Usage(format!("interrupted by {s}"))),
        }
    });
    let down = session.teardown(node, bitmap.as_ref(), result.is_ok());
    result?;
    down
}

/// The first of SIGINT, SIGTERM, SIGHUP, by name.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}

/// Plans and copies from `source` into the output the arguments name.
async fn pull(source: &uri::Source, args: &BackupArgs) -> Result<(), BackupError> {
    let mode = match incremental(args) {
        true => Mode::Incremental,
        false => Mode::Full,
    };
    let context = mode.context(args.bitmap.as_deref());
    let mut first = Conn::open(source, Some(&context)).await?;
    let size = first.size;
    let ranges = plan::ranges(&mut first, mode).await?;
    let requests = plan::requests(&ranges);
    let copied: u64 = ranges.iter().map(|r| r.1).sum();

    let raw_path = match args.format.as_str() {
        "qcow2" => args.output.with_extension("raw.partial"),
        _ => args.output.clone(),
    };
    let file = prepare_output(&raw_path, args.base.as_ref(), size)?;
    // Holes inside copied ranges must overwrite old data only when there is old data.
    let write_zeroes = args.base.is_some();

    let connections = match first.flags & FLAG_CAN_MULTI_CONN != 0 {
        true => args.connections.clamp(1, 16).min(requests.len().max(1)),
        false => 1,
    };
    let progress = Arc::new(Progress::new(copied, args.quiet));
    let stop = tokio_util::sync::CancellationToken::new();
    let ticker = tokio::spawn(progress.clone().run(stop.clone()));
    let queue = Arc::new(Mutex::new(VecDeque::from(requests.clone())));
    let mut workers = Vec::new();
    let mut conns = vec![first];
    for _ in 1..connections {
        conns.push(Conn::open(source, None).await?);
    }
    for c in conns {
        let (queue, file, done) = (queue.clone(), file.try_clone()?, progress.done.clone());
        workers.push(tokio::spawn(async move {
            copy_worker(c, queue, file, write_zeroes, done).await
        }));
    }
    let mut result = Ok(());
    for w in workers {
        match w.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(e) => result = Err(BackupError::Protocol(format!("worker failed: {e}"))),
        }
    }
    stop.cancel();
    let _ = ticker.await;
    result?;
    let copy_time = progress.elapsed();
    file.sync_all()?;
    if args.verify {
        verify(source, &requests, &file).await?;
    }
    if mode == Mode::Incremental && args.base.is_none() {
        apply::save(&args.output, &ranges)?;
    }
    if args.format == "qcow2" {
        convert_to_qcow2(&raw_path, &args.output)?;
    }
    let summary = Summary {
        read: copied,
        skipped: size - copied,
        requests: requests.len(),
        connections,
    };
    print_summary(&summary, mode, copy_time, args.verify);
    Ok(())
}

/// The output file, sized to the export: empty and sparse, or a copy of `base`.
fn prepare_output(
    path: &PathBuf,
    base: Option<&PathBuf>,
    size: u64,
) -> Result<std::fs::File, BackupError> {
    if let Some(base) = base {
        if base != path {
            std::fs::copy(base, path)?;
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        if f.metadata()?.len() != size {
            return Err(BackupError::Usage(format!(
                "base {} is not the export's size ({size} bytes)",
                base.display()
            )));
        }
        return Ok(f);
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.set_len(size)?;
    Ok(f)
}

async fn copy_worker(
    mut conn: Conn,
    queue: Arc<Mutex<VecDeque<(u64, u32)>>>,
    file: std::fs::File,
    write_zeroes: bool,
    done: Arc<std::sync::atomic::AtomicU64>,
) -> Result<(), BackupError> {
    loop {
        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
        let Some((offset, len)) = next else {
            conn.close().await;
            return Ok(());
        };
        for piece in conn.read(offset, len).await? {
            match piece {
                Piece::Data(at, data) => file.write_all_at(&data, at)?,
                Piece::Zero(at, n) if write_zeroes => {
                    file.write_all_at(&vec![0u8; n as usize], at)?
                }
                Piece::Zero(..) => {}
            }
        }
        done.fetch_add(u64::from(len), Ordering::Relaxed);
    }
}

/// Reads every copied range again and compares it with the output.
async fn verify(
    source: &uri::Source,
    requests: &[(u64, u32)],
    file: &std::fs::File,
) -> Result<(), BackupError> {
    let mut conn = Conn::open(source, None).await?;
    for &(offset, len) in requests {
        let mut source = vec![0u8; len as usize];
        for piece in conn.read(offset, len).await? {
            if let Piece::Data(at, data) = piece {
                let start = (at - offset) as usize;
                source[start..start + data.len()].copy_from_slice(&data);
            }
        }
        let mut copy = vec![0u8; len as usize];
        file.read_exact_at(&mut copy, offset)?;
        if copy != source {
            return Err(BackupError::Verify(format!("range {offset}+{len}")));
        }
    }
    conn.close().await;
    Ok(())
}

fn convert_to_qcow2(raw: &PathBuf, output: &PathBuf) -> Result<(), BackupError> {
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(output)
        .status()?;
    std::fs::remove_file(raw)?;
    match status.success() {
        true => Ok(()),
        false => Err(BackupError::Usage(format!(
            "qemu-img convert failed: {status}"
        ))),
    }
}

/// The time and rate are the copy's (a verify pass comes on top).
fn print_summary(s: &Summary, mode: Mode, elapsed: std::time::Duration, verified: bool) {
    eprintln!(
        "bexd backup: {} backup done: read {} bytes in {} requests over {} connection(s), skipped {} bytes, {:.2} s, {:.1} MiB/s{}",
        match mode {
            Mode::Full => "full",
            Mode::Incremental => "incremental",
        },
        s.read,
        s.requests,
        s.connections,
        s.skipped,
        elapsed.as_secs_f64(),
        progress::rate(s.read, elapsed),
        if verified { ", verified" } else { "" }
    );
}
