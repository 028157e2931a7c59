"""Go's crypto/tls through eBPF uprobes (root and BPF): a real Go TLS server and client, built
here from tests/live/go_tls/main.go with Debian's golang-go, once as built and once stripped
(`-ldflags=-s -w`, no ELF symbol table: the functions are found in `.gopclntab`).

The tracer alone: each binary, serving and calling itself over HTTP/1.1 and HTTP/2, is hooked
(library go, its Go version, both functions) and its plaintext is read with the right
connection in both directions. End to end: `trawl up --interface lo` with `collector.tls.mode:
on`, the unstripped binary serving and the stripped one calling it over HTTP/1.1 and HTTP/2:
every call appears once with its plaintext method, path and status, its 4-tuple and `capture =
tls-uprobe`, and no secret reaches the output.

Go's calling conventions: the same program built with GOEXPERIMENT=noregabi is hooked and
read as well, and reported with the register ABI it has (Go 1.18 and later keep the register
ABI on amd64 whatever GOEXPERIMENT asks; its build information records the request). The stack
ABI's probes are tested on the program's stack-ABI stand-in (go_tls/stackabi_amd64.s: assembly
functions, which Go calls with the stack ABI, through which its `stackself` mode sends all its
TLS, its goroutine stacks copied elsewhere while the hooked calls are in flight): the tracer
hooks them as a Go 1.16 binary's (*Conn).Read and Write, and reads both ends' plaintext.

Skipped, with the reason, only where eBPF uprobes cannot be loaded here or Go is not installed
(`make test` installs both)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import needs_binary, needs_root
from tests.live.test_tls_uprobes_live import make_certificate, trawl_up
from trawl.collector import tls_go
from trawl.collector.tls_settings import TlsUprobeSettings
from trawl.collector.tls_targets import TlsLibrary
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
    binaries = {}
    for build_name, flags, experiment in (
        ("plain", [], ""),
        ("stripped", ["-ldflags=-s -w"], ""),
        ("noregabi", [], "noregabi"),
        ("noregabi-stripped", ["-ldflags=-s -w"], "noregabi"),
    ):
        target = binaries[build_name] = build / f"gotls-{build_name}"
        build_env = {**env, "GOEXPERIMENT": experiment} if experiment else env
        subprocess.run(
            ["go", "build", *flags, "-o", str(target), "."], cwd=source, env=build_env, check=True, timeout=300
        )
    for build_name in ("stripped", "noregabi-stripped"):
        symbols = subprocess.run(["go", "tool", "nm", str(binaries[build_name])], capture_output=True, text=True)
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


@pytest.mark.parametrize("build", ["plain", "stripped", "noregabi", "noregabi-stripped"])
def test_a_go_program_is_hooked_and_its_plaintext_read_in_both_directions(
    build: str, go_binaries: dict[str, Path], certificate: tuple[Path, Path]
) -> None:
    skip_without_bpf()
    binary = tls_go.inspect(str(go_binaries[build]))
    assert binary is not None and binary.error == ""
    # GOEXPERIMENT=noregabi is recorded, and compiles the register ABI all the same (Go 1.19).
    assert (binary.abi, binary.experiment) == ("register", "noregabi" if "noregabi" in build else "")
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
        assert row["abi"] == "register"
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


def tls_status(state: Path) -> list[dict[str, Any]]:
    """`trawl tls status --json` of the running suite (its NATS is in the state's config)."""
    servers = yaml.safe_load((state / "trawl.yaml").read_text())["nats"]["servers"]
    done = subprocess.run(
        [sys.executable, "-m", "trawl", "tls", "status", "--nats-url", servers[0], "--json", "--timeout-s", "0.5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    reports: list[dict[str, Any]] = json.loads(done.stdout)
    assert [report["bpf"] for report in reports] == ["loaded"], reports
    text = subprocess.run(
        [sys.executable, "-m", "trawl", "tls", "status", "--nats-url", servers[0], "--timeout-s", "0.5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "go go1." in text and "(register ABI)" in text, text
    return reports


@pytest.mark.parametrize("flavour", ["", "noregabi"])
def test_go_http1_and_http2_calls_end_to_end(
    flavour: str, tmp_path: Path, go_binaries: dict[str, Path], certificate: tuple[Path, Path]
) -> None:
    """The unstripped binary serves; the stripped one calls it, one client per HTTP version.
    All three run before the suite starts, so its first scan hooks them; `trawl tls status`
    lists them hooked, library go, with their ABI."""
    skip_without_bpf()
    cert, key = certificate
    plain, stripped = ("noregabi", "noregabi-stripped") if flavour else ("plain", "stripped")
    server = subprocess.Popen(
        [str(go_binaries[plain]), "serve", str(cert), str(key)],
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
                [str(go_binaries[stripped]), "get", str(port), version],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        outputs: dict[str, list[str]] = {}
        with trawl_up(tmp_path) as run:
            status = tls_status(run.state)
            for version, client in clients.items():
                output, _ = client.communicate("go\n", timeout=60)
                assert client.returncode == 0
                outputs[version] = output.split()
    finally:
        for process in (server, *clients.values()):
            if process.poll() is None:
                process.kill()
            process.wait()
    rows = {row["pid"]: row for report in status for row in report["processes"]}
    for process, binary in ((server, plain), *((client, stripped) for client in clients.values())):
        row = rows[process.pid]
        assert (row["hooked"], row["library"], row["abi"], row["path"]) == (
            True,
            "go",
            "register",
            str(go_binaries[binary]),
        ), row
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


def test_the_stack_abi_probes_read_what_a_stack_abi_function_moved(
    go_binaries: dict[str, Path], certificate: tuple[Path, Path]
) -> None:
    """The stack ABI's programs, on the stand-in's assembly functions (go_tls/stackabi_amd64.s),
    which take their arguments and give their results on the stack as Go 1.16's (*Conn).Read
    and Write do: hooked as those would be (found in .gopclntab, RETs by disassembly, the ABI
    read from their prologues), both ends' plaintext is read once, with its connection, paired
    entry to return while the goroutines' stacks are copied elsewhere mid-call. The client
    writes as Go 1.16 does over TLS 1.0 with a CBC cipher (b's first byte alone, then b =
    b[1:]: its frame no longer holds the buffer it was called with), the server plainly."""
    skip_without_bpf()
    cert, key = certificate
    path = str(go_binaries["stripped"])
    with open(path, "rb") as file:
        elf = tls_go._Elf(file)
        table = elf.section(".gopclntab")
        assert table is not None
        stand_ins = {
            "main.stackWrite": tls_go.WRITE,
            "main.stackWriteSplit": tls_go.WRITE,
            "main.stackRead": tls_go.READ,
        }
        found = tls_go._pclntab_functions(table, set(stand_ins))
        functions = []
        for stand_in, name in stand_ins.items():
            entry, end = found[stand_in]
            code = elf.at(entry, end - entry)
            assert tls_go.abi_of_prologue(code, entry) == "stack"
            functions.append(tls_go.GoFunction(name, entry, tls_go.returns_of(code, entry)))
    program = subprocess.Popen(
        [path, "stackself", str(cert), str(key)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    tracer = TlsTracer(TlsUprobeSettings(mode="on"), exclude_pids=frozenset({os.getpid()}))
    try:
        tracer.load()
        stat = os.stat(path)
        binary = tls_go.GoBinary("go1.16 (stand-in)", functions, abi="stack")
        library = TlsLibrary(path, path, "go", binary.version, {program.pid}, go=binary)
        tracer.hook((stat.st_dev, stat.st_ino), library)
        [row] = tracer.status()
        assert (row["hooked"], row["abi"], row["reason"]) == (True, "stack", ""), row
        assert program.stdin is not None and program.stdout is not None
        program.stdin.write("go\n")
        program.stdin.flush()
        chunks: list[RawChunk] = []
        deadline = time.monotonic() + 30
        while program.poll() is None and time.monotonic() < deadline:
            chunks += [chunk for chunk in tracer.poll(20) if chunk.pid == program.pid]
        for _ in range(5):
            chunks += [chunk for chunk in tracer.poll(20) if chunk.pid == program.pid]
        assert program.wait(timeout=10) == 0
        output = program.stdout.read().split()
        losses = tracer.kernel_losses()
    finally:
        if program.poll() is None:
            program.kill()
            program.wait()
        tracer.close()
    # "<server port> <client port> HTTP/1.1:200 HTTP/1.1:200 HTTP/1.1:404 HTTP/1.1:401 moves=<n>"
    server_port, client_port = int(output[0]), int(output[1])
    assert output[2:6] == ["HTTP/1.1:200", "HTTP/1.1:200", "HTTP/1.1:404", "HTTP/1.1:401"], output
    assert int(output[6].removeprefix("moves=")) > 0  # stacks were copied while calls were in flight
    assert chunks and all(chunk.library == "go" and chunk.ends is not None for chunk in chunks)

    def stream(direction: int, server_side: bool) -> bytes:
        local, remote = (server_port, client_port) if server_side else (client_port, server_port)
        picked = [
            chunk
            for chunk in chunks
            if chunk.direction == direction
            and chunk.ends is not None
            and (chunk.ends.local_port, chunk.ends.remote_port) == (local, remote)
        ]
        return b"".join(chunk.data for chunk in sorted(picked, key=lambda chunk: chunk.ts_ns))

    written_by_client = stream(1, server_side=False)
    assert written_by_client.startswith(b"GET /orders/1 HTTP/1.1\r\n")
    # Each request once: the stand-in alone is hooked, not crypto/tls's own functions.
    assert written_by_client.count(b"HTTP/1.1\r\n") == 4 and b"hunter2-go" in written_by_client
    assert stream(2, server_side=True) == written_by_client
    answers = stream(1, server_side=True)
    assert answers.startswith(b"HTTP/1.1 200 OK\r\n") and answers.count(b"HTTP/1.1 ") == 4
    assert stream(2, server_side=False) == answers
    assert losses["calls_table_full"] == losses["ring_full"] == losses["read_fault"] == 0, losses
