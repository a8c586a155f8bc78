//! blockdev-add, blockdev-del and block-set-write-threshold.

use std::sync::Arc;

use qmp::schema::block_core::BlockSetWriteThresholdArgs;
use qmp::visitor::{from_value, InputMode};
use qmp::QmpError;
use serde_json::Value;

use super::{ok, Args};
use crate::config::{BackingSpec, ChildRef, NodeOptions, NodeSpec};
use crate::daemon::Daemon;
use crate::jobs::NodeUse;
use crate::tls::NbdTlsClient;

/// `blockdev-add` and `--blockdev`: typed arguments from JSON or keyval, then the node table.
pub fn add(daemon: &Arc<Daemon>, value: Value, mode: InputMode) -> Result<Value, QmpError> {
    let options = crate::qapi::node_options(value, mode)?;
    if options.node_name.is_none() {
        return Err(QmpError::generic(
            "'node-name' must be specified for the root node",
        ));
    }
    let mut options = options;
    resolve_objects(daemon, &mut options)?;
    crate::nodes::open(&daemon.nodes, options, false)?;
    Ok(ok())
}

/// Puts what each node's objects hold into its options (rbd's `key-secret`
/// key, nbd's `tls-creds` TLS upgrade; inline children too): the node table
/// never sees objects.
fn resolve_objects(daemon: &Arc<Daemon>, options: &mut NodeOptions) -> Result<(), QmpError> {
    match &mut options.spec {
        NodeSpec::Rbd {
            options: rbd,
            key_secret: Some(id),
        } => rbd.key = Some(daemon.objects.secret_base64(id)?),
        NodeSpec::Nbd(nbd) => {
            if let Some(id) = &nbd.tls_creds {
                let creds = daemon.objects.client_tls_creds(id)?;
                // QEMU's name to verify: tls-hostname, else an inet server's host.
                let hostname = nbd.tls_hostname.clone().or_else(|| match &nbd.server {
                    nbd_client::ServerAddr::Inet { host, .. } => Some(host.clone()),
                    nbd_client::ServerAddr::Unix(_) => None,
                });
                nbd.tls = Some(Arc::new(NbdTlsClient::new(creds, hostname)));
            }
        }
        NodeSpec::Rbd { .. } | NodeSpec::File { .. } | NodeSpec::Null { .. } => {}
        NodeSpec::Raw { file: child, .. }
        | NodeSpec::Throttle { file: child, .. }
        | NodeSpec::SnapshotAccess { file: child }
        | NodeSpec::Blkdebug { image: child, .. } => resolve_child(daemon, child)?,
        NodeSpec::CopyBeforeWrite(c) => {
            resolve_child(daemon, &mut c.file)?;
            resolve_child(daemon, &mut c.target)?;
        }
        NodeSpec::Qcow2 { file, backing, .. } => {
            resolve_child(daemon, file)?;
            if let BackingSpec::Node(child) = backing {
                resolve_child(daemon, child)?;
            }
        }
    }
    Ok(())
}

fn resolve_child(daemon: &Arc<Daemon>, child: &mut ChildRef) -> Result<(), QmpError> {
    match child {
        ChildRef::Inline(options) => resolve_objects(daemon, options),
        ChildRef::Name(_) => Ok(()),
    }
}

/// `blockdev-add` from QMP.
pub fn add_qmp(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    add(daemon, Value::Object(args), InputMode::Json)
}

pub fn del(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let node_name = crate::qapi::node_name_arg(Value::Object(args))?;
    // QEMU's answers: a job's target is blocked by the job, its source
    // has the job's filter as a parent.
    match daemon.jobs.node_use(&node_name) {
        Some(NodeUse::Target) => {
            return Err(QmpError::generic(format!(
                "Node '{node_name}' is busy: block device is in use by block job: backup"
            )))
        }
        Some(NodeUse::Source) => {
            return Err(QmpError::generic(format!(
                "Block device {node_name} is in use"
            )))
        }
        None => {}
    }
    daemon.nodes.delete(&node_name)?;
    Ok(ok())
}

/// `block-set-write-threshold`: the node reports the first write past it
/// (`BLOCK_WRITE_THRESHOLD`) and turns it off; 0 turns it off at once.
pub fn set_write_threshold(daemon: &Arc<Daemon>, args: Args) -> Result<Value, QmpError> {
    let args: BlockSetWriteThresholdArgs = from_value(Value::Object(args), InputMode::Json)?;
    let node = daemon
        .nodes
        .find(&args.node_name)
        .ok_or_else(|| QmpError::generic(format!("Device '{}' not found", args.node_name)))?;
    node.set_write_threshold(args.write_threshold);
    Ok(ok())
}
