"""QMP with the qemu.qmp library: negotiation, queries, errors, events, quit."""

import asyncio
import json
import socket

import nbd
import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from conftest import file_export, wait_until


def qmp_session(d, body, server_closes=False):
    async def main():
        client = QMPClient("test")
        await client.connect(str(d.qmp_sock))
        try:
            return await body(client)
        finally:
            try:
                await client.disconnect()
            except EOFError:
                # After `quit` the server closes first; qemu.qmp reports that here.
                if not server_closes:
                    raise
    return asyncio.run(main())


def test_query_version_and_exports(start, image):
    d = start(*file_export(image()))

    async def body(q):
        version = await q.execute("query-version")
        exports = await q.execute("query-block-exports")
        names = [c["name"] for c in await q.execute("query-commands")]
        return version, exports, names

    version, exports, names = qmp_session(d, body)
    assert set(version["qemu"]) == {"major", "minor", "micro"}
    assert exports == [{"id": "exp-disk0", "type": "nbd", "node-name": "disk0", "shutting-down": False}]
    assert {"block-export-add", "nbd-server-start", "query-block-exports"} <= set(names)


def test_unknown_command_is_command_not_found(start, image):
    d = start(*file_export(image()))

    async def body(q):
        with pytest.raises(ExecuteError) as e:
            await q.execute("no-such-command")
        return e.value.error_class

    assert qmp_session(d, body) == "CommandNotFound"


def test_command_before_capabilities_is_refused(start, image):
    d = start(*file_export(image()))
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(d.qmp_sock))
    f = s.makefile("rwb")
    assert "QMP" in json.loads(f.readline())
    f.write(b'{"execute": "query-version"}\n')
    f.flush()
    reply = json.loads(f.readline())
    assert reply["error"]["class"] == "CommandNotFound"


def test_export_add_del_with_event_and_errors(start, image):
    d = start(*file_export(image()))

    async def body(q):
        listener = EventListener()
        with q.listen(listener):
            await q.execute("block-export-add", {"type": "nbd", "id": "e1", "node-name": "disk0", "name": "d1"})
            with pytest.raises(ExecuteError) as dup:
                await q.execute("block-export-add", {"type": "nbd", "id": "e1", "node-name": "disk0"})
            with pytest.raises(ExecuteError) as missing:
                await q.execute("block-export-add", {"type": "nbd", "id": "e2"})
            with pytest.raises(ExecuteError) as nonode:
                await q.execute("block-export-add", {"type": "nbd", "id": "e2", "node-name": "nope"})
            await q.execute("block-export-del", {"id": "e1"})
            event = await asyncio.wait_for(listener.get(), 5)
            return dup.value.error_class, missing.value.error.error.desc, nonode.value.error.error.desc, event

    dup, missing, nonode, event = qmp_session(d, body)
    assert dup == "GenericError"
    assert missing == "Parameter 'node-name' is missing"
    assert nonode == "Cannot find device='' nor node-name='nope'"
    assert event["event"] == "BLOCK_EXPORT_DELETED" and event["data"] == {"id": "e1"}


def test_safe_and_hard_removal_with_a_live_client(start, image):
    d = start(*file_export(image()))
    h = nbd.NBD()
    h.connect_uri(d.uri("disk"))

    async def body(q):
        with pytest.raises(ExecuteError) as safe:
            await q.execute("block-export-del", {"id": "exp-disk0"})
        listener = EventListener()
        with q.listen(listener):
            await q.execute("block-export-del", {"id": "exp-disk0", "mode": "hard"})
            event = await asyncio.wait_for(listener.get(), 5)
        after = await q.execute("query-block-exports")
        await q.execute("block-export-add", {"type": "nbd", "id": "exp-disk0", "node-name": "disk0", "name": "disk"})
        return safe.value.error.error.desc, event, after

    safe, event, after = qmp_session(d, body)
    assert safe == "export 'exp-disk0' still in use"
    assert event["data"] == {"id": "exp-disk0"}
    assert after == []
    with pytest.raises(nbd.Error):
        h.pread(512, 0)
    h2 = nbd.NBD()
    h2.connect_uri(d.uri("disk"))
    assert h2.pread(512, 0) == bytes(512)


