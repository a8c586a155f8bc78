"""Options that QEMU acts on are acted on, or refused with QEMU's error naming them
(issue 16 item 4): the same command lines and steps against qemu-storage-daemon and bexd."""

import asyncio
import json
import os
import socket
import subprocess

import pytest

from conftest import daemon_binary, free_port, need, qmp_outcome, wait_until


def run_both(args, timeout=3):
    """Runs qemu-storage-daemon and bexd with the same arguments; for each, the exit code
    (None when it was still running after `timeout` seconds) and its stderr without the
    program name."""
    need("qemu-storage-daemon")
    out = {}
    for kind in ("qsd", "bexd"):
        p = subprocess.Popen(daemon_binary(kind) + args, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _, err = p.communicate(timeout=timeout)
            code = p.returncode
        except subprocess.TimeoutExpired:
            p.terminate()
            _, err = p.communicate()
            code = None
        out[kind] = (code, err.strip().split(": ", 1)[-1])
    return out


@pytest.mark.parametrize("blockdev", [
    "file,node-name=f,filename={img},detect-zeroes=unmap",
    "file,node-name=f,filename={img},detect-zeroes=unmap,discard=ignore",
    "file,node-name=f,filename={img},detect-zeroes=maybe",
    "file,node-name=f,filename={img},force-share=on",
    "file,node-name=f,filename={img},force-share=on,read-only=off",
    "raw,node-name=f,force-share=on,file.driver=file,file.filename={img}",
])
def test_refused_node_options_match_qsd(tmp_path, blockdev):
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 65536)
    got = run_both(["--blockdev", blockdev.format(img=img)])
    assert got["qsd"][0] == 1, got
    assert got["bexd"] == got["qsd"]


@pytest.mark.parametrize("blockdev", [
    "file,node-name=f,filename={img},detect-zeroes=on",
    "file,node-name=f,filename={img},detect-zeroes=unmap,discard=unmap",
    "file,node-name=f,filename={img},force-share=on,read-only=on",
    "file,node-name=f,filename={img},active=on",
])
def test_accepted_node_options_match_qsd(tmp_path, blockdev):
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 65536)
    got = run_both(["--blockdev", blockdev.format(img=img)], timeout=1)
    assert got["qsd"] == (None, ""), got
    assert got["bexd"] == got["qsd"]


@pytest.mark.bexd_only("qemu-storage-daemon implements inactive nodes; bexd refuses them")
def test_inactive_node_is_refused_naming_the_member(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 65536)
    p = subprocess.run(daemon_binary("bexd") + [
        "--blockdev", f"file,node-name=f,filename={img},active=off"],
        capture_output=True, text=True, timeout=10)
    assert p.returncode == 1
    assert "Parameter 'active'" in p.stderr and "inactive" in p.stderr, p.stderr


def allocated(path):
    """Bytes the file holds on disk."""
    return os.stat(path).st_blocks * 512


def qemu_io_write(d, command):
    subprocess.run(["qemu-io", "-f", "raw", "-c", command, d.uri("disk")], check=True,
                   capture_output=True, timeout=30)


def data_image(path, size=4 << 20):
    with open(path, "wb") as f:
        f.write(b"\xa5" * size)
    return path


@pytest.mark.parametrize("mode,discard,hole", [
    ("off", "unmap", False),
    ("on", "unmap", False),
    ("unmap", "unmap", True),
])
def test_detect_zeroes_turns_zero_writes_into_holes_only_with_unmap(start, tmp_path, mode,
                                                                     discard, hole):
    """qemu-io writes 1 MiB of zeroes into fully allocated data: only with
    detect-zeroes=unmap (and discard=unmap) does the range become a hole."""
    need("qemu-io")
    img = data_image(tmp_path / "d.img")
    d = start([f"driver=file,node-name=disk0,filename={img},detect-zeroes={mode},"
               f"discard={discard}"],
              ["type=nbd,id=e,node-name=disk0,name=disk,writable=on"])
    before = allocated(img)
    qemu_io_write(d, "write -P 0 1M 1M")
    with open(img, "rb") as f:
        f.seek(1 << 20)
        assert f.read(1 << 20) == b"\0" * (1 << 20)
        assert f.read(16) == b"\xa5" * 16
    freed = before - allocated(img)
    if hole:
        assert freed >= 1 << 20, (before, allocated(img))
    else:
        assert freed == 0, (before, allocated(img))


