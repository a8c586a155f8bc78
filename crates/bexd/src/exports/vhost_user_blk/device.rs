//! The virtio-blk device behind a vhost-user connection: its features and
//! configuration space, and the requests its virtqueues carry, handed to
//! the runtime.
//!
//! # Threads
//!
//! vhost-user-backend runs one epoll worker thread per queue
//! (`queues_per_thread`); on a kick the worker pops every available chain,
//! parses it (the `virtio-blk` crate), and spawns a task per request on the tokio
//! runtime, then goes back to waiting. The task does the I/O through
//! `BlockNode`, copies between the `IoBuf` and guest memory, writes the
//! status byte, puts the chain in the used ring and signals the front-end
//! (the vring has its own lock, so tasks of one queue complete in any
//! order, as virtio allows). A worker never waits for I/O, so a queue keeps
//! as many requests in flight as the guest queues.
//!
//! Requests are counted in the export's and the node's statistics
//! (`exports::counting`), as NBD requests are: IN as a read, OUT and
//! WRITE_ZEROES as writes, FLUSH, DISCARD as an unmap; GET_ID is not
//! counted. A chain refused by the parser counts as invalid under its type
//! when its header could be read.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use block::{BlockError, BlockNode, IoBuf, IoKind, IoStats, Outcome, ZeroFlags};
use tokio::runtime::Handle;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::exports::counting::Counted;
use crate::exports::inflight::{InFlight, InFlightGuard};
use virtio_blk::{self as request, Desc, Geometry, Op, Refused, Request, SECTOR};

pub type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Descriptors per virtqueue at most.
const QUEUE_SIZE: usize = 256;
/// Bytes in a virtio-blk serial number (`VIRTIO_BLK_ID_BYTES`).
const ID_BYTES: usize = 20;
/// What GET_ID answers, as qemu-storage-daemon's export does.
const SERIAL: &[u8] = b"vhost_user_blk";
/// QEMU's limits for one discard or write-zeroes request, in sectors.
const MAX_DISCARD_SECTORS: u32 = 32768;
const MAX_WRITE_ZEROES_SECTORS: u32 = 32768;

/// virtio feature bits (virtio-blk's and the transport's).
mod feature {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const TOPOLOGY: u64 = 1 << 10;
    pub const MQ: u64 = 1 << 12;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
    pub const INDIRECT_DESC: u64 = 1 << 28;
    pub const VERSION_1: u64 = 1 << 32;
}

/// The device, shared by the connection's worker threads and its tasks.
#[derive(Clone, Debug)]
pub struct BlkDevice {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `None` once the export is stopping: requests fail with IOERR.
    node: Arc<Mutex<Option<Arc<BlockNode>>>>,
    geometry: Geometry,
    num_queues: u16,
    mem: Mutex<Option<Memory>>,
    runtime: Handle,
    in_flight: Arc<InFlight>,
    /// The export's statistics (the node has its own).
    stats: Arc<IoStats>,
    /// One exit event per worker thread, written when the connection ends.
    exits: Mutex<Vec<EventNotifier>>,
}

impl BlkDevice {
    pub fn new(
        node: Arc<Mutex<Option<Arc<BlockNode>>>>,
        geometry: Geometry,
        num_queues: u16,
        runtime: Handle,
        in_flight: Arc<InFlight>,
        stats: Arc<IoStats>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                node,
                geometry,
                num_queues,
                mem: Mutex::new(None),
                runtime,
                in_flight,
                stats,
                exits: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Ends the connection's worker threads.
    pub fn stop_workers(&self) {
        for exit in lock(&self.inner.exits).drain(..) {
            let _ = exit.notify();
        }
    }

    /// `virtio_blk_config` as QEMU's export fills it, little-endian.
    fn config_space(&self) -> [u8; 60] {
        let g = &self.inner.geometry;
        let mut c = [0u8; 60];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &(g.capacity / SECTOR).to_le_bytes());
        put(12, &((QUEUE_SIZE - 2) as u32).to_le_bytes());
        put(20, &(g.block_size as u32).to_le_bytes());
        put(26, &1u16.to_le_bytes());
        put(28, &1u32.to_le_bytes());
        put(34, &self.inner.num_queues.to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &1u32.to_le_bytes());
        put(44, &((g.block_size / SECTOR) as u32).to_le_bytes());
        put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        put(52, &1u32.to_le_bytes());
        put(56, &[1]);
        c
    }

