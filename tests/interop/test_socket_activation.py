"""Socket activation (issue 17 item 4): LISTEN_FDS/LISTEN_PID as qemu-nbd reads them, for
`bexd serve` (against qemu-nbd) and for the qemu-storage-daemon form's
`--nbd-server addr.type=fd,addr.str=3` (against qemu-storage-daemon), under
systemd-socket-activate, as the shipped contrib/systemd units run it."""

import subprocess
import time

import pytest

from conftest import daemon_binary, need, make_image, wait_until

SERVE = {"qemu-nbd": ["qemu-nbd", "-t"], "bexd": daemon_binary("bexd") + ["serve", "-t"]}


def activate(tmp, argv):
    sock = tmp / "act.sock"
    sock.unlink(missing_ok=True)
    p = subprocess.Popen(["systemd-socket-activate", "-l", str(sock)] + argv,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_until(sock.exists, what="the activation socket")
    return p, sock


def size_through(sock):
    out = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"],
                         capture_output=True, text=True, timeout=20)
    return out.stdout.strip() or out.stderr.strip()


def finish(p):
    p.terminate()
    p.wait(timeout=20)


@pytest.mark.parametrize("which", ["qemu-nbd", "bexd"])
def test_serve_takes_the_activated_socket(tmp_path, which):
    need("systemd-socket-activate")
    need("nbdinfo")
    img = make_image(tmp_path / "d.img", 1 << 20)
    p, sock = activate(tmp_path, SERVE[which] + ["-f", "raw", str(img)])
    try:
        assert size_through(sock) == str(1 << 20)
    finally:
        finish(p)


def refusal(tmp, argv):
    p, sock = activate(tmp, argv)
    size_through(sock)  # the first connection starts the program
    p.wait(timeout=20)
    lines = [l for l in p.stderr.read().decode().splitlines()
             if l.startswith(("qemu-nbd:", "bexd serve:"))]
    return p.returncode, lines[0].split(": ", 1)[1] if lines else ""


@pytest.mark.parametrize("option", [["-k", "/tmp/never.sock"], ["-b", "127.0.0.1"],
                                    ["-p", "5000"]], ids=["-k", "-b", "-p"])
def test_serve_refuses_an_address_with_socket_activation_as_qemu_nbd(tmp_path, option):
    need("systemd-socket-activate")
    img = make_image(tmp_path / "d.img", 1 << 20)
    theirs = refusal(tmp_path, SERVE["qemu-nbd"] + option + ["-f", "raw", str(img)])
    ours = refusal(tmp_path, SERVE["bexd"] + option + ["-f", "raw", str(img)])
    assert theirs[1] and ours == theirs


@pytest.mark.parametrize("which", ["qsd", "bexd"])
def test_nbd_server_fd_3_takes_the_activated_socket(tmp_path, which):
    need("systemd-socket-activate")
    need("nbdinfo")
    p, sock = activate(tmp_path, daemon_binary(which) + [
        "--blockdev", "driver=null-co,node-name=n0,size=1048576",
        "--nbd-server", "addr.type=fd,addr.str=3",
        "--export", "type=nbd,id=e0,node-name=n0,name="])
    try:
        assert size_through(sock) == "1048576"
    finally:
        finish(p)


def test_serve_refuses_two_activated_sockets_as_qemu_nbd(tmp_path):
    """LISTEN_FDS=2: qemu-nbd serves one socket and refuses; so does bexd serve."""
    need("systemd-socket-activate")
    img = make_image(tmp_path / "d.img", 1 << 20)
    results = []
    for which in ["qemu-nbd", "bexd"]:
        socks = [tmp_path / f"{which}-{i}.sock" for i in range(2)]
        p = subprocess.Popen(["systemd-socket-activate", "-l", str(socks[0]), "-l", str(socks[1])]
                             + SERVE[which] + ["-f", "raw", str(img)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: all(s.exists() for s in socks), what="the activation sockets")
        size_through(socks[0])
        p.wait(timeout=20)
        lines = [l for l in p.stderr.read().decode().splitlines()
                 if l.startswith(("qemu-nbd:", "bexd serve:"))]
        results.append((p.returncode, lines[0].split(": ", 1)[1] if lines else ""))
    assert results[0][1] and results[1] == results[0]


def test_serve_prints_the_activated_sockets_address(tmp_path):
    """bexd serve prints a URI a client can use (qemu-nbd prints nothing):
    under activation, the address of the socket it was given."""
    need("systemd-socket-activate")
    img = make_image(tmp_path / "d.img", 1 << 20)
    sock = tmp_path / "act.sock"
    p = subprocess.Popen(["systemd-socket-activate", "-l", str(sock)] + SERVE["bexd"]
                         + ["-f", "raw", str(img)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    try:
        wait_until(sock.exists, what="the activation socket")
        size_through(sock)  # the first connection starts the program
        assert p.stdout.readline().strip() == f"nbd+unix:///?socket={sock}"
    finally:
        finish(p)
