#!/usr/bin/env python3
"""Server CPU, syscalls and context switches per 4 KiB request, side by side.

    bench/cpu.py                                    # every server, 3 interleaved rounds
    bench/cpu.py --servers bexd,nbdkit --rounds 2 --runtime 5 --out /tmp/cpu.md
    bench/cpu.py --syscalls                         # and which syscalls, per request, by name

What the server controls at 4 KiB is not the throughput (the client shares the
machine's two cores and is the limit at QD32) but what it spends per request.
For each workload (4 KiB random read and write at QD1, QD32 and QD16 over two
connections, fio's nbd engine) this reads the server's CPU time from /proc,
counts its syscalls and context switches with `perf stat` (tracepoints
raw_syscalls:sys_enter and the software event context-switches, attached to
the server's pid for the run) and divides by the requests fio completed.
Servers run interleaved (A B C A B C ...); the table holds medians and the
ratio best peer / bexd (above 1: bexd spends less).
Needs: fio, perf (linux-perf), the peers of bench/run.py, target/release/bexd.
"""

import argparse
import datetime
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from servers import Server, _children as server_children  # noqa: E402
from workloads import Fio, run_fio  # noqa: E402

WORKLOADS = [
    Fio("4k randread QD1", "randread", "4k", 1, 1, "iops"),
    Fio("4k randwrite QD1", "randwrite", "4k", 1, 1, "iops"),
    Fio("4k randread QD32", "randread", "4k", 32, 1, "iops"),
    Fio("4k randwrite QD32", "randwrite", "4k", 32, 1, "iops"),
    Fio("4k randread QD16 x 2 conns", "randread", "4k", 16, 2, "iops"),
    Fio("4k randwrite QD16 x 2 conns", "randwrite", "4k", 16, 2, "iops"),
]
PEERS = ["qsd", "qemu-nbd", "nbdkit", "nbd-server"]
# The syscalls a server's data path makes, counted by name with --syscalls
# (all ~350 tracepoints make perf slow to attach and detach).
BY_NAME = ["read", "recvfrom", "recvmsg", "write", "writev", "sendto", "sendmsg", "sendfile64",
           "splice", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
           "io_uring_enter", "epoll_wait", "epoll_pwait", "epoll_ctl", "poll", "ppoll", "futex",
           "sched_yield", "mmap", "munmap", "madvise", "fdatasync", "fsync", "eventfd2",
           "clock_gettime", "getrusage"]


def perf_stat(pid, events, out_path):
    """`perf stat` attached to `pid` (all its threads) until stopped."""
    argv = ["perf", "stat", "-x", ",", "-o", out_path, "-e", ",".join(events), "-p", str(pid)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_perf(path):
    counts = {}
    for line in open(path):
        parts = line.strip().split(",")
        if len(parts) < 3 or not parts[0].replace(".", "").isdigit():
            continue
        counts[parts[2]] = float(parts[0])
    return counts


def one(server, w, args):
    """One workload against a running server: per-request figures."""
    uri, env = server.endpoint.uri(), server.endpoint.client_env()
    pids = [server.pid] + server_children(server.pid)
    events = ["raw_syscalls:sys_enter", "context-switches"]
    if args.syscalls:
        events += [f"syscalls:sys_enter_{n}" for n in BY_NAME]
    with tempfile.TemporaryDirectory() as tmp:
        # nbd-server forks a process per client after fio connects: count
        # only the parent there (its CPU is read for every child below).
        out = os.path.join(tmp, "perf")
        perf = perf_stat(pids[0], events, out)
        before = server.cpu_seconds()
        fig = run_fio(w, uri, f"{args.size_mib}M", args.runtime, env)
        cpu = server.cpu_seconds() - before
        perf.send_signal(2)
        perf.wait(60)
        counts = read_perf(out)
    requests = max(fig["iops"] * args.runtime, 1)
    result = {
        "iops": fig["iops"],
        "cpu_us": cpu / requests * 1e6,
        "client_cpu": fig["client_cpu"],
    }
    if server.kind != "nbd-server":
        result["syscalls"] = counts.get("raw_syscalls:sys_enter", 0) / requests
        result["switches"] = counts.get("context-switches", 0) / requests
        if args.syscalls:
            result["by_name"] = {
                k.split("sys_enter_", 1)[1]: v / requests
                for k, v in counts.items()
                if "sys_enter_" in k and v / requests >= 0.05
            }
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="bexd," + ",".join(PEERS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--transport", choices=["tcp", "unix"], default="tcp")
    ap.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    ap.add_argument("--syscalls", action="store_true", help="also count syscalls by name")
    ap.add_argument("--out", help="also write the Markdown table here")
    args = ap.parse_args()
    servers = args.servers.split(",")
    chosen = [w for w in WORKLOADS if w.name in args.workloads.split(",")]
    image = "/dev/shm/bexd-bench-cpu.img"
    subprocess.run(["dd", "if=/dev/urandom", f"of={image}", "bs=1M", f"count={args.size_mib}",
                    "status=none"], check=True)
    results = {s: {w.name: [] for w in chosen} for s in servers}
    try:
        for r in range(args.rounds):
            for kind in servers:
                with Server(kind, image, "raw", args.transport) as server:
                    for w in chosen:
                        results[kind][w.name].append(one(server, w, args))
                print(f"round {r + 1}: {kind} done", file=sys.stderr)
    finally:
        os.unlink(image)
    text = report(args, servers, chosen, results)
    print(text)
    if args.out:
        open(args.out, "w").write(text)


def med(runs, key):
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else None


def fmt(v):
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def report(args, servers, chosen, results):
    machine = f"{os.cpu_count()} cores, {platform.machine()}, kernel {platform.release()}"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Command: `bench/cpu.py {shlex.join(sys.argv[1:])}`  ",
        f"Machine: {machine}; {when}; {args.rounds} interleaved rounds of {args.runtime} s, "
        f"medians; transport {args.transport}; raw image in /dev/shm.",
        "",
    ]
    peers = [s for s in servers if s != "bexd"]
    for key, title, lower in [("cpu_us", "server CPU per request (us)", True),
                              ("syscalls", "server syscalls per request", True),
                              ("switches", "server context switches per request", True),
                              ("iops", "IOPS", False)]:
        head = ["workload"] + servers + (["best peer / bexd"] if "bexd" in servers and peers else [])
        lines += [f"**{title}**", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        for w in chosen:
            vals = {s: med(results[s][w.name], key) for s in servers}
            row = [w.name] + [fmt(vals[s]) for s in servers]
            if "bexd" in servers and peers:
                pv = [vals[p] for p in peers if vals[p] is not None]
                b = vals["bexd"]
                if pv and b:
                    best = min(pv) if lower else max(pv)
                    row.append(f"{best / b:.2f}x" if lower else f"{b / best:.2f}x")
                else:
                    row.append("-")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if args.syscalls:
        lines += ["**syscalls per request by name (median round, >= 0.05)**", ""]
        for s in servers:
            for w in chosen:
                runs = [r for r in results[s][w.name] if "by_name" in r]
                if not runs:
                    continue
                names = sorted({n for r in runs for n in r["by_name"]})
                parts = []
                for n in names:
                    v = statistics.median(r["by_name"].get(n, 0) for r in runs)
                    parts.append(f"{n} {v:.2f}")
                lines.append(f"- {s}, {w.name}: " + ", ".join(parts))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
