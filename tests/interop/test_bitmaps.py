"""Dirty bitmaps and incremental backup, against bexd and qemu-storage-daemon.

The QMP parity cases run the same commands on both daemons and expect the
same answers; the end-to-end flow (full backup, bitmap, writes from another
client, bitmap export, maps, incremental backup applied to the full) runs
with either daemon as the server, so `bexd backup` is checked against QEMU too.
"""

import asyncio
import json
import shutil
import subprocess

import nbd
import pytest

from conftest import daemon_binary, need, qmp_outcome

MIB = 1 << 20


def nodes(img):
    """A raw node r0 on a file node f0, plus a 1 MiB null-co node n0."""
    return [f"driver=file,node-name=f0,filename={img}",
            "driver=raw,node-name=r0,file=f0",
            "driver=null-co,node-name=n0,size=1048576"]


def qmp(d, command, arguments=None):
    return asyncio.run(qmp_outcome(d.qmp_sock, command, arguments or {}))


def bitmaps_of(d):
    """node-name -> its dirty-bitmaps member (None when absent), from query-named-block-nodes."""
    kind, listed = qmp(d, "query-named-block-nodes")
    assert kind == "ok"
    return {n["node-name"]: n.get("dirty-bitmaps") for n in listed}


@pytest.fixture
def pair(start, image):
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon not installed")
    ours = start(nodes(image(name="a.img")), [], which="bexd")
    theirs = start(nodes(image(name="b.img")), [], which="qsd")
    return ours, theirs


def add(node, name, **kw):
    return ("block-dirty-bitmap-add", {"node": node, "name": name, **kw})


def ref(command, node, name):
    return (command, {"node": node, "name": name})


def action(command, data):
    return {"type": command, "data": data}


