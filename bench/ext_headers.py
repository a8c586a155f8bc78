#!/usr/bin/python3
"""Issue 17's goals for extended headers, measured: a 1 TiB sparse raw image
with scattered allocated extents, served by bexd and by qemu-nbd 10 in turn
(interleaved rounds), read by clients that negotiate extended headers
(qemu-img 10) and by one that does not (libnbd 1.14's nbdinfo), with the
request counts taken from each server:

- bexd: the closing debug line of each connection (BEXD_LOG=bexd::nbd_server=debug,
  "NBD connection closed ... requests=N"), which counts every request read,
  NBD_CMD_DISC included;
- qemu-nbd: its trace event `nbd_receive_request` (one line per request
  header it decodes, NBD_CMD_DISC included), written with
  `-T nbd_receive_request,file=...`.

    bench/ext_headers.py [--rounds 5] [--extents 1000] [--extent-kib 64]
                         [--dir /dev/shm] [--small-seconds 5] [--before BEXD]
                         [--out FILE]

The image holds only the extents (64 MiB by default) and is removed at the
end. With --before BEXD (a bexd built before extended headers, which answers
NBD_OPT_EXTENDED_HEADERS with ERR_UNSUP, so qemu-img falls back to compact
headers and structured replies) the same qemu-img workloads and a 4 KiB
random read and write `qemu-img bench` run on both bexd binaries too: what
turning extended headers on costs or saves, with the client unchanged.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORT = "f"
TIB = 1 << 40


def make_image(path, size, extents, extent_len, seed=17):
    """A sparse file with `extents` allocated runs of `extent_len` bytes at
    random aligned places; returns their (start, length) list."""
    rnd = random.Random(seed)
    slots = sorted(rnd.sample(range(size // extent_len // 2), extents))
    # Every other slot only, so no two extents touch and each stays one extent.
    starts = [s * 2 * extent_len for s in slots]
    fill = b"\x5a" * extent_len
    with open(path, "wb") as f:
        f.truncate(size)
        for start in starts:
            os.pwrite(f.fileno(), fill, start)
    return [(s, extent_len) for s in starts]


class Served:
    """One server on the image, read-only, on a unix socket; counts requests."""

    def __init__(self, kind, binary, image, workdir, writable=False):
        self.kind = kind
        self.sock = os.path.join(workdir, f"{kind}.sock")
        self.log = os.path.join(workdir, f"{kind}.log")
        for stale in (self.sock, self.log):
            if os.path.exists(stale):
                os.unlink(stale)
        env = dict(os.environ)
        ro = "" if writable else ",read-only=on"
        if kind == "qemu-nbd":
            argv = ["qemu-nbd"] + ([] if writable else ["-r"]) + ["-f", "raw", "-x", EXPORT, "--shared=16", "--persistent",
                    "--cache=writeback", "-k", self.sock,
                    "-T", f"nbd_receive_request,file={self.log}", image]
        else:
            argv = [binary, "--blockdev",
                    f"driver=file,node-name=file0,filename={image}{ro}",
                    "--blockdev", f"driver=raw,node-name=f,file=file0{ro}",
                    "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
                    "--export", f"type=nbd,id=e0,node-name=f,name={EXPORT},writable={'off' if ro else 'on'}"]
            env["BEXD_LOG"] = "bexd::nbd_server=debug"
        # bexd-before predates the closing line's request count: not counted.
        self.counted = kind != "bexd-before"
        self.stderr = open(self.log if kind != "qemu-nbd" else os.devnull, "a")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.stderr, env=env)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not start")
            time.sleep(0.02)
        self.uri = f"nbd+unix:///{EXPORT}?socket={self.sock}"

    def requests(self):
        """Requests served so far, by the server's own account."""
        try:
            text = open(self.log, "rb").read().decode(errors="replace")
        except FileNotFoundError:
            return 0
        if self.kind == "qemu-nbd":
            return text.count("nbd_receive_request ")
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)
        return sum(int(n) for n in re.findall(r"NBD connection closed .*requests=(\d+)", text))

    def settled_requests(self, before):
        """The count once the last connection's line is out (it follows the close)."""
        if not self.counted:
            return None
        last, deadline = -1, time.monotonic() + 5
        while time.monotonic() < deadline:
            now = self.requests()
            if now == last and now > before:
                return now
            last = now
            time.sleep(0.05)
        return last

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def qemu_img_map(uri, expected):
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", uri],
                         capture_output=True, text=True, check=True).stdout
    data = [(e["start"], e["length"]) for e in json.loads(out) if e["data"]]
    if data != expected:
        raise RuntimeError(f"qemu-img map: wrong extents ({len(data)} data extents)")


def qemu_img_convert(uri, expected):
    # -n: the null-co target exists; --target-is-zero: it reads as zeroes, so
    # convert skips the holes instead of writing 1 TiB of zeroes to it
    # (qemu-img's own cost, which would swamp the server's).
    subprocess.run(["qemu-img", "convert", "-n", "--target-is-zero", "-f", "raw", uri,
                    "--target-image-opts", "driver=null-co,size=1T"], check=True)


