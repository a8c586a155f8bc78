#!/usr/bin/env python3
"""Many exports and many connections on one machine: memory and aggregate IOPS.

    bench/scale.py                                   # every server, the defaults below
    bench/scale.py --servers bexd,qsd --exports 100 --connections 1000 --out /tmp/scale.md

Memory: each server is started once with one export and once with --exports
exports (each a 64 MiB raw file in /dev/shm), and the difference in resident
memory (VmRSS of the server process and its children) divided by the extra
exports is its cost per export. Then --connections clients connect to the
many-export server, spread over the exports, finish the handshake
(NBD_OPT_GO) and stay idle; the growth in RSS divided by the connections is
the cost per idle connection.

IOPS: the same connections then each do 4 KiB random reads at queue depth 1
(fio's nbd engine, one job per connection, --jobs-per-fio connections per fio
process) for --runtime seconds; the aggregate is compared with one connection
at QD32 against the same server (bexd's goal: 90% of that figure).

Servers: bexd and qemu-storage-daemon (one --blockdev and --export per image),
nbdkit (the file plugin's dir= mode: every file of a directory is an export;
it opens an image only when a client asks for it). qemu-nbd and nbd-server
serve one export per process and are left out.
Needs: fio, nbdkit, qemu-storage-daemon, target/release/bexd (or $BEXD).
"""

import argparse
import datetime
import os
import platform
import resource
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from servers import REPO, free_port  # noqa: E402
from workloads import Fio, _recv_exact, run_fio  # noqa: E402

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_GO = 7
REP_ACK = 1


def argv_for(kind, images, port, image_dir):
    if kind in ("bexd", "qsd"):
        binary = os.environ.get("BEXD", str(REPO / "target/release/bexd")) if kind == "bexd" \
            else "qemu-storage-daemon"
        argv = [binary]
        for i, image in enumerate(images):
            argv += ["--blockdev", f"driver=file,node-name=n{i},filename={image}"]
            argv += ["--export", f"type=nbd,id=e{i},node-name=n{i},name=e{i},writable=on"]
        # max-connections=0: no limit (QEMU's default is 100 for QSD, none for bexd).
        return argv[:1] + ["--nbd-server",
                           f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},max-connections=0"] \
            + argv[1:]
    if kind == "nbdkit":
        return ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port),
                "file", f"dir={image_dir}"]
    raise ValueError(kind)


def rss_kib(pid):
    total = 0
    pids = [pid] + [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == pid]
    for p in pids:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def _parent(pid):
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


class Running:
    def __init__(self, kind, images, image_dir):
        self.port = free_port()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv_for(kind, images, self.port, image_dir),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.log)
        deadline = time.monotonic() + 60
        while True:
            try:
                s = socket.create_connection(("127.0.0.1", self.port))
                s.settimeout(10)
                if s.recv(18):
                    s.close()
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"{kind} did not start: {self.log.read().decode()[-500:]}")
            time.sleep(0.05)
        time.sleep(0.5)  # let start-up allocations settle before the first reading

    def rss(self):
        return rss_kib(self.proc.pid)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def open_idle(port, export):
    """A connection that has finished NBD_OPT_GO and sends nothing more."""
    s = socket.create_connection(("127.0.0.1", port))
    magic, opt, flags = struct.unpack(">QQH", _recv_exact(s, 18))
    assert magic == NBDMAGIC and opt == IHAVEOPT
    s.sendall(struct.pack(">I", flags & 3))
    name = export.encode()
    payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(payload)) + payload)
    while True:
        _, _, rtype, length = struct.unpack(">QIII", _recv_exact(s, 20))
        _recv_exact(s, length)
        if rtype == REP_ACK:
            return s
        if rtype & 0x80000000:
            raise ConnectionError(f"NBD_OPT_GO refused for {export}: {rtype:#x}")


