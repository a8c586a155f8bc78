"""`bexd backup --live` against a running daemon (DAEMON=bexd or qsd: the tool is bexd's,
the daemon varies) while a writer never stops writing to the node's export.

Every write is a whole 64 KiB block holding (generation, block) repeated, one write at a
time with a global generation counter, so the backup of a point in time has exactly one
possible content: for its newest generation G, every block holds the last write to it with
a generation <= G (the write in flight at the freeze is either G, landed, or G+1, not).
A block holding anything else, a torn block, or a mix of generations across the cut is a
torn backup. Each check builds the expected image from the writer's log and compares it
with `qemu-img compare`.

Tests marked `fleecing` need copy-before-write, snapshot-access and blockdev-reopen in the
daemon: qemu-storage-daemon has them; a bexd without them gets those tests as xfail
(conftest.py), so they start to count as soon as bexd has them.
"""

import asyncio
import os
import random
import re
import signal
import struct
import subprocess
import threading
import time

import nbd
import pytest

from conftest import Daemon, daemon_binary, need, wait_until
from tls_certs import make_pki, make_psk

pytestmark = pytest.mark.fleecing

BLOCK = 64 << 10
BLOCKS = 1024
SIZE = BLOCK * BLOCKS
ZERO = bytes(BLOCK)
READY = "point-in-time view of"


def pattern(gen, blk):
    return struct.pack("<QQ", gen, blk) * (BLOCK // 16)


class Writer:
    """Writes (gen, block) blocks to the export, one at a time, until stopped; `log`
    is [(gen, block)] in generation order, every entry acknowledged by the server."""

    def __init__(self, uri, prefilled, handle=None):
        self.h = handle or nbd.NBD()
        if handle is None:
            self.h.connect_uri(uri)
        self.log = []
        self.prefilled = prefilled
        self.gen = 0
        self.error = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        rnd = random.Random(19)
        try:
            while not self.stopping.is_set():
                blk = rnd.randrange(BLOCKS)
                self.gen += 1
                self.h.pwrite(pattern(self.gen, blk), blk * BLOCK)
                self.log.append((self.gen, blk))
                time.sleep(0.0005)  # keep each round's dirty set well below the disk
        except nbd.Error as e:
            self.error = e

    def wait_for(self, writes):
        """Until `writes` more writes were acknowledged."""
        target = len(self.log) + writes
        wait_until(lambda: len(self.log) >= target or self.error, timeout=30,
                   what=f"{writes} writes")

    def stop(self, expect_error=False):
        self.stopping.set()
        self.thread.join(30)
        if not expect_error:
            assert self.error is None, self.error
            self.h.shutdown()

    def expected(self, cut):
        """Block contents after every write with generation <= cut."""
        blocks = [pattern(0, b) if b in self.prefilled else ZERO for b in range(BLOCKS)]
        for gen, blk in self.log:
            if gen > cut:
                break
            blocks[blk] = pattern(gen, blk)
        return blocks


def cut_of(path):
    """The newest generation in a raw backup (every block must be a whole pattern)."""
    newest = 0
    with open(path, "rb") as f:
        for b in range(BLOCKS):
            data = f.read(BLOCK)
            if data == ZERO:
                continue
            gen, blk = struct.unpack("<QQ", data[:16])
            assert blk == b and data == pattern(gen, blk), f"block {b} is torn or misplaced"
            newest = max(newest, gen)
    return newest


def check_point_in_time(writer, backup, tmp_path, fmt="raw"):
    """The backup equals the disk at one instant: returns that instant's generation."""
    raw = backup
    if fmt == "qcow2":
        raw = tmp_path / "backup-as-raw.img"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(backup), str(raw)],
                       check=True)
    cut = cut_of(raw)
    expected = tmp_path / "expected.img"
    with open(expected, "wb") as f:
        for data in writer.expected(cut):
            f.write(data)
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, str(expected),
                        str(backup)], capture_output=True, text=True)
    assert r.returncode == 0, f"backup is not the disk at generation {cut}: {r.stdout}{r.stderr}"
    # The writer went on past the freeze, so the check could have failed.
    assert writer.gen > cut + 1, "no write after the freeze: the test proved nothing"
    return cut


