"""driver=nbd: the daemon under test (DAEMON=bexd|qsd, the same command lines) as a client
of another NBD server (qemu-nbd, qemu-storage-daemon, bexd), re-exporting what it reads.
Reads and writes go through the chain and are checked against the origin's file with
qemu-img compare and qemu-io; nbdinfo --map on the re-export shows the origin's holes;
errors at blockdev-add, reconnect-delay and x-dirty-bitmap behave as QEMU's."""

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import (REPO, daemon_binary, free_port, make_image, need, qmp_outcome, wait_until,
                      can_connect_unix)
from node_events import Monitor, qemu_io

MiB = 1 << 20
PATTERN = [(1 * MiB, b"\x5a" * (2 * MiB)), (40 * MiB, b"\x11" * 65536),
           (63 * MiB, b"\xee" * 4096)]


class Origin:
    """The server the daemon under test is a client of: qemu-nbd, QSD or bexd exporting
    `img` as `disk` on a unix socket; restartable on the same socket."""

    def __init__(self, tmp, which, img, fmt="raw", extra_args=()):
        self.tmp, self.which, self.img, self.fmt = tmp, which, img, fmt
        self.sock = tmp / f"origin-{which}.sock"
        self.qmp = tmp / f"origin-{which}-qmp.sock"
        self.extra_args = list(extra_args)
        self.proc = None
        self.start()

    def argv(self):
        if self.which == "qemu-nbd":
            return ["qemu-nbd", "-f", self.fmt, "-x", "disk", "-t", "-e", "8", "-k", str(self.sock),
                    "--cache=writeback"] + self.extra_args + [str(self.img)]
        node = f"driver=file,node-name=f0,filename={self.img}"
        return daemon_binary(self.which) + self.extra_args + [
            "--blockdev", node,
            "--chardev", f"socket,id=m0,path={self.qmp},server=on,wait=off",
            "--monitor", "chardev=m0",
            "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
            "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on"]

    def start(self):
        if self.sock.exists():
            self.sock.unlink()
        self.err = open(self.tmp / f"origin-{self.which}.stderr", "a")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stderr=self.err)
        wait_until(lambda: can_connect_unix(self.sock), what=f"{self.which} to listen")
        if self.which != "qemu-nbd":
            wait_until(lambda: can_connect_unix(self.qmp), what="origin QMP")

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self.err.close()

    def uri(self):
        return f"nbd+unix:///disk?socket={self.sock}"


@pytest.fixture
def origin(tmp_path):
    made = []

    def _origin(which, img, **kw):
        if which == "qemu-nbd":
            need("qemu-nbd")
        o = Origin(tmp_path, which, img, **kw)
        made.append(o)
        return o
    yield _origin
    for o in made:
        o.stop()


def nbd_blockdev(sock, node="n0", export="disk", extra=""):
    return (f"driver=nbd,node-name={node},server.type=unix,server.path={sock},"
            f"export={export}{extra}")


def reexport(node="n0", name="re"):
    return f"type=nbd,id=exp-{node},node-name={node},name={name},writable=on"


def nbdinfo_map(uri, context=None):
    need("nbdinfo")
    argv = ["nbdinfo", "--json", f"--map={context}" if context else "--map", uri]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def merged(extents):
    """Adjacent extents of the same type as one (servers may cut them anywhere)."""
    out = []
    for off, length, t in extents:
        if out and out[-1][2] == t and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length, t)
        else:
            out.append((off, length, t))
    return out


def compare(img, uri):
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), uri],
                       capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("origin_kind", ["qemu-nbd", "qsd", "bexd"])
def test_reexport_reads_writes_and_keeps_the_origins_holes(origin, start, image, origin_kind):
    img = image(64 * MiB, PATTERN)
    o = origin(origin_kind, img)
    d = start([nbd_blockdev(o.sock)], [reexport()])
    assert compare(img, d.uri("re")) == (0, "Images are identical.\n")
    # The re-export is as sparse as the origin: the same data and holes.
    assert merged(nbdinfo_map(d.uri("re"))) == merged(nbdinfo_map(o.uri()))
    holes = [e for e in nbdinfo_map(d.uri("re")) if e[2] & 1]
    assert any(off <= 8 * MiB < off + length for off, length, _ in holes)
    # Writes, zeroes, discards and a flush through the chain reach the origin's file.
    code, out = qemu_io(d.uri("re"), "write -P 0x77 5M 3M")
    assert code == 0, out
    assert qemu_io(d.uri("re"), "write -z 1M 64k")[0] == 0
    assert qemu_io(d.uri("re"), "write -f -P 0x33 9M 64k")[0] == 0
    assert qemu_io(d.uri("re"), "discard 40M 64k")[0] == 0
    assert qemu_io(d.uri("re"), "flush")[0] == 0
    assert compare(img, d.uri("re"))[0] == 0
    code, out = qemu_io(str(img), "read -P 0x77 5M 3M", read_only=True)
    assert code == 0 and "Pattern verification failed" not in out, out
    code, out = qemu_io(str(img), "read -P 0 1M 64k", read_only=True)
    assert code == 0 and "Pattern verification failed" not in out, out


