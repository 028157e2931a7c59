"""TLS plaintext through eBPF uprobes, end to end (root and BPF): `trawl up --interface lo
--tls` (`collector.tls.mode: on`), a real OpenSSL server (Python's ssl module, which links the
system libssl) and two real OpenSSL clients (Python's http.client, and curl through libcurl)
exchanging HTTP/1.1 over TLS on loopback. Every call appears once with its plaintext method,
path and status, its 4-tuple and `capture = tls-uprobe`; the packets of the same connections
give only their TLS handshake calls; secrets are redacted; no chunk is lost.

Skipped, with the reason, only where eBPF uprobes cannot be loaded here (not root, no bcc, no
kernel headers, no tracefs, a kernel without ring buffers): `make test` installs what they need."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import needs_binary, needs_root
from tests.fixtures.tcpdump_capture import free_port
from tests.integration.test_up import processes_mentioning

pytestmark = [needs_root(), pytest.mark.root, needs_binary("curl"), needs_binary("openssl"), pytest.mark.timeout(180)]

BIG = 300_000  # bytes of /big: more than one SSL_read, more than the program's bytes per call


def bpf_unavailable() -> str | None:
    from trawl.collector.tls_uprobes import availability

    return availability()


class Shop(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: several calls on one TLS connection

    def do_GET(self) -> None:
        if self.path == "/big":
            self._reply(200, b"x" * BIG)
        elif self.path.startswith("/orders/"):
            self._reply(200, json.dumps({"order": self.path.rsplit("/", 1)[1]}).encode())
        else:
            self._reply(404, b"no such page")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._reply(401 if body.get("password") != "right" else 200, b"{}")

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


def make_certificate(key: Path, cert: Path) -> None:
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )


def tls_server(tmp_path: Path) -> ThreadingHTTPServer:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    make_certificate(key, cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Shop)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def wait_for(path: Path, text: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text} not in {path}: {path.read_text()[-2000:] if path.exists() else 'no file'}")


@dataclass
class UpRun:
    """A `trawl up --interface lo --json` with TLS uprobes on, as it ran."""

    state: Path
    lines: list[str]

    def calls(self, port: int) -> list[dict[str, Any]]:
        """The calls to or from `port`."""
        calls = [json.loads(line) for line in self.lines if line.startswith("{")]
        return [call for call in calls if port in (call["dst"]["port"], call["src"]["port"])]

    def tls_capture_stopped(self) -> dict[str, Any]:
        log = (self.state / "logs" / "collector.log").read_text()
        stopped = [json.loads(line) for line in log.splitlines() if "tls_capture_stopped" in line]
        assert len(stopped) == 1, log[-2000:]
        return stopped[0]

    def check_logs(self) -> None:
        for path in (self.state / "logs").iterdir():
            assert '"level": "error"' not in path.read_text(), f"{path.name}: {path.read_text()[-1500:]}"
        assert processes_mentioning(str(self.state)) == []


@contextlib.contextmanager
def trawl_up(tmp_path: Path) -> Iterator[UpRun]:
    """Start the suite, wait until TLS chunks are followed, run the body's traffic, then stop
    it with SIGINT as a terminal would."""
    reason = bpf_unavailable()
    if reason is not None:
        pytest.skip(f"eBPF uprobes cannot be loaded here: {reason}")
    config = tmp_path / "trawl.yaml"
    # Bodies kept short: this test captures all of lo, other programs' traffic included.
    config.write_text(
        yaml.safe_dump({"collector": {"tls": {"scan_interval_s": 1.0}}, "dissector": {"max_body_bytes": 1024}})
    )
    run = UpRun(tmp_path / "state", [])
    # --tls turns the uprobes on (collector.tls.mode on); the config adds a faster rescan.
    command = [sys.executable, "-m", "trawl", "up", "--interface", "lo", "--tls", "--json", "--config", str(config)]
    process = subprocess.Popen(
        [*command, "--state-dir", str(run.state)],
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "stderr.txt").open("w"),
        text=True,
        start_new_session=True,
    )
    # Read as it comes: a pipe left full makes `trawl up`'s writes of long lines fail part way.
    reader = threading.Thread(target=lambda: run.lines.extend(process.stdout or ()), daemon=True)
    reader.start()
    try:
        logs = run.state / "logs"
        wait_for(logs / "collector.log", "service_ready")
        wait_for(logs / "collector.log", "tls_uprobes_loaded")
        wait_for(logs / "dissector.log", "tls_chunks_followed")
        yield run
        time.sleep(3.0)  # a chunk batch is cut within 50 ms, then dissected and enriched
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=90)
        reader.join(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert "Traceback" not in (tmp_path / "stderr.txt").read_text()


def test_openssl_clients_and_server_on_loopback_show_their_plaintext_calls(tmp_path: Path) -> None:
    server = tls_server(tmp_path)
    port = server.server_address[1]
    client_ports: dict[str, int] = {}
    try:
        with trawl_up(tmp_path) as run:
            unverified = ssl._create_unverified_context()
            connection = http.client.HTTPSConnection("127.0.0.1", port, context=unverified, timeout=10)
            for index in range(3):
                connection.request("GET", f"/orders/{index}", headers={"Authorization": "Bearer s3cr3t-token"})
                response = connection.getresponse()
                assert response.status == 200 and json.loads(response.read()) == {"order": str(index)}
            assert connection.sock is not None
            client_ports["http.client"] = connection.sock.getsockname()[1]
            login = json.dumps({"user": "ann", "password": "hunter2"})
            connection.request("POST", "/login", body=login, headers={"Content-Type": "application/json"})
            assert connection.getresponse().read() == b"{}"
            connection.request("GET", "/big")
            assert len(connection.getresponse().read()) == BIG
            connection.close()
            curl = subprocess.run(
                ["curl", "-sk", "--http1.1", "-H", "Cookie: session=abc123", f"https://127.0.0.1:{port}/missing"],
                capture_output=True,
                timeout=30,
                check=True,
            )
            assert curl.stdout == b"no such page"
    finally:
        server.shutdown()
        server.server_close()
    ours = run.calls(port)
    plaintext = [call for call in ours if call.get("capture") == "tls-uprobe"]
    seen = sorted((call["method"], call["path"], call["status"]) for call in plaintext)
    assert seen == [
        ("GET", "/big", "200"),
        ("GET", "/missing", "404"),
        ("GET", "/orders/0", "200"),
        ("GET", "/orders/1", "200"),
        ("GET", "/orders/2", "200"),
        ("POST", "/login", "401"),
    ], json.dumps(plaintext)[:3000]
    for call in plaintext:
        assert call["protocol"] == "http"
        assert (call["src"]["ip"], call["dst"]["ip"], call["dst"]["port"]) == ("127.0.0.1", "127.0.0.1", port)
        if call["path"] != "/missing":
            assert call["src"]["port"] == client_ports["http.client"]
    curl_call = next(call for call in plaintext if call["path"] == "/missing")
    # The encrypted packets of these connections give their handshakes (and TCP diagnostics:
    # /big's zero windows, a close with unread bytes), and no blind call of the bytes inside.
    packet_calls = [call for call in ours if call.get("capture", "packet") == "packet"]
    assert {call["protocol"] for call in packet_calls} - {"tcp"} == {"tls"}
    handshakes = {call["src"]["port"] for call in packet_calls if call["method"] == "handshake"}
    assert handshakes == {client_ports["http.client"], curl_call["src"]["port"]}
    everything = "".join(run.lines)
    for secret in ("s3cr3t", "hunter2", "abc123"):
        assert secret not in everything
    stopped = run.tls_capture_stopped()
    assert stopped["lost"] == 0 and stopped["chunks"] > 0, stopped
    # The server wrote /big's body in one SSL_write, beyond the 8 x 16 KiB sent of a call: the
    # rest was counted (that view was the peer's; the client's reads carried all of it).
    assert stopped["lost_by_reason"]["truncated_bytes"] >= BIG - 8 * 16384, stopped
    run.check_logs()


@needs_binary("nghttpd")
@needs_binary("nghttp")
def test_http2_over_tls_from_nghttp2_and_curl(tmp_path: Path) -> None:
    """nghttpd (libnghttp2 over OpenSSL) serves HTTP/2 over TLS; curl and nghttp (OpenSSL too)
    fetch from it, several streams on one connection: each stream is one http2 call."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    make_certificate(key, cert)
    docroot = tmp_path / "www"
    docroot.mkdir()
    (docroot / "a.txt").write_text("alpha\n")
    (docroot / "b.txt").write_text("beta\n" * 1000)
    port = free_port()
    server = subprocess.Popen(
        ["nghttpd", "-d", str(docroot), "--address=127.0.0.1", str(port), str(key), str(cert)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with trawl_up(tmp_path) as run:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
                time.sleep(0.1)
            base = f"https://127.0.0.1:{port}"
            curl = subprocess.run(
                ["curl", "-sk", "--http2", f"{base}/a.txt", f"{base}/b.txt", f"{base}/nope"],
                capture_output=True,
                timeout=30,
                check=True,
            )
            assert curl.stdout.startswith(b"alpha\nbeta\n")
            fetched = subprocess.run(
                ["nghttp", "-n", f"{base}/a.txt", f"{base}/b.txt"], capture_output=True, timeout=30, check=False
            )
            assert fetched.returncode == 0, fetched.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)
    plaintext = [call for call in run.calls(port) if call.get("capture") == "tls-uprobe"]
    seen = sorted((call["protocol"], call["method"], call["path"], call["status"]) for call in plaintext)
    assert seen == sorted(
        [
            ("http2", "GET", "/a.txt", "200"),
            ("http2", "GET", "/b.txt", "200"),
            ("http2", "GET", "/nope", "404"),
            ("http2", "GET", "/a.txt", "200"),
            ("http2", "GET", "/b.txt", "200"),
        ]
    ), json.dumps(plaintext)[:3000]
    assert {call["dst"]["port"] for call in plaintext} == {port}
    assert len({call["src"]["port"] for call in plaintext}) == 2  # one connection per client
    stopped = run.tls_capture_stopped()
    assert stopped["lost"] == 0, stopped
    run.check_logs()


def start_collector(tmp_path: Path, nats_url: str, mode: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    config = tmp_path / f"collector-{mode}.yaml"
    config.write_text(
        yaml.safe_dump({"node": "tls-node", "nats": {"servers": [nats_url]}, "collector": {"tls": {"mode": mode}}})
    )
    command = [sys.executable, "-m", "trawl", "collector", "--config", str(config)]
    if prefix:
        command = [*prefix, "--", "-c", " ".join(command)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_tls_status_names_each_hooked_process(tmp_path: Path, nats_url: str) -> None:
    """`trawl tls status` asks the running collector: this test's own process maps the system
    libssl (Python's ssl module), so it is listed as hooked, with its library and symbols."""
    reason = bpf_unavailable()
    if reason is not None:
        pytest.skip(f"eBPF uprobes cannot be loaded here: {reason}")
    assert ssl.OPENSSL_VERSION
    collector = start_collector(tmp_path, nats_url, "on")
    try:
        deadline = time.monotonic() + 60
        reports: list[dict[str, Any]] = []
        while time.monotonic() < deadline and collector.poll() is None:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "trawl",
                    "tls",
                    "status",
                    "--nats-url",
                    nats_url,
                    "--json",
                    "--timeout-s",
                    "0.5",
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            reports = json.loads(done.stdout) if done.stdout.startswith("[") else []
            if reports and reports[0]["bpf"] == "loaded" and reports[0]["processes"]:
                break
            time.sleep(0.5)
        assert [report["node"] for report in reports] == ["tls-node"], reports
        ours = [row for row in reports[0]["processes"] if (row["pid"], row["library"]) == (os.getpid(), "openssl")]
        assert len(ours) == 1, reports
        assert ours[0]["hooked"] is True and ours[0]["library"] == "openssl" and ours[0]["reason"] == ""
        assert {"SSL_read", "SSL_write"} <= set(ours[0]["symbols"])
        assert done.returncode == 0
        text = subprocess.run(
            [sys.executable, "-m", "trawl", "tls", "status", "--nats-url", nats_url, "--timeout-s", "0.5"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert text.startswith("node tls-node: BPF loaded; chunks published")
        line = next(line for line in text.splitlines() if line.split()[:1] == [str(os.getpid())] and "libssl" in line)
        assert " yes " in line
    finally:
        collector.terminate()
        output, _ = collector.communicate(timeout=30)
    assert collector.returncode == 0, output[-2000:]
    assert "Traceback" not in output


@needs_binary("capsh")
def test_mode_on_without_the_capabilities_fails_the_start_in_one_line(tmp_path: Path, nats_url: str) -> None:
    """Root without CAP_BPF and CAP_SYS_ADMIN: the kernel refuses the program, and a collector
    told `tls.mode: on` says so in one line and exits 2; with `auto` it runs on and its status
    says why nothing is hooked."""
    if bpf_unavailable() is not None:
        pytest.skip(f"eBPF uprobes cannot be loaded here: {bpf_unavailable()}")
    assert ssl.OPENSSL_VERSION
    drop = ("capsh", "--drop=cap_bpf,cap_sys_admin,cap_perfmon")
    collector = start_collector(tmp_path, nats_url, "on", drop)
    output, _ = collector.communicate(timeout=60)
    assert collector.returncode == 2, output[-2000:]
    last = output.strip().splitlines()[-1]
    assert last == (
        "trawl collector: tls.mode is on but TLS uprobes cannot be used: no permission: missing CAP_SYS_ADMIN"
        " (attach uprobes), CAP_BPF (load eBPF programs); run the collector privileged (or as root)"
    ), last
    assert "Traceback" not in output

    collector = start_collector(tmp_path, nats_url, "auto", drop)
    try:
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline and collector.poll() is None:
            text = subprocess.run(
                [sys.executable, "-m", "trawl", "tls", "status", "--nats-url", nats_url, "--timeout-s", "0.5"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout
            # Asked while the collector still looks at the processes, the status says "loading".
            if text.startswith("node tls-node") and not text.startswith("node tls-node: BPF loading"):
                break
            time.sleep(0.5)
        assert text.startswith("node tls-node: BPF no permission: missing CAP_SYS_ADMIN"), text
        # This process maps libssl: listed as not hooked, with the reason.
        line = next(line for line in text.splitlines() if line.split()[:1] == [str(os.getpid())] and "libssl" in line)
        assert " no " in line and "no permission: missing CAP_SYS_ADMIN" in line
    finally:
        collector.terminate()
        collector.communicate(timeout=30)
