"""bexd top in a real terminal: tmux runs it against a daemon after a known qemu-io workload,
and capture-pane shows the export's line with the workload's exact totals."""

import subprocess
import uuid

import pytest

from conftest import REPO, need, wait_until

pytestmark = pytest.mark.bexd_only("bexd top is bexd's own tool")


def bexd():
    import os
    return os.environ.get("BEXD", str(REPO / "target/release/bexd"))


@pytest.fixture
def tmux():
    need("tmux")
    session = f"bexd-top-{uuid.uuid4().hex[:8]}"
    yield session
    subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def screen(session):
    out = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                         text=True)
    return out.stdout


def test_top_shows_the_exports_totals_after_a_known_workload(start, image, tmux):
    img = image(4 << 20)
    d = start([f"driver=file,node-name=f0,filename={img}", "driver=raw,node-name=disk0,file=f0"],
              ["type=nbd,id=e0,node-name=disk0,name=disk0,writable=on",
               "type=nbd,id=idle,node-name=f0,name=idle,writable=off"])
    # 3 writes of 1.25 MiB together, 2 reads.
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 1M", "-c", "write 2M 128k",
                    "-c", "write 3M 128k", "-c", "read 0 4k", "-c", "read 1M 4k",
                    d.uri("disk0")], check=True, capture_output=True)
    subprocess.run(["tmux", "new-session", "-d", "-s", tmux, "-x", "160", "-y", "12",
                    f"{bexd()} top {d.qmp_sock} --interval 0.2"], check=True)

    def line_of(export):
        """The export's line as its columns (the border characters dropped)."""
        rows = (line.replace("│", " ").split() for line in screen(tmux).splitlines())
        return next((cols for cols in rows if cols[:1] == [export]), None)
    wait_until(lambda: line_of("e0") and line_of("idle"), what="bexd top to draw both exports")
    text = screen(tmux)
    assert "EXPORT" in text and "IOPS" in text and "LAT us" in text, text
    # EXPORT NODE CLIENTS INFLIGHT IOPS RD WR LAT READS WRITES WRITTEN
    cols = line_of("e0")
    assert cols[:4] == ["e0", "disk0", "0", "0"], cols
    assert cols[-4:] == ["2", "3", "1.25", "MiB"], cols
    idle = line_of("idle")
    assert idle[:4] == ["idle", "f0", "0", "0"] and idle[-4:] == ["0", "0", "0", "B"], idle
    # q quits and the terminal gets its screen back.
    subprocess.run(["tmux", "send-keys", "-t", tmux, "q"], check=True)
    wait_until(lambda: subprocess.run(["tmux", "has-session", "-t", tmux],
                                      capture_output=True).returncode != 0,
               what="bexd top to exit on q")


def test_top_refuses_without_a_terminal_or_a_monitor(tmp_path):
    out = subprocess.run([bexd(), "top", str(tmp_path / "none.sock")], capture_output=True,
                         text=True, stdin=subprocess.DEVNULL)
    assert out.returncode == 1 and out.stderr.startswith("bexd top: "), out.stderr
    out = subprocess.run([bexd(), "top"], capture_output=True, text=True)
    assert out.returncode == 1 and "usage: bexd top" in out.stderr
