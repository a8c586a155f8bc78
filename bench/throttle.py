#!/usr/bin/python3
"""I/O limits, bexd and qemu-storage-daemon side by side (issue 21 item 4).

    bench/throttle.py [--seconds 30] [--rounds 3] [--servers bexd,qsd]
                      [--sections held,burst,unlimited]

1. Held limits: a throttle node over a raw image (256 MiB of random data in /dev/shm),
   driven harder than its limit (libnbd, 8 requests in flight) for --seconds; the rate
   achieved against the limit. iops-total=500 with 4 KiB reads, bps-total=20 MiB/s with
   64 KiB reads.
2. Burst: iops-total=100, iops-total-max=1000, iops-total-max-length=5. QEMU's definition:
   requests go at up to 1000/s until the burst bucket (max x length = 5000 operations,
   leaking at 100/s) is full, about 5.6 s, then at 100/s. Shown: operations in the first
   5 s and the first second, when the burst ended, and the rate from 10 s to the end.
3. No limit set: fio 4 KiB randread QD32 (3 s, --rounds rounds, median) on the raw node
   exported directly and through a throttle node whose group has no limit.

The figures and the command are in docs/benchmarks.md.
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import FIO_WORKLOADS, run_fio  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "/dev/shm/bexd-throttle.img"
SIZE = 256 << 20


def image():
    if not os.path.exists(IMAGE):
        subprocess.run(["dd", "if=/dev/urandom", f"of={IMAGE}", "bs=1M", f"count={SIZE >> 20}",
                        "status=none"], check=True)
    return IMAGE


class Daemon:
    """bexd or qemu-storage-daemon on the same command line: the raw node exported as
    `raw`, and, when `group` is given, a throttle node over it in that group as `t`."""

    def __init__(self, kind, group=None):
        binary = os.environ.get("BEXD", f"{REPO}/target/release/bexd") if kind == "bexd" \
            else "qemu-storage-daemon"
        self.dir = tempfile.mkdtemp(prefix=f"bench-throttle-{kind}-")
        self.sock = f"{self.dir}/nbd.sock"
        argv = [binary,
                "--blockdev", f"driver=file,node-name=file0,filename={image()}",
                "--blockdev", "driver=raw,node-name=raw,file=file0"]
        if group is not None:
            argv += ["--object", f"throttle-group,id=g{',' if group else ''}{group}",
                     "--blockdev", "driver=throttle,node-name=t,file=raw,throttle-group=g"]
        argv += ["--nbd-server", f"addr.type=unix,addr.path={self.sock}",
                 "--export", "type=nbd,id=eraw,node-name=raw,name=raw"]
        if group is not None:
            argv += ["--export", "type=nbd,id=et,node-name=t,name=t"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{kind} did not start")
            time.sleep(0.05)

    def uri(self, name):
        return f"nbd+unix:///{name}?socket={self.sock}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()


def drive(uri, size, seconds, depth=8):
    """Random reads of `size` bytes, `depth` in flight, for `seconds`: completion times
    (seconds from the start)."""
    h = nbd.NBD()
    h.connect_uri(uri)
    bufs = [nbd.Buffer(size) for _ in range(depth)]
    done, free = [], []
    t0 = time.monotonic()
    end = t0 + seconds

    def submit(i):
        def completed(_error, i=i):
            done.append(time.monotonic() - t0)
            free.append(i)
            return 1
        offset = random.randrange(SIZE // size) * size
        h.aio_pread(bufs[i], offset, completion=completed)

    for i in range(depth):
        submit(i)
    while time.monotonic() < end:
        h.poll(1)
        while free and time.monotonic() < end:
            submit(free.pop())
    while h.aio_in_flight() > 0:
        h.poll(1)
    h.shutdown()
    return [t for t in done if t <= seconds]


def held(kinds, seconds):
    print(f"## Held limits ({seconds} s, 8 requests in flight)\n")
    print("| limit | workload | " + " | ".join(kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    for limits, size, unit, per in [("x-iops-total=500", 4096, "IOPS", 500),
                                    ("x-bps-total=20971520", 65536, "MiB/s", 20)]:
        cells = []
        for kind in kinds:
            with Daemon(kind, limits) as d:
                n = len(drive(d.uri("t"), size, seconds))
            rate = n / seconds if unit == "IOPS" else n * size / seconds / (1 << 20)
            cells.append(f"{rate:.1f} {unit} ({(rate / per - 1) * 100:+.1f}%)")
        print(f"| {limits} | {size // 1024} KiB randread | " + " | ".join(cells) + " |")
    print()


def burst(kinds, seconds):
    limits = "x-iops-total=100,x-iops-total-max=1000,x-iops-total-max-length=5"
    print(f"## Burst ({limits}; {seconds} s)\n")
    print("| | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    rows = {"operations in the first 5 s": [], "rate in the first second": [],
            "burst lasted (first 100 ms under 550/s)": [],
            f"rate from 10 s to {seconds} s": []}
    for kind in kinds:
        with Daemon(kind, limits) as d:
            done = drive(d.uri("t"), 4096, seconds)
        tenths = [0] * (seconds * 10 + 1)
        for t in done:
            tenths[int(t * 10)] += 1
        end = next((i for i, n in enumerate(tenths) if n < 55), len(tenths))
        rows["burst lasted (first 100 ms under 550/s)"].append(f"{end / 10:.1f} s")
        rows["operations in the first 5 s"].append(f"{sum(t <= 5 for t in done)}")
        rows["rate in the first second"].append(f"{sum(t <= 1 for t in done)}/s")
        late = sum(10 < t <= seconds for t in done) / (seconds - 10)
        rows[f"rate from 10 s to {seconds} s"].append(f"{late:.1f}/s")
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()


def unlimited(kinds, rounds):
    w = next(f for f in FIO_WORKLOADS if f.name == "4k randread QD32")
    print(f"## No limit set: fio {w.name}, IOPS (median of {rounds} x 3 s)\n")
    print("| export | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    got = {(k, e): [] for k in kinds for e in ("raw", "t")}
    for r in range(rounds):
        for kind in kinds:
            with Daemon(kind, "") as d:
                # Alternating which goes first, so a machine that slows down or
                # speeds up during a round favours neither.
                for export in ("raw", "t") if r % 2 == 0 else ("t", "raw"):
                    got[(kind, export)].append(run_fio(w, d.uri(export), SIZE, 3)["iops"])
    for export, label in (("raw", "raw node (no filter)"), ("t", "throttle node, no limit")):
        cells = []
        for kind in kinds:
            v = got[(kind, export)]
            cells.append(f"{statistics.median(v):.0f} ({' '.join(f'{x:.0f}' for x in v)})")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--servers", default="bexd,qsd")
    ap.add_argument("--sections", default="held,burst,unlimited")
    args = ap.parse_args()
    kinds = args.servers.split(",")
    sections = args.sections.split(",")
    if "held" in sections:
        held(kinds, args.seconds)
    if "burst" in sections:
        burst(kinds, args.seconds)
    if "unlimited" in sections:
        unlimited(kinds, args.rounds)


if __name__ == "__main__":
    main()
