"""What reading TLS plaintext through eBPF uprobes costs: the traced program and the collector.

    sudo .venv/bin/python bench/tls_uprobes.py [--round-trips 20000] [--rounds 2] [--no-go]

The same traffic is run twice per round, unhooked and then hooked, in the same run:

- OpenSSL: a Python program (CPython's `ssl`, the system's libssl 3) with a TLS server thread and
  a client making `--round-trips` request/response exchanges (100 bytes out, 200 back) over one
  connection on loopback: four hooked SSL calls (SSL_write_ex, SSL_read_ex) per round trip;
- Go (when `go` is installed): tests/live/go_tls/main.go built here, its `loop` mode making the
  same number of HTTP/1.1 GETs over one connection against its own TLS server (crypto/tls,
  hooked at entry and at each RET of (*Conn).Read/Write).

Hooked means the collector's tracer (trawl.collector.tls_uprobes.TlsTracer: the eBPF program
loaded, the library hooked with `rescan`) reading every chunk from the ring buffer in a thread,
as the collector does. Each program reports its own CPU time (user + system, all threads); the
tracer thread's CPU time is the collector's cost. Prints µs of CPU per hooked SSL call added in
the traced program, µs of CPU per chunk in the collector, and the chunks read and lost. Needs
root and BPF (see README: TLS plaintext through eBPF uprobes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from trawl.collector.tls_settings import TlsUprobeSettings
from trawl.collector.tls_uprobes import TlsTracer, availability

ROOT = Path(__file__).resolve().parent.parent
GO_SOURCE = ROOT / "tests" / "live" / "go_tls"
PINGPONG = """
import resource, socket, ssl, sys, threading
trips, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
server_context.load_cert_chain(cert, key)
listener = socket.create_server(("127.0.0.1", 0))
def serve():
    connection, _ = listener.accept()
    with server_context.wrap_socket(connection, server_side=True) as tls:
        for _ in range(trips):
            request = b""
            while len(request) < 100:
                request += tls.recv(100 - len(request))
            tls.sendall(b"R" * 200)
thread = threading.Thread(target=serve)
thread.start()
client_context = ssl.create_default_context(cafile=cert)
client_context.check_hostname = False
with client_context.wrap_socket(socket.create_connection(listener.getsockname())) as tls:
    sys.stdout.write("ready\\n"); sys.stdout.flush(); sys.stdin.readline()
    for _ in range(trips):
        tls.sendall(b"Q" * 100)
        response = b""
        while len(response) < 200:
            response += tls.recv(200 - len(response))
thread.join()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(usage.ru_utime + usage.ru_stime)
"""


def say(text: str = "") -> None:
    """A benchmark prints its figures (stdout); tools and services log instead."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process, every thread (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Reader:
    """The tracer read in a thread, as the collector's capture thread reads it."""

    def __init__(self, tracer: TlsTracer) -> None:
        self.tracer = tracer
        self.chunks = 0
        self.cpu = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        started = time.thread_time()
        while not self.stop.is_set():
            self.chunks += len(self.tracer.poll(20))
        self.chunks += len(self.tracer.drain())
        self.cpu = time.thread_time() - started


