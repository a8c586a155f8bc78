"""Character devices as qemu-storage-daemon users script them (issue 16 item 5): a monitor on
stdin/stdout, socket chardevs listening and connecting out (with reconnect), query-chardev, and
the option errors. Each scenario runs the same steps on qemu-storage-daemon and bexd and the
results are compared."""

import json
import re
import socket
import subprocess
import time

import pytest

from conftest import _STARTED, daemon_binary, need


class Proc:
    """A daemon with its stdin/stdout as pipes (killed at teardown if still running)."""

    def __init__(self, argv):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        _STARTED.append(self)

    def line(self):
        return json.loads(self.proc.stdout.readline())

    def command(self, name, **arguments):
        msg = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()
        while True:
            reply = self.line()
            if "event" not in reply:
                return reply


def greeting(sock):
    sock.settimeout(10)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        assert chunk, "closed before the greeting"
        data += chunk
    return json.loads(data)


def normalized(infos, tmp):
    """query-chardev's entries by label, with tmp paths and port numbers made comparable."""
    out = {}
    for info in infos:
        name = re.sub(r":\d+(?=[ ,]|$)", ":PORT", info["filename"].replace(str(tmp), "TMP"))
        out[info["label"]] = (name, info["frontend-open"])
    return out


def scenario(which, tmp):
    """The steps, run against one daemon; returns what was observed."""
    tmp = tmp / which
    tmp.mkdir()
    tcp_peer = socket.socket()
    tcp_peer.bind(("127.0.0.1", 0))
    tcp_peer.listen()
    unix_peer = socket.socket(socket.AF_UNIX)
    unix_peer.bind(str(tmp / "peer.sock"))
    unix_peer.listen()
    port = tcp_peer.getsockname()[1]
    d = Proc(daemon_binary(which) + [
        "--chardev", "stdio,id=m0", "--monitor", "m0",
        "--chardev", f"socket,id=s1,path={tmp}/s1.sock,server=on,wait=off",
        "--chardev", "socket,id=s2,host=127.0.0.1,port=0,server=on,wait=off",
        "--chardev", f"socket,id=c1,host=127.0.0.1,port={port},server=off,reconnect-ms=300",
        "--monitor", "c1",
        "--chardev", f"socket,id=c2,path={tmp}/peer.sock,server=off", "--monitor", "c2",
        "--chardev", f"socket,id=s3,path={tmp}/s3.sock,server=on,wait=off", "--monitor", "s3",
    ])
    seen = {}
    c1, _ = tcp_peer.accept()
    c2, _ = unix_peer.accept()
    seen["client greetings"] = ("QMP" in greeting(c1), "QMP" in greeting(c2))
    seen["stdio greeting"] = "QMP" in d.line()
    seen["negotiate"] = d.command("qmp_capabilities")
    before = d.command("query-chardev")["return"]
    seen["query-chardev"] = normalized(before, tmp)
    # A listening chardev: connected, its filename names both ends.
    s3 = socket.socket(socket.AF_UNIX)
    s3.connect(str(tmp / "s3.sock"))
    greeting(s3)
    seen["s3 connected"] = normalized(d.command("query-chardev")["return"], tmp)["s3"]
    s3.close()
    # The peer of c1 goes: the chardev reconnects after reconnect-ms.
    c1.close()
    tcp_peer.settimeout(10)
    t0 = time.monotonic()
    c1, _ = tcp_peer.accept()
    seen["reconnect period ok"] = 0.2 < time.monotonic() - t0 < 5
    seen["greeting after reconnect"] = "QMP" in greeting(c1)
    c1.sendall(b'{"execute":"qmp_capabilities"}\n{"execute":"query-chardev-backends"}\n')
    replies = b""
    while replies.count(b"\n") < 2:
        replies += c1.recv(65536)
    backends = json.loads(replies.splitlines()[1])["return"]
    seen["backends include"] = sorted(b["name"] for b in backends
                                      if b["name"] in ("socket", "stdio"))
    # c2 has no reconnect: its peer goes and the daemon serves on.
    c2.close()
    # EOF on stdin: the stdio monitor goes and the daemon serves on.
    d.proc.stdin.close()
    time.sleep(0.7)
    seen["alive after stdin EOF"] = d.proc.poll() is None
    c1.sendall(b'{"execute":"query-chardev"}\n')
    replies = b""
    while not replies.endswith(b"\n"):
        replies += c1.recv(65536)
    seen["after"] = normalized(json.loads(replies)["return"], tmp)
    d.proc.terminate()
    seen["exit"] = d.proc.wait(timeout=20)
    return seen


