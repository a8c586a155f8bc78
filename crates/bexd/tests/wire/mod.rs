//! An NBD server in this process, on a unix socket in a temp dir, exporting
//! a [`disk::MapDisk`] through blkdebug (for injected errors), and a client
//! that speaks the protocol with the nbd crate's client codec and hands the
//! tests every reply as it came off the wire.
//!
//! No daemon, no binary: the tables, the export and the server are built
//! directly, as the daemon builds them.

#![allow(dead_code)]

pub mod client;
pub mod disk;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bexd::config::{
    BitmapRef, ExportConfig, ExportKindConfig, ListenAddr, NbdExportConfig, NbdServerConfig,
    DEFAULT_PAYLOAD_BUDGET,
};
use bexd::events::EventBus;
use bexd::exports::nbd::NbdExport;
use bexd::exports::{Export, ExportTable};
use bexd::nbd_server::{NbdServer, ServerContext};
use bexd::nodes::{NodeEntry, NodeTable};
use bexd::objects::ObjectTable;
use block::drivers::blkdebug::{BlkdebugDriver, InjectError, IoType};
use block::DebugEvent;
use block::{BlockNode, DirtyBitmap};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use client::{Chunk, Client, Headers, Reply};
pub use disk::{MapDisk, Op, KIB, SIZE};

/// The NBD name of the export.
pub const EXPORT: &str = "disk";
/// The exported dirty bitmap, `qemu:dirty-bitmap:b0`: disabled, 64 KiB
/// granularity, dirty over [`BITMAP_DIRTY`].
pub const BITMAP: &str = "b0";
pub const BITMAP_DIRTY: (u64, u64) = (64 * KIB, 64 * KIB);

/// How the export is set up.
#[derive(Clone, Debug)]
pub struct Setup {
    pub writable: bool,
    pub writethrough: bool,
    /// blkdebug rules on the exported node.
    pub faults: Vec<InjectError>,
    /// The disk's size: [`SIZE`], or more for 64-bit lengths (see `disk.rs`).
    pub size: u64,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            writable: true,
            writethrough: false,
            faults: Vec::new(),
            size: SIZE,
        }
    }
}

impl Setup {
    pub fn read_only() -> Self {
        Self {
            writable: false,
            ..Self::default()
        }
    }

    /// A writable disk of `size` bytes.
    pub fn sized(size: u64) -> Self {
        Self {
            size,
            ..Self::default()
        }
    }

    /// Every request of kind `io` covering byte `offset` fails with `errno`
    /// (every flush, for `Flush`: a flush covers no sector). The rule waits
    /// for `none`, which blkdebug reports when it opens, so it is armed at once.
    pub fn failing(io: IoType, offset: u64, errno: i32) -> Self {
        Self {
            faults: vec![InjectError {
                sector: (io != IoType::Flush).then_some(offset / 512),
                ..InjectError::new(DebugEvent::None, vec![io], errno)
            }],
            ..Self::default()
        }
    }
}

/// A running server and the disk it exports. Dropping it shuts the server down.
pub struct Server {
    runtime: Option<Runtime>,
    server: NbdServer,
    shutdown: CancellationToken,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    /// The memory disk under blkdebug, to see what requests did to it.
    pub disk: Arc<MapDisk>,
}

impl Server {
    pub fn start(setup: Setup) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let dir = tempfile::tempdir().expect("a temp dir");
        let socket = dir.path().join("nbd.sock");
        let disk = Arc::new(MapDisk::with_size(setup.size));
        let mem = Arc::new(BlockNode::new("mem".into(), disk.clone(), false));
        let blkdebug = Arc::new(BlkdebugDriver::new(mem, setup.faults.clone()));
        let node = Arc::new(BlockNode::new("dbg".into(), blkdebug, false));
        let bitmap = DirtyBitmap::new(BITMAP.into(), setup.size, 64 * KIB, false, false);
        bitmap.set_range(BITMAP_DIRTY.0, BITMAP_DIRTY.1);
        node.bitmaps().insert(Arc::new(bitmap));

        let nodes = NodeTable::new();
        nodes
            .insert(NodeEntry::new(
                node.clone(),
                vec![],
                false,
                "mem".into(),
                None,
            ))
            .expect("a new node");
        let exports = Arc::new(ExportTable::new(EventBus::new()));
        let nbd = NbdExportConfig {
            name: EXPORT.into(),
            description: None,
            allocation_depth: true,
            bitmaps: vec![BitmapRef::Local(BITMAP.into())],
        };
        let kind = NbdExport::create(&nbd, &node, setup.writable, &nodes).expect("the NBD export");
        let config = ExportConfig {
            id: "e0".into(),
            node_name: "dbg".into(),
            writable: setup.writable,
            writethrough: setup.writethrough,
            iothread: None,
            kind: ExportKindConfig::Nbd(nbd),
        };
        let hold = nodes.hold("dbg").expect("the node is in the table");
        exports
            .add(Export::new(config, hold, Box::new(kind), Arc::default()))
            .expect("a new export");

        let shutdown = CancellationToken::new();
        let ctx = ServerContext {
            exports,
            objects: Arc::new(ObjectTable::new()),
            shutdown: shutdown.clone(),
            tasks: TaskTracker::new(),
            gate: bexd::net::StartGate::opened(),
        };
        let config = NbdServerConfig {
            addr: ListenAddr::Unix {
                path: socket.clone(),
            },
            tls_creds: None,
            tls_authz: None,
            max_connections: 0,
            handshake_max: None,
            payload_budget: DEFAULT_PAYLOAD_BUDGET,
        };
        let server = {
            let _in_runtime = runtime.enter();
            NbdServer::start(config, None, ctx).expect("the NBD server starts")
        };
        Self {
            runtime: Some(runtime),
            server,
            shutdown,
            socket,
            _dir: dir,
            disk,
        }
    }

    /// A client in transmission: simple replies only, no meta contexts.
    pub fn simple_client(&self) -> Client {
        Client::connect(&self.socket, EXPORT, Headers::Simple, &[])
    }

    /// A client in transmission with structured replies and the meta contexts
    /// `contexts` (ids as the server assigned them: see [`Client::context`]).
    pub fn structured_client(&self, contexts: &[&str]) -> Client {
        Client::connect(&self.socket, EXPORT, Headers::Structured, contexts)
    }

    /// A client in transmission with extended headers (32-byte requests,
    /// 64-bit lengths, extended reply chunks) and the meta contexts `contexts`.
    pub fn extended_client(&self, contexts: &[&str]) -> Client {
        Client::connect(&self.socket, EXPORT, Headers::Extended, contexts)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.server.stop();
        self.shutdown.cancel();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}
