//! Plain configuration: what the command line and QMP asked for, as data.
//!
//! The QAPI readers (`crate::qapi`) produce these types and everything else
//! consumes them. Nothing here does anything: no I/O, no locks, no lookups,
//! and nothing in this module imports another module of the crate, so a
//! reader never calls back into the code that uses its output.

mod chardev;
mod export;
mod ids;
mod node;
mod server;

pub use chardev::{ChardevAddr, ChardevBackend, ChardevConfig, SocketChardev};
pub use export::{
    AllowOther, BitmapRef, ExportConfig, ExportKindConfig, FuseExportConfig, NbdExportConfig,
    RemoveMode, VhostUserBlkExportConfig,
};
pub use ids::is_well_formed_id;
pub use node::{BackingSpec, CbwSpec, ChildRef, NbdClientSpec, NodeOptions, NodeSpec, Qcow2Cache};
pub use server::{
    inet_family, Family, InetOptions, ListenAddr, NbdServerConfig, DEFAULT_PAYLOAD_BUDGET,
};
