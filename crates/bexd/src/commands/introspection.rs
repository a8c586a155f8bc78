//! The schema bexd answers `query-qmp-schema` with: exactly the commands,
//! arguments and event it implements, in QEMU's introspection format.

use qmp::introspect::{any, array, bool, int, named, opt, req, str, Schema, Ty, EMPTY};
use serde_json::Value;

/// The rendered SchemaInfo list.
pub fn schema() -> Value {
    let mut s = Schema::new();
    core(&mut s);
    blockdev(&mut s);
    sockets(&mut s);
    exports(&mut s);
    bitmaps(&mut s);
    objects(&mut s);
    s.render()
}

fn core(s: &mut Schema) {
    s.enumeration("QMPCapability", vec!["oob"]);
    s.object(
        "QmpCapabilitiesArgs",
        vec![opt("enable", array(named("QMPCapability")))],
    );
    s.object(
        "VersionTriple",
        vec![
            req("major", int()),
            req("minor", int()),
            req("micro", int()),
        ],
    );
    s.object(
        "VersionInfo",
        vec![req("qemu", named("VersionTriple")), req("package", str())],
    );
    s.object("CommandInfo", vec![req("name", str())]);
    s.command("qmp_capabilities", "QmpCapabilitiesArgs", named(EMPTY), &[]);
    s.command("query-version", EMPTY, named("VersionInfo"), &[]);
    s.command("query-commands", EMPTY, array(named("CommandInfo")), &[]);
    s.command("query-qmp-schema", EMPTY, array(any()), &[]);
    s.command("quit", EMPTY, named(EMPTY), &[]);
}

fn blockdev(s: &mut Schema) {
    s.enumeration(
        "BlockdevDriver",
        vec![
            "blkdebug",
            "file",
            "host_device",
            "null-aio",
            "null-co",
            "qcow2",
            "raw",
        ],
    );
    s.enumeration(
        "BlkdebugIOType",
        vec![
            "read",
            "write",
            "write-zeroes",
            "discard",
            "flush",
            "block-status",
        ],
    );
    s.object(
        "BlkdebugInjectErrorOptions",
        vec![
            req("event", str()),
            opt("state", int()),
            opt("iotype", named("BlkdebugIOType")),
            opt("errno", int()),
            opt("sector", int()),
            opt("once", bool()),
            opt("immediately", bool()),
            opt("x-after", int()),
        ],
    );
    s.object(
        "BlockdevOptionsBlkdebug",
        vec![
            req("image", named("BlockdevRef")),
            opt("inject-error", array(named("BlkdebugInjectErrorOptions"))),
        ],
    );
    s.enumeration("BlockdevDiscardOptions", vec!["ignore", "unmap"]);
    s.enumeration("BlockdevDetectZeroesOptions", vec!["off", "on", "unmap"]);
    s.enumeration("OnOffAuto", vec!["auto", "on", "off"]);
    s.enumeration("BlockdevAioOptions", vec!["threads", "native", "io_uring"]);
    s.object(
        "BlockdevCacheOptions",
        vec![opt("direct", bool()), opt("no-flush", bool())],
    );
    s.union(
        "BlockdevOptions",
        vec![
            req("driver", named("BlockdevDriver")),
            opt("node-name", str()),
            opt("discard", named("BlockdevDiscardOptions")),
            opt("cache", named("BlockdevCacheOptions")),
            opt("read-only", bool()),
            opt("auto-read-only", bool()),
            opt("force-share", bool()),
            opt("detect-zeroes", named("BlockdevDetectZeroesOptions")),
        ],
        "driver",
        vec![
            ("blkdebug", named("BlockdevOptionsBlkdebug")),
            ("file", named("BlockdevOptionsFile")),
            ("host_device", named("BlockdevOptionsFile")),
            ("null-aio", named("BlockdevOptionsNull")),
            ("null-co", named("BlockdevOptionsNull")),
            ("qcow2", named("BlockdevOptionsQcow2")),
            ("raw", named("BlockdevOptionsRaw")),
        ],
    );
    s.object(
        "BlockdevOptionsFile",
        vec![
            req("filename", str()),
            opt("pr-manager", str()),
            opt("locking", named("OnOffAuto")),
            opt("aio", named("BlockdevAioOptions")),
            opt("aio-max-batch", int()),
            opt("drop-cache", bool()),
        ],
    );
    s.object(
        "BlockdevOptionsNull",
        vec![
            opt("size", int()),
            opt("latency-ns", int()),
            opt("read-zeroes", bool()),
        ],
    );
    s.alternate("BlockdevRef", vec![named("BlockdevOptions"), str()]);
    s.object(
        "BlockdevOptionsRaw",
        vec![
            req("file", named("BlockdevRef")),
            opt("offset", int()),
            opt("size", int()),
        ],
    );
    s.alternate(
        "BlockdevRefOrNull",
        vec![named("BlockdevOptions"), str(), Ty::Builtin("null")],
    );
    s.object(
        "BlockdevOptionsQcow2",
        vec![
            req("file", named("BlockdevRef")),
            opt("backing", named("BlockdevRefOrNull")),
            opt("lazy-refcounts", bool()),
            opt("pass-discard-request", bool()),
            opt("pass-discard-snapshot", bool()),
            opt("pass-discard-other", bool()),
            opt("discard-no-unref", bool()),
            opt("overlap-check", any()),
            opt("cache-size", int()),
            opt("l2-cache-size", int()),
            opt("l2-cache-entry-size", int()),
            opt("refcount-cache-size", int()),
            opt("cache-clean-interval", int()),
            opt("encrypt", any()),
            opt("data-file", named("BlockdevRef")),
        ],
    );
    s.object("BlockdevDelArgs", vec![req("node-name", str())]);
    s.object("QueryNamedBlockNodesArgs", vec![opt("flat", bool())]);
    s.object(
        "BlockDeviceInfo",
        vec![
            req("file", str()),
            opt("node-name", str()),
            req("ro", bool()),
            req("drv", str()),
            req("encrypted", bool()),
            req("detect_zeroes", named("BlockdevDetectZeroesOptions")),
            req("backing_file_depth", int()),
            req("write_threshold", int()),
            req("image", any()),
            req("cache", any()),
            opt("dirty-bitmaps", array(named("BlockDirtyInfo"))),
        ],
    );
    s.object(
        "BlockDirtyInfo",
        vec![
            req("name", str()),
            req("count", int()),
            req("granularity", int()),
            req("recording", bool()),
            req("busy", bool()),
            req("persistent", bool()),
            opt("inconsistent", bool()),
        ],
    );
    s.command("blockdev-add", "BlockdevOptions", named(EMPTY), &[]);
    s.command("blockdev-del", "BlockdevDelArgs", named(EMPTY), &[]);
    s.command(
        "query-named-block-nodes",
        "QueryNamedBlockNodesArgs",
        array(named("BlockDeviceInfo")),
        &[],
    );
}

