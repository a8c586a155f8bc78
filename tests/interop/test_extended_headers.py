"""Extended headers (NBD_OPT_EXTENDED_HEADERS, issue 17 items 1 and 2).

- Parity: the same handshakes and requests, sent by a small raw client to qemu-nbd 10 and to
  bexd, get the same replies (cookie, flags, types, the request offset in the header, lengths,
  payloads: data, holes, extents, error texts).
- qemu-img and qemu-io 10 ask for extended headers by default: bexd's own account of the
  connection (its closing debug line) proves they got them, and the data is checked.
- libnbd 1.14 (nbdinfo, nbdcopy) does not know them and keeps working with structured replies.
"""

import json
import re
import socket
import struct
import subprocess

import pytest

from conftest import daemon_binary, file_export, need, recv_exact, wait_until, can_connect_unix

IHAVEOPT = 0x49484156454F5054
EXT_REQUEST = 0x21E41C71
EXT_REPLY = 0x6E8A278C
OPT_GO, OPT_INFO, OPT_STRUCTURED, OPT_SET_META, OPT_EXTENDED = 7, 6, 8, 10, 11
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = 0, 1, 2, 3, 4, 5, 6, 7
FUA, REQ_ONE, PAYLOAD_LEN = 1, 8, 0x20
FLAG_CAN_MULTI_CONN = 0x100
SIZE = 8 << 30  # past 4 GiB, so one whole-export request needs 64-bit lengths


def option(s, opt, payload=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(payload)) + payload)


def option_reply(s):
    _, opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
    return opt, rtype, recv_exact(s, length)


def option_replies(s):
    """Replies up to the final one (ACK or an error)."""
    out = []
    while True:
        r = option_reply(s)
        out.append(r)
        if r[1] == 1 or r[1] & 0x80000000:
            return out


def connect(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(str(path))
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    return s


def name_payload(name=b"disk"):
    return struct.pack(">I", len(name)) + name


def meta_payload(queries, name=b"disk"):
    p = name_payload(name) + struct.pack(">I", len(queries))
    for q in queries:
        p += struct.pack(">I", len(q)) + q
    return p


def mask_multi_conn(replies):
    """qemu-nbd without -e serves one client and so never sets CAN_MULTI_CONN; the
    qemu-storage-daemon form (bexd's here) does. Only that bit is masked."""
    out = []
    for opt, rtype, data in replies:
        if rtype == 3 and data[:2] == b"\0\0":  # NBD_INFO_EXPORT
            flags = struct.unpack(">H", data[10:12])[0] & ~FLAG_CAN_MULTI_CONN
            data = data[:10] + struct.pack(">H", flags)
        out.append((opt, rtype, data))
    return out


def extended_session(path, queries=(b"base:allocation", b"qemu:allocation-depth")):
    s = connect(path)
    option(s, OPT_EXTENDED)
    assert option_reply(s)[1] == 1
    log = []
    if queries is not None:
        option(s, OPT_SET_META, meta_payload(list(queries)))
        log += option_replies(s)
    option(s, OPT_GO, name_payload() + struct.pack(">H", 0))
    log += mask_multi_conn(option_replies(s))
    return s, log


def request(s, command, offset, length, flags=0, cookie=1, payload=b""):
    s.sendall(struct.pack(">IHHQQQ", EXT_REQUEST, flags, command, cookie, offset, length)
              + payload)


def reply(s):
    """Every chunk of one reply: (flags, type, cookie, offset, length, payload)."""
    chunks = []
    while True:
        magic, flags, rtype, cookie, offset, length = struct.unpack(">IHHQQQ", recv_exact(s, 32))
        assert magic == EXT_REPLY, hex(magic)
        chunks.append((flags, rtype, cookie, offset, length, recv_exact(s, length)))
        if flags & 1:
            return chunks


def closed(s):
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, socket.timeout):
        return True


def status_payload(ids, length=SIZE):
    return struct.pack(">Q", length) + b"".join(struct.pack(">I", i) for i in ids)


