"""qcow2 images through NBD: what qemu-img makes reads back byte for byte,
what bexd writes passes `qemu-img check` and equals a raw image that got the
same writes, backing chains fall through, and kill -9 at random moments
never corrupts the image or loses a write acknowledged after FLUSH or FUA."""

import asyncio
import json
import os
import random
import signal
import struct
import subprocess
import threading
import time

import nbd
import pytest
from qemu.qmp import QMPClient

from conftest import Daemon, daemon_binary, need

MIB = 1 << 20
KIB = 1 << 10


def run(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=300)


def create(tmp_path, name, opts="", size="16M", backing=None):
    path = tmp_path / name
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing:
        args += ["-b", str(backing[0]), "-F", backing[1]]
    run(*args, str(path), size)
    return path


def qemu_io(path, *cmds):
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    run(*args, str(path))


def to_raw(path, out, fmt="qcow2"):
    run("qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(out))
    return out.read_bytes()


def check(path):
    """qemu-img check: corruption fails the test, leaks are allowed (exit 3)."""
    r = run("qemu-img", "check", "--output=json", str(path), check=False)
    assert r.returncode in (0, 3), f"qemu-img check: {r.returncode} {r.stdout} {r.stderr}"
    report = json.loads(r.stdout)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report
    return report


def qcow2_node(path, node="q0", extra=""):
    return f"driver=qcow2,node-name={node},file.driver=file,file.filename={path}{extra}"


def export(node="q0", writable=True, name="disk"):
    return f"type=nbd,id=exp-{node},node-name={node},name={name},writable={'on' if writable else 'off'}"


def nbd_bytes(d, tmp_path, name="disk"):
    out = tmp_path / "from-nbd.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", d.uri(name), str(out))
    return out.read_bytes()


FILL = [
    "write -P 0x11 0 4k",
    "write -P 0x22 65000 70000",
    "write -z 300k 64k",
    "write -P 0x33 1M 1536k",
    "write -z -u 1280k 64k",
    "write -P 0x44 4M 8M",
    "write -z 6M 1M",
    "write -P 0x55 16776704 512",
]

OPTIONS = [
    "compat=0.10",
    "compat=1.1",
    "cluster_size=512",
    "cluster_size=4k",
    "cluster_size=2M",
    "refcount_bits=1",
    "refcount_bits=2",
    "refcount_bits=4",
    "refcount_bits=8",
    "refcount_bits=32",
    "refcount_bits=64",
    "extended_l2=on",
    "extended_l2=on,cluster_size=16k",
    "compression_type=zstd",
    "lazy_refcounts=on",
]


@pytest.mark.parametrize("opts", OPTIONS)
def test_images_qemu_img_makes_read_back_byte_for_byte(start, tmp_path, opts):
    img = create(tmp_path, "a.qcow2", opts)
    qemu_io(img, *FILL)
    want = to_raw(img, tmp_path / "want.raw")
    d = start([qcow2_node(img, extra=",read-only=on")], [export(writable=False)])
    assert nbd_bytes(d, tmp_path) == want


@pytest.mark.parametrize("opts", ["compat=0.10", "compat=1.1", "extended_l2=on",
                                  "cluster_size=512"])
def test_block_status_map_equals_qsd(start, tmp_path, opts):
    img = create(tmp_path, "m.qcow2", opts)
    qemu_io(img, *FILL)
    maps = []
    for which in ("bexd", "qsd"):
        d = start([qcow2_node(img, extra=",read-only=on")], [export(writable=False)], which=which)
        maps.append(run("nbdinfo", "--map", d.uri("disk")).stdout)
        assert d.stop() == 0
    assert maps[0] == maps[1]


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_images_read_back(start, tmp_path, ctype):
    src = create(tmp_path, "src.qcow2")
    qemu_io(src, *FILL)
    dst = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}",
        str(src), str(dst))
    d = start([qcow2_node(dst)], [export()])
    assert nbd_bytes(d, tmp_path) == to_raw(src, tmp_path / "want.raw")
    h = nbd.NBD()
    h.connect_uri(d.uri("disk"))
    h.pwrite(b"\x99" * 1000, 1 * MIB + 100)  # rewrite inside a compressed cluster
    assert h.pread(3000, 1 * MIB - 1000)[1100:2100] == b"\x99" * 1000
    h.shutdown()
    d.stop()
    check(dst)