fn sockets(s: &mut Schema) {
    s.enumeration("SocketAddressType", vec!["inet", "unix", "vsock", "fd"]);
    s.object(
        "InetSocketAddress",
        vec![
            opt("numeric", bool()),
            req("host", str()),
            req("port", str()),
            opt("to", int()),
            opt("ipv4", bool()),
            opt("ipv6", bool()),
            opt("keep-alive", bool()),
            opt("mptcp", bool()),
        ],
    );
    s.object(
        "UnixSocketAddress",
        vec![
            req("path", str()),
            opt("abstract", bool()),
            opt("tight", bool()),
        ],
    );
    s.object(
        "VsockSocketAddress",
        vec![req("cid", str()), req("port", str())],
    );
    s.object("FdSocketAddress", vec![req("str", str())]);
    for (wrapper, inner) in [
        ("InetSocketAddressWrapper", "InetSocketAddress"),
        ("UnixSocketAddressWrapper", "UnixSocketAddress"),
        ("VsockSocketAddressWrapper", "VsockSocketAddress"),
        ("FdSocketAddressWrapper", "FdSocketAddress"),
    ] {
        s.object(wrapper, vec![req("data", named(inner))]);
    }
    s.union(
        "SocketAddressLegacy",
        vec![req("type", named("SocketAddressType"))],
        "type",
        vec![
            ("inet", named("InetSocketAddressWrapper")),
            ("unix", named("UnixSocketAddressWrapper")),
            ("vsock", named("VsockSocketAddressWrapper")),
            ("fd", named("FdSocketAddressWrapper")),
        ],
    );
}

