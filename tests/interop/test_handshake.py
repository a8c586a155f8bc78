"""Hostile and broken clients over raw sockets: the daemon answers or drops
them, and keeps serving everyone else."""

import socket
import struct
import time

import nbd

from conftest import file_export, recv_exact

IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x0003E889045565A9
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
OPT_STARTTLS = 5
OPT_LIST = 3
OPT_GO = 7


def raw(d):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(d.sock))
    greeting = recv_exact(s, 18)
    assert greeting[:8] == b"NBDMAGIC"
    assert struct.unpack(">Q", greeting[8:16])[0] == IHAVEOPT
    s.sendall(struct.pack(">I", 3))  # fixed newstyle + no zeroes
    return s



def option(s, opt, payload=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(payload)) + payload)


def reply(s):
    magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
    assert magic == REP_MAGIC
    return opt, rtype, recv_exact(s, length)


def is_closed(s, timeout=10):
    """True once the server closes the connection (after any final reply it sends)."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def assert_still_serving(d):
    h = nbd.NBD()
    h.connect_uri(d.uri("disk"))
    assert h.pread(512, 0) == bytes(512)


def test_unknown_option_gets_err_unsup_and_session_continues(start, image):
    d = start(*file_export(image()))
    s = raw(d)
    option(s, 0x1234, b"junk")
    assert reply(s)[1] == REP_ERR_UNSUP
    option(s, OPT_LIST)
    _, rtype, _ = reply(s)
    assert rtype == 2  # REP_SERVER
    assert reply(s)[1] == 1  # ACK


def test_starttls_without_tls_is_err_policy(start, image):
    d = start(*file_export(image()))
    s = raw(d)
    option(s, OPT_STARTTLS)
    assert reply(s)[1] == REP_ERR_POLICY


def test_wrong_option_magic_disconnects(start, image):
    d = start(*file_export(image()))
    s = raw(d)
    s.sendall(struct.pack(">QII", 0xDEADBEEF, OPT_LIST, 0))
    assert is_closed(s)
    assert_still_serving(d)


def test_absurd_option_length_disconnects(start, image):
    d = start(*file_export(image()))
    s = raw(d)
    s.sendall(struct.pack(">QII", IHAVEOPT, 0x99, 0x7FFFFFFF))
    assert is_closed(s)
    assert_still_serving(d)


def test_unknown_client_flags_disconnect(start, image):
    d = start(*file_export(image()))
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(d.sock))
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", 0x80))
    assert is_closed(s)
    assert_still_serving(d)


def test_silent_client_dropped_after_handshake_limit(start, image):
    d = start(*file_export(image()), server_extra=",handshake-max-seconds=1")
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(d.sock))
    recv_exact(s, 18)
    began = time.monotonic()
    assert is_closed(s)
    assert 0.5 < time.monotonic() - began < 8
    assert_still_serving(d)


def go(s, name=b"disk"):
    option(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    while True:
        _, rtype, _ = reply(s)
        if rtype == 1:
            return
        assert rtype == 3, f"unexpected reply {rtype:#x}"


def test_client_vanishing_mid_write_payload_does_not_disturb_others(start, image):
    d = start(*file_export(image()))
    other = nbd.NBD()
    other.connect_uri(d.uri("disk"))
    s = raw(d)
    go(s)
    # A 1 MiB WRITE header followed by only part of the payload, then gone.
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 1 << 20) + b"x" * 1000)
    s.close()
    other.pwrite(b"y" * 4096, 0)
    other.flush()
    assert other.pread(4096, 0) == b"y" * 4096
    assert d.alive()


def test_garbage_after_handshake_disconnects_only_that_client(start, image):
    d = start(*file_export(image()))
    s = raw(d)
    go(s)
    s.sendall(b"\x00" * 28)
    assert is_closed(s)
    assert_still_serving(d)


def test_oversized_write_header_disconnects(start, image):
    d = start(*file_export(image()))
    s = raw(d)
    go(s)
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 64 << 20))
    assert is_closed(s)
    assert_still_serving(d)
