"""Helpers for the node event tests: a QMP session that collects events,
qemu-io over NBD, and a qcow2 image corrupted the way the tests need."""

import asyncio
import struct
import subprocess

from qemu.qmp import EventListener, ExecuteError, QMPClient

# qcow2 header fields (big endian): cluster_bits at 20, l1_table_offset at 40.
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00


def qemu_io(uri, cmd, read_only=False):
    """One qemu-io command on an NBD export: (exit code, its output)."""
    r = subprocess.run(["qemu-io", "-f", "raw"] + (["-r"] if read_only else []) + ["-c", cmd, uri],
                       capture_output=True, text=True, timeout=60)
    return r.returncode, (r.stdout + r.stderr).strip()


class Monitor:
    """A qemu.qmp session listening for every event, driven from sync code."""

    def __init__(self, sock):
        self.loop = asyncio.new_event_loop()
        self.client = QMPClient("node-events")
        self.listener = EventListener()
        self.run(self.client.connect(str(sock)))
        self.client.register_listener(self.listener)

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def execute(self, command, arguments=None):
        """("ok", return) or (error class, desc)."""
        try:
            return ("ok", self.run(self.client.execute(command, arguments or {})))
        except ExecuteError as e:
            return (e.error.error.class_, e.error.error.desc)

    def next_event(self, timeout=30):
        event = self.run(asyncio.wait_for(self.listener.get(), timeout))
        return event["event"], event.get("data")

    def marker(self, node):
        """Adds and removes an export of `node`, so BLOCK_EXPORT_DELETED is the
        next event unless one came before it: absence checked by order, not time."""
        assert self.execute("block-export-add", {"type": "nbd", "id": "marker",
                                                 "node-name": node, "name": "marker"})[0] == "ok"
        assert self.execute("block-export-del", {"id": "marker"})[0] == "ok"
        return self.next_event()

    def close(self):
        self.client.remove_listener(self.listener)
        self.run(self.client.disconnect())
        self.loop.close()


def make_qcow2(path, size="64M", data_len="64k"):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0xab 0 {data_len}", str(path)],
                   check=True, capture_output=True)
    return path


def first_l2_entry(path):
    """(L1 table offset, L2 table offset, the first L2 entry) of a qcow2 image."""
    with open(path, "rb") as f:
        header = f.read(104)
        l1_offset = struct.unpack(">Q", header[40:48])[0]
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & L2_OFFSET_MASK
        f.seek(l2_offset)
        return l1_offset, l2_offset, struct.unpack(">Q", f.read(8))[0]


def set_first_l2_entry(path, entry):
    _, l2_offset, _ = first_l2_entry(path)
    with open(path, "r+b") as f:
        f.seek(l2_offset)
        f.write(struct.pack(">Q", entry))


def point_first_cluster_at(path, host):
    """Makes guest cluster 0's L2 entry name host offset `host`, flags kept."""
    _, _, entry = first_l2_entry(path)
    set_first_l2_entry(path, (entry & ~L2_OFFSET_MASK) | host)


def corrupt_bit(path):
    with open(path, "rb") as f:
        f.seek(72)
        return struct.unpack(">Q", f.read(8))[0] & 2 != 0
