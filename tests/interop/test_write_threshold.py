"""block-set-write-threshold and BLOCK_WRITE_THRESHOLD, the same steps on
qemu-storage-daemon and bexd (DAEMON=qsd|bexd): the first write ending past
the threshold is reported once and turns it off (0), as QEMU's
block/write-threshold.c; writes through a format count on its file node."""

import pytest

from conftest import file_export
from node_events import Monitor, make_qcow2, qemu_io

MiB = 1 << 20


def threshold_of(mon, node):
    status, nodes = mon.execute("query-named-block-nodes")
    assert status == "ok"
    return next(n["write_threshold"] for n in nodes if n["node-name"] == node)


@pytest.fixture
def monitor():
    opened = []

    def _open(daemon):
        m = Monitor(daemon.qmp_sock)
        opened.append(m)
        return m
    yield _open
    for m in opened:
        m.close()


def test_first_write_past_the_threshold_is_reported_once(start, image, monitor):
    d = start(*file_export(image()))
    mon = monitor(d)
    assert mon.execute("block-set-write-threshold",
                       {"node-name": "disk0", "write-threshold": MiB}) == ("ok", {})
    assert threshold_of(mon, "disk0") == MiB
    # Ending exactly at the threshold does not cross it.
    assert qemu_io(d.uri("disk"), f"write 0 {MiB}")[0] == 0
    assert qemu_io(d.uri("disk"), f"write {MiB - 32768} 65536")[0] == 0
    assert mon.next_event() == ("BLOCK_WRITE_THRESHOLD", {
        "node-name": "disk0", "amount-exceeded": 32768, "write-threshold": MiB})
    assert threshold_of(mon, "disk0") == 0
    # Off now: the next write past it reports nothing.
    assert qemu_io(d.uri("disk"), f"write {2 * MiB} 4096")[0] == 0
    assert mon.marker("disk0") == ("BLOCK_EXPORT_DELETED", {"id": "marker"})


def test_zeroing_and_discard_count_as_writes(start, image, monitor):
    blockdevs, exports = file_export(image())
    d = start([blockdevs[0] + ",discard=unmap"], exports)
    mon = monitor(d)
    mon.execute("block-set-write-threshold", {"node-name": "disk0", "write-threshold": 4096})
    assert qemu_io(d.uri("disk"), "write -z 0 8192")[0] == 0
    assert mon.next_event() == ("BLOCK_WRITE_THRESHOLD", {
        "node-name": "disk0", "amount-exceeded": 4096, "write-threshold": 4096})
    mon.execute("block-set-write-threshold", {"node-name": "disk0", "write-threshold": 4096})
    assert qemu_io(d.uri("disk"), "discard 0 65536")[0] == 0
    assert mon.next_event() == ("BLOCK_WRITE_THRESHOLD", {
        "node-name": "disk0", "amount-exceeded": 61440, "write-threshold": 4096})


def test_ignored_discard_is_no_write(start, image, monitor):
    d = start(*file_export(image()))
    mon = monitor(d)
    mon.execute("block-set-write-threshold", {"node-name": "disk0", "write-threshold": 4096})
    assert qemu_io(d.uri("disk"), "discard 0 65536")[0] == 0
    assert mon.marker("disk0") == ("BLOCK_EXPORT_DELETED", {"id": "marker"})
    assert threshold_of(mon, "disk0") == 4096


@pytest.mark.parametrize("given, shown", [(-1, -1), (2 ** 64 - 1, -1), (-2 ** 63, -2 ** 63),
                                          (2 ** 63, -2 ** 63)])
def test_thresholds_as_qemu_reads_and_shows_them(start, image, monitor, given, shown):
    """QEMU takes a negative uint64 as its two's complement and shows the
    threshold as an int64 in query-named-block-nodes."""
    d = start(*file_export(image()))
    mon = monitor(d)
    assert mon.execute("block-set-write-threshold",
                       {"node-name": "disk0", "write-threshold": given}) == ("ok", {})
    assert threshold_of(mon, "disk0") == shown


def test_zero_turns_the_threshold_off(start, image, monitor):
    d = start(*file_export(image()))
    mon = monitor(d)
    mon.execute("block-set-write-threshold", {"node-name": "disk0", "write-threshold": 4096})
    assert mon.execute("block-set-write-threshold",
                       {"node-name": "disk0", "write-threshold": 0}) == ("ok", {})
    assert qemu_io(d.uri("disk"), f"write 0 {MiB}")[0] == 0
    assert mon.marker("disk0") == ("BLOCK_EXPORT_DELETED", {"id": "marker"})


def test_qcow2_growth_is_reported_on_its_file_node(start, tmp_path, monitor):
    """oVirt's case: the threshold on the file under a qcow2 image, set at the
    file's current end; an allocating write grows the file past it."""
    img = make_qcow2(tmp_path / "thin.qcow2")
    size = img.stat().st_size
    d = start([f"driver=file,node-name=file0,filename={img}",
               "driver=qcow2,node-name=q0,file=file0"],
              ["type=nbd,id=e0,node-name=q0,name=disk,writable=on"])
    mon = monitor(d)
    mon.execute("block-set-write-threshold", {"node-name": "file0", "write-threshold": size})
    # Rewriting allocated data stays inside the file.
    assert qemu_io(d.uri("disk"), "write -P 1 0 64k")[0] == 0
    assert qemu_io(d.uri("disk"), f"write -P 2 {32 * MiB} 64k")[0] == 0
    name, data = mon.next_event()
    assert name == "BLOCK_WRITE_THRESHOLD"
    assert data["node-name"] == "file0" and data["write-threshold"] == size
    assert 0 < data["amount-exceeded"] <= 3 * 65536
    assert threshold_of(mon, "file0") == 0


@pytest.mark.parametrize("arguments, expected", [
    ({"node-name": "nope", "write-threshold": 1}, ("GenericError", "Device 'nope' not found")),
    ({"node-name": "disk0"}, ("GenericError", "Parameter 'write-threshold' is missing")),
    ({"write-threshold": 1}, ("GenericError", "Parameter 'node-name' is missing")),
    ({"node-name": "disk0", "write-threshold": "1"},
     ("GenericError", "Parameter 'write-threshold' expects uint64")),
    ({"node-name": "disk0", "write-threshold": 1.5},
     ("GenericError", "Parameter 'write-threshold' expects uint64")),
    ({"node-name": "disk0", "write-threshold": 2 ** 64},
     ("GenericError", "Parameter 'write-threshold' expects uint64")),
    ({"node-name": "disk0", "write-threshold": -2 ** 63 - 1},
     ("GenericError", "Parameter 'write-threshold' expects uint64")),
    ({"node-name": "disk0", "write-threshold": 1, "x": 1},
     ("GenericError", "Parameter 'x' is unexpected")),
])
def test_bad_arguments_get_qemus_errors(start, image, monitor, arguments, expected):
    d = start(*file_export(image()))
    assert monitor(d).execute("block-set-write-threshold", arguments) == expected