def test_detect_zeroes_unmap_shows_a_hole_in_the_map(start, tmp_path):
    need("nbdinfo")
    img = data_image(tmp_path / "d.img")
    d = start([f"driver=file,node-name=disk0,filename={img},detect-zeroes=unmap,"
               "discard=unmap"],
              ["type=nbd,id=e,node-name=disk0,name=disk,writable=on"])
    qemu_io_write(d, "write -P 0 1M 1M")
    out = subprocess.run(["nbdinfo", "--map", d.uri("disk")], capture_output=True, text=True,
                         check=True, timeout=30).stdout.split("\n")
    rows = [line.split() for line in out if line.strip()]
    assert rows[:3] == [["0", "1048576", "0", "data"],
                        ["1048576", "1048576", "3", "hole,zero"],
                        ["2097152", "2097152", "0", "data"]], rows


@pytest.mark.parametrize("mode", ["off", "on", "unmap"])
def test_query_named_block_nodes_reports_detect_zeroes(start, tmp_path, mode):
    img = data_image(tmp_path / "d.img", 1 << 20)
    d = start([f"driver=file,node-name=disk0,filename={img},detect-zeroes={mode},"
               "discard=unmap"],
              ["type=nbd,id=e,node-name=disk0,name=disk"])
    kind, nodes = asyncio.run(qmp_outcome(d.qmp_sock, "query-named-block-nodes", {}))
    assert kind == "ok"
    assert [n["detect_zeroes"] for n in nodes if n["node-name"] == "disk0"] == [mode]


def try_resize(img, size):
    return subprocess.run(["qemu-img", "resize", "-f", "raw", str(img), str(size)],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("blockdev,shared", [
    ("driver=file,node-name=disk0,filename={img},read-only=on", False),
    ("driver=raw,node-name=disk0,read-only=on,file.driver=file,file.filename={img}", False),
    ("driver=raw,node-name=disk0,read-only=on,force-share=on,file.driver=file,"
     "file.filename={img}", True),
])
def test_force_share_lets_another_process_resize(start, tmp_path, blockdev, shared):
    """A read-only node forbids resizing to others; with force-share=on (which its inline
    file child inherits) it forbids nothing. (On a file node exported directly the NBD
    export itself forbids resizing in QEMU, force-share or not; bexd does not, see
    docs/architecture.md.)"""
    need("qemu-img")
    img = data_image(tmp_path / "d.img", 1 << 20)
    start([blockdev.format(img=img)], ["type=nbd,id=e,node-name=disk0,name=disk"])
    r = try_resize(img, 2 << 20)
    if shared:
        assert r.returncode == 0, r.stderr
        assert os.path.getsize(img) == 2 << 20
    else:
        assert r.returncode == 1
        assert 'Failed to get "resize" lock' in r.stderr
        assert os.path.getsize(img) == 1 << 20


def test_qmp_blockdev_add_refusals_match_qsd(start, tmp_path):
    """The same blockdev-add over QMP on both daemons: the same class and text."""
    need("qemu-storage-daemon")
    img = data_image(tmp_path / "d.img", 1 << 20)
    cases = [
        {"driver": "file", "node-name": "x", "filename": str(img), "detect-zeroes": "unmap"},
        {"driver": "file", "node-name": "x", "filename": str(img), "force-share": True},
        {"driver": "file", "node-name": "x", "filename": str(img), "detect-zeroes": 1},
        {"driver": "file", "node-name": "x", "filename": str(img), "active": "yes"},
    ]
    ours = start([], [], which="bexd")
    theirs = start([], [], which="qsd")
    for args in cases:
        a = asyncio.run(qmp_outcome(ours.qmp_sock, "blockdev-add", args))
        b = asyncio.run(qmp_outcome(theirs.qmp_sock, "blockdev-add", args))
        assert a == b, args
        assert a[0] == "GenericError", a


def nbd_server_errors(addr):
    return run_both(["--nbd-server", "addr.type=inet," + addr])


@pytest.mark.parametrize("addr", [
    "addr.host=127.0.0.1,addr.port={port},addr.ipv4=off,addr.ipv6=off",
    "addr.host=127.0.0.1,addr.port={port},addr.ipv6=on",
    "addr.host=127.0.0.1,addr.port={port},addr.ipv4=off",
    "addr.host=localhost,addr.port={port},addr.numeric=on",
    "addr.host=127.0.0.1,addr.port={taken}",
    "addr.host=127.0.0.1,addr.port={taken},addr.to={taken}",
    "addr.host=127.0.0.1,addr.port=x",
])
def test_inet_listen_refusals_match_qsd(addr):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        got = nbd_server_errors(addr.format(port=free_port(), taken=held.getsockname()[1]))
    assert got["qsd"][0] == 1, got
    assert got["bexd"] == got["qsd"]


def test_inet_port_range_takes_the_next_free_port(start_raw):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        d = start_raw([f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},"
                       f"addr.to={port + 10}"])
        listening = listening_ports(d.pid)
    assert port not in listening and any(port < p <= port + 10 for p in listening), listening