def test_live_blockdev_and_export_then_qemu_img_reads_it(start, image, tmp_path):
    import subprocess
    d = start(*file_export(image()))
    extra = image(8 << 20, [(0, b"live" * 1024)], name="live.img")

    async def body(q):
        await q.execute("blockdev-add", {"driver": "file", "node-name": "live0", "filename": str(extra)})
        await q.execute("block-export-add", {"type": "nbd", "id": "live", "node-name": "live0"})
        with pytest.raises(ExecuteError) as busy:
            await q.execute("blockdev-del", {"node-name": "live0"})
        return busy.value.error.error.desc

    assert qmp_session(d, body) == "Node live0 is in use"
    out = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", d.uri("live0"), str(out)], check=True)
    assert out.read_bytes()[:4096] == b"live" * 1024


def test_max_connections_queues_extra_clients(start, image):
    d = start(*file_export(image()), server_extra=",max-connections=2")
    a, b = nbd.NBD(), nbd.NBD()
    a.connect_uri(d.uri("disk"))
    b.connect_uri(d.uri("disk"))
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(0.5)
    s.connect(str(d.sock))
    with pytest.raises(socket.timeout):
        s.recv(1)  # no greeting while the server is full
    a.shutdown()
    del a
    s.settimeout(5)
    assert s.recv(8) == b"NBDMAGIC"  # a freed slot serves the queued client


def test_quit_exits_zero(start, image):
    d = start(*file_export(image()))

    async def body(q):
        try:
            await q.execute("quit")
        except EOFError:
            pass  # qemu.qmp may see the close before it hands back the reply (as with QEMU)

    qmp_session(d, body, server_closes=True)
    wait_until(lambda: not d.alive(), what="exit after quit")
    assert d.proc.returncode == 0


def schema_member_path(schema, command, path):
    """Walks a libvirt-style probe path (`arg-type/+nbd/bitmaps`) through query-qmp-schema."""
    by_name = {e["name"]: e for e in schema}
    entry = by_name[by_name[command]["arg-type"]]
    for step in path:
        if step.startswith("+"):
            variant = next(v for v in entry["variants"] if v["case"] == step[1:])
            entry = by_name[variant["type"]]
        else:
            member = next(m for m in entry["members"] if m["name"] == step)
            entry = by_name[member["type"]]
    return entry


def test_query_qmp_schema_answers_libvirt_probes(start, image):
    d = start(*file_export(image()))

    async def body(q):
        return await q.execute("query-qmp-schema")

    schema = qmp_session(d, body)
    by_name = {e["name"]: e for e in schema}
    assert by_name["block-export-add"]["meta-type"] == "command"
    assert "deprecated" in by_name["nbd-server-add"].get("features", [])
    assert by_name["BLOCK_EXPORT_DELETED"]["meta-type"] == "event"
    bitmaps = schema_member_path(schema, "block-export-add", ["+nbd", "bitmaps"])
    assert bitmaps["meta-type"] == "array"
    addr = schema_member_path(schema, "nbd-server-start", ["addr"])
    assert addr["tag"] == "type" and {v["case"] for v in addr["variants"]} >= {"inet", "unix"}
    mode = schema_member_path(schema, "block-export-del", ["mode"])
    assert mode["values"] == ["safe", "hard"]


def test_qemu_qmp_shell_drives_the_daemon(start, image):
    import shutil
    import subprocess
    if shutil.which("qmp-shell") is None:
        pytest.skip("qmp-shell not installed")
    d = start(*file_export(image()))
    script = "query-block-exports\nblock-export-del id=nope\n"
    out = subprocess.run(["qmp-shell", str(d.qmp_sock)], input=script, capture_output=True, text=True,
                         timeout=30).stdout
    assert '"id": "exp-disk0"' in out
    assert "Export 'nope' is not found" in out


