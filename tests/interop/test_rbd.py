"""driver=rbd against the one-node Ceph cluster (scripts/ceph-cluster.sh): what Ceph's own
tools wrote is read back through the daemon's NBD export, what the daemon wrote is read back
with `rbd export`, holes show as holes, flushed writes survive kill -9, open errors are
QEMU's, and raw and qcow2 layer over rbd. Tests that ask for `kind` hold qemu-storage-daemon
to the same expectations in the DAEMON=qsd run."""

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import uuid

import nbd
import pytest

from conftest import Daemon, daemon_binary, need, qmp_outcome

MiB = 1 << 20


def image_name():
    return f"img-{uuid.uuid4().hex[:8]}"


def qmp(d, command, arguments=None):
    return asyncio.run(qmp_outcome(d.qmp_sock, command, arguments or {}))


def export(node="rbd0", name="disk", writable=True):
    return f"type=nbd,id=e-{node},node-name={node},name={name},writable={'on' if writable else 'off'}"


def nbd_map(uri):
    """nbdinfo --map as [(offset, length, description)]."""
    out = subprocess.run(["nbdinfo", "--map", uri], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    rows = []
    for line in out.splitlines():
        offset, length, _, what = line.split(None, 3)
        rows.append((int(offset), int(length), what.strip()))
    return rows


def qemu_img_read(uri, tmp_path):
    out = tmp_path / f"read-{uuid.uuid4().hex[:6]}.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)],
                   check=True, timeout=120)
    return out.read_bytes()


def mon_v1_port(cluster):
    conf = open(cluster.conf).read()
    return int(re.search(r"v1:127\.0\.0\.1:(\d+)", conf).group(1))


def user_key(cluster):
    text = open(cluster.keyring).read()
    return re.search(r"key\s*=\s*(\S+)", text).group(1)


@pytest.fixture
def tools():
    for t in ("qemu-img", "qemu-io", "nbdinfo"):
        need(t)


def test_reads_what_rbd_import_and_rbd_bench_wrote(ceph_cluster, start, tmp_path, tools):
    """Data written with Ceph's tools is what qemu-img and nbdinfo see through the export."""
    pool = ceph_cluster.pool
    data = os.urandom(5 * MiB + 4096)
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    imported = image_name()
    ceph_cluster.rbd("import", "--no-progress", str(src), f"{pool}/{imported}")
    benched = image_name()
    ceph_cluster.rbd("create", "--size", "16M", f"{pool}/{benched}")
    ceph_cluster.rbd("bench", "--io-type", "write", "--io-size", "64K", "--io-total", "16M",
                     "--io-pattern", "seq", "--io-threads", "4", f"{pool}/{benched}")
    bench_data = ceph_cluster.rbd("export", "--no-progress", f"{pool}/{benched}", "-")

    d = start([ceph_cluster.blockdev(imported, "r0"), ceph_cluster.blockdev(benched, "r1")],
              [export("r0", "imported", False), export("r1", "benched", False)])
    info = json.loads(subprocess.run(["nbdinfo", "--json", d.uri("imported")],
                                     capture_output=True, check=True, timeout=30).stdout)
    assert info["exports"][0]["export-size"] == len(data)
    assert qemu_img_read(d.uri("imported"), tmp_path) == data
    assert qemu_img_read(d.uri("benched"), tmp_path) == bench_data
    # rbd bench wrote every byte of the image: one data extent, no hole.
    assert nbd_map(d.uri("benched")) == [(0, 16 * MiB, "data")]


