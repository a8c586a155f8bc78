#!/usr/bin/python3
"""Connections per second (greeting, NBD_OPT_GO, NBD_CMD_DISC, close; one client, back to back)
and the server's CPU time per connection, servers interleaved.

    python3 bench/connrate.py [--servers bexd,qsd,nbdkit] [--rounds 3] [--seconds 3]

The same handshake loop as bench/run.py's "connections per second" row, without the rest of
that run. Needs target/release/bexd (or $BEXD) and the peers of bench/run.py.
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from servers import EXPORT, Server  # noqa: E402
from workloads import run_connection_rate  # noqa: E402

IMAGE = "/dev/shm/connrate.img"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", default="bexd,qsd,nbdkit")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3)
    args = ap.parse_args()
    with open(IMAGE, "wb") as f:
        f.truncate(64 << 20)
    kinds = args.servers.split(",")
    rates = {k: [] for k in kinds}
    cpu_us = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            with Server(kind, IMAGE, "raw", "tcp") as server:
                before = server.cpu_seconds()
                rate = run_connection_rate(server.endpoint, EXPORT, args.seconds)["per_s"]
                cpu = server.cpu_seconds() - before
            rates[kind].append(rate)
            cpu_us[kind].append(cpu * 1e6 / (rate * args.seconds))
    print("| server | connections/s (median) | server CPU per connection (µs) | rounds (conn/s) |")
    print("|---|---|---|---|")
    for kind in kinds:
        print(f"| {kind} | {statistics.median(rates[kind]):.0f} | "
              f"{statistics.median(cpu_us[kind]):.0f} | "
              f"{' '.join(f'{r:.0f}' for r in rates[kind])} |")
    os.unlink(IMAGE)


if __name__ == "__main__":
    main()
