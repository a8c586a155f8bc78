"""Jobs and blockdev-backup (issue 19, items 1 and 3), against bexd and qemu-storage-daemon
with the same expectations: the job state machine's events, the job commands' replies and
refusals, backups whose result qemu-img compares with the source as it was when the backup
began, while clients keep writing to the source through its NBD export.

Events are awaited, never assumed to precede a reply: qemu-storage-daemon sends some
transitions (a pause, a cancel) before the command's return, bexd after it.
"""

import asyncio
import random
import shutil
import subprocess

import pytest

from conftest import Daemon, need

MIB = 1 << 20
SIZE = 32 * MIB


def qemu_img(*args):
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def qemu_io(uri, *commands, fmt="raw"):
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    r = subprocess.run(argv + [uri], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr


def identical(a, b, fa="raw", fb="raw"):
    r = subprocess.run(["qemu-img", "compare", "-f", fa, "-F", fb, str(a), str(b)],
                       capture_output=True, text=True)
    return r.returncode == 0


class Session:
    """A qemu.qmp connection that keeps every event, for tests to wait on."""

    def __init__(self, sock):
        self.sock = sock
        self.events = []
        self.changed = asyncio.Event()

    async def __aenter__(self):
        from qemu.qmp import QMPClient
        self.q = QMPClient("jobs")
        await self.q.connect(str(self.sock))
        self.listener = asyncio.create_task(self._listen())
        return self

    async def __aexit__(self, *exc):
        self.listener.cancel()
        await self.q.disconnect()

    async def _listen(self):
        async for ev in self.q.events:
            self.events.append((ev["event"], ev.get("data", {})))
            self.changed.set()

    async def run(self, command, **args):
        """("ok", return) or (error class, desc)."""
        from qemu.qmp import ExecuteError
        try:
            return ("ok", await self.q.execute(command, args))
        except ExecuteError as e:
            return (e.error.error.class_, e.error.error.desc)

    async def ok(self, command, **args):
        outcome = await self.run(command, **args)
        assert outcome[0] == "ok", (command, args, outcome)
        return outcome[1]

    def mark(self):
        """Where the events stand now, for `wait(since=...)`."""
        return len(self.events)

    async def wait(self, name, timeout=60, since=0, **match):
        """The first event `name` (from index `since` on) whose data has `match`, waiting up
        to `timeout` s for it."""
        async def found():
            while True:
                for ev, data in self.events[since:]:
                    if ev == name and all(data.get(k) == v for k, v in match.items()):
                        return data
                self.changed.clear()
                await self.changed.wait()
        return await asyncio.wait_for(found(), timeout)

    def statuses(self, job):
        return [d["status"] for e, d in self.events if e == "JOB_STATUS_CHANGE" and d["id"] == job]

    def job_events(self, job):
        """The job's BLOCK_JOB_* events and status changes, in order, without progress."""
        out = []
        for e, d in self.events:
            if e == "JOB_STATUS_CHANGE" and d["id"] == job:
                out.append(d["status"])
            elif e.startswith("BLOCK_JOB_") and job in (d.get("device"), d.get("id")):
                out.append(e + (":" + d["error"] if "error" in d else "")
                           + (":" + d["action"] if "action" in d else ""))
        return out


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def disks(tmp_path):
    """A source image with a pattern in every MiB, and an empty target, both raw."""
    need("qemu-img")
    need("qemu-io")
    src = tmp_path / "src.img"
    dst = tmp_path / "dst.img"
    qemu_img("create", "-f", "raw", str(src), str(SIZE))
    qemu_img("create", "-f", "raw", str(dst), str(SIZE))
    cmds = [f"write -P {0x10 + i} {i * MIB} {MIB // 2}" for i in range(SIZE // MIB)]
    qemu_io(str(src), *cmds)
    return src, dst


def nodes(src, dst, target_extra=""):
    return [f"driver=file,node-name=src,filename={src}",
            f"driver=file,node-name=dst,filename={dst}{target_extra}"]


def export_src():
    return ["type=nbd,id=e0,node-name=src,name=src,writable=on"]


def test_full_backup_with_manual_finalize_and_dismiss(start, disks):
    src, dst = disks
    d = start(nodes(src, dst), [])

    async def body():
        async with Session(d.qmp_sock) as s:
            await s.ok("blockdev-backup", **{"job-id": "j1", "device": "src", "target": "dst",
                                             "sync": "full", "auto-finalize": False,
                                             "auto-dismiss": False})
            await s.wait("BLOCK_JOB_PENDING", id="j1")
            [job] = await s.ok("query-jobs")
            assert job == {"id": "j1", "type": "backup", "status": "pending",
                           "current-progress": SIZE, "total-progress": SIZE}
            [bjob] = await s.ok("query-block-jobs")
            assert bjob == {"type": "backup", "device": "j1", "len": SIZE, "offset": SIZE,
                            "busy": False, "paused": False, "speed": 0, "io-status": "ok",
                            "ready": False, "status": "pending", "auto-finalize": False,
                            "auto-dismiss": False}
            assert await s.run("job-dismiss", id="j1") == (
                "GenericError", "Job 'j1' in state 'pending' cannot accept command verb 'dismiss'")
            assert await s.run("job-complete", id="j1") == (
                "GenericError", "Job 'j1' in state 'pending' cannot accept command verb "
                "'complete'")
            await s.ok("job-finalize", id="j1")
            await s.wait("JOB_STATUS_CHANGE", id="j1", status="concluded")
            assert await s.run("job-finalize", id="j1") == (
                "GenericError", "Job 'j1' in state 'concluded' cannot accept command verb "
                "'finalize'")
            await s.ok("job-dismiss", id="j1")
            await s.wait("JOB_STATUS_CHANGE", id="j1", status="null")
            assert await s.ok("query-jobs") == []
            assert s.job_events("j1") == [
                "created", "running", "paused", "running", "waiting", "pending",
                "BLOCK_JOB_PENDING", "BLOCK_JOB_COMPLETED", "concluded", "null"]
            completed = await s.wait("BLOCK_JOB_COMPLETED", device="j1")
            assert completed == {"type": "backup", "device": "j1", "len": SIZE, "offset": SIZE,
                                 "speed": 0}
    run(body())
    assert identical(src, dst)


def test_pause_resume_speed_and_cancel(start, disks):
    src, dst = disks
    d = start(nodes(src, dst), [])

    async def body():
        async with Session(d.qmp_sock) as s:
            await s.ok("blockdev-backup", **{"job-id": "j1", "device": "src", "target": "dst",
                                             "sync": "full", "speed": MIB})
            started = s.mark()
            await s.ok("job-pause", id="j1")
            await s.wait("JOB_STATUS_CHANGE", id="j1", status="paused", since=started)
            assert await s.run("job-pause", id="j1") == ("GenericError",
                                                         "Job is already paused")
            [job] = await s.ok("query-block-jobs")
            assert (job["status"], job["paused"], job["speed"]) == ("paused", True, MIB)
            assert job["offset"] < SIZE and job["len"] == SIZE
            await s.ok("block-job-resume", device="j1")
            assert await s.run("job-resume", id="j1") == (
                "GenericError", "Can't resume a job that was not paused")
            assert await s.run("block-job-set-speed", device="j1", speed=-1) == (
                "GenericError", "Parameter 'speed' expects a non-negative value")
            await s.ok("block-job-set-speed", device="j1", speed=2 * MIB)
            assert await s.run("block-job-complete", device="j1") == (
                "GenericError", "Job 'j1' in state 'running' cannot accept command verb "
                "'complete'")
            assert await s.run("blockdev-del", **{"node-name": "dst"}) == (
                "GenericError", "Node 'dst' is busy: block device is in use by block job: backup")
            assert await s.run("blockdev-del", **{"node-name": "src"}) == (
                "GenericError", "Block device src is in use")
            assert await s.run("job-pause", id="nope") == ("GenericError", "Job not found")
            assert await s.run("block-job-pause", device="nope") == (
                "DeviceNotActive", "Block job 'nope' not found")
            await s.ok("job-cancel", id="j1")
            cancelled = await s.wait("BLOCK_JOB_CANCELLED", device="j1")
            assert cancelled["len"] == SIZE and cancelled["speed"] == 2 * MIB
            await s.wait("JOB_STATUS_CHANGE", id="j1", status="null")
            assert s.statuses("j1") == ["created", "running", "paused", "running", "paused",
                                        "running", "aborting", "concluded", "null"]
            assert await s.ok("query-jobs") == []
    run(body())


# Each: blockdev-backup's arguments and QEMU's refusal.
REFUSALS = [
    ({"device": "src", "target": "dst", "sync": "full"}, "Invalid job ID ''"),
    ({"job-id": "1x", "device": "src", "target": "dst", "sync": "full"}, "Invalid job ID '1x'"),
    ({"job-id": "x", "device": "src", "target": "src", "sync": "full"},
     "Source and target cannot be the same"),
    ({"job-id": "x", "device": "nope", "target": "dst", "sync": "full"},
     "Cannot find device='nope' nor node-name='nope'"),
    ({"job-id": "x", "device": "src", "target": "nope", "sync": "full"},
     "Cannot find device='nope' nor node-name='nope'"),
    ({"job-id": "x", "device": "src", "target": "dst", "sync": "bitmap"},
     "must provide a valid bitmap name for 'bitmap' sync mode"),
    ({"job-id": "x", "device": "src", "target": "dst", "sync": "incremental"},
     "must provide a valid bitmap name for 'incremental' sync mode"),
    ({"job-id": "x", "device": "src", "target": "dst", "sync": "full", "bitmap": "nope"},
     "Bitmap 'nope' could not be found"),
    ({"job-id": "x", "device": "src", "target": "dst", "sync": "incremental", "bitmap": "b0",
      "bitmap-mode": "never"},
     "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"),
    ({"job-id": "x", "device": "src", "target": "dst", "sync": "full", "bitmap-mode": "never"},
     "Cannot specify bitmap sync mode without a bitmap"),
    ({"job-id": "x", "device": "src", "target": "dst", "sync": "bitmap", "bitmap": "b0"},
     "Bitmap sync mode must be given when providing a bitmap"),
    ({"job-id": "x", "device": "src", "target": "dst", "sync": "none", "bitmap": "b0",
      "bitmap-mode": "always"},
     "sync mode 'none' does not produce meaningful bitmap outputs"),
    ({"job-id": "x", "device": "src", "target": "dst", "sync": "full", "bitmap": "b0",
      "bitmap-mode": "never"},
     "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'"),
    ({"job-id": "x", "device": "src", "target": "small", "sync": "full"},
     "Source and target image have different sizes"),
    ({"job-id": "x", "device": "src", "target": "dst", "sync": "full", "compress": True},
     # QEMU names the drive by its device name, which a node of QSD has not.
     "Compression is not supported for this drive "),
    ({"job-id": "x", "device": "src", "target": "dst", "sync": "full",
      "filter-node-name": "src"},
     "Could not create node: Duplicate nodes with node-name='src'"),
]


def test_blockdev_backup_refusals(start, disks, tmp_path):
    src, dst = disks
    small = tmp_path / "small.img"
    qemu_img("create", "-f", "raw", str(small), "1M")
    d = start(nodes(src, dst) + [f"driver=file,node-name=small,filename={small}"], [])

    async def body():
        async with Session(d.qmp_sock) as s:
            await s.ok("block-dirty-bitmap-add", node="src", name="b0")
            got = [await s.run("blockdev-backup", **args) for args, _ in REFUSALS]
            assert got == [("GenericError", text) for _, text in REFUSALS]
            assert await s.ok("query-jobs") == []
            assert [e for e, _ in s.events] == []
    run(body())


def test_transaction_abort_discards_the_backup(start, disks):
    src, dst = disks
    d = start(nodes(src, dst), [])

    async def body():
        async with Session(d.qmp_sock) as s:
            backup = {"type": "blockdev-backup",
                      "data": {"job-id": "j1", "device": "src", "target": "dst",
                               "sync": "full"}}
            assert await s.run("transaction", actions=[backup, {"type": "abort", "data": {}}]) \
                == ("GenericError", "Transaction aborted using Abort action")
            await s.wait("JOB_STATUS_CHANGE", id="j1", status="null")
            assert s.job_events("j1") == ["created", "aborting", "concluded", "null"]
            assert await s.ok("query-jobs") == []
            bitmap_add = {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b"}}
            assert await s.run("transaction", actions=[backup, bitmap_add],
                               properties={"completion-mode": "grouped"}) == (
                "GenericError", "Action 'block-dirty-bitmap-add' does not support transaction "
                "property completion-mode = grouped")
            # A grouped backup: it runs to the end.
            s.events.clear()
            await s.ok("transaction", actions=[backup],
                       properties={"completion-mode": "grouped"})
            await s.wait("JOB_STATUS_CHANGE", id="j1", status="null", timeout=120)
            assert s.job_events("j1") == [
                "created", "running", "paused", "running", "waiting", "pending",
                "BLOCK_JOB_COMPLETED", "concluded", "null"]
    run(body())
    assert identical(src, dst)


def test_target_write_error_report_and_stop(start, disks):
    src, dst = disks
    failing = ",".join(["driver=blkdebug", "node-name=dst", "image.driver=file",
                        f"image.filename={dst}", "inject-error.0.event=pwritev",
                        "inject-error.0.once=on"])
    d = start([f"driver=file,node-name=src,filename={src}", failing], [])

    async def body():
        async with Session(d.qmp_sock) as s:
            await s.ok("blockdev-backup", **{"job-id": "j1", "device": "src", "target": "dst",
                                             "sync": "full", "on-target-error": "stop"})
            error = await s.wait("BLOCK_JOB_ERROR", device="j1")
            assert error == {"device": "j1", "operation": "write", "action": "stop"}
            await s.wait("JOB_STATUS_CHANGE", id="j1", status="paused", since=4)
            [job] = await s.ok("query-block-jobs")
            assert (job["io-status"], job["paused"], job["status"]) == ("failed", True, "paused")
            await s.ok("job-resume", id="j1")
            await s.wait("JOB_STATUS_CHANGE", id="j1", status="null")
            assert s.job_events("j1") == [
                "created", "running", "paused", "running", "BLOCK_JOB_ERROR:stop", "paused",
                "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    run(body())
    assert identical(src, dst)


def test_target_write_error_reported_fails_the_job(start, disks):
    src, dst = disks
    failing = ",".join(["driver=blkdebug", "node-name=dst", "image.driver=file",
                        f"image.filename={dst}", "inject-error.0.event=pwritev"])
    d = start([f"driver=file,node-name=src,filename={src}", failing], [])

    async def body():
        async with Session(d.qmp_sock) as s:
            await s.ok("blockdev-backup", **{"job-id": "j1", "device": "src", "target": "dst",
                                             "sync": "full"})
            await s.wait("JOB_STATUS_CHANGE", id="j1", status="null")
            assert s.job_events("j1") == [
                "created", "running", "paused", "running", "BLOCK_JOB_ERROR:report", "aborting",
                "BLOCK_JOB_COMPLETED:Input/output error", "concluded", "null"]
    run(body())


def bitmaps(nodes_list, node):
    for n in nodes_list:
        if n["node-name"] == node:
            return {b["name"]: b for b in n.get("dirty-bitmaps", [])}
    raise AssertionError(f"no node {node}")


@pytest.mark.parametrize("mode", ["on-success", "never", "always"])
def test_incremental_backup_applies_on_the_full_one(start, disks, tmp_path, mode):
    """A full backup and a bitmap at one instant (transaction), writes from an NBD client,
    then a sync=bitmap backup onto a copy of the full one equals the source."""
    src, dst = disks
    inc = tmp_path / "inc.img"
    d = start(nodes(src, dst), export_src())

    async def body():
        async with Session(d.qmp_sock) as s:
            await s.ok("transaction", actions=[
                {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b0"}},
                {"type": "blockdev-backup", "data": {"job-id": "full", "device": "src",
                                                     "target": "dst", "sync": "full"}}])
            await s.wait("JOB_STATUS_CHANGE", id="full", status="null")
            shutil.copyfile(dst, inc)
            qemu_io(d.uri("src"), "write -P 0xab 1M 64k", "write -P 0xcd 20M 300k")
            b = bitmaps(await s.ok("query-named-block-nodes"), "src")["b0"]
            assert b["count"] == 64 * 1024 + 320 * 1024
            await s.ok("blockdev-add", driver="file", **{"node-name": "inc"}, filename=str(inc))
            await s.ok("blockdev-backup", **{"job-id": "inc", "device": "src", "target": "inc",
                                             "sync": "bitmap", "bitmap": "b0",
                                             "bitmap-mode": mode})
            done = await s.wait("BLOCK_JOB_COMPLETED", device="inc")
            assert done["len"] == done["offset"] == 64 * 1024 + 320 * 1024
            await s.wait("JOB_STATUS_CHANGE", id="inc", status="null")
            b = bitmaps(await s.ok("query-named-block-nodes"), "src")["b0"]
            assert not b["busy"]
            assert b["count"] == (64 * 1024 + 320 * 1024 if mode == "never" else 0)
            await s.ok("blockdev-del", **{"node-name": "inc"})
    run(body())
    assert identical(src, inc)


def writes(seed, n, size=SIZE):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.choice([4096, 65536, 65536 + 4096, 300 * 1024])
        offset = rng.randrange(0, (size - length) // 512) * 512
        out.append(f"write -P {rng.randrange(1, 255)} {offset} {length}")
    return out


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_backup_is_the_disk_at_its_start_while_a_client_writes(start, tmp_path, fmt):
    """Rounds of: a copy of the disk, a backup started, a client writing patterns over NBD
    while it runs (held paused through the writes, so they surely land mid-job, or not held),
    and the backup compared with the copy: it must be the disk as it was at the start."""
    need("qemu-img")
    need("qemu-io")
    img = tmp_path / f"src.{fmt}"
    dst = tmp_path / "dst.img"
    qemu_img("create", "-f", fmt, str(img), str(SIZE))
    qemu_img("create", "-f", "raw", str(dst), str(SIZE))
    qemu_io(str(img), *writes(0, 40), fmt=fmt)
    blockdevs = [f"driver=file,node-name=f0,filename={img}",
                 f"driver={fmt},node-name=src,file=f0",
                 f"driver=file,node-name=dst,filename={dst}"]
    d = start(blockdevs, export_src())
    expected = tmp_path / "expected.img"

    async def body():
        async with Session(d.qmp_sock) as s:
            for round in range(4):
                held = round % 2 == 0
                # The disk as the backup must see it (the export has flushed what it acked).
                qemu_img("convert", "-f", "raw", "-O", "raw", d.uri("src"), str(expected))
                job = f"r{round}"
                await s.ok("blockdev-backup", **{"job-id": job, "device": "src",
                                                 "target": "dst", "sync": "full",
                                                 "speed": MIB if held else 0})
                if held:
                    await s.ok("job-pause", id=job)
                writer = await asyncio.create_subprocess_exec(
                    "qemu-io", "-f", "raw",
                    *[a for c in writes(round + 1, 60) for a in ("-c", c)], d.uri("src"),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                out, err = await writer.communicate()
                assert writer.returncode == 0 and b"error" not in out.lower(), out + err
                if held:
                    [info] = await s.ok("query-jobs")
                    assert info["status"] in ("paused", "running")
                    assert info["current-progress"] < SIZE
                    await s.ok("block-job-set-speed", device=job, speed=0)
                    await s.ok("job-resume", id=job)
                done = await s.wait("BLOCK_JOB_COMPLETED", device=job, timeout=120)
                assert "error" not in done
                await s.wait("JOB_STATUS_CHANGE", id=job, status="null")
                assert identical(expected, dst), f"round {round}: backup is not the disk at start"
    run(body())
    assert d.stop() == 0
    if fmt == "qcow2":
        assert "No errors" in qemu_img("check", "-f", fmt, str(img))


def test_full_backup_to_qcow2_target(start, disks, tmp_path):
    src, _ = disks
    dst = tmp_path / "dst.qcow2"
    qemu_img("create", "-f", "qcow2", str(dst), str(SIZE))
    d = start([f"driver=file,node-name=src,filename={src}",
               f"driver=file,node-name=dstf,filename={dst}",
               "driver=qcow2,node-name=dst,file=dstf"], [])

    async def body():
        async with Session(d.qmp_sock) as s:
            assert await s.run("blockdev-backup", **{"job-id": "j", "device": "src",
                                                     "target": "dstf", "sync": "full"}) == (
                "GenericError", "Source and target image have different sizes")
            await s.ok("blockdev-backup", **{"job-id": "j", "device": "src", "target": "dst",
                                             "sync": "full"})
            await s.wait("JOB_STATUS_CHANGE", id="j", status="null")
            assert "BLOCK_JOB_COMPLETED" in s.job_events("j")
    run(body())
    assert d.stop() == 0
    assert identical(src, dst, fb="qcow2")
    assert "No errors" in qemu_img("check", "-f", "qcow2", str(dst))


def test_sync_top_copies_only_the_top_layer(start, tmp_path):
    need("qemu-img")
    need("qemu-io")
    base = tmp_path / "base.img"
    top = tmp_path / "top.qcow2"
    dst = tmp_path / "dst.img"
    expected = tmp_path / "expected.img"
    for img in (base, dst, expected):
        qemu_img("create", "-f", "raw", str(img), str(SIZE))
    qemu_io(str(base), f"write -P 0x11 0 {SIZE}")
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top))
    top_writes = ["write -P 0x22 1M 64k", "write -P 0x33 5M 256k", f"write -P 0x44 {SIZE - MIB} 1M"]
    qemu_io(str(top), *top_writes, fmt="qcow2")
    qemu_io(str(expected), *top_writes)
    d = start([f"driver=qcow2,node-name=src,file.driver=file,file.filename={top},"
               f"backing.driver=raw,backing.file.driver=file,backing.file.filename={base}",
               f"driver=file,node-name=dst,filename={dst}"], [])

    async def body():
        async with Session(d.qmp_sock) as s:
            await s.ok("blockdev-backup", **{"job-id": "j", "device": "src", "target": "dst",
                                             "sync": "top"})
            done = await s.wait("BLOCK_JOB_COMPLETED", device="j")
            assert "error" not in done and done["len"] == done["offset"]
    run(body())
    assert identical(expected, dst)


def test_sync_none_saves_only_what_writes_change(start, disks):
    """sync=none copies nothing itself: the target gets a cluster's old contents just before
    a client overwrites it, until the job is cancelled."""
    src, dst = disks
    d = start(nodes(src, dst), export_src())

    async def body():
        async with Session(d.qmp_sock) as s:
            await s.ok("blockdev-backup", **{"job-id": "j", "device": "src", "target": "dst",
                                             "sync": "none"})
            qemu_io(d.uri("src"), "write -P 0xee 3M 64k", "write -P 0xef 7M 4k")
            [job] = await s.ok("query-jobs")
            assert job["status"] == "running"
            await s.ok("job-cancel", id="j")
            await s.wait("BLOCK_JOB_CANCELLED", device="j")
            await s.wait("JOB_STATUS_CHANGE", id="j", status="null")
    run(body())
    assert d.stop() == 0
    # The old contents of exactly the two clusters written, zeroes elsewhere.
    qemu_io(str(dst), "read -P 0x13 3M 64k", "read -P 0x17 7M 64k", "read -P 0 0 3M",
            "read -P 0 4M 3M", f"read -P 0 {7 * MIB + 65536} {SIZE - 7 * MIB - 65536}")


def test_grouped_failure_cancels_the_other_backup(start, disks, tmp_path):
    src, dst = disks
    src2 = tmp_path / "src2.img"
    dst2 = tmp_path / "dst2.img"
    shutil.copyfile(src, src2)
    qemu_img("create", "-f", "raw", str(dst2), str(SIZE))
    failing = ",".join(["driver=blkdebug", "node-name=bad", "image.driver=file",
                        f"image.filename={dst2}", "inject-error.0.event=pwritev"])
    d = start(nodes(src, dst) + [f"driver=file,node-name=src2,filename={src2}", failing], [])

    async def body():
        async with Session(d.qmp_sock) as s:
            slow = {"job-id": "slow", "device": "src", "target": "dst", "sync": "full",
                    "speed": MIB}
            bad = {"job-id": "bad", "device": "src2", "target": "bad", "sync": "full"}
            await s.ok("transaction", actions=[
                {"type": "blockdev-backup", "data": slow},
                {"type": "blockdev-backup", "data": bad}],
                properties={"completion-mode": "grouped"})
            await s.wait("JOB_STATUS_CHANGE", id="slow", status="null")
            await s.wait("JOB_STATUS_CHANGE", id="bad", status="null")
            assert s.job_events("bad") == [
                "created", "running", "paused", "running", "BLOCK_JOB_ERROR:report", "aborting",
                "BLOCK_JOB_COMPLETED:Input/output error", "concluded", "null"]
            assert s.job_events("slow")[-4:] == [
                "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
    run(body())


def test_shutdown_during_a_backup_and_kill_leave_consistent_images(start, tmp_path, kind):
    """SIGTERM while a backup runs ends the daemon cleanly; kill -9 during another leaves
    source and target qcow2 images that qemu-img check finds clean (leaks allowed)."""
    need("qemu-img")
    src = tmp_path / "src.qcow2"
    dst = tmp_path / "dst.qcow2"
    qemu_img("create", "-f", "qcow2", str(src), str(SIZE))
    qemu_io(str(src), *writes(7, 40), fmt="qcow2")
    blockdevs = [f"driver=qcow2,node-name=src,file.driver=file,file.filename={src}",
                 f"driver=qcow2,node-name=dst,file.driver=file,file.filename={dst}"]
    for how in ("term", "kill"):
        qemu_img("create", "-f", "qcow2", str(dst), str(SIZE))
        if how == "term":
            d = start(blockdevs, export_src())
        else:
            # Not through `start`, whose teardown expects a clean exit.
            (tmp_path / how).mkdir()
            d = Daemon(tmp_path / how, kind, blockdevs, export_src())

        async def body():
            async with Session(d.qmp_sock) as s:
                await s.ok("blockdev-backup", **{"job-id": "j", "device": "src",
                                                 "target": "dst", "sync": "full",
                                                 "speed": 4 * MIB})
                qemu_io(d.uri("src"), *writes(8, 20))
        run(body())
        if how == "term":
            assert d.stop() == 0
        else:
            d.proc.kill()
            d.proc.wait()
        for img in (src, dst):
            r = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(img)],
                               capture_output=True, text=True)
            assert r.returncode in (0, 3), r.stdout + r.stderr  # 3: leaked clusters only