def test_many_requests_in_flight_complete_with_the_right_data(origin, start, image):
    """fio's nbd engine at QD32 with verification, through the re-export."""
    need("fio")
    img = image(64 * MiB)
    o = origin("bexd", img)
    d = start([nbd_blockdev(o.sock)], [reexport()])
    r = subprocess.run(["fio", "--name=v", "--ioengine=nbd", f"--uri={d.uri('re')}",
                        "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=16M",
                        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                        "--output-format=json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert compare(img, d.uri("re"))[0] == 0


def test_qcow2_and_raw_layer_over_nbd(origin, start, tmp_path):
    """An origin serving a qcow2 file's bytes (no format), opened as qcow2 by the
    daemon under test: the guest view reads as qemu-img reads the file itself."""
    q = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(q), "32M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 4M 1M", str(q)],
                   check=True, capture_output=True)
    o = origin("qemu-nbd", q)
    qcow = ("driver=qcow2,node-name=q0,file.driver=nbd,file.server.type=unix,"
            f"file.server.path={o.sock},file.export=disk")
    raw = f"driver=raw,node-name=r0,offset=4096,file.driver=nbd,file.server.type=unix,file.server.path={o.sock},file.export=disk,read-only=on"
    d = start([qcow, raw], [reexport("q0", "guest"),
                            "type=nbd,id=exp-r0,node-name=r0,name=window"])
    code, out = qemu_io(d.uri("guest"), "read -P 0x42 4M 1M")
    assert code == 0 and "verification failed" not in out, out
    code, out = qemu_io(d.uri("guest"), "write -P 0x24 4M 64k")
    assert code == 0, out
    assert qemu_io(d.uri("guest"), "flush")[0] == 0
    # A new cluster would grow the file past the export's end: EINVAL, as in QEMU.
    code, out = qemu_io(d.uri("guest"), "write -P 0x24 8M 64k")
    assert "write failed: Invalid argument" in out, out
    size = os.path.getsize(q)
    code, out = qemu_io(d.uri("window"), f"read 0 {size - 4096}", read_only=True)
    assert code == 0, out


@pytest.mark.parametrize("case", ["refused", "no-socket", "no-export"])
def test_blockdev_add_errors_are_qemus(origin, start, image, tmp_path, case):
    d = start([], [])
    if case == "refused":
        server = {"type": "inet", "host": "127.0.0.1", "port": str(free_port())}
        want = f"Failed to connect to '127.0.0.1:{server['port']}': Connection refused"
        export = "disk"
    elif case == "no-socket":
        server = {"type": "unix", "path": str(tmp_path / "none.sock")}
        want = f"Failed to connect to '{tmp_path / 'none.sock'}': No such file or directory"
        export = "disk"
    else:
        o = origin("qemu-nbd", image(MiB))
        server = {"type": "unix", "path": str(o.sock)}
        want = "Requested export not available"
        export = "nope"
    import asyncio
    outcome = asyncio.run(qmp_outcome(d.qmp_sock, "blockdev-add", {
        "driver": "nbd", "node-name": "n0", "server": server, "export": export}))
    assert outcome == ("GenericError", want)
    # The daemon goes on: the node does not exist, the monitor answers.
    assert asyncio.run(qmp_outcome(d.qmp_sock, "query-named-block-nodes", {}))[0] == "ok"


def test_read_only_export_needs_a_read_only_node(origin, start, image):
    import asyncio
    o = origin("qemu-nbd", image(MiB), extra_args=["-r"])
    d = start([], [])
    base = {"driver": "nbd", "server": {"type": "unix", "path": str(o.sock)}, "export": "disk"}
    outcome = asyncio.run(qmp_outcome(d.qmp_sock, "blockdev-add", dict(base, **{"node-name": "n0"})))
    assert outcome == ("GenericError", "Could not open image: Permission denied")
    for extra in ({"read-only": True}, {"auto-read-only": True}):
        args = dict(base, **{"node-name": f"n{len(extra)}{list(extra)[0][0]}"}, **extra)
        assert asyncio.run(qmp_outcome(d.qmp_sock, "blockdev-add", args)) == ("ok", {})


