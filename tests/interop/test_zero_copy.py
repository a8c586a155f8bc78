"""READ replies sent with sendfile, straight from the page cache.

bexd sends reads of 128 KiB and more with sendfile when the image is in a
tmpfs file and the socket is plain (TCP or unix). These tests put the image
in /dev/shm so that path is taken, and check with real clients that every
kind of read reply carries the right bytes: structured and simple replies,
sparse replies with holes, DF, unaligned and end-of-disk ranges, reads just
after writes, many in flight on several connections.
"""

import os
import random
import socket
import struct
import subprocess
import uuid

import nbd
import pytest

from conftest import Daemon, need, raw_client, recv_exact, syscall_count

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


# qcow2 in tmpfs: a read that maps to one run of data clusters goes out with
# sendfile too, under a lease that keeps those clusters from being freed (and
# reused for other data) until the reply is sent.

def sendfile_calls(pid, action):
    """How many sendfile calls the daemon made while `action` ran (strace)."""
    return syscall_count(pid, "sendfile", action)


@pytest.fixture(params=["64k-clusters", "4k-clusters", "backing"])
def qcow2_served(request, tmp_path, shm_image):
    """shm_image's content as a qcow2 in /dev/shm: converted (64 KiB or 4 KiB
    clusters), or an overlay holding every other MiB over a raw backing file."""
    path = shm_image + ".qcow2"
    if request.param == "backing":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", shm_image, "-F", "raw",
                        path], check=True)
        with open(shm_image, "rb") as f:
            raw = f.read()
        cmds = []
        for off in range(0, SIZE, 2 * MIB):
            tmp = f"{path}.{off}"
            with open(tmp, "wb") as t:
                t.write(raw[off:off + MIB])
            cmds += ["-c", f"write -s {tmp} {off} {MIB}"]
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds, path], check=True, capture_output=True)
        for off in range(0, SIZE, 2 * MIB):
            os.unlink(f"{path}.{off}")
    else:
        cs = "65536" if request.param == "64k-clusters" else "4096"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o",
                        f"cluster_size={cs}", shm_image, path], check=True)
    d = Daemon(tmp_path, "bexd", [f"driver=qcow2,node-name=q0,file.driver=file,file.filename={path}"],
               ["type=nbd,id=e,node-name=q0,name=e,writable=on"])
    yield d, shm_image
    assert d.stop() == 0
    os.unlink(path)


@pytest.mark.parametrize("structured", [True, False])
def test_qcow2_reads_of_every_shape_carry_the_image_bytes(qcow2_served, structured):
    d, raw = qcow2_served
    want = content(raw)
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(d.uri("e"))

    def read_all():
        # RANGES, and two that lie in one run of data clusters (the written
        # parts of shm_image), which alone can go out with sendfile.
        for off, length in RANGES + [(0, 256 << 10), (3 * MIB + 65536, 128 << 10)]:
            assert h.pread(length, off) == want[off:off + length], (off, length)
        # Every other 1 MiB is in the overlay, the rest below it (with "backing").
        for off in range(0, SIZE, MIB):
            assert h.pread(MIB, off) == want[off:off + MIB], off

    calls = sendfile_calls(d.proc.pid, read_all)
    assert calls > 0, "no read of the qcow2 image went out with sendfile"
    h.shutdown()


