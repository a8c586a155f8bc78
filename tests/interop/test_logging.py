"""Where bexd's log goes: --log-target=syslog and journal send one datagram
an event to a real listener (a unix datagram socket bound here, named by
BEXD_SYSLOG_SOCKET / BEXD_JOURNAL_SOCKET), --log-format=json writes one JSON
object a line; BEXD_LOG filters. bexd's own options (QEMU logs to stderr only)."""

import json
import os
import socket
import struct
import subprocess

import pytest

from conftest import daemon_binary, need, wait_until

pytestmark = pytest.mark.bexd_only("bexd's own logging options; QEMU only writes to stderr")


def listener(tmp_path, name):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / name
    s.bind(str(path))
    s.settimeout(30)
    return s, path


def run_and_quit(args, env, tmp_path):
    """Starts bexd with a null node (its 'block node added' is an info line)
    and a QMP monitor on stdio, quits it, returns (exit code, stderr)."""
    argv = daemon_binary("bexd") + args + [
        "--blockdev", "driver=null-co,node-name=n0",
        "--chardev", "stdio,id=m0", "--monitor", "chardev=m0"]
    p = subprocess.run(argv, input=b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                       env={**os.environ, **env}, capture_output=True, timeout=60)
    return p.returncode, p.stderr.decode()


def test_syslog_gets_one_datagram_an_event_with_its_priority(tmp_path):
    sock, path = listener(tmp_path, "log")
    code, err = run_and_quit(["--log-target", "syslog"],
                             {"BEXD_SYSLOG_SOCKET": str(path), "BEXD_LOG": "info"}, tmp_path)
    assert code == 0 and err == ""
    lines = []
    sock.settimeout(0.5)
    try:
        while True:
            lines.append(sock.recv(65536).decode())
    except socket.timeout:
        pass
    added = [m for m in lines if "block node added" in m]
    assert len(added) == 1, lines
    # facility daemon (3), severity info (6); the receiver stamps the time.
    assert added[0].startswith("<30>bexd[") and "]: " in added[0]
    assert "\n" not in added[0]


def test_journal_gets_native_fields(tmp_path):
    sock, path = listener(tmp_path, "journal")
    code, err = run_and_quit(["--log-target=journal"],
                             {"BEXD_JOURNAL_SOCKET": str(path), "BEXD_LOG": "info"}, tmp_path)
    assert code == 0 and err == ""
    sock.settimeout(0.5)
    packets = []
    try:
        while True:
            packets.append(sock.recv(65536))
    except socket.timeout:
        pass
    fields = []
    for p in packets:
        assert p.startswith(b"MESSAGE\n")
        n = struct.unpack("<Q", p[8:16])[0]
        message = p[16:16 + n].decode()
        rest = dict(line.split("=", 1) for line in p[17 + n:].decode().splitlines())
        fields.append((message, rest))
    added = [(m, f) for m, f in fields if "block node added" in m]
    assert len(added) == 1
    assert added[0][1]["PRIORITY"] == "6" and added[0][1]["SYSLOG_IDENTIFIER"] == "bexd"
    assert added[0][1]["BEXD_TARGET"].startswith("bexd")


def test_json_format_is_one_object_a_line(tmp_path):
    code, err = run_and_quit(["--log-format", "json"], {"BEXD_LOG": "info"}, tmp_path)
    assert code == 0
    events = [json.loads(line) for line in err.splitlines()]
    added = [e for e in events if e["fields"]["message"] == "block node added"]
    assert added and added[0]["level"] == "INFO" and added[0]["fields"]["node"] == "n0"


def test_bexd_log_filters_what_reaches_syslog(tmp_path):
    sock, path = listener(tmp_path, "log")
    code, _ = run_and_quit(["--log-target", "syslog"],
                           {"BEXD_SYSLOG_SOCKET": str(path), "BEXD_LOG": "warn"}, tmp_path)
    assert code == 0
    sock.settimeout(0.5)
    with pytest.raises(socket.timeout):
        while True:
            assert "block node added" not in sock.recv(65536).decode()


@pytest.mark.parametrize("args, message", [
    (["--log-target", "file"], "bexd: --log-target: 'file' is not one of stderr, syslog, journal"),
    (["--log-format=xml"], "bexd: --log-format: 'xml' is not one of text, json"),
    (["--log-target", "syslog", "-T", "nbd_*,file=/tmp/x"],
     "bexd: --trace file= and --log-target both say where the log goes"),
])
def test_bad_log_options_exit_1_with_one_line(tmp_path, args, message):
    code, err = run_and_quit(args, {"BEXD_SYSLOG_SOCKET": str(tmp_path / "none")}, tmp_path)
    assert code == 1 and err == message + "\n"


def test_unreachable_syslog_is_refused(tmp_path):
    code, err = run_and_quit(["--log-target", "syslog"],
                             {"BEXD_SYSLOG_SOCKET": str(tmp_path / "none")}, tmp_path)
    assert code == 1
    assert err == f"bexd: --log-target: cannot reach {tmp_path / 'none'}: No such file or directory\n"


def test_serve_takes_the_same_log_options(tmp_path):
    need("nbdinfo")
    sock, path = listener(tmp_path, "log")
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 65536)
    nbd_sock = tmp_path / "serve.sock"
    p = subprocess.Popen(daemon_binary("bexd") + ["serve", "--log-target", "syslog", "-v",
                                                   "-k", str(nbd_sock), str(img)],
                         env={**os.environ, "BEXD_SYSLOG_SOCKET": str(path)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # The first datagram arrives once serve has set its log up.
        first = sock.recv(65536).decode()
        wait_until(lambda: nbd_sock.exists(), what="bexd serve to listen")
        size = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={nbd_sock}"],
                              capture_output=True, text=True, timeout=60)
        assert size.stdout.strip() == "65536"
        # Without -t serve exits after its last client, as qemu-nbd.
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.stderr.read() == b""
    assert first.startswith("<30>bexd[")
    p = subprocess.run(daemon_binary("bexd") + ["serve", "--log-format", "xml", str(img)],
                       capture_output=True, timeout=60)
    assert p.returncode == 1 and b"'xml' is not one of text, json" in p.stderr
