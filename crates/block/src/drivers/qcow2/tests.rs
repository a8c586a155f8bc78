//! End-to-end checks against qemu-img: images it makes read back as its own
//! raw conversion, and images we write pass `qemu-img check` and equal a
//! model disk that got the same writes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use super::{Qcow2Driver, Qcow2Options};
use crate::driver::{Driver, ZeroFlags};
use crate::drivers::file::{FileDriver, FileOptions};
use crate::node::BlockNode;
use crate::test_utils::conformance;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    let ps = p.to_str().unwrap();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", opts, ps, size],
    );
    p
}

fn qemu_io(p: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(p.to_str().unwrap());
    run("qemu-io", &args);
}

fn file_node(p: &Path, read_only: bool) -> Arc<BlockNode> {
    let opts = FileOptions {
        filename: p.to_path_buf(),
        read_only,
        ..Default::default()
    };
    let d = FileDriver::open(&opts).unwrap();
    Arc::new(BlockNode::new("file".into(), Arc::new(d), read_only))
}

fn open(p: &Path, read_only: bool) -> Qcow2Driver {
    let opts = Qcow2Options {
        read_only,
        discard: true,
        ..Default::default()
    };
    Qcow2Driver::open(file_node(p, read_only), &opts).unwrap()
}

fn raw_of(p: &Path) -> Vec<u8> {
    let raw = p.with_extension("raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            p.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    std::fs::read(raw).unwrap()
}

fn read_all(d: &dyn Driver) -> Vec<u8> {
    let mut buf = vec![0u8; d.size() as usize];
    d.read_at(&mut buf, 0).unwrap();
    buf
}

fn check(p: &Path) {
    run("qemu-img", &["check", "-q", p.to_str().unwrap()]);
}

const PATTERN: &[&str] = &[
    "write -P 0x11 0 4k",
    "write -P 0x22 65000 70000",
    "write -z 300k 64k",
    "write -P 0x33 1M 1536k",
    "write -z -u 1280k 64k",
    "write -P 0x44 3145216 512",
];

fn assert_reads_like_qemu(opts: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "a.qcow2", opts, "3M");
    qemu_io(&p, PATTERN);
    let d = open(&p, true);
    assert!(read_all(&d) == raw_of(&p), "contents differ for {opts}");
}

#[test]
fn test_reads_match_qemu_for_each_format_option() {
    for opts in [
        "compat=0.10",
        "compat=1.1",
        "cluster_size=512",
        "cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=64",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k",
    ] {
        assert_reads_like_qemu(opts);
    }
}

#[test]
fn test_reads_compressed_clusters_zlib_and_zstd() {
    let dir = tempfile::tempdir().unwrap();
    let src = create(dir.path(), "src.qcow2", "compat=1.1", "3M");
    qemu_io(&src, PATTERN);
    for ty in ["zlib", "zstd"] {
        let dst = dir.path().join(format!("{ty}.qcow2"));
        let o = format!("compression_type={ty}");
        let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
        run(
            "qemu-img",
            &["convert", "-c", "-O", "qcow2", "-o", &o, s, d],
        );
        let drv = open(&dst, true);
        assert!(read_all(&drv) == raw_of(&src), "compressed {ty} differs");
    }
}

/// Writes the same things to the image and to a model; both must agree and check clean.
fn exercise(d: &dyn Driver, model: &mut [u8]) {
    let mut w = |off: u64, len: usize, seed: u8| {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
        d.write_at(&data, off, false).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    };
    w(0, 4096, 1);
    w(65536 - 100, 300, 2);
    w(1 << 20, 200_000, 3);
    w(100, 10, 4);
    w((3 << 20) - 700, 700, 5);
    d.write_zeroes(128 << 10, 256 << 10, ZeroFlags::default())
        .unwrap();
    model[128 << 10..384 << 10].fill(0);
    d.flush().unwrap();
}

#[test]
fn test_writes_check_clean_and_match_model() {
    for opts in [
        "compat=1.1",
        "compat=0.10",
        "cluster_size=512",
        "refcount_bits=1",
        "refcount_bits=64,cluster_size=4k",
        "extended_l2=on",
        "lazy_refcounts=on",
        "compression_type=zstd",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "w.qcow2", opts, "3M");
        qemu_io(&p, &["write -P 0x55 64k 64k", "write -P 0x66 2M 8k"]);
        let mut model = raw_of(&p);
        {
            let d = open(&p, false);
            exercise(&d, &mut model);
            assert!(read_all(&d) == model, "{opts}: reads differ after writes");
        }
        check(&p);
        assert!(raw_of(&p) == model, "{opts}: qemu-img sees other data");
    }
}

