"""Fixtures for running bexd (or qemu-storage-daemon, for parity) with real clients.

DAEMON=bexd (default) or DAEMON=qsd picks the server; BEXD points at the binary
(default: <repo>/target/release/bexd). Both get the same command line.

With DAEMON=qsd the run checks the expectations themselves: it keeps only the tests whose
daemon DAEMON picks (they ask for the `kind` fixture, themselves or through `start`), and
leaves out those marked `bexd_only(reason)` (bexd's own commands, limits and process) and
those that start the same daemons whatever DAEMON says (the DAEMON=bexd run has them).

Under CI=true nothing may pass without running: a skipped test is reported as failed.
"""

import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = ["qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon", "nbdinfo", "nbdcopy", "nbdsh",
         "fio", "openssl", "strace", "systemd-socket-activate", "promtool", "prometheus",
         "tmux", "qemu-system-x86_64"]
MODULES = ["nbd", "qemu.qmp"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "bexd_only(reason): checks bexd's own behaviour, which qemu-storage-daemon "
        "does not have or has otherwise by design; left out of the DAEMON=qsd run")
    config.addinivalue_line(
        "markers", "fleecing: needs copy-before-write, snapshot-access and blockdev-reopen in "
        "the daemon; against a bexd without them the test is a strict xfail (not run), so it "
        "counts again once bexd has them")


FLEECING_NEEDS = ["blockdev-reopen", "copy-before-write", "snapshot-access"]


def bexd_lacks_fleecing():
    """What of FLEECING_NEEDS bexd's QMP schema does not have (asked of a bexd started
    for the purpose)."""
    import json
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "qmp.sock"
        proc = subprocess.Popen(daemon_binary("bexd") + [
            "--chardev", f"socket,id=m0,path={sock},server=on,wait=off",
            "--monitor", "chardev=m0"], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: can_connect_unix(sock), what="bexd's QMP socket")
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
                f = s.makefile("rw")
                f.readline()
                for cmd in ("qmp_capabilities", "query-qmp-schema"):
                    f.write(json.dumps({"execute": cmd}) + "\n")
                    f.flush()
                    reply = json.loads(f.readline())
            text = json.dumps(reply)
        finally:
            proc.kill()
            proc.wait()
    return [n for n in FLEECING_NEEDS if f'"{n}"' not in text]


def follows_daemon(item):
    """Whether the daemon this test starts is the one DAEMON names: it asks for the `kind`
    fixture (itself or through `start`) and no parametrization fixes `kind`."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "kind" in getattr(item, "fixturenames", ()) and "kind" not in params


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DAEMON", "bexd") != "qsd":
        fleecing = [i for i in items if i.get_closest_marker("fleecing") and follows_daemon(i)]
        missing = bexd_lacks_fleecing() if fleecing else []
        for item in fleecing if missing else []:
            item.add_marker(pytest.mark.xfail(
                reason=f"bexd has no {', '.join(missing)} yet (issue 19)", run=False,
                strict=True))
        return
    keep, bexd_only, fixed = [], [], []
    for item in items:
        if item.get_closest_marker("bexd_only"):
            bexd_only.append(item)
        elif not follows_daemon(item):
            fixed.append(item)
        else:
            keep.append(item)
    if bexd_only or fixed:
        config.hook.pytest_deselected(items=bexd_only + fixed)
        items[:] = keep
    config._qsd_left_out = (len(bexd_only), len(fixed))


def pytest_report_header(config):
    if os.environ.get("DAEMON", "bexd") == "qsd":
        return ("DAEMON=qsd: only tests whose daemon DAEMON picks; bexd_only tests and tests "
                "that start fixed daemons are deselected")
    return None


def pytest_terminal_summary(terminalreporter, config):
    left_out = getattr(config, "_qsd_left_out", None)
    if left_out:
        terminalreporter.write_line(
            f"DAEMON=qsd: deselected {left_out[0]} bexd_only tests and {left_out[1]} tests that "
            "start the same daemons whatever DAEMON says (the DAEMON=bexd run has them)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip is a failure: CI must not pass a test that did not run."""
    outcome = yield
    report = outcome.get_result()
    if (os.environ.get("CI") == "true" and report.skipped
            and not hasattr(report, "wasxfail")):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {reason}"