# Each sequence runs on a fresh pair; every step's outcome and the bitmaps afterwards must match.
SEQUENCES = {
    "add-errors": [
        add("r0", "b0"), add("r0", "b0"), add("nope", "b0"), add("r0", ""),
        add("r0", "g", granularity=1000), add("r0", "g", granularity=256),
        add("r0", "g", granularity=0), add("r0", "g", granularity=-1),
        add("r0", "g", granularity=4294967296), add("r0", "big", granularity=2147483648),
        add("r0", "p", persistent=True), add("f0", "p", persistent=True),
        add("n0", "d", disabled=True), add("f0", "g4k", granularity=4096),
        ("block-dirty-bitmap-add", {"node": "r0"}),
        ("block-dirty-bitmap-add", {"node": "r0", "name": "x", "bogus": 1}),
        add("r0", "n" * 1024), add("r0", "n" * 1023),
        add("r0", "s", granularity="x"), add("r0", "s", persistent="yes"), add("r0", "s", disabled=1),
        ("block-dirty-bitmap-merge", {"node": "r0", "target": "b0", "bitmaps": "b0"}),
        ("block-dirty-bitmap-merge", {"node": "r0", "bitmaps": ["b0"]}),
        ("block-dirty-bitmap-merge", {"node": "r0", "target": "b0", "bitmaps": [1]}),
        ("block-dirty-bitmap-remove", {"node": "r0"}),
        ("block-dirty-bitmap-bogus", {"node": "r0"}),
        ("transaction", {"actions": [{"type": "block-dirty-bitmap-add"}]}),
        ("transaction", {"actions": [{"data": {}}]}),
        ("transaction", {"actions": {}}),
    ],
    "remove-clear-enable-disable": [
        add("r0", "b0"), ref("block-dirty-bitmap-remove", "r0", "nope"),
        ref("block-dirty-bitmap-remove", "nope", "b0"), ref("block-dirty-bitmap-clear", "r0", "nope"),
        ref("block-dirty-bitmap-disable", "r0", "b0"), ref("block-dirty-bitmap-disable", "r0", "b0"),
        ref("block-dirty-bitmap-enable", "r0", "nope"), ref("block-dirty-bitmap-clear", "r0", "b0"),
        ref("block-dirty-bitmap-remove", "r0", "b0"), ref("block-dirty-bitmap-remove", "r0", "b0"),
    ],
    "merge": [
        add("r0", "b0"), add("f0", "b1", granularity=4096), add("n0", "b2"),
        ("block-dirty-bitmap-merge", {"node": "r0", "target": "b0", "bitmaps": ["nope"]}),
        ("block-dirty-bitmap-merge", {"node": "r0", "target": "nope", "bitmaps": ["b0"]}),
        ("block-dirty-bitmap-merge", {"node": "r0", "target": "b0", "bitmaps": [{"node": "n0", "name": "b2"}]}),
        ("block-dirty-bitmap-merge", {"node": "r0", "target": "b0", "bitmaps": [{"node": "zz", "name": "b1"}]}),
        ("block-dirty-bitmap-merge", {"node": "r0", "target": "b0", "bitmaps": [{"node": "f0", "name": "b1"}, "b0"]}),
    ],
    "transaction": [
        add("r0", "b0"),
        ("transaction", {"actions": [action(*add("r0", "t1")), action(*add("r0", "b0"))]}),
        ("transaction", {"actions": [action(*add("r0", "t1")), action(*ref("block-dirty-bitmap-remove", "r0", "t1"))]}),
        ("transaction", {"actions": [action(*add("r0", "t2")), action(*ref("block-dirty-bitmap-disable", "r0", "b0")),
                                     action(*ref("block-dirty-bitmap-clear", "r0", "nope"))]}),
        ("transaction", {"actions": [{"type": "bogus", "data": {}}]}),
        ("transaction", {"actions": [action("block-dirty-bitmap-add", {"node": "r0"})]}),
        ("transaction", {"actions": []}),
        ("transaction", {"actions": [action(*add("r0", "t3"))], "properties": {"completion-mode": "grouped"}}),
        ("transaction", {"actions": [action(*add("r0", "t3")),
                                     action("block-dirty-bitmap-merge", {"node": "r0", "target": "t3", "bitmaps": ["b0"]})],
                         "properties": {"completion-mode": "individual"}}),
        ("transaction", {"actions": [action(*ref("block-dirty-bitmap-remove", "r0", "t3")),
                                     action(*ref("block-dirty-bitmap-remove", "r0", "t3"))]}),
        ("transaction", {}),
    ],
    "exports": [
        add("r0", "b0"), add("n0", "b2", disabled=True), add("r0", "b3"),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "r0", "bitmaps": ["b0"]}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "r0", "bitmaps": ["nope"]}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "r0", "bitmaps": [{"node": "f0", "name": "b0"}]}),
        ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "r0", "writable": True, "bitmaps": ["b0"]}),
        ref("block-dirty-bitmap-remove", "r0", "b0"), ref("block-dirty-bitmap-clear", "r0", "b0"),
        ref("block-dirty-bitmap-disable", "r0", "b0"), ref("block-dirty-bitmap-enable", "r0", "b0"),
        ("block-dirty-bitmap-merge", {"node": "r0", "target": "b3", "bitmaps": ["b0"]}),
        ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "n0", "bitmaps": ["b2"]}),
        ("block-export-add", {"type": "nbd", "id": "e3", "node-name": "n0", "name": "x", "bitmaps": ["b2"]}),
        ("block-export-del", {"id": "e1"}),
        ref("block-dirty-bitmap-clear", "r0", "b0"),
        ("nbd-server-add", {"device": "r0", "name": "y", "bitmap": "b3"}),
        ("nbd-server-add", {"device": "r0", "name": "y", "writable": True, "bitmap": "b3"}),
        ref("block-dirty-bitmap-remove", "r0", "b3"),
    ],
}


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_bitmap_commands_answer_as_qemu_storage_daemon(pair, name):
    ours, theirs = pair
    for command, arguments in SEQUENCES[name]:
        got, expected = qmp(ours, command, arguments), qmp(theirs, command, arguments)
        assert got == expected, (command, arguments)
    assert bitmaps_of(ours) == bitmaps_of(theirs)