    /// Pops every available chain of `vring` and starts its request.
    fn drain_queue(&self, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = lock(&self.inner.mem).clone() else {
            return Ok(());
        };
        let guard = mem.memory();
        let chains: Vec<_> = {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            let iter = queue.iter(guard.clone()).map_err(io::Error::other)?;
            iter.collect()
        };
        for chain in chains {
            let head = chain.head_index();
            let descs: Vec<Desc> = chain
                .take(request::MAX_SEGMENTS + 1)
                .map(|d| Desc {
                    addr: d.addr().0,
                    len: d.len(),
                    write_only: d.is_write_only(),
                })
                .collect();
            let read16 = |addr: u64| {
                let mut b = [0u8; 16];
                guard
                    .read_slice(&mut b, GuestAddress(addr))
                    .ok()
                    .map(|()| b)
            };
            let parsed = request::parse(&descs, &self.inner.geometry, read16, read16);
            self.start(vring.clone(), mem.clone(), head, parsed);
        }
        Ok(())
    }

    /// Runs one request on the runtime (or answers a refused one at once).
    fn start(&self, vring: VringRwLock, mem: Memory, head: u16, parsed: Result<Request, Refused>) {
        let request = match parsed {
            Ok(r) => r,
            Err(refused) => {
                self.count_refused(&refused);
                return complete(&vring, &mem, head, refused.status_at, refused.status, 0);
            }
        };
        let guard = self.inner.in_flight.enter();
        let node = lock(&self.inner.node).clone();
        let Some(node) = node else {
            drop(guard);
            return complete(
                &vring,
                &mem,
                head,
                Some(request.status),
                request::S_IOERR,
                0,
            );
        };
        let count = Counted::begin(&self.inner.stats, &node);
        let chain = Chain { vring, mem, head };
        self.inner
            .runtime
            .spawn(serve(node, chain, request, count, guard));
    }

    /// Counts a chain the parser refused, under its type, while the export serves.
    fn count_refused(&self, refused: &Refused) {
        let Some(kind) = refused.kind.and_then(counted_kind) else {
            return;
        };
        let Some(node) = lock(&self.inner.node).clone() else {
            return;
        };
        let errno = match refused.status {
            request::S_UNSUPP => libc::ENOTSUP,
            _ if kind == IoKind::Write && !self.inner.geometry.writable => libc::EPERM,
            _ => libc::EINVAL,
        };
        Counted::refused(&self.inner.stats, &node, kind, (0, 0), errno);
    }
}

/// How a request type is counted (GET_ID and unknown types are not).
fn counted_kind(kind: u32) -> Option<IoKind> {
    match kind {
        request::T_IN => Some(IoKind::Read),
        request::T_OUT | request::T_WRITE_ZEROES => Some(IoKind::Write),
        request::T_FLUSH => Some(IoKind::Flush),
        request::T_DISCARD => Some(IoKind::Unmap),
        _ => None,
    }
}

/// A request's counters: its kind and range (offset, bytes).
fn counted_op(op: &Op) -> Option<(IoKind, (u64, u64))> {
    match *op {
        Op::Read { offset, len } => Some((IoKind::Read, (offset, len))),
        Op::Write { offset, len } | Op::WriteZeroes { offset, len, .. } => {
            Some((IoKind::Write, (offset, len)))
        }
        Op::Flush => Some((IoKind::Flush, (0, 0))),
        Op::Discard { offset, len } => Some((IoKind::Unmap, (offset, len))),
        Op::GetId => None,
    }
}

/// A chain taken from a queue, to be completed there.
struct Chain {
    vring: VringRwLock,
    mem: Memory,
    head: u16,
}

/// Why a request failed: the status the guest gets, and how it is counted.
struct Failure {
    status: u8,
    outcome: Outcome,
}

impl Failure {
    /// The node failed the request.
    fn io(e: BlockError) -> Self {
        Self {
            status: request::S_IOERR,
            outcome: Outcome::Failed(e.errno()),
        }
    }

    /// A guest buffer could not be read before the request reached the node.
    fn bad_buffer(status: u8) -> Self {
        Self {
            status,
            outcome: Outcome::Invalid(libc::EINVAL),
        }
    }

    /// A guest buffer could not be written after the node served the request.
    fn undelivered(status: u8) -> Self {
        Self {
            status,
            outcome: Outcome::Failed(libc::EIO),
        }
    }
}

/// Does `request`, counts it (before the guest can see it done) and
/// completes its chain.
async fn serve(
    node: Arc<BlockNode>,
    chain: Chain,
    request: Request,
    count: Counted,
    guard: InFlightGuard,
) {
    let result = execute(&node, &chain.mem, &request).await;
    if let Some((kind, range)) = counted_op(&request.op) {
        let outcome = match &result {
            Ok(_) => Outcome::Done,
            Err(f) => f.outcome,
        };
        count.end(kind, range, outcome);
    }
    let (status, written) = match result {
        Ok(written) => (request::S_OK, written),
        Err(f) => (f.status, 0),
    };
    let Chain { vring, mem, head } = chain;
    complete(&vring, &mem, head, Some(request.status), status, written);
    drop(guard);
}

