"""Injected storage faults (the blkdebug driver): the client gets the right
NBD error, the connection and export survive, nothing acknowledged is lost,
and a failed flush is never reported as success."""

import shutil

import nbd
import pytest

from tls_certs import make_pki

MIB = 1 << 20


pytestmark = pytest.mark.bexd_only(
    "the session carries on after a failed read here; qemu-storage-daemon 10 drops a "
    "structured-reply connection when a read fails (test_blkdebug.py compares the rules "
    "themselves over simple replies), and x-after is bexd's")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificates")
    return make_pki(tmp_path_factory.mktemp("pki"))


def faulty(start, image, rules, writable=True, tls=None):
    """An export of raw over blkdebug (raw reports the read_aio, write_aio and flush
    events that arm the rules, as in QEMU); with `tls` (a pki) served over x509 TLS only."""
    img = image(4 * MIB)
    spec = f"driver=raw,node-name=dbg,file.driver=blkdebug,file.image.driver=file,file.image.filename={img}"
    for i, rule in enumerate(rules):
        for key, value in rule.items():
            spec += f",file.inject-error.{i}.{key}={value}"
    w = "on" if writable else "off"
    extra = {}
    if tls:
        extra = {"server_extra": ",tls-creds=tls0",
                 "objects": [f"tls-creds-x509,id=tls0,dir={tls['server']},endpoint=server"]}
    d = start([spec], [f"type=nbd,id=e0,node-name=dbg,name=disk,writable={w}"], **extra)
    d.client = lambda: connect(d, tls)
    return d, d.client(), img


def connect(d, tls):
    h = nbd.NBD()
    uri = d.uri("disk")
    if tls:
        h.set_tls_certificates(tls["one"])
        uri = uri.replace("nbd+unix://", "nbds+unix://")  # nbds: TLS required
    h.connect_uri(uri)
    return h


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


def test_faults_over_tls_get_the_same_errors_and_the_session_survives(start, image, pki):
    """The same faults with the replies going through TLS: each error reaches the
    client as its errno, the TLS session carries on, a failed flush is an error,
    and what was acknowledged before it is still read back (and is in the file)."""
    d, h, img = faulty(start, image, [{"event": "read_aio", "sector": 16},
                                      {"event": "write_aio", "errno": 28, "once": "on"},
                                      {"event": "flush_to_disk", "once": "on"}], tls=pki)
    plain = nbd.NBD()
    plain.set_tls(nbd.TLS_DISABLE)
    with pytest.raises(nbd.Error):
        plain.connect_uri(d.uri("disk"))  # really TLS only
    with pytest.raises(nbd.Error) as e:
        h.pread(4096, 8192)
    assert e.value.errno == "EIO"
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 4096, 65536)
    assert e.value.errno == "ENOSPC"
    h.pwrite(b"kept" * 1024, 65536)
    with pytest.raises(nbd.Error) as e:
        h.flush()
    assert e.value.errno == "EIO"
    h.flush()
    other = d.client()
    assert other.pread(4096, 65536) == b"kept" * 1024
    assert h.pread(4096, 0) == bytes(4096)
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


# Faults beneath a format: blkdebug as qcow2's file, so data and metadata I/O
# both meet them.

def faulty_qcow2(tmp_path, rules, prepare=()):
    """A daemon of its own (not `start`'s): some tests kill it."""
    import subprocess

    from conftest import Daemon
    img = tmp_path / "f.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M"], check=True)
    for cmd in prepare:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(img)], check=True, capture_output=True)
    spec = f"driver=qcow2,node-name=q,file.driver=blkdebug,file.image.driver=file,file.image.filename={img}"
    for i, rule in enumerate(rules):
        for key, value in rule.items():
            spec += f",file.inject-error.{i}.{key}={value}"
    d = Daemon(tmp_path, "bexd", [spec], ["type=nbd,id=e0,node-name=q,name=disk,writable=on"])
    h = nbd.NBD()
    h.connect_uri(d.uri("disk"))
    return d, h, img


