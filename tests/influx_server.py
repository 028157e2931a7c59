"""Debian's InfluxDB (1.6) as a test peer: `influxd` started once per test session on free
ports with its own config and directories, authentication on, an admin, a writer and the
`trawl` database (with a `week` retention policy) made; `Influx` queries it over its HTTP API.
Registered in tests/conftest.py, so every test module shares the one server."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from trawl.embedded import free_port

ADMIN = ("admin", "admin-pw")
WRITER = ("writer", "writer-pw")

CONFIG = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{root}/meta"

[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  query-log-enabled = false

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false

[http]
  bind-address = "127.0.0.1:{http_port}"
  auth-enabled = true
  log-enabled = false
"""


@dataclass
class Influx:
    url: str

    def query(self, q: str, db: str = "", auth: tuple[str, str] = ADMIN, post: bool = False) -> Any:
        params = urllib.parse.urlencode({"q": q, "db": db, "epoch": "ns"})
        credentials = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        if post:
            request = urllib.request.Request(f"{self.url}/query", data=params.encode(), method="POST")
        else:
            request = urllib.request.Request(f"{self.url}/query?{params}")
        request.add_header("Authorization", f"Basic {credentials}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def rows(self, q: str, db: str) -> list[dict[str, Any]]:
        [result] = self.query(q, db)["results"]
        assert "error" not in result, result
        out = []
        for series in result.get("series", []):
            for values in series["values"]:
                out.append(dict(zip(series["columns"], values, strict=True)))
        return out


@pytest.fixture(scope="session")
def influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Influx]:
    root = tmp_path_factory.mktemp("influxdb")
    http_port, rpc_port = free_port(), free_port()
    config = root / "influxdb.conf"
    config.write_text(CONFIG.format(root=root, http_port=http_port, rpc_port=rpc_port))
    log = (root / "influxd.log").open("wb")
    process = subprocess.Popen(["influxd", "run", "-config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    server = Influx(f"http://127.0.0.1:{http_port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{server.url}/ping", timeout=1) as response:
                    if response.status == 204:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"influxd did not start: {_tail(root / 'influxd.log')}")
            time.sleep(0.1)
        # With authentication on, the first user may be made without credentials (and must be an admin).
        server.query(f"CREATE USER {ADMIN[0]} WITH PASSWORD '{ADMIN[1]}' WITH ALL PRIVILEGES", post=True)
        server.query("CREATE DATABASE trawl", post=True)
        server.query("CREATE RETENTION POLICY week ON trawl DURATION 7d REPLICATION 1", post=True)
        server.query(f"CREATE USER {WRITER[0]} WITH PASSWORD '{WRITER[1]}'", post=True)
        server.query(f"GRANT WRITE ON trawl TO {WRITER[0]}", post=True)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:]
