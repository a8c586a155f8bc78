"""The same QMP commands, good and bad, against qemu-storage-daemon and bexd:
the same error class and text, the same results."""

import asyncio
import shutil

import pytest

from conftest import file_export, qmp_outcome

@pytest.fixture
def both(start, image):
    """bexd and qemu-storage-daemon, each exporting its own image as exp-disk0."""
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon not installed")
    ours = start(*file_export(image(name="a.img")), which="bexd")
    theirs = start(*file_export(image(name="b.img")), which="qsd")
    return ours, theirs


# (command, arguments): each runs on a fresh pair of daemons that export disk0 as exp-disk0.
CASES = [
    ("block-export-add", {"type": "nbd", "id": "exp-disk0", "node-name": "disk0", "name": "x"}),
    ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "disk0", "name": "disk"}),
    ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "nope"}),
    ("block-export-add", {"type": "nbd", "id": "e1"}),
    ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "disk0", "bogus": 1}),
    ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "disk0", "writable": "yes"}),
    ("block-export-add", {"type": "nbd", "id": "1bad", "node-name": "disk0"}),
    ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "disk0", "name": "n" * 4097}),
    ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "disk0", "bitmaps": ["nope"]}),
    ("block-export-add", {"type": "nope", "id": "e1", "node-name": "disk0"}),
    ("block-export-del", {"id": "nope"}),
    ("block-export-del", {"id": "exp-disk0", "mode": "sideways"}),
    ("block-export-del", {}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/tmp/never"}}}),
    ("nbd-server-start", {"addr": {"type": "unix"}}),
    ("nbd-server-remove", {"name": "nope"}),
    ("nbd-server-add", {"device": "nope"}),
    ("nbd-server-add", {"device": "disk0", "name": "disk"}),
    # Members are checked in QEMU's order: name, description, device, writable, bitmap.
    ("nbd-server-add", {"bitmap": 1}),
    ("nbd-server-add", {"device": "disk0", "writable": 1, "bitmap": 2}),
    ("blockdev-del", {"node-name": "disk0"}),
    ("blockdev-del", {"node-name": "nope"}),
    ("blockdev-add", {"driver": "null-co", "node-name": "disk0"}),
    ("blockdev-add", {"driver": "null-co"}),
    ("blockdev-add", {"driver": "bogus", "node-name": "x"}),
    ("blockdev-add", {"driver": "file", "node-name": "x", "filename": "/nonexistent/img"}),
    ("blockdev-add", {"driver": "null-co", "node-name": "1x"}),
    ("query-block-exports", {"bogus": 1}),
    ("query-version", {"x": 1}),
    ("no-such-command", {}),
    ("object-add", {"qom-type": "authz-simple", "id": "a1", "identity": "CN=x"}),
    ("object-add", {"qom-type": "authz-simple", "id": "a1"}),
    ("object-add", {"qom-type": "authz-simple", "id": "1bad", "identity": "x"}),
    ("object-add", {"qom-type": "authz-list", "id": "l1", "policy": "maybe"}),
    ("object-add", {"qom-type": "authz-list", "id": "l1", "rules": [{"match": "x"}]}),
    ("object-add", {"qom-type": "authz-list", "id": "l1", "policy": "allow",
                    "rules": [{"match": "CN=*", "policy": "deny", "format": "glob"}]}),
    ("object-add", {"qom-type": "iothread", "id": "io0"}),
    ("object-add", {"qom-type": "iothread", "id": "io0", "bogus": 1}),
    ("object-add", {"qom-type": "bogus", "id": "b"}),
    ("object-add", {"id": "b"}),
    ("object-del", {"id": "nope"}),
    ("object-del", {}),
    ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "disk0", "iothread": "nope"}),
]


SEQUENCES = [
    [("object-add", {"qom-type": "authz-simple", "id": "a1", "identity": "CN=x"}),
     ("object-add", {"qom-type": "iothread", "id": "a1"}),
     ("object-del", {"id": "a1"}),
     ("object-del", {"id": "a1"})],
    [("object-add", {"qom-type": "iothread", "id": "io0"}),
     ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "disk0", "name": "in-io0", "iothread": "io0"}),
     ("query-block-exports", {}),
     ("object-del", {"id": "io0"})],
    # A refused quit leaves the daemon serving.
    [("quit", {"bogus": 1}),
     ("query-block-exports", {})],
]


@pytest.mark.parametrize("steps", SEQUENCES, ids=[f"seq-{i}" for i in range(len(SEQUENCES))])
def test_same_outcomes_for_a_sequence(both, steps):
    ours, theirs = both

    async def run_all(sock):
        return [await qmp_outcome(sock, c, a) for c, a in steps]

    got, expected = asyncio.run(run_all(ours.qmp_sock)), asyncio.run(run_all(theirs.qmp_sock))
    normalise = lambda results: [(k, sorted(v, key=lambda e: e["id"]) if isinstance(v, list) else v)
                                 for k, v in results]
    assert normalise(got) == normalise(expected)


