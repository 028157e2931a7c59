"""OpenSSL linked statically into an executable (root and BPF): a small C program built here
against Debian's libssl.a and libcrypto.a (tests/live/static_tls), a TLS client and server in
two processes of that one file. The tracer finds SSL_read/SSL_write among the executable's own
symbols, hooks them, and reads both ends' plaintext with their connection; `trawl tls status`'s
row says openssl static.

Skipped, with the reason, only where eBPF uprobes cannot be loaded here or libssl-dev is not
installed (`make test` installs both)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import needs_binary, needs_root
from tests.live.test_tls_uprobes_live import make_certificate
from trawl.collector.tls_settings import TlsUprobeSettings
from trawl.collector.tls_uprobes import RawChunk, TlsTracer, availability

pytestmark = [
    needs_root(),
    pytest.mark.root,
    needs_binary("gcc"),
    pytest.mark.skipif(
        not Path("/usr/include/openssl/ssl.h").exists(), reason="needs libssl-dev (make test installs it)"
    ),
    pytest.mark.timeout(120),
]

SOURCE = Path(__file__).parent / "static_tls" / "static_tls.c"


def test_an_executable_with_openssl_linked_in_is_hooked_by_its_own_symbols(tmp_path: Path) -> None:
    reason = availability()
    if reason is not None:
        pytest.skip(f"eBPF uprobes cannot be loaded here: {reason}")
    program_path = tmp_path / "static_tls"
    static_ssl = ["-Wl,-Bstatic", "-lssl", "-lcrypto", "-Wl,-Bdynamic", "-ldl", "-lpthread"]
    subprocess.run(
        ["gcc", "-O1", "-o", str(program_path), str(SOURCE), *static_ssl],
        check=True,
        timeout=120,
    )
    linked = subprocess.run(["ldd", str(program_path)], capture_output=True, text=True, check=True).stdout
    assert "libssl" not in linked  # OpenSSL is inside the executable
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    make_certificate(key, cert)
    program = subprocess.Popen(
        [str(program_path), str(cert), str(key)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    tracer = TlsTracer(TlsUprobeSettings(mode="on"), exclude_pids=frozenset({os.getpid()}))
    try:
        tracer.load()
        tracer.rescan()
        rows = [row for row in tracer.status() if row["pid"] == program.pid]
        assert len(rows) == 1, tracer.status()
        row = rows[0]
        assert (row["library"], row["version"], row["hooked"], row["path"]) == (
            "openssl",
            "static",
            True,
            str(program_path),
        ), row
        assert set(row["symbols"]) == {"SSL_read", "SSL_write", "SSL_read_ex", "SSL_write_ex"}
        output, _ = program.communicate("go\n", timeout=60)
        assert program.returncode == 0
        chunks: list[RawChunk] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(chunk.direction == 2 for chunk in chunks):
            chunks += [chunk for chunk in tracer.poll(20) if chunk.comm == "static_tls"]
        chunks += [chunk for chunk in tracer.poll(20) + tracer.drain() if chunk.comm == "static_tls"]
    finally:
        if program.poll() is None:
            program.kill()
            program.wait()
        tracer.close()
    *reply, client_port, server_port = output.split()
    assert reply == ["pong", "ping", "from", "a", "static", "build"], output
    seen = {
        (chunk.direction, chunk.data, chunk.ends.local_port if chunk.ends else None, chunk.pid == program.pid)
        for chunk in chunks
    }
    ping, pong = b"ping from a static build", b"pong ping from a static build"
    client, server = int(client_port), int(server_port)
    # The client (the first process) writes ping and reads pong; the server (its child) the reverse.
    assert {(1, ping, client, True), (2, pong, client, True), (2, ping, server, False), (1, pong, server, False)} <= (
        seen
    ), seen