def test_writes_mark_raw_and_file_bitmaps_as_in_qemu(pair):
    """A write through the raw node marks r0's bitmap and f0's (it passes through f0);
    query-named-block-nodes shows the same counts on both daemons."""
    need("qemu-io")
    for d in pair:
        for step in [add("r0", "b0"), add("f0", "b1", granularity=4096), add("n0", "b2"),
                     ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "r0",
                                           "writable": True, "bitmaps": ["b0"]})]:
            assert qmp(d, *step)[0] == "ok"
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write 70000 5000", "-c", "write -z 3M 64k",
                        "-c", "discard 8M 64k", d.uri("r0")], check=True, capture_output=True)
    ours, theirs = pair
    assert bitmaps_of(ours) == bitmaps_of(theirs)
    assert bitmaps_of(ours)["r0"][0]["count"] == 65536 + 65536
    # A failing transaction puts cleared and merged bits back; a good one applies all.
    steps = [add("r0", "m"),
             ("transaction", {"actions": [action(*ref("block-dirty-bitmap-clear", "f0", "b1")),
                                          action("block-dirty-bitmap-merge", {"node": "r0", "target": "m",
                                                                              "bitmaps": [{"node": "f0", "name": "b1"}]}),
                                          action(*add("r0", "m"))]}),
             ("transaction", {"actions": [action("block-dirty-bitmap-merge", {"node": "r0", "target": "m",
                                                                              "bitmaps": [{"node": "f0", "name": "b1"}]}),
                                          action(*ref("block-dirty-bitmap-clear", "f0", "b1"))]})]
    for command, arguments in steps:
        assert qmp(ours, command, arguments) == qmp(theirs, command, arguments)
    assert bitmaps_of(ours) == bitmaps_of(theirs)
    assert [b["count"] for b in bitmaps_of(ours)["f0"]] == [0]
    assert bitmaps_of(ours)["r0"][0]["name"] == "m" and bitmaps_of(ours)["r0"][0]["count"] > 0


def test_list_meta_context_offers_bitmaps_as_qemu(pair):
    need("nbdinfo")
    listings = []
    for d in pair:
        for step in [add("r0", "b0"), add("r0", "b1", disabled=True),
                     ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "r0", "writable": True,
                                           "bitmaps": ["b0", "b1"], "allocation-depth": True})]:
            assert qmp(d, *step)[0] == "ok"
        out = subprocess.run(["nbdinfo", "--json", "--content", d.uri("r0")], check=True,
                             capture_output=True, text=True).stdout
        listings.append(json.loads(out)["exports"][0]["contexts"])
    assert listings[0] == listings[1] == ["base:allocation", "qemu:allocation-depth",
                                          "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]


def bexd_backup(*args):
    argv = daemon_binary("bexd") + ["backup", "--quiet", *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True)


def dirty_from_nbdinfo(uri):
    out = subprocess.run(["nbdinfo", "--json", "--map=qemu:dirty-bitmap:b0", uri],
                         check=True, capture_output=True, text=True).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


def dirty_from_qemu_img(d, export):
    opts = (f"driver=nbd,server.type=unix,server.path={d.sock},export={export},"
            "x-dirty-bitmap=qemu:dirty-bitmap:b0")
    out = subprocess.run(["qemu-img", "map", "--output=json", "--image-opts", opts],
                         check=True, capture_output=True, text=True).stdout
    # With x-dirty-bitmap, qemu reads the bitmap's DIRTY bit as HOLE: dirty shows as data=false.
    return [(e["start"], e["length"]) for e in json.loads(out) if not e["data"]]


@pytest.mark.parametrize("server", ["bexd", "qsd"])
def test_full_then_incremental_backup_equals_source(start, image, tmp_path, server):
    """The whole flow, with bexd or qemu-storage-daemon serving: full backup,
    bitmap, writes by qemu-io, bitmap export and maps, incremental onto the full."""
    for tool in ["qemu-io", "qemu-img", "nbdinfo", "qemu-storage-daemon"]:
        need(tool)
    pattern = [(0, b"\x01" * 8192), (20 * MIB, b"\x02" * (256 << 10)), (40 * MIB - 3, b"end")]
    src = image(size=64 * MIB, pattern=pattern, name="src.img")
    d = start(nodes(src), [], which=server)
    full, new = tmp_path / "full.raw", tmp_path / "new.raw"

    assert qmp(d, *add("r0", "b0"))[0] == "ok"
    assert qmp(d, "block-export-add", {"type": "nbd", "id": "e-full", "node-name": "r0",
                                       "name": "full"})[0] == "ok"
    out = bexd_backup("--uri", d.uri("full"), "--output", str(full), "--verify")
    assert "full backup done" in out.stderr and "verified" in out.stderr
    # Both servers advertise multi-conn (max-connections is not 1): three data ranges, three connections.
    assert "over 3 connection(s)" in out.stderr
    assert f"skipped {64 * MIB - 8192 - (256 << 10) - 4096} bytes" in out.stderr
    assert full.read_bytes() == src.read_bytes()

    assert qmp(d, "block-export-add", {"type": "nbd", "id": "e-w", "node-name": "r0",
                                       "name": "w", "writable": True})[0] == "ok"
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 1M 4k",
                    "-c", f"write -P 0x22 {10 * MIB + 100} 70000", "-c", "write -z 20M 64k",
                    d.uri("w")], check=True, capture_output=True)
    # Freeze b0 and start b1 for the next increment, atomically.
    assert qmp(d, "transaction", {"actions": [
        action(*ref("block-dirty-bitmap-disable", "r0", "b0")), action(*add("r0", "b1"))]})[0] == "ok"
    assert qmp(d, "block-export-add", {"type": "nbd", "id": "e-inc", "node-name": "r0",
                                       "name": "inc", "bitmaps": ["b0"]})[0] == "ok"

    expected = [(1 * MIB, 64 << 10), (10 * MIB, 128 << 10), (20 * MIB, 64 << 10)]
    assert dirty_from_nbdinfo(d.uri("inc")) == expected
    assert dirty_from_qemu_img(d, "inc") == expected

    out = bexd_backup("--uri", d.uri("inc"), "--bitmap", "b0", "--base", str(full),
                      "--output", str(new), "--verify")
    assert f"read {256 << 10} bytes" in out.stderr
    assert subprocess.run(["cmp", str(new), str(src)]).returncode == 0
    assert subprocess.run(["cmp", "-s", str(full), str(src)]).returncode != 0


