"""Injected storage faults (the blkdebug driver): the client gets the right
NBD error, the connection and export survive, nothing acknowledged is lost,
and a failed flush is never reported as success."""

import os

import nbd
import pytest

MIB = 1 << 20


@pytest.fixture(autouse=True)
def bexd_only():
    if os.environ.get("DAEMON", "bexd") != "bexd":
        pytest.skip("bexd's blkdebug rules are always armed; QEMU's need events")


def faulty(start, image, rules, writable=True):
    img = image(4 * MIB)
    spec = f"driver=blkdebug,node-name=dbg,image.driver=file,image.filename={img}"
    for i, rule in enumerate(rules):
        for key, value in rule.items():
            spec += f",inject-error.{i}.{key}={value}"
    w = "on" if writable else "off"
    d = start([spec], [f"type=nbd,id=e0,node-name=dbg,name=disk,writable={w}"])
    h = nbd.NBD()
    h.connect_uri(d.uri("disk"))
    return d, h, img


def test_read_error_at_a_sector_is_eio_and_the_rest_reads(start, image):
    d, h, _ = faulty(start, image, [{"event": "read_aio", "sector": 16}])
    with pytest.raises(nbd.Error) as e:
        h.pread(4096, 8192)
    assert e.value.errno == "EIO"
    assert h.pread(4096, 0) == bytes(4096)
    other = nbd.NBD()
    other.connect_uri(d.uri("disk"))
    assert other.pread(512, MIB) == bytes(512)


def test_write_error_enospc_reaches_the_client(start, image):
    _, h, _ = faulty(start, image, [{"event": "write_aio", "errno": 28, "once": "on"}])
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 4096, 0)
    assert e.value.errno == "ENOSPC"
    h.pwrite(b"y" * 4096, 0)
    assert h.pread(4096, 0) == b"y" * 4096


def test_failed_flush_is_never_success_and_acknowledged_data_survives(start, image):
    d, h, img = faulty(start, image, [{"event": "flush_to_disk", "once": "on"}])
    h.pwrite(b"kept" * 1024, 65536)
    with pytest.raises(nbd.Error) as e:
        h.flush()
    assert e.value.errno == "EIO"
    h.flush()
    assert h.pread(4096, 65536) == b"kept" * 1024
    assert d.stop() == 0
    with open(img, "rb") as f:
        f.seek(65536)
        assert f.read(4096) == b"kept" * 1024


def test_error_after_n_requests(start, image):
    _, h, _ = faulty(start, image, [{"event": "read_aio", "x-after": 3, "once": "on"}])
    for _ in range(3):
        h.pread(512, 0)
    with pytest.raises(nbd.Error):
        h.pread(512, 0)
    h.pread(512, 0)
