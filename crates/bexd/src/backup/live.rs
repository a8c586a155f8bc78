//! `bexd backup --live`: a point-in-time backup of a node that a running
//! daemon (bexd or qemu-storage-daemon) exports and clients keep writing.
//!
//! ```text
//!  cleanup   remove what an earlier run left (names starting bexd-backup)
//!  temp      driver=file over SCRATCH/bexd-backup-NODE.tmp
//!  freeze    above: one transaction = blockdev-backup sync=none of NODE to temp
//!                   with filter-node-name=bexd-backup-cbw (the filter takes NODE's
//!                   place under every parent, the export's too), the new bitmap
//!                   bexd-backup-next-NAME, and (incremental) disabling NAME
//!            below (a daemon whose job has no filter node): copy-before-write
//!                   over NODE's file child, the new bitmap, blockdev-reopen of
//!                   NODE with file=cbw (the freeze), then disabling NAME
//!  export    snapshot-access over the filter (below: NODE's format driver over
//!            it, read-only), exported as bexd-backup with NAME's bits
//!  pull      the same copy as `bexd backup --uri` (full or incremental)
//!  teardown  export, nodes, job, temp file away (NODE back on its file child);
//!            success: NAME := next; failure: next merged back into NAME, so
//!            the next incremental still covers everything
//! ```
//!
//! The filter goes above the node where it can: an export's block backend
//! cannot be moved to another node, but a backup job's filter is inserted
//! under all parents at once, atomically with the bitmap steps. Below the
//! format node the reopen flushes the format first (QEMU's
//! bdrv_reopen_prepare does), so the frozen file is a consistent image; bits
//! set between the new bitmap's creation and NAME's disabling are in both,
//! which costs a re-copy, never a miss. QEMU 10's copy-before-write cannot
//! follow a file that grows (a qcow2 allocating), which is one more reason
//! to go above when the daemon can.
//!
//! One live backup per daemon at a time: the names are fixed, so that a run
//! killed at any point leaves nothing the next run cannot find and remove.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::error::BackupError;
use crate::qmp_client::{ClientError, QmpClient};

pub const PREFIX: &str = "bexd-backup-";
pub const TEMP: &str = "bexd-backup-tmp";
pub const CBW: &str = "bexd-backup-cbw";
pub const ACCESS: &str = "bexd-backup-access";
pub const VIEW: &str = "bexd-backup-view";
/// The sync=none backup job whose filter is the freeze, where the daemon can.
pub const JOB: &str = "bexd-backup";
/// The export's id and its NBD name.
pub const EXPORT: &str = "bexd-backup";
/// Format drivers: a node of one of these has a `file` child to fleece.
const FORMATS: &[&str] = &["raw", "qcow2"];

/// The bitmap that tracks writes from the freeze on, for NAME's next run.
pub fn next_name(bitmap: &str) -> String {
    format!("{PREFIX}next-{bitmap}")
}

/// A block graph edge: (parent, role, child) node names.
type Edge = (String, String, String);

/// What the run does with the bitmap.
#[derive(Clone, Debug)]
pub struct BitmapPlan {
    pub name: String,
    /// Copy only what NAME marks dirty (NAME must exist).
    pub incremental: bool,
}

/// What `setup` asks for.
pub struct Plan<'a> {
    pub node: &'a str,
    pub bitmap: Option<BitmapPlan>,
    pub scratch: Option<&'a Path>,
    /// `nbd-server-start` with this address, `nbd-server-stop` at the end.
    pub start_server: Option<Value>,
}

/// A QMP connection and what this run changed in the daemon.
pub struct Session {
    qmp: QmpClient,
    /// Whether the daemon has `x-debug-query-block-graph` (QEMU does).
    graph: Option<bool>,
    started_server: bool,
}

impl Session {
    /// `addr`: `unix:PATH`, a path, or `HOST:PORT`.
    pub fn connect(addr: &str) -> Result<Self, BackupError> {
        let target = addr.strip_prefix("unix:").unwrap_or(addr);
        let qmp =
            QmpClient::connect_ready(target).map_err(|e| BackupError::Qmp(format!("QMP: {e}")))?;
        Ok(Self {
            qmp,
            graph: None,
            started_server: false,
        })
    }

    fn cmd(&mut self, name: &str, args: Value) -> Result<Value, BackupError> {
        self.qmp
            .command(name, args)
            .map_err(|e| BackupError::Qmp(format!("{name}: {e}")))
    }