def test_incremental_needs_the_bitmap_exported(start, image, tmp_path):
    d = start(nodes(image(name="s.img")), [], which="bexd")
    assert qmp(d, "block-export-add", {"type": "nbd", "id": "e", "node-name": "r0", "name": "e"})[0] == "ok"
    argv = daemon_binary("bexd") + ["backup", "--uri", d.uri("e"), "--bitmap", "b0",
                                    "--output", str(tmp_path / "x.raw")]
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 1
    assert "no meta context 'qemu:dirty-bitmap:b0'" in r.stderr


def list_contexts(uri, queries):
    import nbd
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    h.clear_meta_contexts()
    for q in queries:
        h.add_meta_context(q)
    found = []
    h.opt_list_meta_context(lambda name: found.append(name) or 0)
    h.opt_abort()
    return found


def block_status_all(uri, offset, length, flags=0):
    """Every context's extents for one BLOCK_STATUS, with all three contexts negotiated."""
    import nbd
    h = nbd.NBD()
    for c in ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]:
        h.add_meta_context(c)
    h.connect_uri(uri)
    got = {}
    h.block_status(length, offset, lambda ctx, off, entries, err: got.setdefault(ctx, list(entries)) and 0,
                   flags)
    h.shutdown()
    return got


def test_meta_contexts_and_block_status_as_qemu(pair):
    """LIST with wildcards, and BLOCK_STATUS with three contexts at once: the same as qemu."""
    import nbd
    results = []
    for d in pair:
        for step in [add("r0", "b0", granularity=4096), add("r0", "b1"),
                     ("block-export-add", {"type": "nbd", "id": "w", "node-name": "r0", "name": "w",
                                           "writable": True, "allocation-depth": True,
                                           "bitmaps": ["b0", "b1"]})]:
            assert qmp(d, *step)[0] == "ok"
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 7 5000 10000", "-c", "write 3M 1M",
                        d.uri("w")], check=True, capture_output=True)
        uri = d.uri("w")
        results.append({
            "lists": [list_contexts(uri, q) for q in
                      [[], ["qemu:"], ["qemu:dirty-bitmap:"], ["base:"], ["qemu:dirty-bitmap:b1"], ["x-y:"]]],
            "status": [block_status_all(uri, o, n) for o, n in [(0, 64 * MIB), (4096, 8192), (3 * MIB + 1, 100)]],
            "req_one": block_status_all(uri, 0, 64 * MIB, nbd.CMD_FLAG_REQ_ONE),
        })
    assert results[0] == results[1]
    assert results[0]["lists"][2] == ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]


