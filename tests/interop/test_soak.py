"""Soak and leak checks: many verifying clients while exports come and go,
thousands of connections stalled in the handshake, clients that vanish in the
middle of a reply. Each test measures the daemon's fds, RSS and threads
through /proc and asserts they are bounded and return to their baseline.

BEXD_SOAK_SECONDS sets how long the soak runs (default 45). The figures are
printed (run pytest with -s to see them) and recorded in docs/reliability.md.
"""

import asyncio
import os
import random
import resource
import socket
import struct
import subprocess
import threading
import time

import nbd
import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from conftest import Daemon, file_export, make_image, need, raw_client, wait_until
from tls_certs import make_pki

MIB = 1 << 20
BLOCK = 4096


pytestmark = pytest.mark.bexd_only("measures bexd's own process")


def status(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {key}")


def stats(pid):
    """(open fds, VmRSS KiB, threads) of a process."""
    return len(os.listdir(f"/proc/{pid}/fd")), status(pid, "VmRSS"), status(pid, "Threads")


def settled_fds(pid, quiet=0.3, timeout=5.0):
    """The fd count once it has not changed for `quiet` seconds: right after
    start-up the readiness probe's connection may still be open."""
    deadline = time.monotonic() + timeout
    last, since = stats(pid)[0], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = stats(pid)[0]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


class Sampler:
    """Samples a process's fds, RSS and threads every 100 ms; keeps the peaks."""

    def __init__(self, pid):
        self.pid = pid
        self.peak = list(stats(pid))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.1):
            try:
                now = stats(self.pid)
            except (FileNotFoundError, ProcessLookupError):
                return
            self.peak = [max(a, b) for a, b in zip(self.peak, now)]

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.peak


def fds_back_to(pid, baseline, timeout=15.0, what="fds to return to baseline"):
    wait_until(lambda: stats(pid)[0] <= baseline, timeout=timeout, what=what)


def raise_own_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def nofile_soft_limit(pid):
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no Max open files")


