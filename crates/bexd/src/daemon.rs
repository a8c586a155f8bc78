//! The daemon: it owns the tables and the NBD server, and wires the
//! operations that span them (an export needs a node, a server needs TLS
//! credentials). Each table has its own lock; nothing here holds two at once.
//!
//! Commands (QMP and the command line) call in here; the parts below never
//! call back: the NBD server sees a [`ServerContext`], an export's client
//! guard holds the export table, a node hold the node's counter.

use std::sync::{Arc, Mutex, MutexGuard};

use block::IoStats;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chardevs::ChardevTable;
use crate::config::{ExportConfig, ExportKindConfig, NbdServerConfig};
use crate::error::{ExportError, ServerError};
use crate::events::EventBus;
use crate::exports::fuse::FuseExport;
use crate::exports::nbd::NbdExport;
use crate::exports::vhost_user_blk::VhostUserBlkExport;
use crate::exports::{Export, ExportKind, ExportTable};
use crate::jobs::JobTable;
use crate::nbd_server::{NbdServer, ServerContext};
use crate::net::StartGate;
use crate::nodes::NodeTable;
use crate::objects::ObjectTable;

#[derive(Debug)]
pub struct Daemon {
    pub nodes: Arc<NodeTable>,
    pub exports: Arc<ExportTable>,
    pub objects: Arc<ObjectTable>,
    /// The NBD server, while one runs.
    nbd: Mutex<Option<NbdServer>>,
    /// `--chardev`s by id, for `--monitor` to find and `query-chardev` to list.
    pub chardevs: Arc<ChardevTable>,
    pub events: EventBus,
    /// Background jobs (backups).
    pub jobs: Arc<JobTable>,
    /// Fired by `quit` or a signal: everything winds down.
    pub shutdown: CancellationToken,
    /// Connection and monitor tasks, awaited on shutdown so in-flight requests finish.
    pub tasks: TaskTracker,
    /// Opened when start-up is complete; listeners accept only from then on.
    pub gate: StartGate,
}

impl Daemon {
    pub fn new() -> Arc<Self> {
        let events = EventBus::new();
        // Throttle groups are objects that throttle nodes join by name.
        let throttle_groups = Arc::new(block::throttle::ThrottleGroups::default());
        Arc::new(Self {
            nodes: Arc::new(NodeTable::new_in(
                throttle_groups.clone(),
                Arc::new(events.clone()),
            )),
            exports: Arc::new(ExportTable::new(events.clone())),
            objects: Arc::new(ObjectTable::with_throttle_groups(throttle_groups)),
            nbd: Mutex::new(None),
            chardevs: Arc::new(ChardevTable::new()),
            jobs: Arc::new(JobTable::new(events.clone())),
            events,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            gate: StartGate::closed(),
        })
    }

    /// The NBD server slot. Every update is a whole `Option` swap, so a lock
    /// poisoned by a panic elsewhere still guards a consistent value.
    fn nbd(&self) -> MutexGuard<'_, Option<NbdServer>> {
        self.nbd.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What an NBD server may use of the daemon.
    fn server_context(&self) -> ServerContext {
        ServerContext {
            exports: self.exports.clone(),
            objects: self.objects.clone(),
            shutdown: self.shutdown.clone(),
            tasks: self.tasks.clone(),
            gate: self.gate.clone(),
        }
    }

    pub fn nbd_server_running(&self) -> bool {
        self.nbd().is_some()
    }

    /// The running NBD server's TLS counters and payload budget.
    pub fn nbd_server_gauges(&self) -> Option<crate::nbd_server::ServerGauges> {
        self.nbd().as_ref().map(|s| s.gauges())
    }

    /// The address the NBD server really bound (a TCP port 0 resolved).
    pub fn nbd_server_addr(&self) -> Option<crate::config::ListenAddr> {
        self.nbd().as_ref().map(|s| s.bound_addr().clone())
    }

    pub fn start_nbd_server(&self, config: NbdServerConfig) -> Result<(), ServerError> {
        if self.nbd_server_running() {
            return Err(ServerError::AlreadyRunning);
        }
        let tls = match &config.tls_creds {
            Some(id) => Some(self.objects.server_tls_creds(id)?),
            None => None,
        };
        let server = NbdServer::start(config, tls, self.server_context())?;
        let mut slot = self.nbd();
        if slot.is_some() {
            server.stop();
            return Err(ServerError::AlreadyRunning);
        }
        *slot = Some(server);
        Ok(())
    }

    /// `nbd-server-stop`: removes the NBD exports (hard), then closes the listener.
    pub fn stop_nbd_server(&self) -> Result<(), ServerError> {
        let Some(server) = self.nbd().take() else {
            return Err(ServerError::NotRunning);
        };
        self.exports.remove_all(Some("nbd"));
        server.stop();
        Ok(())
    }

    /// `block-export-add` / `--export` / `nbd-server-add`: the kind's checks,
    /// then what every kind shares (node, iothread, writable), then the kind's
    /// own part, then the table (id and name clashes).
    pub fn add_export(&self, config: ExportConfig) -> Result<(), ExportError> {
        if matches!(config.kind, ExportKindConfig::Nbd(_)) && !self.nbd_server_running() {
            return Err(ExportError::NbdServerNotRunning);
        }
        let hold = self.nodes.hold(&config.node_name)?;
        if let Some(iothread) = &config.iothread {
            if !self.objects.is_iothread(iothread) {
                return Err(ExportError::NoIothread(iothread.clone()));
            }
        }
        if config.writable && hold.node().read_only() {
            return Err(ExportError::ReadOnlyNode);
        }
        let stats = Arc::new(IoStats::default());
        let kind: Box<dyn ExportKind> = match &config.kind {
            ExportKindConfig::Nbd(nbd) => Box::new(NbdExport::create(
                nbd,
                hold.node(),
                config.writable,
                &self.nodes,
            )?),
            ExportKindConfig::Fuse(fuse) => {
                // Before mounting: a second mount would stack on the first.
                let taken = self.exports.visible().iter().any(|e| {
                    e.kind_as::<FuseExport>()
                        .is_some_and(|f| f.mountpoint() == fuse.mountpoint)
                });
                if taken {
                    let at = fuse.mountpoint.display().to_string();
                    return Err(ExportError::DuplicateFuseMount(at));
                }
                Box::new(FuseExport::create(
                    fuse,
                    &config.id,
                    hold.node(),
                    config.writable,
                    stats.clone(),
                )?)
            }
            ExportKindConfig::VhostUserBlk(vhost) => Box::new(VhostUserBlkExport::create(
                vhost,
                &config.id,
                hold.node(),
                config.writable,
                stats.clone(),
            )?),
        };
        self.exports.add(Export::new(config, hold, kind, stats))
    }

    /// Start-up is complete: objects can no longer be made that only the
    /// command line may make, and the listeners start accepting.
    pub fn start_serving(&self) {
        self.objects.mark_started();
        self.gate.open();
    }

    /// `quit`: the main task notices and shuts the daemon down.
    pub fn begin_quit(&self) {
        self.shutdown.cancel();
    }

    /// The last steps of shutdown, once connections have drained: exports
    /// go (announced), every node is flushed and closed, the listener stops.
    pub async fn wind_down(&self) {
        self.exports.remove_all(None);
        self.nodes.flush_all().await;
        self.nodes.close_all().await;
        let server = self.nbd().take();
        if let Some(server) = server {
            server.stop();
        }
    }
}