def test_snapshot_clusters_are_copied_on_write(start, tmp_path):
    img = create(tmp_path, "s.qcow2")
    qemu_io(img, *FILL)
    run("qemu-img", "snapshot", "-c", "snap1", str(img))
    before = to_raw(img, tmp_path / "before.raw")
    d = start([qcow2_node(img)], [export()])
    h = nbd.NBD()
    h.connect_uri(d.uri("disk"))
    h.pwrite(b"\xee" * 200 * KIB, 1 * MIB + 1000)
    h.zero(64 * KIB, 0)
    h.flush()
    h.shutdown()
    d.stop()
    check(img)
    snap = tmp_path / "snap.raw"
    run("qemu-img", "convert", "-l", "snap1", "-O", "raw", str(img), str(snap))
    assert snap.read_bytes() == before
    now = bytearray(before)
    now[1 * MIB + 1000:1 * MIB + 1000 + 200 * KIB] = b"\xee" * 200 * KIB
    now[0:64 * KIB] = bytes(64 * KIB)
    assert to_raw(img, tmp_path / "now.raw") == bytes(now)


def test_keyval_empty_backing_means_no_backing_file(start, tmp_path):
    base = create(tmp_path, "b.qcow2", size="1M")
    qemu_io(base, "write -P 0x61 0 1M")
    top = create(tmp_path, "t.qcow2", size="1M", backing=(base.name, "qcow2"))
    d = start([qcow2_node(top, extra=",backing=")], [export()])
    h = nbd.NBD()
    h.connect_uri(d.uri("disk"))
    assert h.pread(4096, 0) == bytes(4096)