@pytest.mark.parametrize("command,arguments", CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(CASES)])
def test_same_outcome_as_qemu_storage_daemon(both, command, arguments):
    ours, theirs = both
    got = asyncio.run(qmp_outcome(ours.qmp_sock, command, arguments))
    expected = asyncio.run(qmp_outcome(theirs.qmp_sock, command, arguments))
    assert got == expected


RAW = [
    b'{"execute": }',
    b'[1, 2]',
    b'"just a string"',
    b'{"foo": 1}',
    b'{"execute": 1, "id": 3}',
    b'{"execute": "query-block-exports", "arguments": [], "id": "x"}',
    b'{"exec-oob": "query-block-exports", "id": 4}',
    b"{'execute': 'nosuch', 'id': 'single'}",
    b'{"execute": "nosuch", "id": {"deep": [1, {"x": null}]}}',
    b'{"execute": "qmp_capabilities", "id": 5}',
    b'{"execute": "query-block-exports", "id": 6} {"execute": "nosuch", "id": 7}',
]


def raw_session(sock, line, negotiate=b'{"execute": "qmp_capabilities"}'):
    import json
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(sock))
    f = s.makefile("rwb")
    f.readline()
    f.write(negotiate + b"\n")
    f.flush()
    f.readline()
    f.write(line + b"\n")
    f.flush()
    replies = [json.loads(f.readline())]
    if line.count(b"execute") > 1:
        replies.append(json.loads(f.readline()))
    s.close()
    return replies


@pytest.mark.parametrize("line", RAW, ids=[f"raw-{i}" for i in range(len(RAW))])
def test_same_protocol_errors_as_qemu_storage_daemon(both, line):
    ours, theirs = both
    assert raw_session(ours.qmp_sock, line) == raw_session(theirs.qmp_sock, line)


# With the oob capability enabled: QEMU looks the command up first, then refuses
# out-of-band execution, and only then runs it.
OOB = [
    b'{"exec-oob": "query-version", "id": 1}',
    b'{"exec-oob": "qmp_capabilities", "id": 2}',
    b'{"exec-oob": "nosuch", "id": 3}',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 4}',
    b'{"execute": "query-block-exports", "id": 5}',
]


@pytest.mark.parametrize("line", OOB, ids=[f"oob-{i}" for i in range(len(OOB))])
def test_same_oob_outcomes_as_qemu_storage_daemon(both, line):
    ours, theirs = both
    negotiate = b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}'
    got = raw_session(ours.qmp_sock, line, negotiate)
    assert got == raw_session(theirs.qmp_sock, line, negotiate)
    assert "id" in got[0]


def test_quit_before_negotiation_is_refused_and_the_daemon_serves_on(both):
    import json
    import socket
    import time
    for d in both:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(d.qmp_sock))
        f = s.makefile("rwb")
        f.readline()
        f.write(b'{"execute": "quit"}\n')
        f.flush()
        reply = json.loads(f.readline())
        f.close()
        s.close()
        assert reply["error"]["class"] == "CommandNotFound"
        time.sleep(0.3)
        assert d.alive()
        assert asyncio.run(qmp_outcome(d.qmp_sock, "query-block-exports", {}))[0] == "ok"


def qmp_raw(sock, chunks):
    """Sends each chunk of raw bytes (after negotiating) and returns every reply line, parsed."""
    import json
    import socket
    import time
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock))
    s.settimeout(5)
    f = s.makefile("rb")
    f.readline()  # greeting
    s.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert json.loads(f.readline()) == {"return": {}}
    replies = []
    for chunk, expected in chunks:
        s.sendall(chunk)
        for _ in range(expected):
            reply = json.loads(f.readline())
            if isinstance(reply.get("return"), dict):
                reply["return"].pop("package", None)  # the one member that differs
            replies.append(reply)
        time.sleep(0.05)
    s.close()
    return replies


def test_0xff_drops_a_partial_command_and_the_next_one_runs(both):
    """QMP spec: a 0xFF byte resets the JSON parser. The document cut short gets an error
    (QEMU's text quotes the token it cut), and the stream goes on with the next command."""
    chunks = [
        (b'{"execute": "query-ver', 0),
        (b'\xff', 1),
        (b'{"execute": "query-version"}\n', 1),
        (b'\xff{"execute": "query-version"}\n', 2),
        (b'{"execute": tru\xff{"execute": "query-block-exports"}\n', 2),
    ]
    ours, theirs = both
    got, expected = qmp_raw(ours.qmp_sock, chunks), qmp_raw(theirs.qmp_sock, chunks)
    assert got == expected
    assert expected[0]["error"]["desc"] == "JSON parse error, stray '\"query-ver\ufffd'"