def host_offset(img, guest):
    import json
    import subprocess
    out = subprocess.run(["qemu-img", "map", "--output=json", str(img)], check=True,
                         capture_output=True, text=True).stdout
    for e in json.loads(out):
        if e["start"] <= guest < e["start"] + e["length"] and e.get("offset") is not None:
            return e["offset"] + guest - e["start"]
    raise AssertionError(f"guest offset {guest} is not allocated")


def qemu_img_check(img):
    import subprocess
    r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    # 0: clean; 3: leaked clusters only (a failed allocation may leak, never corrupt).
    assert r.returncode in (0, 3), r.stdout + r.stderr
    assert "ERROR" not in r.stdout, r.stdout
    return r


def test_qcow2_data_read_error_is_eio_and_the_image_stays_clean(tmp_path):
    import subprocess
    img = tmp_path / "probe.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", str(img)], check=True,
                   capture_output=True)
    sector = host_offset(img, 1 * MIB) // 512
    d, h, img = faulty_qcow2(tmp_path, [{"event": "read_aio", "sector": sector}],
                             prepare=["write -P 0x5a 1M 64k"])
    with pytest.raises(nbd.Error) as e:
        h.pread(4096, 1 * MIB)
    assert e.value.errno == "EIO"
    assert h.pread(4096, 2 * MIB) == bytes(4096)
    h.pwrite(b"w" * 4096, 3 * MIB)
    assert h.pread(4096, 3 * MIB) == b"w" * 4096
    h.flush()
    h.shutdown()
    assert d.stop() == 0
    assert qemu_img_check(img).returncode == 0


def test_qcow2_failed_allocating_write_is_enospc_and_later_writes_land(tmp_path):
    d, h, img = faulty_qcow2(tmp_path, [{"event": "write_aio", "errno": 28, "once": "on"}])
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 65536, 1 * MIB)
    assert e.value.errno == "ENOSPC"
    h.pwrite(b"y" * 65536, 1 * MIB)
    h.pwrite(b"z" * 4096, 5 * MIB)
    h.flush()
    assert h.pread(65536, 1 * MIB) == b"y" * 65536
    h.shutdown()
    assert d.stop() == 0
    qemu_img_check(img)
    import subprocess
    raw = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x79 1M 64k", "-c",
                          "read -P 0x7a 5M 4k", str(img)], capture_output=True, text=True)
    assert raw.returncode == 0 and "Pattern verification failed" not in raw.stdout, raw.stdout


def test_qcow2_failed_flush_is_an_error_and_a_retry_makes_it_durable(tmp_path):
    d, h, img = faulty_qcow2(tmp_path, [{"event": "flush_to_disk", "once": "on"}])
    h.pwrite(b"k" * 65536, 2 * MIB)
    with pytest.raises(nbd.Error) as e:
        h.flush()
    assert e.value.errno == "EIO"
    h.flush()
    # Killed, not stopped: only what the successful flush made durable counts.
    d.proc.kill()
    d.proc.wait()
    qemu_img_check(img)
    import subprocess
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x6b 2M 64k", str(img)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout


def test_qcow2_metadata_write_errors_never_corrupt(tmp_path):
    """Now and then a write to the file fails (data or metadata alike: each
    rule fires once, after its count of writes) while a client writes new
    clusters with FUA: failed requests get errors, succeeded ones read back,
    and after a kill the image has at most leaks."""
    rules = [{"event": "write_aio", "errno": 5, "x-after": n, "once": "on"} for n in (3, 10, 17, 29, 41, 60)]
    d, h, img = faulty_qcow2(tmp_path, rules)
    ok = {}
    for i in range(24):
        off = i * 256 * 1024
        data = bytes([i + 1]) * 4096
        try:
            h.pwrite(data, off, flags=nbd.CMD_FLAG_FUA)
            ok[off] = data
        except nbd.Error as e:
            assert e.errno == "EIO"
    assert 0 < len(ok) < 24, f"{len(ok)} of 24 writes succeeded"
    for off, data in ok.items():
        assert h.pread(4096, off) == data
    d.proc.kill()
    d.proc.wait()
    qemu_img_check(img)
