#!/usr/bin/env python3
"""bexd against qemu-storage-daemon, qemu-nbd, nbdkit and nbd-server, side by side.

    bench/run.py                         # the full table: raw image, TCP, plaintext
    bench/run.py --transport unix --format qcow2 --tls --servers bexd,qsd
    bench/run.py --format qcow2-empty    # a fresh qcow2 per server: writes allocate clusters
    bench/run.py --smoke                 # one 1-second round of every server (the test suite runs this)

Every server exports the same image in /dev/shm; servers run one at a time,
interleaved (A B C A B C ...) for --rounds rounds, and the table reports the
median of the rounds, the ratio bexd/peer (above 1 means bexd is better) and
the server's CPU seconds per GiB moved. Client and server share the machine's
cores, so CPU per byte is the fairest figure here; fio's own CPU (% of one
core) shows when the client, not the server, is the limit. With --out FILE the
Markdown table (machine, date, command) is written there as well.
Needs: fio, nbdcopy (libnbd-bin), qemu-utils, nbdkit, nbd-server, iperf3,
openssl; and target/release/bexd (or $BEXD).
"""

import argparse
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from servers import EXPORT, FORMATS, TLS_CAPABLE, Server  # noqa: E402
from tlscerts import make_tls_dirs  # noqa: E402
from workloads import (FIO_WORKLOADS, run_connection_rate, run_fio, run_fio_on_file,  # noqa: E402
                       run_iperf3, run_nbdcopy)

COPY_DEFAULT = "nbdcopy to null, default"
COPY_ONE = "nbdcopy to null, 1 connection"
CONN_RATE = "connections per second"
CPU_WORKLOAD = "4k randread QD32"
CLIENT_CPU_WORKLOADS = ["4k randread QD32", "4k randwrite QD32"]


def make_image(path, size_mib, fmt):
    """Random data (so no server can shortcut zeroes), converted to qcow2 if
    asked; `qcow2-empty` is a fresh image with nothing allocated."""
    if fmt == "qcow2-empty":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, f"{size_mib}M"], check=True)
        return path
    raw = path if fmt == "raw" else path + ".raw"
    subprocess.run(["dd", "if=/dev/urandom", f"of={raw}", "bs=1M", f"count={size_mib}",
                    "status=none"], check=True)
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path], check=True)
        os.unlink(raw)
    return path


def measure_server(kind, args, image, tls):
    """Every workload once against one freshly started server."""
    figures = {}
    size = f"{args.size_mib}M"
    if args.format == "qcow2-empty":
        # Every server starts from nothing, or the first one's writes would
        # leave the others clusters that are already allocated.
        make_image(image, args.size_mib, args.format)
    with Server(kind, image, args.format, args.transport, tls) as server:
        uri, env = server.endpoint.uri(), server.endpoint.client_env()
        for w in FIO_WORKLOADS:
            before = server.cpu_seconds()
            fig = run_fio(w, uri, size, args.runtime, env)
            fig["cpu_per_gib"] = (server.cpu_seconds() - before) / max(fig["bytes"] / (1 << 30), 1e-9)
            figures[w.name] = fig
        if not args.smoke:
            export_bytes = args.size_mib << 20
            figures[COPY_DEFAULT] = run_nbdcopy(uri, export_bytes, env=env)
            figures[COPY_ONE] = run_nbdcopy(uri, export_bytes, connections=1, env=env)
        if not tls:
            figures[CONN_RATE] = run_connection_rate(server.endpoint, EXPORT, min(args.runtime, 3))
    return figures


def rows():
    """(label, workload key, figure, higher is better; None: no ratio)."""
    out = []
    for w in FIO_WORKLOADS:
        if w.primary == "lat_us":
            out.append((f"{w.name}, mean latency (us)", w.name, "lat_us", False))
            out.append((f"{w.name}, p99 latency (us)", w.name, "p99_us", False))
        else:
            unit = "IOPS" if w.primary == "iops" else "MiB/s"
            out.append((f"{w.name} ({unit})", w.name, w.primary, True))
    out.append((f"{COPY_DEFAULT} (MiB/s)", COPY_DEFAULT, "mib", True))
    out.append((f"{COPY_ONE} (MiB/s)", COPY_ONE, "mib", True))
    out.append((f"{CONN_RATE} (handshake + disconnect)", CONN_RATE, "per_s", True))
    out.append((f"server CPU s per GiB, {CPU_WORKLOAD}", CPU_WORKLOAD, "cpu_per_gib", False))
    out.append(("server CPU s per GiB, 1M read QD8", "1M read QD8", "cpu_per_gib", False))
    # No ratio: a client at 100% of its core is the limit, whoever serves it.
    for workload in CLIENT_CPU_WORKLOADS:
        out.append((f"fio's own CPU (% of a core), {workload}", workload, "client_cpu", None))
    return out


