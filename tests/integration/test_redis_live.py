"""Live Redis: redis-py against Debian's redis-server (started once for the test session, stopped
after), captured by tcpdump on loopback and dissected; every command redis-py sent is a call,
paired with the reply redis-py got (its status and its value's kind), pipelines and pub/sub
included. Needs root (tcpdump), tcpdump and redis-server, which `make test` installs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import needs_binary, needs_root
from tests.fixtures.redis.make_redis_fixtures import server
from tests.fixtures.tcpdump_capture import capture, free_port
from tests.unit.dissector_builders import dissect_capture

pytestmark = [needs_root(), needs_binary("tcpdump"), needs_binary("redis-server")]


@pytest.fixture(scope="session")
def redis_port() -> Iterator[int]:
    """One redis-server for the whole session (no persistence), on a free loopback port."""
    port = free_port()
    with server(port):
        yield port


def test_every_command_redis_py_sends_is_a_paired_call(redis_port: int, tmp_path: Path) -> None:
    path = tmp_path / "live.pcap"
    expected: list[tuple[str, str, str]] = []
    with capture(path, f"tcp port {redis_port}"):
        for protocol in (2, 3):
            r = redis.Redis(port=redis_port, protocol=protocol, single_connection_client=True)
            for index in range(20):
                r.set(f"live:{protocol}:{index}", "x" * index)
                expected.append(("SET", f"live:{protocol}:{index}", "ok"))
            pipe = r.pipeline(transaction=False)
            for index in range(20):
                pipe.get(f"live:{protocol}:{index}")
                expected.append(("GET", f"live:{protocol}:{index}", "ok"))
            pipe.get("live:missing")
            expected.append(("GET", "live:missing", "nil"))
            pipe.execute()
            try:
                r.lpush(f"live:{protocol}:1", "x")
            except redis.ResponseError:
                expected.append(("LPUSH", f"live:{protocol}:1", "WRONGTYPE"))
            r.close()
    calls, engine = dissect_capture(path)
    seen = [(call.method, call.path, call.status) for call in sorted(calls, key=lambda call: call.request.ts)]
    seen = [entry for entry in seen if entry[1].startswith("live:")]
    assert seen == expected
    assert engine.counters.get("parse_errors", 0) == 0
    pipelined = [call for call in calls if call.method == "GET" and call.redis.pipeline_depth]
    assert len(pipelined) == 40 and all(call.response.size > 0 for call in pipelined)