def test_chardevs_monitors_and_query_chardev_match_qemu_storage_daemon(tmp_path):
    need("qemu-storage-daemon")
    theirs = scenario("qsd", tmp_path)
    ours = scenario("bexd", tmp_path)
    assert ours == theirs
    # What the comparison covers, spelled out.
    assert theirs["query-chardev"]["m0"] == ("stdio", True)
    assert theirs["query-chardev"]["s2"] == ("disconnected:tcp:127.0.0.1:PORT,server=on", False)
    assert theirs["query-chardev"]["c1"] == ("tcp:127.0.0.1:PORT <-> 127.0.0.1:PORT", True)
    assert theirs["alive after stdin EOF"]


# (--chardev/--monitor arguments, whether the stderr text must be identical)
ERRORS = [
    (["--chardev", "bogus,id=c"], True),
    (["--chardev", "stdio"], True),
    (["--chardev", "stdio,id=1bad"], True),
    (["--chardev", "stdio,id=a,bogus=1"], True),
    (["--chardev", "stdio,id=a", "--chardev", "stdio,id=b"], True),
    (["--chardev", "stdio,id=a", "--chardev", "socket,id=a,path=P,server=on,wait=off"], True),
    (["--chardev", "socket,id=c,path=P,server=off,wait=off"], True),
    (["--chardev", "socket,id=c,path=P,server=off,reconnect=1,reconnect-ms=9"], True),
    (["--chardev", "socket,id=c,path=P,server=on,wait=off,reconnect=1"], True),
    (["--chardev", "socket,id=c,path=P,fd=3,server=on,wait=off"], True),
    (["--chardev", "socket,id=c,path=NOPEER,server=off"], True),
    (["--chardev", "socket,id=c,host=127.0.0.1,port=CLOSED,server=off"], True),
    (["--chardev", "socket,id=c,path=NOPEER,server=off,reconnect=x"], True),
    (["--monitor", "nope"], True),
    (["--chardev", "stdio,id=a", "--monitor", "a", "--monitor", "a"], True),
]


def run_fails(which, args, tmp):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    subst = {"P": f"{tmp}/x.sock", "NOPEER": f"{tmp}/none.sock", "CLOSED": str(port)}
    args = [re.sub(r"\b(P|NOPEER|CLOSED)\b", lambda m: subst[m.group(1)], a) for a in args]
    p = subprocess.run(daemon_binary(which) + args, stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=10)
    first = p.stderr.decode().splitlines()[0] if p.stderr else ""
    text = first.split(": ", 1)[1] if ": " in first else first
    text = text.replace(str(port), "PORT").replace(str(tmp), "TMP")
    return p.returncode, text


@pytest.mark.parametrize("args,same_text", ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_chardev_option_errors_match_qemu_storage_daemon(tmp_path, args, same_text):
    need("qemu-storage-daemon")
    theirs = run_fails("qsd", args, tmp_path)
    ours = run_fails("bexd", args, tmp_path)
    assert theirs[0] == 1
    assert ours == theirs if same_text else ours[0] == theirs[0]


@pytest.mark.bexd_only("QEMU accepts these and ignores them; bexd refuses rather than ignore")
@pytest.mark.parametrize("args,member", [
    (["--chardev", "socket,id=c,path=P,server=on,wait=off,reconnect-ms=100"], "reconnect-ms"),
    (["--chardev", "stdio,id=c,signal=off"], "signal"),
    (["--chardev", "null,id=c"], "null"),
])
def test_what_bexd_cannot_honour_is_refused_naming_it(tmp_path, args, member):
    code, text = run_fails("bexd", args, tmp_path)
    assert code == 1 and member in text, text
