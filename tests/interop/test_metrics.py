"""bexd's metrics-http endpoint, checked by Prometheus's own tools: promtool accepts the
exposition, and a real Prometheus server scrapes bexd and answers PromQL queries with the
exact counts of a known workload, and rate() and increase() over them. qemu-storage-daemon has no such object."""

import asyncio
import json
import math
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import file_export, free_port, need, qmp_outcome, wait_until

pytestmark = pytest.mark.bexd_only("metrics-http is bexd's own object")


def raw_on_file(img):
    blockdevs = [f"driver=file,node-name=f0,filename={img}",
                 "driver=raw,node-name=disk0,file=f0"]
    exports = ["type=nbd,id=e0,node-name=disk0,name=disk0,writable=on"]
    return blockdevs, exports


def scrape(port, method="GET", path="/metrics"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def samples(text):
    """{'name{labels}': value} of an exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def qemu_io(uri, *commands):
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    subprocess.run(argv + [uri], check=True, capture_output=True)


def test_exposition_passes_promtool_and_counts_a_known_workload(start, image):
    need("promtool")
    port = free_port()
    d = start(*raw_on_file(image(4 << 20)),
              objects=[f"metrics-http,id=m0,addr.host=127.0.0.1,addr.port={port}"])
    qemu_io(d.uri("disk0"), "write 0 64k", "write 1M 4k", "read 0 8k", "discard 0 4k")
    status, ctype, text = scrape(port)
    assert status == 200
    assert ctype.startswith("text/plain; version=0.0.4")
    check = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                           capture_output=True)
    assert check.returncode == 0 and check.stdout.strip() == "" and check.stderr.strip() == "", \
        check.stdout + check.stderr
    s = samples(text)
    for subject in ('export="e0"', 'node="disk0"'):
        assert s[f'bexd_{subject.split("=")[0]}_requests_total{{{subject},op="write"}}'] == 2
        assert s[f'bexd_{subject.split("=")[0]}_bytes_total{{{subject},op="write"}}'] == 65536 + 4096
        assert s[f'bexd_{subject.split("=")[0]}_bytes_total{{{subject},op="read"}}'] == 8192
        assert s[f'bexd_{subject.split("=")[0]}_bytes_total{{{subject},op="unmap"}}'] == 4096
    assert s['bexd_export_request_duration_seconds_count{export="e0",op="read"}'] == 1
    assert s['bexd_export_request_duration_seconds_bucket{export="e0",op="read",le="+Inf"}'] == 1
    assert s['bexd_export_connections{export="e0"}'] == 0
    assert s['bexd_export_connections_accepted_total{export="e0"}'] == 1
    assert s['bexd_export_requests_in_flight{export="e0"}'] == 0
    assert s['bexd_node_requests_total{node="f0",op="write"}'] == 0
    assert s["bexd_nbd_tls_handshakes_total"] == 0
    assert s["bexd_nbd_payload_budget_in_use_bytes"] == 0
    assert s["bexd_nbd_payload_budget_bytes"] == 1 << 30


def test_bad_http_requests_get_4xx_and_the_endpoint_serves_on(start, image):
    import socket
    port = free_port()
    d = start(*raw_on_file(image(1 << 20)),
              objects=[f"metrics-http,id=m0,addr.host=127.0.0.1,addr.port={port}"])
    assert scrape(port, path="/")[0] == 404
    assert scrape(port, method="POST")[0] == 405
    for junk in (b"\x16\x03\x01\x02\x00 hello\r\n\r\n", b"GET /metrics HTTP/9\r\n\r\n",
                 b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(junk)
            assert s.recv(4096).startswith(b"HTTP/1.1 400 ")
    # A client that connects and says nothing holds nobody up.
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        assert scrape(port)[0] == 200
    assert d.alive()


def test_object_add_and_del_over_qmp_start_and_stop_the_endpoint(start, image):
    d = start(*raw_on_file(image(1 << 20)))
    port = free_port()

    def add(**members):
        return asyncio.run(qmp_outcome(d.qmp_sock, "object-add",
                                       {"qom-type": "metrics-http", "id": "m1", **members}))

    assert add() == ("GenericError", "Parameter 'addr' is missing")
    assert add(addr={"host": "127.0.0.1"}) == ("GenericError", "Parameter 'addr.port' is missing")
    assert add(addr={"host": "127.0.0.1", "port": str(port), "ipv4": True}) == (
        "GenericError", "Parameter 'addr.ipv4' is unexpected")
    assert add(addr={"host": "127.0.0.1", "port": port}) == (
        "GenericError", "Invalid parameter type for 'addr.port', expected: string")
    assert add(addr={"host": "127.0.0.1", "port": str(port)}, bogus=1) == (
        "GenericError", "Parameter 'bogus' is unexpected")
    assert add(addr={"host": "127.0.0.1", "port": str(port)}) == ("ok", {})
    assert scrape(port)[0] == 200
    assert add(addr={"host": "127.0.0.1", "port": str(free_port())}) == (
        "GenericError", "attempt to add duplicate property 'm1' to object (type 'container')")
    # The port is taken: refused, and nothing is left behind under the id.
    taken = asyncio.run(qmp_outcome(d.qmp_sock, "object-add", {
        "qom-type": "metrics-http", "id": "m2", "addr": {"host": "127.0.0.1", "port": str(port)}}))
    assert taken[0] == "GenericError" and "metrics-http" in taken[1], taken
    assert asyncio.run(qmp_outcome(d.qmp_sock, "object-del", {"id": "m2"}))[0] == "GenericError"
    assert asyncio.run(qmp_outcome(d.qmp_sock, "object-del", {"id": "m1"})) == ("ok", {})

    def refused():
        try:
            scrape(port)
            return False
        except (urllib.error.URLError, ConnectionError):
            return True
    wait_until(refused, what="the endpoint to close after object-del")
    # The same port again: the first listener is gone.
    assert add(addr={"host": "127.0.0.1", "port": str(port)}) == ("ok", {})
    assert scrape(port)[0] == 200


class Prometheus:
    """A real Prometheus server scraping bexd's endpoint on `port` every second."""

    def __init__(self, tmp_path, port):
        need("prometheus")
        self.port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "bexd",
                                "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
        }))
        self.log = open(tmp_path / "prometheus.log", "w")
        self.proc = subprocess.Popen(["prometheus", f"--config.file={config}",
                                      f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def result(self, promql, at=None):
        """The `result` of an instant query (at `at`, RFC 3339, else now); None while
        Prometheus is not answering yet."""
        args = {"query": promql} | ({"time": at} if at else {})
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(args)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.load(r)["data"]["result"]
        except (urllib.error.URLError, ConnectionError, KeyError):
            return None

    def query(self, promql, at=None):
        """The values of an instant vector."""
        result = self.result(promql, at)
        return None if result is None else [float(x["value"][1]) for x in result]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def prometheus(tmp_path):
    started = []

    def _start(port):
        started.append(Prometheus(tmp_path, port))
        return started[-1]
    yield _start
    for p in started:
        p.stop()


def test_real_prometheus_scrapes_the_exact_counts_of_a_workload(start, image, prometheus):
    port = free_port()
    d = start(*raw_on_file(image(8 << 20)),
              objects=[f"metrics-http,id=m0,addr.host=127.0.0.1,addr.port={port}"])
    prom = prometheus(port)
    # 3 writes of exactly 1.25 MiB together, 2 reads of 12 KiB.
    qemu_io(d.uri("disk0"), "write 0 1M", "write 2M 128k", "write 4M 128k",
            "read 0 4k", "read 2M 8k")
    wanted = {
        'bexd_export_bytes_total{export="e0",op="write"}': (1 << 20) + (256 << 10),
        'bexd_export_requests_total{export="e0",op="write"}': 3,
        'sum(bexd_export_bytes_total{op="read"})': 12288,
        'bexd_node_requests_total{node="disk0",op="read"}': 2,
        'bexd_export_request_duration_seconds_count{export="e0",op="write"}': 3,
    }
    for promql, value in wanted.items():
        # Waits for scrapes (no timing is asserted), then the exact value.
        wait_until(lambda: prom.query(promql) == [value], timeout=120,
                   what=f"Prometheus to answer {promql} = {value}")


def rfc3339(ms):
    """A millisecond timestamp as RFC 3339 (exact, unlike a float of seconds)."""
    secs, ms = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ms:03d}Z"


def test_real_prometheus_answers_rate_and_increase_exactly(start, image, prometheus):
    """rate() and increase() extrapolate: Prometheus stretches the increase between the first
    and last sample in the window towards the window's ends (promql/functions.go,
    extrapolatedRate). Both stretches are made zero here, so the answers are exact:
    - the start: the first sample in the window is the series' first scrape, taken before
      any request, so its value is 0, and a counter is never extrapolated below zero
      ("durationToZero" = 0);
    - the end: the query is evaluated at the timestamp of the last sample (time=, to the
      millisecond), so the window ends on it.
    Then increase(x[10m]) is the last sample minus the first, the workload's count, and
    rate(x[10m]) that count over the 600 s of the window (to the last bit but one, see
    below). Had either end been extrapolated (by up to a 1 s scrape interval), the answers
    would be off by about 1 part in 600, far outside that."""
    port = free_port()
    d = start(*raw_on_file(image(8 << 20)),
              objects=[f"metrics-http,id=m0,addr.host=127.0.0.1,addr.port={port}"])
    prom = prometheus(port)
    requests = 'bexd_export_requests_total{export="e0",op="write"}'
    written = 'bexd_export_bytes_total{export="e0",op="write"}'
    wait_until(lambda: prom.query(requests) == [0], timeout=120,
               what="Prometheus to scrape the series before the workload")
    # 5 writes, 4 KiB to 64 KiB: 5 requests, 4 + 8 + 16 + 32 + 64 = 124 KiB.
    qemu_io(d.uri("disk0"), *(f"write {i}M {4 << i}k" for i in range(5)))
    wait_until(lambda: prom.query(requests) == [5] and prom.query(written) == [124 << 10],
               timeout=120, what="Prometheus to scrape the workload's counts")
    scraped = prom.result(f"{requests}[10m]")[0]["values"]
    points = [(round(float(t) * 1000), float(v)) for t, v in scraped]
    assert points[0][1] == 0 and points[-1][1] == 5, points
    at = rfc3339(points[-1][0])
    assert prom.query(f"increase({requests}[10m])", at) == [5]
    assert prom.query(f"increase({written}[10m])", at) == [124 << 10]
    for series, count in [(requests, 5), (written, 124 << 10)]:
        [rate] = prom.query(f"rate({series}[10m])", at)
        # Prometheus 2.42 multiplies by 1/600 rather than dividing by 600: one rounding
        # apart at most, hence the tolerance of a few ulps and no more.
        assert math.isclose(rate, count / 600, rel_tol=1e-15, abs_tol=0), (series, rate)


def test_tls_handshakes_and_failures_are_counted(start, image, tmp_path):
    import nbd
    from tls_certs import make_pki
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    img = image(1 << 20, [(0, b"a" * 4096)])
    d = start(*file_export(img, writable=False), server_extra=",tls-creds=tls0",
              objects=[f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server",
                       f"metrics-http,id=m0,addr.host=127.0.0.1,addr.port={port}"])

    def connect(cert_dir):
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(cert_dir))
        h.set_export_name("disk")
        try:
            h.connect_unix(str(d.sock))
            return h.pread(4096, 0) == b"a" * 4096
        except nbd.Error:
            return False

    assert connect(pki["one"])
    assert not connect(pki["stranger"])

    def counted():
        s = samples(scrape(port)[2])
        return (s["bexd_nbd_tls_handshakes_total"], s["bexd_nbd_tls_handshake_failures_total"])
    wait_until(lambda: counted() == (2, 1), what="2 TLS handshakes, 1 failed, to be counted")