fn exports(s: &mut Schema) {
    s.enumeration("BlockExportType", vec!["nbd"]);
    s.enumeration("BlockExportRemoveMode", vec!["safe", "hard"]);
    s.object(
        "BlockDirtyBitmap",
        vec![req("node", str()), req("name", str())],
    );
    s.alternate(
        "BlockDirtyBitmapOrStr",
        vec![str(), named("BlockDirtyBitmap")],
    );
    s.object(
        "NbdServerOptionsLegacy",
        vec![
            opt("handshake-max-seconds", int()),
            opt("tls-creds", str()),
            opt("tls-authz", str()),
            opt("max-connections", int()),
            req("addr", named("SocketAddressLegacy")),
        ],
    );
    s.union(
        "BlockExportOptions",
        vec![
            req("type", named("BlockExportType")),
            req("id", str()),
            opt("fixed-iothread", bool()),
            opt("iothread", str()),
            req("node-name", str()),
            opt("writable", bool()),
            opt("writethrough", bool()),
            opt("allow-inactive", bool()),
        ],
        "type",
        vec![("nbd", named("BlockExportOptionsNbd"))],
    );
    s.object(
        "BlockExportOptionsNbd",
        vec![
            opt("name", str()),
            opt("description", str()),
            opt("bitmaps", array(named("BlockDirtyBitmapOrStr"))),
            opt("allocation-depth", bool()),
        ],
    );
    s.object(
        "NbdServerAddOptions",
        vec![
            opt("name", str()),
            opt("description", str()),
            req("device", str()),
            opt("writable", bool()),
            opt("bitmap", str()),
        ],
    );
    s.object(
        "NbdServerRemoveArgs",
        vec![
            req("name", str()),
            opt("mode", named("BlockExportRemoveMode")),
        ],
    );
    s.object(
        "BlockExportDelArgs",
        vec![
            req("id", str()),
            opt("mode", named("BlockExportRemoveMode")),
        ],
    );
    s.object(
        "BlockExportInfo",
        vec![
            req("id", str()),
            req("type", named("BlockExportType")),
            req("node-name", str()),
            req("shutting-down", bool()),
        ],
    );
    s.object("BlockExportDeletedEvent", vec![req("id", str())]);
    s.command(
        "nbd-server-start",
        "NbdServerOptionsLegacy",
        named(EMPTY),
        &[],
    );
    s.command("nbd-server-stop", EMPTY, named(EMPTY), &[]);
    s.command(
        "nbd-server-add",
        "NbdServerAddOptions",
        named(EMPTY),
        &["deprecated"],
    );
    s.command(
        "nbd-server-remove",
        "NbdServerRemoveArgs",
        named(EMPTY),
        &["deprecated"],
    );
    s.command("block-export-add", "BlockExportOptions", named(EMPTY), &[]);
    s.command("block-export-del", "BlockExportDelArgs", named(EMPTY), &[]);
    s.command(
        "query-block-exports",
        EMPTY,
        array(named("BlockExportInfo")),
        &[],
    );
    s.event("BLOCK_EXPORT_DELETED", "BlockExportDeletedEvent");
}

/// The bitmap commands and `transaction` with its bitmap actions (QAPI wraps
/// each action's arguments in `data`).
fn bitmaps(s: &mut Schema) {
    s.object(
        "BlockDirtyBitmapAdd",
        vec![
            req("node", str()),
            req("name", str()),
            opt("granularity", int()),
            opt("persistent", bool()),
            opt("disabled", bool()),
        ],
    );
    s.object(
        "BlockDirtyBitmapMerge",
        vec![
            req("node", str()),
            req("target", str()),
            req("bitmaps", array(named("BlockDirtyBitmapOrStr"))),
        ],
    );
    s.command(
        "block-dirty-bitmap-add",
        "BlockDirtyBitmapAdd",
        named(EMPTY),
        &[],
    );
    for name in [
        "block-dirty-bitmap-remove",
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
    ] {
        s.command(name, "BlockDirtyBitmap", named(EMPTY), &[]);
    }
    s.command(
        "block-dirty-bitmap-merge",
        "BlockDirtyBitmapMerge",
        named(EMPTY),
        &[],
    );
    s.enumeration(
        "TransactionActionKind",
        vec![
            "block-dirty-bitmap-add",
            "block-dirty-bitmap-remove",
            "block-dirty-bitmap-clear",
            "block-dirty-bitmap-enable",
            "block-dirty-bitmap-disable",
            "block-dirty-bitmap-merge",
        ],
    );
    s.object(
        "BlockDirtyBitmapAddWrapper",
        vec![req("data", named("BlockDirtyBitmapAdd"))],
    );
    s.object(
        "BlockDirtyBitmapWrapper",
        vec![req("data", named("BlockDirtyBitmap"))],
    );
    s.object(
        "BlockDirtyBitmapMergeWrapper",
        vec![req("data", named("BlockDirtyBitmapMerge"))],
    );
    s.union(
        "TransactionAction",
        vec![req("type", named("TransactionActionKind"))],
        "type",
        vec![
            (
                "block-dirty-bitmap-add",
                named("BlockDirtyBitmapAddWrapper"),
            ),
            (
                "block-dirty-bitmap-remove",
                named("BlockDirtyBitmapWrapper"),
            ),
            ("block-dirty-bitmap-clear", named("BlockDirtyBitmapWrapper")),
            (
                "block-dirty-bitmap-enable",
                named("BlockDirtyBitmapWrapper"),
            ),
            (
                "block-dirty-bitmap-disable",
                named("BlockDirtyBitmapWrapper"),
            ),
            (
                "block-dirty-bitmap-merge",
                named("BlockDirtyBitmapMergeWrapper"),
            ),
        ],
    );
    s.enumeration("ActionCompletionMode", vec!["individual", "grouped"]);
    s.object(
        "TransactionProperties",
        vec![opt("completion-mode", named("ActionCompletionMode"))],
    );
    s.object(
        "TransactionArgs",
        vec![
            req("actions", array(named("TransactionAction"))),
            opt("properties", named("TransactionProperties")),
        ],
    );
    s.command("transaction", "TransactionArgs", named(EMPTY), &[]);
}

