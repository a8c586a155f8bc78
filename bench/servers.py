"""The NBD servers the harness compares, each started on the same image.

Every server exports the image writable under the name `f` (nbdkit and
nbd-server have their own notion of names; see each `argv`). A server is
started, probed until it accepts, measured, then stopped, so only one runs at
a time and each gets the whole machine.
"""

import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPORT = "f"

# Servers that speak each image format, in the order the tables list them.
SERVERS = ["bexd", "qsd", "qemu-nbd", "nbdkit", "nbd-server"]
FORMATS = {"raw": SERVERS, "qcow2": ["bexd", "qsd", "qemu-nbd"],
           "qcow2-empty": ["bexd", "qsd", "qemu-nbd"]}
TLS_CAPABLE = ["bexd", "qsd", "qemu-nbd", "nbdkit"]


@dataclass
class Endpoint:
    """Where a running server listens, and how clients name it."""

    transport: str  # "tcp" or "unix"
    port: int = 0
    path: str = ""
    tls_dir: str = ""

    def uri(self):
        # No tls-certificates= in the URI: fio's engine refuses URIs that name
        # local files, so clients find the CA in $HOME/.pki/libnbd (client_env).
        scheme = "nbds" if self.tls_dir else "nbd"
        if self.transport == "unix":
            return f"{scheme}+unix:///{EXPORT}?socket={self.path}"
        return f"{scheme}://127.0.0.1:{self.port}/{EXPORT}"

    def client_env(self):
        """The environment for libnbd clients (fio, nbdcopy) of this endpoint."""
        if not self.tls_dir:
            return None
        return dict(os.environ, HOME=os.path.dirname(os.path.dirname(os.path.dirname(self.tls_dir))))

    def connect(self):
        if self.transport == "unix":
            s = socket.socket(socket.AF_UNIX)
            s.connect(self.path)
            return s
        return socket.create_connection(("127.0.0.1", self.port))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_endpoint(transport, workdir, tls_dir):
    if transport == "unix":
        return Endpoint("unix", path=os.path.join(workdir, "nbd.sock"), tls_dir=tls_dir)
    return Endpoint("tcp", port=free_port(), tls_dir=tls_dir)


def _qemu_style(binary, image, fmt, ep, server_tls_dir, max_connections, file_opts=""):
    """bexd and qemu-storage-daemon share qemu-storage-daemon's command line;
    `file_opts` go to the file node (say "cache.direct=on,aio=io_uring")."""
    extra = f",{file_opts}" if file_opts else ""
    argv = [binary, "--blockdev", f"driver=file,node-name=file0,filename={image}{extra}"]
    argv += ["--blockdev", f"driver={fmt},node-name=f,file=file0"]
    if server_tls_dir:
        argv += ["--object", f"tls-creds-x509,id=tls0,dir={server_tls_dir},endpoint=server,verify-peer=off"]
    addr = (f"addr.type=unix,addr.path={ep.path}" if ep.transport == "unix"
            else f"addr.type=inet,addr.host=127.0.0.1,addr.port={ep.port}")
    tls = ",tls-creds=tls0" if server_tls_dir else ""
    argv += ["--nbd-server", f"{addr},max-connections={max_connections}{tls}"]
    argv += ["--export", "type=nbd,id=e0,node-name=f,name=f,writable=on"]
    return argv