def test_writes_land_in_the_image_for_rbd_export(ceph_cluster, start, tmp_path):
    """Writes, write-zeroes and FUA writes through NBD are in the image that `rbd export`
    reads once the daemon has stopped."""
    pool = ceph_cluster.pool
    img = image_name()
    base = os.urandom(4 * MiB)
    src = tmp_path / "src.raw"
    src.write_bytes(base)
    ceph_cluster.rbd("import", "--no-progress", str(src), f"{pool}/{img}")
    want = bytearray(base)

    d = start([ceph_cluster.blockdev(img) + ",discard=unmap"], [export()])
    h = nbd.NBD()
    h.connect_uri(d.uri("disk"))
    pieces = [(0, os.urandom(4096)), (MiB - 100, os.urandom(300)), (2 * MiB, os.urandom(MiB)),
              (4 * MiB - 512, os.urandom(512))]
    for offset, payload in pieces:
        h.pwrite(payload, offset)
        want[offset:offset + len(payload)] = payload
    fua = os.urandom(65536)
    h.pwrite(fua, 3 * MiB + 4096, nbd.CMD_FLAG_FUA)
    want[3 * MiB + 4096:3 * MiB + 4096 + len(fua)] = fua
    h.zero(128 * 1024, 512 * 1024)
    want[512 * 1024:640 * 1024] = bytes(128 * 1024)
    h.flush()
    for offset, payload in pieces:
        assert h.pread(len(payload), offset) == payload
    assert h.pread(128 * 1024, 512 * 1024) == bytes(128 * 1024)
    h.shutdown()
    assert d.stop() == 0
    assert ceph_cluster.rbd("export", "--no-progress", f"{pool}/{img}", "-") == bytes(want)


def test_sparse_image_shows_its_holes(ceph_cluster, start, tools):
    """nbdinfo --map and qemu-img map see the objects Ceph never wrote as holes reading
    zeroes (from librbd's object map, per 4 MiB object, as QEMU reports them)."""
    pool = ceph_cluster.pool
    img = image_name()
    ceph_cluster.rbd("create", "--size", "64M", f"{pool}/{img}")
    ceph_cluster.rbd("bench", "--io-type", "write", "--io-size", "4K", "--io-total", "4K",
                     "--io-threads", "1", "--io-pattern", "seq", f"{pool}/{img}")
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 7 40M 4k",
                    ceph_cluster.qemu_filename(img)], check=True, capture_output=True,
                   timeout=60)

    d = start([ceph_cluster.blockdev(img)], [export(writable=False)])
    assert nbd_map(d.uri("disk")) == [
        (0, 4 * MiB, "data"),
        (4 * MiB, 36 * MiB, "hole,zero"),
        (40 * MiB, 4 * MiB, "data"),
        (44 * MiB, 20 * MiB, "hole,zero"),
    ]
    extents = json.loads(subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "raw", d.uri("disk")],
        capture_output=True, check=True, timeout=60).stdout)
    assert [(e["start"], e["length"], e["data"], e["zero"]) for e in extents] == [
        (0, 4 * MiB, True, False), (4 * MiB, 36 * MiB, False, True),
        (40 * MiB, 4 * MiB, True, False), (44 * MiB, 20 * MiB, False, True)]
    h = nbd.NBD()
    h.connect_uri(d.uri("disk"))
    assert h.pread(4096, 40 * MiB) == b"\x07" * 4096
    assert h.pread(MiB, 8 * MiB) == bytes(MiB)
    h.shutdown()


def test_flushed_writes_survive_kill_9(ceph_cluster, tmp_path, kind):
    """Every write acknowledged before a flush's reply is in the image after SIGKILL."""
    pool = ceph_cluster.pool
    img = image_name()
    ceph_cluster.rbd("create", "--size", "32M", f"{pool}/{img}")
    d = Daemon(tmp_path, kind, [ceph_cluster.blockdev(img)], [export()])
    h = nbd.NBD()
    h.connect_uri(d.uri("disk"))
    flushed = {}
    for i in range(64):
        payload = os.urandom(65536)
        offset = (i * 7 % 64) * 512 * 1024
        h.pwrite(payload, offset)
        flushed[offset] = payload
        if i % 8 == 7:
            h.flush()
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(timeout=20)
    d.stderr.close()
    image = ceph_cluster.rbd("export", "--no-progress", f"{pool}/{img}", "-")
    for offset, payload in flushed.items():
        assert image[offset:offset + len(payload)] == payload, f"lost write at {offset}"


