"""Persistent dirty bitmaps in qcow2 images, between bexd, qemu-img and
qemu-storage-daemon in both directions.

One daemon writes bitmaps into an image (added over QMP, dirtied by an NBD
client, stored when it stops); then qemu-img and the other daemon must see
the same bitmaps with the same bits. An unclean stop (SIGKILL) must leave
the bitmaps flagged in use, so both daemons load them as inconsistent and
refuse them the same way until they are removed.
"""

import asyncio
import json
import subprocess

import nbd
import pytest

from conftest import Daemon, need, qmp_outcome

MIB = 1 << 20
# (offset, length) written by the client; at 64 KiB granularity they dirty
# [1M, 1M+64K), [10M, 10M+128K); at 4 KiB, [1M, 1M+4K), [10M, 10M+72K).
WRITES = [(1 * MIB, 4096), (10 * MIB, 70000)]
DIRTY_64K = [(1 * MIB, 64 << 10), (10 * MIB, 128 << 10)]
DIRTY_4K = [(1 * MIB, 4 << 10), (10 * MIB, 72 << 10)]
OTHER = {"bexd": "qsd", "qsd": "bexd"}


@pytest.fixture(autouse=True)
def _tools():
    for tool in ["qemu-img", "qemu-storage-daemon", "nbdinfo"]:
        need(tool)


def qmp(d, command, arguments=None):
    return asyncio.run(qmp_outcome(d.qmp_sock, command, arguments or {}))


def qcow2(tmp_path, name="disk.qcow2", size="64M", *opts):
    path = tmp_path / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), size], check=True)
    return path


def node(img, read_only=False):
    ro = ",read-only=on" if read_only else ""
    return f"driver=qcow2,node-name=q{ro},file.driver=file,file.filename={img}"


def run_daemon(tmp_path, kind, img, read_only=False, exports=()):
    return Daemon(tmp_path, kind, [node(img, read_only)], list(exports))


def stop(d):
    assert d.stop() == 0, f"{d.kind} did not exit cleanly"


def info(img, force=False):
    argv = ["qemu-img", "info", "--output=json"] + (["-U"] if force else []) + [str(img)]
    out = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
    return out["format-specific"]["data"].get("bitmaps", [])


def check_clean(img):
    r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found" in r.stdout, r.stdout
    assert "leaked" not in r.stdout, r.stdout


def node_info(d):
    kind, listed = qmp(d, "query-named-block-nodes")
    assert kind == "ok"
    (q,) = [n for n in listed if n["node-name"] == "q"]
    return q.get("dirty-bitmaps"), q["image"]["format-specific"]["data"].get("bitmaps")


def by_name(bitmaps):
    return {b["name"]: b for b in bitmaps or []}


def flags(stored):
    return {b["name"]: b["flags"] for b in stored or []}


# The stored flags of write_with_bitmaps' bitmaps while an image is open for writing.
IN_USE = {"b": ["in-use", "auto"], "fine": ["in-use", "auto"], "off": ["in-use"]}


def dirty_map(d, export, bitmap):
    out = subprocess.run(["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}", d.uri(export)],
                         check=True, capture_output=True, text=True).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


def write_with_bitmaps(tmp_path, kind, img):
    """`kind` adds two persistent bitmaps (b: default granularity, recording;
    frozen: 4 KiB, disabled then enabled by a transaction), a client writes
    WRITES, and the daemon stops cleanly."""
    d = run_daemon(tmp_path, kind, img, exports=["type=nbd,id=w,node-name=q,name=w,writable=on"])
    assert qmp(d, "block-dirty-bitmap-add", {"node": "q", "name": "b", "persistent": True}) == ("ok", {})
    assert qmp(d, "block-dirty-bitmap-add", {"node": "q", "name": "fine", "persistent": True,
                                             "granularity": 4096, "disabled": True}) == ("ok", {})
    assert qmp(d, "block-dirty-bitmap-enable", {"node": "q", "name": "fine"}) == ("ok", {})
    assert qmp(d, "block-dirty-bitmap-add", {"node": "q", "name": "off", "persistent": True,
                                             "disabled": True}) == ("ok", {})
    assert qmp(d, "block-dirty-bitmap-add", {"node": "q", "name": "gone"}) == ("ok", {})
    h = nbd.NBD()
    h.connect_uri(d.uri("w"))
    for off, length in WRITES:
        h.pwrite(bytes([0x5a]) * length, off)
    h.flush()
    h.shutdown()
    stop(d)


