"""aio=io_uring and aio=native: file I/O through bexd's io_uring.

The image lives on the disk (the test's tmp dir, not tmpfs, where small
requests run inline and never reach the ring). With cache.direct=on, aligned
requests go through the ring and unaligned ones take the thread pool with a
bounce buffer; the bytes must be the same either way, and land in the file.
"""

import asyncio
import random
import subprocess

import nbd
import pytest

from conftest import Daemon, daemon_binary, need, qmp_outcome, syscall_count

MIB = 1 << 20
SIZE = 8 * MIB


def qmp(d, command, arguments=None):
    return asyncio.run(qmp_outcome(d.qmp_sock, command, arguments or {}))


@pytest.fixture
def disk_image(tmp_path):
    path = tmp_path / "disk.img"
    data = bytearray(random.Random(3).randbytes(SIZE))
    path.write_bytes(data)
    return path, data


# (offset, length): aligned 4 KiB, 64 KiB and 1 MiB pieces, one that ends the
# disk, and unaligned ones (the pool's bounce path under O_DIRECT).
WRITES = [(0, 4096), (4096 * 7, 65536), (3 * MIB, MIB), (SIZE - 8192, 8192),
          (1000, 3000), (2 * MIB - 100, 300), (5 * MIB + 512, 4096)]


@pytest.mark.parametrize("aio,direct", [("io_uring", "on"), ("io_uring", "off"), ("native", "on")])
def test_reads_and_writes_through_the_ring_land_in_the_file(tmp_path, disk_image, aio, direct):
    path, want = disk_image
    d = Daemon(tmp_path, "bexd", [f"driver=file,node-name=f0,filename={path},aio={aio},"
                                  f"cache.direct={direct}"],
               ["type=nbd,id=e,node-name=f0,name=e,writable=on"])
    h = nbd.NBD()
    # The unaligned requests are meant: bexd (as QEMU) serves them with a
    # bounce buffer, though it advertises 512-byte blocks under O_DIRECT.
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
    h.connect_uri(d.uri("e"))
    rng = random.Random(5)

    def io():
        for i, (off, length) in enumerate(WRITES):
            data = rng.randbytes(length)
            flags = nbd.CMD_FLAG_FUA if i % 2 else 0
            h.pwrite(data, off, flags)
            want[off:off + length] = data
        for off, length in WRITES + [(0, SIZE), (12345, 54321)]:
            assert h.pread(length, off) == bytes(want[off:off + length]), (off, length)
        # Many in flight at once.
        bufs = [nbd.Buffer(4096) for _ in range(64)]
        offs = [rng.randrange(SIZE // 4096) * 4096 for _ in bufs]
        cookies = [h.aio_pread(b, o) for b, o in zip(bufs, offs)]
        for c in cookies:
            while not h.aio_command_completed(c):
                h.poll(-1)
        for b, o in zip(bufs, offs):
            assert b.to_bytearray() == want[o:o + 4096], o
        h.flush()

    calls = syscall_count(d.proc.pid, "io_uring_enter", io)
    assert calls > 0, "no request went through the io_uring"
    h.shutdown()
    assert d.stop() == 0
    assert path.read_bytes() == bytes(want)


def test_qemu_img_convert_through_the_ring_copies_the_image(tmp_path, disk_image):
    path, want = disk_image
    d = Daemon(tmp_path, "bexd", [f"driver=file,node-name=f0,filename={path},aio=io_uring,"
                                  "cache.direct=on"],
               ["type=nbd,id=e,node-name=f0,name=e,writable=on"])
    out = tmp_path / "copy.img"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", d.uri("e"), str(out)],
                   check=True)
    assert out.read_bytes() == bytes(want)
    # And back: qemu-img writes the export through the ring.
    src = tmp_path / "src.img"
    src.write_bytes(random.Random(9).randbytes(SIZE))
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), d.uri("e")],
                   check=True)
    assert subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src),
                           d.uri("e")], capture_output=True).returncode == 0
    assert d.stop() == 0
    assert path.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("kind", ["bexd", "qsd"])
def test_ring_writes_mark_the_bitmaps_of_the_raw_and_the_file_node(tmp_path, disk_image, kind):
    """Writes through raw over a file on the ring skip the raw driver's own
    write path, so the node marks raw's bitmap and raw the file node's:
    the counts are qemu-storage-daemon's."""
    path, _ = disk_image
    d = Daemon(tmp_path, kind, [f"driver=file,node-name=f0,filename={path},aio=io_uring,"
                                "cache.direct=on", "driver=raw,node-name=r0,file=f0"],
               ["type=nbd,id=e,node-name=r0,name=e,writable=on"])
    for node in ("f0", "r0"):
        assert qmp(d, "block-dirty-bitmap-add", {"node": node, "name": "b",
                                                 "granularity": 65536}) == ("ok", {})
    h = nbd.NBD()
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
    h.connect_uri(d.uri("e"))
    h.pwrite(b"\x01" * 4096, 0)
    h.pwrite(b"\x02" * MIB, 2 * MIB)
    h.pwrite(b"\x03" * 100, 6 * MIB + 10)  # unaligned: the pool's path
    h.flush()
    h.shutdown()
    kind_, listed = qmp(d, "query-named-block-nodes")
    counts = {n["node-name"]: n["dirty-bitmaps"][0]["count"] for n in listed
              if n["node-name"] in ("f0", "r0")}
    assert counts == {"f0": 65536 * 18, "r0": 65536 * 18}
    assert d.stop() == 0


