"""`bexd serve` as a drop-in qemu-nbd: the same command lines run through
qemu-nbd 10 and through bexd serve, compared (issue 17 item 3).

Each test runs both programs with the same arguments and checks that what a
script can observe is the same: the exit code and the one-line message of a
refusal, the export's size, flags and data, `-L`'s output, when the server
exits, what `--fork` and `--pid-file` leave behind, how the image file is
opened (O_DIRECT for --cache=none)."""

import json
import os
import signal
import subprocess
import time

import nbd
import pytest

from conftest import daemon_binary, need, wait_until, can_connect_unix
from tls_certs import CLIENT_ONE_DN, make_pki

MIB = 1 << 20

pytestmark = pytest.mark.bexd_only("compares bexd serve with qemu-nbd, not with the daemon under test")

PROGRAMS = ["qemu-nbd", "bexd"]


def argv(program, *args):
    if program == "qemu-nbd":
        need("qemu-nbd")
        return ["qemu-nbd", *args]
    return daemon_binary("bexd") + ["serve", *args]


def refusal(program, *args):
    """(exit code, first stderr line without the program's prefix)."""
    p = subprocess.run(argv(program, *args), capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    lines = [line for line in p.stderr.splitlines() if not line.startswith(("WARNING", " "))]
    first = lines[0] if lines else ""
    for prefix in ("qemu-nbd: ", "bexd serve: "):
        first = first.removeprefix(prefix)
    return p.returncode, first


@pytest.fixture
def raw(tmp_path):
    path = tmp_path / "d.img"
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
        f.seek(0x1000)
        f.write(b"offset!" * 64)
    return path


class Server:
    """One server process on a unix socket, stopped at teardown."""

    def __init__(self, program, sock, *args):
        self.sock = sock
        self.proc = subprocess.Popen(argv(program, "-k", str(sock), *args), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        wait_until(lambda: can_connect_unix(sock) or self.proc.poll() is not None, 20,
                   f"{program} to listen")
        assert self.proc.poll() is None, self.proc.stderr.read()

    def uri(self, name=""):
        return f"nbd+unix:///{name}?socket={self.sock}"

    def info(self, name=""):
        out = subprocess.run(["nbdinfo", "--json", self.uri(name)], check=True, capture_output=True,
                             text=True).stdout
        return json.loads(out)["exports"][0]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)


@pytest.fixture
def servers(tmp_path):
    started = []

    def _start(program, *args):
        s = Server(program, tmp_path / f"{program}-{len(started)}.sock", *args)
        started.append(s)
        return s
    yield _start
    for s in started:
        s.stop()


REFUSALS = [
    ["-e", "-1", "d.img"],
    ["-e", "x", "d.img"],
    ["--cache=bogus", "d.img"],
    ["-n", "--cache=none", "d.img"],
    ["--aio=threads", "--aio=threads", "d.img"],
    ["--aio=bogus", "d.img"],
    ["--discard=bogus", "d.img"],
    ["--detect-zeroes=bogus", "d.img"],
    ["--detect-zeroes=unmap", "d.img"],
    ["-o", "x", "d.img"],
    ["-o", "-5", "-f", "raw", "d.img"],
    ["-o", "99999999999", "-f", "raw", "d.img"],
    ["-k", "relative.sock", "d.img"],
    ["--handshake-limit=-1", "d.img"],
    ["--handshake-limit=x", "d.img"],
    ["--tls-authz=a", "d.img"],
    ["--tls-hostname=a", "d.img"],
    ["--tls-creds=nope", "d.img"],
    ["--selinux-label=x", "d.img"],
    [],
    ["d.img", "e.img"],
    ["-L", "d.img"],
    ["-L", "-x", "foo"],
    ["-L", "-n"],
    ["-L", "--fork"],
    ["-x", "x" * 4097, "d.img"],
    ["-c", "/dev/nbd-bexd-test-missing", "-f", "raw", "d.img"],
    ["-d", "/dev/nbd-bexd-test-missing"],
    ["-l", "snap", "-f", "raw", "d.img"],
    ["nope.img"],
]


@pytest.mark.parametrize("args", REFUSALS, ids=lambda a: " ".join(a)[:40] or "no-args")
def test_refusals_exit_1_with_qemu_nbds_message(args, raw, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    theirs = refusal("qemu-nbd", *args)
    ours = refusal("bexd", *args)
    assert theirs[0] == 1, theirs
    assert ours[0] == 1, ours
    if args == ["nope.img"]:
        # qemu-nbd names its internal call (blk_new_open); both name the file and the errno.
        assert "nope.img" in ours[1] and "No such file or directory" in ours[1]
    else:
        assert ours[1] == theirs[1]


def test_list_prints_what_qemu_nbd_prints_for_either_server(servers, raw):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(raw) + ".q", "16M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(raw) + ".q", "b0"], check=True)
    for program in PROGRAMS:
        s = servers(program, "-t", "-x", "foo", "-D", "a description", "-A", "-B", "b0", "-f", "qcow2",
                    str(raw) + ".q")
        listings = [subprocess.run(argv(lister, "-L", "-k", str(s.sock)), capture_output=True, text=True,
                                   check=True).stdout for lister in PROGRAMS]
        assert listings[0] == listings[1], f"listing {program}"
        assert " export: 'foo'" in listings[0] and "qemu:dirty-bitmap:b0" in listings[0]
        s.stop()


def test_without_persistent_both_exit_after_the_last_client_but_not_after_a_listing(servers, raw):
    for program in PROGRAMS:
        s = servers(program, "-f", "raw", str(raw))
        subprocess.run(argv("bexd", "-L", "-k", str(s.sock)), check=True, capture_output=True)
        time.sleep(0.3)
        assert s.proc.poll() is None, f"{program} exited after a listing"
        h = nbd.NBD()
        h.connect_uri(s.uri())
        assert h.pread(7, 0x1000) == b"offset!"
        h.shutdown()
        assert s.proc.wait(timeout=20) == 0, program


def test_persistent_keeps_serving_after_the_last_client(servers, raw):
    for program in PROGRAMS:
        s = servers(program, "-t", "-f", "raw", str(raw))
        for _ in range(2):
            assert s.info()["export-size"] == 16 * MIB
        time.sleep(0.3)
        assert s.proc.poll() is None, program
        assert s.stop() == 0


@pytest.mark.parametrize("shared", ["1", "2", "0"])
def test_shared_sets_multi_conn_as_qemu_nbd(servers, raw, shared):
    infos = []
    for program in PROGRAMS:
        s = servers(program, "-t", "-e", shared, "-f", "raw", str(raw))
        infos.append(s.info())
        s.stop()
    assert infos[0]["can_multi_conn"] == infos[1]["can_multi_conn"]


def test_offset_read_only_and_name_as_qemu_nbd(servers, raw):
    seen = []
    for program in PROGRAMS:
        s = servers(program, "-t", "-r", "-o", "0x1000", "-x", "win", "-f", "raw", str(raw))
        h = nbd.NBD()
        h.connect_uri(s.uri("win"))
        seen.append((h.get_size(), h.is_read_only(), h.pread(7, 0)))
        h.shutdown()
        s.stop()
    assert seen[0] == seen[1] == (16 * MIB - 0x1000, True, b"offset!")


def open_flags(pid, path):
    """The open flags (octal) of the process's descriptor for `path`."""
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{fd}") == str(path):
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("flags:"):
                            return int(line.split()[1], 8)
        except FileNotFoundError:
            continue
    raise AssertionError(f"{pid} has no descriptor for {path}")


@pytest.mark.parametrize("cache", ["none", "writeback", "directsync", "unsafe"])
def test_cache_modes_open_the_image_as_qemu_nbd(servers, raw, cache):
    direct = []
    for program in PROGRAMS:
        s = servers(program, "-t", f"--cache={cache}", "-f", "raw", str(raw))
        direct.append(bool(open_flags(s.proc.pid, raw) & os.O_DIRECT))
        s.stop()
    assert direct[0] == direct[1] == (cache in ("none", "directsync"))


def test_discard_unmap_punches_holes_as_qemu_nbd(servers, tmp_path):
    blocks = {}
    for program in PROGRAMS:
        img = tmp_path / f"{program}.img"
        with open(img, "wb") as f:
            f.write(os.urandom(4 * MIB))
        for mode in ("ignore", "unmap"):
            s = servers(program, "-t", f"--discard={mode}", "-f", "raw", str(img))
            h = nbd.NBD()
            h.connect_uri(s.uri())
            h.trim(2 * MIB, 0)
            h.flush()
            h.shutdown()
            s.stop()
            blocks[(program, mode)] = os.stat(img).st_blocks
    assert blocks[("qemu-nbd", "ignore")] > 0 and blocks[("bexd", "ignore")] == blocks[("qemu-nbd", "ignore")]
    assert blocks[("bexd", "unmap")] == blocks[("qemu-nbd", "unmap")] < blocks[("bexd", "ignore")]


def test_fork_and_pid_file_as_qemu_nbd(tmp_path, raw):
    for program in PROGRAMS:
        sock, pidfile = tmp_path / f"{program}.sock", tmp_path / f"{program}.pid"
        started = subprocess.run(argv(program, "--fork", "-t", "--pid-file", str(pidfile), "-k", str(sock),
                                      "-f", "raw", str(raw)), capture_output=True, timeout=30)
        assert started.returncode == 0, started.stderr
        # The parent returns once the server is ready: the socket answers at once.
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={sock}")
        assert h.get_size() == 16 * MIB
        h.shutdown()
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}") or
                   open(f"/proc/{pid}/stat").read().split()[2] == "Z", 20, f"{program} to exit")


