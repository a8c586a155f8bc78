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


# WRITEs of 64 KiB and more into a tmpfs image are spliced from the socket.

def test_big_writes_in_flight_land_in_the_file(served):
    """Pipelined writes of 64 KiB to 3 MiB (some FUA, some unaligned) on two
    connections, each to its own region; the file equals the model after."""
    d, path = served
    model = bytearray(content(path))
    rng = random.Random(5)
    handles = []
    for _ in range(2):
        h = nbd.NBD()
        h.connect_uri(d.uri("e"))
        handles.append(h)
    region = SIZE // 2
    for round_ in range(6):
        pending = []
        for i, h in enumerate(handles):
            pos = i * region
            for _ in range(4):
                length = rng.choice([65536, 65536 + 1, 300000, 1 * MIB, 3 * MIB])
                if pos + length > (i + 1) * region:
                    pos = i * region
                data = rng.randbytes(length)
                flags = nbd.CMD_FLAG_FUA if rng.random() < 0.3 else 0
                pending.append((h, h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), pos,
                                                flags=flags)))
                model[pos:pos + length] = data
                pos += length + rng.randrange(0, 5000)
        for h, cookie in pending:
            while not h.aio_command_completed(cookie):
                h.poll(-1)
    for h in handles:
        h.flush()
        h.shutdown()
    assert content(path) == bytes(model)


def test_spliced_writes_mark_bitmaps_and_refusals_keep_the_stream(tmp_path, shm_image):
    import asyncio

    from conftest import qmp_outcome
    d = Daemon(tmp_path, "bexd", [f"driver=file,node-name=f0,filename={shm_image}",
                                  "driver=raw,node-name=r0,file=f0"],
               ["type=nbd,id=w,node-name=r0,name=w,writable=on",
                "type=nbd,id=ro,node-name=r0,name=ro"])
    for node, name in (("r0", "top"), ("f0", "file")):
        assert asyncio.run(qmp_outcome(d.qmp_sock, "block-dirty-bitmap-add",
                                       {"node": node, "name": name})) == ("ok", {})
    h = nbd.NBD()
    h.connect_uri(d.uri("w"))
    h.pwrite(b"\xab" * (1 * MIB), 5 * MIB + 4096)
    h.shutdown()
    kind, listed = asyncio.run(qmp_outcome(d.qmp_sock, "query-named-block-nodes", {}))
    counts = {n["node-name"]: n["dirty-bitmaps"][0]["count"] for n in listed if n.get("dirty-bitmaps")}
    assert counts == {"r0": 1 * MIB + 65536, "f0": 1 * MIB + 65536}

    # A refused big WRITE (read-only export, past the end) still has its
    # payload taken off the socket: the next request works.
    r = nbd.NBD()
    r.connect_uri(d.uri("ro"))
    with pytest.raises(nbd.Error) as e:
        r.pwrite(b"x" * (256 << 10), 0)
    assert e.value.errno == "EPERM", e.value
    assert r.pread(256 << 10, 5 * MIB + 4096) == b"\xab" * (256 << 10)
    r.shutdown()
    w = nbd.NBD()
    w.set_strict_mode(0)
    w.connect_uri(d.uri("w"))
    with pytest.raises(nbd.Error) as e:
        w.pwrite(b"y" * (128 << 10), SIZE - 4096)
    assert e.value.errno == "ENOSPC", e.value
    assert w.pread(65536, 5 * MIB + 4096) == b"\xab" * 65536
    w.shutdown()
    assert d.stop() == 0
    with open(shm_image, "rb") as f:
        f.seek(5 * MIB + 4096)
        assert f.read(1 * MIB) == b"\xab" * (1 * MIB)


def test_hostile_clients_on_the_zero_copy_paths(tmp_path, shm_image):
    """The robustness cases where splice and sendfile change the code path:
    64 clients stall after 4 KiB of a 32 MiB WRITE (spliced); a client floods
    1 MiB READs and never reads a reply (sendfile blocks on its socket). RSS
    stays bounded, a good client is served, and the stalled ones go away."""
    from test_robustness import rss_kib, stalled_writer
    d = Daemon(tmp_path, "bexd", [f"driver=file,node-name=f0,filename={shm_image}"],
               ["type=nbd,id=e,node-name=f0,name=disk,writable=on"], server_extra=",max-connections=200")
    before = rss_kib(d.proc.pid)
    stalled = [stalled_writer(d) for _ in range(64)]
    flood = nbd.NBD()
    flood.connect_uri(d.uri("disk"))
    for _ in range(200):
        flood.aio_pread(nbd.Buffer(1 * MIB), 0)
    good = nbd.NBD()
    good.connect_uri(d.uri("disk"))
    good.pwrite(b"g" * (1 * MIB), 2 * MIB)
    assert good.pread(1 * MIB, 2 * MIB) == b"g" * (1 * MIB)
    grown = rss_kib(d.proc.pid) - before
    assert grown < 256 * 1024, f"RSS grew by {grown} KiB"
    for s in stalled:
        s.close()
    flood.shutdown()
    good.shutdown()
    assert d.stop() == 0
    with open(shm_image, "rb") as f:
        f.seek(2 * MIB)
        assert f.read(1 * MIB) == b"g" * (1 * MIB)