def expect_written(bitmaps):
    """What query-named-block-nodes shows after write_with_bitmaps."""
    b = by_name(bitmaps)
    assert set(b) == {"b", "fine", "off"}, bitmaps
    assert (b["b"]["granularity"], b["b"]["count"], b["b"]["recording"]) == (65536, 192 << 10, True)
    assert (b["fine"]["granularity"], b["fine"]["count"], b["fine"]["recording"]) == (4096, 76 << 10, True)
    assert (b["off"]["count"], b["off"]["recording"]) == (0, False)
    assert all(x["persistent"] and "inconsistent" not in x for x in b.values())


@pytest.mark.parametrize("writer", ["bexd", "qsd"])
def test_stored_bitmaps_are_read_back_by_the_other_daemon_and_qemu_img(tmp_path, writer):
    reader = OTHER[writer]
    img = qcow2(tmp_path)
    write_with_bitmaps(tmp_path, writer, img)

    stored = by_name(info(img))
    assert stored == {
        "b": {"name": "b", "granularity": 65536, "flags": ["auto"]},
        "fine": {"name": "fine", "granularity": 4096, "flags": ["auto"]},
        "off": {"name": "off", "granularity": 65536, "flags": []},
    }
    check_clean(img)

    # Read-only: the bitmaps load readonly and can be exported as they are.
    d = run_daemon(tmp_path, reader, img, read_only=True,
                   exports=["type=nbd,id=r,node-name=q,name=r,bitmaps.0=b,bitmaps.1=fine"])
    listed, on_disk = node_info(d)
    expect_written(listed)
    assert by_name(on_disk) == stored
    assert dirty_map(d, "r", "b") == DIRTY_64K
    assert dirty_map(d, "r", "fine") == DIRTY_4K
    stop(d)

    # Read-write: the bitmaps are flagged in use while the image is open.
    d = run_daemon(tmp_path, reader, img)
    listed, on_disk = node_info(d)
    expect_written(listed)
    assert flags(on_disk) == IN_USE
    assert flags(info(img, force=True)) == IN_USE
    stop(d)
    assert by_name(info(img)) == stored
    check_clean(img)


def test_qemu_img_bitmap_changes_what_bexd_stored_and_bexd_sees_them(tmp_path):
    img = qcow2(tmp_path)
    write_with_bitmaps(tmp_path, "bexd", img)
    for args in (["--add", "-g", "8192", str(img), "new"],
                 ["--disable", str(img), "b"],
                 ["--merge", "b", str(img), "off"],
                 ["--remove", str(img), "fine"]):
        subprocess.run(["qemu-img", "bitmap", *args], check=True, capture_output=True)
    check_clean(img)

    d = run_daemon(tmp_path, "bexd", img, read_only=True,
                   exports=["type=nbd,id=r,node-name=q,name=r,bitmaps.0=off,bitmaps.1=new"])
    b = by_name(node_info(d)[0])
    assert set(b) == {"b", "off", "new"}
    assert (b["b"]["recording"], b["b"]["count"]) == (False, 192 << 10)
    assert (b["off"]["recording"], b["off"]["count"]) == (False, 192 << 10)
    assert (b["new"]["granularity"], b["new"]["recording"], b["new"]["count"]) == (8192, True, 0)
    assert dirty_map(d, "r", "off") == DIRTY_64K
    assert dirty_map(d, "r", "new") == []
    stop(d)

    # bexd removes one, adds one and writes; qemu-img sees the result.
    d = run_daemon(tmp_path, "bexd", img, exports=["type=nbd,id=w,node-name=q,name=w,writable=on"])
    assert qmp(d, "block-dirty-bitmap-remove", {"node": "q", "name": "off"}) == ("ok", {})
    assert "off" not in by_name(info(img, force=True)), "a removed bitmap leaves the image at once"
    h = nbd.NBD()
    h.connect_uri(d.uri("w"))
    h.pwrite(b"\x01" * 512, 30 * MIB)
    h.shutdown()
    stop(d)
    assert by_name(info(img)) == {
        "b": {"name": "b", "granularity": 65536, "flags": []},
        "new": {"name": "new", "granularity": 8192, "flags": ["auto"]},
    }
    check_clean(img)
    d = run_daemon(tmp_path, "qsd", img, read_only=True,
                   exports=["type=nbd,id=r,node-name=q,name=r,bitmaps.0=new,bitmaps.1=b"])
    assert dirty_map(d, "r", "new") == [(30 * MIB, 8192)]
    assert dirty_map(d, "r", "b") == DIRTY_64K
    stop(d)


