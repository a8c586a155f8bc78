//! The three views of the command table checked against each other:
//! `query-commands`, dispatch and `query-qmp-schema`.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::registry::{command_list, dispatch, not_found, schema};
use crate::daemon::Daemon;

/// Runs `dispatch` on a fresh daemon with no arguments.
fn dispatch_bare(name: &str) -> Result<Value, qmp::QmpError> {
    let daemon: Arc<Daemon> = Daemon::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a test runtime");
    runtime.block_on(dispatch(&daemon, name, Map::new()))
}

fn listed_commands() -> Vec<String> {
    command_list()
        .as_array()
        .expect("query-commands returns a list")
        .iter()
        .map(|c| c["name"].as_str().expect("a name").to_string())
        .collect()
}

fn schema_entries(meta_type: &str) -> Vec<String> {
    schema()
        .as_array()
        .expect("query-qmp-schema returns a list")
        .iter()
        .filter(|e| e["meta-type"] == meta_type)
        .map(|e| e["name"].as_str().expect("a name").to_string())
        .collect()
}

#[test]
fn test_every_listed_command_is_dispatched() {
    let listed = listed_commands();
    assert!(listed.len() > 20, "query-commands lists {}", listed.len());
    for name in listed {
        if let Err(e) = dispatch_bare(&name) {
            assert_ne!(
                e.desc,
                not_found(&name).desc,
                "{name} is listed but not dispatched"
            );
        }
    }
}

#[test]
fn test_unlisted_command_is_not_found() {
    let e = dispatch_bare("no-such-command").unwrap_err();
    assert_eq!(e.desc, not_found("no-such-command").desc);
}

#[test]
fn test_schema_commands_are_the_listed_commands() {
    let listed = listed_commands();
    let described = schema_entries("command");
    let unique: BTreeSet<&String> = listed.iter().collect();
    assert_eq!(
        unique.len(),
        listed.len(),
        "query-commands lists a command twice"
    );
    assert_eq!(
        described.iter().collect::<BTreeSet<_>>(),
        unique,
        "query-qmp-schema and query-commands disagree"
    );
    assert_eq!(described.len(), listed.len());
}

#[test]
fn test_schema_describes_the_events() {
    assert_eq!(
        schema_entries("event"),
        [
            "BLOCK_EXPORT_DELETED",
            "BLOCK_WRITE_THRESHOLD",
            "BLOCK_IMAGE_CORRUPTED",
            "JOB_STATUS_CHANGE",
            "BLOCK_JOB_COMPLETED",
            "BLOCK_JOB_CANCELLED",
            "BLOCK_JOB_ERROR",
            "BLOCK_JOB_PENDING"
        ]
    );
}

/// Every type name the schema uses (arg-type, ret-type, element-type,
/// member and variant types) is an entry of the schema.
#[test]
fn test_every_type_reference_resolves() {
    let v = schema();
    let list = v.as_array().expect("a list");
    let names: BTreeSet<&str> = list.iter().filter_map(|e| e["name"].as_str()).collect();
    assert_eq!(names.len(), list.len(), "two entries share a name");
    let mut refs = Vec::new();
    for e in list {
        for key in ["arg-type", "ret-type", "element-type"] {
            refs.extend(e[key].as_str());
        }
        for m in e["members"].as_array().into_iter().flatten() {
            refs.extend(m["type"].as_str());
        }
        for variant in e["variants"].as_array().into_iter().flatten() {
            refs.push(variant["type"].as_str().expect("a variant type"));
        }
    }
    assert!(refs.iter().filter(|r| **r != "0").count() > 50);
    for r in refs {
        assert!(names.contains(r), "dangling type reference {r}");
    }
}

/// Every command's arguments and reply are an object (or a list), as QMP requires.
#[test]
fn test_every_command_has_object_arguments() {
    let v = schema();
    let list = v.as_array().expect("a list");
    let find = |name: &str| list.iter().find(|e| e["name"] == name);
    for command in list.iter().filter(|e| e["meta-type"] == "command") {
        let arg = command["arg-type"]
            .as_str()
            .and_then(find)
            .expect("arg-type");
        assert_eq!(arg["meta-type"], "object", "{}", command["name"]);
        assert!(command["ret-type"].as_str().and_then(find).is_some());
    }
}