def test_missing_pool_and_image_are_qemu_errors(ceph_cluster, start):
    """blockdev-add of a missing pool or image fails with QEMU's class and message, and
    the monitor answers the next command."""
    d = start([], [])
    base = {"driver": "rbd", "conf": ceph_cluster.conf, "user": ceph_cluster.user}
    assert qmp(d, "blockdev-add", {**base, "node-name": "p", "pool": "nopool",
                                   "image": "x"}) == (
        "GenericError", "error opening pool nopool: No such file or directory")
    assert qmp(d, "blockdev-add", {**base, "node-name": "i", "pool": ceph_cluster.pool,
                                   "image": "noimage"}) == (
        "GenericError", "error reading header from noimage: No such file or directory")
    assert qmp(d, "blockdev-add", {**base, "node-name": "n", "pool": ceph_cluster.pool,
                                   "namespace": "nons", "image": "x"}) == (
        "GenericError", "namespace 'nons' does not exist")
    assert qmp(d, "query-version")[0] == "ok"


@pytest.mark.bexd_only("qemu-storage-daemon waits librados's 300 s and its monitor with it")
def test_wrong_key_and_dead_monitor_fail_in_bounded_time(ceph_cluster, start, tmp_path,
                                                         image):
    """A wrong cephx key and a monitor nobody listens on fail blockdev-add with QEMU's
    error after librados's (bexd-bounded) timeout; meanwhile an export of the same daemon
    keeps serving, and the monitor answers afterwards."""
    img = image(8 * MiB, [(0, b"\x5a" * 4096)])
    d = start([f"driver=file,node-name=f0,filename={img}"], [export("f0", "file")],
              objects=[f"secret,id=bad,format=base64,data={wrong_key()}"])
    h = nbd.NBD()
    h.connect_uri(d.uri("file"))
    good = {"driver": "rbd", "conf": "/dev/null", "user": ceph_cluster.user,
            "pool": ceph_cluster.pool, "image": "x"}
    cases = [
        ("k", {"key-secret": "bad",
               "server": [{"host": "127.0.0.1", "port": str(mon_v1_port(ceph_cluster))}]}),
        ("m", {"key-secret": "bad", "server": [{"host": "127.0.0.1", "port": "1"}]}),
    ]
    for node, extra in cases:
        served = []

        async def add_while_reading():
            task = asyncio.create_task(qmp_outcome(d.qmp_sock, "blockdev-add",
                                                   {**good, "node-name": node, **extra}))
            while not task.done():
                # The daemon's other work goes on while librados waits.
                served.append(await asyncio.to_thread(h.pread, 4096, 0))
                await asyncio.sleep(0.5)
            return await task

        t0 = time.monotonic()
        outcome = asyncio.run(add_while_reading())
        assert outcome == ("GenericError", "error connecting: Connection timed out")
        assert time.monotonic() - t0 < 60
        assert len(served) >= 2 and all(b == b"\x5a" * 4096 for b in served)
        assert qmp(d, "query-version")[0] == "ok"
    h.shutdown()