# What each daemon answers for an inconsistent bitmap 'b' (QEMU's order of checks).
INCONSISTENT_STEPS = [
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "name": "e",
                          "writable": True, "bitmaps": ["b"]}),
    ("block-dirty-bitmap-clear", {"node": "q", "name": "b"}),
    ("block-dirty-bitmap-enable", {"node": "q", "name": "b"}),
    ("block-dirty-bitmap-disable", {"node": "q", "name": "b"}),
    ("block-dirty-bitmap-add", {"node": "q", "name": "t"}),
    ("block-dirty-bitmap-merge", {"node": "q", "target": "t", "bitmaps": ["b"]}),
    ("block-dirty-bitmap-merge", {"node": "q", "target": "b", "bitmaps": ["t"]}),
    ("block-dirty-bitmap-add", {"node": "q", "name": "b", "persistent": True}),
]


def inconsistent_outcomes(tmp_path, kind, img):
    d = run_daemon(tmp_path, kind, img)
    listed, on_disk = node_info(d)
    outcomes = [qmp(d, c, a) for c, a in INCONSISTENT_STEPS]
    outcomes.append(qmp(d, "block-dirty-bitmap-remove", {"node": "q", "name": "b"}))
    after = node_info(d)
    stop(d)
    return listed, on_disk, outcomes, after


@pytest.mark.parametrize("crasher", ["bexd", "qsd"])
def test_unclean_stop_leaves_bitmaps_inconsistent_as_in_qemu(tmp_path, crasher):
    img = qcow2(tmp_path)
    write_with_bitmaps(tmp_path, "bexd", img)
    d = run_daemon(tmp_path, crasher, img, exports=["type=nbd,id=w,node-name=q,name=w,writable=on"])
    h = nbd.NBD()
    h.connect_uri(d.uri("w"))
    h.pwrite(b"\x02" * 4096, 40 * MIB)
    h.flush()
    d.proc.kill()
    d.proc.wait()
    d.stderr.close()
    assert flags(info(img)) == IN_USE

    results = {}
    for kind in ["bexd", "qsd"]:
        copy = tmp_path / f"{kind}.qcow2"
        copy.write_bytes(img.read_bytes())
        results[kind] = inconsistent_outcomes(tmp_path, kind, copy)
        # The removed bitmap and its clusters are gone; the others stay in use.
        assert set(by_name(info(copy))) == {"fine", "off"}
        check_clean(copy)
    listed, on_disk, outcomes, after = results["bexd"]
    b = by_name(listed)
    assert b["b"] == {"name": "b", "recording": False, "persistent": True, "busy": False,
                      "granularity": 65536, "count": 0, "inconsistent": True}
    assert outcomes[0] == ("GenericError", "Bitmap 'b' is inconsistent and cannot be used")
    assert outcomes[-1] == ("ok", {})
    assert results["bexd"] == results["qsd"]


def test_default_granularity_and_refusals_as_qemu(tmp_path):
    """Default granularity follows the cluster size (clamped to 4K..64K); a
    version 2 image cannot store bitmaps; the same answers from both daemons."""
    answers = {}
    for kind in ["bexd", "qsd"]:
        images = {cs: qcow2(tmp_path, f"{kind}-c{cs}.qcow2", "64M", "-o", f"cluster_size={cs}")
                  for cs in ["512", "4k", "64k", "2M"]}
        images["v2"] = qcow2(tmp_path, f"{kind}-v2.qcow2", "64M", "-o", "compat=0.10")
        blockdevs = [f"driver=qcow2,node-name=n{k},file.driver=file,file.filename={p}"
                     for k, p in images.items()]
        d = Daemon(tmp_path, kind, blockdevs, [])
        got = [qmp(d, "block-dirty-bitmap-add", {"node": f"n{k}", "name": "b", "persistent": True})
               for k in images]
        got.append(qmp(d, "block-dirty-bitmap-add", {"node": "n64k", "name": "b", "persistent": True}))
        kind_, listed = qmp(d, "query-named-block-nodes")
        got.append(sorted((n["node-name"], [b["granularity"] for b in n.get("dirty-bitmaps") or []],
                           n["image"]["format-specific"]["data"]) for n in listed
                          if n["node-name"].startswith("n")))
        stop(d)
        answers[kind] = got
    assert answers["bexd"][4] == ("GenericError", "Can't make bitmap 'b' persistent in 'nv2': "
                                  "Cannot store dirty bitmaps in qcow2 v2 files")
    grans = {name: g for name, g, _ in answers["bexd"][-1]}
    assert grans == {"n512": [4096], "n4k": [4096], "n64k": [65536], "n2M": [65536], "nv2": []}
    assert answers["bexd"] == answers["qsd"]


