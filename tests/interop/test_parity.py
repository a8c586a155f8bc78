"""The same scenario against qemu-storage-daemon and bexd: clients must see the same thing."""

import json
import shutil
import subprocess

import nbd
import pytest

from conftest import file_export

MIB = 1 << 20
FIELDS = ["export-size", "is_rotational", "is_read_only", "can_cache", "can_df", "can_fast_zero",
          "can_flush", "can_fua", "can_multi_conn", "can_trim", "can_zero", "block_size_minimum",
          "block_size_preferred", "block_size_maximum", "contexts", "description"]


@pytest.fixture
def pair(start, image):
    """bexd and qsd, each on its own copy of one sparse, patterned image."""
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon not installed")

    def _pair(writable, extra=""):
        layout = [(MIB, b"a" * MIB), (8 * MIB + 4096, b"b" * 8192)]
        src = image(16 * MIB, layout)
        copy = image(16 * MIB, layout, name="copy.img")  # made the same way: equally sparse
        ours = start(*file_export(src, writable=writable, extra=extra), which="bexd")
        theirs = start(*file_export(copy, writable=writable, extra=extra), which="qsd")
        return ours, theirs
    return _pair


def nbdinfo(d):
    out = subprocess.run(["nbdinfo", "--json", d.uri("disk")], check=True, capture_output=True, text=True)
    export = json.loads(out.stdout)["exports"][0]
    return {k: export.get(k) for k in FIELDS}


def nbdmap(d):
    out = subprocess.run(["nbdinfo", "--map", "--json", d.uri("disk")], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("writable", [False, True])
def test_nbdinfo_sees_the_same_export(pair, writable):
    ours, theirs = pair(writable, extra=",description=parity")
    assert nbdinfo(ours) == nbdinfo(theirs)


def test_nbdinfo_map_is_the_same(pair):
    ours, theirs = pair(False)
    assert nbdmap(ours) == nbdmap(theirs)


def test_transmission_flags_are_the_same(pair):
    ours, theirs = pair(True)
    flags = []
    for d in (ours, theirs):
        h = nbd.NBD()
        h.connect_uri(d.uri("disk"))
        flags.append([h.is_read_only(), h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero(),
                      h.can_fast_zero(), h.can_df(), h.can_multi_conn(), h.can_cache()])
    assert flags[0] == flags[1]


def test_errors_past_eof_are_the_same(pair):
    ours, theirs = pair(False)
    errors = []
    for d in (ours, theirs):
        h = nbd.NBD()
        h.set_strict_mode(0)
        h.connect_uri(d.uri("disk"))
        with pytest.raises(nbd.Error) as e:
            h.pread(4096, 16 * MIB - 512)
        errors.append(e.value.errno)
    assert errors[0] == errors[1] == "EINVAL"
