//! The daemon's errors, one enum per part, each variant printing QEMU's text.
//!
//! The tables and the NBD server return these; the QMP edge turns them into
//! `QmpError` (every one is a `GenericError` in QEMU, so the class is fixed
//! here and the message is the variant's `Display`).

use block::throttle::ThrottleConfigError;
use qmp::{ErrorClass, QmpError};
use thiserror::Error;

/// The node table (`blockdev-add`, `blockdev-del`, lookups).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NodeError {
    #[error("Duplicate nodes with node-name='{0}'")]
    Duplicate(String),
    #[error("Invalid node-name: '{0}'")]
    InvalidName(String),
    /// `blockdev-del` of a name that is not in the table.
    #[error("Failed to find node with node-name='{0}'")]
    NotFound(String),
    /// An export's `node-name` that names no node.
    #[error("Cannot find device='' nor node-name='{0}'")]
    NoSuchDevice(String),
    /// A reference by name (a child, a bitmap's `node`) to a missing node.
    #[error("Cannot find device='{0}' nor node-name='{0}'")]
    NoSuchNode(String),
    /// An export holds it.
    #[error("Node {0} is in use")]
    Exported(String),
    /// Another node uses it as a child.
    #[error("Block device {0} is in use")]
    HasParents(String),
    /// The driver refused to open or the options do not fit; QEMU's text as the driver gave it.
    #[error("{0}")]
    Open(String),
    /// A throttle node's `throttle-group` names no group.
    #[error("Throttle group '{0}' does not exist")]
    NoThrottleGroup(String),
}

/// The export table and the export kinds.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ExportError {
    #[error("Block export id '{0}' is already in use")]
    DuplicateId(String),
    #[error("NBD server already has export named '{0}'")]
    DuplicateNbdName(String),
    #[error("Export '{0}' is not found")]
    NotFound(String),
    #[error("Export '{0}' is already shutting down")]
    ShuttingDown(String),
    #[error("export '{0}' still in use")]
    InUse(String),
    #[error("iothread \"{0}\" not found")]
    NoIothread(String),
    #[error("Cannot export read-only node as writable")]
    ReadOnlyNode,
    #[error("NBD server not running")]
    NbdServerNotRunning,
    #[error("There already is a FUSE export on '{0}'")]
    DuplicateFuseMount(String),
    /// The mountpoint cannot be mounted over; QEMU's text (`Failed to stat
    /// '...': ...`, `'...' is not a regular file`), or what a stale mount needs.
    #[error("{0}")]
    FuseMountpoint(String),
    /// The mount itself failed; QEMU's text, then why.
    #[error("Failed to mount FUSE session to export: {0}")]
    FuseMount(String),
    /// The vhost-user-blk socket cannot be set up.
    #[error("{0}")]
    VhostUserBlk(String),
    #[error(transparent)]
    Node(#[from] NodeError),
    /// A bitmap named in `bitmaps` cannot be served; QEMU's text.
    #[error("{0}")]
    Bitmap(String),
}

/// The object table (`--object`, `object-add`, `object-del`).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ObjectError {
    #[error("attempt to add duplicate property '{0}' to object (type 'container')")]
    Duplicate(String),
    #[error("object '{0}' not found")]
    NotFound(String),
    #[error("object '{0}' is in use, can not be deleted")]
    InUse(String),
    #[error("only one main-loop instance allowed")]
    SecondMainLoop,
    /// QEMU can resize its pool at run time; bexd's is built with the process.
    #[error("a main-loop object can only be created on the command line: the thread pool it sizes is already running")]
    MainLoopAfterStart,
    #[error("No TLS credentials with id '{0}'")]
    NoTlsCreds(String),
    #[error("Expected TLS credentials for a server endpoint")]
    NotServerEndpoint,
    #[error("Expected TLS credentials for a client endpoint")]
    NotClientEndpoint,
    #[error("Object with id '{0}' is not TLS credentials")]
    NotTlsCreds(String),
    #[error("No secret with id '{0}'")]
    NoSecret(String),
    #[error("Object with id '{0}' is not a secret")]
    NotSecret(String),
    /// A throttle group's limits or properties, refused as QEMU refuses them.
    #[error(transparent)]
    ThrottleLimits(#[from] ThrottleConfigError),
}

