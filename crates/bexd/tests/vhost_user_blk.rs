//! vhost-user-blk exports driven by a front-end that is not bexd's: the
//! rust-vmm `vhost` crate's `Frontend` (Cloud Hypervisor's), with guest
//! memory in a memfd and split virtqueues laid out by hand in it. Each
//! scenario runs against bexd and against qemu-storage-daemon's
//! vhost-user-blk export, and both must give the same answers (bexd's
//! request counters, which qemu-storage-daemon does not have, are checked
//! on bexd alone).

mod common;

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MIB: u64 = 1 << 20;
const IMAGE_SIZE: u64 = 64 * MIB;
const GUEST_SIZE: u64 = 16 * MIB;
const QUEUE_SIZE: u16 = 128;
/// Each queue's rings take 64 KiB of guest memory from here on.
const RINGS_AT: u64 = 0;
/// Request headers, data and status bytes from here on.
const BUFFERS_AT: u64 = 4 * MIB;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const VERSION_1: u64 = 1 << 32;
const F_MQ: u64 = 1 << 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Bexd,
    Qsd,
}

/// A daemon exporting a fresh image over vhost-user-blk.
struct Daemon {
    child: Child,
    socket: PathBuf,
    image: PathBuf,
    /// bexd's QMP socket and metrics-http port, when started with them.
    monitor: Option<(PathBuf, u16)>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(peer: Peer, extra: &str) -> Option<Self> {
        Self::spawn(peer, extra, false)
    }

    /// bexd with a QMP monitor and a metrics-http endpoint besides the export.
    fn monitored(extra: &str) -> Self {
        Self::spawn(Peer::Bexd, extra, true).unwrap()
    }

