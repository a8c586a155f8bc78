//! Every driver against the conformance suite, plus driver-specific behaviour.

use std::sync::Arc;

use block::drivers::file::{FileDriver, FileOptions, LockingMode};
use block::drivers::null::NullDriver;
use block::drivers::raw::RawDriver;
use block::test_utils::{conformance, MemDriver};
use block::{BlockErrorKind, BlockNode, Driver, IoBuf, ZeroFlags};

const MIB: u64 = 1 << 20;

/// A sparse image under the target directory, which is on disk where /tmp may be a
/// tmpfs (which refuses O_DIRECT). Cargo sets CARGO_TARGET_TMPDIR when it compiles an
/// integration test, not when it runs one, so it is read at compile time.
fn image(size: u64) -> (tempfile::TempDir, FileOptions) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    let opts = FileOptions {
        filename: path,
        discard: true,
        ..FileOptions::default()
    };
    (dir, opts)
}

#[test]
fn test_file_driver_conforms() {
    let (_dir, opts) = image(4 * MIB);
    conformance::run_all(&FileDriver::open(&opts).unwrap());
}

/// `opts` opened with O_DIRECT, or `None` where the filesystem refuses it (tmpfs: EINVAL).
/// Outside CI the caller then skips its O_DIRECT checks, saying so; under CI (`CI=true`) a
/// refusal fails the test, so that a CI run never passes O_DIRECT tests that did not run.
fn open_direct(opts: &FileOptions) -> Option<FileDriver> {
    let opts = FileOptions {
        cache_direct: true,
        ..opts.clone()
    };
    match FileDriver::open(&opts) {
        Ok(d) => Some(d),
        Err(e) => {
            assert_eq!(e.errno(), libc::EINVAL, "{e}");
            let dir = opts.filename.parent().unwrap_or(&opts.filename).display();
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI must run the O_DIRECT tests, but {dir} refuses O_DIRECT: {e}"
            );
            eprintln!("skipped: {dir} refuses O_DIRECT ({e}), so the O_DIRECT checks did not run");
            None
        }
    }
}

#[test]
fn test_file_driver_with_o_direct_conforms() {
    let (_dir, opts) = image(4 * MIB);
    if let Some(d) = open_direct(&opts) {
        conformance::run_all(&d);
    }
}

#[test]
fn test_file_driver_without_discard_conforms() {
    let (_dir, mut opts) = image(4 * MIB);
    opts.discard = false;
    conformance::run_all(&FileDriver::open(&opts).unwrap());
}

#[test]
fn test_raw_over_file_with_offset_conforms() {
    let (_dir, opts) = image(4 * MIB);
    let file = Arc::new(BlockNode::new(
        "f".into(),
        Arc::new(FileDriver::open(&opts).unwrap()),
        false,
    ));
    let raw = RawDriver::new(file, MIB, Some(2 * MIB), true).unwrap();
    conformance::run_all(&raw);
    assert_eq!(raw.size(), 2 * MIB);
}

#[test]
fn test_raw_writes_land_at_offset_in_child() {
    let (_dir, opts) = image(4 * MIB);
    let file = Arc::new(BlockNode::new(
        "f".into(),
        Arc::new(FileDriver::open(&opts).unwrap()),
        false,
    ));
    let raw = RawDriver::new(file, MIB, None, false).unwrap();
    raw.write_at(b"hello", 0, false).unwrap();
    let contents = std::fs::read(&opts.filename).unwrap();
    assert_eq!(&contents[MIB as usize..MIB as usize + 5], b"hello");
}

#[test]
fn test_raw_window_past_child_is_refused_with_qemu_text() {
    let (_dir, opts) = image(MIB);
    let file = Arc::new(BlockNode::new(
        "f".into(),
        Arc::new(FileDriver::open(&opts).unwrap()),
        false,
    ));
    let err = RawDriver::new(file, 4096, Some(MIB), false).unwrap_err();
    assert!(err
        .to_string()
        .starts_with("The sum of offset (4096) and size (1048576)"));
}

#[test]
fn test_mem_and_null_drivers_conform_where_they_store() {
    conformance::run_all(&MemDriver::new(MIB as usize));
    let null = NullDriver::new(MIB, true);
    assert!(!null.block_status(0, 4096).unwrap().allocated);
    assert!(null.block_status(0, 4096).unwrap().zero);
}

