"""I/O limits as QEMU has them (issue 21 item 4): `throttle-group` objects, the `throttle`
filter node, `qom-get`/`qom-set` of a group's `limits`.

Refusals are compared text for text with qemu-storage-daemon (over the command line and
over QMP). Rates are checked on whichever daemon DAEMON picks, by lower bounds only: a
throttled export must take at least so long; nothing here fails on a slow machine."""

import asyncio
import shutil
import subprocess
import threading
import time

import nbd
import pytest

from conftest import can_connect_unix, daemon_binary, need, qmp_outcome, wait_until
from test_options import run_both

# The same bad --object / --blockdev command lines: the same exit code and message.
REFUSED = [
    ["--object", "throttle-group,id=g,x-iops-total=10,x-iops-read=5"],
    ["--object", "throttle-group,id=g,limits.iops-total=10,limits.iops-read=5"],
    ["--object", "throttle-group,id=g,limits.bps-total-max=10,limits.bps-write-max=5"],
    ["--object", "throttle-group,id=g,x-iops-total=10,x-iops-total-max=5"],
    ["--object", "throttle-group,id=g,x-iops-total=-1"],
    ["--object", "throttle-group,id=g,limits.iops-total=-1"],
    ["--object", "throttle-group,id=g,x-iops-total-max-length=5000000000"],
    ["--object", "throttle-group,id=g,limits.iops-total-max-length=5000000000"],
    ["--object", "throttle-group,id=g,limits.iops-total-max-length=-1"],
    ["--object", "throttle-group,id=g,limits.iops-total=5,limits.iops-total-max=7,"
                 "limits.iops-total-max-length=-5"],
    ["--object", "throttle-group,id=g,x-iops-size=4096"],
    ["--object", "throttle-group,id=g,x-iops-total-max-length=0"],
    ["--object", "throttle-group,id=g,x-iops-total-max-length=2"],
    ["--object", "throttle-group,id=g,x-iops-total-max=10"],
    ["--object", "throttle-group,id=g,x-bps-total=1000000000000001"],
    ["--object", "throttle-group,id=g,x-bps-total=100,x-bps-total-max=1000000000000,"
                 "x-bps-total-max-length=1000000"],
    ["--object", "throttle-group,id=g,bogus=1"],
    ["--object", "throttle-group,id=g,limits.bogus=1"],
    ["--object", "throttle-group,id=g,x-iops-total=abc"],
    # The x-* properties are set before limits.
    ["--object", "throttle-group,id=g,limits.iops-total=-1,x-iops-total=-1"],
    ["--object", "throttle-group,id=g,x-iops-read=10,limits.iops-total=20"],
    ["--object", "throttle-group,id=g", "--object", "throttle-group,id=g"],
    ["--blockdev", "driver=null-co,node-name=n", "--blockdev", "driver=throttle,node-name=t,file=n"],
    ["--blockdev", "driver=null-co,node-name=n",
     "--blockdev", "driver=throttle,node-name=t,file=n,throttle-group=zz"],
    ["--blockdev", "driver=throttle,node-name=t,throttle-group=zz"],
    ["--object", "throttle-group,id=g", "--blockdev", "driver=null-co,node-name=n",
     "--blockdev", "driver=throttle,node-name=t,file=n,throttle-group=g,foo=1"],
]


@pytest.mark.parametrize("args", REFUSED, ids=[f"refused-{i}" for i in range(len(REFUSED))])
def test_refused_limits_and_nodes_match_qsd(args):
    got = run_both(args)
    assert got["qsd"][0] == 1, got
    assert got["bexd"] == got["qsd"]


ACCEPTED = [
    ["--object", "throttle-group,id=g,x-iops-total=10,x-iops-total-max=20,"
                 "x-iops-total-max-length=3,x-iops-size=4096"],
    ["--object", "throttle-group,id=g,limits.bps-read=1000,limits.bps-write=2000,"
                 "limits.iops-read=10,limits.iops-read-max=100,limits.iops-read-max-length=60"],
    ["--object", "throttle-group,id=g", "--blockdev", "driver=null-co,node-name=n",
     "--blockdev", "driver=throttle,node-name=t,file=n,throttle-group=g"],
    ["--object", "throttle-group,id=g,limits.iops-total-max=20,x-iops-total=10"],
    ["--object", "throttle-group,id=g", "--blockdev",
     "driver=throttle,node-name=t,throttle-group=g,file.driver=null-co"],
]