@pytest.mark.parametrize("chunk", [4 * MIB, 256 << 10, 64 << 10])
def test_qcow2_clusters_allocated_after_open_go_out_with_sendfile(tmp_path, chunk):
    """The image grows while served: clusters written over NBD lie past the
    file's size at open. A and B are written in turns, `chunk` bytes at a
    time, so A's clusters lie in runs of `chunk` in the file. Reads of A
    carry its bytes; with runs of 128 KiB and more they go out with sendfile
    (one call per run at least), with 64 KiB runs they are copied. A read
    that ends in unallocated space carries zeroes there."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = f"/dev/shm/bexd-zc-grow-{uuid.uuid4().hex}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "64M"], check=True)
    before = os.path.getsize(path)
    d = Daemon(tmp_path, "bexd", [f"driver=qcow2,node-name=q0,file.driver=file,file.filename={path}"],
               ["type=nbd,id=e,node-name=q0,name=e,writable=on"])
    try:
        rng = random.Random(11)
        a, b = rng.randbytes(4 * MIB), rng.randbytes(4 * MIB)
        a_at, b_at = 8 * MIB, 32 * MIB
        h = nbd.NBD()
        h.connect_uri(d.uri("e"))
        for off in range(0, 4 * MIB, chunk):
            h.pwrite(a[off:off + chunk], a_at + off)
            h.pwrite(b[off:off + chunk], b_at + off)
        h.flush()
        assert os.path.getsize(path) > before + 8 * MIB

        def read_back():
            for off in range(0, 4 * MIB, MIB):
                assert h.pread(MIB, a_at + off) == a[off:off + MIB], off
            assert h.pread(MIB, b_at + MIB // 2) == b[MIB // 2:MIB // 2 + MIB]
            assert h.pread(256 << 10, a_at + 4 * MIB - (128 << 10)) == \
                a[-(128 << 10):] + bytes(128 << 10)

        calls = sendfile_calls(d.proc.pid, read_back)
        if chunk >= 128 << 10:
            runs_per_read = max(1, MIB // chunk)
            assert calls >= 4 * runs_per_read, f"{calls} sendfile calls: reads of the new clusters were copied"
        else:
            assert calls == 0, "runs of 64 KiB are copied: a sendfile each costs more"
        h.shutdown()
        assert d.stop() == 0
        assert subprocess.run(["qemu-img", "check", "-q", path]).returncode == 0
    finally:
        d.stop()
        os.unlink(path)


def test_qcow2_replies_held_up_by_a_slow_client_never_carry_reused_clusters(tmp_path):
    """A client pipelines 200 zero-copy READs of A (two clusters) and does not read the
    replies for a while, so most are still waiting to be sent. Meanwhile another
    client discards A and flushes (A's cluster is free now, as far as the image
    is concerned), then writes B over 64 clusters (new allocations, which would
    reuse A's cluster) and flushes. Every reply must then carry A's bytes (or
    zeroes, where the discard reached the file first), never B's: the lease
    keeps the cluster from being freed until the replies are sent. The image checks clean after."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = f"/dev/shm/bexd-zc-race-{uuid.uuid4().hex}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "64M"], check=True)
    # A in the first data cluster, then 8 MiB written and discarded: free
    # clusters inside the file, ready to be reused by B.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 128k", "-c",
                    "write -P 0xcc 1M 8M", "-c", "discard 1M 8M", path], check=True,
                   capture_output=True)
    d = Daemon(tmp_path, "bexd", [f"driver=qcow2,node-name=q0,discard=unmap,file.driver=file,"
                                  f"file.filename={path},file.discard=unmap"],
               ["type=nbd,id=e,node-name=q0,name=e,writable=on"])
    try:
        cluster = 65536
        span = 2 * cluster  # a zero-copy READ: 128 KiB and more
        a_data, b_data = b"\xaa" * span, b"\xbb" * cluster
        w = nbd.NBD()
        w.connect_uri(d.uri("e"))
        slow = raw_client(d.sock, b"e")
        count = 200
        kinds = {True: 0, False: 0}

        def race():
            slow.sendall(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, 0, span)
                                  for i in range(count)))
            import time
            time.sleep(0.5)  # the server maps them all; the socket holds a few replies
            w.trim(span, 0)
            w.flush()
            for i in range(64):
                w.pwrite(b_data, (16 + i) * cluster)
            w.flush()
            for i in range(count):
                magic, err, cookie = struct.unpack(">IIQ", recv_exact(slow, 16))
                assert (magic, err, cookie) == (0x67446698, 0, i)
                got = recv_exact(slow, span)
                # A's bytes, or zeroes where the discard reached the file first
                # (a read racing a TRIM may see either); never B's.
                assert set(got) <= {0xaa, 0}, f"reply {i} carried other data: {sorted(set(got))}"
                kinds[got == a_data] += 1

        assert sendfile_calls(d.proc.pid, race) >= count // 2, "the replies were not zero-copy"
        slow.close()
        print(f"\nreplies held up: {kinds[True]} whole A, {kinds[False]} partly zeroed by the discard")
        # The lease is gone: the discarded cluster is freed at the next flush.
        assert w.pread(span, 0) == bytes(span)
        w.flush()
        w.shutdown()
        assert d.stop() == 0
        check = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        if d.alive():
            d.proc.kill()
        os.unlink(path)
