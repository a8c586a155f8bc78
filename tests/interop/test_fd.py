"""addr.type=fd done right (issue 16 item 6): an inherited descriptor number on the command line,
or over QMP a descriptor passed with getfd (SCM_RIGHTS over a unix monitor). Only a listening
stream socket is taken; anything else is refused and left open."""

import json
import os
import socket
import subprocess
import time

import pytest

from conftest import daemon_binary, need, wait_until, can_connect_unix


def listening_tcp():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def listening_unix(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen()
    return s


def kinds_of_fd(tmp):
    """name -> (an object keeping it open, its descriptor)."""
    f = open(tmp / "image", "w+b")
    objs = {
        "file": f,
        "datagram": socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
        "unix datagram": socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM),
        "socketpair": socket.socketpair()[0],
        "tcp listening": listening_tcp(),
        "unix listening": listening_unix(tmp / "l.sock"),
    }
    return {k: (o, o.fileno()) for k, o in objs.items()}


def start_server(which, fd, tmp, inherit=True):
    """--nbd-server addr.type=fd,addr.str=FD with a null-co export; (exit code or None, stderr)."""
    argv = daemon_binary(which) + [
        "--blockdev", "driver=null-co,node-name=n0,size=1048576,read-zeroes=on",
        "--nbd-server", f"addr.type=fd,addr.str={fd}",
        "--export", "type=nbd,id=e0,node-name=n0,name=disk"]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         pass_fds=[fd] if inherit else [])
    try:
        code = p.wait(timeout=1.5)
    except subprocess.TimeoutExpired:
        p.terminate()
        p.wait()
        return None, ""
    return code, p.stderr.read().decode().split(": ", 2)[-1].strip()


@pytest.mark.parametrize("what", ["file", "datagram", "unix datagram", "socketpair",
                                  "tcp listening", "unix listening", "closed", "foo"])
def test_nbd_server_fd_on_the_command_line_against_qemu_storage_daemon(tmp_path, what):
    need("qemu-storage-daemon")
    fds = kinds_of_fd(tmp_path)
    fd = {"closed": 77, "foo": "foo"}.get(what) or fds[what][1]
    inherit = what not in ("closed", "foo")
    theirs = start_server("qsd", fd, tmp_path, inherit)
    ours = start_server("bexd", fd, tmp_path, inherit)
    if what in ("file", "closed", "foo", "tcp listening", "unix listening"):
        # Same outcome, same text (the listening ones keep running).
        assert ours == theirs
    else:
        # Both refuse; bexd says what is wrong instead of listen()'s errno.
        assert theirs[0] == ours[0] == 1, (theirs, ours)
        assert "stream socket" in ours[1] or "listening socket" in ours[1], ours


@pytest.mark.bexd_only("qemu-storage-daemon calls listen() on a socket that is not listening "
                       "and takes it; bexd refuses it and leaves it alone")
def test_a_socket_that_is_not_listening_is_refused(tmp_path):
    s = socket.socket()
    code, text = start_server("bexd", s.fileno(), tmp_path)
    assert code == 1 and text == f"File descriptor '{s.fileno()}' is not a listening socket"


class Monitor:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(str(path))
        self.f = self.s.makefile("rb")
        json.loads(self.f.readline())
        assert self.cmd("qmp_capabilities") == {"return": {}}

    def cmd(self, command, fds=(), **arguments):
        msg = json.dumps({"execute": command, "arguments": arguments}).encode()
        if fds:
            socket.send_fds(self.s, [msg], list(fds))
        else:
            self.s.sendall(msg)
        while True:
            reply = json.loads(self.f.readline())
            if "event" not in reply:
                return reply


def start_monitor_daemon(which, tmp, pass_fds=()):
    qmp = tmp / f"{which}-qmp.sock"
    p = subprocess.Popen(daemon_binary(which) + [
        "--blockdev", "driver=null-co,node-name=n0,size=1048576,read-zeroes=on",
        "--chardev", f"socket,id=m,path={qmp},server=on,wait=off", "--monitor", "m"],
        stdin=subprocess.DEVNULL, pass_fds=list(pass_fds))
    wait_until(lambda: can_connect_unix(qmp), what="monitor")
    return p, Monitor(qmp)


def fd_addr(text):
    return {"type": "fd", "data": {"str": text}}


def test_getfd_is_refused_by_qemu_storage_daemon(tmp_path):
    """QSD has no getfd and refuses fd addresses over QMP: bexd's getfd is its own."""
    need("qemu-storage-daemon")
    p, mon = start_monitor_daemon("qsd", tmp_path)
    try:
        assert mon.cmd("getfd", fdname="x")["error"]["class"] == "CommandNotFound"
        assert mon.cmd("nbd-server-start", addr=fd_addr("x"))["error"]["desc"] == \
            "only QEMU supports file descriptor passing"
    finally:
        p.terminate()
        p.wait()


@pytest.mark.bexd_only("getfd: qemu-storage-daemon has none")
def test_getfd_listening_socket_serves_nbd_and_other_fds_are_refused(tmp_path):
    need("nbdinfo")
    p, mon = start_monitor_daemon("bexd", tmp_path)
    try:
        with open(tmp_path / "image", "w+b") as img:
            assert mon.cmd("getfd", fdname="x")["error"]["desc"] == \
                "No file descriptor supplied via SCM_RIGHTS"
            assert mon.cmd("getfd", fds=[img.fileno()], fdname="img") == {"return": {}}
            r = mon.cmd("nbd-server-start", addr=fd_addr("img"))
            assert r["error"]["desc"] == "File descriptor 'img' is not a socket"
            # Refused and kept: closefd still finds it.
            assert mon.cmd("closefd", fdname="img") == {"return": {}}
            assert mon.cmd("closefd", fdname="img")["error"]["desc"] == \
                "File descriptor named 'img' not found"
        r = mon.cmd("nbd-server-start", addr=fd_addr("nope"))
        assert r["error"]["desc"] == "File descriptor named 'nope' has not been found"
        lst = listening_unix(tmp_path / "nbd.sock")
        assert mon.cmd("getfd", fds=[lst.fileno()], fdname="lst") == {"return": {}}
        lst.close()
        assert mon.cmd("nbd-server-start", addr=fd_addr("lst")) == {"return": {}}
        assert mon.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "n0"},
                       name="disk") == {"return": {}}
        out = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///disk?socket={tmp_path}/nbd.sock"],
                             capture_output=True, text=True, timeout=20)
        assert out.stdout.strip() == "1048576", out.stderr
    finally:
        p.terminate()
        assert p.wait(timeout=20) == 0


@pytest.mark.bexd_only("an inherited descriptor over QMP: qemu-storage-daemon refuses fds there")
def test_a_refused_inherited_descriptor_stays_open_in_the_daemon(tmp_path):
    img = open(tmp_path / "image", "w+b")
    fd = img.fileno()
    p, mon = start_monitor_daemon("bexd", tmp_path, pass_fds=[fd])
    try:
        r = mon.cmd("nbd-server-start", addr=fd_addr(str(fd)))
        assert r["error"]["desc"] == f"File descriptor '{fd}' is not a socket"
        assert os.readlink(f"/proc/{p.pid}/fd/{fd}") == str(tmp_path / "image")
    finally:
        p.terminate()
        assert p.wait(timeout=20) == 0