@pytest.mark.parametrize("args", ACCEPTED, ids=[f"accepted-{i}" for i in range(len(ACCEPTED))])
def test_accepted_limits_and_nodes_match_qsd(args):
    got = run_both(args, timeout=1)
    assert got["qsd"][0] is None, got
    assert got["bexd"][0] is None, got


@pytest.fixture
def both(start):
    """bexd and qemu-storage-daemon, each with group g (iops-total=50) and a throttle node
    t over a null node."""
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon not installed")
    objects = ["throttle-group,id=g,x-iops-total=50"]
    blockdevs = ["driver=null-co,node-name=n,size=1048576",
                 "driver=throttle,node-name=t,file=n,throttle-group=g"]
    return tuple(start(blockdevs, [], which=k, objects=objects) for k in ("bexd", "qsd"))


# Steps run in order on each daemon; results compared one by one (limits as dicts).
QMP_STEPS = [
    ("qom-get", {"path": "g", "property": "limits"}),
    ("qom-get", {"path": "/objects/g", "property": "x-iops-total"}),
    ("qom-get", {"path": "g", "property": "type"}),
    ("qom-get", {"path": "/objects/g/", "property": "type"}),
    ("qom-get", {"path": "/objects", "property": "type"}),
    ("qom-get", {"path": "objects", "property": "type"}),
    ("qom-get", {"path": "/", "property": "type"}),
    ("qom-get", {"path": "/objects", "property": "bogus"}),
    ("qom-set", {"path": "/objects", "property": "type", "value": "x"}),
    ("qom-get", {"path": "g", "property": "bogus"}),
    ("qom-get", {"path": "nope", "property": "limits"}),
    ("qom-get", {"path": "g"}),
    ("qom-set", {"path": "g", "property": "x-iops-total", "value": 5}),
    ("qom-set", {"path": "g", "property": "limits", "value": {"iops-total": 5, "iops-read": 3}}),
    ("qom-set", {"path": "g", "property": "limits", "value": {"iops-total": 5, "iops-total-max": 3}}),
    ("qom-set", {"path": "g", "property": "limits", "value": {"iops-size": 512, "iops-total": 0}}),
    ("qom-set", {"path": "g", "property": "limits", "value": {"bps-total": -1}}),
    ("qom-set", {"path": "g", "property": "limits", "value": {"bps-total-max-length": 1 << 33}}),
    ("qom-set", {"path": "g", "property": "limits", "value": {"bogus": 1}}),
    ("qom-set", {"path": "g", "property": "limits", "value": {"iops-total": "x"}}),
    ("qom-set", {"path": "g", "property": "limits", "value": 5}),
    ("qom-set", {"path": "g", "property": "limits"}),
    ("qom-set", {"path": "g", "property": "type", "value": "x"}),
    ("qom-set", {"path": "g", "property": "bogus", "value": "x"}),
    ("qom-get", {"path": "g", "property": "limits"}),
    ("qom-set", {"path": "g", "property": "limits", "value": {"iops-total": 100}}),
    ("qom-set", {"path": "g", "property": "limits", "value": {"bps-total": 1000}}),
    ("qom-get", {"path": "g", "property": "limits"}),
    ("qom-set", {"path": "g", "property": "limits", "value": {"iops-total": 0, "bps-total": 0}}),
    ("qom-get", {"path": "g", "property": "limits"}),
    ("object-del", {"id": "g"}),
    ("object-add", {"qom-type": "throttle-group", "id": "g"}),
    ("object-add", {"qom-type": "throttle-group", "id": "h",
                    "limits": {"iops-total": 10, "iops-total-max": 5}}),
    ("object-add", {"qom-type": "throttle-group", "id": "h", "x-iops-total": -3}),
    ("object-add", {"qom-type": "throttle-group", "id": "h", "limits": {"iops-total": "x"}}),
    ("object-add", {"qom-type": "throttle-group", "id": "h",
                    "limits": {"iops-total": 10}, "x-iops-total-max": 20}),
    ("qom-get", {"path": "h", "property": "limits"}),
    ("qom-get", {"path": "/objects/h", "property": "x-iops-total-max"}),
    ("blockdev-add", {"driver": "throttle", "node-name": "t2", "file": "n"}),
    ("blockdev-add", {"driver": "throttle", "node-name": "t2", "file": "n", "throttle-group": "zz"}),
    ("blockdev-add", {"driver": "throttle", "node-name": "t2", "file": "n", "throttle-group": "h"}),
    ("object-del", {"id": "h"}),
    ("blockdev-del", {"node-name": "t2"}),
    ("object-del", {"id": "h"}),
    ("blockdev-del", {"node-name": "t"}),
    ("object-del", {"id": "g"}),
    ("qom-get", {"path": "g", "property": "limits"}),
]


