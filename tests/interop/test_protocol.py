"""The protocol as libnbd sees it: flags, sizes, every command, every error path.

libnbd reports errors with `errno` set to the name ('EINVAL'), not the number.
"""

import time

import nbd
import pytest

from conftest import file_export

MIB = 1 << 20


def connect(d, name="disk", strict=True, contexts=("base:allocation",)):
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    if not strict:
        h.set_strict_mode(0)
    h.set_export_name(name)
    h.connect_uri(d.uri(name))
    return h


def test_writable_export_flags_match_qemu(start, image):
    d = start(*file_export(image(4 * MIB)))
    h = connect(d)
    assert not h.is_read_only()
    assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
    assert h.can_fast_zero() and h.can_cache() and h.can_df() and h.can_multi_conn()
    assert not h.is_rotational()
    assert h.get_size() == 4 * MIB
    assert h.can_meta_context("base:allocation")


def test_read_only_export_flags(start, image):
    d = start(*file_export(image(4 * MIB), writable=False))
    h = connect(d)
    assert h.is_read_only()
    assert not h.can_trim() and not h.can_zero()
    assert h.can_flush() and h.can_multi_conn()


def test_max_connections_1_disables_multi_conn(start, image):
    d = start(*file_export(image(4 * MIB)), server_extra=",max-connections=1")
    assert not connect(d).can_multi_conn()


def test_block_size_constraints(start, image):
    d = start(*file_export(image(4 * MIB)))
    h = connect(d)
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MIB


def test_every_command_works(start, image):
    d = start(*file_export(image(8 * MIB)))
    h = connect(d)
    h.pwrite(b"a" * 65536, 0, nbd.CMD_FLAG_FUA)
    assert h.pread(65536, 0) == b"a" * 65536
    h.flush()
    h.zero(4096, 4096)
    assert h.pread(4096, 4096) == bytes(4096)
    h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(4096, 8192) == bytes(4096)
    h.trim(MIB, MIB)
    h.cache(MIB, 0)
    seen = []
    h.pread_structured(65536, 0, lambda buf, off, status, err: seen.append((off, len(buf))) or 0)
    assert sum(n for _, n in seen) == 65536


def test_fast_zero_either_succeeds_or_reports_enotsup(start, image):
    d = start(*file_export(image(4 * MIB)))
    h = connect(d)
    h.pwrite(b"z" * 8192, 0)
    try:
        h.zero(8192, 0, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(8192, 0) == bytes(8192)
    except nbd.Error as e:
        assert e.errno == "ENOTSUP"
        assert h.pread(8192, 0) == b"z" * 8192, "a failed fast zero changes nothing"


def test_block_status_reports_data_and_holes(start, image):
    img = image(8 * MIB, [(MIB, b"d" * MIB)])
    d = start(*file_export(img, writable=False))
    h = connect(d)
    entries = []

    def cb(metacontext, offset, extents, err):
        assert metacontext == "base:allocation"
        entries.extend(zip(extents[0::2], extents[1::2]))
        return 0

    h.block_status(8 * MIB, 0, cb)
    pos, layout = 0, []
    for length, flags in entries:
        layout.append((pos, length, flags))
        pos += length
    assert (MIB, MIB, 0) in layout
    assert layout[0] == (0, MIB, 3)


def test_write_to_read_only_export_is_refused_and_connection_survives(start, image):
    d = start(*file_export(image(4 * MIB), writable=False))
    h = connect(d, strict=False)
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 512, 0)
    assert e.value.errno in ("EPERM", "EINVAL")
    assert h.pread(512, 0) == bytes(512)


def test_write_past_end_is_refused(start, image):
    d = start(*file_export(image(4 * MIB)))
    h = connect(d, strict=False)
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 1024, 4 * MIB - 512)
    assert e.value.errno in ("ENOSPC", "EINVAL")
    with pytest.raises(nbd.Error) as e:
        h.pread(1024, 4 * MIB - 512)
    assert e.value.errno == "EINVAL"
    assert h.pread(512, 4 * MIB - 512) == bytes(512)


def test_oversized_read_is_refused_and_connection_survives(start, image):
    d = start(*file_export(image(64 * MIB)))
    h = connect(d, strict=False)
    with pytest.raises(nbd.Error) as e:
        h.pread(33 * MIB, 0)
    assert e.value.errno in ("EINVAL", "EOVERFLOW")
    assert h.pread(4096, 0) == bytes(4096)


def test_block_status_without_context_is_einval(start, image):
    d = start(*file_export(image(4 * MIB)))
    h = connect(d, strict=False, contexts=())
    with pytest.raises(nbd.Error) as e:
        h.block_status(4096, 0, lambda *a: 0)
    assert e.value.errno == "EINVAL"


def test_unknown_export_is_refused(start, image):
    d = start(*file_export(image(4 * MIB)))
    with pytest.raises(nbd.Error):
        connect(d, name="nope")
    assert d.alive()