def test_image_opts_as_qemu_nbd(servers, tmp_path):
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "32M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", str(img)], check=True,
                   capture_output=True)
    for program in PROGRAMS:
        s = servers(program, "-t", "--image-opts", f"driver=qcow2,file.filename={img}")
        h = nbd.NBD()
        h.connect_uri(s.uri())
        assert h.get_size() == 32 * MIB, program
        assert h.pread(4096, MIB) == b"\x5a" * 4096, program
        h.shutdown()
        s.stop()


def test_handshake_limit_drops_a_silent_client_as_qemu_nbd(servers, raw):
    import socket
    for program in PROGRAMS:
        s = servers(program, "-t", "--handshake-limit=1", "-f", "raw", str(raw))
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(s.sock))
            c.settimeout(10)
            greeting = c.recv(18)
            assert len(greeting) == 18
            start = time.monotonic()
            assert c.recv(1) == b"", program
            assert 0.5 < time.monotonic() - start < 5, program
        s.stop()


@pytest.mark.parametrize("program", PROGRAMS)
def test_trace_nbd_patterns_show_the_negotiation(tmp_path, raw, program):
    """-T 'nbd_*' logs the NBD server's work: qemu-nbd's nbd_* trace events,
    bexd's NBD server log targets (the same subsystem)."""
    need("nbdinfo")
    s = Server(program, tmp_path / "s.sock", "-t", "-f", "raw", "-T", "nbd_*", str(raw))
    subprocess.run(["nbdinfo", "--size", s.uri()], check=True, capture_output=True, timeout=20)
    s.stop()
    log = s.proc.stderr.read().decode()
    marker = "nbd_negotiate" if program == "qemu-nbd" else "bexd::nbd_server"
    assert marker in log, log[-2000:]


