//! Opening block nodes: `--blockdev` and `blockdev-add` both end here.
//!
//! QAPI arguments are first turned into [`NodeOptions`] (in `qapi.rs`), then
//! opened bottom-up: an inline child (`file.driver=file,...`) becomes an
//! implicit node with a generated name, as in QEMU.

use std::path::PathBuf;
use std::sync::Arc;

use block::drivers::blkdebug::{BlkdebugDriver, InjectError};
use block::drivers::file::{AioMode, FileDriver, FileOptions, LockingMode};
use block::drivers::null::NullDriver;
use block::drivers::raw::RawDriver;
use block::{BlockError, BlockNode, Driver};
use qmp::visitor::InputMode;
use qmp::QmpError;
use serde_json::Value;

use crate::daemon::{Daemon, NodeEntry};

/// Options common to every node, with QEMU's defaults.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    pub node_name: Option<String>,
    pub read_only: bool,
    pub auto_read_only: bool,
    /// `discard=unmap` (QEMU's default is `ignore`).
    pub discard: bool,
    pub cache_direct: bool,
    pub cache_no_flush: bool,
    pub spec: NodeSpec,
}

/// The driver-specific part.
#[derive(Clone, Debug)]
pub enum NodeSpec {
    Blkdebug {
        image: ChildRef,
        rules: Vec<InjectError>,
    },
    File {
        filename: PathBuf,
        aio: AioMode,
        locking: LockingMode,
    },
    Raw {
        file: ChildRef,
        offset: u64,
        size: Option<u64>,
    },
    Null {
        size: u64,
        read_zeroes: bool,
        latency_ns: u64,
    },
}

impl Default for NodeSpec {
    fn default() -> Self {
        Self::Null {
            size: 1 << 30,
            read_zeroes: false,
            latency_ns: 0,
        }
    }
}

/// A child given by node name, or described inline.
#[derive(Clone, Debug)]
pub enum ChildRef {
    Name(String),
    Inline(Box<NodeOptions>),
}

/// `blockdev-add`: typed arguments from JSON or keyval, then [`open`].
pub fn add(daemon: &Arc<Daemon>, value: Value, mode: InputMode) -> Result<String, QmpError> {
    let options = crate::qapi::node_options(value, mode)?;
    if options.node_name.is_none() {
        return Err(QmpError::generic(
            "'node-name' must be specified for the root node",
        ));
    }
    open(daemon, options, false)
}

/// Opens a node (and its inline children) and registers it; returns its name.
pub fn open(
    daemon: &Arc<Daemon>,
    options: NodeOptions,
    implicit: bool,
) -> Result<String, QmpError> {
    let name = match &options.node_name {
        Some(n) => {
            check_node_name(n)?;
            if daemon.find_node(n).is_some() {
                return Err(QmpError::generic(format!(
                    "Duplicate nodes with node-name='{n}'"
                )));
            }
            n.clone()
        }
        None => daemon.generate_node_name(),
    };
    let (driver, children, filename) = open_driver(daemon, &options)?;
    let read_only = options.read_only || !driver.capabilities().can_write;
    let node = Arc::new(BlockNode::new(name.clone(), driver, read_only));
    daemon.insert_node(NodeEntry {
        node,
        children,
        parents: 0,
        implicit,
        filename,
    })?;
    tracing::info!(node = %name, "block node added");
    Ok(name)
}

type Opened = (Arc<dyn Driver>, Vec<String>, String);

fn open_driver(daemon: &Arc<Daemon>, options: &NodeOptions) -> Result<Opened, QmpError> {
    match &options.spec {
        NodeSpec::File {
            filename,
            aio,
            locking,
        } => {
            let file_options = FileOptions {
                filename: filename.clone(),
                read_only: options.read_only,
                auto_read_only: options.auto_read_only,
                cache_direct: options.cache_direct,
                cache_no_flush: options.cache_no_flush,
                aio: *aio,
                locking: *locking,
                discard: options.discard,
            };
            let driver = FileDriver::open(&file_options).map_err(block_error)?;
            Ok((Arc::new(driver), Vec::new(), filename.display().to_string()))
        }
        NodeSpec::Raw { file, offset, size } => {
            let (child, child_name, filename) = open_child(daemon, options, file)?;
            let driver =
                RawDriver::new(child, *offset, *size, options.discard).map_err(block_error)?;
            Ok((Arc::new(driver), vec![child_name], filename))
        }
        NodeSpec::Blkdebug { image, rules } => {
            let (child, child_name, filename) = open_child(daemon, options, image)?;
            let driver = BlkdebugDriver::new(child, rules.clone());
            Ok((Arc::new(driver), vec![child_name], filename))
        }
        NodeSpec::Null {
            size,
            read_zeroes,
            latency_ns,
        } => {
            let latency = std::time::Duration::from_nanos(*latency_ns);
            let driver = NullDriver::with_latency(*size, *read_zeroes, latency);
            Ok((Arc::new(driver), Vec::new(), "null-co://".to_string()))
        }
    }
}

/// Resolves a child given by name or opens an inline one; returns the node,
/// its name and the filename it shows.
fn open_child(
    daemon: &Arc<Daemon>,
    parent: &NodeOptions,
    child: &ChildRef,
) -> Result<(Arc<BlockNode>, String, String), QmpError> {
    let child_name = match child {
        ChildRef::Name(n) => n.clone(),
        ChildRef::Inline(child) => {
            let mut child = (**child).clone();
            // An implicit child inherits read-only from its parent, as in QEMU.
            child.read_only |= parent.read_only;
            child.auto_read_only |= parent.auto_read_only;
            open(daemon, child, true)?
        }
    };
    let entry = {
        let state = daemon.state();
        state
            .nodes
            .get(&child_name)
            .map(|e| (e.node.clone(), e.filename.clone()))
    };
    let (node, filename) = entry.ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{child_name}' nor node-name='{child_name}'"
        ))
    })?;
    Ok((node, child_name, filename))
}

fn block_error(e: BlockError) -> QmpError {
    QmpError::generic(e.to_string())
}

/// QEMU's rule for ids: a letter first, then letters, digits, `-`, `.`, `_`.
pub fn check_node_name(name: &str) -> Result<(), QmpError> {
    if is_well_formed_id(name) {
        Ok(())
    } else {
        Err(QmpError::generic(format!("Invalid node-name: '{name}'")))
    }
}

pub fn is_well_formed_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_is_well_formed_id_rejects_leading_digit() {
        assert!(!is_well_formed_id("1a"));
    }

    #[test]
    fn test_is_well_formed_id_accepts_qemu_punctuation() {
        assert!(is_well_formed_id("disk-0.raw_a"));
    }

    #[test]
    fn test_is_well_formed_id_rejects_empty() {
        assert!(!is_well_formed_id(""));
    }
}
