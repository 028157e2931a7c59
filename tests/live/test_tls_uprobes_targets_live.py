"""The collector's tracer following processes (root and BPF): a program started after the
tracer, with its own copy of libssl (another file, another inode), is hooked after its exec
(the sched_process_exec tracepoint, no rescan timer), its calls are read with their
connection, and its library is unhooked once no process maps it. The program is Python's ssl
over the copied library (LD_LIBRARY_PATH), talking to a TLS server in the same process."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import needs_root
from tests.live.test_tls_uprobes_live import make_certificate
from trawl.collector.tls_settings import TlsUprobeSettings
from trawl.collector.tls_uprobes import RawChunk, TlsTracer, availability

pytestmark = [needs_root(), pytest.mark.root, pytest.mark.timeout(120)]

PROGRAM = r"""
import socket, ssl, sys, threading, time
time.sleep(4.0)  # the tracer looks at a new program up to 3 s after its exec
server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
server_context.load_cert_chain(sys.argv[1], sys.argv[2])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
def serve():
    conn, _ = listener.accept()
    tls = server_context.wrap_socket(conn, server_side=True)
    tls.sendall(b"pong " + tls.recv(100))
    tls.close()
threading.Thread(target=serve).start()
client = ssl._create_unverified_context().wrap_socket(socket.create_connection(listener.getsockname()))
client.sendall(b"ping from the copy")
print(client.recv(100).decode(), client.getsockname()[1], listener.getsockname()[1], flush=True)
"""


def libssl_path() -> Path:
    maps = Path("/proc/self/maps").read_text()
    assert ssl.OPENSSL_VERSION
    return Path(next(line.split()[-1] for line in maps.splitlines() if "/libssl.so" in line))


def test_a_new_program_with_its_own_libssl_is_hooked_at_exec_and_unhooked_after(tmp_path: Path) -> None:
    reason = availability()
    if reason is not None:
        pytest.skip(f"eBPF uprobes cannot be loaded here: {reason}")
    system = libssl_path()
    copy_dir = tmp_path / "lib"
    copy_dir.mkdir()
    copy = copy_dir / system.name
    shutil.copy2(system, copy)
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    make_certificate(key, cert)
    tracer = TlsTracer(TlsUprobeSettings(mode="on"), exclude_pids=frozenset({os.getpid()}))
    tracer.load()
    try:
        tracer.rescan()
        copy_inode = copy.stat().st_ino
        assert all(key[1] != copy_inode for key in tracer.hooks)  # nobody maps the copy yet
        program = subprocess.Popen(
            [sys.executable, "-c", PROGRAM, str(cert), str(key)],
            env={**os.environ, "LD_LIBRARY_PATH": str(copy_dir)},
            stdout=subprocess.PIPE,
            text=True,
        )
        chunks: list[RawChunk] = []
        deadline = time.monotonic() + 30
        while program.poll() is None and time.monotonic() < deadline:
            chunks += [chunk for chunk in tracer.poll(20) if chunk.pid == program.pid]
        output, _ = program.communicate(timeout=30)
        # What poll still holds back for ordering.
        chunks += [chunk for chunk in tracer.poll(20) + tracer.drain() if chunk.pid == program.pid]
        *reply, client_port, server_port = output.split()
        assert reply == ["pong", "ping", "from", "the", "copy"], output
        hooked = [hook for key, hook in tracer.hooks.items() if key[1] == copy_inode]
        assert len(hooked) == 1 and hooked[0].library.path == str(copy)
        assert {"SSL_read_ex", "SSL_write_ex"} <= set(hooked[0].symbols)
        texts = {(chunk.direction, chunk.data) for chunk in chunks}
        assert (1, b"ping from the copy") in texts and (2, b"pong ping from the copy") in texts, texts
        client_view = next(chunk for chunk in chunks if chunk.data == b"ping from the copy" and chunk.direction == 1)
        assert client_view.ends is not None
        assert (client_view.ends.local_port, client_view.ends.remote_port) == (int(client_port), int(server_port))
        # The program has exited: a full rescan unhooks the library nobody maps.
        tracer.rescan()
        assert all(key[1] != copy_inode for key in tracer.hooks)
    finally:
        tracer.close()


PINGPONG = r"""
import os, socket, ssl, sys
rounds = int(sys.argv[3])
server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
server_context.load_cert_chain(sys.argv[1], sys.argv[2])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
if os.fork() == 0:
    conn, _ = listener.accept()
    tls = server_context.wrap_socket(conn, server_side=True)
    for _ in range(rounds):
        tls.recv(100)
        tls.sendall(b"pong")
    os._exit(0)
