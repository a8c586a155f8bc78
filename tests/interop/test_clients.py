"""Real clients against the daemon: qemu-img, qemu-io, nbdinfo, nbdcopy, fio."""

import filecmp
import json
import os
import subprocess

from conftest import file_export, need

MIB = 1 << 20


def run(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=120)


def patterned(image):
    return image(64 * MIB, [(0, b"\xab" * MIB), (10 * MIB, os.urandom(3 * MIB)), (60 * MIB, b"tail" * 1024)])


def test_qemu_img_info_reports_size(start, image):
    need("qemu-img")
    d = start(*file_export(image(32 * MIB)))
    info = json.loads(run("qemu-img", "info", "--output=json", d.uri("disk")).stdout)
    assert info["virtual-size"] == 32 * MIB


def test_qemu_img_convert_and_compare_match_source(start, image, tmp_path):
    need("qemu-img")
    src = patterned(image)
    d = start(*file_export(src, writable=False))
    out = tmp_path / "copy.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", d.uri("disk"), str(out))
    assert filecmp.cmp(src, out, shallow=False)
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), d.uri("disk")).returncode == 0


def test_qemu_io_write_then_read_pattern_reaches_the_file(start, image):
    need("qemu-io")
    img = image(16 * MIB)
    d = start(*file_export(img))
    uri = d.uri("disk")
    out = run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 2M", "-c", "read -P 0x5a 1M 2M",
              "-c", "read -P 0 0 1M", "-c", "flush", uri).stdout
    assert "Pattern verification failed" not in out
    assert out.count("read ") == 2
    d.stop()
    with open(img, "rb") as f:
        f.seek(MIB)
        assert f.read(2 * MIB) == b"\x5a" * (2 * MIB)


def test_qemu_io_detects_wrong_pattern(start, image):
    """The verification used above can fail: a wrong pattern is reported."""
    need("qemu-io")
    d = start(*file_export(image(4 * MIB, [(0, b"\x01" * 4096)])))
    out = run("qemu-io", "-f", "raw", "-c", "read -P 0x02 0 4k", d.uri("disk"), check=False)
    assert "Pattern verification failed" in out.stdout + out.stderr


def test_nbdinfo_list_shows_name_and_description(start, image):
    need("nbdinfo")
    blockdevs, _ = file_export(image(4 * MIB))
    exports = ["type=nbd,id=e0,node-name=disk0,name=first,description=the first disk",
               "type=nbd,id=e1,node-name=disk0,name=second"]
    d = start(blockdevs, exports)
    listing = json.loads(run("nbdinfo", "--list", "--json", d.uri()).stdout)
    names = {e["export-name"]: e.get("description") for e in listing["exports"]}
    assert names == {"first": "the first disk", "second": None}


def test_nbdinfo_map_matches_sparse_layout(start, image):
    need("nbdinfo")
    img = image(16 * MIB, [(4 * MIB, b"x" * MIB)])
    d = start(*file_export(img, writable=False))
    extents = json.loads(run("nbdinfo", "--map", "--json", d.uri("disk")).stdout)
    data = [(e["offset"], e["length"]) for e in extents if e["type"] == 0]
    assert data == [(4 * MIB, MIB)]
    holes = [e for e in extents if e["type"] == 3]
    assert sum(e["length"] for e in holes) == 15 * MIB


def test_nbdcopy_export_to_file_equals_source(start, image, tmp_path):
    need("nbdcopy")
    src = patterned(image)
    d = start(*file_export(src, writable=False))
    out = tmp_path / "copy.raw"
    run("nbdcopy", d.uri("disk"), str(out))
    assert filecmp.cmp(src, out, shallow=False)


def test_nbdcopy_file_into_writable_export(start, image, tmp_path):
    need("nbdcopy")
    src = patterned(image)
    dst = image(64 * MIB, name="dst.img")
    d = start(*file_export(dst))
    run("nbdcopy", "--flush", str(src), d.uri("disk"))
    d.stop()
    assert filecmp.cmp(src, dst, shallow=False)


def test_fio_nbd_engine_verified_random_writes(start, image, tmp_path):
    need("fio")
    d = start(*file_export(image(64 * MIB)))
    out = run("fio", "--name=smoke", "--ioengine=nbd", f"--uri={d.uri('disk')}", "--rw=randwrite",
              "--bs=4k", "--size=16M", "--iodepth=16", "--verify=crc32c", "--iomem_align=4096",
              "--runtime=5", "--verify_state_save=0", "--output-format=json")
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 16 * MIB
    assert job["read"]["io_bytes"] >= 16 * MIB, "verification reads ran"


def test_tcp_transport_qemu_img_convert(start, image, tmp_path):
    need("qemu-img")
    src = patterned(image)
    d = start(*file_export(src, writable=False), tcp=True)
    assert d.uri("disk").startswith("nbd://127.0.0.1:")
    out = tmp_path / "tcp.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", d.uri("disk"), str(out))
    assert filecmp.cmp(src, out, shallow=False)


def test_cache_direct_with_unaligned_io(start, image):
    need("qemu-io")
    img = image(16 * MIB)
    d = start([f"driver=file,node-name=disk0,filename={img},cache.direct=on"],
              ["type=nbd,id=e0,node-name=disk0,name=disk,writable=on"])
    out = run("qemu-io", "-f", "raw", "-c", "write -P 0x11 1000 3000", "-c", "read -P 0x11 1000 3000",
              "-c", "read -P 0 0 1000", "-c", "read -P 0 4000 96", d.uri("disk")).stdout
    assert "Pattern verification failed" not in out
    assert out.count("read ") == 3
    with open(img, "rb") as f:
        f.seek(1000)
        assert f.read(3000) == b"\x11" * 3000