def argv_for(kind, image, fmt, ep, server_tls_dir, workdir, file_opts=""):
    if kind == "bexd":
        binary = os.environ.get("BEXD", str(REPO / "target/release/bexd"))
        return _qemu_style(binary, image, fmt, ep, server_tls_dir, 100, file_opts)
    if kind == "qsd":
        return _qemu_style("qemu-storage-daemon", image, fmt, ep, server_tls_dir, 100, file_opts)
    if file_opts:
        raise ValueError(f"file options are for bexd and qsd only, not {kind}")
    if kind == "qemu-nbd":
        # --shared lets several connections in and turns on multi-conn, as the issue asks.
        argv = ["qemu-nbd", "-f", fmt, "-x", EXPORT, "--shared=16", "--persistent", "--cache=writeback"]
        if server_tls_dir:
            argv += ["--object", f"tls-creds-x509,id=tls0,dir={server_tls_dir},endpoint=server,verify-peer=off",
                     "--tls-creds=tls0"]
        argv += ["-k", ep.path] if ep.transport == "unix" else ["-b", "127.0.0.1", "-p", str(ep.port)]
        return argv + [image]
    if kind == "nbdkit":
        argv = ["nbdkit", "-f", "--exit-with-parent", "-e", EXPORT]
        if server_tls_dir:
            argv += ["--tls=require", f"--tls-certificates={server_tls_dir}"]
        argv += ["-U", ep.path] if ep.transport == "unix" else ["-i", "127.0.0.1", "-p", str(ep.port)]
        return argv + ["file", image]
    if kind == "nbd-server":
        conf = os.path.join(workdir, "nbd-server.conf")
        listen = f"unixsock = {ep.path}\n" if ep.transport == "unix" else (
            f"listenaddr = 127.0.0.1\nport = {ep.port}\n")
        with open(conf, "w") as f:
            f.write(f"[generic]\n{listen}allowlist = true\n[{EXPORT}]\nexportname = {image}\n")
        # nbd-server forks into the background; its pid comes from the pid file.
        return ["nbd-server", "-C", conf, "-p", os.path.join(workdir, "pid")]
    raise ValueError(kind)


class Server:
    """A running server process; a context manager that stops it."""

    def __init__(self, kind, image, fmt, transport, tls=None, file_opts=""):
        fmt = "qcow2" if fmt == "qcow2-empty" else fmt
        self.kind = kind
        self.workdir = tempfile.mkdtemp(prefix=f"bench-{kind}-")
        self.endpoint = new_endpoint(transport, self.workdir, tls.client_dir if tls else "")
        argv = argv_for(kind, image, fmt, self.endpoint, tls.server_dir if tls else "", self.workdir,
                        file_opts)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.workdir, "stderr"), "w"))
        self.pid = self.proc.pid
        if kind == "nbd-server":
            self.pid = self._daemon_pid()
        self._wait_ready()

    def _daemon_pid(self):
        if self.proc.wait(20) != 0:
            raise RuntimeError(f"nbd-server failed: {open(os.path.join(self.workdir, 'stderr')).read()}")
        pidfile = os.path.join(self.workdir, "pid")
        for _ in range(400):
            try:
                return int(open(pidfile).read())
            except (OSError, ValueError):
                time.sleep(0.05)
        raise RuntimeError("nbd-server wrote no pid file")

    def _alive(self):
        if self.pid == self.proc.pid:
            return self.proc.poll() is None
        return os.path.exists(f"/proc/{self.pid}")

    def _wait_ready(self):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if not self._alive():
                err = open(os.path.join(self.workdir, "stderr")).read()
                raise RuntimeError(f"{self.kind} exited at start: {err.strip()}")
            try:
                s = self.endpoint.connect()
                # A greeting proves the server is serving, not just bound.
                s.settimeout(5)
                s.recv(18)
                s.close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.kind} did not start")

    def cpu_seconds(self):
        """CPU time of the server and its children (nbd-server forks per client)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in [self.pid] + _children(self.pid):
            try:
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # utime stime cutime cstime: fields 14-17 of stat, 12-15 after the name.
            total += sum(int(x) for x in fields[11:15])
        return total / tick

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        children = _children(self.pid)
        _signal(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while self._alive() and time.monotonic() < deadline:
            if self.pid == self.proc.pid:
                try:
                    self.proc.wait(0.05)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.05)
        for pid in [self.pid] + children:
            _signal(pid, signal.SIGKILL)
        if self.pid == self.proc.pid:
            self.proc.wait()


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == pid:
            out.append(int(entry))
    return out
