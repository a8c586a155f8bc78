"""query-blockstats as qemu-storage-daemon 10 answers it, and bexd's counts behind it.

qemu-storage-daemon lists no devices (exports are not devices) and, with query-nodes=true,
one entry per node whose counters stay at zero under NBD traffic (only wr_highest_offset
moves). The shape tests run on both daemons; the count tests are bexd's own: it counts each
export's requests on the node the export serves, and per export in x-query-export-stats.
"""

import asyncio
import subprocess

import nbd
import pytest

from conftest import qmp_outcome

# BlockDeviceStats' members as qemu-storage-daemon 10.0 returns them (idle_time_ns appears
# once a request has been counted; the histograms only after block-latency-histogram-set,
# which qemu-storage-daemon does not have).
DEVICE_STATS = {
    f"{prefix}{name}"
    for kind in ("rd", "wr", "unmap", "zone_append")
    for prefix, name in (("", f"{kind}_bytes"), ("", f"{kind}_operations"),
                         ("", f"{kind}_total_time_ns"), ("", f"{kind}_merged"),
                         ("failed_", f"{kind}_operations"), ("invalid_", f"{kind}_operations"))
} | {"flush_operations", "flush_total_time_ns", "failed_flush_operations",
     "invalid_flush_operations", "wr_highest_offset", "account_invalid", "account_failed",
     "timed_stats"}
FILE_SPECIFIC = {"driver", "discard-nb-ok", "discard-nb-failed", "discard-bytes-ok"}


def raw_on_file(img):
    blockdevs = [f"driver=file,node-name=f0,filename={img}",
                 "driver=raw,node-name=disk0,file=f0"]
    exports = ["type=nbd,id=e0,node-name=disk0,name=disk0,writable=on"]
    return blockdevs, exports


def query(d, command, arguments=None):
    return asyncio.run(qmp_outcome(d.qmp_sock, command, arguments or {}))


def shape(entry):
    """An entry's member names, nested entries by their own shape."""
    out = {}
    for key, value in entry.items():
        if key in ("parent", "backing"):
            out[key] = shape(value)
        elif key == "stats":
            out[key] = set(value) - {"idle_time_ns"}
        elif key == "driver-specific":
            out[key] = set(value)
        else:
            out[key] = value
    return out


def test_blockstats_lists_no_devices_and_every_node_in_qemus_shape(start, image):
    d = start(*raw_on_file(image(1 << 20)))
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 64k", "-c", "read 0 4k",
                    d.uri("disk0")], check=True, capture_output=True)
    assert query(d, "query-blockstats") == ("ok", [])
    assert query(d, "query-blockstats", {"query-nodes": False}) == ("ok", [])
    status, nodes = query(d, "query-blockstats", {"query-nodes": True})
    assert status == "ok"
    by_name = {n["node-name"]: shape(n) for n in nodes}
    file_entry = {"node-name": "f0", "stats": DEVICE_STATS, "driver-specific": FILE_SPECIFIC}
    assert by_name == {"f0": file_entry,
                       "disk0": {"node-name": "disk0", "stats": DEVICE_STATS,
                                 "parent": file_entry}}
    disk0 = next(n for n in nodes if n["node-name"] == "disk0")
    assert disk0["stats"]["wr_highest_offset"] == 65536
    assert disk0["stats"]["timed_stats"] == []


def test_blockstats_refuses_bad_arguments_as_qemu(start, image):
    d = start(*raw_on_file(image(1 << 20)))
    assert query(d, "query-blockstats", {"bogus": 1}) == (
        "GenericError", "Parameter 'bogus' is unexpected")
    assert query(d, "query-blockstats", {"query-nodes": "yes"}) == (
        "GenericError", "Invalid parameter type for 'query-nodes', expected: boolean")
    assert query(d, "block-latency-histogram-set", {"id": "disk0"}) == (
        "CommandNotFound", "The command block-latency-histogram-set has not been found")


def known_workload(uri):
    """Exactly: 3 reads (12 KiB), 2 writes (68 KiB, ending at 1 MiB + 4 KiB), one write of
    zeroes (8 KiB), 1 trim (4 KiB), 2 flushes, one read past the end (invalid)."""
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(uri)
    h.pwrite(b"a" * 65536, 0)
    h.pwrite(b"b" * 4096, 1 << 20)
    for off in (0, 4096, 8192):
        assert len(h.pread(4096, off)) == 4096
    h.zero(8192, 65536)
    h.trim(4096, 131072)
    h.flush()
    h.flush()
    with pytest.raises(nbd.Error):
        h.pread(4096, h.get_size())
    h.shutdown()


