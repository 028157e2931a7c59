"""A capture of real redis-benchmark traffic, for bench/dissect.py --redis.

Debian's redis-server on a free loopback port and `redis-benchmark -t set,get -P 16` (the
issue's "pipelined GET/SET": sixteen commands per write, the replies likewise), one client
connection per 10,000 commands, recorded by tcpdump on loopback
(tests/fixtures/tcpdump_capture.py; needs root, tcpdump and redis-server).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "redis"))

from make_redis_fixtures import server  # noqa: E402
from tcpdump_capture import capture, free_port  # noqa: E402

PIPELINE = 16


def record(path: Path, commands: int) -> int:
    """Write about `commands` pipelined SET and GET commands to `path`; returns the server port."""
    for binary in ("redis-server", "redis-benchmark", "tcpdump"):
        if shutil.which(binary) is None:
            raise SystemExit(f"{binary} is not installed (apt-get install redis-server tcpdump)")
    port = free_port()
    with server(port):
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
    return port