def wrong_key():
    return subprocess.run(["ceph-authtool", "--gen-print-key"], capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip()


def test_key_secret_and_server_list_instead_of_a_config(ceph_cluster, start, tmp_path):
    """The key from a secret object (base64) and the monitors from `server`, with
    conf=/dev/null: no keyring, no config file."""
    pool = ceph_cluster.pool
    img = image_name()
    ceph_cluster.rbd("import", "--no-progress", "-", f"{pool}/{img}", input=b"\x42" * MiB)
    key_file = tmp_path / "key"
    key_file.write_text(user_key(ceph_cluster) + "\n")
    port = mon_v1_port(ceph_cluster)
    d = start([f"driver=rbd,node-name=rbd0,pool={pool},image={img},conf=/dev/null,"
               f"user={ceph_cluster.user},key-secret=k0,server.0.host=127.0.0.1,"
               f"server.0.port={port},auth-client-required.0=cephx"],
              [export(writable=False)],
              objects=[f"secret,id=k0,format=base64,file={key_file}"])
    h = nbd.NBD()
    h.connect_uri(d.uri("disk"))
    assert h.get_size() == MiB and h.pread(MiB, 0) == b"\x42" * MiB
    h.shutdown()
    # A secret that is not there is named.
    assert qmp(d, "blockdev-add", {"driver": "rbd", "node-name": "x", "pool": pool,
                                   "image": img, "key-secret": "nosuch"}) == (
        "GenericError", "No secret with id 'nosuch'")


def test_snapshot_is_read_only_and_frozen(ceph_cluster, start, tmp_path):
    """snapshot=SNAP reads the image as it was at the snapshot; without read-only it is
    refused with QEMU's message."""
    pool = ceph_cluster.pool
    img = image_name()
    ceph_cluster.rbd("import", "--no-progress", "-", f"{pool}/{img}", input=b"\x01" * MiB)
    ceph_cluster.rbd("snap", "create", f"{pool}/{img}@s1")
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 2 0 1M",
                    ceph_cluster.qemu_filename(img)], check=True, capture_output=True,
                   timeout=60)
    d = start([ceph_cluster.blockdev(img, "cur") + ",read-only=on",
               ceph_cluster.blockdev(img, "snap") + ",snapshot=s1,read-only=on"],
              [export("cur", "cur", False), export("snap", "snap", False)])
    for name, byte in (("cur", b"\x02"), ("snap", b"\x01")):
        h = nbd.NBD()
        h.connect_uri(d.uri(name))
        assert h.pread(MiB, 0) == byte * MiB
        h.shutdown()
    assert qmp(d, "blockdev-add", {"driver": "rbd", "node-name": "w", "pool": pool,
                                   "image": img, "snapshot": "s1", "conf": ceph_cluster.conf,
                                   "user": ceph_cluster.user}) == (
        "GenericError", "rbd snapshots are read-only")


@pytest.mark.bexd_only("bexd has no LUKS layer for rbd; QEMU's needs a LUKS-formatted image")
def test_encrypt_is_refused_by_name(ceph_cluster, start):
    d = start([], [])
    assert qmp(d, "blockdev-add", {"driver": "rbd", "node-name": "e", "pool": "rbd",
                                   "image": "x", "encrypt": {"format": "luks",
                                                             "key-secret": "s"}}) == (
        "GenericError",
        "Parameter 'encrypt': encrypted rbd images (librbd's LUKS) are not supported by bexd")


def test_two_daemons_on_one_image_hand_the_lock_over(ceph_cluster, tmp_path, kind):
    """Two daemons open one image writable: librbd's exclusive lock moves to whichever
    writes (cooperative hand-over), each write lands, and `rbd lock ls` names one owner."""
    pool = ceph_cluster.pool
    img = image_name()
    ceph_cluster.rbd("create", "--size", "8M", f"{pool}/{img}")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Daemon(tmp_path / "a", kind, [ceph_cluster.blockdev(img)], [export()])
    b = Daemon(tmp_path / "b", kind, [ceph_cluster.blockdev(img)], [export()])
    try:
        ha, hb = nbd.NBD(), nbd.NBD()
        ha.connect_uri(a.uri("disk"))
        hb.connect_uri(b.uri("disk"))
        ha.pwrite(b"A" * 4096, 0)
        ha.flush()
        hb.pwrite(b"B" * 4096, 4096)
        hb.flush()
        ha.pwrite(b"a" * 4096, 8192)
        ha.flush()
        held = json.loads(ceph_cluster.rbd("lock", "ls", "--format", "json", f"{pool}/{img}"))
        assert len(held) == 1
        ha.shutdown()
        hb.shutdown()
    finally:
        assert a.stop() == 0 and b.stop() == 0
    data = ceph_cluster.rbd("export", "--no-progress", f"{pool}/{img}", "-")
    assert data[:12288] == b"A" * 4096 + b"B" * 4096 + b"a" * 4096


