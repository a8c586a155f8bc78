#!/usr/bin/python3
"""4 KiB random reads at QD1 with the server and fio pinned to the same CPU, to different CPUs,
or left to the scheduler: how much of a QD1 round trip is the server and how much is where the
kernel puts the two processes (in a VM, waking another, halted, virtual CPU is expensive).

    python3 bench/qd1_placement.py [--rounds 2] [bexd nbdkit qsd]

Needs target/release/bexd, fio, nbdkit, qemu-storage-daemon, taskset. Each line: server, its
CPUs, fio's CPUs, IOPS, mean completion latency in microseconds.
"""

import argparse
import json
import os
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "/dev/shm/qd1_placement.img"
PORT = "10999"
SERVERS = {
    "bexd": [os.path.join(REPO, "target/release/bexd"), "serve", "-f", "raw", "-p", PORT,
             "-x", "disk", "-e", "8", "-t", IMAGE],
    "nbdkit": ["nbdkit", "-f", "-p", PORT, "-e", "disk", "file", IMAGE],
    "qsd": ["qemu-storage-daemon", "--blockdev",
            f"driver=file,node-name=disk,filename={IMAGE}",
            "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={PORT}",
            "--export", "type=nbd,id=e0,node-name=disk,name=disk"],
}
# (server CPUs, fio CPUs)
PLACEMENTS = [("0", "1"), ("0", "0"), ("0,1", "0,1")]


def qd1(fio_cpus):
    out = subprocess.run(
        ["taskset", "-c", fio_cpus, "fio", "--name=b", "--ioengine=nbd",
         f"--uri=nbd://127.0.0.1:{PORT}/disk", "--rw=randread", "--bs=4k", "--iodepth=1",
         "--size=256M", "--time_based", "--runtime=3", "--output-format=json"],
        capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return job["iops"], job["clat_ns"]["mean"] / 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("servers", nargs="*", default=["bexd", "nbdkit", "qsd"])
    args = ap.parse_args()
    if not os.path.exists(IMAGE):
        with open(IMAGE, "wb") as f:
            f.write(os.urandom(256 << 20))
    for _ in range(args.rounds):
        for name in args.servers:
            for server_cpus, fio_cpus in PLACEMENTS:
                p = subprocess.Popen(["taskset", "-c", server_cpus] + SERVERS[name],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    time.sleep(0.5)
                    iops, lat = qd1(fio_cpus)
                finally:
                    p.terminate()
                    p.wait()
                print(f"{name:7} server CPUs {server_cpus:4} fio CPUs {fio_cpus:4} "
                      f"{iops:8.0f} IOPS {lat:7.1f} us", flush=True)


if __name__ == "__main__":
    main()