    fn spawn(peer: Peer, extra: &str, monitored: bool) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let f = File::create(&image).unwrap();
        f.set_len(IMAGE_SIZE).unwrap();
        let socket = dir.path().join("vhost.sock");
        let program = match peer {
            Peer::Bexd => env!("CARGO_BIN_EXE_bexd"),
            Peer::Qsd => "qemu-storage-daemon",
        };
        let export = format!(
            "type=vhost-user-blk,id=v0,node-name=disk0,addr.type=unix,addr.path={}{extra}",
            socket.display()
        );
        let mut command = Command::new(program);
        command
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk0,filename={}",
                image.display()
            ))
            .arg("--export")
            .arg(export)
            .stdin(Stdio::null());
        let monitor = monitored.then(|| {
            let qmp = dir.path().join("qmp.sock");
            let port = free_port();
            command
                .arg("--chardev")
                .arg(format!(
                    "socket,id=m0,path={},server=on,wait=off",
                    qmp.display()
                ))
                .args(["--monitor", "chardev=m0", "--object"])
                .arg(format!(
                    "metrics-http,id=metrics0,addr.host=127.0.0.1,addr.port={port}"
                ));
            (qmp, port)
        });
        let child = command.spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if peer == Peer::Qsd && std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("qemu-storage-daemon not runnable ({e}): its half is skipped");
                return None;
            }
            Err(e) => panic!("{program}: {e}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "{peer:?} did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Self {
            child,
            socket,
            image,
            monitor,
            _dir: dir,
        })
    }

    /// One QMP command's `return` value.
    fn qmp(&self, command: &str, arguments: serde_json::Value) -> serde_json::Value {
        let (path, _) = self.monitor.as_ref().expect("started with a monitor");
        common::wait_for_socket(path);
        let mut q = common::Qmp::connect(path);
        q.execute(command, arguments)["return"].clone()
    }

    /// The metrics-http exposition's samples: `name{labels}` -> value.
    fn metrics(&self) -> std::collections::HashMap<String, f64> {
        use std::io::{Read, Write};
        let (_, port) = self.monitor.as_ref().expect("started with a monitor");
        let mut s = std::net::TcpStream::connect(("127.0.0.1", *port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bexd\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let body = text.split_once("\r\n\r\n").expect("an HTTP response").1;
        body.lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
            .collect()
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Never signal a pid already reaped (it may belong to another process by now).
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill() on our own child's pid, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// One virtqueue's rings in guest memory, and where the driver is.
struct Queue {
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    next_used: u16,
    kick: EventFd,
    _call: EventFd,
}

/// The front-end side: a connection, guest memory, and queues.
struct Guest {
    frontend: Frontend,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    config: Vec<u8>,
}

impl Guest {
    fn connect(socket: &Path, num_queues: usize) -> Self {
        let mut frontend = Frontend::connect(socket, num_queues as u64).unwrap();
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        assert_ne!(features & VERSION_1, 0);
        let protocol = frontend.get_protocol_features().unwrap();
        let wanted = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ;
        frontend.set_protocol_features(protocol & wanted).unwrap();
        // Everything but EVENT_IDX (bit 29): this driver polls the used ring.
        frontend.set_features(features & !(1 << 29)).unwrap();
        let mem = guest_memory();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let regions = [VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()];
        frontend.set_mem_table(&regions).unwrap();
        let mut buf = vec![0u8; 60];
        let (_, config) = frontend
            .get_config(0, 60, VhostUserConfigFlags::empty(), &buf)
            .unwrap();
        buf.copy_from_slice(&config);
        let mut queues = Vec::new();
        for q in 0..num_queues {
            let base = RINGS_AT + q as u64 * 0x10000;
            let queue = Queue {
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                next_avail: 0,
                next_used: 0,
                kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                _call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            };
            frontend.set_vring_num(q, QUEUE_SIZE).unwrap();
            let addr = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: host + queue.desc,
                used_ring_addr: host + queue.used,
                avail_ring_addr: host + queue.avail,
                log_addr: None,
            };
            frontend.set_vring_addr(q, &addr).unwrap();
            frontend.set_vring_base(q, 0).unwrap();
            frontend.set_vring_call(q, &queue._call).unwrap();
            frontend.set_vring_kick(q, &queue.kick).unwrap();
            frontend.set_vring_enable(q, true).unwrap();
            queues.push(queue);
        }
        Self {
            frontend,
            mem,
            queues,
            config: buf,
        }
    }

    fn capacity_sectors(&self) -> u64 {
        u64::from_le_bytes(self.config[0..8].try_into().unwrap())
    }

    /// Submits one chain on queue `q` and waits for it: (used length, status).
    fn submit(&mut self, q: usize, chain: &[(u64, u32, bool)]) -> (u32, u8) {
        let queue = &mut self.queues[q];
        let head = queue.next_avail % QUEUE_SIZE;
        // Each request gets its own descriptors, from `head * 4` on.
        let first = (head as usize * 4) % QUEUE_SIZE as usize;
        for (i, &(addr, len, write)) in chain.iter().enumerate() {
            let index = (first + i) as u64;
            let last = i + 1 == chain.len();
            let flags = if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let d = queue.desc + index * 16;
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem
                .write_obj((index + 1) as u16, GuestAddress(d + 14))
                .unwrap();
        }
        let slot = queue.avail + 4 + u64::from(queue.next_avail % QUEUE_SIZE) * 2;
        self.mem
            .write_obj(first as u16, GuestAddress(slot))
            .unwrap();
        queue.next_avail = queue.next_avail.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(queue.next_avail, GuestAddress(queue.avail + 2))
            .unwrap();
        queue.kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let used_idx: u16 = self.mem.read_obj(GuestAddress(queue.used + 2)).unwrap();
            if used_idx != queue.next_used {
                break;
            }
            assert!(Instant::now() < deadline, "request not completed");
            std::thread::sleep(Duration::from_micros(200));
        }
        let entry = queue.used + 4 + u64::from(queue.next_used % QUEUE_SIZE) * 8;
        let id: u32 = self.mem.read_obj(GuestAddress(entry)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(entry + 4)).unwrap();
        queue.next_used = queue.next_used.wrapping_add(1);
        assert_eq!(id, first as u32);
        let (status_at, _, _) = *chain.last().unwrap();
        let status: u8 = self.mem.read_obj(GuestAddress(status_at)).unwrap();
        (len, status)
    }

    fn header(&self, kind: u32, sector: u64) -> u64 {
        let at = BUFFERS_AT;
        self.mem.write_obj(kind, GuestAddress(at)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        at
    }

    /// A read or write of `len` bytes at `sector` through queue `q`, with
    /// the data at DATA: (used length, status).
    fn rw(&mut self, q: usize, kind: u32, sector: u64, len: u32) -> (u32, u8) {
        let h = self.header(kind, sector);
        let chain = [(h, 16, false), (DATA, len, kind == T_IN), (STATUS, 1, true)];
        self.submit(q, &chain)
    }

    fn simple(&mut self, kind: u32) -> (u32, u8) {
        let h = self.header(kind, 0);
        self.submit(0, &[(h, 16, false), (STATUS, 1, true)])
    }

    fn zero_op(&mut self, kind: u32, sector: u64, sectors: u32, flags: u32) -> (u32, u8) {
        let h = self.header(kind, 0);
        self.mem.write_obj(sector, GuestAddress(SEGMENT)).unwrap();
        self.mem
            .write_obj(sectors, GuestAddress(SEGMENT + 8))
            .unwrap();
        self.mem
            .write_obj(flags, GuestAddress(SEGMENT + 12))
            .unwrap();
        self.submit(
            0,
            &[(h, 16, false), (SEGMENT, 16, false), (STATUS, 1, true)],
        )
    }

    fn data(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(DATA)).unwrap();
        v
    }

    fn fill(&self, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(DATA)).unwrap();
    }
}

