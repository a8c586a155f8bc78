"""A real guest on a vhost-user-blk export: QEMU's system emulator (vhost-user-blk-pci) boots
Debian's kernel with a tiny initramfs (scripts/guest-image.sh, tests/guest/init) whose /init
reads the disk's known contents, writes, copies, flushes and discards on /dev/vda, prints
checksums on the serial console and powers off; the host then checks the image with
qemu-img. The same guest runs on bexd's export and on qemu-storage-daemon's (parity: the same
expectations), with one queue and with two queues on two vCPUs; and a guest killed (kill -9
of QEMU) after a flush, then booted again on the same export, reads what it flushed.

QEMU runs with KVM when the host's KVM can boot the kernel. This suite's machines have
/dev/kvm from kvm_pvm (nested virtualization without VMX), under which Debian's stock kernel
hangs in early boot; there the guest runs under TCG (3-5 s from QEMU's start to a ready
disk on a quiet machine, 10 s under load) and the test says so. BEXD_GUEST_ACCEL=kvm|tcg forces one.
"""

import asyncio
import hashlib
import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, need, qmp_outcome, wait_until

MIB = 1 << 20
SIZE = 64 * MIB
# What the guest's `pattern` step writes (tests/guest/init): `yes BEXD-GUEST-WRITE`.
PATTERN_LINE = b"BEXD-GUEST-WRITE\n"
BOOT_TIMEOUT = {"kvm": 30, "tcg": 180}