def test_inet_localhost_listens_on_every_address(start_raw):
    """QEMU resolves the host and listens on each address it yields."""
    port = free_port()
    d = start_raw([f"addr.type=inet,addr.host=localhost,addr.port={port}"])
    want = {a[4][0] for a in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)}
    got = {addr for addr, p in listening_addrs(d.pid) if p == port}
    assert got == want


@pytest.mark.bexd_only("qemu-storage-daemon 10.0 accepts keep-alive on a listening address "
                       "and ignores it; later QEMU (and bexd) set it on accepted sockets")
def test_inet_keep_alive_on_accepted_sockets(start_raw):
    port = free_port()
    d = start_raw([f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},addr.keep-alive=on"])
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.recv(8)
        out = subprocess.run(["ss", "-tnoH", "state", "established", f"sport = :{port}"],
                             capture_output=True, text=True, check=True).stdout
    assert "keepalive" in out, out


def listening_addrs(pid):
    """(address, port) of every TCP socket process `pid` listens on."""
    out = subprocess.run(["ss", "-tlnpH"], capture_output=True, text=True, check=True).stdout
    addrs = []
    for line in out.splitlines():
        if f"pid={pid}," in line:
            local = line.split()[3]
            host, port = local.rsplit(":", 1)
            addrs.append((host.strip("[]").split("%")[0], int(port)))
    return addrs


def listening_ports(pid):
    return {p for _, p in listening_addrs(pid)}


class RawDaemon:
    def __init__(self, proc):
        self.proc = proc
        self.pid = proc.pid


@pytest.fixture
def start_raw(kind):
    """Starts the daemon DAEMON names with these --nbd-server arguments and waits until
    it listens; killed at teardown."""
    procs = []

    def _start(servers):
        argv = daemon_binary(kind)
        for s in servers:
            argv += ["--nbd-server", s]
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(p)
        wait_until(lambda: p.poll() is not None or listening_addrs(p.pid)
                   or abstract_listeners(p.pid), what="listen")
        assert p.poll() is None, p.stderr.read()
        return RawDaemon(p)

    yield _start
    for p in procs:
        p.terminate()
        assert p.wait(timeout=20) == 0


def abstract_listeners(pid):
    """The abstract unix names process `pid` listens on, as ss prints them ('@' for NUL)."""
    out = subprocess.run(["ss", "-xlpH"], capture_output=True, text=True, check=True).stdout
    return [line.split()[4] for line in out.splitlines() if f"pid={pid}," in line]


@pytest.mark.parametrize("tight", [None, "on", "off"])
def test_unix_abstract_listens_in_the_abstract_namespace(start_raw, tmp_path, tight):
    name = f"bexd-test-{tmp_path.name}"
    extra = f",addr.tight={tight}" if tight else ""
    d = start_raw([f"addr.type=unix,addr.path={name},addr.abstract=on{extra}"])
    wait_until(lambda: abstract_listeners(d.pid), what="abstract listener")
    padded = "@" + name + ("@" * (107 - len(name)) if tight == "off" else "")
    assert abstract_listeners(d.pid) == [padded]
    assert not os.path.exists(name)
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(padded.replace("@", "\0"))
        assert c.recv(8) == b"NBDMAGIC"


def test_unix_abstract_name_too_long_matches_qsd():
    got = run_both(["--nbd-server", "addr.type=unix,addr.abstract=on,addr.path=" + "a" * 108])
    assert got["qsd"][0] == 1, got
    assert got["bexd"][0] == 1
    assert got["bexd"][1] == got["qsd"][1].splitlines()[0]


def pretty_transcript(kind, tmp_path, commands):
    """The bytes a pretty=on monitor of `kind` sends: the greeting, then each reply."""
    sock = tmp_path / f"{kind}-pretty.sock"
    p = subprocess.Popen(daemon_binary(kind) + [
        "--chardev", f"socket,id=m0,path={sock},server=on,wait=off",
        "--monitor", "chardev=m0,pretty=on"], stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: os.path.exists(sock), what="monitor socket")
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            wait_until(lambda: s.connect_ex(str(sock)) == 0, what="monitor")
            out = [read_document(s)]
            for c in commands:
                s.sendall(c.encode())
                out.append(read_document(s))
        return out
    finally:
        p.terminate()
        p.wait(timeout=20)


def read_document(s):
    """One pretty document: up to a line that is just '}'."""
    buf = b""
    while not (buf.endswith(b"\r\n}\r\n") or buf == b"{}\r\n"):
        chunk = s.recv(1)
        if not chunk:
            raise EOFError(buf)
        buf += chunk
    return buf


def test_monitor_pretty_output_is_byte_for_byte_qsds(tmp_path):
    need("qemu-storage-daemon")
    commands = [
        '{"execute": "qmp_capabilities"}',
        '{"execute": "query-block-exports", "id": {"a": [1, "x"], "b": {}}}',
        '{"execute": "bogus"}',
        '{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n",'
        ' "size": 4096}}',
        '{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n"}}',
        '{"execute": "query-version"}',
    ]
    got = {k: pretty_transcript(k, tmp_path, commands) for k in ("qsd", "bexd")}
    # QEMU orders an object's members by its hash table, bexd by name, so each daemon's
    # bytes are compared with QEMU's layout of its own documents (checked here on
    # qemu-storage-daemon's), and the documents with each other.
    for kind in ("qsd", "bexd"):
        for doc in got[kind]:
            assert qemu_pretty(json.loads(doc, object_pairs_hook=dict)) == doc, (kind, doc)
    def parsed(doc):
        v = json.loads(doc)
        for inner in (v.get("QMP", {}), v.get("return", {})):
            if isinstance(inner, dict):
                inner.pop("package", None)
                inner.get("version", {}).pop("package", None)
        return v
    assert [parsed(d) for d in got["bexd"]] == [parsed(d) for d in got["qsd"]]
    assert got["bexd"][1] == b'{\r\n    "return": {\r\n    }\r\n}\r\n'


def qemu_pretty(v, level=0):
    """QEMU's pretty JSON layout of `v` (bytes, \\r\\n line ends, as a monitor sends it)."""
    def fmt(v, level):
        pad = "    "
        if isinstance(v, dict) or isinstance(v, list):
            items = ([json.dumps(k) + ": " + fmt(x, level + 1) for k, x in v.items()]
                     if isinstance(v, dict) else [fmt(x, level + 1) for x in v])
            o, c = "{}" if isinstance(v, dict) else "[]"
            if not items:
                return o + "\n" + pad * level + c
            return (o + "\n" + pad * (level + 1) + (",\n" + pad * (level + 1)).join(items)
                    + "\n" + pad * level + c)
        return json.dumps(v)
    return (fmt(v, level) + "\n").replace("\n", "\r\n").encode()


def test_trace_option_errors_match_qsd(tmp_path):
    got = run_both(["--trace", "nbd_*,bogus=1"])
    assert got["qsd"][0] == 1
    assert got["bexd"] == got["qsd"]
    got = run_both(["--trace", f"events={tmp_path}/missing"])
    assert got["qsd"][0] == got["bexd"][0] == 1
    assert "No such file or directory" in got["bexd"][1]


@pytest.mark.bexd_only("bexd maps QEMU's trace patterns onto its log targets; the lines differ")
def test_trace_nbd_pattern_logs_the_nbd_server_to_the_file(tmp_path):
    need("nbdinfo")
    log = tmp_path / "trace.log"
    sock = tmp_path / "nbd.sock"
    p = subprocess.Popen(daemon_binary("bexd") + [
        "-T", f"nbd_*,file={log}", "--blockdev", "null-co,node-name=n",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "nbd,id=e,node-name=n,name=d"], stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: os.path.exists(sock), what="NBD socket")
        subprocess.run(["nbdinfo", f"nbd+unix:///d?socket={sock}"], check=True,
                       capture_output=True, timeout=30)
    finally:
        p.terminate()
        assert p.wait(timeout=20) == 0
    text = log.read_text()
    assert "bexd::nbd_server" in text and "NBD connection closed" in text, text
    assert p.stderr.read() == ""


@pytest.mark.bexd_only("qemu-storage-daemon warns about an unknown event and goes on; bexd "
                       "refuses a pattern it cannot map, so a trace is never silently empty")
def test_trace_pattern_bexd_cannot_map_is_refused():
    p = subprocess.run(daemon_binary("bexd") + ["-T", "vfio_*"], capture_output=True,
                       text=True, timeout=10)
    assert p.returncode == 1
    assert p.stderr.startswith("bexd: --trace vfio_*: trace pattern 'vfio_*' matches no bexd")
    assert len(p.stderr.strip().splitlines()) == 1


def qcow2_image(path):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    return path


QCOW2 = "qcow2,node-name=q,file.driver=file,file.filename={img}"


@pytest.mark.parametrize("extra", [
    "",
    ",discard=unmap,pass-discard-request=on,pass-discard-snapshot=on,pass-discard-other=on",
    ",pass-discard-request=off,pass-discard-other=off,discard-no-unref=off,overlap-check=none",
])
def test_qcow2_members_bexd_acts_as_are_accepted_like_qsd(tmp_path, extra):
    need("qemu-img")
    img = qcow2_image(tmp_path / "d.qcow2")
    got = run_both(["--blockdev", QCOW2.format(img=img) + extra], timeout=1)
    assert got["qsd"] == (None, ""), got
    assert got["bexd"] == got["qsd"]


@pytest.mark.bexd_only("qemu-storage-daemon implements these qcow2 members; bexd refuses them")
@pytest.mark.parametrize("extra,member", [
    (",pass-discard-request=on", "pass-discard-request"),
    (",discard=unmap,pass-discard-other=off", "pass-discard-other"),
    (",discard-no-unref=on", "discard-no-unref"),
    (",overlap-check=cached", "overlap-check"),
    (",l2-cache-entry-size=4096", "l2-cache-entry-size"),
    (",data-file=x", "data-file"),
    (",encrypt.format=luks,encrypt.key-secret=s", "encrypt"),
])
def test_qcow2_members_bexd_does_not_act_on_are_refused(tmp_path, extra, member):
    need("qemu-img")
    img = qcow2_image(tmp_path / "d.qcow2")
    p = subprocess.run(daemon_binary("bexd") + ["--blockdev", QCOW2.format(img=img) + extra],
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 1
    assert f"Parameter '{member}'" in p.stderr, p.stderr


def test_chardev_defaults_are_accepted_like_qsd(tmp_path):
    sock = tmp_path / "m.sock"
    got = run_both(["--chardev", f"socket,id=m0,path={sock},server=on,wait=off,tight=on,"
                    "abstract=off,telnet=off,mux=off,nodelay=on",
                    "--monitor", "chardev=m0"], timeout=1)
    assert got["qsd"] == (None, ""), got
    assert got["bexd"] == got["qsd"]


@pytest.mark.bexd_only("qemu-storage-daemon implements these chardev members; bexd refuses them")
@pytest.mark.parametrize("extra,member", [
    ("telnet=on", "telnet"), ("mux=on", "mux"), ("ipv4=on", "ipv4"), ("to=5000", "to"),
    ("abstract=on", "abstract"), ("logfile=/tmp/x", "logfile"), ("nodelay=off", "nodelay"),
])
def test_chardev_members_bexd_does_not_act_on_are_refused(tmp_path, extra, member):
    p = subprocess.run(daemon_binary("bexd") + [
        "--chardev", f"socket,id=m0,path={tmp_path}/m.sock,server=on,wait=off,{extra}"],
        capture_output=True, text=True, timeout=10)
    assert p.returncode == 1
    assert f"Parameter '{member}'" in p.stderr, p.stderr
