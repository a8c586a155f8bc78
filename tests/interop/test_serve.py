"""`bexd serve IMAGE`: the one-image shortcut, checked with real clients."""

import os
import signal
import subprocess

import nbd
import pytest

from conftest import daemon_binary, free_port

MIB = 1 << 20

pytestmark = pytest.mark.bexd_only("bexd serve is bexd's own")


@pytest.fixture
def serve():
    procs = []

    def _serve(*args):
        p = subprocess.Popen(daemon_binary("bexd") + ["serve", *args], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        return p, p.stdout.readline().strip()

    yield _serve
    for p in procs:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 0


def test_serve_prints_a_uri_that_clients_can_use(serve, image):
    img = image(8 * MIB, [(0, b"serve" * 100)])
    port = free_port()
    _, uri = serve("--port", str(port), str(img))
    assert uri == f"nbd://127.0.0.1:{port}/"
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.get_size() == 8 * MIB
    assert h.pread(500, 0) == b"serve" * 100
    assert not h.is_read_only()


def test_serve_read_only_on_a_unix_socket_with_a_name(serve, image, tmp_path):
    sock = tmp_path / "s.sock"
    _, uri = serve("--socket", str(sock), "--read-only", "--export-name", "d0", "-t", str(image(4 * MIB)))
    assert uri == f"nbd+unix:///d0?socket={sock}"
    out = subprocess.run(["qemu-img", "info", "--output=json", uri], check=True, capture_output=True, text=True)
    assert '"virtual-size": 4194304' in out.stdout
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.is_read_only()


def test_serve_missing_image_exits_1_with_one_line(tmp_path):
    p = subprocess.run(daemon_binary("bexd") + ["serve", str(tmp_path / "nope.img")], capture_output=True, text=True)
    assert p.returncode == 1
    assert len(p.stderr.strip().splitlines()) == 1
    assert "nope.img" in p.stderr


def test_serve_finds_qcow2_by_itself_and_takes_aio(serve, tmp_path):
    """Without -f a qcow2 image is served as qcow2 (its virtual size and
    guest data, not its file bytes), as qemu-nbd does; -f raw serves the file."""
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", str(img)], check=True,
                   capture_output=True)
    _, uri = serve("--port", str(free_port()), "--aio", "io_uring", "--cache=none", str(img))
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.get_size() == 16 * MIB
    assert h.pread(65536, MIB) == b"\x5a" * 65536
    h.pwrite(b"\x11" * 4096, 0)
    h.flush()
    h.shutdown()
    _, raw_uri = serve("--port", str(free_port()), "-f", "raw", "--read-only", str(img))
    r = nbd.NBD()
    r.connect_uri(raw_uri)
    assert r.get_size() == os.path.getsize(img)
    assert r.pread(4, 0) == b"QFI\xfb"


def test_serve_unknown_format_exits_1_with_one_line(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(MIB))
    p = subprocess.run(daemon_binary("bexd") + ["serve", "-f", "vmdk", str(img)], capture_output=True,
                       text=True)
    assert p.returncode == 1
    assert p.stderr.strip() == "bexd serve: unsupported format 'vmdk' (supported: raw, qcow2)"


def test_serve_qmp_manages_the_running_export(serve, image, tmp_path):
    """--qmp PATH (bexd's own): qemu.qmp sees the one export and its node,
    and can add a second export of the same node while the first is served."""
    import asyncio

    from qemu.qmp import QMPClient

    sock, qmp = tmp_path / "s.sock", tmp_path / "qmp.sock"
    _, uri = serve("-t", "-k", str(sock), "-x", "d0", "--qmp", str(qmp), str(image(4 * MIB)))

    async def talk():
        q = QMPClient("serve")
        await q.connect(str(qmp))
        exports = await q.execute("query-block-exports")
        await q.execute("block-export-add", {"type": "nbd", "id": "e2", "node-name": exports[0]["node-name"],
                                             "name": "second"})
        await q.disconnect()
        return exports

    exports = asyncio.run(talk())
    assert [e["type"] for e in exports] == ["nbd"]
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///second?socket={sock}")
    assert h.get_size() == 4 * MIB
