"""READ replies sent with sendfile, straight from the page cache.

bexd sends reads of 32 KiB and more with sendfile when the image is in a
tmpfs file and the socket is plain (TCP or unix). These tests put the image
in /dev/shm so that path is taken, and check with real clients that every
kind of read reply carries the right bytes: structured and simple replies,
sparse replies with holes, DF, unaligned and end-of-disk ranges, reads just
after writes, many in flight on several connections.
"""

import os
import random
import subprocess
import uuid

import nbd
import pytest

from conftest import Daemon, need

MIB = 1 << 20
SIZE = 16 * MIB


@pytest.fixture
def shm_image():
    """A 16 MiB image in /dev/shm: random data with holes and a zero run."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = f"/dev/shm/bexd-zc-{uuid.uuid4().hex}.img"
    rng = random.Random(7)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off in (0, 3 * MIB + 4096, 8 * MIB - 100, SIZE - 70000):
            f.seek(off)
            f.write(rng.randbytes(300000 if off < SIZE - 70000 else 70000))
        f.seek(12 * MIB)
        f.write(bytes(256 << 10))
    yield path
    os.unlink(path)


@pytest.fixture(params=["unix", "tcp"])
def served(request, tmp_path, shm_image):
    d = Daemon(tmp_path, "bexd", [f"driver=file,node-name=f0,filename={shm_image}"],
               ["type=nbd,id=e,node-name=f0,name=e,writable=on"], tcp=request.param == "tcp")
    yield d, shm_image
    assert d.stop() == 0


def content(path):
    with open(path, "rb") as f:
        return f.read()


RANGES = [(0, 64 << 10), (0, 1 * MIB), (12345, 100000), (3 * MIB, 2 * MIB), (12 * MIB - 4096, 300000),
          (SIZE - 32768, 32768), (SIZE - 1 * MIB - 1, 1 * MIB + 1), (8 * MIB - 65536, 32 << 20 >> 4)]


@pytest.mark.parametrize("structured", [True, False])
@pytest.mark.parametrize("df", [False, True])
def test_reads_of_every_shape_carry_the_file_bytes(served, structured, df):
    d, path = served
    want = content(path)
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(d.uri("e"))
    assert h.get_structured_replies_negotiated() == structured
    for off, length in RANGES:
        if df and structured:
            # DF: one data chunk for the whole range; the callback sees each chunk.
            chunks = []
            got = h.pread_structured(length, off, lambda buf, o, status, _e: chunks.append(
                (status, o, len(buf))) or 0, flags=nbd.CMD_FLAG_DF)
            assert chunks == [(nbd.READ_DATA, off, length)], (off, length, chunks[:4])
        else:
            got = h.pread(length, off)
        assert got == want[off:off + length], (off, length)
    h.shutdown()


def test_reads_right_after_writes_see_the_writes(served):
    d, path = served
    h = nbd.NBD()
    h.connect_uri(d.uri("e"))
    rng = random.Random(11)
    for _ in range(40):
        off = rng.randrange(0, SIZE - 2 * MIB)
        data = rng.randbytes(rng.choice([40000, 65536, 1 * MIB, 1 * MIB + 7]))
        h.pwrite(data, off)
        assert h.pread(len(data), off) == data
    h.flush()
    h.shutdown()


def test_many_big_reads_in_flight_on_several_connections(served):
    """libnbd's AIO keeps 16 reads of 256 KiB in flight per connection, on 4
    connections; each reply must be whole and in the right buffer."""
    d, path = served
    want = content(path)
    handles = []
    for _ in range(4):
        h = nbd.NBD()
        h.connect_uri(d.uri("e"))
        handles.append(h)
    rng = random.Random(3)
    pending = []
    for round_ in range(8):
        for h in handles:
            for _ in range(16):
                off = rng.randrange(0, SIZE - (256 << 10))
                buf = nbd.Buffer(256 << 10)
                pending.append((h, off, buf, h.aio_pread(buf, off)))
        for h, off, buf, cookie in pending:
            while not h.aio_command_completed(cookie):
                h.poll(-1)
            assert buf.to_bytearray() == want[off:off + (256 << 10)], off
        pending.clear()
    for h in handles:
        h.shutdown()


def test_qemu_img_and_nbdcopy_copies_equal_the_image(served, tmp_path):
    need("nbdcopy")
    d, path = served
    qemu_copy, nbdcopy_copy = tmp_path / "q.raw", tmp_path / "n.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", d.uri("e"), str(qemu_copy)],
                   check=True)
    subprocess.run(["nbdcopy", d.uri("e"), str(nbdcopy_copy)], check=True)
    assert qemu_copy.read_bytes() == content(path)
    assert nbdcopy_copy.read_bytes() == content(path)
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", path, d.uri("e")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