def nbdinfo_map(uri, expected):
    out = subprocess.run(["nbdinfo", "--map", "--json", uri], capture_output=True, text=True,
                         check=True).stdout
    data = [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1 == 0]
    if data != expected:
        raise RuntimeError(f"nbdinfo --map: wrong extents ({len(data)} data extents)")


def small_block(op, count):
    """qemu-img bench: `count` 4 KiB requests at queue depth 32, each 7919
    blocks past the last (wrapping), over NBD (extended headers if the server
    has them): requests per second."""
    def run(uri, expected):
        argv = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-n", "-c", str(count), "-d", "32",
                "-s", "4096", "-S", str(7919 * 4096)]
        if op == "write":
            argv += ["-w", "--pattern=0x5a"]
        started = time.monotonic()
        subprocess.run(argv + [uri], check=True, capture_output=True)
        return count / (time.monotonic() - started)
    return run


WORKLOADS = {
    "qemu-img map (extended)": qemu_img_map,
    "qemu-img convert -n to null-co (extended)": qemu_img_convert,
    "nbdinfo --map, libnbd 1.14 (compact)": nbdinfo_map,
}


def measure(server, workload, expected):
    before = server.requests()
    started = time.monotonic()
    result = workload(server.uri, expected)
    elapsed = time.monotonic() - started
    after = server.settled_requests(before)
    return elapsed, (after - before if after is not None else None), result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--extents", type=int, default=1000)
    p.add_argument("--extent-kib", type=int, default=64)
    p.add_argument("--dir", default="/dev/shm")
    p.add_argument("--bexd", default=os.environ.get("BEXD", os.path.join(REPO, "target/release/bexd")))
    p.add_argument("--before", help="a bexd binary without extended headers, to compare with")
    p.add_argument("--small-count", type=int, default=100000,
                   help="requests per qemu-img bench run (with --before)")
    p.add_argument("--out")
    args = p.parse_args()

    workdir = tempfile.mkdtemp(prefix="bench-ext-", dir=args.dir)
    try:
        image = os.path.join(workdir, "sparse-1t.raw")
        expected = make_image(image, TIB, args.extents, args.extent_kib << 10)
        # The small-block runs write: their own 256 MiB image, so the big one's map stays put.
        small = os.path.join(workdir, "small.raw")
        with open(small, "wb") as f:
            f.truncate(256 << 20)
        servers = [("bexd", args.bexd), ("qemu-nbd", None)]
        if args.before:
            servers.append(("bexd-before", args.before))
        workloads = dict(WORKLOADS)
        for op in ("read", "write"):
            workloads[f"qemu-img bench 4k {op} QD32 (IOPS)"] = small_block(op, args.small_count)
        times = {(w, k): [] for w in workloads for k, _ in servers}
        counts = {}
        for r in range(args.rounds):
            for kind, binary in servers:
                for name, workload in workloads.items():
                    bench = "bench" in name
                    s = Served(kind, binary, small if bench else image, workdir, writable=bench)
                    try:
                        elapsed, n, result = measure(s, workload, expected)
                        times[(name, kind)].append(result if result is not None else elapsed)
                        counts[(name, kind)] = n
                        print(f"round {r + 1} {kind:12} {name}: "
                              f"{result if result is not None else elapsed:.3f} {n} requests",
                              file=sys.stderr)
                    finally:
                        s.stop()
        print_table(args, servers, workloads, times, counts)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def print_table(args, servers, workloads, times, counts):
    kinds = [k for k, _ in servers]
    lines = [f"Command: `bench/ext_headers.py --rounds {args.rounds}"
             + (" --before BEXD_BEFORE" if args.before else "") + "`  ",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; 1 TiB raw sparse image in "
             f"{args.dir}, {args.extents} extents of {args.extent_kib} KiB; unix socket; "
             f"{args.rounds} interleaved rounds, medians.", ""]
    head = ["workload"] + [f"{k} (s or IOPS)" for k in kinds] + [f"{k} requests" for k in kinds]
    head += ["bexd/qemu-nbd"] + (["bexd/bexd-before"] if "bexd-before" in kinds else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in workloads:
        med = {k: statistics.median(times[(name, k)]) if times[(name, k)] else None for k in kinds}
        fmt = "{:.0f}" if "IOPS" in name else "{:.3f}"
        row = [name] + [fmt.format(med[k]) if med[k] is not None else "-" for k in kinds]
        row += [str(counts[(name, k)]) if counts.get((name, k)) is not None else "-" for k in kinds]
        iops = "IOPS" in name
        ratio = lambda a, b: (a / b if iops else b / a) if a and b else None  # noqa: E731
        q = ratio(med["bexd"], med["qemu-nbd"])
        row.append(f"{q:.2f}x" if q else "-")
        if "bexd-before" in kinds:
            b = ratio(med["bexd"], med["bexd-before"])
            row.append(f"{b:.2f}x" if b else "-")
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
