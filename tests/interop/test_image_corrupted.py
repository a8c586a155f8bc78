"""BLOCK_IMAGE_CORRUPTED, the same steps on qemu-storage-daemon and bexd
(DAEMON=qsd|bexd), on a qcow2 image corrupted with Python: QEMU's
qcow2_signal_corruption. On a writable node the request fails (EIO), the
image gets its corrupt bit and the node gives up (every later request fails;
over NBD, EINVAL from QEMU's ENOMEDIUM; query-named-block-nodes fails); on a
read-only node the request fails and the node serves on."""

import subprocess

import pytest

from node_events import (Monitor, corrupt_bit, first_l2_entry, make_qcow2,
                         point_first_cluster_at, qemu_io, set_first_l2_entry)


@pytest.fixture
def served(start, tmp_path):
    """start(corrupt, read_only=False) -> (daemon, monitor, image path)."""
    monitors = []

    def _served(corrupt, read_only=False):
        img = make_qcow2(tmp_path / "d.qcow2")
        corrupt(img)
        ro = ",read-only=on" if read_only else ""
        d = start([f"driver=file,node-name=file0,filename={img}{ro}",
                   f"driver=qcow2,node-name=q0,file=file0{ro}"],
                  [f"type=nbd,id=e0,node-name=q0,name=disk,writable={'off' if read_only else 'on'}"])
        mon = Monitor(d.qmp_sock)
        monitors.append(mon)
        return d, mon, img
    yield _served
    for m in monitors:
        m.close()


def unaligned_data_cluster(img):
    _, _, entry = first_l2_entry(img)
    set_first_l2_entry(img, entry + 512)


def test_unaligned_data_cluster_marks_the_image_corrupt(served):
    d, mon, img = served(unaligned_data_cluster)
    _, l2_offset, entry = first_l2_entry(img)
    host = entry & 0x00FFFFFFFFFFFE00
    assert qemu_io(d.uri("disk"), "read 0 4k") == (1, "read failed: Input/output error")
    assert mon.next_event() == ("BLOCK_IMAGE_CORRUPTED", {
        "device": "", "node-name": "q0", "fatal": True,
        "msg": f"Cluster allocation offset {host:#x} unaligned (L2 offset: {l2_offset:#x}, "
               "L2 index: 0)"})
    # The node gave up: reads and writes anywhere fail, no second event.
    assert qemu_io(d.uri("disk"), "read 1M 4k") == (1, "read failed: Invalid argument")
    assert qemu_io(d.uri("disk"), "write 0 4k") == (1, "write failed: Invalid argument")
    assert mon.execute("query-named-block-nodes") == ("GenericError", "Block device q0 is ejected")
    assert d.stop() == 0
    assert corrupt_bit(img)
    info = subprocess.run(["qemu-img", "info", "--output=json", str(img)],
                          capture_output=True, text=True, check=True).stdout
    assert '"corrupt": true' in info


def test_write_over_the_l1_table_is_prevented(served):
    l1 = {}

    def into_l1(img):
        l1["offset"] = first_l2_entry(img)[0]
        point_first_cluster_at(img, l1["offset"])
    d, mon, img = served(into_l1)
    # Reads are not checked (as QEMU): they return the table's bytes.
    assert qemu_io(d.uri("disk"), "read 0 4k")[0] == 0
    assert qemu_io(d.uri("disk"), "write 0 4k") == (1, "write failed: Input/output error")
    assert mon.next_event() == ("BLOCK_IMAGE_CORRUPTED", {
        "device": "", "node-name": "q0", "fatal": True, "offset": l1["offset"], "size": 4096,
        "msg": "Preventing invalid write on metadata (overlaps with active L1 table)"})
    assert qemu_io(d.uri("disk"), "read 0 4k") == (1, "read failed: Invalid argument")
    assert d.stop() == 0
    assert corrupt_bit(img)


def test_read_only_node_reports_once_and_serves_on(served):
    d, mon, img = served(unaligned_data_cluster, read_only=True)
    assert qemu_io(d.uri("disk"), "read 0 4k", read_only=True) == (1, "read failed: Input/output error")
    name, data = mon.next_event()
    assert name == "BLOCK_IMAGE_CORRUPTED"
    assert data["fatal"] is False and data["node-name"] == "q0"
    assert data["msg"].startswith("Cluster allocation offset ")
    # Still serving: other clusters read, the bad one fails again, silently.
    assert qemu_io(d.uri("disk"), "read 1M 4k", read_only=True)[0] == 0
    assert qemu_io(d.uri("disk"), "read 0 4k", read_only=True) == (1, "read failed: Input/output error")
    assert mon.marker("q0") == ("BLOCK_EXPORT_DELETED", {"id": "marker"})
    status, nodes = mon.execute("query-named-block-nodes")
    assert status == "ok" and {n["node-name"] for n in nodes} == {"q0", "file0"}
    assert d.stop() == 0
    assert not corrupt_bit(img)