#[test]
fn test_refcount_table_grows_for_large_writes() {
    let dir = tempfile::tempdir().unwrap();
    // 512-byte clusters, 16-bit refcounts: a block covers 128 KiB and the
    // first table cluster 8 MiB, so 16 MiB of data needs a bigger table.
    let p = create(dir.path(), "g.qcow2", "cluster_size=512", "64M");
    let data = vec![0xa5u8; 1 << 20];
    {
        let d = open(&p, false);
        for i in 0..16u64 {
            d.write_at(&data, i << 20, false).unwrap();
        }
        d.flush().unwrap();
    }
    check(&p);
    let raw = raw_of(&p);
    assert!(raw[..16 << 20].iter().all(|&b| b == 0xa5));
}

#[test]
fn test_write_into_snapshot_copies_shared_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "s.qcow2", "compat=1.1", "3M");
    qemu_io(&p, &["write -P 0x77 0 3M"]);
    run(
        "qemu-img",
        &["snapshot", "-c", "snap1", p.to_str().unwrap()],
    );
    let before = raw_of(&p);
    let mut model = before.clone();
    {
        let d = open(&p, false);
        exercise(&d, &mut model);
    }
    check(&p);
    assert!(raw_of(&p) == model);
    let snap = dir.path().join("snap.raw");
    let (ps, ss) = (p.to_str().unwrap(), snap.to_str().unwrap());
    run("qemu-img", &["convert", "-l", "snap1", "-O", "raw", ps, ss]);
    assert!(std::fs::read(&snap).unwrap() == before, "snapshot changed");
}

#[test]
fn test_backing_chain_reads_and_cow() {
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "base.qcow2", "compat=1.1", "3M");
    qemu_io(&base, &["write -P 0x12 0 3M"]);
    let o = format!("backing_file={},backing_fmt=qcow2", base.display());
    let top = create(dir.path(), "top.qcow2", &o, "3M");
    qemu_io(&top, &["write -P 0x34 64k 4k"]);
    let mut model = raw_of(&top);
    {
        let backing = open(&base, true);
        let bnode = Arc::new(BlockNode::new("base".into(), Arc::new(backing), true));
        let d = open(&top, false).with_backing(Some(bnode));
        assert_eq!(d.backing_file().map(|b| b.1), Some(Some("qcow2")));
        assert!(read_all(&d) == model);
        let e = d.block_status(0, 64 << 10).unwrap();
        assert_eq!((e.depth, e.allocated), (2, true));
        assert_eq!(d.block_status(64 << 10, 4096).unwrap().depth, 1);
        exercise(&d, &mut model);
        assert!(read_all(&d) == model);
    }
    check(&top);
    assert!(raw_of(&top) == model);
}

#[test]
fn test_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "c.qcow2", "compat=1.1", "4M");
    {
        let d = open(&p, false);
        conformance::run_all(&d);
    }
    check(&p);
}

#[test]
fn test_corrupt_bit_refuses_read_write_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "x.qcow2", "compat=1.1", "1M");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[79] |= 2;
    std::fs::write(&p, bytes).unwrap();
    let rw = Qcow2Driver::open(file_node(&p, false), &Qcow2Options::default());
    assert!(rw.unwrap_err().to_string().contains("corrupt"));
    assert!(Qcow2Driver::open(file_node(&p, true), &Qcow2Options::default()).is_ok());
}

#[test]
fn test_dirty_bit_refuses_read_write_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "d.qcow2", "compat=1.1,lazy_refcounts=on", "1M");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[79] |= 1;
    std::fs::write(&p, bytes).unwrap();
    let rw = Qcow2Driver::open(file_node(&p, false), &Qcow2Options::default());
    assert!(rw
        .unwrap_err()
        .to_string()
        .contains("qemu-img check -r all"));
    assert!(Qcow2Driver::open(file_node(&p, true), &Qcow2Options::default()).is_ok());
}

#[test]
fn test_block_status_depth_without_backing() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "b.qcow2", "compat=1.1", "1M");
    qemu_io(&p, &["write -P 1 0 64k", "write -z 64k 64k"]);
    let d = open(&p, true);
    let at = |o| {
        let e = d.block_status(o, 64 << 10).unwrap();
        (e.allocated, e.zero, e.depth)
    };
    assert_eq!(at(0), (true, false, 1));
    assert_eq!(at(64 << 10), (false, true, 1));
    assert_eq!(at(128 << 10), (false, true, 0));
}