def pytest_sessionstart(session):
    """In CI every client must be present: a missing one fails, never skips."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    for m in MODULES:
        try:
            __import__(m)
        except ImportError:
            missing.append(f"python module {m}")
    if missing and os.environ.get("CI") == "true":
        raise pytest.UsageError(f"missing test clients in CI: {', '.join(missing)}")


def recv_exact(s, n):
    """`n` bytes from socket `s` (recv with MSG_WAITALL may return fewer on a
    socket with a timeout); EOFError if it closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def raw_client(path, name=b"disk"):
    """A unix-socket client handshaken by hand (NBD_OPT_GO, no structured
    replies, so replies are simple), for tests that misbehave on purpose."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(str(path))
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 4 + len(name) + 2)
              + struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    while True:
        rtype, length = struct.unpack(">II", recv_exact(s, 20)[12:20])
        recv_exact(s, length)
        if rtype == 1:
            return s


def syscall_count(pid, syscall, action):
    """How many `syscall` calls process `pid` (all its threads) made while
    `action` ran, traced with strace: proof that a code path was taken."""
    need("strace")
    log = f"/tmp/bexd-strace-{uuid.uuid4().hex}"
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", f"trace={syscall}", "-o", log,
                               "-p", str(pid)], stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # strace attaches to every thread
    try:
        action()
    finally:
        tracer.terminate()
        tracer.wait()
    with open(log) as f:
        calls = sum(1 for line in f if f"{syscall}(" in line)
    os.unlink(log)
    return calls


def need(tool):
    if shutil.which(tool) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is needed in CI (scripts/install-deps.sh installs it)")
        pytest.skip(f"{tool} not installed")


def daemon_binary(kind):
    if kind == "qsd":
        return ["qemu-storage-daemon"]
    return [os.environ.get("BEXD", str(REPO / "target" / "release" / "bexd"))]


def proc_status(pid, field):
    """A number from /proc/PID/status (`VmRSS` in KiB, `Threads`, ...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def wait_until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


def can_connect_unix(path):
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
        return True
    except OSError:
        return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Every daemon started, so that one a failed test left running is killed at
# its teardown instead of holding its image locked for the rest of the run.
_STARTED = []


@pytest.fixture(autouse=True)
def _no_daemon_outlives_its_test():
    yield
    while _STARTED:
        d = _STARTED.pop()
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


class Daemon:
    """A running server with an NBD unix socket and a QMP unix socket."""

    def __init__(self, tmp, kind, blockdevs, exports, server_extra="", tcp=False, objects=()):
        self.kind = kind
        self.tmp = Path(tmp)
        self.sock = self.tmp / f"{kind}-nbd.sock"
        self.qmp_sock = self.tmp / f"{kind}-qmp.sock"
        self.port = free_port() if tcp else None
        if tcp:
            addr = f"addr.type=inet,addr.host=127.0.0.1,addr.port={self.port}"
        else:
            addr = f"addr.type=unix,addr.path={self.sock}"
        argv = daemon_binary(kind)
        for o in objects:
            argv += ["--object", o]
        for b in blockdevs:
            argv += ["--blockdev", b]
        argv += ["--chardev", f"socket,id=m0,path={self.qmp_sock},server=on,wait=off",
                 "--monitor", "chardev=m0",
                 "--nbd-server", addr + server_extra]
        for e in exports:
            argv += ["--export", e]
        self.stderr = open(self.tmp / f"{kind}.stderr", "w+")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=self.stderr)
        _STARTED.append(self)
        wait_until(self._ready, what=f"{kind} to listen")

    def _ready(self):
        if self.proc.poll() is not None:
            self.stderr.seek(0)
            raise RuntimeError(f"{self.kind} exited: {self.stderr.read()}")
        if not can_connect_unix(self.qmp_sock):
            return False
        if self.port:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False
        return can_connect_unix(self.sock)

    def uri(self, name=""):
        if self.port:
            return f"nbd://127.0.0.1:{self.port}/{name}"
        return f"nbd+unix:///{name}?socket={self.sock}"

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        """SIGTERM and the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        self.stderr.close()
        return self.proc.returncode


@pytest.fixture
def kind():
    return os.environ.get("DAEMON", "bexd")


@pytest.fixture
def start(tmp_path, kind):
    """start(blockdevs, exports, ...) -> Daemon; stopped (exit 0 asserted) at teardown."""
    daemons = []

    def _start(blockdevs, exports, server_extra="", tcp=False, which=None, objects=()):
        d = Daemon(tmp_path, which or kind, blockdevs, exports, server_extra, tcp, objects)
        daemons.append(d)
        return d

    yield _start
    for d in daemons:
        assert d.stop() == 0, f"{d.kind} did not exit cleanly on SIGTERM"


def make_image(path, size, pattern=None):
    """A sparse raw image; `pattern` is a list of (offset, bytes) written into it."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pattern or []:
            f.seek(offset)
            f.write(data)
    return path


