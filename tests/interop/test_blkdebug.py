"""blkdebug as QEMU's iotests use it (issue 16 item 3): rules armed by events that the driver
above reports, the set-state machine, QEMU's configuration file, the alignment and size limits,
and QEMU's option errors. Every test states what qemu-storage-daemon 10 does and runs against
whichever daemon DAEMON names, so the DAEMON=qsd run checks the expectations themselves.

Reads go over simple replies: with structured replies qemu-storage-daemon drops the connection
after a failed read, which would hide every later step."""

import asyncio
import json
import subprocess

import nbd
import pytest

from conftest import qmp_outcome

MIB = 1 << 20


def outcomes(d, steps):
    """Runs steps on one NBD connection: r read, w write, z write-zeroes, f flush (512 bytes
    at offset 0, or (step, offset) pairs); each gives "ok" or the errno name."""
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.connect_uri(d.uri("disk"))
    out = []
    for step in steps:
        op, off = step if isinstance(step, tuple) else (step, 0)
        try:
            if op == "r":
                h.pread(512, off)
            elif op == "w":
                h.pwrite(b"x" * 512, off)
            elif op == "z":
                h.zero(512, off)
            elif op == "f":
                h.flush()
            out.append("ok")
        except nbd.Error as e:
            out.append(e.errno)
    h.shutdown()
    return out


def over_raw(start, image, rules):
    """raw over blkdebug over a file; `rules` are blkdebug options (inject-error.0.event=...)."""
    img = image(4 * MIB)
    spec = (f"driver=raw,node-name=top,file.driver=blkdebug,"
            f"file.image.driver=file,file.image.filename={img}")
    spec += "".join(f",file.{r}" for r in rules)
    return start([spec], ["type=nbd,id=e0,node-name=top,name=disk,writable=on"])


def direct(start, image, rules, extra=""):
    """blkdebug exported directly: no format above it reports events."""
    img = image(4 * MIB)
    spec = f"driver=blkdebug,node-name=top,image.driver=file,image.filename={img}{extra}"
    spec += "".join(f",{r}" for r in rules)
    return start([spec], ["type=nbd,id=e0,node-name=top,name=disk,writable=on"])


def test_read_aio_once_fails_the_first_read_only(start, image):
    d = over_raw(start, image, ["inject-error.0.event=read_aio", "inject-error.0.once=on"])
    assert outcomes(d, "rrrw") == ["EIO", "ok", "ok", "ok"]


def test_an_armed_rule_stays_armed_for_every_default_io_type(start, image):
    d = over_raw(start, image, ["inject-error.0.event=write_aio"])
    assert outcomes(d, "rwrfz") == ["ok", "EIO", "EIO", "EIO", "EIO"]


def test_exported_directly_only_none_and_pwritev_events_fire(start, image):
    d = direct(start, image, ["inject-error.0.event=read_aio"])
    assert outcomes(d, "rwr") == ["ok", "ok", "ok"]
    d.stop()
    d = direct(start, image, ["inject-error.0.event=none", "inject-error.0.once=on"])
    assert outcomes(d, "rr") == ["EIO", "ok"]
    d.stop()
    d = direct(start, image, ["inject-error.0.event=pwritev"])
    assert outcomes(d, "rwr") == ["ok", "EIO", "EIO"]
    d.stop()
    d = direct(start, image, ["inject-error.0.event=pwritev_zero"])
    assert outcomes(d, "wzr") == ["ok", "EIO", "EIO"]
    d.stop()
    d = direct(start, image, ["inject-error.0.event=pwritev_done"])
    assert outcomes(d, "ww") == ["ok", "EIO"]