def test_errors_are_counted_by_errno(start, image):
    import nbd
    port = free_port()
    img = image(1 << 20)
    spec = ("driver=raw,node-name=top,file.driver=blkdebug,file.image.driver=file,"
            f"file.image.filename={img},file.inject-error.0.event=read_aio,"
            "file.inject-error.0.once=on")
    d = start([spec], ["type=nbd,id=e0,node-name=top,name=disk,writable=off"],
              objects=[f"metrics-http,id=m0,addr.host=127.0.0.1,addr.port={port}"])
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(d.uri("disk"))
    for request in (lambda: h.pread(4096, 0), lambda: h.pwrite(b"x" * 512, 0),
                    lambda: h.pread(4096, 1 << 20)):
        with pytest.raises(nbd.Error):
            request()
    h.shutdown()
    s = samples(scrape(port)[2])
    errnos = {k: v for k, v in s.items()
              if k.startswith('bexd_export_request_errors_total{export="e0"') and v}
    # The injected EIO failed; the write to a read-only export (EPERM) and the read past the
    # end (EINVAL) were refused before reaching the image.
    assert errnos == {'bexd_export_request_errors_total{export="e0",errno="EIO"}': 1,
                      'bexd_export_request_errors_total{export="e0",errno="EPERM"}': 1,
                      'bexd_export_request_errors_total{export="e0",errno="EINVAL"}': 1}
    assert s['bexd_export_failed_requests_total{export="e0",op="read"}'] == 1
    assert s['bexd_export_invalid_requests_total{export="e0",op="read"}'] == 1
    assert s['bexd_export_invalid_requests_total{export="e0",op="write"}'] == 1
