"""Start-up: no client is served before the whole command line has been applied, as with
qemu-storage-daemon, whose main loop runs only after its last option. A client that connects
the moment the NBD socket appears waits in the listen backlog and then finds every export;
one that connects the moment the QMP socket appears gets its greeting, and the answer to its
first command, only once every node and export of the command line is in place."""

import json
import socket
import subprocess
import time

import nbd
import pytest

from conftest import daemon_binary

EXPORTS = 200


def race_the_start(binary, tmp_path):
    """Starts the daemon with the NBD server first and EXPORTS exports after it, and connects
    to the last export as soon as the socket exists. Returns what the first connection that
    reached the server saw: None when it found the export, else libnbd's error."""
    sock = tmp_path / "nbd.sock"
    argv = [*binary, "--nbd-server", f"addr.type=unix,addr.path={sock}"]
    for i in range(EXPORTS):
        argv += ["--blockdev", f"driver=null-co,node-name=n{i},size=1048576",
                 "--export", f"type=nbd,id=e{i},node-name=n{i},name=disk{i}"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited: {proc.stderr.read().decode()}")
            if not sock.exists():
                continue
            h = nbd.NBD()
            try:
                h.connect_uri(f"nbd+unix:///disk{EXPORTS - 1}?socket={sock}")
            except nbd.Error as e:
                if "handshake" in str(e):
                    return str(e)  # the server answered without the export
                continue  # the socket is not listening yet
            h.shutdown()
            return None
        raise AssertionError("never connected")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.parametrize("which", ["bexd", "qsd"])
def test_a_client_connecting_during_start_up_finds_every_export(tmp_path, which):
    for attempt in range(5):
        run = tmp_path / str(attempt)
        run.mkdir()
        seen = race_the_start(daemon_binary(which), run)
        assert seen is None, f"attempt {attempt}: a client was served before start-up ended: {seen}"


def qmp_first_answers(sock):
    """Connects to the QMP socket (retrying until it listens), negotiates and returns the
    answers to the very first queries: (export ids, node names)."""
    deadline = time.monotonic() + 10
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(sock))
            break
        except OSError:  # not created or not listening yet
            s.close()
            if time.monotonic() > deadline:
                raise AssertionError("the QMP socket never listened")
    with s, s.makefile("rwb", buffering=0) as f:
        s.settimeout(30)

        def answer(command):
            f.write(json.dumps({"execute": command}).encode() + b"\n")
            while True:
                reply = json.loads(f.readline())
                if "event" not in reply:
                    assert "return" in reply, reply
                    return reply["return"]

        assert "QMP" in json.loads(f.readline()), "no greeting"
        answer("qmp_capabilities")
        exports = {e["id"] for e in answer("query-block-exports")}
        nodes = {n["node-name"] for n in answer("query-named-block-nodes")}
        return exports, nodes


def race_the_monitor(binary, tmp_path):
    """Starts the daemon with its QMP monitor first and EXPORTS nodes and exports after it,
    and returns what the first QMP client's first queries saw."""
    qmp_sock = tmp_path / "qmp.sock"
    argv = [*binary, "--chardev", f"socket,id=m0,path={qmp_sock},server=on,wait=off",
            "--monitor", "chardev=m0",
            "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}"]
    for i in range(EXPORTS):
        argv += ["--blockdev", f"driver=null-co,node-name=n{i},size=1048576",
                 "--export", f"type=nbd,id=e{i},node-name=n{i},name=disk{i}"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        return qmp_first_answers(qmp_sock)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.parametrize("which", ["bexd", "qsd"])
def test_the_first_qmp_command_sees_every_node_and_export(tmp_path, which):
    for attempt in range(5):
        run = tmp_path / str(attempt)
        run.mkdir()
        exports, nodes = race_the_monitor(daemon_binary(which), run)
        assert exports == {f"e{i}" for i in range(EXPORTS)}, \
            f"attempt {attempt}: the monitor answered before start-up ended ({len(exports)} exports)"
        assert {f"n{i}" for i in range(EXPORTS)} <= nodes, \
            f"attempt {attempt}: the monitor answered before start-up ended ({len(nodes)} nodes)"
