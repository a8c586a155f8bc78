#!/usr/bin/python3
"""FUSE exports, bexd and qemu-storage-daemon side by side (issue 20's goals).

    bench/fuse.py [--rounds 5] [--seconds 5] [--servers bexd,qsd] [--image-mib 1024]

Each server exports the same raw image (random data, in /dev/shm) with `type=fuse` over a
regular file, and fio runs on the mounted file with the io_uring engine:
  - 4k randread QD32, O_DIRECT (every request reaches the export);
  - 1M seqread QD8, O_DIRECT;
  - 1M seqread, buffered (the kernel's page cache in front, readahead; the cache is dropped
    for the file before each run by remounting: each run starts a fresh daemon).
Servers are interleaved round by round (the order alternating), and the table holds medians
with each round's figures; "bexd/qsd" above 1 means bexd is faster.
The figures and the command are in docs/benchmarks.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "/dev/shm/bexd-fuse-bench.img"

WORKLOADS = [
    ("4k randread QD32, O_DIRECT (IOPS)", ["--rw=randread", "--bs=4k", "--iodepth=32",
                                           "--direct=1"], "iops"),
    ("1M seqread QD8, O_DIRECT (MiB/s)", ["--rw=read", "--bs=1M", "--iodepth=8", "--direct=1"],
     "mibs"),
    ("1M seqread QD8, buffered (MiB/s)", ["--rw=read", "--bs=1M", "--iodepth=8", "--direct=0"],
     "mibs"),
]


def image(mib):
    if not os.path.exists(IMAGE) or os.path.getsize(IMAGE) != mib << 20:
        subprocess.run(["dd", "if=/dev/urandom", f"of={IMAGE}", "bs=1M", f"count={mib}",
                        "status=none"], check=True)
    return IMAGE


def mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == path for line in f)


class Daemon:
    """bexd or qemu-storage-daemon with the image as a read-only FUSE export."""

    def __init__(self, kind, img):
        binary = os.environ.get("BEXD", f"{REPO}/target/release/bexd") if kind == "bexd" \
            else "qemu-storage-daemon"
        self.dir = tempfile.mkdtemp(prefix=f"bench-fuse-{kind}-")
        self.mnt = f"{self.dir}/mnt"
        open(self.mnt, "w").close()
        argv = [binary, "--blockdev", f"driver=file,node-name=file0,filename={img}",
                "--export", f"type=fuse,id=f,node-name=file0,mountpoint={self.mnt}"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not mounted(self.mnt):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{kind} did not mount")
            time.sleep(0.05)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()


def fio(path, args, seconds, size):
    out = subprocess.run(["fio", "--name=bench", f"--filename={path}", "--ioengine=io_uring",
                          f"--size={size}", "--time_based", f"--runtime={seconds}",
                          "--output-format=json", *args],
                         check=True, capture_output=True, text=True).stdout
    job = json.loads(out)["jobs"][0]["read"]
    return {"iops": job["iops"], "mibs": job["bw_bytes"] / (1 << 20)}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--servers", default="bexd,qsd")
    ap.add_argument("--image-mib", type=int, default=1024)
    args = ap.parse_args()
    kinds = args.servers.split(",")
    img = image(args.image_mib)
    got = {(k, w[0]): [] for k in kinds for w in WORKLOADS}
    for r in range(args.rounds):
        order = kinds if r % 2 == 0 else kinds[::-1]
        for name, fio_args, unit in WORKLOADS:
            for kind in order:
                with Daemon(kind, img) as d:
                    got[(kind, name)].append(
                        fio(d.mnt, fio_args, args.seconds, args.image_mib << 20)[unit])
    print(f"{args.rounds} interleaved rounds of {args.seconds} s, medians (each round's "
          f"figures in brackets); image {args.image_mib} MiB raw in /dev/shm\n")
    ratio = len(kinds) == 2
    print("| workload | " + " | ".join(kinds) + (f" | {kinds[0]}/{kinds[1]} |" if ratio else " |"))
    print("|---|" + "---|" * (len(kinds) + ratio))
    for name, _, _ in WORKLOADS:
        cells = [f"{statistics.median(got[(k, name)]):.0f} "
                 f"({' '.join(f'{v:.0f}' for v in got[(k, name)])})" for k in kinds]
        if ratio:
            a, b = (statistics.median(got[(k, name)]) for k in kinds)
            cells.append(f"{a / b:.2f}x")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
