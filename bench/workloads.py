"""The workloads: fio's nbd engine, nbdcopy, the connection rate, and the ceilings.

Each workload returns a dict of figures; `primary` names the one the ratio
table compares, and whether higher is better.
"""

import json
import socket
import struct
import subprocess
import time
from dataclasses import dataclass

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_GO = 7
REP_ACK = 1
REQUEST_MAGIC = 0x25609513
CMD_DISC = 2


@dataclass
class Fio:
    name: str
    rw: str
    bs: str
    depth: int
    jobs: int
    primary: str  # "lat_us", "iops" or "mib"

    @property
    def higher_is_better(self):
        return self.primary != "lat_us"


FIO_WORKLOADS = [
    Fio("4k randread QD1", "randread", "4k", 1, 1, "lat_us"),
    Fio("4k randread QD32", "randread", "4k", 32, 1, "iops"),
    Fio("4k randwrite QD32", "randwrite", "4k", 32, 1, "iops"),
    Fio("1M read QD8", "read", "1M", 8, 1, "mib"),
    Fio("1M write QD8", "write", "1M", 8, 1, "mib"),
    Fio("64k randrw 70/30 4x QD16", "randrw", "64k", 16, 4, "mib"),
]


def _fio_figures(out):
    job = json.loads(out[out.index("{"):])["jobs"][0]
    r, w = job["read"], job["write"]
    main = r if r["io_bytes"] else w
    pct = main["clat_ns"].get("percentile", {})
    return {
        "iops": r["iops"] + w["iops"],
        "mib": (r["bw"] + w["bw"]) / 1024,
        "lat_us": main["clat_ns"]["mean"] / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
        "bytes": r["io_bytes"] + w["io_bytes"],
        # The client's own CPU (fio's job thread, libnbd and its syscalls), in
        # % of one core: near 100 means fio, not the server, sets the pace.
        "client_cpu": job["usr_cpu"] + job["sys_cpu"],
    }


def run_fio(w, uri, size, runtime, env=None):
    """One fio run over NBD; every job opens its own connection."""
    argv = ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={w.rw}", f"--bs={w.bs}",
            f"--iodepth={w.depth}", f"--numjobs={w.jobs}", "--group_reporting", f"--size={size}",
            "--time_based", f"--runtime={runtime}", "--iomem_align=4096", "--rwmixread=70",
            "--randrepeat=0", "--output-format=json"]
    return _fio_figures(subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout)


def run_fio_on_file(w, image, size, runtime):
    """The ceiling: the same workload straight on the image, no NBD."""
    engine = "psync" if w.depth == 1 else "io_uring"
    argv = ["fio", "--name=b", f"--ioengine={engine}", f"--filename={image}", f"--rw={w.rw}",
            f"--bs={w.bs}", f"--iodepth={w.depth}", f"--numjobs={w.jobs}", "--group_reporting",
            f"--size={size}", "--time_based", f"--runtime={runtime}", "--iomem_align=4096",
            "--rwmixread=70", "--randrepeat=0", "--output-format=json"]
    return _fio_figures(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


def run_nbdcopy(uri, size_bytes, connections=None, env=None):
    """A whole-image copy to null:, timed; MiB/s of the export's size."""
    argv = ["nbdcopy"] + ([f"--connections={connections}"] if connections else []) + [uri, "null:"]
    start = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    elapsed = time.monotonic() - start
    return {"mib": size_bytes / elapsed / (1 << 20), "bytes": size_bytes}


def _recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed during handshake")
        buf += chunk
    return buf


def _one_connection(endpoint, export):
    """Greeting, NBD_OPT_GO until ACK, NBD_CMD_DISC: what a short-lived client costs."""
    s = endpoint.connect()
    try:
        magic, opt, flags = struct.unpack(">QQH", _recv_exact(s, 18))
        if magic != NBDMAGIC or opt != IHAVEOPT:
            raise ConnectionError("not a newstyle server")
        name = export.encode()
        s.sendall(struct.pack(">I", flags & 3))
        payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(payload)) + payload)
        while True:
            _, _, rtype, length = struct.unpack(">QIII", _recv_exact(s, 20))
            _recv_exact(s, length)
            if rtype == REP_ACK:
                break
            if rtype & 0x80000000:
                raise ConnectionError(f"NBD_OPT_GO refused: {rtype:#x}")
        s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 1, 0, 0))
    finally:
        s.close()


def run_connection_rate(endpoint, export, seconds):
    """Handshakes plus disconnects per second from one client, back to back."""
    count = 0
    deadline = time.monotonic() + seconds
    start = time.monotonic()
    while time.monotonic() < deadline:
        _one_connection(endpoint, export)
        count += 1
    return {"per_s": count / (time.monotonic() - start), "bytes": 0}


def run_iperf3(streams, seconds):
    """The loopback ceiling: iperf3 with 1 MiB writes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # No probe connection: iperf3 counts any connection as a test.
        time.sleep(0.5)
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds),
                              "-l", "1M", "-P", str(streams), "-J"],
                             capture_output=True, text=True, check=True).stdout
        bps = json.loads(out)["end"]["sum_received"]["bits_per_second"]
        return {"mib": bps / 8 / (1 << 20)}
    finally:
        server.kill()
        server.wait()