#[test]
fn test_truncated_image_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "t.qcow2", "compat=1.1", "3M");
    qemu_io(&p, PATTERN);
    let full = std::fs::read(&p).unwrap();
    for cut in [0, 100, 512, 70_000, 200_000, full.len() - 1] {
        std::fs::write(&p, &full[..cut]).unwrap();
        let opts = Qcow2Options {
            read_only: true,
            ..Default::default()
        };
        if let Ok(d) = Qcow2Driver::open(file_node(&p, true), &opts) {
            let mut buf = vec![0u8; 3 << 20];
            let _ = d.read_at(&mut buf, 0);
            let _ = d.block_status(0, 3 << 20);
        }
    }
}

fn header_for(size: u64) -> super::header::Header {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "h.qcow2", "compat=1.1", &size.to_string());
    let bytes = std::fs::read(&p).unwrap();
    super::header::Header::parse(&bytes[..65536]).unwrap()
}

#[test]
fn test_cache_defaults_cover_small_disk_and_cap_at_32_mib() {
    let small = header_for(1 << 30);
    let sizes = super::cache_sizes(&small, &Qcow2Options::default()).unwrap();
    assert_eq!(sizes, (128 << 10, 4 * 65536));
    let big = header_for(8 << 40);
    let sizes = super::cache_sizes(&big, &Qcow2Options::default()).unwrap();
    assert_eq!(sizes.0, 32 << 20);
}

#[test]
fn test_cache_size_alone_leaves_four_clusters_for_refcounts() {
    let h = header_for(64 << 30);
    let opts = Qcow2Options {
        cache_size: Some(4 << 20),
        ..Default::default()
    };
    assert_eq!(
        super::cache_sizes(&h, &opts).unwrap(),
        ((4 << 20) - 4 * 65536, 4 * 65536)
    );
}

#[test]
fn test_tiny_caches_evict_dirty_tables_safely() {
    // 512-byte clusters: an L2 table covers 32 KiB, so writes across 3 MiB
    // touch ~100 tables through a 2-table cache (dirty evictions flush all).
    let dir = tempfile::tempdir().unwrap();
    let p = create(
        dir.path(),
        "e.qcow2",
        "cluster_size=512,refcount_bits=8",
        "3M",
    );
    let mut model = vec![0u8; 3 << 20];
    {
        let opts = Qcow2Options {
            l2_cache_size: Some(1024),
            refcount_cache_size: Some(1024),
            ..Default::default()
        };
        let d = Qcow2Driver::open(file_node(&p, false), &opts).unwrap();
        for i in 0..300u64 {
            let off = (i * 10_007) % ((3 << 20) - 3000);
            let data = vec![(i % 251) as u8 + 1; 3000];
            d.write_at(&data, off, false).unwrap();
            model[off as usize..off as usize + 3000].copy_from_slice(&data);
        }
        exercise(&d, &mut model);
        assert!(read_all(&d) == model);
    }
    check(&p);
    assert!(raw_of(&p) == model);
}

fn node_of(p: &Path, read_only: bool) -> BlockNode {
    BlockNode::new("q".into(), Arc::new(open(p, read_only)), read_only)
}

/// A bitmap stored with a backing file name in the header: the name moves
/// behind the new extension and still reads back; the bits survive a
/// reopen; the image passes qemu-img check with no leaks after many stores.
/// A driver whose node was never made stores what it loaded when dropped.
#[test]
fn test_bitmaps_store_and_load_keep_backing_name_and_bits() {
    use crate::bitmap::DirtyBitmap;
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "base.qcow2", "compat=1.1", "8M");
    let p = dir.path().join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            p.to_str().unwrap(),
        ],
    );
    let _ = base;
    for round in 0..5u64 {
        let node = node_of(&p, false);
        if round == 0 {
            let b = DirtyBitmap::new("b".into(), node.size(), 4096, true, true);
            node.bitmaps().insert(Arc::new(b));
        }
        let b = node.bitmaps().find("b").expect("bitmap loaded");
        assert_eq!(b.count(), round * 4096, "round {round}");
        b.mark(round * 1_000_000, 1);
        node.close().unwrap();
        drop(node);
        check(&p);
        let info = run("qemu-img", &["info", p.to_str().unwrap()]);
        assert!(info.contains("backing file: base.qcow2"), "{info}");
        assert!(info.contains("name: b"), "{info}");
    }
    let leaks = run("qemu-img", &["check", p.to_str().unwrap()]);
    assert!(!leaks.contains("leaked"), "{leaks}");
    drop(open(&p, false));
    let info = run("qemu-img", &["info", p.to_str().unwrap()]);
    assert!(
        info.contains("name: b") && !info.contains("in-use"),
        "{info}"
    );
}