def median(results, kind, workload, key):
    vals = [r[workload][key] for r in results[kind] if workload in r and key in r[workload]]
    return statistics.median(vals) if vals else None


def fmt(v):
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def ratio(bexd, peer, higher):
    if higher is None or bexd is None or peer is None or bexd == 0 or peer == 0:
        return "-"
    return f"{(bexd / peer) if higher else (peer / bexd):.2f}x"


def table(results, servers, ceilings):
    peers = [s for s in servers if s != "bexd"]
    head = ["workload"] + servers + [f"bexd/{p}" for p in peers if "bexd" in servers]
    if ceilings:
        head += ["fio on the file (no NBD)", "iperf3 loopback"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, workload, key, higher in rows():
        meds = {s: median(results, s, workload, key) for s in servers}
        if all(v is None for v in meds.values()):
            continue
        cells = [label] + [fmt(meds[s]) for s in servers]
        if "bexd" in servers:
            cells += [ratio(meds["bexd"], meds[p], higher) for p in peers]
        if ceilings:
            cells += [fmt(ceilings[c].get((workload, key))) for c in ("file", "iperf3")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure_ceilings(args, image):
    """What no NBD server can beat: the file itself, and TCP over loopback."""
    on_file, iperf = {}, {}
    if args.format == "raw":
        for w in FIO_WORKLOADS:
            fig = run_fio_on_file(w, image, f"{args.size_mib}M", args.runtime)
            on_file[(w.name, w.primary)] = fig[w.primary]
            if w.primary == "lat_us":
                on_file[(w.name, "p99_us")] = fig["p99_us"]
    if args.transport == "tcp":
        one = run_iperf3(1, args.runtime)["mib"]
        four = run_iperf3(4, args.runtime)["mib"]
        for workload in ("1M read QD8", "1M write QD8", COPY_ONE):
            iperf[(workload, "mib")] = one
        iperf[("64k randrw 70/30 4x QD16", "mib")] = iperf[(COPY_DEFAULT, "mib")] = four
    return {"file": on_file, "iperf3": iperf}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default=None, help="comma-separated subset of: " + ",".join(FORMATS["raw"]))
    ap.add_argument("--format", choices=sorted(FORMATS), default="raw")
    ap.add_argument("--transport", choices=["tcp", "unix"], default="tcp")
    ap.add_argument("--tls", action="store_true", help="x509 TLS (servers that support it)")
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio workload")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=4096, help="image size")
    ap.add_argument("--no-ceilings", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="1 round of 1 s on 64 MiB, fio workloads only")
    ap.add_argument("--out", help="also write the Markdown report here")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.runtime, args.size_mib = 1, 1, 64
        args.no_ceilings = True
    allowed = FORMATS[args.format]
    if args.tls:
        allowed = [s for s in allowed if s in TLS_CAPABLE]
    args.servers = [s for s in (args.servers.split(",") if args.servers else allowed)]
    unknown = [s for s in args.servers if s not in allowed]
    if unknown:
        ap.error(f"{','.join(unknown)} cannot serve format={args.format} tls={args.tls}")
    return args


def report(args, results, ceilings):
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "bench/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    machine = f"{os.cpu_count()} cores, {platform.machine()}, kernel {platform.release()}"
    head = (f"Command: `{cmd}`  \nMachine: {machine}; {when}; image {args.size_mib} MiB "
            f"{args.format} in /dev/shm; transport {args.transport}; TLS {'x509' if args.tls else 'off'}; "
            f"{args.rounds} interleaved rounds of {args.runtime} s, medians.\n")
    return head + "\n" + table(results, args.servers, ceilings) + "\n"


def main():
    args = parse_args()
    image = make_image(f"/dev/shm/bexd-bench.{args.format}", args.size_mib, args.format)
    tls = make_tls_dirs() if args.tls else None
    try:
        results = {s: [] for s in args.servers}
        for round_no in range(args.rounds):
            for kind in args.servers:
                print(f"round {round_no + 1}/{args.rounds}: {kind}", file=sys.stderr, flush=True)
                results[kind].append(measure_server(kind, args, image, tls))
        ceilings = {} if args.no_ceilings else measure_ceilings(args, image)
    finally:
        os.unlink(image)
    text = report(args, results, ceilings)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