@pytest.mark.parametrize("program", PROGRAMS)
def test_trace_file_takes_the_log(tmp_path, raw, program):
    need("nbdinfo")
    trace = tmp_path / "trace.log"
    s = Server(program, tmp_path / "s.sock", "-t", "-f", "raw", "-T", f"nbd_*,file={trace}",
               str(raw))
    subprocess.run(["nbdinfo", "--size", s.uri()], check=True, capture_output=True, timeout=20)
    s.stop()
    assert "nbd" in trace.read_text()


def test_trace_pattern_that_matches_nothing_is_refused_by_bexd(raw):
    """qemu-nbd only warns about an unknown event; bexd refuses a pattern that
    would show nothing, naming what it maps."""
    code, message = refusal("bexd", "-T", "bogus_event", "-f", "raw", str(raw))
    assert code == 1
    assert "'bogus_event' matches no bexd trace target" in message


def test_verbose_logs_what_the_server_does(tmp_path, raw):
    """-v ("extra debugging information"): bexd's info-level log on stderr."""
    need("nbdinfo")
    quiet = Server("bexd", tmp_path / "q.sock", "-t", "-f", "raw", "-r", str(raw))
    quiet.stop()
    assert "NBD server listening" not in quiet.proc.stderr.read().decode()
    s = Server("bexd", tmp_path / "s.sock", "-t", "-v", "-f", "raw", "-r", str(raw))
    s.stop()
    assert "NBD server listening" in s.proc.stderr.read().decode()


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("mode", ["off", "unmap"])
def test_detect_zeroes_turns_zero_writes_into_holes(tmp_path, program, mode):
    """--detect-zeroes=unmap with --discard=unmap: a client's write of zeroes
    over allocated data deallocates it in the image file, as qemu-nbd does;
    with off the zeroes are written as data."""
    need("qemu-io")
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.write(b"\xab" * (4 * MIB))
    s = Server(program, tmp_path / "s.sock", "-t", "-f", "raw", "--discard=unmap",
               f"--detect-zeroes={mode}", str(img))
    subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0 0 {4 * MIB}", s.uri()],
                   check=True, capture_output=True, timeout=30)
    assert s.stop() == 0
    allocated = os.stat(img).st_blocks * 512
    assert open(img, "rb").read() == bytes(4 * MIB)
    if mode == "unmap":
        assert allocated == 0
    else:
        assert allocated >= 4 * MIB


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_snapshot_writes_go_to_a_throwaway_overlay(tmp_path, program, fmt):
    """-s: the client reads the image and its own writes; the image file is
    unchanged afterwards and no temporary file is left in TMPDIR."""
    need("qemu-io")
    need("qemu-img")
    img = tmp_path / f"d.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(img), str(16 * MIB)], check=True)
    subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P 0xab 0 {2 * MIB}", str(img)],
                   check=True, capture_output=True)
    before = open(img, "rb").read()
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir))
    sock = tmp_path / "s.sock"
    p = subprocess.Popen(argv(program, "-s", "-t", "-k", str(sock), "-f", fmt, str(img)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    wait_until(lambda: can_connect_unix(sock) or p.poll() is not None, 20, f"{program} to listen")
    uri = f"nbd+unix:///?socket={sock}"
    out = subprocess.run(["qemu-io", "-f", "raw",
                          "-c", f"read -P 0xab 0 {2 * MIB}",
                          "-c", f"write -P 0xcd {MIB} {4 * MIB}",
                          "-c", f"read -P 0xab 0 {MIB}",
                          "-c", f"read -P 0xcd {MIB} {4 * MIB}",
                          "-c", f"read -P 0 {5 * MIB} {MIB}", uri],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, out.stdout
    # The image is only read while served: another reader may open it.
    subprocess.run(["qemu-img", "info", "-U", str(img)], check=True, capture_output=True)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 0
    assert open(img, "rb").read() == before
    assert list(tmpdir.iterdir()) == []


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    need("openssl")
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_reads(sock, client_dir):
    """Whether qemu-io (QEMU's NBD client, GnuTLS) reads the image's bytes over TLS."""
    obj = f"tls-creds-x509,id=tls0,dir={client_dir},endpoint=client"
    out = subprocess.run(["qemu-io", "-r", "--object", obj, "--image-opts",
                          f"driver=nbd,server.type=unix,server.path={sock},"
                          "tls-hostname=localhost,export=disk,tls-creds=tls0",
                          "-c", "read -P 0 0 4k", "-c", "read -P 0x6f 0x1000 1"],
                         capture_output=True, text=True, timeout=60)
    return out.returncode == 0 and "verification failed" not in out.stdout \
        and out.stdout.count("read ") == 2


@pytest.mark.parametrize("program", PROGRAMS)
def test_tls_creds_and_authz_serve_over_tls_as_qemu_nbd(servers, raw, pki, program):
    """--object tls-creds-x509 with --tls-creds serves TLS only: nbdinfo (libnbd) and qemu-io
    read over TLS, a plaintext client is refused; --tls-authz admits only the named DN."""
    need("qemu-io")
    creds = f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server"
    s = servers(program, "-t", "-f", "raw", "-x", "disk", "--object", creds, "--tls-creds", "tls0",
                str(raw))
    info = subprocess.run(["nbdinfo", "--json", f"nbds+unix:///disk?socket={s.sock}"
                           f"&tls-certificates={pki['one']}"],
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["exports"][0]["export-size"] == 16 * MIB
    assert tls_reads(s.sock, pki["one"])
    plain = subprocess.run(["nbdinfo", s.uri("disk")], capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0
    s.stop()
    authz = f"authz-simple,id=auth0,identity={CLIENT_ONE_DN.replace(',', ',,')}"
    s = servers(program, "-t", "-f", "raw", "-x", "disk", "--object", creds, "--object", authz,
                "--tls-creds", "tls0", "--tls-authz", "auth0", str(raw))
    assert tls_reads(s.sock, pki["one"])
    assert not tls_reads(s.sock, pki["two"])


def test_list_over_tls(servers, raw, pki):
    """qemu-nbd -L --tls-creds lists a TLS server's exports over TLS. bexd serve -L does not
    speak TLS: it refuses the option (exit 1, one line) instead of listing in plaintext."""
    creds = f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server"
    s = servers("bexd", "-t", "-f", "raw", "-x", "disk", "--object", creds, "--tls-creds", "tls0",
                str(raw))
    client = ["--object", f"tls-creds-x509,id=tls0,dir={pki['one']},endpoint=client",
              "--tls-creds", "tls0", "--tls-hostname", "localhost"]
    theirs = subprocess.run(argv("qemu-nbd", "-L", "-k", str(s.sock), *client),
                            capture_output=True, text=True, timeout=60)
    assert theirs.returncode == 0 and "export: 'disk'" in theirs.stdout, theirs.stderr
    assert refusal("bexd", "-L", "-k", str(s.sock), *client) == \
        (1, "-L with --tls-creds is not supported by bexd serve")