#[test]
fn test_block_status_reports_holes_and_data() {
    let (_dir, opts) = image(4 * MIB);
    let d = FileDriver::open(&opts).unwrap();
    d.write_at(&[1u8; 65536], MIB, false).unwrap();
    let hole = d.block_status(0, 4 * MIB).unwrap();
    let data = d.block_status(MIB, 3 * MIB).unwrap();
    assert!(!hole.allocated && hole.zero);
    assert!(hole.len <= MIB);
    assert!(data.allocated && !data.zero);
    assert!(data.len >= 65536);
}

#[test]
fn test_missing_file_error_names_the_file() {
    let opts = FileOptions {
        filename: "/nonexistent/disk.img".into(),
        ..FileOptions::default()
    };
    let err = FileDriver::open(&opts).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Could not open '/nonexistent/disk.img': No such file or directory"
    );
    assert_eq!(err.kind(), BlockErrorKind::NotFound);
}

#[test]
fn test_second_writer_on_locked_image_is_refused() {
    let (_dir, opts) = image(MIB);
    let _first = FileDriver::open(&opts).unwrap();
    let err = FileDriver::open(&opts).unwrap_err();
    assert!(err.to_string().contains("lock"), "{err}");
    let unlocked = FileOptions {
        locking: LockingMode::Off,
        ..opts
    };
    assert!(FileDriver::open(&unlocked).is_ok());
}

