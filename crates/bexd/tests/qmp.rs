//! QMP against the real binary: protocol rules and the export lifecycle.

mod common;

use std::io::Write;

use common::{read_n, Daemon};
use serde_json::{json, Value};

fn null_node(name: &str) -> Vec<String> {
    vec![
        "--blockdev".into(),
        format!("driver=null-co,node-name={name},size=1048576"),
    ]
}

#[test]
fn test_greeting_has_version_and_oob_capability() {
    let d = Daemon::start("", &[]);
    let q = d.qmp();
    assert_eq!(q.greeting["QMP"]["version"]["qemu"]["major"], json!(10));
    assert_eq!(q.greeting["QMP"]["capabilities"], json!(["oob"]));
}

#[test]
fn test_command_before_negotiation_is_command_not_found() {
    let d = Daemon::start("", &[]);
    let s = std::os::unix::net::UnixStream::connect(&d.qmp_socket).unwrap();
    let mut reader = std::io::BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    (&s).write_all(b"{\"execute\": \"query-version\", \"id\": 7}\n")
        .unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["error"]["class"], json!("CommandNotFound"));
    assert_eq!(v["id"], json!(7));
}

#[test]
fn test_id_is_echoed_with_its_type() {
    let d = Daemon::start("", &[]);
    let mut q = d.qmp();
    q.send_raw("{\"execute\": \"query-version\", \"id\": {\"a\": [1, 2]}}\n");
    let v = q.read();
    assert_eq!(v["id"], json!({"a": [1, 2]}));
    assert_eq!(v["return"]["qemu"]["major"], json!(10));
}

#[test]
fn test_unknown_command_is_command_not_found() {
    let d = Daemon::start("", &[]);
    let mut q = d.qmp();
    let v = q.execute("nosuch", json!({}));
    assert_eq!(v["error"]["class"], json!("CommandNotFound"));
    assert_eq!(
        v["error"]["desc"],
        json!("The command nosuch has not been found")
    );
}

#[test]
fn test_export_lifecycle_with_event_and_id_reuse() {
    let d = Daemon::start("", &null_node("n0"));
    let mut q = d.qmp();
    let add = json!({"type": "nbd", "id": "e0", "node-name": "n0", "name": "disk"});
    assert_eq!(
        q.execute("block-export-add", add.clone()),
        json!({"return": {}})
    );
    let dup = q.execute("block-export-add", add.clone());
    assert_eq!(
        dup["error"]["desc"],
        json!("Block export id 'e0' is already in use")
    );
    let list = q.execute("query-block-exports", json!({}));
    assert_eq!(
        list["return"],
        json!([{"id": "e0", "type": "nbd", "node-name": "n0", "shutting-down": false}])
    );
    q.send_raw("{\"execute\": \"block-export-del\", \"arguments\": {\"id\": \"e0\"}}\n");
    let event = q.read();
    assert_eq!(event["event"], json!("BLOCK_EXPORT_DELETED"));
    assert_eq!(event["data"], json!({"id": "e0"}));
    assert!(event["timestamp"]["seconds"].as_u64().is_some());
    assert_eq!(q.read(), json!({"return": {}}));
    assert_eq!(q.execute("block-export-add", add), json!({"return": {}}));
}

#[test]
fn test_safe_removal_refused_while_a_client_is_connected() {
    let d = Daemon::start(
        "",
        &[
            null_node("n0"),
            vec!["--export".into(), "type=nbd,id=e0,node-name=n0".into()],
        ]
        .concat(),
    );
    let mut q = d.qmp();
    let mut client = d.nbd();
    // Greeting, then fixed newstyle + NO_ZEROES, then NBD_OPT_EXPORT_NAME "n0".
    assert_eq!(&read_n(&mut client, 8), b"NBDMAGIC");
    read_n(&mut client, 10);
    client.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&2u32.to_be_bytes());
    opt.extend_from_slice(b"n0");
    client.write_all(&opt).unwrap();
    let export = read_n(&mut client, 10);
    assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), 1048576);

    let safe = q.execute("block-export-del", json!({"id": "e0"}));
    assert_eq!(safe["error"]["class"], json!("GenericError"));
    assert_eq!(safe["error"]["desc"], json!("export 'e0' still in use"));
    let hard = q.execute("block-export-del", json!({"id": "e0", "mode": "hard"}));
    assert_eq!(hard, json!({"return": {}}));
    let event = q.read();
    assert_eq!(event["event"], json!("BLOCK_EXPORT_DELETED"));
    // The dropped client sees EOF.
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut client, &mut rest);
    assert_eq!(
        q.execute("query-block-exports", json!({})),
        json!({"return": []})
    );
}

#[test]
fn test_sigterm_exits_0() {
    let d = Daemon::start("", &null_node("n0"));
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn test_quit_emits_deletion_and_exits_0() {
    let mut d = Daemon::start(
        "",
        &[
            null_node("n0"),
            vec!["--export".into(), "type=nbd,id=e0,node-name=n0".into()],
        ]
        .concat(),
    );
    let mut q = d.qmp();
    q.send_raw("{\"execute\": \"quit\"}\n");
    assert_eq!(q.read()["event"], json!("BLOCK_EXPORT_DELETED"));
    assert_eq!(q.read(), json!({"return": {}}));
    let status = d.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!d.is_alive());
}
