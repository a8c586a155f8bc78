//! A node over a driver with an asynchronous face sends every request there, never to its
//! synchronous methods, and `raw` over such a node does the same through its window.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use block::drivers::raw::RawDriver;
use block::test_utils::MemDriver;
use block::{
    AsyncDriver, BlockNode, BlockResult, Capabilities, Driver, Extent, IoBuf, IoFuture, ZeroFlags,
};
use tokio::sync::Barrier;

/// Storage that answers later, from the runtime, like a network peer; it counts which face
/// was used. With `gate`, every read waits until that many reads are in flight.
#[derive(Debug)]
struct Remote {
    mem: Arc<MemDriver>,
    sync_calls: Arc<AtomicUsize>,
    async_calls: Arc<AtomicUsize>,
    gate: Option<Arc<Barrier>>,
}

impl Remote {
    fn new(size: usize, gate: Option<usize>) -> Self {
        Self {
            mem: Arc::new(MemDriver::new(size)),
            sync_calls: Arc::default(),
            async_calls: Arc::default(),
            gate: gate.map(|n| Arc::new(Barrier::new(n))),
        }
    }

    fn sync(&self) -> &MemDriver {
        self.sync_calls.fetch_add(1, Ordering::Relaxed);
        &self.mem
    }
}

impl Driver for Remote {
    fn driver_name(&self) -> &'static str {
        "remote"
    }
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            can_write: true,
            can_discard: true,
            request_alignment: 1,
            ..Capabilities::default()
        }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.sync().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.sync().write_at(buf, offset, fua)
    }
    fn flush(&self) -> BlockResult<()> {
        self.sync().flush()
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.sync().discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.sync().write_zeroes(offset, len, flags)
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.sync().block_status(offset, len)
    }
    fn async_driver(&self) -> Option<Arc<dyn AsyncDriver>> {
        Some(Arc::new(RemoteAsync {
            mem: self.mem.clone(),
            calls: self.async_calls.clone(),
            gate: self.gate.clone(),
        }))
    }
}

#[derive(Debug)]
struct RemoteAsync {
    mem: Arc<MemDriver>,
    calls: Arc<AtomicUsize>,
    gate: Option<Arc<Barrier>>,
}

impl RemoteAsync {
    /// Runs `op` on the memory after yielding to the runtime, as a reply would arrive.
    fn later<T: Send + 'static>(
        &self,
        op: impl FnOnce(&MemDriver) -> T + Send + 'static,
    ) -> IoFuture<T> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mem = self.mem.clone();
        Box::pin(async move {
            tokio::task::yield_now().await;
            op(&mem)
        })
    }
}

impl AsyncDriver for RemoteAsync {
    fn read(&self, mut buf: IoBuf, offset: u64) -> IoFuture<(IoBuf, BlockResult<()>)> {
        let gate = self.gate.clone();
        let read = self.later(move |m| {
            let r = m.read_at(&mut buf, offset);
            (buf, r)
        });
        Box::pin(async move {
            if let Some(g) = gate {
                g.wait().await;
            }
            read.await
        })
    }
    fn write(&self, buf: IoBuf, offset: u64, fua: bool) -> IoFuture<(IoBuf, BlockResult<()>)> {
        self.later(move |m| {
            let r = m.write_at(&buf, offset, fua);
            (buf, r)
        })
    }
    fn flush(&self) -> IoFuture<BlockResult<()>> {
        self.later(|m| m.flush())
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<BlockResult<()>> {
        self.later(move |m| m.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<BlockResult<()>> {
        self.later(move |m| m.write_zeroes(offset, len, flags))
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<BlockResult<Extent>> {
        self.later(move |m| m.block_status(offset, len))
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_add(seed)).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn test_raw_over_an_async_node_never_calls_the_synchronous_driver() {
    let remote = Remote::new(1 << 20, None);
    let (sync_calls, async_calls) = (remote.sync_calls.clone(), remote.async_calls.clone());
    let proto = Arc::new(BlockNode::new("proto".into(), Arc::new(remote), false));
    let raw = RawDriver::new(proto.clone(), 4096, Some(65536), true).expect("raw");
    let node = BlockNode::new("fmt".into(), Arc::new(raw), false);
    assert!(node.async_driver().is_some(), "raw offers an async face");

    let data = pattern(8192, 7);
    let (_, r) = node.write(IoBuf::from_slice(&data), 1024, true).await;
    r.expect("write");
    let (buf, r) = node.read(IoBuf::zeroed(8192), 1024).await;
    r.expect("read");
    assert_eq!(&buf[..], &data[..]);
    node.write_zeroes(2048, 1024, ZeroFlags::default())
        .await
        .expect("zeroes");
    node.discard(0, 512).await.expect("discard");
    node.flush().await.expect("flush");
    let e = node.block_status(0, 65536).await.expect("status");
    assert!(e.len > 0 && e.len <= 65536);

    // The window: raw's offset 1024 is the protocol node's 4096 + 1024.
    let mut direct = vec![0u8; 8192];
    proto.driver().read_at(&mut direct, 5120).expect("direct");
    let mut expected = data.clone();
    expected[1024..2048].fill(0);
    assert_eq!(direct, expected);
    // Only that last direct call reached the synchronous face.
    assert_eq!(sync_calls.load(Ordering::Relaxed), 1);
    assert!(async_calls.load(Ordering::Relaxed) >= 6);
}

#[tokio::test(flavor = "current_thread")]
async fn test_requests_in_flight_hold_no_thread() {
    // One runtime thread, and reads that complete only once 32 are pending at once: each is a
    // future parked on that thread, none is a thread blocked in the driver.
    const IN_FLIGHT: usize = 32;
    let remote = Remote::new(1 << 20, Some(IN_FLIGHT));
    let sync_calls = remote.sync_calls.clone();
    let node = Arc::new(BlockNode::new("proto".into(), Arc::new(remote), true));
    let mut reads = tokio::task::JoinSet::new();
    for i in 0..IN_FLIGHT as u64 {
        let node = node.clone();
        reads.spawn(async move { node.read(IoBuf::zeroed(4096), i * 4096).await.1 });
    }
    let all = tokio::time::timeout(Duration::from_secs(10), reads.join_all())
        .await
        .expect("all 32 reads were in flight together");
    assert_eq!(all.len(), IN_FLIGHT);
    assert!(all.iter().all(|r| r.is_ok()));
    assert_eq!(sync_calls.load(Ordering::Relaxed), 0);
}
