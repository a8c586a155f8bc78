#!/usr/bin/python3
"""bexd's NBD export of a Ceph RBD image against fio's own rbd engine (the ceiling: librbd
in fio's process, no NBD hop), qemu-storage-daemon's export of the same image (the peer),
and `rbd bench`, on a one-node cluster started by scripts/ceph-cluster.sh.

    bench/rbd.py [--bexd target/release/bexd] [--rounds 3] [--runtime 5] [--size-mib 512]

Each daemon gets one NBD flush before the workloads (librbd's cache stays in writethrough mode
until the first flush; fio's rbd engine runs it in writeback mode). Every round runs each reader in turn (interleaved, so drift on a shared machine hits all
alike): one daemon at a time holds the image (its exclusive lock), fio connects over a unix
socket with its nbd engine. The image is filled once with `rbd bench --io-type write` so
reads hit real objects. The table holds medians and ratios to fio's rbd engine.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = [
    ("4k randread QD32 (IOPS)", dict(rw="randread", bs="4k", iodepth=32), "iops"),
    ("4k randwrite QD32 (IOPS)", dict(rw="randwrite", bs="4k", iodepth=32), "iops"),
    ("1M read QD8 (MiB/s)", dict(rw="read", bs="1M", iodepth=8), "mibs"),
]


def fio(engine_args, w, runtime, env=None):
    args = ["fio", "--name=j", "--output-format=json", "--time_based", f"--runtime={runtime}",
            "--ramp_time=1", f"--rw={w['rw']}", f"--bs={w['bs']}", f"--iodepth={w['iodepth']}",
            *engine_args]
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env,
                         timeout=runtime + 120).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if "read" in w["rw"] else job["write"]
    return side["iops"], side["bw_bytes"] / (1 << 20)


def wait_socket(path, proc):
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        if os.path.exists(path):
            return
        time.sleep(0.1)
    raise RuntimeError("server did not listen")


def serve(kind, binary, blockdev, sock):
    argv = [binary if kind == "bexd" else "qemu-storage-daemon", "--blockdev", blockdev,
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e,node-name=r0,name=disk,writable=on"]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_socket(sock, p)
    return p


def rbd_bench(env, conf, image, io_type, size, pattern, threads, total):
    out = subprocess.run(["rbd", "-c", conf, "--id", "bexd", "bench", "--io-type", io_type,
                          "--io-size", size, "--io-threads", str(threads), "--io-total", total,
                          "--io-pattern", pattern, f"rbd/{image}"],
                         capture_output=True, text=True, check=True, env=env,
                         timeout=600).stdout
    m = re.search(r"elapsed:\s*(\S+)\s+ops:\s*(\d+)\s+ops/sec:\s*(\S+)\s+bytes/sec:\s*(.+)",
                  out)
    ops_s, bytes_s = float(m.group(3)), m.group(4)
    return ops_s, bytes_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bexd", default=os.path.join(REPO, "target/release/bexd"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=512)
    a = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="bexd-rbd-bench-")
    cdir = os.path.join(tmp, "ceph")
    out = subprocess.run([os.path.join(REPO, "scripts/ceph-cluster.sh"), "start", cdir],
                         capture_output=True, text=True, check=True).stdout
    env = dict(os.environ, **dict(l.split("=", 1) for l in out.splitlines() if "=" in l))
    conf = env["CEPH_CONF"]
    try:
        img = "bench"
        subprocess.run(["rbd", "-c", conf, "--id", "bexd", "create", "--size",
                        f"{a.size_mib}M", f"rbd/{img}"], check=True, env=env)
        rbd_bench(env, conf, img, "write", "4M", "seq", 4, f"{a.size_mib}M")
        blockdev = f"driver=rbd,node-name=r0,pool=rbd,image={img},conf={conf},user=bexd"
        sock = os.path.join(tmp, "nbd.sock")
        uri = f"nbd+unix:///disk?socket={sock}"
        peers = ["fio rbd engine", "bexd", "qsd"]
        results = {(w[0], p): [] for w in WORKLOADS for p in peers}
        for r in range(a.rounds):
            for peer in peers:
                proc = None
                if peer == "fio rbd engine":
                    engine = ["--ioengine=rbd", "--clientname=bexd", "--pool=rbd",
                              f"--rbdname={img}"]
                else:
                    proc = serve(peer, a.bexd, blockdev, sock)
                    # One flush first, as a guest's first flush would: librbd keeps its
                    # cache in writethrough mode until a flush arrives
                    # (rbd_cache_writethrough_until_flush), and fio's rbd engine runs with
                    # the cache in writeback mode, so without it the write row compares two
                    # cache modes (bexd 3122 IOPS before the flush, 5569 after, measured).
                    subprocess.run(["qemu-io", "-f", "raw", "-c", "flush", uri], check=True,
                                   capture_output=True, timeout=60)
                    engine = ["--ioengine=nbd", f"--uri={uri}", "--iomem_align=4096",
                              f"--size={a.size_mib}M"]
                try:
                    for name, w, unit in WORKLOADS:
                        iops, mibs = fio(engine, w, a.runtime, env)
                        results[(name, peer)].append(iops if unit == "iops" else mibs)
                        print(f"round {r} {peer:16} {name:28} "
                              f"{results[(name, peer)][-1]:.0f}", file=sys.stderr)
                finally:
                    if proc:
                        proc.terminate()
                        proc.wait(timeout=30)
                        if os.path.exists(sock):
                            os.unlink(sock)
        bench = {
            "4k randread QD32 (IOPS)": rbd_bench(env, conf, img, "read", "4K", "rand", 32, "256M"),
            "4k randwrite QD32 (IOPS)": rbd_bench(env, conf, img, "write", "4K", "rand", 32,
                                                  "128M"),
            "1M read QD8 (MiB/s)": rbd_bench(env, conf, img, "read", "1M", "seq", 8,
                                             f"{a.size_mib}M"),
        }
    finally:
        subprocess.run([os.path.join(REPO, "scripts/ceph-cluster.sh"), "stop", cdir],
                       capture_output=True)

    print(f"{a.rounds} interleaved rounds of {a.runtime} s, medians; image {a.size_mib} MiB "
          "on memstore; fio's nbd engine over a unix socket; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| workload | fio rbd engine (ceiling) | bexd | qsd | bexd/ceiling | qsd/ceiling "
          "| bexd/qsd | rbd bench (ops/s, bytes/s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, _, _ in WORKLOADS:
        m = {p: statistics.median(results[(name, p)]) for p in peers}
        ops, bps = bench[name]
        print(f"| {name} | {m['fio rbd engine']:.0f} | {m['bexd']:.0f} | {m['qsd']:.0f} | "
              f"{m['bexd'] / m['fio rbd engine']:.2f} | {m['qsd'] / m['fio rbd engine']:.2f} | "
              f"{m['bexd'] / m['qsd']:.2f}x | {ops:.0f}, {bps} |")
    print("\nevery round:", json.dumps({f"{k[0]} / {k[1]}": v for k, v in results.items()}))


if __name__ == "__main__":
    main()
