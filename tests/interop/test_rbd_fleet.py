"""Fleet operation over one Ceph cluster (docs/ceph.md, "Fleet"): two daemons export images
of the same cluster; an export moves from one daemon to the other and its client reads, after
reconnecting, what it wrote before the move; `bexd backup` copies an rbd-backed export."""

import asyncio
import json
import os
import subprocess
import uuid

import nbd

from conftest import Daemon, daemon_binary, qmp_outcome

MiB = 1 << 20


def image_name():
    return f"img-{uuid.uuid4().hex[:8]}"


def qmp(d, command, arguments=None):
    return asyncio.run(qmp_outcome(d.qmp_sock, command, arguments or {}))


def lockers(cluster, img):
    held = json.loads(cluster.rbd("lock", "ls", "--format", "json", f"{cluster.pool}/{img}"))
    return [h["address"] for h in held]


def rbd_node(cluster, img, node):
    return {"driver": "rbd", "node-name": node, "pool": cluster.pool, "image": img,
            "conf": cluster.conf, "user": cluster.user}


def test_an_export_moves_to_another_daemon(ceph_cluster, tmp_path, kind):
    """Daemons A and B serve one image each. The export of A's image moves to B: A stops
    (its exclusive lock goes with it), B opens the image with blockdev-add and exports it,
    B's first write takes the lock, and the client reconnecting to B reads what it wrote
    through A."""
    pool = ceph_cluster.pool
    moved, other = image_name(), image_name()
    for img in (moved, other):
        ceph_cluster.rbd("create", "--size", "16M", f"{pool}/{img}")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Daemon(tmp_path / "a", kind, [ceph_cluster.blockdev(moved, "m")],
               ["type=nbd,id=e-m,node-name=m,name=vol,writable=on"])
    b = Daemon(tmp_path / "b", kind, [ceph_cluster.blockdev(other, "o")],
               ["type=nbd,id=e-o,node-name=o,name=other,writable=on"])
    try:
        before = os.urandom(2 * MiB)
        h = nbd.NBD()
        h.connect_uri(a.uri("vol"))
        h.pwrite(before, 3 * MiB)
        h.flush()
        h.shutdown()
        o = nbd.NBD()
        o.connect_uri(b.uri("other"))
        o.pwrite(b"o" * 4096, 0)
        o.flush()
        held_by_a = lockers(ceph_cluster, moved)
        assert len(held_by_a) == 1

        # The move: stop on A, start on B.
        assert a.stop() == 0
        assert lockers(ceph_cluster, moved) == []
        assert qmp(b, "blockdev-add", rbd_node(ceph_cluster, moved, "m")) == ("ok", {})
        assert qmp(b, "block-export-add", {"type": "nbd", "id": "e-m", "node-name": "m",
                                           "name": "vol", "writable": True}) == ("ok", {})
        h = nbd.NBD()
        h.connect_uri(b.uri("vol"))
        assert h.pread(len(before), 3 * MiB) == before
        after = os.urandom(4096)
        h.pwrite(after, 0)
        h.flush()
        held_by_b = lockers(ceph_cluster, moved)
        assert len(held_by_b) == 1 and held_by_b != held_by_a
        h.shutdown()
        # B's own export went on serving throughout.
        assert o.pread(4096, 0) == b"o" * 4096
        o.shutdown()
    finally:
        a.stop()
        assert b.stop() == 0
    image = ceph_cluster.rbd("export", "--no-progress", f"{pool}/{moved}", "-")
    assert image[:4096] == after and image[3 * MiB:5 * MiB] == before
    assert lockers(ceph_cluster, moved) == []


def test_bexd_backup_of_an_rbd_export(ceph_cluster, tmp_path):
    """bexd backup copies an rbd-backed export (reading only the data extents librbd's
    object map reports), and the copy is the image `rbd export` reads."""
    pool = ceph_cluster.pool
    img = image_name()
    ceph_cluster.rbd("create", "--size", "32M", f"{pool}/{img}")
    d = Daemon(tmp_path, "bexd", [ceph_cluster.blockdev(img)],
               ["type=nbd,id=e,node-name=rbd0,name=disk,writable=on"])
    try:
        h = nbd.NBD()
        h.connect_uri(d.uri("disk"))
        for offset in (0, 9 * MiB, 30 * MiB):
            h.pwrite(os.urandom(MiB), offset)
        h.flush()
        h.shutdown()
        out = tmp_path / "full.raw"
        r = subprocess.run(daemon_binary("bexd") + ["backup", "--uri", d.uri("disk"),
                                                    "--output", str(out), "--verify"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    finally:
        assert d.stop() == 0
    assert out.read_bytes() == ceph_cluster.rbd("export", "--no-progress", f"{pool}/{img}", "-")
    # Only the three written objects were copied: the rest of the backup is a hole.
    assert os.stat(out).st_blocks * 512 <= 12 * MiB