def make_primary(tmp_path, fmt):
    """A `fmt` image with the even blocks written (generation 0), the odd ones left
    unallocated (so a qcow2 allocates while the backup runs)."""
    raw = tmp_path / "prefill.raw"
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        for b in range(0, BLOCKS, 2):
            f.seek(b * BLOCK)
            f.write(pattern(0, b))
    img = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, "-S", "4k", str(raw),
                    str(img)], check=True)
    raw.unlink()
    return img, set(range(0, BLOCKS, 2))


def blockdevs(img, fmt):
    return [f"driver=file,node-name=f0,filename={img}",
            f"driver={fmt},node-name=disk0,file=f0"]


EXPORT = "type=nbd,id=e0,node-name=disk0,name=disk,writable=on"


def live(d, output, *args, check=True, tls=()):
    """bexd backup --live of disk0 on daemon `d`; the CompletedProcess."""
    nbd_addr = f"127.0.0.1:{d.port}" if d.port else f"unix:{d.sock}"
    argv = daemon_binary("bexd") + ["backup", "--live", "--quiet", "--qmp", f"unix:{d.qmp_sock}",
                                    "--nbd", nbd_addr, "--node", "disk0", "-o", str(output),
                                    *tls, *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def start_live(d, output, *args):
    """The tool as a process, returned once its view is exported (the pull starts)."""
    argv = daemon_binary("bexd") + ["backup", "--live", "--quiet", "--qmp", f"unix:{d.qmp_sock}",
                                    "--nbd", f"unix:{d.sock}", "--node", "disk0",
                                    "-o", str(output), *args]
    p = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    assert READY in line, line + p.stderr.read()
    return p


def qmp(d, *commands):
    async def main():
        from qemu.qmp import QMPClient
        q = QMPClient("test")
        await q.connect(str(d.qmp_sock))
        try:
            return [await q.execute(c, a) for c, a in commands]
        finally:
            await q.disconnect()
    return asyncio.run(main())


def leftovers(d):
    """Every trace of a live backup in the daemon: nodes, exports, bitmaps."""
    nodes, exports = qmp(d, ("query-named-block-nodes", {"flat": True}),
                         ("query-block-exports", {}))
    found = [n["node-name"] for n in nodes if n["node-name"].startswith("bexd-backup-")]
    found += [e["id"] for e in exports if e["id"].startswith("bexd-backup")]
    for n in nodes:
        # Jobs' own bitmaps have no name.
        found += [b["name"] for b in n.get("dirty-bitmaps", [])
                  if b.get("name", "").startswith("bexd-backup-")]
    return found


def bitmap(d, name):
    nodes, = qmp(d, ("query-named-block-nodes", {"flat": True}))
    disk = next(n for n in nodes if n["node-name"] == "disk0")
    return next((b for b in disk.get("dirty-bitmaps", []) if b["name"] == name), None)


def file_child(d):
    """disk0's file child, by its file name (both daemons list it)."""
    nodes, = qmp(d, ("query-named-block-nodes", {"flat": True}))
    return {n["node-name"]: n["drv"] for n in nodes}


def read_bytes(stderr):
    m = re.search(r"read (\d+) bytes", stderr)
    assert m, stderr
    return int(m.group(1))


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_full_backups_are_the_disk_at_the_freeze(start, tmp_path, fmt):
    """Round after round, a full live backup under a writer that never stops equals the
    disk at one instant, block for block; nothing of the fleecing stays behind."""
    img, prefilled = make_primary(tmp_path, fmt)
    d = start(blockdevs(img, fmt), [EXPORT])
    w = Writer(d.uri("disk"), prefilled)
    try:
        cuts = []
        for rnd in range(3):
            w.wait_for(200)
            out = tmp_path / f"full{rnd}.{'qcow2' if rnd == 2 else 'raw'}"
            extra = ["--format", "qcow2"] if rnd == 2 else []
            live(d, out, *extra)
            assert leftovers(d) == []
            cuts.append(check_point_in_time(w, out, tmp_path, "qcow2" if rnd == 2 else "raw"))
        assert cuts == sorted(cuts) and len(set(cuts)) == 3
        assert file_child(d) == {"f0": "file", "disk0": fmt}
    finally:
        w.stop()
    assert d.stop() == 0
    if fmt == "qcow2":
        r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    assert not list(tmp_path.glob("bexd-backup-*")), "the temp file stayed"


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_incrementals_restore_the_disk_at_each_freeze(start, tmp_path, fmt):
    """A full backup starts bitmap b; each incremental copies only what b marks and, applied
    onto the previous state, gives the disk at its own freeze (qemu-img compare)."""
    img, prefilled = make_primary(tmp_path, fmt)
    d = start(blockdevs(img, fmt), [EXPORT])
    w = Writer(d.uri("disk"), prefilled)
    try:
        w.wait_for(100)
        prev = tmp_path / "state0.raw"
        live(d, prev, "--bitmap", "b")
        b = bitmap(d, "b")
        assert b is not None and b["recording"] and b["persistent"] == (fmt == "qcow2")
        prev_cut = check_point_in_time(w, prev, tmp_path)
        for rnd in range(1, 4):
            w.wait_for(150)
            state = tmp_path / f"state{rnd}.raw"
            r = live(d, state, "--bitmap", "b", "--incremental", "--base", str(prev))
            assert "incremental backup done" in r.stderr
            cut = check_point_in_time(w, state, tmp_path)
            # It copied what was written between the two freezes, and hardly more (bits set
            # around the previous freeze may be copied twice).
            between = {blk for gen, blk in w.log if prev_cut < gen <= cut}
            since = {blk for gen, blk in w.log if gen > prev_cut - 50}
            assert len(between) * BLOCK <= read_bytes(r.stderr) <= len(since) * BLOCK, r.stderr
            prev_cut = cut
            assert leftovers(d) == []
            assert bitmap(d, "b")["recording"]
            prev = state
    finally:
        w.stop()


def test_incremental_needs_the_bitmap(start, tmp_path):
    img, _ = make_primary(tmp_path, "raw")
    d = start(blockdevs(img, "raw"), [EXPORT])
    r = live(d, tmp_path / "x.raw", "--bitmap", "nope", "--incremental",
             "--base", str(img), check=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "bexd backup: node 'disk0' has no bitmap 'nope' for an incremental backup "
        "(make one with a full live backup and --bitmap)"]
    assert leftovers(d) == []


def test_a_protocol_node_is_backed_up_too(start, tmp_path, kind):
    """An export straight on a driver=file node: the filter goes above it (a daemon that can
    only put it under a format node says so in one line instead)."""
    img, prefilled = make_primary(tmp_path, "raw")
    d = start([f"driver=file,node-name=disk0,filename={img}"], [EXPORT])
    w = Writer(d.uri("disk"), prefilled)
    try:
        w.wait_for(100)
        out = tmp_path / "full.raw"
        r = live(d, out, check=False)
        # qemu-storage-daemon can: its blockdev-backup filter is a node snapshot-access reads.
        assert r.returncode == 0 or kind != "qsd", r.stderr
        if r.returncode == 0:
            check_point_in_time(w, out, tmp_path)
        else:
            assert r.returncode == 1
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and "needs a format node" in lines[0], r.stderr
        assert leftovers(d) == []
    finally:
        w.stop()


def test_bad_command_lines_exit_1_with_one_line(tmp_path):
    bexd = daemon_binary("bexd")
    for args in [["--live", "-o", "x"], ["--uri", "nbd://h/e", "-o", "x", "--incremental"],
                 ["--live", "--qmp", "q", "--node", "n", "--nbd", "host", "-o", "x"],
                 ["--live", "--qmp", "q", "--node", "n", "--nbd", "a:1", "-o", "x",
                  "--start-nbd-server", "--tls-psk", "d"]]:
        r = subprocess.run(bexd + ["backup", *args], capture_output=True, text=True)
        assert r.returncode == 1, args
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("bexd backup: "), r.stderr


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_kill_9_of_the_tool_then_a_second_run_cleans_up(start, tmp_path, fmt):
    """The tool killed mid-backup leaves its nodes, export and bitmap; the next run removes
    them, gives a correct incremental (b kept every bit), and leaves nothing behind."""
    img, prefilled = make_primary(tmp_path, fmt)
    d = start(blockdevs(img, fmt), [EXPORT])
    w = Writer(d.uri("disk"), prefilled)
    try:
        w.wait_for(100)
        full = tmp_path / "full.raw"
        live(d, full, "--bitmap", "b")
        w.wait_for(100)
        p = start_live(d, tmp_path / "killed.raw", "--bitmap", "b", "--incremental",
                       "--base", str(full))
        p.send_signal(signal.SIGKILL)
        p.wait()
        left = leftovers(d)
        assert "bexd-backup-cbw" in left and "bexd-backup" in left \
            and "bexd-backup-next-b" in left, left
        assert not bitmap(d, "b")["recording"]
        w.wait_for(100)
        inc = tmp_path / "inc.raw"
        r = live(d, inc, "--bitmap", "b", "--incremental", "--base", str(full))
        assert "removed what an earlier live backup left behind" in r.stderr
        check_point_in_time(w, inc, tmp_path)
        assert leftovers(d) == []
        assert bitmap(d, "b")["recording"]
        assert file_child(d) == {"f0": "file", "disk0": fmt}
    finally:
        w.stop()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_kill_9_of_the_daemon_leaves_the_image_consistent(start, tmp_path, fmt, kind):
    """The daemon killed during a live backup: the tool fails, the primary image passes
    qemu-img check, and after a restart a live backup works again."""
    img, prefilled = make_primary(tmp_path, fmt)
    # Not through `start`, which wants a clean exit.
    d = Daemon(tmp_path, kind, blockdevs(img, fmt), [EXPORT])
    w = Writer(d.uri("disk"), prefilled)
    w.wait_for(100)
    live(d, tmp_path / "full.raw", "--bitmap", "b")
    w.wait_for(100)
    p = start_live(d, tmp_path / "inc.raw", "--bitmap", "b", "--incremental",
                   "--base", str(tmp_path / "full.raw"))
    d.proc.kill()
    d.proc.wait()
    assert p.wait(60) == 1
    w.stop(expect_error=True)
    if fmt == "qcow2":
        r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
        # 0: clean; 3: only leaked clusters, which a crash may leave and are no corruption.
        assert r.returncode in (0, 3), r.stdout + r.stderr
    else:
        # What the writer had acknowledged is there (raw has no cache to lose).
        with open(img, "rb") as f:
            for gen, blk in w.log[-20:]:
                f.seek(blk * BLOCK)
                last = max(g for g, b in w.log if b == blk)
                assert f.read(16) in (struct.pack("<QQ", last, blk),
                                      struct.pack("<QQ", last + 1, blk))
    d.stderr.close()
    d2 = start(blockdevs(img, fmt), [EXPORT])
    w2 = Writer(d2.uri("disk"), set())
    try:
        w2.wait_for(50)
        out = tmp_path / "after.raw"
        live(d2, out, "--bitmap", "b")
        assert leftovers(d2) == []
        assert bitmap(d2, "b")["recording"]
    finally:
        w2.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    need("openssl")
    root = tmp_path_factory.mktemp("pki")
    dirs = make_pki(root)
    dirs.update({f"psk-{k}": v for k, v in make_psk(root).items()})
    return dirs


@pytest.mark.parametrize("creds", ["x509", "psk"])
def test_tls(start, tmp_path, pki, creds):
    """The NBD server requires TLS: the tool pulls with x509 (a client certificate) or a PSK
    user's key, over TCP; without credentials it fails and cleans up after itself."""
    img, prefilled = make_primary(tmp_path, "qcow2")
    if creds == "x509":
        obj = f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server"
        tls = ["--tls-x509", str(pki["one"])]
    else:
        obj = f"tls-creds-psk,id=tls0,dir={pki['psk-server']},endpoint=server"
        tls = ["--tls-psk", str(pki["psk-alice"]), "--tls-username", "alice"]
    d = start(blockdevs(img, "qcow2"), [EXPORT], server_extra=",tls-creds=tls0", tcp=True,
              objects=[obj])
    r = live(d, tmp_path / "plain.raw", check=False)
    assert r.returncode == 1 and "TLS" in r.stderr, r.stderr
    assert leftovers(d) == []
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    if creds == "x509":
        h.set_tls_certificates(str(pki["one"]))
    else:
        h.set_tls_username("alice")
        h.set_tls_psk_file(str(pki["psk-alice"] / "keys.psk"))
    h.set_export_name("disk")
    h.connect_tcp("127.0.0.1", str(d.port))
    w = Writer(None, prefilled, handle=h)
    try:
        w.wait_for(100)
        out = tmp_path / "tls.raw"
        live(d, out, tls=tls)
        check_point_in_time(w, out, tmp_path)
        assert leftovers(d) == []
    finally:
        w.stop()