def test_unknown_incompatible_feature_is_refused_with_a_clear_error(tmp_path):
    img = create(tmp_path, "x.qcow2", size="1M")
    data = bytearray(img.read_bytes())
    data[72:80] = (1 << 40).to_bytes(8, "big")
    img.write_bytes(bytes(data))
    r = subprocess.run(daemon_binary("bexd") + ["--blockdev", qcow2_node(img)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0
    assert "Unsupported qcow2 feature" in r.stderr


class Writer:
    """Random writes on one connection into blocks it alone owns (block % n == k),
    with a model of what was written and of what a FLUSH or FUA made durable."""

    def __init__(self, uri, k, n, blocks, bs, seed):
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.k, self.n, self.blocks, self.bs = k, n, blocks, bs
        self.rng = random.Random(seed)
        self.model = {}      # block -> bytes last written (acknowledged)
        self.durable = {}    # block -> bytes known durable
        self.since_flush = set()
        self.seq = 0

    def data(self, block):
        self.seq += 1
        return struct.pack(">QQ", block, self.seq) * (self.bs // 16)

    def step(self):
        block = self.rng.randrange(self.k, self.blocks, self.n)
        op = self.rng.random()
        if op < 0.08:
            self.since_flush.add(block)
            self.h.zero(self.bs, block * self.bs)
            self.model[block] = bytes(self.bs)
        elif op < 0.12:
            self.h.flush()
            for b in self.since_flush:
                self.durable[b] = self.model[b]
            self.since_flush.clear()
        else:
            fua = op > 0.95
            data = self.data(block)
            self.since_flush.add(block)
            self.h.pwrite(data, block * self.bs, nbd.CMD_FLAG_FUA if fua else 0)
            self.model[block] = data
            if fua:
                self.durable[block] = data
                self.since_flush.discard(block)


def run_writers(writers, count):
    errors = []

    def go(w):
        try:
            for _ in range(count):
                w.step()
        except nbd.Error as e:
            errors.append(e)

    threads = [threading.Thread(target=go, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    return threads, errors


def test_concurrent_random_writes_check_clean_and_equal_raw(start, tmp_path):
    img = create(tmp_path, "w.qcow2", size="32M")
    qemu_io(img, "write -P 0x42 0 32M")
    bs, blocks = 4 * KIB, 8192
    d = start([qcow2_node(img)], [export()])
    writers = [Writer(d.uri("disk"), k, 4, blocks, bs, k) for k in range(4)]
    threads, errors = run_writers(writers, 1500)
    for t in threads:
        t.join()
    assert not errors
    for w in writers:
        w.h.flush()
        w.h.shutdown()
    assert d.stop() == 0
    check(img)
    raw = bytearray(b"\x42" * (32 * MIB))
    for w in writers:
        for b, data in w.model.items():
            raw[b * bs:(b + 1) * bs] = data
    ref = tmp_path / "ref.raw"
    ref.write_bytes(bytes(raw))
    assert run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(img), str(ref),
               check=False).returncode == 0


def test_fio_verified_random_writes_then_check(start, tmp_path):
    need("fio")
    img = create(tmp_path, "f.qcow2", size="64M")
    d = start([qcow2_node(img)], [export()])
    r = run("fio", "--name=q", "--ioengine=nbd", f"--uri={d.uri('disk')}", "--rw=randwrite",
            "--bsrange=512-128k", "--size=64M", "--iodepth=16", "--numjobs=1",
            "--verify=crc32c", "--do_verify=1", "--io_size=32M", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert d.stop() == 0
    check(img)


def test_three_layer_chain_reads_writes_and_block_status(start, tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x01" * (4 * MIB) + bytes(12 * MIB))
    mid = create(tmp_path, "mid.qcow2", backing=(base.name, "raw"))
    qemu_io(mid, "write -P 0x02 2M 2M", "write -z 3M 64k")
    top = create(tmp_path, "top.qcow2", backing=(mid.name, "qcow2"))
    qemu_io(top, "write -P 0x03 3M 1M")
    d = start([qcow2_node(top)], [export()])
    assert nbd_bytes(d, tmp_path) == to_raw(top, tmp_path / "want.raw")
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(d.uri("disk"))
    h.pwrite(b"\x04" * 5000, 1 * MIB - 100)
    h.pwrite(b"\x05" * 100, 10 * MIB + 7)
    h.flush()
    h.shutdown()
    ours = run("nbdinfo", "--map", d.uri("disk")).stdout
    assert d.stop() == 0
    check(top)
    want = bytearray(to_raw(top, tmp_path / "now.raw"))
    assert want[1 * MIB - 100:1 * MIB + 4900] == b"\x04" * 5000
    assert want[10 * MIB + 7:10 * MIB + 107] == b"\x05" * 100
    assert to_raw(mid, tmp_path / "mid.raw")[1 * MIB - 100:1 * MIB] == b"\x01" * 100
    q = start([qcow2_node(top)], [export()], which="qsd")
    theirs = run("nbdinfo", "--map", q.uri("disk")).stdout
    assert ours == theirs


def test_blockdev_add_with_backing_null_and_named_backing(start, tmp_path):
    base = create(tmp_path, "b.qcow2", size="1M")
    qemu_io(base, "write -P 0x61 0 1M")
    top = create(tmp_path, "t.qcow2", size="1M", backing=(base.name, "qcow2"))
    d = start([], [])

    async def body(q):
        await q.execute("blockdev-add", {"driver": "qcow2", "node-name": "nob",
                                         "read-only": True, "backing": None,
                                         "file": {"driver": "file", "filename": str(top)}})
        await q.execute("blockdev-add", {"driver": "qcow2", "node-name": "base",
                                         "read-only": True,
                                         "file": {"driver": "file", "filename": str(base)}})
        await q.execute("blockdev-add", {"driver": "qcow2", "node-name": "top2",
                                         "read-only": True, "backing": "base",
                                         "l2-cache-size": 1 << 20, "cache-clean-interval": 30,
                                         "file": {"driver": "file", "filename": str(top)}})
        for n in ("nob", "top2"):
            await q.execute("block-export-add", {"type": "nbd", "id": n, "node-name": n,
                                                 "name": n})
        return await q.execute("query-named-block-nodes")

    async def main():
        c = QMPClient("t")
        await c.connect(str(d.qmp_sock))
        try:
            return await body(c)
        finally:
            await c.disconnect()

    nodes = {n["node-name"]: n for n in asyncio.run(main())}
    assert nodes["top2"]["drv"] == "qcow2"
    assert nodes["top2"]["backing_file_depth"] == 1
    assert nodes["top2"]["image"]["format-specific"]["data"]["compat"] == "1.1"
    assert nodes["top2"]["image"]["backing-image"]["filename"] == str(base)
    assert nodes["nob"]["backing_file_depth"] == 0
    h = nbd.NBD()
    h.connect_uri(d.uri("nob"))
    assert h.pread(512, 0) == bytes(512)
    h2 = nbd.NBD()
    h2.connect_uri(d.uri("top2"))
    assert h2.pread(512, 0) == b"\x61" * 512


def kill_image(tmp_path, layout):
    """The image a kill test writes to: fresh, over a filled backing file, or with a snapshot."""
    if layout == "backing":
        base = create(tmp_path, "base.qcow2", size="64M")
        qemu_io(base, "write -P 0x5a 0 64M")
        return create(tmp_path, "k.qcow2", size="64M", backing=(base.name, "qcow2"))
    img = create(tmp_path, "k.qcow2", size="64M", opts=layout if "=" in layout else "")
    if layout == "snapshot":
        qemu_io(img, "write -P 0x6b 0 64M")
        run("qemu-img", "snapshot", "-c", "s1", str(img))
    return img


@pytest.mark.parametrize("layout", ["cluster_size=64k", "cluster_size=4k,refcount_bits=2",
                                    "extended_l2=on", "backing", "snapshot",
                                    "cluster_size=512 tiny-cache"])
def test_kill_9_during_writes_never_corrupts_or_loses_flushed_data(tmp_path, layout):
    # tiny-cache: two-table caches, so dirty L2 tables are evicted (and everything flushed) often.
    extra = ",l2-cache-size=1024,refcount-cache-size=1024" if "tiny-cache" in layout else ""
    layout = layout.replace(" tiny-cache", "")
    img = kill_image(tmp_path, layout)
    bs, blocks, n = 4 * KIB, 16384, 4
    initial = to_raw(img, tmp_path / "k.raw")
    durable = {b: initial[b * bs:(b + 1) * bs] for b in range(blocks)}
    rng = random.Random(1234)
    rounds = int(os.environ.get("KILL_ROUNDS", "12"))
    writes = leaks = checked = 0
    for rnd in range(rounds):
        d = Daemon(tmp_path, "bexd", [qcow2_node(img, extra=extra)], [export()])
        writers = [Writer(d.uri("disk"), k, n, blocks, bs, rnd * 10 + k) for k in range(n)]
        threads, _ = run_writers(writers, 100000)
        time.sleep(rng.uniform(0.05, 0.8))
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        d.stderr.close()
        for t in threads:
            t.join()
        # Blocks written since their last flush may hold the old or a new value.
        for w in writers:
            for b in w.since_flush:
                durable.pop(b, None)
            durable.update({b: v for b, v in w.durable.items() if b not in w.since_flush})
        writes += sum(w.seq for w in writers)
        leaks += check(img).get("leaks", 0)
        raw = to_raw(img, tmp_path / "k.raw")
        checked += len(durable)
        lost = [b for b, v in durable.items() if raw[b * bs:(b + 1) * bs] != v]
        assert not lost, f"round {rnd}: {len(lost)} flushed blocks lost, e.g. {lost[:5]}"
        # Re-learn what the image holds now, for blocks the next round may leave alone.
        for b in range(blocks):
            durable[b] = raw[b * bs:(b + 1) * bs]
    print(f"kill -9 {layout}: {rounds} rounds, {writes} writes, {checked} durable blocks "
          f"checked, {leaks} leaked clusters, no corruption")
    assert writes > rounds * 10


def test_allocation_depth_on_a_three_layer_chain_equals_qsd(start, tmp_path):
    """qemu:allocation-depth: 0 where no layer has data, 1 for the top, 2 and
    3 for the backing layers; raw files below report depth 1 everywhere."""
    base = create(tmp_path, "base.qcow2")
    qemu_io(base, "write -P 0x01 0 1M", "write -P 0x01 8M 64k")
    mid = create(tmp_path, "mid.qcow2", backing=(base.name, "qcow2"))
    qemu_io(mid, "write -P 0x02 512k 1M", "write -z 4M 64k")
    top = create(tmp_path, "top.qcow2", backing=(mid.name, "qcow2"))
    qemu_io(top, "write -P 0x03 768k 64k", "write -P 0x03 12M 4k")
    maps = []
    for which in ("bexd", "qsd"):
        d = start([qcow2_node(top, extra=",read-only=on")],
                  [export(writable=False) + ",allocation-depth=on"], which=which)
        maps.append(run("nbdinfo", "--map=qemu:allocation-depth", d.uri("disk")).stdout)
        assert d.stop() == 0
    assert maps[0] == maps[1]
    depths = {line.split()[2] for line in maps[0].splitlines()}
    assert {"0", "1", "2", "3"} <= depths, maps[0]
