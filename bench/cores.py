#!/usr/bin/python3
"""How a server scales from one core to two: every thread of the server pinned to CPU 0, then
allowed on CPUs 0 and 1 (`taskset -a`), fio's nbd engine left to the scheduler.

    python3 bench/cores.py [--servers bexd,qsd,nbdkit] [--rounds 2] [--runtime 4]

Workloads: 4 KiB random read and write over two connections at QD16 each, 1 MiB sequential
read QD8; raw image of random data in /dev/shm, TCP. Prints medians of the interleaved rounds,
the server's CPU use (cores busy) and the ratio two cores / one core. On a two-core machine fio
shares the cores, so "two cores" means the server may use both, not that it has them alone.
Needs target/release/bexd (or $BEXD) and the peers of bench/run.py.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from servers import Server  # noqa: E402
from workloads import Fio, run_fio  # noqa: E402

IMAGE = "/dev/shm/cores.img"
SIZE_MIB = 1024
WORKLOADS = [
    Fio("4k randread QD16 x 2 conns", "randread", "4k", 16, 2, "iops"),
    Fio("4k randwrite QD16 x 2 conns", "randwrite", "4k", 16, 2, "iops"),
    Fio("1M read QD8", "read", "1M", 8, 1, "mib"),
]
CPU_SETS = ["0", "0,1"]


def pin(pid, cpus):
    subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True,
                   stdout=subprocess.DEVNULL)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", default="bexd,qsd,nbdkit")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runtime", type=int, default=4)
    args = ap.parse_args()
    if not os.path.exists(IMAGE) or os.path.getsize(IMAGE) != SIZE_MIB << 20:
        with open(IMAGE, "wb") as f:
            for _ in range(SIZE_MIB):
                f.write(os.urandom(1 << 20))
    kinds = args.servers.split(",")
    results = {}
    for _ in range(args.rounds):
        for kind in kinds:
            for cpus in CPU_SETS:
                with Server(kind, IMAGE, "raw", "tcp") as server:
                    for w in WORKLOADS:
                        # Pinned before each run: a server may start threads lazily.
                        pin(server.pid, cpus)
                        before, t0 = server.cpu_seconds(), time.monotonic()
                        figure = run_fio(w, server.endpoint.uri(), f"{SIZE_MIB}M", args.runtime)
                        busy = (server.cpu_seconds() - before) / (time.monotonic() - t0)
                        results.setdefault((kind, cpus, w.name), []).append(
                            (figure[w.primary], busy))
    print(f"{args.rounds} interleaved rounds of {args.runtime} s, medians; "
          "figure (server cores busy)\n")
    print("| workload | server | one core | two cores | two / one |")
    print("|---|---|---|---|---|")
    for w in WORKLOADS:
        for kind in kinds:
            cells = []
            for cpus in CPU_SETS:
                runs = results[(kind, cpus, w.name)]
                cells.append((statistics.median(r[0] for r in runs),
                              statistics.median(r[1] for r in runs)))
            (one, one_busy), (two, two_busy) = cells
            print(f"| {w.name} ({w.primary}) | {kind} | {one:.0f} ({one_busy:.2f}) | "
                  f"{two:.0f} ({two_busy:.2f}) | {two / one:.2f}x |")


if __name__ == "__main__":
    main()
