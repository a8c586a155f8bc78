#!/usr/bin/python3
"""The NBD client driver (driver=nbd) as a re-exporter, bexd and qemu-storage-daemon
side by side (issue 18's goal: bexd over bexd reads 1 MiB blocks at >= 80% of the
direct export).

    bench/nbd_client.py [--runtime 5] [--rounds 3] [--size-mib 1024] [--servers bexd,qsd]

For each server kind: an origin exports a raw image of random data (in /dev/shm) on a unix
socket; a second daemon of the same kind opens that export with driver=nbd and re-exports
it on its own unix socket. fio's nbd engine runs each workload on the direct export and on
the re-export, all configurations interleaved for --rounds rounds; the table holds medians
and the ratios re-export/direct (and bexd/qsd). The figures are in docs/benchmarks.md.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import Fio, run_fio  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "/dev/shm/bexd-nbd-client.img"
WORKLOADS = [
    Fio("1M read QD8", "read", "1M", 8, 1, "mib"),
    Fio("1M read QD1", "read", "1M", 1, 1, "mib"),
    Fio("4k randread QD32", "randread", "4k", 32, 1, "iops"),
]


def binary(kind):
    if kind == "qsd":
        return ["qemu-storage-daemon"]
    return [os.environ.get("BEXD", os.path.join(REPO, "target", "release", "bexd"))]


def wait_for(path, proc):
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[0]} did not start")
        time.sleep(0.05)


def daemon(kind, blockdev, sock):
    argv = binary(kind) + ["--blockdev", blockdev,
                           "--nbd-server", f"addr.type=unix,addr.path={sock}",
                           "--export", "type=nbd,id=e0,node-name=n0,name=disk"]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(sock, p)
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--servers", default="bexd,qsd")
    args = ap.parse_args()
    size = args.size_mib << 20
    if not os.path.exists(IMAGE) or os.path.getsize(IMAGE) != size:
        subprocess.run(["dd", "if=/dev/urandom", f"of={IMAGE}", "bs=1M",
                        f"count={args.size_mib}", "status=none"], check=True)
    tmp = tempfile.mkdtemp(prefix="bench-nbd-client-")
    procs, uris = [], {}
    try:
        for kind in args.servers.split(","):
            origin = os.path.join(tmp, f"{kind}-origin.sock")
            re = os.path.join(tmp, f"{kind}-re.sock")
            procs.append(daemon(kind, f"driver=file,node-name=n0,filename={IMAGE}", origin))
            procs.append(daemon(kind, "driver=nbd,node-name=n0,server.type=unix,"
                                f"server.path={origin},export=disk,read-only=on", re))
            uris[f"{kind} direct"] = f"nbd+unix:///disk?socket={origin}"
            uris[f"{kind} over {kind}"] = f"nbd+unix:///disk?socket={re}"
        results = {(w.name, c): [] for w in WORKLOADS for c in uris}
        for _ in range(args.rounds):
            for w in WORKLOADS:
                for config, uri in uris.items():
                    results[(w.name, config)].append(
                        run_fio(w, uri, f"{args.size_mib}M", args.runtime)[w.primary])
    finally:
        for p in procs:
            p.terminate()
            p.wait()
    configs = list(uris)
    kinds = args.servers.split(",")
    head = ["workload"] + configs + [f"{k} over {k} / {k} direct" for k in kinds]
    if "bexd" in kinds and "qsd" in kinds:
        head.append("bexd over bexd / qsd over qsd")
    print(f"Command: bench/nbd_client.py --runtime {args.runtime} --rounds {args.rounds} "
          f"--size-mib {args.size_mib} --servers {args.servers}  ")
    print(f"Machine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"image {args.size_mib} MiB raw in /dev/shm; unix sockets; {args.rounds} interleaved "
          f"rounds of {args.runtime} s, medians.\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for w in WORKLOADS:
        med = {c: statistics.median(results[(w.name, c)]) for c in configs}
        unit = {"mib": "MiB/s", "iops": "IOPS"}[w.primary]
        row = [f"{w.name} ({unit})"] + [f"{med[c]:.0f}" for c in configs]
        row += [f"{med[f'{k} over {k}'] / med[f'{k} direct']:.2f}" for k in kinds]
        if "bexd" in kinds and "qsd" in kinds:
            row.append(f"{med['bexd over bexd'] / med['qsd over qsd']:.2f}x")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
