"""A capture of real redis-benchmark traffic, for bench/dissect.py --redis.

Debian's redis-server on a free loopback port and `redis-benchmark -t set,get -P 16` (the
issue's "pipelined GET/SET": sixteen commands per write, the replies likewise), one client
connection per 10,000 commands, recorded by tcpdump on loopback
(tests/fixtures/tcpdump_capture.py; needs root, tcpdump and redis-server).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))

from tcpdump_capture import capture, free_port  # noqa: E402

PIPELINE = 16


def record(path: Path, commands: int) -> int:
    """Write about `commands` pipelined SET and GET commands to `path`; returns the server port."""
    for binary in ("redis-server", "redis-benchmark", "tcpdump"):
        if shutil.which(binary) is None:
            raise SystemExit(f"{binary} is not installed (apt-get install redis-server tcpdump)")
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", folder],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("redis-server did not start") from None
                    time.sleep(0.05)
            each = max(1, commands // 2)
            clients = max(1, commands // 10_000)
            with capture(path, f"tcp port {port}", buffer_kib=256 * 1024):
                subprocess.run(
                    [
                        *("redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-q", "-t", "set,get"),
                        *("-n", str(each), "-c", str(clients), "-P", str(PIPELINE)),
                    ],
                    stdout=subprocess.DEVNULL,
                    check=True,
                )
        finally:
            server.terminate()
            server.wait(timeout=10)
    return port