def test_raw_and_qcow2_over_rbd(ceph_cluster, start, tmp_path, tools):
    """raw (with an offset window) and qcow2 layered over rbd nodes read and write; the
    qcow2 image in RBD is consistent for qemu-img check afterwards."""
    pool = ceph_cluster.pool
    raw_img, q_img = image_name(), image_name()
    ceph_cluster.rbd("import", "--no-progress", "-", f"{pool}/{raw_img}",
                     input=b"\x00" * MiB + b"\x33" * MiB)
    # qemu-img makes the RBD image, as small as the qcow2 metadata: the daemon's rbd node
    # grows it as qcow2 allocates clusters past its end.
    subprocess.run(["qemu-img", "create", "-f", "qcow2", ceph_cluster.qemu_filename(q_img),
                    "16M"], check=True, capture_output=True, timeout=60)
    d = start([ceph_cluster.blockdev(raw_img, "r0"), "driver=raw,node-name=w0,file=r0,"
               f"offset={MiB},size={MiB}", ceph_cluster.blockdev(q_img, "r1"),
               "driver=qcow2,node-name=q0,file=r1"],
              [export("w0", "window"), export("q0", "qcow2")])
    h = nbd.NBD()
    h.connect_uri(d.uri("window"))
    assert h.get_size() == MiB and h.pread(MiB, 0) == b"\x33" * MiB
    h.pwrite(b"\x44" * 4096, 0)
    h.flush()
    h.shutdown()
    q = nbd.NBD()
    q.connect_uri(d.uri("qcow2"))
    assert q.get_size() == 16 * MiB
    payload = os.urandom(MiB)
    q.pwrite(payload, 5 * MiB)
    q.flush()
    assert q.pread(MiB, 5 * MiB) == payload
    q.shutdown()
    assert d.stop() == 0
    raw = ceph_cluster.rbd("export", "--no-progress", f"{pool}/{raw_img}", "-")
    assert raw[MiB:MiB + 4096] == b"\x44" * 4096
    subprocess.run(["qemu-img", "check", "-f", "qcow2", ceph_cluster.qemu_filename(q_img)],
                   check=True, capture_output=True, timeout=60)
    out = tmp_path / "q.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                    ceph_cluster.qemu_filename(q_img), str(out)], check=True, timeout=60)
    assert out.read_bytes()[5 * MiB:6 * MiB] == payload


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__]))


@pytest.mark.bexd_only("bexd loads librbd when an rbd node is opened; QEMU's rbd module is a "
                       "separate package")
def test_without_librbd_only_rbd_nodes_fail_and_name_the_library(tmp_path):
    """librbd and librados are loaded when the first rbd node opens, not linked: in a mount
    namespace where librbd.so.1 is not a library, bexd still starts and serves a file, and
    driver=rbd fails with exit 1 and one line naming the library and its package."""
    rbd_lib = subprocess.run(["sh", "-c", "readlink -f $(ldconfig -p | awk '/librbd.so.1 / "
                              "{print $NF; exit}')"], capture_output=True, text=True,
                             check=True).stdout.strip()
    assert rbd_lib and os.path.exists(rbd_lib), "librbd1 is not installed"
    bexd = daemon_binary("bexd")[0]
    img = tmp_path / "f.raw"
    img.write_bytes(b"\xab" * MiB)
    sock = tmp_path / "nbd.sock"
    hidden = (f"mount --bind /dev/null {rbd_lib} && "
              "exec \"$@\"")

    def run_hidden(*args, timeout=20):
        return subprocess.run(["unshare", "--mount", "sh", "-c", hidden, "sh", bexd, *args],
                              capture_output=True, text=True, timeout=timeout)

    r = run_hidden("--blockdev", "driver=rbd,node-name=r,pool=p,image=i")
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "librbd.so.1" in lines[0] and "librbd1" in lines[0], r.stderr
    # The same namespace serves a file: nothing else needs Ceph's libraries.
    proc = subprocess.Popen(["unshare", "--mount", "sh", "-c", hidden, "sh", bexd,
                             "--blockdev", f"driver=file,node-name=f,filename={img}",
                             "--nbd-server", f"addr.type=unix,addr.path={sock}",
                             "--export", "type=nbd,id=e,node-name=f,name=disk"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///disk?socket={sock}")
        assert h.pread(4096, 0) == b"\xab" * 4096
        h.shutdown()
    finally:
        proc.terminate()
        proc.wait(10)
