"""Go's crypto/tls through eBPF uprobes (root and BPF): a real Go TLS server and client, built
here from tests/live/go_tls/main.go with Debian's golang-go, once as built and once stripped
(`-ldflags=-s -w`, no ELF symbol table: the functions are found in `.gopclntab`).

The tracer alone: each binary, serving and calling itself over HTTP/1.1 and HTTP/2, is hooked
(library go, its Go version, both functions) and its plaintext is read with the right
connection in both directions. End to end: `trawl up --interface lo` with `collector.tls.mode:
on`, the unstripped binary serving and the stripped one calling it over HTTP/1.1 and HTTP/2:
every call appears once with its plaintext method, path and status, its 4-tuple and `capture =
tls-uprobe`, and no secret reaches the output.

Skipped, with the reason, only where eBPF uprobes cannot be loaded here or Go is not installed
(`make test` installs both)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import needs_binary, needs_root
from tests.live.test_tls_uprobes_live import make_certificate, trawl_up
from trawl.collector.tls_settings import TlsUprobeSettings
from trawl.collector.tls_uprobes import RawChunk, TlsTracer, availability

pytestmark = [needs_root(), pytest.mark.root, needs_binary("go"), pytest.mark.timeout(240)]

SOURCE = Path(__file__).parent / "go_tls"
SECRETS = ("s3cr3t-go-token", "hunter2-go")


@pytest.fixture(scope="module")
def go_binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The test program built twice: "plain" as `go build` makes it, "stripped" without symbols."""
    build = tmp_path_factory.mktemp("go")
    source = build / "src"
    shutil.copytree(SOURCE, source)
    env = {
        **os.environ,
        "GOCACHE": str(build / "cache"),
        "GOPATH": str(build / "gopath"),
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
    }
    binaries = {"plain": build / "gotls", "stripped": build / "gotls-stripped"}
    for flags, target in (([], binaries["plain"]), (["-ldflags=-s -w"], binaries["stripped"])):
        subprocess.run(["go", "build", *flags, "-o", str(target), "."], cwd=source, env=env, check=True, timeout=300)
    symbols = subprocess.run(["go", "tool", "nm", str(binaries["stripped"])], capture_output=True, text=True, env=env)
    assert "crypto/tls.(*Conn).Write" not in symbols.stdout  # truly stripped
    return binaries


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("cert")
    key, cert = directory / "key.pem", directory / "cert.pem"
    make_certificate(key, cert)
    return cert, key


def skip_without_bpf() -> None:
    reason = availability()
    if reason is not None:
        pytest.skip(f"eBPF uprobes cannot be loaded here: {reason}")