def test_opt_list_and_info(start, image):
    d = start(*file_export(image(4 * MIB), extra=",description=hello"))
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(d.uri(""))
    names = []
    h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
    assert names == [("disk", "hello")]
    h.set_export_name("disk")
    h.opt_info()
    assert h.get_size() == 4 * MIB
    assert h.get_export_description() == "hello"
    h.opt_abort()


def test_multi_conn_writes_visible_after_flush(start, image):
    d = start(*file_export(image(4 * MIB)))
    a, b = connect(d), connect(d)
    a.pwrite(b"A" * 4096, 0)
    b.pwrite(b"B" * 4096, 4096)
    a.flush()
    assert b.pread(4096, 0) == b"A" * 4096
    assert a.pread(4096, 4096) == b"B" * 4096


def test_many_requests_in_flight_complete(start, image):
    d = start(*file_export(image(16 * MIB)))
    h = connect(d)
    bufs = []
    for i in range(64):
        buf = nbd.Buffer.from_bytearray(bytearray([i]) * 65536)
        bufs.append(buf)
        h.aio_pwrite(buf, i * 65536)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for i in range(64):
        assert h.pread(65536, i * 65536) == bytes([i]) * 65536


def test_df_read_is_one_data_chunk(start, image):
    img = image(4 * MIB, [(0, b"x" * 4096)])
    d = start(*file_export(img, writable=False))
    h = connect(d)
    chunks = []
    h.pread_structured(256 * 1024, 0, lambda buf, off, status, err: chunks.append(status) or 0, nbd.CMD_FLAG_DF)
    assert chunks == [nbd.READ_DATA]


def test_sparse_read_sends_holes(start, image):
    img = image(4 * MIB, [(0, b"x" * 4096)])
    d = start(*file_export(img, writable=False))
    h = connect(d)
    chunks = []
    data = h.pread_structured(MIB, 0, lambda buf, off, status, err: chunks.append((status, off, len(buf))) or 0)
    assert data[:4096] == b"x" * 4096 and data[4096:] == bytes(MIB - 4096)
    assert (nbd.READ_HOLE, 4096, MIB - 4096) in chunks


def test_block_status_req_one_returns_one_extent(start, image):
    img = image(8 * MIB, [(MIB, b"d" * MIB)])
    d = start(*file_export(img, writable=False))
    h = connect(d)
    seen = []
    h.block_status(8 * MIB, 0, lambda ctx, off, extents, err: seen.append(extents) or 0, nbd.CMD_FLAG_REQ_ONE)
    assert seen == [[MIB, 3]]


def test_flushed_write_is_in_the_file(start, image):
    img = image(4 * MIB)
    d = start(*file_export(img))
    h = connect(d)
    h.pwrite(b"durable!" * 512, 8192)
    h.flush()
    with open(img, "rb") as f:
        f.seek(8192)
        assert f.read(4096) == b"durable!" * 512


def test_client_vanishing_with_requests_in_flight(start, image):
    d = start(*file_export(image(16 * MIB)))
    h = connect(d)
    for i in range(32):
        h.aio_pread(nbd.Buffer(65536), i * 65536)
    del h  # closes the socket with replies still owed
    other = connect(d)
    assert other.pread(4096, 0) == bytes(4096)
    assert d.alive()


def test_read_of_a_hole_is_one_hole_chunk(start, image):
    d = start(*file_export(image(4 * MIB), writable=False))
    h = connect(d)
    chunks = []
    data = h.pread_structured(MIB, MIB, lambda buf, off, status, err: chunks.append((status, off, len(buf))) or 0)
    assert data == bytes(MIB)
    assert chunks == [(nbd.READ_HOLE, MIB, MIB)]


def test_requests_on_one_connection_run_concurrently(start):
    """null-co with latency-ns=1s: 8 reads issued together finish together,
    not one after another (8 s). The bound is 4x the latency, far from serial."""
    import time
    d = start(["driver=null-co,node-name=slow,size=1048576,latency-ns=1000000000,read-zeroes=on"],
              ["type=nbd,id=e0,node-name=slow,name=disk"])
    h = connect(d)
    began = time.monotonic()
    for i in range(8):
        h.aio_pread(nbd.Buffer(4096), i * 4096)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert time.monotonic() - began < 4.0


def test_sigterm_finishes_in_flight_requests_then_exits_zero(start):
    """A read that takes 1 s is in flight when SIGTERM arrives: it is answered, then the daemon exits 0."""
    import signal
    d = start(["driver=null-co,node-name=slow,size=1048576,latency-ns=1000000000,read-zeroes=on"],
              ["type=nbd,id=e0,node-name=slow,name=disk"])
    h = connect(d)
    buf = nbd.Buffer(4096)
    cookie = h.aio_pread(buf, 0)
    # In flight means read by the server: give it 0.3 s of the read's 1 s. Sent and signalled at
    # once, SIGTERM could arrive first, and qemu-storage-daemon then resets the connection with
    # the request unread (1 run in 15 against it failed so; bexd's read was never that late).
    time.sleep(0.3)
    d.proc.send_signal(signal.SIGTERM)
    while not h.aio_command_completed(cookie):
        h.poll(-1)
    assert buf.to_bytearray() == bytearray(4096)
    assert d.proc.wait(timeout=20) == 0
