"""bexd top: the live view over QMP, drawn in a real terminal (tmux) after a known workload,
and its batch form and command-line errors. Counts are exact; rates are not asserted (a test
never depends on timing)."""

import os
import re
import subprocess
import uuid

import nbd
import pytest

from conftest import daemon_binary, need, wait_until

pytestmark = pytest.mark.bexd_only("bexd top is bexd's own tool")


def start_one_export(start, image):
    img = image(16 << 20)
    return start([f"driver=file,node-name=f0,filename={img}",
                  "driver=raw,node-name=disk0,file=f0"],
                 ["type=nbd,id=e0,node-name=disk0,name=disk0,writable=on"], which="bexd")


def workload(h, reads, writes, flushes):
    for i in range(writes):
        h.pwrite(bytes([i % 256]) * 4096, i * 4096)
    for i in range(reads):
        assert len(h.pread(4096, i * 4096)) == 4096
    for _ in range(flushes):
        h.flush()


def columns(line):
    """A table row's cells: box-drawing borders and padding dropped."""
    return line.replace("│", " ").split()


class Tmux:
    """A tmux server of its own (its own socket), so the test touches no other session."""

    def __init__(self, tmp):
        need("tmux")
        self.socket = f"bexd-top-{uuid.uuid4().hex[:8]}"
        self.tmp = tmp

    def run(self, *args, check=True):
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, check=check)

    def start(self, command):
        self.run("new-session", "-d", "-s", "top", "-x", "200", "-y", "30", command)

    def screen(self):
        return self.run("capture-pane", "-p", "-t", "top").stdout

    def alive(self):
        return self.run("has-session", "-t", "top", check=False).returncode == 0

    def close(self):
        self.run("kill-server", check=False)


def row_for(screen, export):
    for line in screen.splitlines():
        cells = columns(line)
        if cells and cells[0] == export:
            return cells
    return None


def test_top_draws_each_export_with_its_counts_in_a_terminal(start, image, tmp_path):
    d = start_one_export(start, image)
    h = nbd.NBD()
    h.connect_uri(d.uri("disk0"))
    workload(h, reads=7, writes=10, flushes=2)
    tmux = Tmux(tmp_path)
    try:
        bexd = daemon_binary("bexd")[0]
        # `exec` so that the pane closes when bexd top exits, and only then.
        tmux.start(f"exec {bexd} top -d 0.2 {d.qmp_sock}")
        # Column order: EXPORT NODE CLIENTS INFLIGHT R/s W/s R-MiB/s W-MiB/s R-LAT W-LAT
        # READS WRITES FLUSHES TRIMS ERRORS.
        wait_until(lambda: row_for(tmux.screen(), "e0") is not None, what="the e0 row")
        screen = tmux.screen()
        assert "bexd top: " in screen and "1 exports, 1 clients" in screen, screen
        assert "EXPORT" in screen and "R MiB/s" in screen and "q: quit" in screen, screen
        row = row_for(screen, "e0")
        assert row[1:4] == ["disk0", "1", "0"], screen
        assert row[-5:] == ["7", "10", "2", "0", "0"], screen
        # The view follows the daemon: 50 more reads and a second client show up.
        h2 = nbd.NBD()
        h2.connect_uri(d.uri("disk0"))
        workload(h2, reads=50, writes=0, flushes=0)
        wait_until(lambda: (row_for(tmux.screen(), "e0") or [])[-5:] == ["57", "10", "2", "0", "0"]
                   and row_for(tmux.screen(), "e0")[2] == "2", what="the updated counts")
        tmux.run("send-keys", "-t", "top", "q")
        wait_until(lambda: not tmux.alive(), what="bexd top to quit on q")
        h2.shutdown()
    finally:
        tmux.close()
    h.shutdown()


def test_top_batch_prints_the_table_as_text(start, image):
    d = start_one_export(start, image)
    h = nbd.NBD()
    h.connect_uri(d.uri("disk0"))
    workload(h, reads=3, writes=5, flushes=1)
    out = subprocess.run(daemon_binary("bexd") + ["top", "-b", "-n", "2", "-d", "0.1",
                                                  str(d.qmp_sock)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    blocks = [b for b in out.stdout.split("\n\n") if b.strip()]
    assert len(blocks) == 2, out.stdout
    for block in blocks:
        title, header, row = block.splitlines()
        assert title == f"bexd top: {d.qmp_sock}, every 0.1 s, 1 exports, 1 clients"
        assert header.split()[:4] == ["EXPORT", "NODE", "CLIENTS", "INFLIGHT"]
        cells = row.split()
        assert cells[:4] == ["e0", "disk0", "1", "0"]
        assert cells[-5:] == ["3", "5", "1", "0", "0"]
    # Rates need two readings: dashes first, numbers after.
    assert blocks[0].splitlines()[2].split()[4:6] == ["-", "-"]
    assert re.fullmatch(r"\d+", blocks[1].splitlines()[2].split()[4])
    h.shutdown()


@pytest.mark.parametrize("args,message", [
    (["-d", "0", "/x"], "bexd top: invalid value '0' for '--delay <DELAY>': '0' is not a delay "
                        "in seconds between 0.01 and 86400"),
    (["-n", "0", "/x"], "bexd top: invalid value '0' for '--iterations <ITERATIONS>': 0 is not "
                        "in 1..18446744073709551615"),
    ([], "bexd top: the following required arguments were not provided:"),
    (["/nonexistent/qmp.sock"], "bexd top: cannot connect to /nonexistent/qmp.sock: No such file "
                                "or directory (os error 2)"),
])
def test_top_refuses_bad_arguments_in_one_line(args, message):
    out = subprocess.run(daemon_binary("bexd") + ["top", "-b", *args], capture_output=True,
                         text=True, timeout=30)
    assert (out.returncode, out.stderr.strip(), out.stdout) == (1, message, "")


def test_top_reports_a_monitor_that_goes_away(start, image):
    d = start_one_export(start, image)
    proc = subprocess.Popen(daemon_binary("bexd") + ["top", "-b", "-d", "0.1", str(d.qmp_sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Connected and reading: its first table's title is out.
    assert proc.stdout.readline().startswith("bexd top: ")
    assert d.stop() == 0
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.strip() == "bexd top: the monitor closed the connection"