def test_flush_events_follow_writes(start, image):
    d = over_raw(start, image, ["inject-error.0.event=flush_to_os"])
    assert outcomes(d, "rfr") == ["ok", "ok", "EIO"]  # nothing written: the flush stops above
    d.stop()
    d = over_raw(start, image, ["inject-error.0.event=flush_to_os"])
    assert outcomes(d, "wfr") == ["ok", "EIO", "EIO"]
    d.stop()
    d = over_raw(start, image, ["inject-error.0.event=flush_to_disk"])
    assert outcomes(d, "rfrwfr") == ["ok", "ok", "ok", "ok", "EIO", "EIO"]
    d.stop()
    d = over_raw(start, image, ["inject-error.0.event=read_aio", "inject-error.0.iotype=flush"])
    assert outcomes(d, "rfwfr") == ["ok", "ok", "ok", "EIO", "ok"]


def test_sector_and_iotype_narrow_a_rule(start, image):
    d = over_raw(start, image, ["inject-error.0.event=none", "inject-error.0.sector=8"])
    assert outcomes(d, ["r", "w", ("r", 4096), ("w", 4096)]) == ["ok", "ok", "EIO", "EIO"]
    d.stop()
    d = over_raw(start, image, ["inject-error.0.event=none", "inject-error.0.iotype=block-status"])
    assert outcomes(d, "rw") == ["ok", "ok"]


def test_set_state_chain(start, image):
    rules = ["inject-error.0.event=read_aio", "inject-error.0.state=2",
             "set-state.0.event=write_aio", "set-state.0.state=1", "set-state.0.new_state=2",
             "set-state.1.event=read_aio", "set-state.1.state=2", "set-state.1.new_state=3"]
    d = over_raw(start, image, rules)
    # Reads pass in state 1; a write moves to 2; the next read arms the rule (seen in state 2)
    # and moves to 3, where nothing disarms it.
    assert outcomes(d, "rrwrrwr") == ["ok", "ok", "ok", "EIO", "EIO", "EIO", "EIO"]


def test_config_file_rules_merge_with_the_options(start, image, tmp_path):
    conf = tmp_path / "blkdebug.conf"
    conf.write_text('# injected by a file\n[inject-error]\nevent = "read_aio"\nerrno = "28"\n'
                    'once = "on"\n\n[set-state]\nevent = "write_aio"\nnew_state = "2"\n')
    d = over_raw(start, image, [f"config={conf}", "inject-error.0.event=read_aio",
                                "inject-error.0.state=2", "inject-error.0.errno=5"])
    # The file's rule comes first: ENOSPC once; then nothing until a write moves to state 2.
    assert outcomes(d, "rrwr") == ["ENOSPC", "ok", "ok", "EIO"]


def test_qcow2_reports_l2_load_to_blkdebug(start, tmp_path):
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(img)],
                   check=True, capture_output=True)
    spec = (f"driver=qcow2,node-name=top,file.driver=blkdebug,file.image.driver=file,"
            f"file.image.filename={img},file.inject-error.0.event=l2_load,"
            f"file.inject-error.0.once=on,file.inject-error.0.iotype=read")
    d = start([spec], ["type=nbd,id=e0,node-name=top,name=disk,writable=on"])
    assert outcomes(d, "rr") == ["EIO", "ok"]