/// The I/O of one request: the bytes written into guest buffers, or why not.
async fn execute(node: &BlockNode, mem: &Memory, r: &Request) -> Result<u32, Failure> {
    let io = |r: Result<(), BlockError>| r.map_err(Failure::io);
    match r.op {
        Op::Read { offset, len } => {
            let (buf, res) = node.read(IoBuf::for_overwrite(len as usize), offset).await;
            io(res)?;
            scatter(mem, &r.data, &buf).map_err(Failure::undelivered)?;
            Ok(len as u32)
        }
        Op::Write { offset, len } => {
            let mut buf = IoBuf::for_overwrite(len as usize);
            gather(mem, &r.data, &mut buf).map_err(Failure::bad_buffer)?;
            io(node.write(buf, offset, false).await.1)?;
            Ok(0)
        }
        Op::Flush => io(node.flush().await).map(|()| 0),
        Op::GetId => {
            let mut id = [0u8; ID_BYTES];
            id[..SERIAL.len()].copy_from_slice(SERIAL);
            let d = r.data[0];
            let n = (d.len as usize).min(ID_BYTES);
            let m = mem.memory();
            m.write_slice(&id[..n], GuestAddress(d.addr))
                .map_err(|_| Failure::undelivered(request::S_IOERR))?;
            Ok(n as u32)
        }
        Op::Discard { offset, len } => io(node.discard(offset, len).await).map(|()| 0),
        Op::WriteZeroes { offset, len, unmap } => {
            let flags = ZeroFlags {
                may_unmap: unmap,
                fast: false,
            };
            io(node.write_zeroes(offset, len, flags).await).map(|()| 0)
        }
    }
}

/// Copies `buf` into the guest buffers `data`, in order.
fn scatter(mem: &Memory, data: &[Desc], buf: &[u8]) -> Result<(), u8> {
    let m = mem.memory();
    let mut at = 0;
    for d in data {
        let part = &buf[at..at + d.len as usize];
        m.write_slice(part, GuestAddress(d.addr))
            .map_err(|_| request::S_IOERR)?;
        at += d.len as usize;
    }
    Ok(())
}

/// Copies the guest buffers `data`, in order, into `buf`.
fn gather(mem: &Memory, data: &[Desc], buf: &mut [u8]) -> Result<(), u8> {
    let m = mem.memory();
    let mut at = 0;
    for d in data {
        let part = &mut buf[at..at + d.len as usize];
        m.read_slice(part, GuestAddress(d.addr))
            .map_err(|_| request::S_IOERR)?;
        at += d.len as usize;
    }
    Ok(())
}

/// Writes the status byte (when the chain has a place for it), returns the
/// chain to the front-end and signals it.
fn complete(
    vring: &VringRwLock,
    mem: &Memory,
    head: u16,
    at: Option<u64>,
    status: u8,
    written: u32,
) {
    let mut used = written;
    if let Some(at) = at {
        if mem.memory().write_obj(status, GuestAddress(at)).is_ok() {
            used += 1;
        }
    }
    if let Err(e) = vring.add_used(head, used) {
        tracing::debug!("vhost-user-blk: used ring update failed: {e}");
        return;
    }
    let _ = vring.signal_used_queue();
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.inner.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = feature::VERSION_1
            | feature::INDIRECT_DESC
            | feature::SEG_MAX
            | feature::BLK_SIZE
            | feature::TOPOLOGY
            | feature::FLUSH
            | feature::DISCARD
            | feature::WRITE_ZEROES
            | feature::MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if !self.inner.geometry.writable {
            f |= feature::RO;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    /// No EVENT_IDX is offered: every completion signals.
    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let start = (offset as usize).min(space.len());
        let end = start.saturating_add(size as usize).min(space.len());
        let mut out = space[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *lock(&self.inner.mem) = Some(mem);
        Ok(())
    }

    /// A worker per queue.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()?;
        let keep = notifier.try_clone().ok()?;
        lock(&self.inner.exits).push(keep);
        Some((consumer, notifier))
    }

    /// GET_VRING_BASE: the front-end is taking the queue back, so what was
    /// accepted must be done first.
    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        self.inner.in_flight.wait_idle();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other("unexpected event set"));
        }
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.drain_queue(vring),
            None => Ok(()),
        }
    }
}

/// The locks here guard values replaced whole (the memory map, the node
/// slot, the exit events), consistent whatever a panicking holder did.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
