#!/usr/bin/env python3
"""A first side-by-side: bexd vs qemu-storage-daemon with fio's nbd engine.

Not the full harness of the performance issue; a quick, honest data point.
Usage: bench/quick.py [--runtime S] [--rounds N] [--format raw|qcow2|qcow2-empty]
(needs fio, qemu-storage-daemon, target/release/bexd; uses a 1 GiB image in /dev/shm,
TCP loopback). Servers run interleaved (A B A B) and the median of the rounds is reported.
`qcow2` is a fully allocated qcow2 image of random data (64 KiB clusters), recreated before
every server start; `qcow2-empty` a fresh one, so writes allocate clusters and reads hit
unallocated ones.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = [
    ("4k randread QD1", "randread", "4k", 1, 1),
    ("4k randread QD32", "randread", "4k", 32, 1),
    ("4k randwrite QD32", "randwrite", "4k", 32, 1),
    ("1M read QD8", "read", "1M", 8, 1),
    ("1M write QD8", "write", "1M", 8, 1),
    ("64k randrw 70/30 4x QD16", "randrw", "64k", 16, 4),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def blockdev(image, fmt):
    if fmt == "raw":
        return f"driver=file,node-name=f,filename={image}"
    return f"driver=qcow2,node-name=f,file.driver=file,file.filename={image}"


def make_image(path, fmt, source):
    """The image a server starts on: raw random data, or qcow2 (filled from it, or empty)."""
    if fmt == "raw":
        if not os.path.exists(path):
            subprocess.run(["cp", source, path], check=True)
        return
    if os.path.exists(path):
        os.unlink(path)
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", source, path], check=True)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "1G"], check=True)


def start(kind, image, port, fmt="raw"):
    binary = [os.environ.get("BEXD", str(REPO / "target/release/bexd"))] if kind == "bexd" else ["qemu-storage-daemon"]
    argv = binary + ["--blockdev", blockdev(image, fmt),
                     "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
                     "--export", "type=nbd,id=e,node-name=f,writable=on"]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{kind} did not start")


def fio(port, rw, bs, depth, jobs, runtime):
    argv = ["fio", "--name=b", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/f", f"--rw={rw}",
            f"--bs={bs}", f"--iodepth={depth}", f"--numjobs={jobs}", "--group_reporting", "--size=1G",
            "--time_based", f"--runtime={runtime}", "--iomem_align=4096", "--rwmixread=70",
            "--output-format=json"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    r, w = job["read"], job["write"]
    return {"iops": r["iops"] + w["iops"], "mib": (r["bw"] + w["bw"]) / 1024,
            "lat_us": (r["clat_ns"]["mean"] if r["io_bytes"] else w["clat_ns"]["mean"]) / 1000}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--format", choices=["raw", "qcow2", "qcow2-empty"], default="raw")
    args = ap.parse_args()
    source = "/dev/shm/bench-source.raw"
    with open(source, "wb") as f:
        for _ in range(1024):
            f.write(os.urandom(1 << 20))
    images = {kind: f"/dev/shm/bench-{kind}.img" for kind in ("bexd", "qsd")}
    results = {k: {w[0]: [] for w in WORKLOADS} for k in images}
    for _ in range(args.rounds):
        for kind in ("bexd", "qsd"):
            make_image(images[kind], args.format, source)
            port = free_port()
            p = start(kind, images[kind], port, args.format)
            try:
                for name, rw, bs, depth, jobs in WORKLOADS:
                    results[kind][name].append(fio(port, rw, bs, depth, jobs, args.runtime))
            finally:
                p.terminate()
                p.wait()
    print(f"| workload | bexd | qemu-storage-daemon | ratio |")
    print("|---|---|---|---|")
    for name, *_ in WORKLOADS:
        key = "lat_us" if "QD1" in name and "QD16" not in name else ("mib" if "M " in name or "64k" in name else "iops")
        med = {k: statistics.median(x[key] for x in results[k][name]) for k in results}
        unit = {"lat_us": "us mean latency", "mib": "MiB/s", "iops": "IOPS"}[key]
        ratio = med["qsd"] / med["bexd"] if key == "lat_us" else med["bexd"] / med["qsd"]
        print(f"| {name} ({unit}) | {med['bexd']:.0f} | {med['qsd']:.0f} | {ratio:.2f}x |")
    for img in [*images.values(), source]:
        os.unlink(img)


if __name__ == "__main__":
    main()