/// Open for writing and never closed: the bitmap is in use on disk and the
/// next open loads it inconsistent; removing it frees its clusters. A clean
/// close clears the flag.
#[test]
fn test_bitmap_not_stored_cleanly_loads_inconsistent() {
    use crate::bitmap::DirtyBitmap;
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "a.qcow2", "compat=1.1", "8M");
    let node = node_of(&p, false);
    let b = DirtyBitmap::new("b".into(), node.size(), 65536, true, true);
    node.bitmaps().insert(Arc::new(b));
    node.close().unwrap();
    drop(node);
    // The disk as a kill would leave it: a copy taken while the image is open.
    let open_now = node_of(&p, false);
    assert!(open_now.driver().bitmap_store().unwrap().stored_bitmaps()[0].in_use);
    let crashed = dir.path().join("crashed.qcow2");
    std::fs::copy(&p, &crashed).unwrap();
    drop(open_now);
    assert!(!run("qemu-img", &["info", p.to_str().unwrap()]).contains("in-use"));
    let p = crashed;
    let node = node_of(&p, false);
    let b = node.bitmaps().find("b").unwrap();
    assert!(b.is_inconsistent() && !b.enabled());
    node.driver()
        .bitmap_store()
        .unwrap()
        .remove_persistent_bitmap("b")
        .unwrap();
    node.bitmaps().remove("b");
    node.close().unwrap();
    drop(node);
    let out = run("qemu-img", &["check", p.to_str().unwrap()]);
    assert!(!out.contains("leaked"), "{out}");
    assert!(!run("qemu-img", &["info", p.to_str().unwrap()]).contains("bitmaps"));
}

/// A thread that panicked holding the metadata lock may have left a mapping
/// half-updated: every later request fails with EIO, and nothing is mapped
/// for sendfile or the ring.
#[test]
fn test_poisoned_metadata_lock_fails_requests_with_eio() {
    use crate::mapping::Access;
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "a.qcow2", "compat=1.1", "1M");
    qemu_io(&p, &["write -P 7 0 64k"]);
    let d = Arc::new(open(&p, false));
    let mut buf = [0u8; 4096];
    d.read_at(&mut buf, 0).unwrap();
    let holder = d.clone();
    let panicked = std::thread::spawn(move || {
        let _m = holder.meta.lock().unwrap();
        panic!("a bug while the metadata is half-updated");
    })
    .join();
    assert!(panicked.is_err());
    let eio = |r: crate::error::BlockResult<_>| r.unwrap_err().errno() == libc::EIO;
    assert!(eio(d.read_at(&mut buf, 0)));
    assert!(eio(d.write_at(&buf, 0, false)));
    assert!(eio(d.block_status(0, 4096).map(drop)));
    assert!(eio(d.flush()));
    assert!(d.map_file(0, 4096, Access::Read).is_none());
}

/// Points guest cluster 0's L2 entry at host offset `host` (flags kept).
fn point_cluster_0_at(p: &Path, host: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let be = |at: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, at).unwrap();
        u64::from_be_bytes(b)
    };
    let l1 = be(40);
    let l2 = be(l1) & super::l2::OFFSET_MASK;
    let entry = be(l2) & !super::l2::OFFSET_MASK | host;
    f.write_all_at(&entry.to_be_bytes(), l2).unwrap();
}

fn header_u64(p: &Path, at: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    u64::from_be_bytes(b)
}

#[test]
fn test_write_over_metadata_is_prevented_and_marks_the_image_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    for (target, name) in [
        (48, "refcount table"),
        (40, "active L1 table"),
        (0, "active L2 table"),
    ] {
        let p = create(dir.path(), "m.qcow2", "compat=1.1", "64M");
        qemu_io(&p, &["write -P 1 0 64k"]);
        // 0 means "the L2 table itself": read its offset through L1.
        let host = match target {
            0 => header_u64(&p, header_u64(&p, 40)) & super::l2::OFFSET_MASK,
            at => header_u64(&p, at),
        };
        point_cluster_0_at(&p, host);
        let d = open(&p, false);
        let e = d.write_at(&[7u8; 512], 0, false).unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        let found = e.found_corruption().expect("a signalled corruption");
        assert_eq!(
            found.msg,
            format!("Preventing invalid write on metadata (overlaps with {name})")
        );
        assert_eq!((found.offset, found.size), (Some(host), Some(512)));
        assert!(d.unusable());
        let mut buf = [0u8; 512];
        assert_eq!(
            d.read_at(&mut buf, 1 << 20).unwrap_err().errno(),
            libc::ENOMEDIUM
        );
        drop(d);
        assert_ne!(header_u64(&p, 72) & super::header::INCOMPAT_CORRUPT, 0);
        std::fs::remove_file(&p).unwrap();
    }
}