@pytest.mark.parametrize("kind", ["bexd", "qsd"])
def test_block_status_and_sparse_reads_of_a_disk_image_with_holes(tmp_path, kind):
    """On a disk, a query inside the data extent found last is answered
    without the pool (`try_block_status_now`); the map and the sparse reads
    must be the same as any other way: qemu-storage-daemon's."""
    need("nbdinfo")
    path = tmp_path / "holes.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off in (MIB, 5 * MIB):
            f.seek(off)
            f.write(b"\x42" * MIB)
    d = Daemon(tmp_path, kind, [f"driver=file,node-name=f0,filename={path},aio=io_uring,"
                                "cache.direct=on"],
               ["type=nbd,id=e,node-name=f0,name=e"])
    maps = []
    for _ in range(2):
        out = subprocess.run(["nbdinfo", "--map", d.uri("e")], check=True, capture_output=True,
                             text=True).stdout
        maps.append([line.split()[:3] for line in out.splitlines()])
    assert maps[0] == maps[1]
    assert [m for m in maps[0] if m[2] == "0"] == [[str(MIB), str(MIB), "0"],
                                                    [str(5 * MIB), str(MIB), "0"]]
    h = nbd.NBD()
    h.connect_uri(d.uri("e"))
    for off, length in [(0, 2 * MIB), (MIB + 65536, 256 << 10), (4 * MIB, 3 * MIB)]:
        want = bytes(path.read_bytes()[off:off + length])
        assert h.pread(length, off) == want, (off, length)
    h.shutdown()
    assert d.stop() == 0


@pytest.mark.parametrize("kind", ["bexd", "qsd"])
def test_aio_native_without_cache_direct_is_refused_as_qemu_refuses_it(tmp_path, disk_image, kind):
    path, _ = disk_image
    p = subprocess.run(daemon_binary(kind) + ["--blockdev", f"driver=file,node-name=f0,filename={path},"
                                              "aio=native"], capture_output=True, text=True, timeout=20)
    assert p.returncode == 1
    assert p.stderr.strip().endswith("aio=native was specified, but it requires cache.direct=on, "
                                     "which was not specified.")
    d = Daemon(tmp_path, kind, [], [])
    kind_, err = qmp(d, "blockdev-add", {"driver": "file", "node-name": "f1", "filename": str(path),
                                         "aio": "native"})
    assert kind_ == "GenericError"
    assert "requires cache.direct=on" in err
    assert d.stop() == 0


@pytest.mark.parametrize("layout", ["64k-clusters", "4k-clusters", "backing", "compressed"])
def test_qcow2_reads_through_the_ring_carry_the_image_bytes(tmp_path, disk_image, layout):
    """qcow2 over a file with aio=io_uring: a read of this layer's data
    clusters whose L2 tables are cached goes through the ring (under a lease
    on the mapping); the first read of a table, backing and compressed data
    and holes take the pool. Every read returns the image's bytes."""
    raw, want = disk_image
    if layout == "compressed":
        # Compressible halves: those clusters are stored compressed.
        for off in range(0, SIZE, 2 * MIB):
            want[off:off + MIB] = bytes([off // MIB]) * MIB
        raw.write_bytes(bytes(want))
    path = tmp_path / "disk.qcow2"
    if layout == "backing":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(raw), "-F", "raw",
                        str(path)], check=True)
        # Every other MiB in the overlay.
        cmds = []
        for off in range(0, SIZE, 2 * MIB):
            chunk = tmp_path / f"c{off}"
            chunk.write_bytes(bytes(want[off:off + MIB]))
            cmds += ["-c", f"write -s {chunk} {off} {MIB}"]
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True, capture_output=True)
    else:
        opts = ["-o", "cluster_size=4096"] if layout == "4k-clusters" else []
        opts += ["-c"] if layout == "compressed" else []
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *opts, str(raw),
                        str(path)], check=True)
    d = Daemon(tmp_path, "bexd", [f"driver=qcow2,node-name=q0,file.driver=file,file.filename={path},"
                                  "file.aio=io_uring,file.cache.direct=on"],
               ["type=nbd,id=e,node-name=q0,name=e,writable=on"])
    h = nbd.NBD()
    h.connect_uri(d.uri("e"))

    def read_all():
        for _ in range(2):
            for off, length in [(0, 4096), (65536, 65536), (MIB - 4096, 8192), (3 * MIB, MIB),
                                (SIZE - 4096, 4096), (12288, 200000)]:
                assert h.pread(length, off) == bytes(want[off:off + length]), (layout, off, length)
            for off in range(0, SIZE, MIB):
                assert h.pread(MIB, off) == bytes(want[off:off + MIB]), (layout, off)

    calls = syscall_count(d.proc.pid, "io_uring_enter", read_all)
    # (Random data does not compress: qemu-img -c keeps most clusters plain.)
    assert calls > 0, "no qcow2 read went through the io_uring"
    # Writes still go through qcow2 (allocation, refcounts), and read back.
    h.pwrite(b"\x77" * 65536, 2 * MIB + 4096)
    h.flush()
    assert h.pread(65536, 2 * MIB + 4096) == b"\x77" * 65536
    h.shutdown()
    assert d.stop() == 0
    assert subprocess.run(["qemu-img", "check", "-q", str(path)]).returncode == 0