def fio_many(port, exports, connections, per_fio, runtime):
    """`connections` QD1 readers, one fio job each, spread over the exports."""
    procs = []
    for first in range(0, connections, per_fio):
        argv = ["fio", "--ioengine=nbd", "--rw=randread", "--bs=4k", "--iodepth=1", "--size=64M",
                "--time_based", f"--runtime={runtime}", "--randrepeat=0", "--group_reporting",
                "--output-format=json", "--thread"]
        for c in range(first, min(first + per_fio, connections)):
            argv += [f"--name=c{c}", f"--uri=nbd://127.0.0.1:{port}/e{c % exports}"]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    iops = 0.0
    import json
    for p in procs:
        out, err = p.communicate(timeout=runtime + 300)
        if p.returncode != 0:
            raise RuntimeError(f"fio failed: {err[-500:]}")
        for job in json.loads(out[out.index("{"):])["jobs"]:
            iops += job["read"]["iops"]
    return iops


def measure(kind, args, images_one, images_many, dirs):
    fig = {}
    one = Running(kind, images_one, dirs[0])
    try:
        fig["rss_one_export_kib"] = one.rss()
        fig["qd32_iops"] = run_fio(Fio("qd32", "randread", "4k", 32, 1, "iops"),
                                   f"nbd://127.0.0.1:{one.port}/e0", "64M", args.runtime)["iops"]
    finally:
        one.close()
    many = Running(kind, images_many, dirs[1])
    try:
        base = many.rss()
        fig["rss_many_exports_kib"] = base
        fig["per_export_kib"] = (base - fig["rss_one_export_kib"]) / (len(images_many) - 1)
        socks = [open_idle(many.port, f"e{c % len(images_many)}") for c in range(args.connections)]
        time.sleep(1)
        fig["per_connection_kib"] = (many.rss() - base) / args.connections
        for s in socks:
            s.close()
        time.sleep(1)
        if args.runtime:
            fig["many_qd1_iops"] = fio_many(many.port, len(images_many), args.connections,
                                            args.jobs_per_fio, args.runtime)
            fig["many_vs_qd32"] = fig["many_qd1_iops"] / max(fig["qd32_iops"], 1)
    finally:
        many.close()
    return fig


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="bexd,qsd,nbdkit")
    ap.add_argument("--exports", type=int, default=100)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--jobs-per-fio", type=int, default=100)
    ap.add_argument("--runtime", type=int, default=10, help="0: memory only")
    ap.add_argument("--out")
    args = ap.parse_args()
    # Every connection is a descriptor in the client and in the server.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.connections + 1024)), hard))
    root = tempfile.mkdtemp(prefix="bexd-scale-", dir="/dev/shm")
    dirs = [os.path.join(root, "one"), os.path.join(root, "many")]
    try:
        images = {d: [] for d in dirs}
        for d, n in ((dirs[0], 1), (dirs[1], args.exports)):
            os.mkdir(d)
            for i in range(n):
                path = os.path.join(d, f"e{i}")
                with open(path, "wb") as f:
                    f.write(os.urandom(1 << 20) * 64)
                images[d].append(path)
        results = {}
        for kind in args.servers.split(","):
            results[kind] = measure(kind, args, images[dirs[0]], images[dirs[1]], dirs)
            print(f"{kind}: {results[kind]}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = report(args, results)
    print(text)
    if args.out:
        open(args.out, "w").write(text)


def report(args, results):
    machine = f"{os.cpu_count()} cores, {platform.machine()}, kernel {platform.release()}"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    servers = list(results)
    rows = [("RSS with one export (KiB)", "rss_one_export_kib"),
            (f"RSS with {args.exports} exports (KiB)", "rss_many_exports_kib"),
            ("RSS per extra export (KiB)", "per_export_kib"),
            ("RSS per idle connection (KiB)", "per_connection_kib"),
            ("4k randread QD32, one connection (IOPS)", "qd32_iops"),
            (f"4k randread QD1 x {args.connections} connections (IOPS)", "many_qd1_iops"),
            ("... as a share of the QD32 figure", "many_vs_qd32")]
    lines = [f"Command: `bench/scale.py {shlex.join(sys.argv[1:])}`  ",
             f"Machine: {machine}; {when}; {args.exports} exports of 64 MiB in /dev/shm; "
             f"{args.connections} connections.", "",
             "| figure | " + " | ".join(servers) + " |", "|---|" + "---|" * len(servers)]
    for label, key in rows:
        vals = []
        for s in servers:
            v = results[s].get(key)
            vals.append("-" if v is None else (f"{v:.2f}" if key == "many_vs_qd32" else f"{v:.0f}"))
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