def test_qom_get_set_and_object_add_match_qsd(both):
    ours, theirs = both

    async def run_all(sock):
        return [await qmp_outcome(sock, c, a) for c, a in QMP_STEPS]

    got, expected = asyncio.run(run_all(ours.qmp_sock)), asyncio.run(run_all(theirs.qmp_sock))
    for step, g, e in zip(QMP_STEPS, got, expected):
        assert g == e, step


# Rates: lower bounds that hold on any machine. A limit of 50 operations a second lets
# the first 6 go at once (QEMU's bucket holds a tenth of a second), so 100 requests take
# at least 94 / 50 = 1.88 s; the tests ask for 1.5 s.

def reads(uri, count, size=4096):
    """`count` reads of `size` bytes one after another; how long they took."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        t0 = time.monotonic()
        for i in range(count):
            h.pread(size, (i * size) % (1 << 20))
        return time.monotonic() - t0
    finally:
        h.shutdown()


def throttled(start, tmp_path, limits, nodes=("t",)):
    """Throttle nodes in group g over one image full of data (QEMU's NBD server answers
    reads of holes from block status, which no throttle counts)."""
    img = tmp_path / "data.img"
    img.write_bytes((bytes(range(1, 256)) + b"\x01") * 4096)
    objects = [f"throttle-group,id=g,{limits}"]
    blockdevs = [f"driver=file,node-name=n,filename={img}"]
    exports = []
    for t in nodes:
        blockdevs.append(f"driver=throttle,node-name={t},file=n,throttle-group=g")
        exports.append(f"type=nbd,id=e-{t},node-name={t},name={t}")
    return start(blockdevs, exports, objects=objects)


def test_iops_limit_holds(start, tmp_path):
    d = throttled(start, tmp_path, "x-iops-total=50")
    assert reads(d.uri("t"), 100) >= 1.5


def test_bps_limit_holds(start, tmp_path):
    # 1 MiB/s: 3 MiB in 64 KiB reads takes at least 2.9 s (a tenth of a second goes at once).
    d = throttled(start, tmp_path, "limits.bps-read=1048576")
    assert reads(d.uri("t"), 48, size=65536) >= 2.5


def test_iops_size_counts_large_requests_as_several(start, tmp_path):
    # 16 KiB at iops-size 4 KiB: 4 operations each, so 30 reads are 120 operations at 50/s.
    d = throttled(start, tmp_path, "x-iops-total=50,x-iops-size=4096")
    assert reads(d.uri("t"), 30, size=16384) >= 1.5


def test_burst_is_capped_at_its_max_rate(start, tmp_path):
    # A burst of up to 50/s for 2 s over an average of 10/s: 60 requests inside the burst
    # still go at no more than 50/s after the first 6, so at least 1.08 s.
    d = throttled(start, tmp_path, "x-iops-total=10,x-iops-total-max=50,x-iops-total-max-length=2")
    assert reads(d.uri("t"), 60) >= 0.9


def test_two_nodes_in_one_group_share_the_limit(start, tmp_path):
    """Two exports over two throttle nodes in one group of 50/s: 50 reads on each at the same
    time are 100 reads against the one limit (each node alone would allow 50/s)."""
    d = throttled(start, tmp_path, "x-iops-total=50", nodes=("t1", "t2"))
    took = {}

    def client(name):
        took[name] = reads(d.uri(name), 50)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in ("t1", "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - t0 >= 1.5
    # Members take turns, so neither finishes its 50 in the time 50 alone would take
    # while the other waits: both clients see the shared rate.
    assert min(took.values()) >= 1.0, took


def test_qom_set_limits_takes_effect_on_a_running_export(start, tmp_path):
    d = throttled(start, tmp_path, "x-iops-total=100000")
    assert asyncio.run(qmp_outcome(d.qmp_sock, "qom-set", {
        "path": "g", "property": "limits", "value": {"iops-total": 50}})) == ("ok", {})
    assert reads(d.uri("t"), 100) >= 1.5
    kind, limits = asyncio.run(qmp_outcome(d.qmp_sock, "qom-get",
                                           {"path": "g", "property": "limits"}))
    assert (kind, limits["iops-total"]) == ("ok", 50)


def test_unlimited_group_node_serves_data_unchanged(start, tmp_path):
    """A throttle node with no limit set passes reads and writes through (also the
    page-cache paths bexd takes for a file)."""
    need("qemu-io")
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * (1 << 20))
    d = start(["driver=file,node-name=f,filename=" + str(img),
               "driver=throttle,node-name=t,file=f,throttle-group=g"],
              ["type=nbd,id=e,node-name=t,name=t,writable=on"],
              objects=["throttle-group,id=g"])
    w = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 131072", d.uri("t")],
                       capture_output=True, text=True)
    assert w.returncode == 0, w.stderr
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 4096 131072", d.uri("t")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
    assert img.read_bytes()[4096:4096 + 131072] == b"\x5a" * 131072


@pytest.mark.parametrize("discard,kept", [("", True), (",discard=unmap", False)])
def test_discard_passes_the_filter_only_with_discard_unmap(start, tmp_path, discard, kept):
    """As in QEMU, a node without discard=unmap drops discards: the file below keeps its
    data even though it would punch holes itself."""
    img = tmp_path / "d.img"
    img.write_bytes(b"\x5a" * (1 << 20))
    d = start([f"driver=file,node-name=f,filename={img},discard=unmap",
               f"driver=throttle,node-name=t,file=f,throttle-group=g{discard}"],
              ["type=nbd,id=e,node-name=t,name=t,writable=on"],
              objects=["throttle-group,id=g"])
    h = nbd.NBD()
    h.connect_uri(d.uri("t"))
    try:
        h.trim(65536, 0)
        h.flush()
        data = h.pread(65536, 0)
    finally:
        h.shutdown()
    assert (data == b"\x5a" * 65536) == kept
    assert (img.read_bytes()[:65536] == b"\x5a" * 65536) == kept


@pytest.mark.parametrize("program", ["qemu-nbd", "bexd serve"])
def test_serve_takes_a_throttle_node_as_qemu_nbd(tmp_path, program):
    """qemu-nbd's --object throttle-group with --image-opts driver=throttle: the same limit
    from bexd serve."""
    need("qemu-nbd")
    img = tmp_path / "d.img"
    img.write_bytes((bytes(range(1, 256)) + b"\x01") * 4096)
    sock = tmp_path / "s.sock"
    argv = (["qemu-nbd"] if program == "qemu-nbd" else daemon_binary("bexd") + ["serve"])
    argv += ["-k", str(sock), "-t", "--object", "throttle-group,id=g,x-iops-total=50",
             "--image-opts", "driver=throttle,throttle-group=g,file.driver=raw,"
             f"file.file.driver=file,file.file.filename={img}"]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: can_connect_unix(sock), what=f"{program} to listen")
        assert reads(f"nbd+unix:///?socket={sock}", 100) >= 1.5
    finally:
        p.terminate()
        p.wait()