def exchange(path):
    """The recorded conversation: option replies, then each request's reply."""
    log = []
    s = connect(path)
    option(s, OPT_EXTENDED, b"x")
    log.append(("extended headers with data", option_reply(s)))
    option(s, OPT_EXTENDED)
    log.append(("extended headers", option_reply(s)))
    option(s, OPT_EXTENDED)
    log.append(("extended headers twice", option_reply(s)))
    option(s, OPT_STRUCTURED)
    log.append(("structured reply after", option_reply(s)))
    option(s, OPT_INFO, name_payload() + struct.pack(">H", 0))
    log.append(("info", mask_multi_conn(option_replies(s))))
    option(s, 1, b"disk")  # EXPORT_NAME cannot answer in extended mode: the client is dropped
    log.append(("export name after", closed(s)))
    s.close()

    s = connect(path)
    option(s, OPT_STRUCTURED)
    option_reply(s)
    option(s, OPT_EXTENDED)
    log.append(("extended after structured", option_reply(s)))
    s.close()

    s, negotiated = extended_session(path)
    log.append(("go", negotiated))
    steps = [
        ("write with PAYLOAD_LEN", WRITE, 0, 4096, PAYLOAD_LEN, b"A" * 4096),
        ("write without PAYLOAD_LEN", WRITE, 8192, 4096, 0, b"B" * 4096),
        ("write high", WRITE, 5 << 30, 4096, PAYLOAD_LEN | FUA, b"C" * 4096),
        ("read", READ, 0, 4096, 0, b""),
        ("sparse read", READ, 0, 1 << 20, 0, b""),
        ("zero-length read", READ, 0, 0, 0, b""),
        ("block status, whole export", BLOCK_STATUS, 0, SIZE, 0, b""),
        ("block status REQ_ONE", BLOCK_STATUS, 0, SIZE, REQ_ONE, b""),
    ]
    for label, ids in [("[0]", [0]), ("[1]", [1]), ("[1, 0]", [1, 0]), ("unknown id", [5]),
                       ("repeated id", [0, 0]), ("no id", [])]:
        pl = status_payload(ids)
        steps.append((f"block status filter {label}", BLOCK_STATUS, 0, len(pl), PAYLOAD_LEN, pl))
    steps += [
        ("block status filter cut short", BLOCK_STATUS, 0, 6, PAYLOAD_LEN, b"\0" * 6),
        ("block status filter, zero length", BLOCK_STATUS, 0, 12, PAYLOAD_LEN,
         status_payload([0], 0)),
        ("block status filter past the end", BLOCK_STATUS, 0, 12, PAYLOAD_LEN,
         status_payload([0], 1 << 40)),
        ("read with a payload", READ, 0, 4096, PAYLOAD_LEN, b"x" * 4096),
        ("trim with a payload", TRIM, 0, 8, PAYLOAD_LEN, b"y" * 8),
        ("oversized read", READ, 0, (32 << 20) + 1, 0, b""),
        ("oversized cache", CACHE, 0, (32 << 20) + 1, 0, b""),
        ("cache", CACHE, 0, 1 << 20, 0, b""),
        ("unknown command", 42, 0, 0, 0, b""),
        ("bad flag", READ, 0, 4096, 0x40, b""),
        ("flush", FLUSH, 0, 0, 0, b""),
        # Zeroing allocates on ext4 (neither server may punch holes by default), so a
        # modest range; past 4 GiB all the same.
        ("write zeroes", WRITE_ZEROES, 5 << 30, 64 << 20, 0, b""),
        ("block status after zeroing", BLOCK_STATUS, 0, SIZE, 0, b""),
        # One TRIM over the whole export: a 64-bit length (both servers ignore discards here).
        ("trim, whole export", TRIM, 0, SIZE, 0, b""),
    ]
    for cookie, (label, command, offset, length, flags, payload) in enumerate(steps, 100):
        request(s, command, offset, length, flags, cookie, payload)
        log.append((label, reply(s)))
    # A WRITE payload too long to take in: EINVAL, then the client is dropped.
    request(s, WRITE, 0, (32 << 20) + 1, PAYLOAD_LEN, 999)
    log.append(("oversized write", reply(s), closed(s)))
    s.close()

    # A header with the compact magic: QEMU answers with the fields it read, then drops us.
    s, _ = extended_session(path)
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, READ, 7, 512, 4096) + b"\0" * 4)
    log.append(("compact header in extended mode", reply(s), closed(s)))
    s.close()
    return log