client = ssl._create_unverified_context().wrap_socket(socket.create_connection(listener.getsockname()))
for _ in range(rounds):
    client.sendall(b"ping")
    client.recv(100)
os.wait()
"""


def test_a_ring_too_small_for_the_load_loses_chunks_and_counts_every_one(tmp_path: Path) -> None:
    """A 64 KiB ring, not read while two processes make 8,000 hooked SSL calls: the ring fills,
    nothing crashes, and the chunks read plus the chunks counted lost cover every call."""
    reason = availability()
    if reason is not None:
        pytest.skip(f"eBPF uprobes cannot be loaded here: {reason}")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    make_certificate(key, cert)
    rounds = 2000
    tracer = TlsTracer(TlsUprobeSettings(mode="on", ring_pages=16), exclude_pids=frozenset({os.getpid()}))
    tracer.load()
    try:
        tracer.rescan()
        program = subprocess.run(
            [sys.executable, "-c", PINGPONG, str(cert), str(key), str(rounds)], capture_output=True, timeout=60
        )
        assert program.returncode == 0, program.stderr
        chunks: list[RawChunk] = []
        while batch := tracer.poll(20):
            chunks += batch
        chunks += tracer.drain()  # what poll held back for ordering
        ours = [chunk for chunk in chunks if chunk.data in (b"ping", b"pong")]
        lost = tracer.kernel_losses()
        assert lost["ring_full"] > 0
        # Four calls a round (a write and a read on each side), one chunk each.
        assert len(ours) <= 4 * rounds
        assert len(ours) + lost["ring_full"] >= 4 * rounds, (len(ours), lost)
        assert lost["read_fault"] == 0 and lost["calls_table_full"] == 0
    finally:
        tracer.close()


def test_grpcio_s_static_boringssl_is_reported_not_hooked_with_the_reason() -> None:
    """grpcio links BoringSSL into its extension and exports none of its SSL functions: a
    process that imported grpc is listed, not hooked, and the status says why."""
    reason = availability()
    if reason is not None:
        pytest.skip(f"eBPF uprobes cannot be loaded here: {reason}")
    program = subprocess.Popen(
        [sys.executable, "-c", "import grpc, sys; print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    tracer = TlsTracer(TlsUprobeSettings(mode="on"), exclude_pids=frozenset({os.getpid()}))
    try:
        assert program.stdout is not None and program.stdout.readline() == "ready\n"
        tracer.load()
        tracer.rescan()
        rows = [row for row in tracer.status() if row["pid"] == program.pid]
        grpcio = [row for row in rows if row["library"] == "boringssl"]
        assert len(grpcio) == 1, rows
        assert grpcio[0]["hooked"] is False and grpcio[0]["version"] == "grpcio"
        assert grpcio[0]["reason"].startswith("no symbols: none of SSL_read"), grpcio[0]
        assert "cygrpc" in grpcio[0]["path"]
        # The same process's system libssl (Python's ssl, which grpc imports) is hooked.
        assert any(row["library"] == "openssl" and row["hooked"] for row in rows), rows
    finally:
        tracer.close()
        program.communicate(input="", timeout=30)


def exchange_here(cert: Path, key: Path) -> None:
    """A TLS ping-pong inside this process: a server thread and a client."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            conn, _ = listener.accept()
            with server_context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"pong " + tls.recv(100))

        thread = threading.Thread(target=serve)
        thread.start()
        client_context = ssl._create_unverified_context()
        with client_context.wrap_socket(socket.create_connection(listener.getsockname())) as client:
            client.sendall(b"own ping")
            assert client.recv(100) == b"pong own ping"
        thread.join(timeout=10)


def test_the_tracer_s_own_tls_is_not_captured(tmp_path: Path) -> None:
    """The collector's TLS to NATS goes through the same hooked library: the program skips the
    process that loaded it, while another process's exchange is read."""
    reason = availability()
    if reason is not None:
        pytest.skip(f"eBPF uprobes cannot be loaded here: {reason}")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    make_certificate(key, cert)
    tracer = TlsTracer(TlsUprobeSettings(mode="on"), exclude_pids=frozenset({os.getpid()}))
    tracer.load()
    try:
        tracer.rescan()
        exchange_here(cert, key)
        subprocess.run([sys.executable, "-c", PINGPONG, str(cert), str(key), "3"], timeout=60, check=True)
        chunks: list[RawChunk] = []
        while batch := tracer.poll(20):
            chunks += batch
        chunks += tracer.drain()  # what poll held back for ordering
        assert {chunk.data for chunk in chunks} >= {b"ping", b"pong"}  # the other process's
        assert [chunk for chunk in chunks if chunk.pid == os.getpid()] == []
        assert all(b"own ping" not in chunk.data for chunk in chunks)
    finally:
        tracer.close()