def python_run(trips: int, cert: Path, key: Path, tracer: TlsTracer | None) -> tuple[float, Reader | None]:
    """CPU seconds of the OpenSSL program, and the reader when hooked."""
    child = subprocess.Popen(
        [sys.executable, "-c", PINGPONG, str(trips), str(cert), str(key)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    child.stdout.readline()  # connected, handshake done: only the exchanges are measured
    reader = None
    if tracer is not None:
        tracer.rescan({child.pid})
        reader = Reader(tracer)
        reader.thread.start()
    before = process_cpu(child.pid)
    child.stdin.write("go\n")
    child.stdin.flush()
    total = float(child.stdout.readline())
    child.wait()
    if reader is not None:
        time.sleep(0.2)
        reader.stop.set()
        reader.thread.join()
    return total - before, reader


def go_build(directory: Path) -> Path | None:
    if shutil.which("go") is None:
        return None
    source = directory / "go"
    shutil.copytree(GO_SOURCE, source)
    env = {**os.environ, "GOCACHE": str(directory / "cache"), "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
    target = directory / "gotls"
    subprocess.run(["go", "build", "-o", str(target), "."], cwd=source, env=env, check=True, timeout=600)
    return target


def go_run(binary: Path, trips: int, cert: Path, key: Path, tracer: TlsTracer | None) -> tuple[float, Reader | None]:
    """CPU seconds of the Go server and client over `trips` GETs, and the reader when hooked."""
    server = subprocess.Popen(
        [str(binary), "serve", str(cert), str(key)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert server.stdin is not None and server.stdout is not None
    port = server.stdout.readline().strip()
    client = subprocess.Popen([str(binary), "loop", port, str(trips)], stdin=subprocess.PIPE, text=True)
    assert client.stdin is not None
    time.sleep(0.3)  # both started: the hooks go on programs already running, as in a cluster
    reader = None
    if tracer is not None:
        tracer.rescan({server.pid, client.pid})
        reader = Reader(tracer)
        reader.thread.start()
    before = process_cpu(server.pid) + process_cpu(client.pid)
    client.stdin.write("go\n")
    client.stdin.flush()
    _pid, _status, usage = os.wait4(client.pid, 0)  # the client's whole CPU, read as it is reaped
    client.returncode = 0
    server_cpu = process_cpu(server.pid)
    server.stdin.close()
    server.wait(timeout=30)
    if reader is not None:
        time.sleep(0.2)
        reader.stop.set()
        reader.thread.join()
    return server_cpu + usage.ru_utime + usage.ru_stime - before, reader


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-trips", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-go", action="store_true", help="OpenSSL only")
    args = parser.parse_args()
    reason = availability()
    if reason is not None:
        raise SystemExit(f"eBPF uprobes cannot be loaded here: {reason}")
    trips = args.round_trips
    with tempfile.TemporaryDirectory(prefix="trawl-bench-tls-") as scratch:
        directory = Path(scratch)
        cert, key = certificate(directory)
        binary = None if args.no_go else go_build(directory)
        for round_number in range(1, args.rounds + 1):
            tracer = TlsTracer(TlsUprobeSettings(mode="on"), exclude_pids=frozenset({os.getpid()}))
            tracer.load()
            try:
                plain, _ = python_run(trips, cert, key, None)
                hooked, reader = python_run(trips, cert, key, tracer)
                assert reader is not None
                calls = 4 * trips
                say(
                    f"round {round_number} OpenSSL ({trips} round trips, {calls} SSL calls): program "
                    f"{plain:.2f} s unhooked, {hooked:.2f} s hooked: +{(hooked - plain) / calls * 1e6:.1f} us CPU "
                    f"per hooked call; collector {reader.cpu:.2f} s for {reader.chunks} chunks: "
                    f"{reader.cpu / max(1, reader.chunks) * 1e6:.1f} us per chunk; lost {tracer.kernel_losses()}"
                )
                if binary is not None:
                    plain, _ = go_run(binary, trips, cert, key, None)
                    hooked, reader = go_run(binary, trips, cert, key, tracer)
                    assert reader is not None
                    say(
                        f"round {round_number} Go ({trips} GETs): programs {plain:.2f} s unhooked, {hooked:.2f} s "
                        f"hooked: +{(hooked - plain) / trips * 1e6:.1f} us CPU per round trip; collector "
                        f"{reader.cpu:.2f} s for {reader.chunks} chunks: {reader.cpu / max(1, reader.chunks) * 1e6:.1f}"
                        f" us per chunk; lost {tracer.kernel_losses()}"
                    )
            finally:
                tracer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