@pytest.fixture
def qemu_nbd(tmp_path):
    """qemu-nbd 10 serving a fresh sparse image as 'disk' with allocation depth."""
    need("qemu-nbd")
    img = tmp_path / "q.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    sock = tmp_path / "qemu-nbd.sock"
    proc = subprocess.Popen(["qemu-nbd", "-t", "-k", str(sock), "-x", "disk", "-f", "raw", "-A",
                             str(img)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_until(lambda: can_connect_unix(sock), what="qemu-nbd to listen")
    yield sock
    proc.terminate()
    proc.wait(timeout=20)


def bexd_debug(monkeypatch):
    monkeypatch.setenv("BEXD_LOG", "bexd::nbd_server=debug")


def closings(d):
    """bexd's closing lines: (reply shape, request count) per connection."""
    d.stderr.flush()
    text = re.sub(r"\x1b\[[0-9;]*m", "", (d.tmp / f"{d.kind}.stderr").read_text())
    return [(m.group(1), int(m.group(2)))
            for m in re.finditer(r"NBD connection closed .*replies=(\w+) requests=(\d+)", text)]


def test_extended_headers_replies_match_qemu_nbd_byte_for_byte(start, tmp_path, qemu_nbd):
    img = tmp_path / "b.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    d = start(*file_export(img, extra=",allocation-depth=on"), which="bexd")
    want = exchange(qemu_nbd)
    got = exchange(d.sock)
    # bexd's deliberate differences (ENOSPC for a write past the end, small reads whole)
    # are left out of these steps.
    assert [g[0] for g in got] == [w[0] for w in want]
    for w, g in zip(want, got):
        assert g == w, f"{w[0]}: qemu-nbd {short(w[1:])}, bexd {short(g[1:])}"


def short(value):
    """A reply for a failure message: payloads longer than 64 bytes cut."""
    return re.sub(r"(b'(?:[^'\\]|\\.){64})(?:[^'\\]|\\.)+'", r"\1...'", repr(value))


@pytest.mark.bexd_only("qemu-nbd 10 aborts on this request (an assertion in "
                       "nbd_co_block_status_payload_read); bexd answers it")
def test_block_status_filter_without_any_context_is_refused(start, image):
    d = start(*file_export(image()))
    s, _ = extended_session(d.sock, queries=None)
    pl = status_payload([0], 4096)
    request(s, BLOCK_STATUS, 0, len(pl), PAYLOAD_LEN, 5, pl)
    chunks = reply(s)
    assert [(c[1], c[5][6:]) for c in chunks] == [(0x8001, b"CMD_BLOCK_STATUS not negotiated")]
    request(s, READ, 0, 512, 0, 6)
    assert reply(s)[0][5][8:] == b"\0" * 512
    s.close()
    assert d.alive()


@pytest.mark.bexd_only("proven from bexd's own closing debug line")
def test_qemu_io_and_qemu_img_negotiate_extended_headers_and_data_is_right(
        start, tmp_path, monkeypatch):
    need("qemu-io")
    bexd_debug(monkeypatch)
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    d = start(*file_export(img), which="bexd")
    uri = d.uri("disk")
    out = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 5G 1M",
                          "-c", "read -P 0x5a 5G 1M", uri],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, out
    mapped = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", uri],
                                       capture_output=True, text=True, check=True,
                                       timeout=60).stdout)
    data = [(e["start"], e["length"]) for e in mapped if e["data"]]
    assert data == [(5 << 30, 1 << 20)], mapped
    wait_until(lambda: len(closings(d)) >= 2, what="both connections to close")
    (io_shape, _), (map_shape, map_requests) = closings(d)
    assert (io_shape, map_shape) == ("Extended", "Extended")
    # The 8 GiB map is three extents: with 64-bit block status a handful of requests
    # (compact headers would need one per 4 GiB at least).
    assert map_requests <= 8, map_requests
    with open(img, "rb") as f:
        f.seek(5 << 30)
        assert f.read(1 << 20) == b"\x5a" * (1 << 20)


@pytest.mark.bexd_only("proven from bexd's own closing debug line")
def test_libnbd_1_14_without_extended_headers_still_works(start, tmp_path, monkeypatch):
    need("nbdinfo")
    need("nbdcopy")
    bexd_debug(monkeypatch)
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(b"\x33" * 65536)
    d = start(*file_export(img, writable=False), which="bexd")
    info = subprocess.run(["nbdinfo", "--map", d.uri("disk")], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    assert "data" in info and "hole" in info, info
    out = tmp_path / "copy.img"
    subprocess.run(["nbdcopy", d.uri("disk"), str(out)], check=True, timeout=60)
    assert out.read_bytes() == img.read_bytes()
    wait_until(lambda: len(closings(d)) >= 2, what="the libnbd connections to close")
    assert {shape for shape, _ in closings(d)} == {"Structured"}