def start_with_soft_nofile(tmp_path, soft, blockdevs, exports, server_extra):
    """A bexd whose inherited soft fd limit is `soft` (the hard limit stays)."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        return Daemon(tmp_path, "bexd", blockdevs, exports, server_extra)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def qmp_run(d, body):
    async def main():
        client = QMPClient("soak")
        await client.connect(str(d.qmp_sock))
        try:
            return await body(client)
        finally:
            await client.disconnect()
    return asyncio.run(main())


def connect(uri):
    """A libnbd handle connected to `uri`, which may name a certificate directory
    (tls-certificates=), a local file libnbd reads only when allowed to."""
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(uri)
    assert h.get_tls_negotiated() == uri.startswith("nbds")
    return h


def complete_all(h, cookies):
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)


# --- 1. the soak --------------------------------------------------------------

REGION = 8 * MIB


class Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.written = 0
        self.verified = 0
        self.max_batch = 0.0

    def add(self, requests=0, written=0, verified=0, batch=0.0):
        with self.lock:
            self.requests += requests
            self.written += written
            self.verified += verified
            self.max_batch = max(self.max_batch, batch)


class Buffers:
    """nbd.Buffer objects reused across requests. libnbd 1.14's Python
    aio_pread/aio_pwrite leak every buffer passed to them (about 1 KiB per
    KiB transferred: the first soak was OOM-killed at 21 GiB), so each batch
    slot and length has one buffer for the whole run."""

    def __init__(self):
        self._bufs = {}

    def get(self, kind, slot, length):
        key = (kind, slot, length)
        if key not in self._bufs:
            ba = bytearray(length)
            self._bufs[key] = (ba, nbd.Buffer.from_buffer(ba))
        return self._bufs[key]


def soak_client(uri, index, nconns, stop, model, counters, errors):
    """Owns [index*REGION, (index+1)*REGION). Batches of writes (some FUA),
    write-zeroes, flushes and reads spread over its connections; every read
    is checked against `model` (this client's region)."""
    rng = random.Random(1000 + index)
    base = index * REGION
    handles = []
    bufs = Buffers()
    try:
        for _ in range(nconns):
            h = connect(uri)
            assert h.can_multi_conn()
            handles.append(h)
        while not stop.is_set():
            began = time.monotonic()
            # Up to 8 non-overlapping extents, 4 KiB .. 256 KiB each.
            extents = []
            for _ in range(rng.randint(1, 8)):
                length = rng.choice([1, 1, 2, 4, 16, 64]) * BLOCK
                off = rng.randrange(0, (REGION - length) // BLOCK + 1) * BLOCK
                if all(off + length <= o or o + n <= off for o, n in extents):
                    extents.append((off, length))
            cookies = {id(h): [] for h in handles}
            requests = written = 0
            for i, (off, length) in enumerate(extents):
                h = handles[(i + rng.randrange(nconns)) % nconns]
                if rng.random() < 0.1:
                    cookies[id(h)].append(h.aio_zero(length, base + off))
                    model[off:off + length] = bytes(length)
                else:
                    data = rng.randbytes(length)
                    flags = nbd.CMD_FLAG_FUA if rng.random() < 0.3 else 0
                    ba, buf = bufs.get("w", i, length)
                    ba[:] = data
                    cookies[id(h)].append(h.aio_pwrite(buf, base + off, flags=flags))
                    model[off:off + length] = data
                requests += 1
                written += length
            for h in handles:
                complete_all(h, cookies[id(h)])
            if rng.random() < 0.2:
                rng.choice(handles).flush()
                requests += 1
            # Read back through other connections than the writers, plus a random range.
            reads = list(extents) + [(rng.randrange(0, REGION // BLOCK - 64) * BLOCK, 64 * BLOCK)]
            pending = []
            for i, (off, length) in enumerate(reads):
                h = handles[(i + 1) % nconns]
                ba, buf = bufs.get("r", i, length)
                pending.append((h, h.aio_pread(buf, base + off), ba, off, length))
            for h in handles:
                complete_all(h, [c for hh, c, *_ in pending if hh is h])
            for _, _, got, off, length in pending:
                if got != model[off:off + length]:
                    raise AssertionError(f"client {index}: mismatch at {base + off:#x}+{length}")
                requests += 1
            counters.add(requests, written, sum(n for *_, n in pending), time.monotonic() - began)
        handles[0].flush()
    except Exception as e:  # reported by the test thread
        errors.append(f"client {index}: {e!r}")
    finally:
        for h in handles:
            try:
                h.shutdown()
            except nbd.Error:
                pass
        handles.clear()  # the last reference: libnbd closes the socket


def churn(d, uri, tmp_path, stop, tally, errors):
    """Adds and removes nodes and exports over QMP until `stop`, with a client
    (connecting to `uri(name)`) on each export; most removals are hard with the
    client still attached."""

    async def one_round(q, i, rng):
        file_node = i % 2 == 0
        node, exp = f"churn-node{i}", f"churn{i}"
        if file_node:
            img = tmp_path / f"churn{i % 3}.img"
            content = bytearray(rng.randbytes(4 * MIB))
            img.write_bytes(content)
            await q.execute("blockdev-add", {"driver": "file", "node-name": node, "filename": str(img)})
        else:
            await q.execute("blockdev-add", {"driver": "null-co", "node-name": node,
                                             "size": 16 * MIB, "read-zeroes": True})
        tally["nodes_added"] += 1
        await q.execute("block-export-add", {"type": "nbd", "id": exp, "node-name": node,
                                             "name": exp, "writable": file_node})
        tally["exports_added"] += 1
        listener = EventListener(("BLOCK_EXPORT_DELETED",))
        with q.listen(listener):
            if i % 5 == 4:
                # No client: a safe removal completes before the command returns.
                await q.execute("block-export-del", {"id": exp})
                events = listener.clear()  # already heard, before the return
                assert [e["data"] for e in events] == [{"id": exp}]
            else:
                def use():
                    h = connect(uri(exp))
                    off = rng.randrange(0, 4 * MIB // BLOCK - 16) * BLOCK
                    if file_node:
                        assert h.pread(64 * 1024, off) == content[off:off + 64 * 1024]
                        data = rng.randbytes(64 * 1024)
                        h.pwrite(data, off, nbd.CMD_FLAG_FUA)
                        content[off:off + len(data)] = data
                        assert h.pread(64 * 1024, off) == data
                    else:
                        assert h.pread(64 * 1024, off) == bytes(64 * 1024)
                    return h
                h = await asyncio.to_thread(use)
                with pytest.raises(ExecuteError):
                    await q.execute("block-export-del", {"id": exp})  # safe: in use
                with pytest.raises(ExecuteError):
                    await q.execute("blockdev-del", {"node-name": node})  # exported
                await q.execute("block-export-del", {"id": exp, "mode": "hard"})
                event = await asyncio.wait_for(listener.get(), 10)
                assert event["data"] == {"id": exp}
                try:
                    with pytest.raises(nbd.Error):
                        await asyncio.to_thread(h.pread, 512, 0)
                finally:
                    del h  # the last reference: libnbd closes the socket
                tally["hard_removals_with_client"] += 1
        tally["exports_removed"] += 1
        await q.execute("blockdev-del", {"node-name": node})
        tally["nodes_removed"] += 1
        if file_node:
            assert img.read_bytes() == content, f"churn export {exp}: image differs"

    async def body(q):
        rng = random.Random(99)
        i = 0
        while not stop.is_set():
            await one_round(q, i, rng)
            i += 1
            await asyncio.sleep(0.05)

    try:
        qmp_run(d, body)
    except Exception as e:
        errors.append(f"churn: {e!r}")


class SoakSetup:
    """How the soak's daemon serves: over what transport, from what image."""

    def __init__(self, start, tmp_path, transport, fmt, size):
        self.fmt = fmt
        self.img = tmp_path / f"soak.{fmt}"
        if fmt == "qcow2":
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.img), str(size)],
                           check=True)
            blockdevs = [f"driver=qcow2,node-name=soak0,file.driver=file,file.filename={self.img}"]
            exports = ["type=nbd,id=exp-soak0,node-name=soak0,name=soak,writable=on"]
        else:
            blockdevs, exports = file_export(make_image(self.img, size), name="soak", node="soak0")
        objects, server_extra, self.certs = [], "", None
        if transport == "tls":
            need("openssl")
            (tmp_path / "pki").mkdir()
            pki = make_pki(tmp_path / "pki")
            objects = [f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server"]
            server_extra, self.certs = ",tls-creds=tls0", pki["one"]
        self.d = start(blockdevs, exports, server_extra=server_extra, tcp=transport != "unix",
                       objects=objects)

    def uri(self, name):
        if self.certs is None:
            return self.d.uri(name)
        return f"nbds://127.0.0.1:{self.d.port}/{name}?tls-certificates={self.certs}"

    def read_image(self, tmp_path):
        """The exported image's guest content, read without bexd. A qcow2 image
        is read once bexd has exited (it holds the image lock), after `qemu-img
        check` found it clean: no corruption and no leaked cluster."""
        if self.fmt == "raw":
            return self.img.read_bytes()
        assert self.d.stop() == 0
        r = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(self.img)],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"qemu-img check: {r.returncode} {r.stdout} {r.stderr}"
        raw = tmp_path / "soak-content.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(self.img), str(raw)],
                       check=True)
        return raw.read_bytes()


# (transport, format, default seconds): the unix/raw soak is the long one in CI.
SOAK_VARIANTS = [("unix", "raw", 45), ("tcp", "raw", 15), ("tls", "raw", 15), ("unix", "qcow2", 15)]


@pytest.mark.parametrize("transport,fmt,default_seconds", SOAK_VARIANTS,
                         ids=[f"{t}-{f}" for t, f, _ in SOAK_VARIANTS])
def test_soak_verified_io_while_exports_come_and_go(start, tmp_path, transport, fmt, default_seconds):
    seconds = float(os.environ.get("BEXD_SOAK_SECONDS", default_seconds))
    nclients = 8
    setup = SoakSetup(start, tmp_path, transport, fmt, nclients * REGION)
    d = setup.d
    pid = d.proc.pid

    async def initial(q):
        return (await q.execute("query-block-exports"),
                sorted(n["node-name"] for n in await q.execute("query-named-block-nodes")))
    fds0, rss0, threads0 = stats(pid)  # before any QMP connection
    exports0, nodes0 = qmp_run(d, initial)
    sampler = Sampler(pid)

    stop = threading.Event()
    models = [bytearray(REGION) for _ in range(nclients)]
    counters, errors = Counters(), []
    tally = dict.fromkeys(["nodes_added", "nodes_removed", "exports_added", "exports_removed",
                           "hard_removals_with_client"], 0)
    threads = [threading.Thread(target=soak_client, name=f"client{i}",
                                args=(setup.uri("soak"), i, 2 + i % 3, stop, models[i], counters, errors))
               for i in range(nclients)]
    threads.append(threading.Thread(target=churn, name="churn",
                                    args=(d, setup.uri, tmp_path, stop, tally, errors)))
    began = time.monotonic()
    for t in threads:
        t.start()
    next_report = began + 30
    while time.monotonic() - began < seconds and not errors:
        time.sleep(0.2)
        if time.monotonic() > next_report:  # progress, for long runs (-s)
            next_report += 30
            print(f"\n{time.monotonic() - began:.0f} s: {counters.requests} requests, "
                  f"{counters.verified} bytes verified, {tally['exports_added']} exports; "
                  f"fds/RSS/threads now {stats(pid)}, peak {sampler.peak}; "
                  f"test process RSS {status(os.getpid(), 'VmRSS')} KiB", flush=True)
    stop.set()
    join_by = time.monotonic() + 60
    for t in threads:
        t.join(max(0, join_by - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"soak threads did not finish: {stuck}; errors: {errors}"
    elapsed = time.monotonic() - began
    assert not errors, errors
    assert d.alive()

    fds_back_to(pid, fds0)
    # Idle blocking-pool threads exit after tokio's 10 s keep-alive.
    wait_until(lambda: stats(pid)[2] <= threads0, timeout=30, what="threads to return to baseline")
    peak_fds, peak_rss, peak_threads = sampler.stop()
    fds1, rss1, threads1 = stats(pid)
    exports1, nodes1 = qmp_run(d, initial)

    content = setup.read_image(tmp_path)
    for i, model in enumerate(models):
        assert content[i * REGION:(i + 1) * REGION] == model, f"client {i}: image differs from the model"

    print(f"\nsoak {transport}/{fmt} {elapsed:.0f} s: {counters.requests} requests, {counters.written} bytes written, "
          f"{counters.verified} bytes read and verified, slowest batch {counters.max_batch * 1000:.0f} ms; "
          f"{tally}; fds {fds0} -> peak {peak_fds} -> {fds1}; RSS {rss0} -> peak {peak_rss} -> "
          f"{rss1} KiB; threads {threads0} -> peak {peak_threads} -> {threads1}")
    assert counters.verified > 0 and tally["hard_removals_with_client"] > 0
    assert exports1 == exports0 and nodes1 == nodes0
    assert peak_rss - rss0 < 128 * 1024, f"RSS grew by {peak_rss - rss0} KiB"
    # A blocking-pool thread per request in flight at most (9 per client), not per request
    # made, and never more than the pool's 64.
    assert peak_threads <= threads0 + min(9 * nclients, 64), f"{peak_threads} threads"
    # Drift after the run (allocator caches, the IoBuf pool) stays small.
    assert rss1 - rss0 < 64 * 1024, f"RSS still {rss1 - rss0} KiB above baseline"


# --- 2. thousands of connections stalled in the handshake ---------------------

OPT_MAGIC = 0x49484156454F5054


def stalled(path, how):
    """A connection that stops somewhere in the handshake and then says nothing."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)  # a full backlog would block connect
    s.connect(str(path))
    if how == 1:
        s.sendall(struct.pack(">I", 3))  # client flags only
    elif how == 2:
        s.sendall(struct.pack(">I", 3) + struct.pack(">QI", OPT_MAGIC, 7))  # half an option header
    return s


def verifying_client(uri, stop, latencies, errors, size):
    """Writes a fresh pattern, reads it back, checks it; records each round trip."""
    rng = random.Random(5)
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        while not stop.is_set():
            off = rng.randrange(0, size // BLOCK - 16) * BLOCK
            data = rng.randbytes(64 * 1024)
            t = time.monotonic()
            h.pwrite(data, off)
            got = h.pread(len(data), off)
            latencies.append(time.monotonic() - t)
            if got != data:
                raise AssertionError(f"mismatch at {off:#x}")
        h.shutdown()
        del h
    except Exception as e:
        errors.append(repr(e))


def eof_after_greeting(s):
    """True once the server has closed: whatever bytes it sent, then EOF (or
    ECONNRESET: AF_UNIX reports that when the server closed with our bytes unread)."""
    s.settimeout(5)
    try:
        while s.recv(1 << 16):
            pass
        return True
    except ConnectionResetError:
        return True
    except (socket.timeout, OSError):
        return False


def test_thousands_of_stalled_handshakes_unlimited_connections(tmp_path):
    """2000 connections stall in the handshake (max-connections=0). bexd starts
    with a soft fd limit of 1024 and must raise it to accept them all; a good
    client keeps its latency; the stalled ones are dropped after
    handshake-max-seconds=2 and every fd comes back."""
    n = 2000
    raise_own_nofile(n + 200)
    img = make_image(tmp_path / "disk.img", 64 * MIB)
    d = start_with_soft_nofile(tmp_path, 1024, *file_export(img),
                               server_extra=",max-connections=0,handshake-max-seconds=2")
    try:
        pid = d.proc.pid
        assert nofile_soft_limit(pid) >= n + 100, "bexd did not raise its RLIMIT_NOFILE soft limit"
        stop, latencies, errors = threading.Event(), [], []
        good = threading.Thread(target=verifying_client,
                                args=(d.uri("disk"), stop, latencies, errors, 64 * MIB))
        good.start()
        wait_until(lambda: len(latencies) > 10, what="the good client to run")
        fds0, rss0, threads0 = stats(pid)  # with the good client connected
        sampler = Sampler(pid)
        before = len(latencies)
        began = time.monotonic()
        socks = [stalled(d.sock, i % 3) for i in range(n)]
        # All of them accepted and held (the good client holds one more fd).
        wait_until(lambda: stats(pid)[0] >= fds0 + n, timeout=10, what="all stalled clients accepted")
        held = time.monotonic() - began
        during = len(latencies)
        # handshake-max-seconds=2: all dropped soon after.
        fds_back_to(pid, fds0, timeout=15, what="stalled clients dropped")
        dropped = time.monotonic() - began
        stop.set()
        good.join(30)
        assert not errors, errors
        peak_fds, peak_rss, peak_threads = sampler.stop()
        closed = sum(eof_after_greeting(s) for s in socks)
        for s in socks:
            s.close()
        fds_back_to(pid, fds0 - 1, what="the good client's fd to close")
        lat = sorted(latencies[before:])
        p50, worst = lat[len(lat) // 2], lat[-1]
        print(f"\n{n} stalled: accepted in {held:.2f} s, all dropped {dropped:.2f} s after the first connect; "
              f"fds {fds0} -> peak {peak_fds}; RSS {rss0} -> peak {peak_rss} KiB; threads {threads0} -> "
              f"peak {peak_threads}; good client {len(lat)} verified round trips, p50 {p50 * 1000:.1f} ms, "
              f"max {worst * 1000:.1f} ms")
        assert closed == n, f"only {closed} of {n} stalled clients were closed by the server"
        assert during > before, "the good client made no progress while the stalled clients were held"
        assert worst < 2.0, f"a round trip took {worst:.2f} s"
        assert dropped < 2 + 10
        assert peak_rss - rss0 < 128 * 1024, f"RSS grew by {peak_rss - rss0} KiB"
        assert peak_threads <= threads0 + 16
        assert d.alive()
    finally:
        assert d.stop() == 0


def test_stalled_handshakes_do_not_lock_out_a_good_client_for_ever(start, image):
    """Default max-connections=100: 150 stalled clients fill every slot; the
    good client waits in the backlog and gets in once they time out."""
    d = start(*file_export(image(16 * MIB)), server_extra=",handshake-max-seconds=2")
    pid = d.proc.pid
    fds0 = settled_fds(pid)
    socks = [stalled(d.sock, i % 3) for i in range(150)]
    wait_until(lambda: stats(pid)[0] >= fds0 + 100, what="100 stalled clients accepted")
    time.sleep(0.3)
    assert stats(pid)[0] == fds0 + 100, "more than max-connections clients accepted"
    began = time.monotonic()
    h = nbd.NBD()
    h.connect_uri(d.uri("disk"))  # waits in the backlog behind the stalled ones
    waited = time.monotonic() - began
    h.pwrite(b"ok" * 2048, 0)
    assert h.pread(4096, 0) == b"ok" * 2048
    print(f"\ngood client got in after {waited:.2f} s")
    assert 1.0 < waited < 10, f"good client waited {waited:.2f} s"
    h.shutdown()
    del h
    assert sum(eof_after_greeting(s) for s in socks) == 150
    for s in socks:
        s.close()
    fds_back_to(pid, fds0)


# --- 3. clients that vanish in the middle of a reply --------------------------

def test_clients_that_disconnect_mid_reply(start, tmp_path):
    """8 threads x 5 clients that each send 32 READs of 1 MiB, read half of the
    replies and close (some with RST): the daemon survives, a verifying client
    is unaffected, and every fd comes back."""
    size = 64 * MIB
    img = make_image(tmp_path / "disk.img", size)
    with open(img, "r+b") as f:
        f.write(random.Random(3).randbytes(size))
    d = start(*file_export(img))
    pid = d.proc.pid
    fds0, rss0, _ = stats(pid)
    sampler = Sampler(pid)
    stop, latencies, errors = threading.Event(), [], []
    good = threading.Thread(target=verifying_client, args=(d.uri("disk"), stop, latencies, errors, size))
    good.start()
    wait_until(lambda: len(latencies) > 5, what="the good client to run")
    total = 32 * (16 + MIB)
    vanish_errors = []

    def vanisher(k):
        try:
            for rnd in range(5):
                s = raw_client(d.sock)
                reqs = b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, rnd * 100 + i,
                                            ((k * 7 + i) * MIB) % size, MIB) for i in range(32))
                s.sendall(reqs)
                got = 0
                while got < total // 2:
                    chunk = s.recv(min(1 << 16, total // 2 - got))
                    assert chunk, "server closed first"
                    got += len(chunk)
                if rnd % 2:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
        except Exception as e:
            vanish_errors.append(repr(e))

    vanishers = [threading.Thread(target=vanisher, args=(k,)) for k in range(8)]
    for t in vanishers:
        t.start()
    for t in vanishers:
        t.join(60)
    stop.set()
    good.join(30)
    assert not errors, errors
    assert not vanish_errors, vanish_errors
    assert d.alive()
    fds_back_to(pid, fds0, what="fds of the vanished clients to close")
    peak_fds, peak_rss, _ = sampler.stop()
    h = nbd.NBD()
    h.connect_uri(d.uri("disk"))
    assert h.pread(4096, 0) == open(img, "rb").read(4096)
    del h
    rss1 = stats(pid)[1]
    print(f"\n8 x 5 clients vanished mid-reply: fds {fds0} -> peak {peak_fds} -> {stats(pid)[0]}; "
          f"RSS {rss0} -> peak {peak_rss} -> {rss1} KiB")
    # Each connection may pin its 64 MiB in-flight budget (here 32 MiB of reads), no more.
    assert peak_rss - rss0 < 8 * 64 * 1024 + 64 * 1024, f"RSS grew by {peak_rss - rss0} KiB"
    # The abandoned replies' read buffers (256 MiB of them) are released; the IoBuf pool
    # keeps at most 64 parked buffers (here 1 MiB each) for reuse.
    assert rss1 - rss0 < 64 * 1024 + 32 * 1024, f"RSS still {rss1 - rss0} KiB above baseline"


def flood_unread(path, count=2000):
    """A client that pipelines 1 MiB READs and never reads a reply."""
    s = raw_client(path)
    s.setblocking(False)
    request = struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 0, MIB)
    sent, deadline = 0, time.monotonic() + 3
    while sent < count and time.monotonic() < deadline:
        try:
            s.send(request)
            sent += 1
        except BlockingIOError:
            time.sleep(0.01)
    return s


def test_hard_removal_drops_a_client_that_does_not_read_replies(start, image):
    """block-export-del mode=hard must not wait for a client that stopped
    reading (the server's reply writer is blocked on a full socket): QEMU
    shuts the socket down; the export goes away and the event arrives."""
    d = start(*file_export(image(64 * MIB)))
    pid = d.proc.pid
    fds0 = stats(pid)[0]
    s = flood_unread(d.sock)
    time.sleep(0.5)

    async def body(q):
        listener = EventListener(("BLOCK_EXPORT_DELETED",))
        with q.listen(listener):
            began = time.monotonic()
            await q.execute("block-export-del", {"id": "exp-disk0", "mode": "hard"})
            event = await asyncio.wait_for(listener.get(), 10)
            took = time.monotonic() - began
        await q.execute("blockdev-del", {"node-name": "disk0"})
        return event, took, await q.execute("query-block-exports")

    event, took, exports = qmp_run(d, body)
    print(f"\nhard removal with an unread client took {took:.2f} s")
    assert event["data"] == {"id": "exp-disk0"} and exports == []
    assert eof_after_greeting(s)
    s.close()
    fds_back_to(pid, fds0 - 1)  # the image's fd is gone too


def test_sigterm_with_a_client_that_does_not_read_replies_exits_promptly(start, image):
    d = start(*file_export(image(64 * MIB)))
    s = flood_unread(d.sock)
    time.sleep(0.5)
    began = time.monotonic()
    assert d.stop() == 0
    took = time.monotonic() - began
    s.close()
    print(f"\nSIGTERM with an unread client: exit after {took:.2f} s")
    assert took < 10, f"exit took {took:.2f} s"


def test_small_requests_are_bounded_by_the_per_connection_request_budget(start, image):
    """8 clients pipeline 512-byte READs and never read a reply. The budget is
    256 requests and 64 MiB per connection; each request pins at least a 4 KiB
    buffer and its task, so 8 such clients must stay well under 64 MiB."""
    d = start(*file_export(image(64 * MIB)), server_extra=",max-connections=0")
    pid = d.proc.pid
    rss0, threads0 = stats(pid)[1], stats(pid)[2]
    request = struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 0, 512)
    socks = []
    for _ in range(8):
        s = raw_client(d.sock)
        s.setblocking(False)
        sent, idle_since = 0, time.monotonic()
        while sent < 40000 and time.monotonic() - idle_since < 0.5:
            try:
                s.send(request * 64)
                sent += 64
                idle_since = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        socks.append(s)
    time.sleep(0.5)
    _, rss1, threads1 = stats(pid)
    good = nbd.NBD()
    good.connect_uri(d.uri("disk"))
    assert good.pread(4096, 0) == bytes(4096)
    del good
    print(f"\n8 clients x unread 512-byte READs: RSS {rss0} -> {rss1} KiB, threads {threads0} -> {threads1}")
    for s in socks:
        s.close()
    assert rss1 - rss0 < 64 * 1024, f"RSS grew by {rss1 - rss0} KiB"


# --- 4. the blocking pool -----------------------------------------------------

def test_blocking_pool_stops_at_64_threads_under_hundreds_of_waiting_requests(start, tmp_path):
    """8 connections keep 192 requests each in flight on an image on disk: 16 KiB
    FUA writes (each waits for the disk) and flushes. A file not on tmpfs runs every
    write and flush on the blocking pool, and tokio alone would start a thread
    for each request that finds none idle, up to 512; bexd's pool stops at 64,
    as QEMU's does, and the rest queue. Every write reads back, and the threads
    go back to the baseline once idle."""
    nconns, depth, length = 8, 192, 16 * 1024
    size = nconns * depth * length
    img = make_image(tmp_path / "disk.img", size)
    d = start(*file_export(img))
    pid = d.proc.pid
    threads0 = stats(pid)[2]
    sampler = Sampler(pid)
    rng = random.Random(7)
    handles = []
    for _ in range(nconns):
        h = nbd.NBD()
        h.connect_uri(d.uri("disk"))
        handles.append(h)
    model = bytearray(size)
    bufs = Buffers()
    for _ in range(4):
        cookies = {}
        for c, h in enumerate(handles):
            cookies[c] = []
            for i in range(depth):
                if i % 8 == 7:
                    cookies[c].append(h.aio_flush())
                    continue
                off = (c * depth + i) * length
                ba, buf = bufs.get("w", (c, i), length)
                ba[:] = rng.randbytes(length)
                model[off:off + length] = ba
                cookies[c].append(h.aio_pwrite(buf, off, flags=nbd.CMD_FLAG_FUA))
        for c, h in enumerate(handles):
            complete_all(h, cookies[c])
    for c, h in enumerate(handles):
        off = c * depth * length
        assert h.pread(depth * length, off) == model[off:off + depth * length], f"connection {c}"
        h.shutdown()
    handles.clear()
    peak_threads = sampler.stop()[2]
    wait_until(lambda: stats(pid)[2] <= threads0, timeout=30, what="threads to return to baseline")
    print(f"\n{nconns} x {depth} requests in flight: threads {threads0} -> peak {peak_threads}")
    assert peak_threads <= threads0 + 64, f"{peak_threads} threads"


# --- 5. the server-wide payload budget ----------------------------------------

def settled_rss(pid, quiet=0.5, timeout=20.0):
    """VmRSS once it has moved by less than 1 MiB for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last, since = stats(pid)[1], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = stats(pid)[1]
        if abs(now - last) >= 1024:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def test_flooding_clients_are_bounded_by_the_server_wide_budget(start, image, monkeypatch):
    """16 clients pipeline 1 MiB READs and never read a reply. Each may hold its
    own 64 MiB budget, 1 GiB in all, but the server-wide budget (128 MiB here,
    the server's x-payload-budget) stops their readers once it is spent: RSS
    stays below it plus the 2 MiB each connection may use when it has nothing
    else in flight. A client that sends one request at a time keeps its
    verified writes and reads going, and the flooders' fds come back. (With
    the default budget of 1 GiB, RSS would grow past the bound checked.)"""
    monkeypatch.delenv("BEXD_NBD_PAYLOAD_BUDGET_MIB", raising=False)
    size = 64 * MIB
    d = start(*file_export(image(size)),
              server_extra=",max-connections=0,x-payload-budget=128M")
    pid = d.proc.pid
    stop, latencies, errors = threading.Event(), [], []
    good = threading.Thread(target=verifying_client, args=(d.uri("disk"), stop, latencies, errors, size))
    good.start()
    wait_until(lambda: len(latencies) > 5, what="the good client to run")
    fds0, rss0, _ = stats(pid)  # with the good client connected
    sampler = Sampler(pid)
    socks = [flood_unread(d.sock, count=80) for _ in range(16)]  # 80 MiB each, more than 64
    # The budget is spent: RSS stops growing (the flooders' readers wait).
    wait_until(lambda: stats(pid)[1] - rss0 > 100 * 1024, timeout=20, what="the flood to fill the budget")
    settled_rss(pid)
    before = len(latencies)
    wait_until(lambda: len(latencies) > before + 20, timeout=20,
               what="the good client to make progress while the budget is spent")
    stop.set()
    good.join(30)
    assert not errors, errors
    peak_fds, peak_rss, _ = sampler.stop()
    for s in socks:
        s.close()
    fds_back_to(pid, fds0, what="the flooders' fds to close")
    print(f"\n16 flooding clients, budget 128 MiB: RSS {rss0} -> peak {peak_rss} KiB, fds {fds0} -> "
          f"peak {peak_fds}; good client {len(latencies) - before} verified round trips while it was spent")
    assert peak_rss - rss0 < (128 + 16 * 2 + 48) * 1024, f"RSS grew by {peak_rss - rss0} KiB"
    assert d.alive()


def test_requests_larger_than_the_server_wide_budget_still_complete(start, tmp_path, monkeypatch):
    """A budget of 8 MiB (BEXD_NBD_PAYLOAD_BUDGET_MIB=8) and four clients
    pipelining reads and writes of up to 32 MiB: a request larger than what is
    left waits for the others to finish (one larger than the whole budget takes
    all of it), and every request completes with the right data."""
    monkeypatch.setenv("BEXD_NBD_PAYLOAD_BUDGET_MIB", "8")
    size = 4 * 32 * MIB
    img = make_image(tmp_path / "disk.img", size)
    model = bytearray(random.Random(11).randbytes(size))
    img.write_bytes(model)
    d = start(*file_export(img))
    errors = []

    def client(k):
        """Reads its 32 MiB region in requests of one size, all in flight at
        once, checks them, then rewrites the region's first request."""
        try:
            h = nbd.NBD()
            h.connect_uri(d.uri("disk"))
            base = k * 32 * MIB
            length = [32 * MIB, 4 * MIB, 1 * MIB, 64 * 1024][k]
            bufs = [nbd.Buffer(length) for _ in range(32 * MIB // length)]
            for rnd in range(3):
                cookies = [h.aio_pread(b, base + i * length) for i, b in enumerate(bufs)]
                complete_all(h, cookies)
                for i, b in enumerate(bufs):
                    off = base + i * length
                    assert b.to_bytearray() == model[off:off + length], f"client {k}: read at {off:#x}"
                data = random.Random(k * 10 + rnd).randbytes(length)
                h.pwrite(data, base)
                model[base:base + length] = data
            h.shutdown()
        except Exception as e:
            errors.append(f"client {k}: {e!r}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client is stuck"
    assert not errors, errors
    assert img.read_bytes() == model
