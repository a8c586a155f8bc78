"""Start-up: no client is served before the whole command line has been applied, as with
qemu-storage-daemon, whose main loop runs only after its last option. A client that connects
the moment the NBD socket appears waits in the listen backlog and then finds every export."""

import subprocess
import time

import nbd
import pytest

from conftest import daemon_binary

EXPORTS = 200


def race_the_start(binary, tmp_path):
    """Starts the daemon with the NBD server first and EXPORTS exports after it, and connects
    to the last export as soon as the socket exists. Returns what the first connection that
    reached the server saw: None when it found the export, else libnbd's error."""
    sock = tmp_path / "nbd.sock"
    argv = [*binary, "--nbd-server", f"addr.type=unix,addr.path={sock}"]
    for i in range(EXPORTS):
        argv += ["--blockdev", f"driver=null-co,node-name=n{i},size=1048576",
                 "--export", f"type=nbd,id=e{i},node-name=n{i},name=disk{i}"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited: {proc.stderr.read().decode()}")
            if not sock.exists():
                continue
            h = nbd.NBD()
            try:
                h.connect_uri(f"nbd+unix:///disk{EXPORTS - 1}?socket={sock}")
            except nbd.Error as e:
                if "handshake" in str(e):
                    return str(e)  # the server answered without the export
                continue  # the socket is not listening yet
            h.shutdown()
            return None
        raise AssertionError("never connected")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.parametrize("which", ["bexd", "qsd"])
def test_a_client_connecting_during_start_up_finds_every_export(tmp_path, which):
    for attempt in range(5):
        run = tmp_path / str(attempt)
        run.mkdir()
        seen = race_the_start(daemon_binary(which), run)
        assert seen is None, f"attempt {attempt}: a client was served before start-up ended: {seen}"
