"""Hostile clients and hard kills: memory stays bounded, good clients keep
working, acknowledged-durable writes survive kill -9."""

import random
import signal
import socket
import struct
import time

import nbd
import pytest

from conftest import Daemon, file_export, proc_status

MIB = 1 << 20


pytestmark = pytest.mark.bexd_only("measures bexd's own process")


def rss_kib(pid):
    return proc_status(pid, "VmRSS")


def stalled_writer(d):
    """Completes the handshake, sends a 32 MiB WRITE header and 4 KiB of its payload, then stalls."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(d.sock))
    s.recv(18, socket.MSG_WAITALL)
    name = b"disk"
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 4 + len(name) + 2)
              + struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    while True:  # option replies until ACK (type 1)
        head = s.recv(20, socket.MSG_WAITALL)
        rtype, length = struct.unpack(">II", head[12:20])
        if length:
            s.recv(length, socket.MSG_WAITALL)
        if rtype == 1:
            break
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 32 * MIB) + b"x" * 4096)
    return s


def test_stalled_32mib_writes_keep_memory_bounded_and_serve_others(start, image):
    d = start(*file_export(image(64 * MIB)), server_extra=",max-connections=200")
    before = rss_kib(d.proc.pid)
    clients = [stalled_writer(d) for _ in range(64)]
    good = nbd.NBD()
    good.connect_uri(d.uri("disk"))
    good.pwrite(b"g" * 65536, 0)
    assert good.pread(65536, 0) == b"g" * 65536
    grown = rss_kib(d.proc.pid) - before
    # 64 clients each announced 32 MiB (2 GiB in all); the daemon must not hold that.
    assert grown < 256 * 1024, f"RSS grew by {grown} KiB"
    for c in clients:
        c.close()
    assert d.alive()


def test_pipelining_without_reading_replies_is_bounded(start, image):
    """A client floods 1 MiB READs and never reads a reply: the server stops
    reading its requests once its in-flight budget is full."""
    d = start(*file_export(image(64 * MIB)))
    before = rss_kib(d.proc.pid)
    h = socket.socket(socket.AF_UNIX)
    h.settimeout(10)
    h.connect(str(d.sock))
    h.recv(18, socket.MSG_WAITALL)
    name = b"disk"
    h.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 1, len(name)) + name)
    h.recv(10, socket.MSG_WAITALL)  # EXPORT_NAME reply: size and flags, no padding
    h.setblocking(False)
    request = struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 0, MIB)
    sent = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sent < 20000:
        try:
            h.send(request)
            sent += 1
        except BlockingIOError:
            time.sleep(0.01)
    grown = rss_kib(d.proc.pid) - before
    assert grown < 512 * 1024, f"RSS grew by {grown} KiB after {sent} unanswered 1 MiB reads"
    good = nbd.NBD()
    good.connect_uri(d.uri("disk"))
    assert good.pread(4096, 0) == bytes(4096)
    h.close()


def test_kill_9_keeps_every_flushed_and_fua_write(tmp_path, image):
    """Random writes; those acknowledged with FUA, or before a flush that returned, must survive kill -9."""
    img = image(16 * MIB)
    rng = random.Random(7)
    for round_ in range(5):
        d = Daemon(tmp_path, "bexd", *file_export(img))
        h = nbd.NBD()
        h.connect_uri(d.uri("disk"))
        durable = {}
        pending = {}
        for i in range(200):
            block = rng.randrange(0, 16 * MIB // 4096)
            data = bytes([round_ * 16 + i % 16 + 1]) * 4096
            if i % 3 == 0:
                h.pwrite(data, block * 4096, nbd.CMD_FLAG_FUA)
                durable[block] = data
                pending.pop(block, None)
            else:
                h.pwrite(data, block * 4096)
                pending[block] = data
                durable.pop(block, None)
            if i % 50 == 49:
                h.flush()
                durable.update(pending)
                pending.clear()
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        d.stderr.close()
        with open(img, "rb") as f:
            for block, data in durable.items():
                f.seek(block * 4096)
                assert f.read(4096) == data, f"round {round_}: block {block} lost after kill -9"