@pytest.mark.bexd_only("qemu-storage-daemon counts nothing for NBD traffic")
def test_blockstats_counts_a_known_workload_exactly(start, image):
    d = start(*raw_on_file(image(2 << 20)))
    known_workload(d.uri("disk0"))
    _, nodes = query(d, "query-blockstats", {"query-nodes": True})
    stats = next(n for n in nodes if n["node-name"] == "disk0")["stats"]
    expected = {
        "rd_operations": 3, "rd_bytes": 12288,
        "wr_operations": 3, "wr_bytes": 65536 + 4096 + 8192,
        "unmap_operations": 1, "unmap_bytes": 4096,
        "flush_operations": 2,
        "invalid_rd_operations": 1, "failed_rd_operations": 0,
        "wr_highest_offset": (1 << 20) + 4096,
    }
    assert {k: stats[k] for k in expected} == expected
    assert stats["idle_time_ns"] >= 0
    assert stats["rd_total_time_ns"] > 0
    _, exports = query(d, "x-query-export-stats")
    assert len(exports) == 1
    e = exports[0]
    assert (e["id"], e["node-name"], e["connections"], e["connections-total"],
            e["in-flight"]) == ("e0", "disk0", 0, 1, 0)
    assert {k: e["stats"][k] for k in expected} == expected


@pytest.mark.bexd_only("qemu-storage-daemon counts nothing for NBD traffic")
def test_blockstats_counts_a_failed_read_apart_from_the_good_ones(start, image):
    img = image(1 << 20)
    spec = ("driver=raw,node-name=top,file.driver=blkdebug,file.image.driver=file,"
            f"file.image.filename={img},file.inject-error.0.event=read_aio,"
            "file.inject-error.0.once=on")
    d = start([spec], ["type=nbd,id=e0,node-name=top,name=disk,writable=on"])
    h = nbd.NBD()
    h.connect_uri(d.uri("disk"))
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)
    h.pread(4096, 0)
    h.pread(512, 8192)
    h.shutdown()
    _, nodes = query(d, "query-blockstats", {"query-nodes": True})
    stats = next(n for n in nodes if n["node-name"] == "top")["stats"]
    assert (stats["rd_operations"], stats["rd_bytes"], stats["failed_rd_operations"],
            stats["invalid_rd_operations"]) == (2, 4608, 1, 0)
    _, exports = query(d, "x-query-export-stats")
    assert exports[0]["stats"]["failed_rd_operations"] == 1


def test_blockstats_nests_the_file_child_but_not_the_backing_node_as_qemu(start, tmp_path):
    """QEMU nests `backing` only in device entries: a node entry has its file as `parent` and
    its backing node is an entry of its own."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    d = start([f"driver=file,node-name=f0,filename={top}",
               "driver=qcow2,node-name=disk0,file=f0"],
              ["type=nbd,id=e0,node-name=disk0,name=disk0,writable=on"])
    status, nodes = query(d, "query-blockstats", {"query-nodes": True})
    assert status == "ok"
    file_entry = {"stats": DEVICE_STATS, "driver-specific": FILE_SPECIFIC}
    qcow2_entry = {"stats": DEVICE_STATS, "parent": file_entry}

    def anonymous(entry):
        """The shape with node names left out (the implicit nodes' names are generated)."""
        out = {k: v for k, v in shape(entry).items() if k != "node-name"}
        for key in ("parent", "backing"):
            if key in out:
                out[key] = {k: v for k, v in out[key].items() if k != "node-name"}
                if "parent" in out[key]:
                    out[key]["parent"] = {k: v for k, v in out[key]["parent"].items()
                                          if k != "node-name"}
        return out
    disk0 = next(n for n in nodes if n["node-name"] == "disk0")
    assert anonymous(disk0) == qcow2_entry
    shapes = sorted((anonymous(n) for n in nodes), key=lambda s: "parent" in s)
    assert shapes == [file_entry, file_entry, qcow2_entry, qcow2_entry]
