"""vhost-user-blk exports over QMP, against bexd and qemu-storage-daemon (parity): the
export's lifecycle and QEMU's checks on its options. The data path is driven by the rust-vmm
front-end in crates/bexd/tests/vhost_user_blk.rs, against both daemons too."""

import asyncio
import os
import socket

from conftest import qmp_outcome, wait_until
from node_events import Monitor

MIB = 1 << 20


def qmp(d, command, arguments=None):
    return asyncio.run(qmp_outcome(d.qmp_sock, command, arguments or {}))


def vhost_daemon(start, image, tmp_path, extra=""):
    img = image(16 * MIB)
    sock = tmp_path / "vhost.sock"
    d = start([f"driver=file,node-name=disk0,filename={img}"],
              [f"type=vhost-user-blk,id=v0,node-name=disk0,addr.type=unix,addr.path={sock}"
               f",writable=on{extra}"])
    wait_until(sock.exists, what="the vhost-user socket")
    return d, sock


def test_vhost_user_blk_export_is_listed_and_removed(start, image, tmp_path):
    d, sock = vhost_daemon(start, image, tmp_path, ",num-queues=2")
    assert qmp(d, "query-block-exports") == ("ok", [
        {"id": "v0", "type": "vhost-user-blk", "node-name": "disk0", "shutting-down": False}])
    m = Monitor(d.qmp_sock)
    try:
        assert m.execute("block-export-del", {"id": "v0"}) == ("ok", {})
        assert m.next_event() == ("BLOCK_EXPORT_DELETED", {"id": "v0"})
        assert m.execute("query-block-exports") == ("ok", [])
    finally:
        m.close()
    with socket.socket(socket.AF_UNIX) as s:
        assert s.connect_ex(str(sock)) != 0


def test_vhost_user_blk_options_are_checked_as_qemu_checks_them(start, image, tmp_path):
    d, sock = vhost_daemon(start, image, tmp_path)
    other = str(tmp_path / "other.sock")

    def add(**a):
        args = {"type": "vhost-user-blk", "id": "v1", "node-name": "disk0",
                "addr": {"type": "unix", "path": other}, **a}
        return qmp(d, "block-export-add", args)

    bad_size = ("GenericError",
                "parameter logical-block-size must be a power of 2 between 512 and 2097152")
    assert add(**{"logical-block-size": 1000}) == bad_size
    assert add(**{"logical-block-size": 256}) == bad_size
    assert add(**{"num-queues": 0}) == ("GenericError", "num-queues must be greater than 0")
    assert add(addr={"type": "inet", "host": "127.0.0.1", "port": "1"}) == (
        "GenericError", "Only socket address types 'unix' and 'fd' are supported")
    assert add(addr={"type": "unix"}) == ("GenericError", "Parameter 'addr.path' is missing")
    assert not os.path.exists(other)
    assert add(**{"logical-block-size": 4096, "num-queues": 4}) == ("ok", {})
    assert os.path.exists(other)
