"""FUSE exports' requests counted as NBD's are: per export (x-query-export-stats), per node
(query-blockstats with query-nodes) and on the metrics-http endpoint, with the exact counts
of a known workload of plain tools on the mounted file. (The vhost-user-blk export's counts
are checked the same way with the rust-vmm front-end in crates/bexd/tests/vhost_user_blk.rs,
and by the guest in test_guest.py.) bexd's own: qemu-storage-daemon counts nothing for its
exports."""

import os

import pytest

from conftest import free_port, wait_until
from test_fuse import is_mounted, qmp, run
from test_metrics import samples, scrape

pytestmark = pytest.mark.bexd_only("qemu-storage-daemon counts nothing for its exports")

KIB = 1 << 10
MIB = 1 << 20


def counts(stats):
    keys = ("rd_operations", "rd_bytes", "wr_operations", "wr_bytes", "unmap_operations",
            "unmap_bytes", "flush_operations", "invalid_rd_operations",
            "invalid_wr_operations", "failed_rd_operations", "failed_wr_operations",
            "wr_highest_offset")
    return {k: stats[k] for k in keys}


def test_fuse_requests_are_counted_per_export_node_and_in_metrics(start, image, tmp_path):
    img = image(64 * MIB)
    mnt = tmp_path / "mnt"
    mnt.touch()
    port = free_port()
    d = start([f"driver=file,node-name=disk0,filename={img}"],
              [f"type=fuse,id=fuse0,node-name=disk0,mountpoint={mnt},writable=on"],
              objects=[f"metrics-http,id=m0,addr.host=127.0.0.1,addr.port={port}"])
    wait_until(lambda: is_mounted(mnt), what="the FUSE mount")
    data = tmp_path / "data"
    data.write_bytes(os.urandom(256 * KIB))
    # Every close() of a descriptor of the file is a FUSE flush, and so is an fsync (strace
    # shows each tool's calls). GNU dd opens its file, dup2()s it onto fd 0 or 1 and closes
    # the first descriptor, then closes fd 0 or 1 at exit.
    # 4 O_DIRECT writes of 64 KiB; flushes: close after dup2, fsync, close at exit = 3.
    run("dd", f"if={data}", f"of={mnt}", "bs=64k", "oflag=direct", "conv=notrunc,fsync")
    # 3 O_DIRECT reads of 4 KiB at 64 KiB; flushes: close after dup2, close at exit = 2.
    run("dd", f"if={mnt}", "of=/dev/null", "bs=4k", "skip=16", "count=3", "iflag=direct")
    # A punched hole is an unmap, a zeroed range a write; util-linux fallocate fsyncs and
    # closes: 2 flushes each.
    run("fallocate", "-p", "-o", str(1 * MIB), "-l", str(64 * KIB), str(mnt))
    run("fallocate", "-z", "-o", str(2 * MIB), "-l", str(8 * KIB), str(mnt))
    expected = {
        "rd_operations": 3, "rd_bytes": 12 * KIB,
        "wr_operations": 5, "wr_bytes": 256 * KIB + 8 * KIB,
        "unmap_operations": 1, "unmap_bytes": 64 * KIB,
        "flush_operations": 3 + 2 + 2 + 2,
        "invalid_rd_operations": 0, "invalid_wr_operations": 0,
        "failed_rd_operations": 0, "failed_wr_operations": 0,
        "wr_highest_offset": 2 * MIB + 8 * KIB,
    }
    _, exports = qmp(d, "x-query-export-stats")
    assert [(e["id"], e["in-flight"]) for e in exports] == [("fuse0", 0)]
    assert counts(exports[0]["stats"]) == expected
    _, nodes = qmp(d, "query-blockstats", {"query-nodes": True})
    node = next(n for n in nodes if n["node-name"] == "disk0")
    assert counts(node["stats"]) == expected
    assert node["driver-specific"]["discard-nb-ok"] == 1
    s = samples(scrape(port)[2])
    for label in ('export="fuse0"', 'node="disk0"'):
        subject = label.split("=")[0]
        got = {op: (s[f'bexd_{subject}_requests_total{{{label},op="{op}"}}'],
                    s[f'bexd_{subject}_bytes_total{{{label},op="{op}"}}'])
               for op in ("read", "write", "unmap", "flush")}
        assert got == {"read": (3, 12 * KIB), "write": (5, 264 * KIB),
                       "unmap": (1, 64 * KIB), "flush": (9, 0)}, label
        assert s[f'bexd_{subject}_requests_in_flight{{{label}}}'] == 0

