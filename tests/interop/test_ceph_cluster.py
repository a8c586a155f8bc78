"""The one-node Ceph test cluster (scripts/ceph-cluster.sh) and the clients bexd's coming
driver=rbd will be measured against: the rbd tool, qemu-img's rbd driver, and
qemu-storage-daemon serving an rbd image over NBD (the parity peer)."""

import json
import os
import subprocess
import uuid

import nbd
import pytest

from conftest import CephCluster, Daemon, need

MiB = 1 << 20


def image_name():
    return f"img-{uuid.uuid4().hex[:8]}"


def locks(cluster, image):
    return json.loads(cluster.rbd("lock", "ls", "--format", "json", f"{cluster.pool}/{image}"))


def watchers(cluster, image):
    status = json.loads(cluster.rbd("status", "--format", "json", f"{cluster.pool}/{image}"))
    return status["watchers"]


def test_status_reports_every_daemon_and_health(ceph_cluster):
    out = ceph_cluster.script("status")
    for d in ("mon.a", "mgr.x", "osd.0"):
        assert f"{d} running" in out
    assert "HEALTH_OK" in out


def test_second_start_in_the_same_dir_refused(ceph_cluster):
    r = ceph_cluster.script("start", check=False)
    assert r.returncode != 0
    assert "already running" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert ceph_cluster.script("status")  # the running cluster is untouched


def test_rbd_create_ls_info_as_the_test_user(ceph_cluster):
    img = image_name()
    ceph_cluster.rbd("create", "--size", "64M", f"{ceph_cluster.pool}/{img}")
    assert img in ceph_cluster.rbd("ls", ceph_cluster.pool).decode().split()
    info = json.loads(ceph_cluster.rbd("info", "--format", "json", f"{ceph_cluster.pool}/{img}"))
    assert info["size"] == 64 * MiB
    assert "exclusive-lock" in info["features"]
    ceph_cluster.rbd("rm", "--no-progress", f"{ceph_cluster.pool}/{img}")
    assert img not in ceph_cluster.rbd("ls", ceph_cluster.pool).decode().split()


def test_qemu_img_and_rbd_round_trip(ceph_cluster, tmp_path):
    """qemu-img's rbd driver writes what `rbd export` reads, and reads what `rbd import`
    wrote."""
    need("qemu-img")
    data = os.urandom(4 * MiB) + bytes(2 * MiB) + os.urandom(MiB)
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    img = image_name()
    ceph_cluster.rbd("create", "--size", "7M", f"{ceph_cluster.pool}/{img}")
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src),
                    ceph_cluster.qemu_filename(img)], check=True, timeout=60)
    assert ceph_cluster.rbd("export", "--no-progress", f"{ceph_cluster.pool}/{img}", "-") == data

    img2 = image_name()
    ceph_cluster.rbd("import", "--no-progress", str(src), f"{ceph_cluster.pool}/{img2}")
    out = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                    ceph_cluster.qemu_filename(img2), str(out)], check=True, timeout=60)
    assert out.read_bytes() == data
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json",
                                      ceph_cluster.qemu_filename(img2)],
                                     capture_output=True, check=True, timeout=60).stdout)
    assert info["virtual-size"] == len(data) and info["format"] == "raw"


def test_qsd_serves_an_rbd_image_over_nbd(ceph_cluster, tmp_path):
    """qemu-storage-daemon with --blockdev driver=rbd exports the image over NBD: nbdinfo and
    qemu-img read it, an NBD client's writes land in the image; while it runs it holds the
    image's exclusive lock and watches its header, and at exit lets both go."""
    for t in ("qemu-storage-daemon", "qemu-img", "nbdinfo"):
        need(t)
    pool = ceph_cluster.pool
    data = os.urandom(3 * MiB)
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    img = image_name()
    ceph_cluster.rbd("import", "--no-progress", "--image-feature", "layering,exclusive-lock",
                     str(src), f"{pool}/{img}")
    assert locks(ceph_cluster, img) == [] and watchers(ceph_cluster, img) == []

    d = Daemon(tmp_path, "qsd", [ceph_cluster.blockdev(img)],
               ["type=nbd,id=e0,node-name=rbd0,name=disk,writable=on"])
    try:
        info = json.loads(subprocess.run(["nbdinfo", "--json", d.uri("disk")],
                                         capture_output=True, check=True, timeout=30).stdout)
        assert info["exports"][0]["export-size"] == len(data)
        out = tmp_path / "out.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", d.uri("disk"),
                        str(out)], check=True, timeout=60)
        assert out.read_bytes() == data

        h = nbd.NBD()
        h.connect_uri(d.uri("disk"))
        patch = os.urandom(64 * 1024)
        h.pwrite(patch, MiB + 4096)
        h.flush()
        assert h.pread(len(patch), MiB + 4096) == patch
        h.shutdown()
        data = data[:MiB + 4096] + patch + data[MiB + 4096 + len(patch):]

        # The exclusive lock and the header watch are qemu-storage-daemon's.
        held = locks(ceph_cluster, img)
        assert len(held) == 1 and held[0]["id"].startswith("auto ")
        assert len(watchers(ceph_cluster, img)) == 1
    finally:
        assert d.stop() == 0
    assert ceph_cluster.rbd("export", "--no-progress", f"{pool}/{img}", "-") == data
    assert locks(ceph_cluster, img) == [] and watchers(ceph_cluster, img) == []


def test_second_cluster_alongside_and_stop_leaves_nothing(ceph_cluster, tmp_path):
    """A second cluster in another directory starts while the first runs (free ports, its own
    files), serves I/O, and `stop` ends every process it started and nothing else; a second
    `stop` is a no-op."""
    other = CephCluster(tmp_path / "other")
    try:
        assert other.conf != ceph_cluster.conf
        img = image_name()
        other.rbd("create", "--size", "4M", f"{other.pool}/{img}")
        other.rbd("import", "--no-progress", "-", f"{other.pool}/{img}-2", input=b"x" * 4096)
        assert sorted(other.rbd("ls", other.pool).decode().split()) == [img, f"{img}-2"]
        # The two clusters do not see each other's images.
        assert img not in ceph_cluster.rbd("ls", ceph_cluster.pool).decode().split()
        assert len(other.pids()) == 3
    finally:
        other.stop()
    assert other.pids() == []
    other.stop()  # idempotent
    assert other.script("status", check=False).returncode != 0
    # The session's cluster was not touched.
    assert len(ceph_cluster.pids()) == 3
    assert "HEALTH_OK" in ceph_cluster.script("status")


def test_ceph_pids_are_the_daemons(ceph_cluster):
    """What `pids` finds (and the stop test counts) are the three daemons."""
    names = sorted(open(f"/proc/{p}/comm").read().strip() for p in ceph_cluster.pids())
    assert names == ["ceph-mgr", "ceph-mon", "ceph-osd"]


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__]))