@pytest.mark.parametrize("build", ["plain", "stripped"])
def test_a_go_program_is_hooked_and_its_plaintext_read_in_both_directions(
    build: str, go_binaries: dict[str, Path], certificate: tuple[Path, Path]
) -> None:
    skip_without_bpf()
    cert, key = certificate
    program = subprocess.Popen(
        [str(go_binaries[build]), "self", str(cert), str(key)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    tracer = TlsTracer(TlsUprobeSettings(mode="on"), exclude_pids=frozenset({os.getpid()}))
    try:
        tracer.load()
        tracer.rescan()
        rows = [row for row in tracer.status() if row["pid"] == program.pid]
        assert len(rows) == 1, tracer.status()
        row = rows[0]
        assert (row["library"], row["hooked"], row["reason"]) == ("go", True, ""), row
        assert row["version"].startswith("go1.") and row["path"] == str(go_binaries[build])
        assert row["symbols"] == ["crypto/tls.(*Conn).Write", "crypto/tls.(*Conn).Read"]
        assert program.stdin is not None and program.stdout is not None
        program.stdin.write("go\n")
        program.stdin.flush()
        chunks: list[RawChunk] = []
        deadline = time.monotonic() + 30
        while program.poll() is None and time.monotonic() < deadline:
            chunks += [chunk for chunk in tracer.poll(20) if chunk.pid == program.pid]
        for _ in range(5):  # what the program did just before it exited
            chunks += [chunk for chunk in tracer.poll(20) if chunk.pid == program.pid]
        assert program.wait(timeout=10) == 0
        output = program.stdout.read().split()
        losses = tracer.kernel_losses()
    finally:
        if program.poll() is None:
            program.kill()
            program.wait()
        tracer.close()
    # "<server port> <h1 client port> HTTP/1.1:200 ... <server port> <h2 client port> HTTP/2.0:200 ..."
    server_port, h1_port, h2_port = int(output[0]), int(output[1]), int(output[7])
    assert output[2:6] == ["HTTP/1.1:200", "HTTP/1.1:200", "HTTP/1.1:404", "HTTP/1.1:401"], output
    assert output[8:12] == ["HTTP/2.0:200", "HTTP/2.0:200", "HTTP/2.0:404", "HTTP/2.0:401"], output
    assert all(chunk.library == "go" for chunk in chunks)

    def stream(client_port: int, direction: int, server_side: bool) -> bytes:
        """The bytes one end wrote (direction 1) or read (2) on the connection of client_port."""
        local = server_port if server_side else client_port
        remote = client_port if server_side else server_port
        picked = [
            chunk
            for chunk in chunks
            if chunk.direction == direction
            and chunk.ends is not None
            and (chunk.ends.local_port, chunk.ends.remote_port) == (local, remote)
        ]
        return b"".join(chunk.data for chunk in sorted(picked, key=lambda chunk: chunk.ts_ns))

    written_by_client = stream(h1_port, 1, server_side=False)
    assert written_by_client.startswith(b"GET /orders/1 HTTP/1.1\r\n")
    assert written_by_client.count(b"HTTP/1.1\r\n") == 4 and b"POST /login HTTP/1.1" in written_by_client
    # Both ends hooked: what the client wrote is what the server read, byte for byte.
    assert stream(h1_port, 2, server_side=True) == written_by_client
    assert stream(h1_port, 1, server_side=True).startswith(b"HTTP/1.1 200 OK\r\n")
    assert stream(h1_port, 2, server_side=False) == stream(h1_port, 1, server_side=True)
    h2_client = stream(h2_port, 1, server_side=False)
    assert h2_client.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") and b"hunter2-go" in h2_client
    assert stream(h2_port, 2, server_side=True) == h2_client
    assert b'{"order": "2", "proto": "HTTP/2.0"}' in stream(h2_port, 2, server_side=False)
    assert losses["calls_table_full"] == losses["ring_full"] == losses["read_fault"] == 0, losses


def test_go_http1_and_http2_calls_end_to_end(
    tmp_path: Path, go_binaries: dict[str, Path], certificate: tuple[Path, Path]
) -> None:
    """The unstripped binary serves; the stripped one calls it, one client per HTTP version.
    All three run before the suite starts, so its first scan hooks them."""
    skip_without_bpf()
    cert, key = certificate
    server = subprocess.Popen(
        [str(go_binaries["plain"]), "serve", str(cert), str(key)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    clients: dict[str, subprocess.Popen[str]] = {}
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        for version in ("h1", "h2"):
            clients[version] = subprocess.Popen(
                [str(go_binaries["stripped"]), "get", str(port), version],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        outputs: dict[str, list[str]] = {}
        with trawl_up(tmp_path) as run:
            for version, client in clients.items():
                output, _ = client.communicate("go\n", timeout=60)
                assert client.returncode == 0
                outputs[version] = output.split()
    finally:
        for process in (server, *clients.values()):
            if process.poll() is None:
                process.kill()
            process.wait()
    assert outputs["h1"][1:] == ["HTTP/1.1:200", "HTTP/1.1:200", "HTTP/1.1:404", "HTTP/1.1:401"], outputs
    assert outputs["h2"][1:] == ["HTTP/2.0:200", "HTTP/2.0:200", "HTTP/2.0:404", "HTTP/2.0:401"], outputs
    ours = run.calls(port)
    plaintext = [call for call in ours if call.get("capture") == "tls-uprobe"]
    seen = sorted(
        (call["protocol"], call.get("method", ""), call.get("path", ""), call.get("status", "")) for call in plaintext
    )
    expected = [
        (protocol, method, path, status)
        for protocol in ("http", "http2")
        for method, path, status in (
            ("GET", "/orders/1", "200"),
            ("GET", "/orders/2", "200"),
            ("GET", "/missing", "404"),
            ("POST", "/login", "401"),
        )
    ]
    assert seen == sorted(expected), (seen, json.dumps(plaintext)[:300])
    client_port = {"http": int(outputs["h1"][0]), "http2": int(outputs["h2"][0])}
    for call in plaintext:
        assert (call["src"]["ip"], call["src"]["port"]) == ("127.0.0.1", client_port[call["protocol"]]), call
        assert (call["dst"]["ip"], call["dst"]["port"]) == ("127.0.0.1", port), call
    # The encrypted packets of these connections give their handshakes, no blind call.
    packet_calls = [call for call in ours if call.get("capture", "packet") == "packet"]
    assert {call["protocol"] for call in packet_calls} - {"tcp"} <= {"tls"}
    everything = "".join(run.lines)
    for secret in SECRETS:
        assert secret not in everything
    stopped = run.tls_capture_stopped()
    assert stopped["lost"] == 0 and stopped["chunks"] > 0, stopped
    run.check_logs()