def test_qcow2_writes_mark_the_file_nodes_bitmap_as_qemu(tmp_path):
    """A bitmap on the file node under qcow2 records the image's writes to the
    file (data and metadata), as every QEMU layer tracks its own writes. With
    metadata preallocated every write lands inside the file."""
    counts = {}
    for kind in ["bexd", "qsd"]:
        img = qcow2(tmp_path, f"{kind}.qcow2", "64M", "-o", "preallocation=metadata")
        d = Daemon(tmp_path, kind, [f"driver=file,node-name=f0,filename={img}",
                                    "driver=qcow2,node-name=q,file=f0"],
                   ["type=nbd,id=w,node-name=q,name=w,writable=on"])
        assert qmp(d, "block-dirty-bitmap-add", {"node": "f0", "name": "fb"}) == ("ok", {})
        h = nbd.NBD()
        h.connect_uri(d.uri("w"))
        h.pwrite(b"\x07" * 4096, 5 * MIB)
        h.pwrite(b"\x07" * 65536, 20 * MIB)
        h.flush()
        h.shutdown()
        kind_, listed = qmp(d, "query-named-block-nodes")
        (f0,) = [n for n in listed if n["node-name"] == "f0"]
        counts[kind] = [b["count"] for b in f0["dirty-bitmaps"]]
        stop(d)
    assert counts["bexd"][0] >= 2 * 65536
    assert counts["bexd"] == counts["qsd"]


def test_blockdev_add_loads_and_blockdev_del_stores(tmp_path):
    img = qcow2(tmp_path)
    write_with_bitmaps(tmp_path, "bexd", img)
    d = Daemon(tmp_path, "bexd", ["driver=null-co,node-name=n0,size=1048576"], [])
    opts = {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": str(img)}}
    # An open that fails after the image was opened for writing leaves no bitmap in use.
    kind, _ = qmp(d, "blockdev-add", {**opts, "backing": "no-such-node"})
    assert kind == "GenericError"
    assert flags(info(img)) == {"b": ["auto"], "fine": ["auto"], "off": []}
    assert qmp(d, "blockdev-add", opts) == ("ok", {})
    listed, on_disk = node_info(d)
    expect_written(listed)
    assert flags(on_disk) == IN_USE
    assert qmp(d, "block-dirty-bitmap-add", {"node": "q", "name": "later", "persistent": True,
                                             "granularity": 131072}) == ("ok", {})
    assert qmp(d, "block-dirty-bitmap-clear", {"node": "q", "name": "b"}) == ("ok", {})
    assert qmp(d, "blockdev-del", {"node-name": "q"}) == ("ok", {})
    # Stored on blockdev-del, while the daemon runs on.
    assert flags(info(img)) == {"b": ["auto"], "fine": ["auto"], "off": [], "later": ["auto"]}
    check_clean(img)
    assert qmp(d, "blockdev-add", opts) == ("ok", {})
    b = by_name(node_info(d)[0])
    assert (b["b"]["count"], b["fine"]["count"], b["later"]["granularity"]) == (0, 76 << 10, 131072)
    stop(d)
    check_clean(img)


@pytest.mark.parametrize("second", ["bexd", "qsd"])
def test_incremental_backup_across_a_restart(tmp_path, second):
    """The backup cycle as tools run it: full backup plus a persistent bitmap
    on bexd; the daemon stops; guest writes happen under a new daemon (bexd
    or qemu-storage-daemon); the bitmap, exported after yet another restart,
    drives `bexd backup`'s incremental, which applied to the full equals the
    source."""
    from test_bitmaps import bexd_backup
    img = qcow2(tmp_path, "src.qcow2", "64M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x01 0 1M", "-c", "write -P 0x02 30M 64k",
                    str(img)], check=True, capture_output=True)
    full, inc = tmp_path / "full.raw", tmp_path / "inc.raw"

    d = run_daemon(tmp_path, "bexd", img, exports=["type=nbd,id=f,node-name=q,name=f"])
    assert qmp(d, "block-dirty-bitmap-add", {"node": "q", "name": "b", "persistent": True}) == ("ok", {})
    bexd_backup("--uri", d.uri("f"), "--output", str(full))
    stop(d)

    d = run_daemon(tmp_path, second, img, exports=["type=nbd,id=w,node-name=q,name=w,writable=on"])
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 512k 8k", "-c", "write -P 0x44 40M 100k",
                    "-c", "write -z 30M 4k", d.uri("w")], check=True, capture_output=True)
    stop(d)

    d = run_daemon(tmp_path, "bexd", img, read_only=True,
                   exports=["type=nbd,id=i,node-name=q,name=i,bitmaps.0=b"])
    assert dirty_map(d, "i", "b") == [
        (512 << 10, 64 << 10), (30 * MIB, 64 << 10), (40 * MIB, 128 << 10)]
    out = bexd_backup("--uri", d.uri("i"), "--bitmap", "b", "--base", str(full), "--output", str(inc),
                      "--verify")
    assert f"read {256 << 10} bytes" in out.stderr
    stop(d)
    src = tmp_path / "src.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(src)], check=True)
    assert inc.read_bytes() == src.read_bytes()
