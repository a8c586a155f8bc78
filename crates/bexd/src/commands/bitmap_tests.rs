//! The bitmap commands on a daemon with a null-co node: rollback and commit
//! of transactions, which the QMP parity tests see only through `count`.

use serde_json::{json, Value};

use super::*;
use crate::daemon::Daemon;

fn daemon() -> Arc<Daemon> {
    let d = Daemon::new();
    crate::commands::blockdev_add(
        &d,
        json!({"driver": "null-co", "node-name": "n0", "size": 1048576}),
        InputMode::Json,
    )
    .unwrap();
    d
}

/// Runs a command through the registry, as a QMP client would.
fn call(d: &Arc<Daemon>, name: &str, args: Value) -> Result<Value, QmpError> {
    let args = args.as_object().cloned().unwrap_or_default();
    let command = crate::commands::registry::find(name).expect("a registered command");
    (command.handler)(d, args)
}

fn bitmap(d: &Daemon, name: &str) -> Option<Arc<DirtyBitmap>> {
    d.nodes.find("n0")?.bitmaps().find(name)
}

fn act(kind: &str, data: Value) -> Value {
    json!({"type": kind, "data": data})
}

#[test]
fn test_failed_transaction_restores_bits_and_state() {
    let d = daemon();
    call(
        &d,
        "block-dirty-bitmap-add",
        json!({"node": "n0", "name": "a"}),
    )
    .unwrap();
    bitmap(&d, "a").unwrap().mark(0, 4096);
    let e = call(
        &d,
        "transaction",
        json!({"actions": [
            act("block-dirty-bitmap-clear", json!({"node": "n0", "name": "a"})),
            act("block-dirty-bitmap-disable", json!({"node": "n0", "name": "a"})),
            act("block-dirty-bitmap-add", json!({"node": "n0", "name": "new"})),
            act("block-dirty-bitmap-remove", json!({"node": "n0", "name": "a"})),
            act("block-dirty-bitmap-clear", json!({"node": "n0", "name": "nope"})),
        ]}),
    )
    .unwrap_err();
    assert_eq!(e.desc, "Dirty bitmap 'nope' not found");
    let a = bitmap(&d, "a").unwrap();
    assert_eq!(a.count(), 65536);
    assert!(a.enabled() && !a.busy());
    assert!(bitmap(&d, "new").is_none());
}

#[test]
fn test_committed_transaction_removes_and_merges() {
    let d = daemon();
    call(
        &d,
        "block-dirty-bitmap-add",
        json!({"node": "n0", "name": "a", "granularity": 512}),
    )
    .unwrap();
    bitmap(&d, "a").unwrap().mark(1000, 1);
    call(
        &d,
        "transaction",
        json!({"actions": [
            act("block-dirty-bitmap-add", json!({"node": "n0", "name": "b", "disabled": true})),
            act("block-dirty-bitmap-merge", json!({"node": "n0", "target": "b", "bitmaps": ["a"]})),
            act("block-dirty-bitmap-remove", json!({"node": "n0", "name": "a"})),
        ]}),
    )
    .unwrap();
    assert!(bitmap(&d, "a").is_none());
    let b = bitmap(&d, "b").unwrap();
    // Merged at b's 64 KiB granularity although b is not recording.
    assert_eq!((b.count(), b.enabled()), (65536, false));
}

#[test]
fn test_busy_bitmap_refuses_changes() {
    let d = daemon();
    call(
        &d,
        "block-dirty-bitmap-add",
        json!({"node": "n0", "name": "a"}),
    )
    .unwrap();
    let lease = block::BitmapLease::new(bitmap(&d, "a").unwrap());
    for c in [
        "block-dirty-bitmap-remove",
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
    ] {
        let e = call(&d, c, json!({"node": "n0", "name": "a"})).unwrap_err();
        assert_eq!(
            e.desc,
            "Bitmap 'a' is currently in use by another operation and cannot be used"
        );
    }
    drop(lease);
    call(
        &d,
        "block-dirty-bitmap-remove",
        json!({"node": "n0", "name": "a"}),
    )
    .unwrap();
}

#[test]
fn test_query_shows_qemu_members_only_when_there_are_bitmaps() {
    let d = daemon();
    let node = d.nodes.find("n0").unwrap();
    assert_eq!(query(&node), None);
    call(
        &d,
        "block-dirty-bitmap-add",
        json!({"node": "n0", "name": "a", "granularity": 4096}),
    )
    .unwrap();
    assert_eq!(
        query(&node),
        Some(
            json!([{"name": "a", "recording": true, "persistent": false, "busy": false,
                     "granularity": 4096, "count": 0}])
        )
    );
}
