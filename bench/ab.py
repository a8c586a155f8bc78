#!/usr/bin/python3
"""Two or more bexd binaries (or peers, as kind:NAME) interleaved on the same
workloads: the A/B behind each change's figures in docs/benchmarks.md.

    bench/ab.py OLD_BEXD NEW_BEXD [kind:qemu-nbd ...] [--format qcow2] [--tls]
                [--rounds 3] [--workloads "1M read QD8,nbdcopy"]
                [--image-dir /var/tmp] [--file-opts cache.direct=on,aio=io_uring]

Each round starts every server in turn on the same image in /dev/shm (1 GiB of
random data, as qcow2 with --format qcow2) and runs the chosen fio workloads
(3 s each) and nbdcopy; the table holds each one's median and every round.
--image-dir puts the image on another file system (a disk, say, where small
requests are not answered inline from tmpfs); --file-opts go to the file
node of bexd and qemu-storage-daemon, and a bexd binary may carry its own
as BINARY@OPTS (bexd@aio=threads bexd@aio=io_uring compares two modes).
With --format qcow2-filled every server gets an empty qcow2 that nbdcopy then
fills through it (4 connections): an image that grew while served, whose
clusters lie in runs of nbdcopy's 256 KiB requests, interleaved.
"""

import argparse
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from servers import Server  # noqa: E402
from tlscerts import make_tls_dirs  # noqa: E402
from workloads import FIO_WORKLOADS, run_fio, run_nbdcopy  # noqa: E402

COPIES = {"nbdcopy": None, "nbdcopy 1 connection": 1}


def image(fmt, where="/dev/shm"):
    raw = f"{where}/bexd-ab.img"
    if not os.path.exists(raw):
        subprocess.run(["dd", "if=/dev/urandom", f"of={raw}", "bs=1M", "count=1024", "status=none"],
                       check=True)
    if fmt == "raw":
        return raw
    if fmt == "qcow2-filled":
        return f"{where}/bexd-ab-filled.qcow2"
    path = f"{where}/bexd-ab.qcow2"
    if not os.path.exists(path):
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path], check=True)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("servers", nargs="+", help="bexd binaries, or kind:NAME for a peer")
    ap.add_argument("--format", choices=["raw", "qcow2", "qcow2-filled"], default="raw")
    ap.add_argument("--transport", choices=["tcp", "unix"], default="tcp")
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image-dir", default="/dev/shm")
    ap.add_argument("--file-opts", default="", help="file node options for bexd and qsd")
    ap.add_argument("--workloads", default=",".join([w.name for w in FIO_WORKLOADS] + list(COPIES)))
    args = ap.parse_args()
    names = args.workloads.split(",")
    unknown = set(names) - {w.name for w in FIO_WORKLOADS} - set(COPIES)
    if unknown:
        ap.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    fio = [w for w in FIO_WORKLOADS if w.name in names]
    tls = make_tls_dirs() if args.tls else None
    img = image(args.format, args.image_dir)
    results = {s: {} for s in args.servers}
    for _ in range(args.rounds):
        for s in args.servers:
            binary, _, own_opts = s.partition("@")
            kind = binary[len("kind:"):] if binary.startswith("kind:") else "bexd"
            opts = ",".join(o for o in (args.file_opts, own_opts) if o)
            if kind == "bexd":
                os.environ["BEXD"] = os.path.abspath(binary)
            elif kind not in ("qsd",):
                opts = ""
            filled = args.format == "qcow2-filled"
            if filled:
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1G"], check=True)
            with Server(kind, img, "qcow2" if filled else args.format, args.transport, tls,
                        file_opts=opts) as server:
                uri, env = server.endpoint.uri(), server.endpoint.client_env()
                if filled:
                    subprocess.run(["nbdcopy", image("raw", args.image_dir), uri], check=True, env=env)
                for w in fio:
                    got = run_fio(w, uri, 1 << 30, 3, env=env)[w.primary]
                    results[s].setdefault(w.name, []).append(got)
                for name, conns in COPIES.items():
                    if name in names:
                        got = run_nbdcopy(uri, 1 << 30, connections=conns, env=env)["mib"]
                        results[s].setdefault(name, []).append(got)
    if args.format == "qcow2-filled":
        os.unlink(img)
    label = [os.path.basename(s) for s in args.servers]
    print("| workload | " + " | ".join(label) + " | rounds |")
    print("|---" * (len(label) + 2) + "|")
    for name in results[args.servers[0]]:
        medians = [f"{statistics.median(results[s][name]):.1f}" for s in args.servers]
        rounds = "; ".join(" ".join(f"{v:.0f}" for v in results[s][name]) for s in args.servers)
        print(f"| {name} | " + " | ".join(medians) + f" | {rounds} |")


if __name__ == "__main__":
    main()