@pytest.fixture
def image(tmp_path):
    def _image(size=64 << 20, pattern=None, name="disk.img"):
        return make_image(tmp_path / name, size, pattern)
    return _image


def file_export(img, writable=True, name="disk", node="disk0", extra=""):
    """The usual file node plus an NBD export of it."""
    blockdevs = [f"driver=file,node-name={node},filename={img}"]
    w = "on" if writable else "off"
    exports = [f"type=nbd,id=exp-{node},node-name={node},name={name},writable={w}{extra}"]
    return blockdevs, exports


async def qmp_outcome(sock, command, arguments):
    """One QMP command on a fresh qemu.qmp connection: ("ok", return value) or
    (error class, desc), the shape the parity tests compare between daemons."""
    from qemu.qmp import ExecuteError, QMPClient
    q = QMPClient("interop")
    await q.connect(str(sock))
    try:
        return ("ok", await q.execute(command, arguments))
    except ExecuteError as e:
        return (e.error.error.class_, e.error.error.desc)
    finally:
        await q.disconnect()


class CephCluster:
    """A one-node Ceph cluster started by scripts/ceph-cluster.sh in `dir`: its config
    (`conf`), the test user (`user`, without "client.") with its `keyring`, the `pool`, and
    the admin keyring."""

    SCRIPT = REPO / "scripts" / "ceph-cluster.sh"
    TOOLS = ["ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "rbd", "rados"]

    def __init__(self, dir):
        self.dir = Path(dir)
        out = self.script("start")
        env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        self.conf = env["CEPH_CONF"]
        self.keyring = env["CEPH_KEYRING"]
        self.user = env["CEPH_USER"]
        self.pool = env["CEPH_POOL"]
        self.admin_keyring = env["CEPH_ADMIN_KEYRING"]

    def script(self, cmd, check=True):
        """scripts/ceph-cluster.sh CMD DIR; its stdout, or the CompletedProcess if not `check`."""
        r = subprocess.run([str(self.SCRIPT), cmd, str(self.dir)], capture_output=True,
                           text=True, timeout=180)
        if not check:
            return r
        if r.returncode != 0:
            raise RuntimeError(f"ceph-cluster.sh {cmd} {self.dir} failed: {r.stderr.strip()}")
        return r.stdout

    def stop(self):
        self.script("stop")

    def rbd(self, *args, input=None):
        """The rbd command as the test user; its stdout (bytes)."""
        return subprocess.run(["rbd", "-c", self.conf, "--id", self.user, "--keyring",
                               self.keyring, *args], input=input, capture_output=True,
                              check=True, timeout=60).stdout

    def qemu_filename(self, image):
        """The image as qemu-img's legacy `rbd:` filename."""
        return (f"rbd:{self.pool}/{image}:conf={self.conf}:id={self.user}"
                f":keyring={self.keyring}")

    def blockdev(self, image, node="rbd0"):
        """A --blockdev for QEMU's (and later bexd's) driver=rbd; the keyring comes from
        the config, which names one per user."""
        return (f"driver=rbd,node-name={node},pool={self.pool},image={image},"
                f"conf={self.conf},user={self.user}")

    def pids(self):
        """The processes (of any kind) whose command line names this cluster's config."""
        found = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                cmdline = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if self.conf.encode() in cmdline:
                found.append(int(p.name))
        return found


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory):
    """A one-node Ceph cluster (scripts/ceph-cluster.sh) for the whole session, stopped at
    its end. Needs Debian's ceph packages (scripts/install-deps.sh)."""
    for t in CephCluster.TOOLS:
        need(t)
    cluster = CephCluster(tmp_path_factory.mktemp("ceph"))
    yield cluster
    cluster.stop()
