"""`--object main-loop` (thread-pool-max sizes the pool where driver calls that may wait run)
and the NBD server's `x-payload-budget`: configuration a user can see, where the first version
read environment variables."""

import asyncio
import subprocess
import threading
import time

import nbd
import pytest

from conftest import daemon_binary, proc_status, qmp_outcome

MIB = 1 << 20
# Every request on this node sleeps 200 ms in a driver call, so it holds a pool thread.
SLOW_NODE = "driver=null-co,node-name=slow,size=67108864,read-zeroes=on,latency-ns=200000000"
SLOW_EXPORT = "type=nbd,id=e0,node-name=slow,name=slow"


def threads_of(pid):
    return proc_status(pid, "Threads")


def peak_threads_under_load(d, in_flight=24):
    """The process's thread count before, and at its peak while `in_flight` slow reads run."""
    idle = threads_of(d.proc.pid)
    peak, done = [idle], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], threads_of(d.proc.pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    h = nbd.NBD()
    h.connect_uri(d.uri("slow"))
    try:
        bufs = [nbd.Buffer(4096) for _ in range(in_flight)]
        cookies = [h.aio_pread(b, i * 4096) for i, b in enumerate(bufs)]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            assert h.aio_command_completed(c)
    finally:
        done.set()
        sampler.join()
        h.shutdown()
    return idle, peak[0]


@pytest.mark.bexd_only("counts bexd's pool threads; QEMU's null-co sleeps on a timer, "
                       "not in a pool thread, so its count would not move")
def test_thread_pool_max_caps_the_threads_that_run_driver_calls(start):
    limited = start([SLOW_NODE], [SLOW_EXPORT], which="bexd",
                    objects=["main-loop,id=ml0,thread-pool-max=3"])
    idle, peak = peak_threads_under_load(limited)
    assert peak - idle <= 3, f"thread-pool-max=3, but threads went {idle} -> {peak}"
    assert limited.stop() == 0  # the next daemon takes the same socket paths
    # Without the object the same load spreads over many more threads (the default is 64),
    # so the check above is not met by accident.
    default = start([SLOW_NODE], [SLOW_EXPORT], which="bexd")
    idle, peak = peak_threads_under_load(default)
    assert peak - idle >= 10, f"default pool: threads went {idle} -> {peak}"


@pytest.mark.bexd_only("bexd builds its pool with the process; QEMU resizes its own at run time")
def test_main_loop_from_qmp_is_refused_not_ignored(start):
    d = start([SLOW_NODE], [SLOW_EXPORT], which="bexd")
    outcome = asyncio.run(qmp_outcome(d.qmp_sock, "object-add",
                                      {"qom-type": "main-loop", "id": "ml1",
                                       "thread-pool-max": 4}))
    assert outcome[0] == "GenericError"
    assert "only be created on the command line" in outcome[1]
    for member in ("thread-pool-min", "aio-max-batch"):
        bad = subprocess.run(daemon_binary("bexd") + ["--object", f"main-loop,id=m,{member}=2"],
                             capture_output=True, text=True, timeout=10)
        assert bad.returncode == 1
        assert f"{member} is not supported by bexd" in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


@pytest.mark.parametrize("which", ["bexd", "qsd"])
def test_main_loop_rules_are_qemus(start, which):
    """One main-loop, never deleted, range-checked: the same errors from both daemons."""
    d = start([SLOW_NODE], [SLOW_EXPORT], which=which,
              objects=["main-loop,id=ml0,thread-pool-max=8"])
    second = asyncio.run(qmp_outcome(d.qmp_sock, "object-add",
                                     {"qom-type": "main-loop", "id": "ml1"}))
    assert second == ("GenericError", "only one main-loop instance allowed")
    deleted = asyncio.run(qmp_outcome(d.qmp_sock, "object-del", {"id": "ml0"}))
    assert deleted == ("GenericError", "object 'ml0' is in use, can not be deleted")
    negative = asyncio.run(qmp_outcome(d.qmp_sock, "object-add",
                                       {"qom-type": "main-loop", "id": "ml2",
                                        "thread-pool-max": -1}))
    assert negative == ("GenericError",
                        "thread-pool-max value must be in range [0, 9223372036854775807]")
    for bad in ("thread-pool-max=0", "thread-pool-min=4,thread-pool-max=2"):
        r = subprocess.run(daemon_binary(which) + ["--object", f"main-loop,id=m,{bad}"],
                           capture_output=True, text=True, timeout=10)
        assert r.returncode == 1, r.stderr
        assert "bad thread-pool-min/thread-pool-max values" in r.stderr, r.stderr


@pytest.mark.bexd_only("x-payload-budget is bexd's own member")
def test_a_zero_payload_budget_is_refused(tmp_path):
    r = subprocess.run(daemon_binary("bexd") + [
        "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/s,x-payload-budget=0"],
        capture_output=True, text=True, timeout=10)
    assert r.returncode == 1
    assert "x-payload-budget" in r.stderr and "positive" in r.stderr, r.stderr