#[test]
fn test_read_only_file_refuses_writes_at_the_node() {
    let (_dir, mut opts) = image(MIB);
    opts.read_only = true;
    let node = BlockNode::new(
        "f".into(),
        Arc::new(FileDriver::open(&opts).unwrap()),
        false,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (_, r) = rt.block_on(node.write(IoBuf::zeroed(512), 0, false));
    assert_eq!(r.unwrap_err().kind(), BlockErrorKind::ReadOnly);
}

#[test]
fn test_node_refuses_out_of_range_read() {
    let node = BlockNode::new("n".into(), Arc::new(MemDriver::new(4096)), false);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (_, r) = rt.block_on(node.read(IoBuf::zeroed(512), 4000));
    assert_eq!(r.unwrap_err().kind(), BlockErrorKind::OutOfBounds);
}

#[test]
fn test_node_round_trips_through_blocking_pool() {
    let (_dir, opts) = image(MIB);
    let node = BlockNode::new(
        "f".into(),
        Arc::new(FileDriver::open(&opts).unwrap()),
        false,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let got = rt.block_on(async {
        let (_, w) = node
            .write(IoBuf::from_slice(&[7u8; 4096]), 8192, true)
            .await;
        w.unwrap();
        node.write_zeroes(8192, 512, ZeroFlags::default())
            .await
            .unwrap();
        let (buf, r) = node.read(IoBuf::zeroed(4096), 8192).await;
        r.unwrap();
        buf
    });
    assert!(got[..512].iter().all(|&b| b == 0));
    assert!(got[512..].iter().all(|&b| b == 7));
}

#[test]
fn test_block_status_sees_a_hole_punched_after_a_cached_query() {
    let (_dir, opts) = image(4 * MIB);
    let d = FileDriver::open(&opts).unwrap();
    d.write_at(&[1u8; 1 << 20], MIB, false).unwrap();
    assert!(d.block_status(MIB, MIB).unwrap().allocated);
    d.discard(MIB, MIB).unwrap();
    let after = d.block_status(MIB, MIB).unwrap();
    assert!(
        !after.allocated && after.zero,
        "discard must invalidate the data cache"
    );
}

#[test]
fn test_block_status_cache_merges_queries_into_one_data_range() {
    let (_dir, opts) = image(4 * MIB);
    let d = FileDriver::open(&opts).unwrap();
    d.write_at(&[1u8; 4 << 20], 0, false).unwrap();
    assert_eq!(d.block_status(2 * MIB, MIB).unwrap().len, MIB);
    assert_eq!(d.block_status(0, 4 * MIB).unwrap().len, 4 * MIB);
    assert_eq!(d.block_status(MIB, 3 * MIB).unwrap().len, 3 * MIB);
}

#[test]
fn test_memory_backed_file_runs_inline_and_disk_file_does_not() {
    let (_dir, on_disk) = image(MIB);
    let disk = FileDriver::open(&on_disk).unwrap();
    assert!(
        !disk.capabilities().nonblocking,
        "a file on a disk filesystem may block"
    );
    let shm = tempfile::tempdir_in("/dev/shm").expect("/dev/shm is a tmpfs on Linux");
    let path = shm.path().join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(MIB).unwrap();
    let mem = FileDriver::open(&FileOptions {
        filename: path,
        ..FileOptions::default()
    })
    .unwrap();
    assert!(mem.capabilities().nonblocking, "tmpfs I/O is a memory copy");
    // Inline or not, the node's results are the same.
    let node = BlockNode::new("m".into(), Arc::new(mem), false);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let got = rt.block_on(async {
        let (_, w) = node
            .write(IoBuf::from_slice(&[9u8; 4096]), 4096, false)
            .await;
        w.unwrap();
        let (big, w) = node
            .write(IoBuf::from_slice(&[5u8; 512 * 1024]), 0, false)
            .await;
        drop(big);
        w.unwrap();
        node.read(IoBuf::zeroed(4096), 4096).await
    });
    got.1.unwrap();
    assert!(got.0.iter().all(|&b| b == 5));
}

#[test]
fn test_cached_read_is_served_at_once_and_matches() {
    let (_dir, opts) = image(MIB);
    let f = FileDriver::open(&opts).unwrap();
    f.write_at(&[3u8; 8192], 65536, false).unwrap();
    let mut buf = vec![0u8; 8192];
    // Just written, so in the page cache: RWF_NOWAIT succeeds on ext4, xfs, btrfs.
    match f.try_read_now(&mut buf, 65536) {
        Some(r) => {
            r.unwrap();
            assert!(buf.iter().all(|&b| b == 3));
        }
        None => panic!("a page-cache hit must not need the blocking pool"),
    }
    // The image lock allows one writer: close the buffered driver first.
    drop(f);
    if let Some(direct) = open_direct(&opts) {
        assert!(
            direct.try_read_now(&mut buf, 0).is_none(),
            "O_DIRECT reads always go to the pool"
        );
    }
}

/// One mapping hook: a tmpfs file says "page cache" and the node hands out
/// a `sendfile` slice; a disk file without a ring says nothing; a file with
/// a ring names it (where the kernel has io_uring); blkdebug never maps.
#[test]
fn test_map_file_says_what_the_file_can_do() {
    use block::drivers::blkdebug::BlkdebugDriver;
    use block::drivers::file::AioMode;
    use block::Access;
    let shm = tempfile::tempdir_in("/dev/shm").expect("/dev/shm is a tmpfs on Linux");
    let path = shm.path().join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(MIB).unwrap();
    let mem = FileDriver::open(&FileOptions {
        filename: path,
        ..FileOptions::default()
    })
    .unwrap();
    let m = mem
        .map_file(4096, 8192, Access::Read)
        .expect("a page-cache file");
    assert!(m.page_cache && m.ring.is_none());
    assert_eq!(
        m.runs,
        vec![block::FileRun {
            offset: 4096,
            len: 8192
        }]
    );
    assert!(
        mem.map_file(MIB - 4096, 8192, Access::Write).is_none(),
        "writes stay inside"
    );
    let mem = Arc::new(BlockNode::new("m".into(), Arc::new(mem), false));
    assert!(mem.page_cache_slice(0, 256 * 1024).is_some());
    let over = BlkdebugDriver::new(mem, Vec::new());
    assert!(!over.capabilities().maps_page_cache);
    assert!(over.map_file(0, 4096, Access::Read).is_none());

    let (_dir, opts) = image(MIB);
    let disk = FileDriver::open(&opts).unwrap();
    assert!(disk.map_file(0, 4096, Access::Read).is_none());
    drop(disk);
    let ring = FileDriver::open(&FileOptions {
        aio: AioMode::IoUring,
        ..opts
    })
    .unwrap();
    if ring.capabilities().maps_ring {
        let m = ring
            .map_file(0, 4096, Access::Write)
            .expect("the file's ring");
        assert!(m.ring.is_some() && !m.page_cache);
    }
}

/// A memory disk that records which thread answered block status.
#[derive(Debug)]
struct StatusThread {
    mem: MemDriver,
    seen: std::sync::Mutex<Vec<std::thread::ThreadId>>,
}

impl Driver for StatusThread {
    fn driver_name(&self) -> &'static str {
        "status-thread"
    }
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn capabilities(&self) -> block::Capabilities {
        self.mem.capabilities()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> block::BlockResult<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> block::BlockResult<()> {
        self.mem.write_at(buf, offset, fua)
    }
    fn flush(&self) -> block::BlockResult<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> block::BlockResult<()> {
        self.mem.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> block::BlockResult<()> {
        self.mem.write_zeroes(offset, len, flags)
    }
    fn block_status(&self, offset: u64, len: u64) -> block::BlockResult<block::Extent> {
        let me = std::thread::current().id();
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).push(me);
        self.mem.block_status(offset, len)
    }
}

#[test]
fn test_block_status_of_any_length_runs_inline_on_a_nonblocking_driver() {
    // 64 MiB: far past the inline limit for reads; a status query costs the same at any length.
    let driver = Arc::new(StatusThread {
        mem: MemDriver::new(64 << 20),
        seen: Default::default(),
    });
    assert!(driver.capabilities().nonblocking);
    let node = BlockNode::new("n".into(), driver.clone(), false);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let extent = rt
        .block_on(node.block_status(0, 64 << 20))
        .expect("block status");
    assert_eq!(extent.len, 64 << 20);
    let seen = driver
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    assert_eq!(
        seen,
        vec![std::thread::current().id()],
        "not answered inline"
    );
}

/// Extents a walk hands over, with where each starts; stops after `limit`.
struct Collect {
    got: Vec<(u64, block::Extent)>,
    limit: usize,
}

impl block::ExtentSink for Collect {
    fn push(&mut self, offset: u64, extent: &block::Extent) -> bool {
        self.got.push((offset, *extent));
        self.got.len() < self.limit
    }
}

/// A walk over a file on the disk reports the same extents as one query per
/// extent, covers the range without gaps, and stops where the sink says;
/// and so does a walk that goes to the pool (through blkdebug, a driver
/// that never answers at once).
#[tokio::test]
async fn test_walk_block_status_on_a_disk_file_matches_extent_by_extent_queries() {
    let (_dir, opts) = image(64 * MIB);
    let file = walk_matches_queries(opts.clone(), |file| file).await;
    let through_pool = |file: BlockNode| {
        let debug = block::drivers::blkdebug::BlkdebugDriver::new(Arc::new(file), Vec::new());
        BlockNode::new("debug".into(), Arc::new(debug), false)
    };
    let (_dir2, opts2) = image(64 * MIB);
    let pooled = walk_matches_queries(opts2, through_pool).await;
    assert_eq!(
        file, pooled,
        "the same image gives the same extents either way"
    );
}

/// Writes data at four places, opens the image through `wrap`, and checks a
/// walk against one query at a time; returns the walk's extents.
async fn walk_matches_queries(
    opts: FileOptions,
    wrap: impl FnOnce(BlockNode) -> BlockNode,
) -> Vec<(u64, block::Extent)> {
    let data = [3 * MIB, 10 * MIB + 4096, 40 * MIB, 63 * MIB];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&opts.filename)
            .unwrap();
        for at in data {
            f.write_all_at(&[0xa5; 8192], at).unwrap();
        }
        f.sync_all().unwrap();
    }
    let driver = FileDriver::open(&opts).unwrap();
    let node = wrap(BlockNode::new("disk".into(), Arc::new(driver), false));
    assert!(!node.capabilities().nonblocking, "a disk file, not tmpfs");
    let (start, len, step) = (MIB, 62 * MIB + 512, 16 * MIB);
    let walked = node
        .walk_block_status(
            start,
            len,
            step,
            Collect {
                got: Vec::new(),
                limit: usize::MAX,
            },
        )
        .await
        .unwrap()
        .got;
    let mut one_by_one = Vec::new();
    let mut pos = start;
    while pos < start + len {
        let e = node
            .block_status(pos, (start + len - pos).min(step))
            .await
            .unwrap();
        one_by_one.push((pos, e));
        pos += e.len;
    }
    assert_eq!(walked, one_by_one);
    let mut next = start;
    for (at, e) in &walked {
        assert_eq!(*at, next, "no gap, no overlap");
        assert!(e.len >= 1 && e.len <= step);
        next += e.len;
    }
    assert_eq!(next, start + len);
    let data_extents = walked.iter().filter(|(_, e)| e.allocated).count();
    assert!(data_extents >= 3, "the data written is found: {walked:?}");
    let first_two = node
        .walk_block_status(
            start,
            len,
            step,
            Collect {
                got: Vec::new(),
                limit: 2,
            },
        )
        .await
        .unwrap()
        .got;
    assert_eq!(first_two, walked[..2]);
    assert!(
        node.walk_block_status(
            60 * MIB,
            8 * MIB,
            step,
            Collect {
                got: Vec::new(),
                limit: 1
            }
        )
        .await
        .is_err(),
        "past the end is refused"
    );
    walked
}
