"""Throwaway x509 credentials for the TLS runs: a CA and a server certificate
for 127.0.0.1/localhost, laid out as QEMU, nbdkit and libnbd expect
(ca-cert.pem, server-cert.pem, server-key.pem; the client side needs only the CA)."""

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass


@dataclass
class TlsDirs:
    server_dir: str
    client_dir: str


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_tls_dirs():
    root = tempfile.mkdtemp(prefix="bench-tls-")
    # The client side is $HOME/.pki/libnbd of a home made for the clients.
    server, client = os.path.join(root, "server"), os.path.join(root, "home", ".pki", "libnbd")
    os.makedirs(server)
    os.makedirs(client)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=bench CA",
             "-keyout", "ca-key.pem", "-out", "ca-cert.pem", cwd=root)
    with open(os.path.join(root, "ext.cnf"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", "server/server-key.pem", "-out", "server.csr", cwd=root)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
             "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server/server-cert.pem", cwd=root)
    for d in (server, client):
        shutil.copy(os.path.join(root, "ca-cert.pem"), d)
    return TlsDirs(server, client)
