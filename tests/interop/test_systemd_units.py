"""The systemd units in contrib/systemd: `systemd-analyze verify` finds
nothing to say about any of them, and bexd@.service's command line, with
bexd.conf.example's options, starts a daemon that serves its export and its
QMP socket and logs to a journal socket (a real datagram listener here)."""

import os
import re
import shlex
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, daemon_binary, need, wait_until

pytestmark = pytest.mark.bexd_only("bexd's own packaging")

UNITS = REPO / "contrib" / "systemd"
INSTALLED = "/usr/local/bin/bexd"


def unit_text(name):
    """A unit as shipped, with the built bexd where it would be installed."""
    return (UNITS / name).read_text().replace(INSTALLED, daemon_binary("bexd")[0])


@pytest.mark.parametrize("unit", sorted(p.name for p in UNITS.iterdir()
                                        if p.suffix in (".service", ".socket")))
def test_systemd_analyze_verify_is_silent(tmp_path, unit):
    need("systemd-analyze")
    need("man")
    for p in UNITS.iterdir():
        (tmp_path / p.name).write_text(unit_text(p.name))
    # Documentation=man:bexd(8) is checked with man(1): the page as installed.
    (tmp_path / "man" / "man8").mkdir(parents=True)
    (tmp_path / "man" / "man8" / "bexd.8").write_text((REPO / "docs" / "bexd.8").read_text())
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)],
                       env={**os.environ, "MANPATH": str(tmp_path / "man")},
                       capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (0, "")


def exec_start(unit, instance, env):
    """ExecStart's argv as systemd would run it: lines joined, %i and
    $VARIABLES (split on whitespace) expanded."""
    text = re.sub(r"\\\n\s*", " ", unit_text(unit))
    line = next(l for l in text.splitlines() if l.startswith("ExecStart="))
    argv = []
    for word in shlex.split(line[len("ExecStart="):].replace("%i", instance)):
        argv += env[word[1:]].split() if word.startswith("$") else [word]
    return argv


def test_daemon_unit_command_line_serves_with_the_example_config(tmp_path):
    need("qemu-img")
    need("nbdinfo")
    run = tmp_path / "run"
    (run / "vm1").mkdir(parents=True)
    lib = tmp_path / "lib"
    lib.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(lib / "vm1.qcow2"), "64M"],
                   check=True)
    conf = (UNITS / "bexd.conf.example").read_text()
    conf = conf.replace("/run/bexd", str(run)).replace("/var/lib/bexd", str(lib))
    env = dict(line.split("=", 1) for line in conf.splitlines()
               if line and not line.startswith("#"))
    argv = [a.replace("/run/bexd", str(run)) for a in exec_start("bexd@.service", "vm1", env)]
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "journal"))
    journal.settimeout(30)
    # Type=forking: the command returns once the daemon is ready.
    started = subprocess.run(argv, env={**os.environ, "BEXD_JOURNAL_SOCKET": str(tmp_path / "journal"),
                                        "BEXD_LOG": "info"},
                             capture_output=True, text=True, timeout=60)
    assert (started.returncode, started.stderr) == (0, "")
    pid = int((run / "vm1" / "bexd.pid").read_text())
    try:
        size = subprocess.run(["nbdinfo", "--size",
                               f"nbd+unix:///vm1?socket={run / 'vm1' / 'nbd.sock'}"],
                              capture_output=True, text=True, timeout=60)
        assert size.stdout.strip() == str(64 << 20)
        with socket.socket(socket.AF_UNIX) as qmp:
            qmp.connect(str(run / "vm1" / "qmp.sock"))
            assert b'"QMP"' in qmp.recv(4096)
        assert journal.recv(65536).startswith(b"MESSAGE\n")
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=60, what="bexd to exit")