def test_qcow2_output_and_in_place_incremental(start, image, tmp_path):
    need("qemu-img")
    src = image(size=8 * MIB, pattern=[(MIB, b"\x05" * 70000)], name="src.img")
    d = start(nodes(src), [], which="bexd")
    assert qmp(d, *add("r0", "b0"))[0] == "ok"
    assert qmp(d, "block-export-add", {"type": "nbd", "id": "w", "node-name": "r0", "name": "w",
                                       "writable": True, "bitmaps": ["b0"]})[0] == "ok"
    q = tmp_path / "full.qcow2"
    bexd_backup("--uri", d.uri("w"), "--output", str(q), "--format", "qcow2")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(q)], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2"
    assert subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(q), str(src)]).returncode == 0
    # The same image as raw, then an incremental written into it in place.
    full = tmp_path / "full.raw"
    bexd_backup("--uri", d.uri("w"), "--output", str(full))
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 9 7M 512", d.uri("w")], check=True,
                   capture_output=True)
    out = bexd_backup("--uri", d.uri("w"), "--bitmap", "b0", "--base", str(full), "--output", str(full))
    assert subprocess.run(["cmp", str(full), str(src)]).returncode == 0
    # b0 was added before any write, so it holds just the 7M write: one 64 KiB granule.
    assert "read 65536 bytes" in out.stderr


def test_incremental_kept_apart_then_applied(start, image, tmp_path):
    """Without --base the incremental is a sparse file plus its extent list; --apply puts it onto the full."""
    need("qemu-io")
    src = image(size=8 * MIB, pattern=[(0, b"\x03" * 4096)], name="src.img")
    d = start(nodes(src), [], which="bexd")
    assert qmp(d, *add("r0", "b0"))[0] == "ok"
    assert qmp(d, "block-export-add", {"type": "nbd", "id": "w", "node-name": "r0", "name": "w",
                                       "writable": True, "bitmaps": ["b0"]})[0] == "ok"
    full, inc, new = tmp_path / "full.raw", tmp_path / "inc.raw", tmp_path / "new.raw"
    bexd_backup("--uri", d.uri("w"), "--output", str(full))
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 4 5M 100", "-c", "write -z 0 4k", d.uri("w")],
                   check=True, capture_output=True)
    bexd_backup("--uri", d.uri("w"), "--bitmap", "b0", "--output", str(inc))
    assert json.loads((tmp_path / "inc.raw.extents.json").read_text()) == [[0, 65536], [5 * MIB, 65536]]
    out = bexd_backup("--apply", str(inc), "--base", str(full), "--output", str(new))
    assert "applied 131072 bytes" in out.stderr
    assert new.read_bytes() == src.read_bytes() != full.read_bytes()


def test_a_bitmap_exported_twice_answers_once_as_qemu(pair):
    """QEMU accepts `bitmaps: [b, b]`, lists the context twice, and selects
    only the first when a client asks for it by name."""
    need("nbdinfo")
    seen = []
    for d in pair:
        assert qmp(d, *add("r0", "b"))[0] == "ok"
        assert qmp(d, "block-export-add", {"type": "nbd", "id": "e", "node-name": "r0", "name": "e",
                                           "writable": True, "bitmaps": ["b", "b"]})[0] == "ok"
        h = nbd.NBD()
        h.connect_uri(d.uri("e"))
        h.pwrite(b"1" * 512, 65536)
        h.shutdown()
        listed = subprocess.run(["nbdinfo", "--json", d.uri("e")], check=True, capture_output=True,
                                text=True).stdout
        contexts = json.loads(listed)["exports"][0]["contexts"]
        mapped = subprocess.run(["nbdinfo", "--map=qemu:dirty-bitmap:b", d.uri("e")], check=True,
                                capture_output=True, text=True).stdout
        seen.append((contexts, mapped))
        assert qmp(d, "block-export-del", {"id": "e"})[0] == "ok"
    assert seen[0] == seen[1]
    assert seen[0][0].count("qemu:dirty-bitmap:b") == 2
    assert seen[0][1].split() == ["0", "65536", "0", "clean", "65536", "65536", "1", "dirty",
                                  "131072", str(64 * MIB - 131072), "0", "clean"]
