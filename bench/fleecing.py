#!/usr/bin/python3
"""What image fleecing costs the writer, bexd against qemu-storage-daemon.

    bench/fleecing.py                               # 3 interleaved rounds of 5 s
    bench/fleecing.py --rounds 2 --runtime 5 --size-mib 1024 --out /tmp/fleecing.md

Each server exports a raw image in /dev/shm (the primary) and fio's nbd
engine writes 4 KiB blocks at random offsets, queue depth 32, to it: once with
nothing else going on, and once after the fleecing set-up of
tests/interop/test_fleecing.py (a qcow2 target in /dev/shm, a copy-before-write
filter put under the exported node with blockdev-reopen, a snapshot-access
node over it exported over NBD). While the filter is in, the first write to
every 64 KiB cluster first copies the cluster's old data to the target, so the
second figure is the writer's cost of a point-in-time view. The table gives
each server's IOPS with and without, their ratio (what fleecing leaves of the
writer's speed), and bexd's figures over qemu-storage-daemon's. A raw primary:
qemu-storage-daemon 10.0 aborts when a qcow2 file grows under the filter
(tests/interop/test_fleecing.py says more).
Needs: fio, qemu-storage-daemon, qemu-img, the qemu.qmp Python package,
target/release/bexd (or $BEXD).
"""

import argparse
import asyncio
import datetime
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qemu.qmp import QMPClient  # noqa: E402

from servers import REPO, free_port  # noqa: E402
from workloads import Fio, run_fio  # noqa: E402

WRITE = Fio("4k randwrite QD32", "randwrite", "4k", 32, 1, "iops")


def binary(kind):
    if kind == "bexd":
        return os.environ.get("BEXD", str(REPO / "target/release/bexd"))
    return "qemu-storage-daemon"


async def qmp(sock, *commands):
    client = QMPClient("bench")
    await client.connect(sock)
    try:
        for name, args in commands:
            await client.execute(name, args)
    finally:
        await client.disconnect()


def fleece_steps(tmp):
    return [
        ("blockdev-add", {"driver": "qcow2", "node-name": "tmp",
                          "file": {"driver": "file", "filename": tmp}}),
        ("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": "f0",
                          "target": "tmp"}),
        ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "d0", "file": "cbw"}]}),
        ("blockdev-add", {"driver": "snapshot-access", "node-name": "snap", "file": "cbw"}),
        ("block-export-add", {"type": "nbd", "id": "fle", "node-name": "snap", "name": "fleece"}),
    ]


def one(kind, image, args, fleece):
    work = tempfile.mkdtemp(prefix=f"bench-fleece-{kind}-", dir="/dev/shm")
    port = free_port()
    sock = os.path.join(work, "qmp.sock")
    argv = [binary(kind),
            "--blockdev", f"driver=file,node-name=f0,filename={image}",
            "--blockdev", "driver=raw,node-name=d0,file=f0",
            "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
            "--export", "type=nbd,id=e0,node-name=d0,name=disk,writable=on",
            "--chardev", f"socket,id=m,path={sock},server=on,wait=off",
            "--monitor", "chardev=m"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not start: {proc.stderr.read()[-500:]}")
            time.sleep(0.05)
        if fleece:
            tmp = os.path.join(work, "fleece-tmp.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tmp, f"{args.size_mib}M"],
                           check=True)
            asyncio.run(qmp(sock, *fleece_steps(tmp)))
        fig = run_fio(WRITE, f"nbd://127.0.0.1:{port}/disk", f"{args.size_mib}M", args.runtime)
        return fig["iops"]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="bexd,qsd")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--out")
    args = ap.parse_args()
    servers = args.servers.split(",")
    image = "/dev/shm/bexd-bench-fleece.img"
    results = {(s, f): [] for s in servers for f in (False, True)}
    try:
        for r in range(args.rounds):
            for kind in servers:
                for fleece in (False, True):
                    # A fresh image each time: every run starts with nothing copied.
                    subprocess.run(["dd", "if=/dev/urandom", f"of={image}", "bs=1M",
                                    f"count={args.size_mib}", "status=none"], check=True)
                    results[(kind, fleece)].append(one(kind, image, args, fleece))
            print(f"round {r + 1} done", file=sys.stderr)
    finally:
        if os.path.exists(image):
            os.unlink(image)
    med = {k: statistics.median(v) for k, v in results.items()}
    machine = f"{os.cpu_count()} cores, {platform.machine()}, kernel {platform.release()}"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"Command: `bench/fleecing.py {shlex.join(sys.argv[1:])}`  ",
             f"Machine: {machine}; {when}; {args.rounds} interleaved rounds of {args.runtime} s, "
             f"medians; raw primary of {args.size_mib} MiB in /dev/shm, TCP.", "",
             "| 4k randwrite QD32 to the primary (IOPS) | " + " | ".join(servers)
             + (" | bexd/qsd |" if {"bexd", "qsd"} <= set(servers) else " |"),
             "|---|" + "---|" * (len(servers) + ({"bexd", "qsd"} <= set(servers)))]
    for label, f in (("without fleecing", False), ("with a fleecing export", True)):
        row = [f"{med[(s, f)]:.0f}" for s in servers]
        if {"bexd", "qsd"} <= set(servers):
            row.append(f"{med[('bexd', f)] / med[('qsd', f)]:.2f}x")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    row = [f"{med[(s, True)] / med[(s, False)]:.2f}" for s in servers]
    if {"bexd", "qsd"} <= set(servers):
        row.append("-")
    lines.append("| with / without | " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Every round: " + "; ".join(
        f"{s} {'with' if f else 'without'} " + ", ".join(f"{v:.0f}" for v in results[(s, f)])
        for s in servers for f in (False, True)))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        open(args.out, "w").write(text)


if __name__ == "__main__":
    main()