fn objects(s: &mut Schema) {
    s.enumeration(
        "ObjectType",
        vec![
            "authz-list",
            "authz-list-file",
            "authz-listfile",
            "authz-simple",
            "iothread",
            "tls-creds-psk",
            "tls-creds-x509",
        ],
    );
    s.enumeration("QCryptoTLSCredsEndpoint", vec!["client", "server"]);
    let tls_common = || {
        vec![
            opt("verify-peer", bool()),
            opt("dir", str()),
            opt("endpoint", named("QCryptoTLSCredsEndpoint")),
            opt("priority", str()),
        ]
    };
    let mut x509 = tls_common();
    x509.extend([opt("sanity-check", bool()), opt("passwordid", str())]);
    s.object("TlsCredsX509Properties", x509);
    let mut psk = tls_common();
    psk.push(opt("username", str()));
    s.object("TlsCredsPskProperties", psk);
    s.enumeration("QAuthZListPolicy", vec!["deny", "allow"]);
    s.enumeration("QAuthZListFormat", vec!["exact", "glob"]);
    s.object(
        "QAuthZListRule",
        vec![
            req("match", str()),
            req("policy", named("QAuthZListPolicy")),
            opt("format", named("QAuthZListFormat")),
        ],
    );
    s.object("AuthZSimpleProperties", vec![req("identity", str())]);
    s.object(
        "AuthZListProperties",
        vec![
            opt("policy", named("QAuthZListPolicy")),
            opt("rules", array(named("QAuthZListRule"))),
        ],
    );
    s.object(
        "AuthZListFileProperties",
        vec![req("filename", str()), opt("refresh", bool())],
    );
    s.object(
        "IothreadProperties",
        vec![
            opt("poll-max-ns", int()),
            opt("poll-grow", int()),
            opt("poll-shrink", int()),
            opt("aio-max-batch", int()),
            opt("thread-pool-min", int()),
            opt("thread-pool-max", int()),
        ],
    );
    s.union(
        "ObjectOptions",
        vec![req("qom-type", named("ObjectType")), req("id", str())],
        "qom-type",
        vec![
            ("authz-list", named("AuthZListProperties")),
            ("authz-list-file", named("AuthZListFileProperties")),
            ("authz-listfile", named("AuthZListFileProperties")),
            ("authz-simple", named("AuthZSimpleProperties")),
            ("iothread", named("IothreadProperties")),
            ("tls-creds-psk", named("TlsCredsPskProperties")),
            ("tls-creds-x509", named("TlsCredsX509Properties")),
        ],
    );
    s.object("ObjectDelArgs", vec![req("id", str())]);
    s.command("object-add", "ObjectOptions", named(EMPTY), &[]);
    s.command("object-del", "ObjectDelArgs", named(EMPTY), &[]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::COMMANDS;

    #[test]
    fn test_schema_lists_every_dispatched_command() {
        let v = schema();
        let commands: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["meta-type"] == "command")
            .filter_map(|e| e["name"].as_str())
            .collect();
        let mut expected: Vec<&str> = COMMANDS.to_vec();
        let mut got = commands.clone();
        expected.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, expected);
    }

    #[test]
    fn test_every_type_reference_resolves() {
        let v = schema();
        let list = v.as_array().unwrap();
        let names: Vec<&str> = list.iter().filter_map(|e| e["name"].as_str()).collect();
        let mut refs = Vec::new();
        for e in list {
            for key in ["arg-type", "ret-type", "element-type"] {
                if let Some(r) = e[key].as_str() {
                    refs.push(r);
                }
            }
            for m in e["members"].as_array().into_iter().flatten() {
                if let Some(t) = m["type"].as_str() {
                    refs.push(t);
                }
            }
            for variant in e["variants"].as_array().into_iter().flatten() {
                refs.push(variant["type"].as_str().unwrap());
            }
        }
        for r in refs {
            assert!(names.contains(&r), "dangling type reference {r}");
        }
    }
}
