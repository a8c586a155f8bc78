"""driver=nbd over TLS: the daemon under test (DAEMON=bexd|qsd, the same command lines) as a
TLS client of qemu-nbd, QSD and bexd origins that require TLS (x509 and PSK), re-exporting what
it reads; data checked with qemu-img compare. Errors at blockdev-add (wrong CA, wrong
hostname, no hostname on a unix socket, wrong PSK key, a server endpoint object, TLS against a
plain server and the reverse) are QEMU's; a reconnect redoes the TLS handshake."""

import asyncio
import shutil
import subprocess

import pytest

from conftest import daemon_binary, free_port, can_connect_unix, qmp_outcome, wait_until
from node_events import qemu_io
from test_nbd_client import MiB, Origin, compare, origin, reexport  # noqa: F401
from tls_certs import make_pki, make_psk

X509_SERVER = "tls-creds-x509,id=t0,dir={},endpoint=server"
PSK_SERVER = "tls-creds-psk,id=t0,dir={},endpoint=server"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificates")
    root = tmp_path_factory.mktemp("pki")
    dirs = make_pki(root)
    dirs.update({f"psk-{k}": v for k, v in make_psk(root).items()})
    other = root / "other-ca-only"
    other.mkdir()
    shutil.copy(root / "other-ca" / "ca-cert.pem", other / "ca-cert.pem")
    dirs["other-ca-only"] = other
    return dirs


class TlsOrigin(Origin):
    """An origin that requires TLS with the server-endpoint object `creds` (id t0); on a
    unix socket, or on 127.0.0.1:port when `tcp`."""

    def __init__(self, tmp, which, img, creds, tcp=False):
        self.creds, self.port = creds, (free_port() if tcp else None)
        super().__init__(tmp, which, img)

    def argv(self):
        obj = ["--object", self.creds]
        if self.which == "qemu-nbd":
            where = (["-b", "127.0.0.1", "-p", str(self.port)] if self.port
                     else ["-k", str(self.sock)])
            return ["qemu-nbd", "-f", "raw", "-x", "disk", "-t", "-e", "8", *where,
                    *obj, "--tls-creds", "t0", str(self.img)]
        argv = super().argv()
        i = argv.index("--nbd-server")
        if self.port:
            argv[i + 1] = f"addr.type=inet,addr.host=127.0.0.1,addr.port={self.port}"
        argv[i + 1] += ",tls-creds=t0"
        n = len(daemon_binary(self.which))
        return argv[:n] + obj + argv[n:]

    def start(self):
        if not self.port:
            return super().start()
        import socket
        self.err = open(self.tmp / f"origin-{self.which}.stderr", "a")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stderr=self.err)

        def listening():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_until(listening, what=f"{self.which} to listen")
        if self.which != "qemu-nbd":
            wait_until(lambda: can_connect_unix(self.qmp), what="origin QMP")

    def server(self):
        if self.port:
            return {"type": "inet", "host": "127.0.0.1", "port": str(self.port)}
        return {"type": "unix", "path": str(self.sock)}


@pytest.fixture
def tls_origin(tmp_path):
    made = []

    def _origin(which, img, creds, tcp=False):
        if shutil.which(daemon_binary(which)[0] if which != "qemu-nbd" else "qemu-nbd") is None:
            pytest.fail(f"{which} is needed for the TLS origins")
        o = TlsOrigin(tmp_path, which, img, creds, tcp)
        made.append(o)
        return o
    yield _origin
    for o in made:
        o.stop()


def keyval(server):
    return ",".join(f"server.{k}={v}" for k, v in server.items())


def blockdev(o, extra=""):
    return f"driver=nbd,node-name=n0,{keyval(o.server())},export=disk,tls-creds=c0{extra}"


def write_and_compare(d, img):
    code, out = qemu_io(d.uri("re"), "write -P 0x3c 1M 192k")
    assert code == 0 and "failed" not in out, out
    assert qemu_io(d.uri("re"), "flush")[0] == 0
    code, out = compare(img, d.uri("re"))
    assert code == 0, out
    code, out = qemu_io(str(img), "read -P 0x3c 1M 192k", read_only=True)
    assert code == 0 and "verification failed" not in out, out


CASES = [
    # (origin, server creds, client creds, tcp, extra blockdev options)
    ("qemu-nbd", "x509", "one", False, ",tls-hostname=localhost"),
    ("qemu-nbd", "x509", "anon-as-verify-off", True, ""),
    ("bexd", "x509", "one", False, ",tls-hostname=localhost"),
    ("bexd", "x509", "one", True, ""),
    ("qsd", "x509", "two", True, ""),
    ("bexd", "psk", "alice", False, ""),
    ("qsd", "psk", "bob", False, ""),
]