    /// Every named node, flat.
    fn nodes(&mut self) -> Result<Vec<Value>, BackupError> {
        let v = self.cmd("query-named-block-nodes", json!({"flat": true}))?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    fn node(&mut self, name: &str) -> Result<Option<Value>, BackupError> {
        Ok(self
            .nodes()?
            .into_iter()
            .find(|n| n["node-name"].as_str() == Some(name)))
    }

    fn export_exists(&mut self) -> Result<bool, BackupError> {
        let v = self.cmd("query-block-exports", json!({}))?;
        Ok(v.as_array()
            .is_some_and(|a| a.iter().any(|e| e["id"].as_str() == Some(EXPORT))))
    }

    /// The block graph's edges as (parent, role, child) node names, when the
    /// daemon has `x-debug-query-block-graph`.
    fn edges(&mut self) -> Result<Option<Vec<Edge>>, BackupError> {
        if self.graph == Some(false) {
            return Ok(None);
        }
        let g = match self.qmp.command("x-debug-query-block-graph", json!({})) {
            Ok(g) => g,
            Err(ClientError::Command(e)) if e.class == "CommandNotFound" => {
                self.graph = Some(false);
                return Ok(None);
            }
            Err(e) => return Err(BackupError::Qmp(format!("x-debug-query-block-graph: {e}"))),
        };
        self.graph = Some(true);
        let empty = Vec::new();
        let names: std::collections::HashMap<u64, String> = g["nodes"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .filter_map(|n| Some((n["id"].as_u64()?, n["name"].as_str()?.to_string())))
            .collect();
        let edges = g["edges"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .filter_map(|e| {
                Some((
                    names.get(&e["parent"].as_u64()?)?.clone(),
                    e["name"].as_str()?.to_string(),
                    names.get(&e["child"].as_u64()?)?.clone(),
                ))
            })
            .collect();
        Ok(Some(edges))
    }

    /// The node-name of `parent`'s child in `role` (`file`, `backing`).
    /// Without the graph command: for `file`, the one other node (not a
    /// format, not ours) that has the same file name, which is how a
    /// format node's or a filter's file name is made.
    fn child(&mut self, parent: &str, role: &str) -> Result<Option<String>, BackupError> {
        if let Some(edges) = self.edges()? {
            return Ok(edges
                .into_iter()
                .find(|(p, r, _)| p == parent && r == role)
                .map(|(_, _, c)| c));
        }
        if role != "file" {
            return Ok(None);
        }
        let nodes = self.nodes()?;
        let Some(file) = nodes
            .iter()
            .find(|n| n["node-name"].as_str() == Some(parent))
            .and_then(|n| n["file"].as_str())
        else {
            return Ok(None);
        };
        let found: Vec<String> = nodes
            .iter()
            .filter(|n| n["file"].as_str() == Some(file))
            .filter_map(|n| n["node-name"].as_str())
            .filter(|name| *name != parent && !name.starts_with(PREFIX))
            .filter(|name| {
                let drv = nodes
                    .iter()
                    .find(|n| n["node-name"].as_str() == Some(*name))
                    .and_then(|n| n["drv"].as_str())
                    .unwrap_or("");
                !FORMATS.contains(&drv) && drv != "copy-before-write"
            })
            .map(str::to_string)
            .collect();
        match found.len() {
            1 => Ok(found.into_iter().next()),
            0 => Ok(None),
            _ => Err(BackupError::Usage(format!(
                "cannot tell which of {} is the file child of '{parent}'",
                found.join(", ")
            ))),
        }
    }

    /// `blockdev-reopen` of format node `info` with `file` as its file child,
    /// keeping the options query-named-block-nodes shows (the others go back
    /// to their defaults, as blockdev-reopen does to what it is not given).
    fn reopen(&mut self, info: &Value, file: &str) -> Result<(), BackupError> {
        let name = info["node-name"].as_str().unwrap_or_default().to_string();
        let mut o = json!({
            "driver": info["drv"],
            "node-name": name,
            "file": file,
        });
        if info["ro"].as_bool() == Some(true) {
            o["read-only"] = json!(true);
        }
        if info.get("backing_file").is_some() {
            let backing = self.child(&name, "backing")?.ok_or_else(|| {
                BackupError::Usage(format!("cannot find the backing node of '{name}'"))
            })?;
            o["backing"] = json!(backing);
        }
        let cache = &info["cache"];
        if cache["direct"].as_bool() == Some(true) || cache["no-flush"].as_bool() == Some(true) {
            o["cache"] = json!({
                "direct": cache["direct"].as_bool().unwrap_or(false),
                "no-flush": cache["no-flush"].as_bool().unwrap_or(false),
            });
        }
        match info["detect_zeroes"].as_str() {
            Some("on") => o["detect-zeroes"] = json!("on"),
            Some("unmap") => {
                o["detect-zeroes"] = json!("unmap");
                o["discard"] = json!("unmap");
            }
            _ => {}
        }
        self.cmd("blockdev-reopen", json!({"options": [o]}))?;
        Ok(())
    }

    /// Deletes our export and waits until it is gone (its clients may take a
    /// moment to leave after they closed).
    fn delete_export(&mut self, hard: bool) -> Result<(), BackupError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut mode = if hard { "hard" } else { "safe" };
        loop {
            match self
                .qmp
                .command("block-export-del", json!({"id": EXPORT, "mode": mode}))
            {
                Ok(_) => break,
                Err(ClientError::Command(e)) if e.desc.contains("in use") => {
                    if Instant::now() > deadline {
                        mode = "hard";
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(BackupError::Qmp(format!("block-export-del: {e}")));
                }
            }
        }
        // BLOCK_EXPORT_DELETED comes when the export is really gone; it no
        // longer being listed says the same, on any connection.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.export_exists()? {
            if Instant::now() > deadline {
                return Err(BackupError::Qmp(format!(
                    "export {EXPORT} still there 30 s after block-export-del"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn bitmaps_of(info: &Value) -> Vec<Value> {
        info["dirty-bitmaps"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn find_bitmap(info: &Value, name: &str) -> Option<Value> {
        Self::bitmaps_of(info)
            .into_iter()
            .find(|b| b["name"].as_str() == Some(name))
    }

    fn transaction(&mut self, actions: Vec<Value>) -> Result<(), BackupError> {
        self.cmd("transaction", json!({"actions": actions}))?;
        Ok(())
    }

    /// Removes every trace of an earlier run: the export, the nodes, the
    /// reopened format node, the temp file, and the `next` bitmaps, whose
    /// bits go back into the bitmap they were made for (as after a failure).
    pub fn cleanup(&mut self, node: &str) -> Result<bool, BackupError> {
        let graph = self.remove_graph(node)?;
        let bitmaps = self.restore_bitmaps(node)?;
        Ok(graph || bitmaps)
    }

    /// The export, the nodes, the temp file; the format node back on its file.
    fn remove_graph(&mut self, node: &str) -> Result<bool, BackupError> {
        let mut found = false;
        if self.export_exists()? {
            found = true;
            self.delete_export(true)?;
        }
        for name in [VIEW, ACCESS] {
            if self.node(name)?.is_some() {
                found = true;
                self.cmd("blockdev-del", json!({"node-name": name}))?;
            }
        }
        found |= self.cancel_job()?;
        if self.node(CBW)?.is_some() {
            found = true;
            // The format node the filter sits under: the graph says, else it
            // is the node this run is for.
            let parent = match self.edges()? {
                Some(edges) => edges
                    .into_iter()
                    .find(|(_, r, c)| r == "file" && c == CBW)
                    .map(|(p, _, _)| p),
                None => Some(node.to_string()),
            };
            if let Some(parent) = parent {
                let info = self.node(&parent)?.ok_or_else(|| {
                    BackupError::Usage(format!(
                        "an earlier live backup left {CBW} in place and node '{parent}' is gone"
                    ))
                })?;
                if self.child(&parent, "file")?.as_deref() == Some(CBW) || self.graph != Some(true)
                {
                    let file = self.child(CBW, "file")?.ok_or_else(|| {
                        BackupError::Usage(format!("cannot find the file child of {CBW}"))
                    })?;
                    self.reopen(&info, &file)?;
                }
            }
            self.cmd("blockdev-del", json!({"node-name": CBW}))?;
        }
        if let Some(temp) = self.node(TEMP)? {
            found = true;
            self.cmd("blockdev-del", json!({"node-name": TEMP}))?;
            remove_temp(temp["file"].as_str());
        }
        Ok(found)
    }

    /// Merges each `next` bitmap on `node` back into the bitmap it was made
    /// for (re-enabled), and removes it.
    fn restore_bitmaps(&mut self, node: &str) -> Result<bool, BackupError> {
        let mut found = false;
        if let Some(info) = self.node(node)? {
            for b in Self::bitmaps_of(&info) {
                let Some(next) = b["name"].as_str() else {
                    continue;
                };
                let Some(base) = next.strip_prefix(&next_name("")) else {
                    continue;
                };
                found = true;
                let mut actions = Vec::new();
                // An inconsistent bitmap (the daemon was killed while it was
                // in use) can only be removed; the next run must be a full one.
                let usable = |b: &Value| b["inconsistent"].as_bool() != Some(true);
                if let Some(old) =
                    Self::find_bitmap(&info, base).filter(|o| usable(o) && usable(&b))
                {
                    actions.push(bitmap_action(
                        "block-dirty-bitmap-merge",
                        node,
                        base,
                        Some(next),
                    ));
                    if old["recording"].as_bool() == Some(false) {
                        actions.push(bitmap_action("block-dirty-bitmap-enable", node, base, None));
                    }
                }
                actions.push(bitmap_action("block-dirty-bitmap-remove", node, next, None));
                self.transaction(actions)?;
            }
        }
        Ok(found)
    }

    /// Builds the frozen view and exports it.
    pub fn setup(&mut self, plan: &Plan) -> Result<(), BackupError> {
        let node = plan.node;
        let info = self
            .node(node)?
            .ok_or_else(|| BackupError::Usage(format!("no node named '{node}'")))?;
        let drv = info["drv"].as_str().unwrap_or_default().to_string();
        if let Some(b) = &plan.bitmap {
            let old = Self::find_bitmap(&info, &b.name);
            if b.incremental
                && old
                    .as_ref()
                    .is_some_and(|o| o["inconsistent"].as_bool() == Some(true))
            {
                return Err(BackupError::Usage(format!(
                    "bitmap '{}' of node '{node}' is inconsistent (the daemon stopped while it \
                     was in use): run a full live backup with --bitmap to start it afresh",
                    b.name
                )));
            }
            if b.incremental && old.is_none() {
                return Err(BackupError::Usage(format!(
                    "node '{node}' has no bitmap '{}' for an incremental backup (make one with \
                     a full live backup and --bitmap)",
                    b.name
                )));
            }
        }
        let dir = match plan.scratch {
            Some(d) => d.to_path_buf(),
            None => info["file"]
                .as_str()
                .map(Path::new)
                .filter(|p| p.is_absolute())
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .ok_or_else(|| {
                    BackupError::Usage(format!(
                        "node '{node}' is not on a local file: give --scratch DIR"
                    ))
                })?,
        };
        let temp_path = dir.join(format!("{PREFIX}{}.tmp", sanitize(node)));
        let next = plan.bitmap.as_ref().map(|b| {
            let mut args = json!({"node": node, "name": next_name(&b.name)});
            match Self::find_bitmap(&info, &b.name) {
                Some(old) => {
                    args["persistent"] = old["persistent"].clone();
                    args["granularity"] = old["granularity"].clone();
                }
                // A new bitmap on a qcow2 node is kept in the image, so it
                // lives as long as the node's data.
                None => args["persistent"] = json!(drv == "qcow2"),
            }
            args
        });
        let disable = plan
            .bitmap
            .as_ref()
            .filter(|b| b.incremental)
            .map(|b| json!({"node": node, "name": b.name}));
        let size = info["image"]["virtual-size"].as_u64().unwrap_or(0);
        let view = match self.freeze_above(node, size, &temp_path, &next, &disable)? {
            true => ACCESS,
            false => {
                if !FORMATS.contains(&drv.as_str()) {
                    return Err(BackupError::Usage(format!(
                        "node '{node}' is driver={drv}: this daemon needs a format node (raw \
                         or qcow2) over the file to fleece, e.g. --blockdev \
                         driver=raw,node-name={node},file=FILE-NODE"
                    )));
                }
                self.freeze_below(&info, &temp_path, &next, &disable)?;
                VIEW
            }
        };
        if let Some(addr) = &plan.start_server {
            match self.qmp.command("nbd-server-start", json!({"addr": addr})) {
                Ok(_) => self.started_server = true,
                // Ours, from a run that was killed.
                Err(ClientError::Command(e)) if e.desc.contains("already running") => {
                    self.started_server = true
                }
                Err(e) => return Err(BackupError::Qmp(format!("nbd-server-start: {e}"))),
            }
        }
        let mut export = json!({
            "type": "nbd", "id": EXPORT, "node-name": view, "name": EXPORT, "writable": false,
        });
        if let Some(b) = plan.bitmap.as_ref().filter(|b| b.incremental) {
            export["bitmaps"] = json!([{"node": node, "name": b.name}]);
        }
        self.cmd("block-export-add", export)?;
        Ok(())
    }

    /// Makes the temp file (sparse, `size` bytes) and its node.
    fn add_temp(&mut self, path: &Path, size: u64) -> Result<(), BackupError> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| BackupError::Usage(format!("{}: {e}", path.display())))?;
        f.set_len(size)?;
        drop(f);
        self.cmd(
            "blockdev-add",
            json!({"driver": "file", "node-name": TEMP, "filename": path.display().to_string()}),
        )?;
        Ok(())
    }

    /// The freeze with the filter above `node`, QEMU's way for a node whose
    /// parents cannot be reopened (an export's): one transaction starts a
    /// `blockdev-backup` job with sync=none, whose copy-before-write filter
    /// (named CBW) takes `node`'s place under every parent, and does the
    /// bitmap steps, so all happen at one instant. False when the daemon
    /// cannot (no filter node for snapshot-access to read): nothing is left.
    fn freeze_above(
        &mut self,
        node: &str,
        size: u64,
        temp: &Path,
        next: &Option<Value>,
        disable: &Option<Value>,
    ) -> Result<bool, BackupError> {
        self.add_temp(temp, size)?;
        let mut actions = vec![json!({"type": "blockdev-backup", "data": {
            "job-id": JOB, "device": node, "target": TEMP, "sync": "none",
            "filter-node-name": CBW, "auto-finalize": true, "auto-dismiss": true,
        }})];
        if let Some(n) = next {
            actions.push(json!({"type": "block-dirty-bitmap-add", "data": n}));
        }
        if let Some(d) = disable {
            actions.push(json!({"type": "block-dirty-bitmap-disable", "data": d}));
        }
        let access = json!({"driver": "snapshot-access", "node-name": ACCESS, "file": CBW});
        let frozen =
            self.transaction(actions).is_ok() && self.qmp.command("blockdev-add", access).is_ok();
        if !frozen {
            self.cancel_job()?;
            if self.node(TEMP)?.is_some() {
                self.cmd("blockdev-del", json!({"node-name": TEMP}))?;
            }
            self.restore_bitmaps(node)?;
        }
        Ok(frozen)
    }

    /// The freeze with the filter under `info`'s format node, over its file
    /// child, by `blockdev-reopen` (which flushes the format node first, so
    /// the frozen file is a consistent image); the view is the same format
    /// driver over snapshot-access. The new bitmap is made before and the
    /// old one disabled after: their overlap is copied twice, never missed.
    fn freeze_below(
        &mut self,
        info: &Value,
        temp: &Path,
        next: &Option<Value>,
        disable: &Option<Value>,
    ) -> Result<(), BackupError> {
        let node = info["node-name"].as_str().unwrap_or_default().to_string();
        let drv = info["drv"].clone();
        let file = self
            .child(&node, "file")?
            .ok_or_else(|| BackupError::Usage(format!("cannot find the file child of '{node}'")))?;
        let file_info = self.node(&file)?.unwrap_or(Value::Null);
        let size = [info, &file_info]
            .iter()
            .filter_map(|n| n["image"]["virtual-size"].as_u64())
            .max()
            .unwrap_or(0);
        self.add_temp(temp, size)?;
        self.cmd(
            "blockdev-add",
            json!({"driver": "copy-before-write", "node-name": CBW, "file": file, "target": TEMP}),
        )?;
        if let Some(n) = next {
            self.cmd("block-dirty-bitmap-add", n.clone())?;
        }
        self.reopen(info, CBW)?;
        if let Some(d) = disable {
            self.cmd("block-dirty-bitmap-disable", d.clone())?;
        }
        self.cmd(
            "blockdev-add",
            json!({"driver": "snapshot-access", "node-name": ACCESS, "file": CBW}),
        )?;
        self.cmd(
            "blockdev-add",
            json!({"driver": drv, "node-name": VIEW, "file": ACCESS, "read-only": true}),
        )?;
        Ok(())
    }

    /// Cancels our sync=none job (its filter leaves with it) and waits until
    /// it is gone.
    fn cancel_job(&mut self) -> Result<bool, BackupError> {
        let listed = |s: &mut Self| -> Result<bool, BackupError> {
            let jobs = s.cmd("query-jobs", json!({}))?;
            Ok(jobs
                .as_array()
                .is_some_and(|a| a.iter().any(|j| j["id"].as_str() == Some(JOB))))
        };
        if !listed(self)? {
            return Ok(false);
        }
        let _ = self.qmp.command("job-cancel", json!({"id": JOB}));
        let deadline = Instant::now() + Duration::from_secs(30);
        while listed(self)? {
            if Instant::now() > deadline {
                return Err(BackupError::Qmp(format!(
                    "job {JOB} still there 30 s after job-cancel"
                )));
            }
            // A concluded job that was not dismissed.
            let _ = self.qmp.command("job-dismiss", json!({"id": JOB}));
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(true)
    }

    /// Takes the fleecing down; on success NAME becomes the bitmap of the
    /// writes since the freeze, otherwise it keeps every bit it had plus those.
    pub fn teardown(
        &mut self,
        node: &str,
        bitmap: Option<&BitmapPlan>,
        ok: bool,
    ) -> Result<(), BackupError> {
        if self.export_exists()? {
            self.delete_export(false)?;
        }
        // The bitmaps are not busy once the export is gone.
        self.remove_graph(node)?;
        match (ok, bitmap) {
            (true, Some(b)) => self.swap_bitmaps(node, b)?,
            _ => {
                self.restore_bitmaps(node)?;
            }
        }
        self.stop_server()
    }

    /// After a successful backup, in one transaction: NAME := next (NAME
    /// made if this was its first full backup), next removed.
    fn swap_bitmaps(&mut self, node: &str, b: &BitmapPlan) -> Result<(), BackupError> {
        let next = next_name(&b.name);
        let info = self.node(node)?.unwrap_or(Value::Null);
        let new = Self::find_bitmap(&info, &next)
            .ok_or_else(|| BackupError::Qmp(format!("bitmap {next} is gone")))?;
        let mut actions = Vec::new();
        let old = Self::find_bitmap(&info, &b.name);
        if let Some(old) = old
            .as_ref()
            .filter(|o| o["inconsistent"].as_bool() == Some(true))
        {
            // Its bits cannot be trusted (the daemon died while it was in
            // use); this full backup starts it afresh.
            actions.push(bitmap_action(
                "block-dirty-bitmap-remove",
                node,
                &b.name,
                None,
            ));
            let _ = old;
        }
        match old.filter(|o| o["inconsistent"].as_bool() != Some(true)) {
            Some(old) => {
                actions.push(bitmap_action(
                    "block-dirty-bitmap-clear",
                    node,
                    &b.name,
                    None,
                ));
                if old["recording"].as_bool() == Some(false) {
                    actions.push(bitmap_action(
                        "block-dirty-bitmap-enable",
                        node,
                        &b.name,
                        None,
                    ));
                }
            }
            None => actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                "node": node, "name": b.name,
                "persistent": new["persistent"], "granularity": new["granularity"],
            }})),
        }
        actions.push(bitmap_action(
            "block-dirty-bitmap-merge",
            node,
            &b.name,
            Some(&next),
        ));
        actions.push(bitmap_action(
            "block-dirty-bitmap-remove",
            node,
            &next,
            None,
        ));
        self.transaction(actions)
    }

    fn stop_server(&mut self) -> Result<(), BackupError> {
        if self.started_server {
            self.started_server = false;
            self.cmd("nbd-server-stop", json!({}))?;
        }
        Ok(())
    }
}

fn bitmap_action(kind: &str, node: &str, name: &str, from: Option<&str>) -> Value {
    let data = match (kind, from) {
        ("block-dirty-bitmap-merge", Some(src)) => {
            json!({"node": node, "target": name, "bitmaps": [src]})
        }
        _ => json!({"node": node, "name": name}),
    };
    json!({"type": kind, "data": data})
}

/// A node name as a file name: QEMU's node names are letters, digits and
/// `-_.`, but generated ones start with `#`.
fn sanitize(node: &str) -> String {
    node.chars()
        .map(
            |c| match c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                true => c,
                false => '_',
            },
        )
        .collect()
}

/// Unlinks the temp file `path` if it is one of ours.
fn remove_temp(path: Option<&str>) {
    if let Some(p) = path.map(PathBuf::from) {
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(PREFIX))
        {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_merge_action_names_its_source() {
        assert_eq!(
            bitmap_action("block-dirty-bitmap-merge", "n", "b", Some("x")),
            json!({"type": "block-dirty-bitmap-merge",
                   "data": {"node": "n", "target": "b", "bitmaps": ["x"]}})
        );
    }

    #[test]
    fn test_sanitize_generated_names() {
        assert_eq!(sanitize("#block123"), "_block123");
        assert_eq!(next_name("b0"), "bexd-backup-next-b0");
    }
}
