#!/usr/bin/python3
"""What counting and the metrics endpoint cost the data path (issue 21's goal: with metrics on,
4 KiB random read QD32 loses under 2% against metrics off, same run).

    bench/metrics.py [BEXD] [--baseline OLD_BEXD] [--rounds 5] [--runtime 10]
                     [--workloads "4k randread QD32,4k randread QD1"]

Each round starts, in turn, on the same 1 GiB image of random data in /dev/shm:
  off   BEXD without a metrics-http object (its requests are still counted: query-blockstats
        needs the counters, so counting is always on);
  on    BEXD with --object metrics-http, scraped once a second during the run (Prometheus
        scrapes every 15 s by default: this is harsher);
  base  OLD_BEXD, when given: a build from before counting existed.
and runs fio's nbd engine on it. Rounds interleave the servers, so drift in a shared machine
hits all of them alike. The table gives each one's median and its ratio to `off`.
"""

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from servers import REPO, free_port  # noqa: E402
from workloads import FIO_WORKLOADS, run_fio  # noqa: E402

IMAGE = "/dev/shm/bexd-metrics-bench.img"


def image():
    if not os.path.exists(IMAGE):
        subprocess.run(["dd", "if=/dev/urandom", f"of={IMAGE}", "bs=1M", "count=1024",
                        "status=none"], check=True)
    return IMAGE


class Bexd:
    """One bexd serving the image as export `f` on a TCP port, optionally with metrics-http."""

    def __init__(self, binary, metrics):
        self.port = free_port()
        self.metrics_port = free_port() if metrics else None
        argv = [binary, "--blockdev", f"driver=file,node-name=file0,filename={image()}",
                "--blockdev", "driver=raw,node-name=f,file=file0",
                "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={self.port}",
                "--export", "type=nbd,id=e0,node-name=f,name=f,writable=on"]
        if metrics:
            argv += ["--object",
                     f"metrics-http,id=m0,addr.host=127.0.0.1,addr.port={self.metrics_port}"]
        self.proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        self.scrapes = 0
        self._stop = threading.Event()
        self._scraper = None
        deadline = time.monotonic() + 30
        while not self._listening():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{binary} did not start")
            time.sleep(0.05)

    def _listening(self):
        import socket
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def uri(self):
        return f"nbd://127.0.0.1:{self.port}/f"

    def scrape_every_second(self):
        def loop():
            url = f"http://127.0.0.1:{self.metrics_port}/metrics"
            while not self._stop.wait(1.0):
                with urllib.request.urlopen(url, timeout=10) as r:
                    r.read()
                self.scrapes += 1
        if self.metrics_port:
            self._scraper = threading.Thread(target=loop, daemon=True)
            self._scraper.start()

    def stop(self):
        self._stop.set()
        if self._scraper:
            self._scraper.join()
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bexd", nargs="?", default=str(REPO / "target/release/bexd"))
    ap.add_argument("--baseline", help="a bexd built before counting, for the 'base' column")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--workloads", default="4k randread QD32")
    args = ap.parse_args()
    chosen = [w for w in FIO_WORKLOADS if w.name in args.workloads.split(",")]
    variants = [("off", args.bexd, False), ("on", args.bexd, True)]
    if args.baseline:
        variants.append(("base", args.baseline, False))
    results = {(w.name, v[0]): [] for w in chosen for v in variants}
    for r in range(args.rounds):
        for name, binary, metrics in variants:
            for w in chosen:
                server = Bexd(binary, metrics)
                server.scrape_every_second()
                try:
                    fig = run_fio(w, server.uri(), "1G", args.runtime)
                finally:
                    server.stop()
                results[(w.name, name)].append(fig[w.primary])
                scraped = f", {server.scrapes} scrapes" if metrics else ""
                print(f"round {r + 1} {name:4} {w.name}: {fig[w.primary]:.0f} {w.primary}{scraped}",
                      flush=True)
    print()
    names = [v[0] for v in variants]
    ratio_names = [f"{n}/off" for n in names if n != "off"]
    print("| workload | " + " | ".join(names + ratio_names) + " |")
    print("|" + "---|" * (1 + len(variants) + len(variants) - 1))
    for w in chosen:
        medians = {v[0]: statistics.median(results[(w.name, v[0])]) for v in variants}
        cells = [f"{medians[v[0]]:.0f} {w.primary}" for v in variants]
        ratios = [f"{medians[v[0]] / medians['off']:.3f}" for v in variants if v[0] != "off"]
        print(f"| {w.name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    print()
    for w in chosen:
        for v in variants:
            rounds = ", ".join(f"{x:.0f}" for x in results[(w.name, v[0])])
            print(f"{w.name} {v[0]}: {rounds}")


if __name__ == "__main__":
    main()