def read_in_background(uri, cmd):
    return subprocess.Popen(["qemu-io", "-f", "raw", "-r", "-c", cmd, uri],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_requests_wait_for_a_reconnect_inside_reconnect_delay(origin, start, image):
    img = image(16 * MiB, [(0, b"\x5a" * MiB)])
    o = origin("bexd", img)
    d = start([nbd_blockdev(o.sock, extra=",reconnect-delay=60")], [reexport()])
    assert qemu_io(d.uri("re"), "read -P 0x5a 0 1M")[0] == 0
    o.kill()
    # Requests sent while the origin is down wait instead of failing...
    reader = read_in_background(d.uri("re"), "read -P 0x5a 0 1M")
    writer = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 0x66 2M 64k",
                               d.uri("re")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    o.start()
    # ...and complete once it is back.
    out, _ = reader.communicate(timeout=120)
    assert reader.returncode == 0 and "failed" not in out, out
    out, _ = writer.communicate(timeout=120)
    assert writer.returncode == 0 and "failed" not in out, out
    code, out = qemu_io(str(img), "read -P 0x66 2M 64k", read_only=True)
    assert code == 0 and "verification failed" not in out, out


def test_requests_fail_with_eio_past_reconnect_delay_and_the_daemon_serves_on(
        origin, start, image):
    img = image(16 * MiB, [(0, b"\x5a" * MiB)])
    other = image(MiB, name="other.img")
    o = origin("bexd", img)
    d = start([nbd_blockdev(o.sock, extra=",reconnect-delay=1"),
               f"driver=file,node-name=f1,filename={other}"],
              [reexport(), "type=nbd,id=exp-f1,node-name=f1,name=other"])
    o.kill()
    code, out = qemu_io(d.uri("re"), "read 0 64k", read_only=True)
    assert "read failed: Input/output error" in out, out
    # Other exports are served meanwhile, and the monitor answers.
    assert qemu_io(d.uri("other"), "read 0 64k", read_only=True)[0] == 0
    # The client keeps trying in the background: once the origin is back, reads work.
    o.start()

    def reads_again():
        code, out = qemu_io(d.uri("re"), "read -P 0x5a 0 64k", read_only=True)
        return code == 0 and "error" not in out and "failed" not in out
    wait_until(reads_again, timeout=60, what="reads through the reconnected node")


def test_x_dirty_bitmap_reports_dirty_ranges_in_place_of_allocation(origin, start, image):
    """Block status of a node with x-dirty-bitmap=qemu:dirty-bitmap:b0 is that bitmap's:
    dirty ranges read as holes through the re-export, as in QEMU."""
    img = image(16 * MiB, [(0, b"\x5a" * (8 * MiB))])
    o = origin("bexd", img)
    mon = Monitor(o.qmp)
    try:
        assert mon.execute("block-dirty-bitmap-add", {"node": "f0", "name": "b0"})[0] == "ok"
        assert mon.execute("block-export-add", {
            "type": "nbd", "id": "eb", "node-name": "f0", "name": "withmap",
            "bitmaps": ["b0"], "writable": True})[0] == "ok"
    finally:
        mon.close()
    assert qemu_io(o.uri(), "write -P 0x11 1M 1M")[0] == 0
    bd = nbd_blockdev(o.sock, export="withmap", extra=",x-dirty-bitmap=qemu:dirty-bitmap:b0")
    d = start([bd], [reexport()])
    holes = [(off, length) for off, length, t in merged(nbdinfo_map(d.uri("re"))) if t & 1]
    assert holes == [(MiB, MiB)]


def test_x_dirty_bitmap_that_the_export_lacks_fails_blockdev_add(origin, start, image):
    import asyncio
    o = origin("qemu-nbd", image(MiB))
    d = start([], [])
    outcome = asyncio.run(qmp_outcome(d.qmp_sock, "blockdev-add", {
        "driver": "nbd", "node-name": "n0", "server": {"type": "unix", "path": str(o.sock)},
        "export": "disk", "x-dirty-bitmap": "qemu:dirty-bitmap:nope"}))
    assert outcome == ("GenericError", "Could not open image: Invalid argument")