@pytest.mark.parametrize("which,kind_,client,tcp,extra", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{'tcp' if c[3] else 'unix'}" for c in CASES])
def test_reexport_over_tls_reads_and_writes(tls_origin, start, image, pki, which, kind_, client,
                                            tcp, extra):
    img = image(8 * MiB, [(0, b"\x5a" * MiB), (5 * MiB, b"\x11" * 65536)])
    if kind_ == "x509":
        server = X509_SERVER.format(pki["server"])
        if client == "anon-as-verify-off":
            server += ",verify-peer=off"
            client_obj = f"tls-creds-x509,id=c0,dir={pki['anon']},endpoint=client"
        else:
            client_obj = f"tls-creds-x509,id=c0,dir={pki[client]},endpoint=client"
    else:
        server = PSK_SERVER.format(pki["psk-server"])
        client_obj = f"tls-creds-psk,id=c0,dir={pki['psk-' + client]},endpoint=client,username={client}"
    o = tls_origin(which, img, server, tcp=tcp)
    d = start([blockdev(o, extra)], [reexport()], objects=[client_obj])
    code, out = compare(img, d.uri("re"))
    assert code == 0, out
    write_and_compare(d, img)


def add(d, args):
    return asyncio.run(qmp_outcome(d.qmp_sock, "blockdev-add", args))


def nbd_args(server, **kw):
    args = {"driver": "nbd", "node-name": "n0", "server": server, "export": "disk"}
    args.update({k.replace("_", "-"): v for k, v in kw.items()})
    return args


def test_x509_errors_at_blockdev_add_are_qemus(tls_origin, start, image, pki):
    img = image(MiB)
    unix = tls_origin("qemu-nbd", img, X509_SERVER.format(pki["server"]))
    d = start([], [], objects=[
        f"tls-creds-x509,id=good,dir={pki['one']},endpoint=client",
        f"tls-creds-x509,id=otherca,dir={pki['other-ca-only']},endpoint=client",
        X509_SERVER.format(pki["server"]).replace("id=t0", "id=srv"),
        "authz-simple,id=az,identity=x"])
    s = unix.server()
    cases = [
        (dict(tls_creds="otherca", tls_hostname="localhost"),
         "The certificate hasn't got a known issuer"),
        (dict(tls_creds="good", tls_hostname="wrong.example"),
         "Certificate does not match the hostname wrong.example"),
        (dict(tls_creds="good"), "No hostname for certificate validation"),
        (dict(tls_creds="srv"), "Expected TLS credentials for a client endpoint"),
        (dict(tls_creds="nope"), "No TLS credentials with id 'nope'"),
        (dict(tls_creds="az"), "Object with id 'az' is not TLS credentials"),
        # QEMU's hints (server reported: ...) go to the command line only, not to QMP.
        ({}, "TLS negotiation required before option 7 (go)"),
    ]
    for kw, want in cases:
        assert add(d, nbd_args(s, **kw)) == ("GenericError", want), kw
    # A good node still opens after all that, and the monitor answers.
    assert add(d, nbd_args(s, tls_creds="good", tls_hostname="localhost")) == ("ok", {})


def test_tls_to_a_plain_server_is_denied(origin, start, image, pki):  # noqa: F811
    o = origin("qemu-nbd", image(MiB))
    d = start([], [], objects=[f"tls-creds-x509,id=good,dir={pki['one']},endpoint=client"])
    got = add(d, nbd_args({"type": "unix", "path": str(o.sock)}, tls_creds="good",
                          tls_hostname="localhost"))
    assert got == ("GenericError", "Denied by server for option 5 (starttls)")


def test_wrong_psk_key_fails_the_handshake(tls_origin, start, image, pki):
    o = tls_origin("bexd", image(MiB), PSK_SERVER.format(pki["psk-server"]))
    d = start([], [], objects=[
        f"tls-creds-psk,id=wrong,dir={pki['psk-wrong']},endpoint=client,username=alice"])
    cls, desc = add(d, nbd_args(o.server(), tls_creds="wrong"))
    assert cls == "GenericError" and desc.startswith("TLS handshake failed: "), desc


def test_psk_client_object_needs_its_username_in_the_file(start, pki):
    d = start([], [])
    args = {"qom-type": "tls-creds-psk", "id": "c0", "dir": str(pki["psk-alice"]),
            "endpoint": "client"}
    got = asyncio.run(qmp_outcome(d.qmp_sock, "object-add", args))
    want = f"Username qemu not found in PSK file {pki['psk-alice']}/keys.psk"
    assert got == ("GenericError", want)


def test_reconnect_redoes_the_tls_handshake(tls_origin, start, image, pki):
    img = image(8 * MiB, [(0, b"\x5a" * MiB)])
    o = tls_origin("bexd", img, X509_SERVER.format(pki["server"]))
    d = start([blockdev(o, ",tls-hostname=localhost,reconnect-delay=60")], [reexport()],
              objects=[f"tls-creds-x509,id=c0,dir={pki['one']},endpoint=client"])
    assert qemu_io(d.uri("re"), "read -P 0x5a 0 1M", read_only=True)[0] == 0
    o.kill()
    reader = subprocess.Popen(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5a 0 1M",
                               d.uri("re")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    o.start()
    out, _ = reader.communicate(timeout=120)
    assert reader.returncode == 0 and "failed" not in out, out
    write_and_compare(d, img)