@pytest.mark.bexd_only("bexd qmp is bexd's own client")
def test_bexd_qmp_shell_scripted(start, image):
    import os
    import subprocess
    from conftest import daemon_binary
    d = start(*file_export(image()))
    script = ("block-export-add type=nbd id=e1 node-name=disk0 name=second\n"
              "query-block-exports\nblock-export-del id=e1\nblock-export-del id=nope\n")
    out = subprocess.run(daemon_binary("bexd") + ["qmp", str(d.qmp_sock)], input=script, capture_output=True,
                         text=True, timeout=30, env={**os.environ, "HOME": str(d.tmp)}).stdout
    assert out.startswith("Connected to bexd")
    assert '"id": "e1"' in out
    assert 'event BLOCK_EXPORT_DELETED {"id":"e1"}' in out
    assert "error: GenericError: Export 'nope' is not found" in out


def test_nbd_server_stop_removes_every_export_and_can_restart(start, image, tmp_path):
    d = start(*file_export(image()))

    async def body(q):
        listener = EventListener()
        with q.listen(listener):
            await q.execute("block-export-add", {"type": "nbd", "id": "e2", "node-name": "disk0", "name": "two"})
            await q.execute("nbd-server-stop")
            events = {(await asyncio.wait_for(listener.get(), 5))["data"]["id"] for _ in range(2)}
        with pytest.raises(ExecuteError) as stopped:
            await q.execute("nbd-server-stop")
        left = await q.execute("query-block-exports")
        await q.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(d.sock)}}})
        await q.execute("block-export-add", {"type": "nbd", "id": "e3", "node-name": "disk0", "name": "disk"})
        return events, stopped.value.error.error.desc, left

    events, stopped, left = qmp_session(d, body)
    assert events == {"exp-disk0", "e2"}
    assert stopped == "NBD server not running"
    assert left == []
    h = nbd.NBD()
    h.connect_uri(d.uri("disk"))
    assert h.get_size() == 64 << 20


def test_events_reach_every_monitor(tmp_path, kind):
    import subprocess
    from conftest import daemon_binary, wait_until, can_connect_unix
    nbd_sock = tmp_path / "two.sock"
    first, second = tmp_path / "first-qmp.sock", tmp_path / "second-qmp.sock"
    p = subprocess.Popen(daemon_binary(kind) + [
        "--blockdev", "null-co,node-name=n0,size=1048576",
        "--chardev", f"socket,id=a,path={first},server=on,wait=off", "--monitor", "chardev=a",
        "--chardev", f"socket,id=b,path={second},server=on,wait=off", "--monitor", "chardev=b",
        "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
        "--export", "type=nbd,id=e0,node-name=n0"])
    try:
        wait_until(lambda: can_connect_unix(first) and can_connect_unix(second), what="two monitors")

        async def main():
            a, b = QMPClient("a"), QMPClient("b")
            await a.connect(str(first))
            await b.connect(str(second))
            la, lb = EventListener(), EventListener()
            with a.listen(la), b.listen(lb):
                await a.execute("block-export-del", {"id": "e0"})
                ea = await asyncio.wait_for(la.get(), 5)
                eb = await asyncio.wait_for(lb.get(), 5)
            await a.disconnect()
            await b.disconnect()
            return ea, eb

        ea, eb = asyncio.run(main())
        assert ea["event"] == eb["event"] == "BLOCK_EXPORT_DELETED"
        assert ea["timestamp"] == eb["timestamp"]
    finally:
        p.terminate()
        assert p.wait(timeout=20) == 0


@pytest.mark.bexd_only("bexd's own limits (QEMU's differ)")
def test_huge_and_deep_documents_get_errors_and_the_monitor_survives(start, image):
    d = start(*file_export(image()))
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(d.qmp_sock))
    f = s.makefile("rwb")
    f.readline()
    f.write(b'{"execute": "qmp_capabilities"}\n')
    f.flush()
    f.readline()
    f.write(b'{"execute": "query-version", "arguments": {"x": "' + b"a" * (20 << 20) + b'"}}\n')
    f.write(b"[" * 5000 + b"]" * 5000 + b"\n")
    f.write(b'{"execute": "query-block-exports", "id": "after"}\n')
    f.flush()
    replies = [json.loads(f.readline()) for _ in range(3)]
    assert replies[0]["error"]["desc"] == "JSON parse error, JSON token size limit exceeded"
    assert replies[1]["error"]["desc"] == "JSON parse error, JSON nesting depth limit exceeded"
    assert replies[2]["id"] == "after" and replies[2]["return"][0]["id"] == "exp-disk0"