def pattern(length):
    return (PATTERN_LINE * (length // len(PATTERN_LINE) + 1))[:length]


def sha(data):
    return hashlib.sha256(data).hexdigest()


def in_ci():
    return os.environ.get("CI") == "true"


@pytest.fixture(scope="session")
def guest_image(tmp_path_factory):
    """(vmlinux, initramfs) built by scripts/guest-image.sh from the cached Debian kernel."""
    out = tmp_path_factory.mktemp("guest")
    r = subprocess.run([str(REPO / "scripts" / "guest-image.sh"), "build", str(out)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        message = f"no guest image: {r.stderr.strip()}"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return out / "vmlinux", out / "initramfs.cpio.gz"


@pytest.fixture(scope="session")
def accel():
    """kvm, or tcg where the host's KVM cannot run a stock kernel (see the module doc)."""
    need("qemu-system-x86_64")
    forced = os.environ.get("BEXD_GUEST_ACCEL")
    if forced:
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        if in_ci():
            pytest.fail("/dev/kvm is needed in CI for the guest tests")
        print("guest tests: no usable /dev/kvm, the guest runs under TCG")
        return "tcg"
    if Path("/sys/module/kvm_pvm").exists():
        print("guest tests: /dev/kvm is kvm_pvm, under which Debian's kernel hangs in early "
              "boot; the guest runs under TCG")
        return "tcg"
    return "kvm"


class Guest:
    """A QEMU guest whose serial console lines are read as they come."""

    def __init__(self, accel, image, socket, steps, num_queues=1, cpus=1):
        vmlinux, initrd = image
        self.accel = accel
        argv = ["qemu-system-x86_64", "-accel", accel, "-smp", str(cpus), "-m", "256",
                "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
                "-numa", "node,memdev=mem",
                "-chardev", f"socket,id=c,path={socket}",
                "-device", f"vhost-user-blk-pci,chardev=c,num-queues={num_queues}",
                "-kernel", str(vmlinux), "-initrd", str(initrd),
                "-append", f"console=ttyS0 quiet panic=-1 bexd.steps={','.join(steps)}",
                "-serial", "stdio", "-display", "none", "-monitor", "none", "-nic", "none",
                "-no-reboot"]
        if accel == "kvm":
            argv += ["-cpu", "host"]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.lines = queue.Queue()
        self.console = []
        threading.Thread(target=self._read, daemon=True).start()
        self.boot_seconds = None

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            self.console.append(line)
            at = line.find("BEXD ")
            if at >= 0:
                self.lines.put(line[at + 5:])
        self.lines.put(None)

    def next(self, timeout):
        """The next BEXD line (without the prefix); fails on an error line or the end."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("guest silent for %ss; console:\n%s"
                                 % (timeout, "\n".join(self.console[-30:])))
        assert line is not None, "guest ended early; console:\n" + "\n".join(self.console[-30:])
        assert not line.startswith("error"), f"guest: {line}"
        return line

    def run(self):
        """Every result line up to `done`; QEMU must then exit 0 (the guest powered off)."""
        timeout = BOOT_TIMEOUT[self.accel]
        out = []
        while True:
            line = self.next(timeout)
            if line.startswith("ready") and self.boot_seconds is None:
                self.boot_seconds = time.monotonic() - self.started
                print(f"guest ({self.accel}) ready after {self.boot_seconds:.1f}s: {line}")
            if line.startswith("done"):
                break
            if not line.startswith(("boot", "ready")):
                out.append(line)
        assert self.proc.wait(timeout=timeout) == 0
        return out

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def guests():
    started = []
    yield lambda *a, **k: started.append(Guest(*a, **k)) or started[-1]
    for g in started:
        g.kill()


def host_image(path):
    """The image the guest gets: random data in [0, 4 MiB) and [16, 17 MiB), zeroes
    elsewhere; returns the data."""
    head, tail = os.urandom(4 * MIB), os.urandom(MIB)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(head)
        f.seek(16 * MIB)
        f.write(tail)
    return head


def vhost_export(start, kind, img, sock, num_queues):
    d = start([f"driver=file,node-name=disk0,filename={img},discard=unmap"],
              [f"type=vhost-user-blk,id=v0,node-name=disk0,addr.type=unix,addr.path={sock}"
               f",writable=on,num-queues={num_queues}"], which=kind)
    wait_until(sock.exists, what="the vhost-user socket")
    return d


STEPS = ["hash:0:1", "hash:1:1", "hash:2:2", "pattern:8:1", "copy:0:12:1", "flush",
         "discard:16:1", "hash:8:1", "hash:12:1", "hash:16:1"]


@pytest.mark.parametrize("kind,num_queues", [("bexd", 1), ("bexd", 2), ("qsd", 2)])
def test_guest_reads_writes_flushes_and_discards_its_disk(start, tmp_path, guests, accel,
                                                          guest_image, kind, num_queues):
    need("qemu-img")
    img = tmp_path / "disk.img"
    head = host_image(img)
    sock = tmp_path / "vhost.sock"
    d = vhost_export(start, kind, img, sock, num_queues)
    steps = list(STEPS)
    if num_queues == 2:
        # 2 MiB read from each vCPU: the guest's blk-mq maps one queue to each.
        steps += ["pin:0:0:2", "pin:1:2:2", "queues"]
    g = guests(accel, guest_image, sock, steps, num_queues=num_queues, cpus=num_queues)
    lines = g.run()
    hashes = {tuple(map(int, line.split()[1:3])): line.split()[3]
              for line in lines if line.startswith("hash ")}
    assert hashes == {
        (0, 1): sha(head[:MIB]), (1, 1): sha(head[MIB:2 * MIB]), (2, 2): sha(head[2 * MIB:]),
        (8, 1): sha(pattern(MIB)), (12, 1): sha(head[:MIB]), (16, 1): sha(bytes(MIB)),
    }
    assert "flushed" in lines and "discarded 16 1" in lines
    if num_queues == 2:
        assert "queues 2" in lines
        # "runs QUEUE N cpus CPU...": each queue ran, for its own vCPU.
        runs = [line.split() for line in lines if line.startswith("runs ")]
        assert [(r[1], r[4:]) for r in runs] == [("0", ["0"]), ("1", ["1"])], lines
        assert all(int(r[2]) > 0 for r in runs), lines
    if kind == "bexd":
        _, exports = asyncio.run(qmp_outcome(d.qmp_sock, "x-query-export-stats", {}))
        stats = exports[0]["stats"]
        # The guest's own reads (partition scan) come on top of the steps' own.
        assert stats["rd_bytes"] >= 6 * MIB + (4 * MIB if num_queues == 2 else 0)
        assert stats["wr_bytes"] >= 2 * MIB
        assert stats["flush_operations"] >= 1
        assert (stats["unmap_operations"], stats["unmap_bytes"]) >= (1, MIB)
        assert stats["failed_wr_operations"] == stats["invalid_wr_operations"] == 0
    assert d.stop() == 0
    expected = tmp_path / "expected.img"
    with open(expected, "wb") as f:
        f.truncate(SIZE)
        f.write(head)
        f.seek(8 * MIB)
        f.write(pattern(MIB))
        f.seek(12 * MIB)
        f.write(head[:MIB])
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(expected),
                        str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # The discard reached the file: a hole there now.
    r = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", str(img)],
                       capture_output=True, text=True, check=True)
    at_16m = [e for e in json.loads(r.stdout)
              if e["start"] <= 16 * MIB < e["start"] + e["length"]]
    assert [(e["data"], e["start"] + e["length"] >= 17 * MIB) for e in at_16m] == [
        (False, True)], r.stdout


@pytest.mark.bexd_only("bexd's reconnect: the rust front-end test checks qemu-storage-daemon's")
def test_guest_killed_after_a_flush_finds_its_data_after_restart(start, tmp_path, guests,
                                                                  accel, guest_image):
    img = tmp_path / "disk.img"
    host_image(img)
    sock = tmp_path / "vhost.sock"
    d = vhost_export(start, "bexd", img, sock, 1)
    first = guests(accel, guest_image, sock, ["pattern:20:1", "flush", "hang"])
    timeout = BOOT_TIMEOUT[accel]
    while first.next(timeout) != "hanging":
        pass
    first.kill()
    assert d.alive()
    second = guests(accel, guest_image, sock, ["hash:20:1"])
    assert second.run() == [f"hash 20 1 {sha(pattern(MIB))}"]
    assert d.stop() == 0
    with open(img, "rb") as f:
        f.seek(20 * MIB)
        assert f.read(MIB) == pattern(MIB)
