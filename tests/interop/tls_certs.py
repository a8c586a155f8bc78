"""Test-time TLS material made with the openssl command: a CA, a server certificate for
localhost/127.0.0.1, clients with different DNs, a client from another CA, an expired client,
and PSK key files. Directories use QEMU's (and libnbd's) file names."""

import secrets
import shutil
import subprocess
import time
from pathlib import Path

CLIENT_ONE_DN = "C=GB,O=Example,CN=client-one"
CLIENT_TWO_DN = "C=GB,O=Example,CN=client-two"


def _openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _key(path):
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))


def _ca(root, name):
    d = root / name
    d.mkdir()
    _key(d / "ca-key.pem")
    _openssl("req", "-x509", "-key", str(d / "ca-key.pem"), "-out", str(d / "ca-cert.pem"),
             "-days", "30", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return d


def _issue(ca, out_dir, prefix, subj, ext, days="30", trust=None):
    """A key and certificate `prefix`-key.pem/-cert.pem signed by `ca`, plus the ca-cert.pem
    of `trust` (default: `ca`), the CA this side checks its peer against."""
    out_dir.mkdir(exist_ok=True)
    key = out_dir / f"{prefix}-key.pem"
    _key(key)
    csr = out_dir / f"{prefix}.csr"
    _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", subj)
    extfile = out_dir / f"{prefix}.ext"
    extfile.write_text("\n".join(["basicConstraints=CA:FALSE"] + ext) + "\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca / "ca-cert.pem"),
             "-CAkey", str(ca / "ca-key.pem"), "-CAcreateserial", "-days", days,
             "-out", str(out_dir / f"{prefix}-cert.pem"), "-extfile", str(extfile))
    csr.unlink()
    extfile.unlink()
    shutil.copy((trust or ca) / "ca-cert.pem", out_dir / "ca-cert.pem")
    return out_dir


def _client(ca, out_dir, subj, days="30", trust=None):
    return _issue(ca, out_dir, "client", subj,
                  ["keyUsage=critical,digitalSignature,keyEncipherment",
                   "extendedKeyUsage=clientAuth"], days, trust)


def make_pki(root):
    """Every directory the TLS tests use, by name."""
    root = Path(root)
    ca = _ca(root, "ca")
    other = _ca(root, "other-ca")
    dirs = {}
    # -days 0: valid only for the second it is made in, so expired by the time it is used.
    dirs["expired"] = _client(ca, root / "expired", "/C=GB/O=Example/CN=client-one", days="0")
    dirs["expired-server"] = _issue(ca, root / "expired-server", "server", "/CN=localhost",
                                    ["extendedKeyUsage=serverAuth",
                                     "subjectAltName=DNS:localhost"], days="0")
    dirs["server"] = _issue(ca, root / "server", "server", "/O=Example/CN=localhost",
                            ["keyUsage=critical,digitalSignature,keyEncipherment",
                             "extendedKeyUsage=serverAuth",
                             "subjectAltName=DNS:localhost,IP:127.0.0.1"])
    dirs["one"] = _client(ca, root / "one", "/C=GB/O=Example/CN=client-one")
    dirs["two"] = _client(ca, root / "two", "/C=GB/O=Example/CN=client-two")
    # Same DN as client one, but signed by a CA the server does not trust (the client itself
    # trusts the server's CA, so only the server can be the one refusing).
    dirs["stranger"] = _client(other, root / "stranger", "/C=GB/O=Example/CN=client-one",
                               trust=ca)
    # The CA only: a client with no certificate of its own.
    anon = root / "anon"
    anon.mkdir()
    shutil.copy(ca / "ca-cert.pem", anon / "ca-cert.pem")
    dirs["anon"] = anon
    time.sleep(1.1)  # make sure "expired" really is
    return dirs


def make_psk(root):
    """keys.psk files: the server's (alice, bob), each user's own, and a wrong key for alice."""
    root = Path(root)
    keys = {u: secrets.token_hex(32) for u in ("alice", "bob")}
    dirs = {}
    for name, lines in [("server", [f"{u}:{k}" for u, k in keys.items()]),
                        ("alice", [f"alice:{keys['alice']}"]),
                        ("bob", [f"bob:{keys['bob']}"]),
                        ("wrong", [f"alice:{secrets.token_hex(32)}"])]:
        d = root / f"psk-{name}"
        d.mkdir()
        (d / "keys.psk").write_text("\n".join(lines) + "\n")
        dirs[name] = d
    return dirs