const SEGMENT: u64 = BUFFERS_AT + 0x100;
const STATUS: u64 = BUFFERS_AT + 0x200;
const DATA: u64 = BUFFERS_AT + 0x10000;

fn guest_memory() -> GuestMemoryMmap {
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just created and is owned here.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(GUEST_SIZE).unwrap();
    let ranges = [(
        GuestAddress(0),
        GUEST_SIZE as usize,
        Some(FileOffset::new(file, 0)),
    )];
    GuestMemoryMmap::from_ranges_with_files(ranges).unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Runs `scenario` against bexd and qemu-storage-daemon, and requires the
/// same outcome from both.
fn both<T: PartialEq + std::fmt::Debug>(extra: &str, scenario: impl Fn(&Daemon) -> T) -> T {
    let bexd = Daemon::start(Peer::Bexd, extra).unwrap();
    let ours = scenario(&bexd);
    drop(bexd);
    if let Some(qsd) = Daemon::start(Peer::Qsd, extra) {
        let theirs = scenario(&qsd);
        assert_eq!(ours, theirs, "bexd and qemu-storage-daemon differ");
    }
    ours
}

#[test]
fn test_write_flush_read_get_id() {
    let out = both(",writable=on", |d| {
        let mut g = Guest::connect(&d.socket, 1);
        let data = pattern(64 * 1024, 7);
        g.fill(&data);
        let wrote = g.rw(0, T_OUT, 8, data.len() as u32);
        let flushed = g.simple(T_FLUSH);
        g.fill(&vec![0; data.len()]);
        let read = g.rw(0, T_IN, 8, data.len() as u32);
        let same = g.data(data.len()) == data;
        let h = g.header(T_GET_ID, 0);
        let id = g.submit(0, &[(h, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
        // The NUL-terminated serial: qemu-storage-daemon 10.0 fills the rest of the 20
        // bytes with whatever follows its string in memory.
        let serial = g.data(15);
        let on_disk = std::fs::read(&d.image).unwrap()[8 * 512..8 * 512 + data.len()] == data[..];
        (
            g.capacity_sectors(),
            wrote,
            flushed,
            read,
            same,
            id,
            serial,
            on_disk,
        )
    });
    assert_eq!(out.0, IMAGE_SIZE / 512);
    assert_eq!(out.1, (1, S_OK));
    assert_eq!(out.3, (64 * 1024 + 1, S_OK));
    assert!(out.4 && out.7);
    assert_eq!(out.5 .1, S_OK);
}

#[test]
fn test_bad_requests_get_an_error_status_and_the_device_keeps_serving() {
    let out = both(",writable=on", |d| {
        let mut g = Guest::connect(&d.socket, 1);
        let past_end = g.rw(0, T_IN, IMAGE_SIZE / 512 - 1, 4096);
        let unknown = g.simple(99);
        let unaligned = g.rw(0, T_OUT, 0, 100);
        let still = g.rw(0, T_IN, 0, 4096);
        (past_end.1, unknown.1, unaligned.1, still)
    });
    assert_eq!(out, (S_IOERR, S_UNSUPP, S_IOERR, (4097, S_OK)));
}

/// bexd only: qemu-storage-daemon 10.0 stops the device at such a chain
/// (libvhost-user's `vu_panic: virtio: invalid address for buffers`) and
/// never completes it, nor anything after it.
#[test]
fn test_buffer_outside_guest_memory_is_ioerr_and_the_device_keeps_serving() {
    let d = Daemon::start(Peer::Bexd, ",writable=on").unwrap();
    let mut g = Guest::connect(&d.socket, 1);
    let h = g.header(T_IN, 0);
    let beyond = GUEST_SIZE + 4096;
    let outside = g.submit(0, &[(h, 16, false), (beyond, 512, true), (STATUS, 1, true)]);
    assert_eq!(outside, (1, S_IOERR));
    let h = g.header(T_OUT, 0);
    let straddling = g.submit(
        0,
        &[
            (h, 16, false),
            (GUEST_SIZE - 256, 512, false),
            (STATUS, 1, true),
        ],
    );
    assert_eq!(straddling.1, S_IOERR);
    assert_eq!(g.rw(0, T_IN, 0, 4096), (4097, S_OK));
}

#[test]
fn test_discard_and_write_zeroes_read_back_zeroes() {
    let out = both(",writable=on", |d| {
        let mut g = Guest::connect(&d.socket, 1);
        g.fill(&[0xaa; 65536]);
        g.rw(0, T_OUT, 0, 65536);
        let zeroed = g.zero_op(T_WRITE_ZEROES, 16, 32, 0);
        let discarded = g.zero_op(T_DISCARD, 64, 32, 0);
        g.rw(0, T_IN, 0, 65536);
        let body = g.data(65536);
        let zero_ok = body[16 * 512..48 * 512].iter().all(|&b| b == 0);
        let kept = body[..16 * 512].iter().all(|&b| b == 0xaa);
        (zeroed.1, discarded.1, zero_ok, kept)
    });
    assert_eq!(out, (S_OK, S_OK, true, true));
}

#[test]
fn test_read_only_export_refuses_writes() {
    let out = both("", |d| {
        let mut g = Guest::connect(&d.socket, 1);
        let features_ro = g.frontend.get_features().unwrap() & (1 << 5) != 0;
        g.fill(&[1; 512]);
        (
            features_ro,
            g.rw(0, T_OUT, 0, 512).1,
            g.rw(0, T_IN, 0, 512).1,
        )
    });
    assert_eq!(out, (true, S_IOERR, S_OK));
}

#[test]
fn test_two_queues_both_serve() {
    let out = both(",writable=on,num-queues=2", |d| {
        let mut g = Guest::connect(&d.socket, 2);
        let num_queues = u16::from_le_bytes(g.config[34..36].try_into().unwrap());
        let mq = g.frontend.get_features().unwrap() & F_MQ != 0;
        g.fill(&pattern(4096, 1));
        let a = g.rw(0, T_OUT, 0, 4096);
        g.fill(&pattern(4096, 2));
        let b = g.rw(1, T_OUT, 8, 4096);
        let c = g.rw(1, T_IN, 0, 4096);
        let first = g.data(4096) == pattern(4096, 1);
        let d2 = g.rw(0, T_IN, 8, 4096);
        let second = g.data(4096) == pattern(4096, 2);
        (num_queues, mq, a.1, b.1, c.1, first, d2.1, second)
    });
    assert_eq!(out, (2, true, S_OK, S_OK, S_OK, true, S_OK, true));
}

#[test]
fn test_front_end_reconnects_and_finds_its_writes() {
    let out = both(",writable=on", |d| {
        let data = pattern(128 * 1024, 9);
        let wrote = {
            let mut g = Guest::connect(&d.socket, 1);
            g.fill(&data);
            g.rw(0, T_OUT, 100, data.len() as u32)
        };
        // The first front-end is gone (its socket closed); a new one connects.
        let mut again = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        while again.is_none() {
            match Frontend::connect(&d.socket, 1) {
                Ok(f) => {
                    drop(f);
                    again = Some(());
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("no reconnect: {e}"),
            }
        }
        let mut g = connect_retrying(&d.socket);
        let read = g.rw(0, T_IN, 100, data.len() as u32);
        (wrote.1, read.1, g.data(data.len()) == data)
    });
    assert_eq!(out, (S_OK, S_OK, true));
}

/// SIGTERM with a front-end connected and its queue set up: bexd ends the
/// connection, exits 0 and removes its socket.
#[test]
fn test_exit_with_a_connected_front_end_is_clean() {
    let mut d = Daemon::start(Peer::Bexd, ",writable=on").unwrap();
    let mut g = Guest::connect(&d.socket, 1);
    g.fill(&[5; 4096]);
    assert_eq!(g.rw(0, T_OUT, 0, 4096), (1, S_OK));
    // SAFETY: kill() on our own child's pid.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = d.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "bexd did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(!d.socket.exists());
    assert_eq!(&std::fs::read(&d.image).unwrap()[..4096], &[5; 4096][..]);
    drop(g);
}

/// A new front-end, retrying while the daemon is still ending the last
/// connection.
fn connect_retrying(socket: &Path) -> Guest {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = std::panic::catch_unwind(|| Guest::connect(socket, 1));
        match attempt {
            Ok(g) => return g,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => std::panic::resume_unwind(e),
        }
    }
}

/// Not a test: the vhost-user-blk benchmark driver (fio has no vhost-user
/// engine). 4 KiB random reads or writes, 32 in flight on each queue, for
/// BENCH_SECONDS (default 5) against bexd and qemu-storage-daemon in turn,
/// with 1 and 2 queues; prints IOPS. Run with
/// `cargo test --release -p bexd --test vhost_user_blk -- --ignored --nocapture bench`.
#[test]
#[ignore]
fn bench_vhost_user_blk_4k_qd32() {
    let seconds: u64 = std::env::var("BENCH_SECONDS").map_or(5, |s| s.parse().unwrap());
    let rounds: usize = std::env::var("BENCH_ROUNDS").map_or(3, |s| s.parse().unwrap());
    // BENCH_ONLY=read|write and BENCH_QUEUES=N narrow the run (for profiling one row).
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let kinds = [T_IN, T_OUT].into_iter().filter(|&k| match only.as_str() {
        "read" => k == T_IN,
        "write" => k == T_OUT,
        _ => true,
    });
    let queue_counts: Vec<usize> = match std::env::var("BENCH_QUEUES") {
        Ok(q) => vec![q.parse().unwrap()],
        Err(_) => vec![1, 2],
    };
    // BENCH_PEER=bexd|qsd runs one daemon only; the other's column reads NaN.
    let wanted = std::env::var("BENCH_PEER").unwrap_or_default();
    for kind in kinds {
        for &queues in &queue_counts {
            let extra = format!(",writable=on,num-queues={queues}");
            let mut results = [Vec::new(), Vec::new()];
            for round in 0..rounds {
                let order = if round % 2 == 0 {
                    [Peer::Bexd, Peer::Qsd]
                } else {
                    [Peer::Qsd, Peer::Bexd]
                };
                for peer in order {
                    if (wanted == "bexd" && peer != Peer::Bexd)
                        || (wanted == "qsd" && peer != Peer::Qsd)
                    {
                        continue;
                    }
                    let d = Daemon::start(peer, &extra).unwrap();
                    let mut g = Guest::connect(&d.socket, queues);
                    let iops = drive(&mut g, kind, Duration::from_secs(seconds));
                    results[(peer == Peer::Qsd) as usize].push(iops);
                }
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(|a, b| a.partial_cmp(b).unwrap());
                v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
            };
            let (b, q) = (
                median(&mut results[0].clone()),
                median(&mut results[1].clone()),
            );
            let name = if kind == T_IN {
                "randread"
            } else {
                "randwrite"
            };
            println!(
                "| 4k {name} QD32, num-queues={queues} (IOPS) | {b:.0} ({:?}) | {q:.0} ({:?}) | {:.2}x |",
                results[0].iter().map(|v| *v as u64).collect::<Vec<_>>(),
                results[1].iter().map(|v| *v as u64).collect::<Vec<_>>(),
                b / q
            );
        }
    }
}

/// Keeps 32 requests in flight on every queue of `g` for `time`: IOPS.
fn drive(g: &mut Guest, kind: u32, time: Duration) -> f64 {
    const DEPTH: u16 = 32;
    let sectors = IMAGE_SIZE / 512 / 8;
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut random_sector = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % sectors) * 8
    };
    let slot_base =
        |q: usize, slot: u16| BUFFERS_AT + 0x40_0000 * q as u64 + u64::from(slot) * 0x2000;
    let mut done = 0u64;
    for q in 0..g.queues.len() {
        for slot in 0..DEPTH {
            let base = slot_base(q, slot);
            let chain = [
                (base, 16u32, false),
                (base + 0x1000, 4096, kind == T_IN),
                (base + 0x100, 1, true),
            ];
            let desc = g.queues[q].desc;
            for (i, &(addr, len, write)) in chain.iter().enumerate() {
                let index = u64::from(slot) * 3 + i as u64;
                let flags = if write { F_WRITE } else { 0 } | if i < 2 { F_NEXT } else { 0 };
                let d = desc + index * 16;
                g.mem.write_obj(addr, GuestAddress(d)).unwrap();
                g.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
                g.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
                g.mem
                    .write_obj((index + 1) as u16, GuestAddress(d + 14))
                    .unwrap();
            }
            g.mem.write_obj(kind, GuestAddress(base)).unwrap();
            push(g, q, slot, random_sector());
        }
        publish(g, q);
    }
    let start = Instant::now();
    while start.elapsed() < time {
        for q in 0..g.queues.len() {
            let used_idx: u16 = g.mem.read_obj(GuestAddress(g.queues[q].used + 2)).unwrap();
            let mut any = false;
            while g.queues[q].next_used != used_idx {
                let queue = &g.queues[q];
                let entry = queue.used + 4 + u64::from(queue.next_used % QUEUE_SIZE) * 8;
                let id: u32 = g.mem.read_obj(GuestAddress(entry)).unwrap();
                g.queues[q].next_used = g.queues[q].next_used.wrapping_add(1);
                let slot = (id / 3) as u16;
                assert_eq!(
                    g.mem
                        .read_obj::<u8>(GuestAddress(slot_base(q, slot) + 0x100))
                        .unwrap(),
                    S_OK
                );
                done += 1;
                push(g, q, slot, random_sector());
                any = true;
            }
            if any {
                publish(g, q);
            }
        }
        std::hint::spin_loop();
    }
    done as f64 / start.elapsed().as_secs_f64()
}

/// Puts `slot`'s request (reading or writing `sector`) in the avail ring, not yet published.
fn push(g: &mut Guest, q: usize, slot: u16, sector: u64) {
    let base = BUFFERS_AT + 0x40_0000 * q as u64 + u64::from(slot) * 0x2000;
    g.mem.write_obj(sector, GuestAddress(base + 8)).unwrap();
    let queue = &mut g.queues[q];
    let at = queue.avail + 4 + u64::from(queue.next_avail % QUEUE_SIZE) * 2;
    g.mem.write_obj(slot * 3, GuestAddress(at)).unwrap();
    queue.next_avail = queue.next_avail.wrapping_add(1);
}

/// Publishes the avail index and kicks the queue.
fn publish(g: &mut Guest, q: usize) {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    let queue = &g.queues[q];
    g.mem
        .write_obj(queue.next_avail, GuestAddress(queue.avail + 2))
        .unwrap();
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    queue.kick.write(1).unwrap();
}

/// The counters a known workload must leave, on the export and on its node.
fn counts(stats: &serde_json::Value) -> Vec<(&'static str, u64)> {
    [
        "rd_operations",
        "rd_bytes",
        "wr_operations",
        "wr_bytes",
        "unmap_operations",
        "unmap_bytes",
        "flush_operations",
        "invalid_rd_operations",
        "invalid_wr_operations",
        "failed_rd_operations",
        "wr_highest_offset",
    ]
    .into_iter()
    .map(|k| (k, stats[k].as_u64().unwrap_or_else(|| panic!("{k}"))))
    .collect()
}

#[test]
fn test_requests_are_counted_per_export_node_and_in_metrics() {
    let d = Daemon::monitored(",writable=on,num-queues=2");
    let mut g = Guest::connect(&d.socket, 2);
    g.fill(&pattern(64 * 1024, 3));
    // Writes: 64 KiB at 4 KiB (queue 0), 4 KiB at 1 MiB (queue 1), 8 KiB of zeroes at 8 KiB.
    assert_eq!(g.rw(0, T_OUT, 8, 64 * 1024), (1, S_OK));
    assert_eq!(g.rw(1, T_OUT, 2048, 4096), (1, S_OK));
    assert_eq!(g.zero_op(T_WRITE_ZEROES, 16, 16, 0), (1, S_OK));
    // Reads: 3 of 4 KiB, on both queues.
    for (q, sector) in [(0, 0), (1, 8), (0, 16)] {
        assert_eq!(g.rw(q, T_IN, sector, 4096), (4097, S_OK));
    }
    assert_eq!(g.zero_op(T_DISCARD, 64, 8, 0).1, S_OK);
    assert_eq!(g.simple(T_FLUSH), (1, S_OK));
    assert_eq!(g.simple(T_FLUSH), (1, S_OK));
    // Not counted: GET_ID. Counted as invalid: a read past the end, an unknown flag on a
    // write-zeroes (unsupported).
    let h = g.header(T_GET_ID, 0);
    let id = g.submit(0, &[(h, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
    assert_eq!(id.1, S_OK);
    let end = g.capacity_sectors();
    assert_eq!(g.rw(0, T_IN, end, 4096), (1, S_IOERR));
    assert_eq!(g.zero_op(T_WRITE_ZEROES, 0, 8, 2), (1, S_UNSUPP));
    let expected = vec![
        ("rd_operations", 3),
        ("rd_bytes", 3 * 4096),
        ("wr_operations", 3),
        ("wr_bytes", 64 * 1024 + 4096 + 8192),
        ("unmap_operations", 1),
        ("unmap_bytes", 4096),
        ("flush_operations", 2),
        ("invalid_rd_operations", 1),
        ("invalid_wr_operations", 1),
        ("failed_rd_operations", 0),
        ("wr_highest_offset", MIB + 4096),
    ];
    let exports = d.qmp("x-query-export-stats", serde_json::json!({}));
    assert_eq!(exports[0]["id"], "v0");
    assert_eq!(exports[0]["in-flight"], 0);
    assert_eq!(counts(&exports[0]["stats"]), expected);
    let nodes = d.qmp("query-blockstats", serde_json::json!({"query-nodes": true}));
    let node = &nodes.as_array().unwrap()[0];
    assert_eq!(node["node-name"], "disk0");
    assert_eq!(counts(&node["stats"]), expected);
    let m = d.metrics();
    for label in ["export=\"v0\"", "node=\"disk0\""] {
        let subject = label.split('=').next().unwrap();
        let sample = |name: &str, op: &str| {
            let key = format!("bexd_{subject}_{name}{{{label},op=\"{op}\"}}");
            m.get(&key).copied().unwrap_or_else(|| panic!("no {key}"))
        };
        let got: Vec<_> = ["read", "write", "unmap", "flush"]
            .into_iter()
            .map(|op| (op, sample("requests_total", op), sample("bytes_total", op)))
            .collect();
        let want = [
            ("read", 3.0, 12288.0),
            ("write", 3.0, (64 * 1024 + 4096 + 8192) as f64),
            ("unmap", 1.0, 4096.0),
            ("flush", 2.0, 0.0),
        ];
        assert_eq!(got, want, "{label}");
        assert_eq!(sample("invalid_requests_total", "read"), 1.0, "{label}");
    }
}