/// `qom-get` and `qom-set` on an object's property.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum QomError {
    /// No object at that path (QEMU's class is DeviceNotFound).
    #[error("Device '{0}' not found")]
    NoSuchPath(String),
    #[error("Property '{qom_type}.{property}' not found")]
    NoSuchProperty { qom_type: String, property: String },
    #[error("Property '{qom_type}.{property}' is not writable")]
    NotWritable { qom_type: String, property: String },
    /// An `x-*` throttle property: QEMU takes limits only as a whole then.
    #[error("Property cannot be set after initialization")]
    SetAfterInit,
    /// bexd models the properties of throttle groups only; other objects'
    /// properties are refused rather than answered wrongly.
    #[error("Property '{qom_type}.{property}' cannot be read or set in bexd (only throttle-group properties can)")]
    Unsupported { qom_type: String, property: String },
    #[error(transparent)]
    Limits(#[from] ThrottleConfigError),
    /// The value does not fit the property's type; the visitor's text.
    #[error("{}", .0.desc)]
    Value(QmpError),
}

impl From<QomError> for QmpError {
    fn from(e: QomError) -> Self {
        match e {
            QomError::NoSuchPath(_) => QmpError::new(ErrorClass::DeviceNotFound, e.to_string()),
            QomError::Value(q) => q,
            other => QmpError::generic(other.to_string()),
        }
    }
}

/// The chardev table and the monitors on it (`--chardev`, `--monitor`),
/// and descriptors handed in as listening sockets (`addr.type=fd`, `getfd`).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChardevError {
    #[error("attempt to add duplicate property '{0}' to object (type 'container')")]
    Duplicate(String),
    #[error("cannot use stdio by multiple character devices")]
    StdioTaken,
    #[error("chardev \"{0}\" not found")]
    NotFound(String),
    #[error("chardev '{0}' is already in use")]
    InUse(String),
    /// Binding or connecting failed; QEMU's text.
    #[error("{0}")]
    Socket(String),
    #[error(transparent)]
    Fd(#[from] FdError),
}

/// A descriptor named as a listening socket (`addr.type=fd`, `fd=`) or
/// passed with `getfd`. Where QEMU has a text, it is QEMU's.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FdError {
    #[error("Unable to parse FD number {0}")]
    NotANumber(String),
    #[error("File descriptor '{0}' is not a socket")]
    NotASocket(String),
    #[error("File descriptor '{0}' is not a stream socket")]
    NotStream(String),
    #[error("File descriptor '{0}' is not a listening socket")]
    NotListening(String),
    #[error("File descriptor '{0}' is neither a TCP nor a unix socket")]
    Family(String),
    #[error("File descriptor named '{0}' has not been found")]
    NoSuchName(String),
    #[error("File descriptor named '{0}' not found")]
    CloseUnknown(String),
    #[error("No file descriptor supplied via SCM_RIGHTS")]
    NoneSupplied,
    #[error("Parameter 'fdname' expects a name not starting with a digit")]
    NameStartsWithDigit,
    #[error("{0}")]
    Io(String),
}

/// The NBD server's lifecycle (`nbd-server-start`, `nbd-server-stop`).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ServerError {
    #[error("NBD server already running")]
    AlreadyRunning,
    #[error("NBD server not running")]
    NotRunning,
    /// Binding or listening failed; QEMU's text.
    #[error("{0}")]
    Listen(String),
    #[error(transparent)]
    Fd(#[from] FdError),
    #[error(transparent)]
    Object(#[from] ObjectError),
}

macro_rules! generic_error {
    ($($t:ty),*) => {$(
        impl From<$t> for QmpError {
            fn from(e: $t) -> Self {
                QmpError::generic(e.to_string())
            }
        }
    )*};
}
generic_error!(
    NodeError,
    ExportError,
    ObjectError,
    ServerError,
    ChardevError,
    FdError
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_nested_errors_print_the_inner_text_as_qemu_does() {
        let e = ExportError::from(NodeError::NoSuchDevice("n0".into()));
        assert_eq!(e.to_string(), "Cannot find device='' nor node-name='n0'");
        let q = QmpError::from(e);
        assert_eq!(q.desc, "Cannot find device='' nor node-name='n0'");
        assert_eq!(q.class, qmp::ErrorClass::GenericError);
    }
}
