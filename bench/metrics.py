#!/usr/bin/python3
"""What counting and the metrics endpoint cost the data path (issue 21's goal: with metrics on,
4 KiB random read QD32 loses under 2% against metrics off, same run).

    bench/metrics.py [BEXD] [--baseline OLD_BEXD] [--rounds 5] [--runtime 10]
                     [--workloads "4k randread QD32,4k randread QD1"] [--scrape-interval 1]
    bench/metrics.py --same-server [--rounds 6]    one server, runs alternately scraped or not
    bench/metrics.py --scrape-cost-only            the server CPU one scrape costs

Each round starts, in turn, on the same 1 GiB image of random data in /dev/shm:
  off   BEXD without a metrics-http object (its requests are still counted: query-blockstats
        needs the counters, so counting is always on);
  on    BEXD with --object metrics-http, scraped once a second during the run (Prometheus
        scrapes every 15 s by default: this is harsher);
  base  OLD_BEXD, when given: a build from before counting existed.
and runs fio's nbd engine on it. Rounds interleave the servers, each round starting with the
next one, so drift in a shared machine hits all of them alike. The table gives each one's median and its ratio to `off`.
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

    def scrape_every(self, seconds):
        def loop():
            url = f"http://127.0.0.1:{self.metrics_port}/metrics"
            while not self._stop.wait(seconds):
                with urllib.request.urlopen(url, timeout=10) as r:
                    r.read()
                self.scrapes += 1
        if self.metrics_port and seconds > 0:
            self._scraper = threading.Thread(target=loop, daemon=True)
            self._scraper.start()

    def cpu_seconds(self):
        """The server's user + system CPU time so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self._stop.set()
        if self._scraper:
            self._scraper.join()
        self.proc.terminate()
        self.proc.wait(timeout=30)


def scrape_cost(binary, scrapes=500):
    """The server CPU one scrape costs (us), over `scrapes` back-to-back scrapes of an idle
    bexd with one export: what a scrape every second takes from the data path at most."""
    server = Bexd(binary, True)
    try:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        before = server.cpu_seconds()
        for _ in range(scrapes):
            with urllib.request.urlopen(url, timeout=10) as r:
                size = len(r.read())
        return (server.cpu_seconds() - before) * 1e6 / scrapes, size
    finally:
        server.stop()


def same_server(binary, workload, rounds, runtime):
    """One bexd with metrics-http; runs alternate between scraping it every second and not
    (each round starting with the other), so process-to-process variation drops out."""
    server = Bexd(binary, True)
    results = {"scraped": [], "not scraped": []}
    try:
        for r in range(rounds):
            modes = ["not scraped", "scraped"] if r % 2 == 0 else ["scraped", "not scraped"]
            for mode in modes:
                stop = threading.Event()

                def scrape():
                    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
                    while not stop.wait(1.0):
                        with urllib.request.urlopen(url, timeout=10) as resp:
                            resp.read()
                scraper = threading.Thread(target=scrape, daemon=True)
                if mode == "scraped":
                    scraper.start()
                fig = run_fio(workload, server.uri(), "1G", runtime)
                stop.set()
                if mode == "scraped":
                    scraper.join()
                results[mode].append(fig[workload.primary])
                print(f"round {r + 1} {mode}: {fig[workload.primary]:.0f} {workload.primary}",
                      flush=True)
    finally:
        server.stop()
    on, off = results["scraped"], results["not scraped"]
    print(f"\n| {workload.name}, one server | not scraped | scraped | scraped/not | paired |")
    print("|---|---|---|---|---|")
    print(f"| median {workload.primary} | {statistics.median(off):.0f} | {statistics.median(on):.0f} "
          f"| {statistics.median(on) / statistics.median(off):.3f} "
          f"| {statistics.median(a / b for a, b in zip(on, off)):.3f} |")


def parse_size(bs):
    units = {"k": 1 << 10, "M": 1 << 20}
    return int(bs[:-1]) * units[bs[-1]] if bs[-1] in units else int(bs)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bexd", nargs="?", default=str(REPO / "target/release/bexd"))
    ap.add_argument("--baseline", help="a bexd built before counting, for the 'base' column")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--workloads", default="4k randread QD32")
    ap.add_argument("--scrape-interval", type=float, default=1.0,
                    help="seconds between scrapes of the 'on' server (0: never)")
    ap.add_argument("--same-server", action="store_true",
                    help="one metrics-http server, runs alternately scraped and not")
    ap.add_argument("--scrape-cost-only", action="store_true",
                    help="only measure what one scrape costs the server")
    args = ap.parse_args()
    cost, size = scrape_cost(args.bexd)
    print(f"one scrape: {cost:.0f} us of server CPU ({size} bytes of exposition)", flush=True)
    if args.scrape_cost_only:
        return
    chosen = [w for w in FIO_WORKLOADS if w.name in args.workloads.split(",")]
    if args.same_server:
        for w in chosen:
            same_server(args.bexd, w, args.rounds, args.runtime)
        return
    variants = [("off", args.bexd, False), ("on", args.bexd, True)]
    if args.baseline:
        variants.append(("base", args.baseline, False))
    results = {(w.name, v[0]): [] for w in chosen for v in variants}
    # Server CPU per request (us): what the server spends, whatever else loads the machine.
    cpu = {(w.name, v[0]): [] for w in chosen for v in variants}
    for r in range(args.rounds):
        # Each round starts with another variant, so none always runs first.
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for name, binary, metrics in order:
            for w in chosen:
                server = Bexd(binary, metrics)
                server.scrape_every(args.scrape_interval)
                try:
                    before = server.cpu_seconds()
                    fig = run_fio(w, server.uri(), "1G", args.runtime)
                    used = server.cpu_seconds() - before
                finally:
                    server.stop()
                requests = fig["bytes"] / parse_size(w.bs)
                per_request = used * 1e6 / requests
                results[(w.name, name)].append(fig[w.primary])
                cpu[(w.name, name)].append(per_request)
                scraped = f", {server.scrapes} scrapes" if metrics else ""
                print(f"round {r + 1} {name:4} {w.name}: {fig[w.primary]:.0f} {w.primary}, "
                      f"{per_request:.2f} us server CPU/request{scraped}", flush=True)
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
        cpus = {v[0]: statistics.median(cpu[(w.name, v[0])]) for v in variants}
        cells = [f"{cpus[v[0]]:.2f} us" for v in variants]
        ratios = [f"{cpus[v[0]] / cpus['off']:.3f}" for v in variants if v[0] != "off"]
        print(f"| {w.name}, server CPU/request | " + " | ".join(cells) + " | "
              + " | ".join(ratios) + " |")
        # Each round's ratio to the `off` run next to it: steadier on a loaded machine.
        paired = [f"{statistics.median(a / b for a, b in zip(results[(w.name, v[0])], results[(w.name, 'off')])):.3f}"
                  for v in variants if v[0] != "off"]
        print(f"| {w.name}, median of paired round ratios | " + " | ".join([""] * len(variants))
              + " | " + " | ".join(paired) + " |")
    print()
    for w in chosen:
        for v in variants:
            rounds = ", ".join(f"{x:.0f}" for x in results[(w.name, v[0])])
            per_request = ", ".join(f"{x:.2f}" for x in cpu[(w.name, v[0])])
            print(f"{w.name} {v[0]}: {rounds} {w.primary}; CPU us/request {per_request}")


if __name__ == "__main__":
    main()