def block_sizes(d):
    out = subprocess.run(["nbdinfo", "--json", d.uri("disk")], check=True, capture_output=True,
                         text=True).stdout
    e = json.loads(out)["exports"][0]
    return (e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"])


def test_align_and_max_transfer_reach_the_nbd_client(start, image):
    d = direct(start, image, [], ",align=4096")
    assert block_sizes(d) == (4096, 4096, 32 * MIB)
    d.stop()
    d = direct(start, image, [], ",align=4096,max-transfer=65536,opt-write-zero=8192,"
                                 "max-write-zero=16384")
    assert block_sizes(d) == (4096, 4096, 65536)
    # Requests off the alignment still work (the daemon pads them).
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(d.uri("disk"))
    h.pwrite(b"\x11" * 1000, 100)
    h.pwrite(b"\x22" * 100000, 70000)
    h.zero(20000, 10)
    data = h.pread(200000, 0)
    expect = bytearray(200000)
    expect[100:1100] = b"\x11" * 1000
    expect[70000:170000] = b"\x22" * 100000
    expect[10:20010] = bytes(20000)
    assert data == bytes(expect)
    h.shutdown()


BAD_OPTIONS = [
    ({"inject-error": [{"event": "bogus"}]},
     "Parameter 'event' does not accept value 'bogus'"),
    ({"inject-error": [{"event": "read_aio", "iotype": "bogus"}]},
     "Parameter 'iotype' does not accept value 'bogus'"),
    ({"inject-error": [{}]}, "Parameter 'inject-error[0].event' is missing"),
    ({"set-state": [{"event": "read_aio"}]}, "Parameter 'set-state[0].new_state' is missing"),
    ({"set-state": [{"event": "bogus", "new_state": 2}]},
     "Parameter 'event' does not accept value 'bogus'"),
    ({"align": 3}, "Cannot meet constraints with align 3"),
    ({"align": 2 ** 31}, "Cannot meet constraints with align 2147483648"),
    ({"align": -1}, "Value '-1' is out of range for parameter 'align'"),
    ({"max-transfer": -1}, "Value '-1' is out of range for parameter 'max-transfer'"),
    ({"max-transfer": 2 ** 31}, "Parameter 'max-transfer' expects int32_t"),
    ({"align": 4096, "max-transfer": 512}, "Cannot meet constraints with max-transfer 512"),
    ({"opt-write-zero": 4096, "max-write-zero": 6144},
     "Cannot meet constraints with max-write-zero 6144"),
    ({"opt-discard": 4096, "max-discard": 6000}, "Cannot meet constraints with max-discard 6000"),
    ({"align": 4096, "opt-discard": 512}, "Cannot meet constraints with opt-discard 512"),
]

GOOD_OPTIONS = [
    {"align": 4096, "max-transfer": 8192},
    {"opt-write-zero": 4096, "max-write-zero": 8192},
    {"inject-error": [{"event": "read_aio", "errno": 0, "sector": -1, "state": 3}]},
    {"set-state": [{"event": "none", "new_state": 0}]},
]

BAD_FILES = [
    ('[inject-error]\nevent = read_aio\n', "invalid parameter value: "),
    ('[inject-error]\nevent = "bogus"\n', "invalid parameter value: bogus"),
    ('[nosuch]\nevent = "read_aio"\n', "There is no option group 'nosuch'"),
    ('[inject-error]\nfoo = "1"\n', "Invalid parameter 'foo'"),
    ('[inject-error]\nerrno = "x"\nevent = "read_aio"\n', "Parameter 'errno' expects a number"),
    ('event = "read_aio"\n', "no group defined"),
    ('[inject-error]\nerrno = "5"\n', "Missing event name for rule"),
    ('[inject-error]\nevent = "read_aio"\niotype = "bogus"\n', "invalid parameter value: bogus"),
    ('[inject-error]\nevent = "read_aio"\nonce = "maybe"\n',
     "Parameter 'once' expects 'on' or 'off'"),
]


def test_option_errors_are_qemus(start, image, tmp_path):
    d = start([], [])
    n = 0

    def add(**options):
        # An image each: the nodes that open stay open (and bexd locks an image at open).
        nonlocal n
        n += 1
        img = image(MIB, name=f"d{n}.img")
        args = {"driver": "blkdebug", "node-name": f"n{n}",
                "image": {"driver": "file", "filename": str(img)}, **options}
        return asyncio.run(qmp_outcome(d.qmp_sock, "blockdev-add", args))

    for options, message in BAD_OPTIONS:
        assert add(**options) == ("GenericError", message), options
    for options in GOOD_OPTIONS:
        assert add(**options) == ("ok", {}), options
    assert add(config=str(tmp_path / "none.conf")) == (
        "GenericError", "Could not read blkdebug config file: No such file or directory")
    for i, (text, message) in enumerate(BAD_FILES):
        conf = tmp_path / f"bad{i}.conf"
        conf.write_text(text)
        assert add(config=str(conf)) == ("GenericError", message), text
