"""The Redis recordings of tests/fixtures/redis (redis-server 7.0 with redis-py, redis-cli and
redis-benchmark; make_redis_fixtures.py) through the whole dissector: what each one holds, as
calls; every byte a client sent is in exactly one call's request size; no credential survives."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.conftest import FIXTURES, SHARED_PCAPS
from tests.protocol_replay import read_packets
from tests.unit.dissector_builders import dissect_capture
from trawl.v1.calls_pb2 import ApiCall, Outcome

REDIS = FIXTURES / "redis"
OK = Outcome.OUTCOME_OK
SECRETS = (b"fixture-s3cret", b"target-s3cret", b"alice-pw-s3cret", b"wrong-password")
# redis-py 8 announces itself with commands redis-server 7.0 does not know (ERR, then it goes on).
HANDSHAKE = {"CLIENT SETINFO", "CLIENT MAINT_NOTIFICATIONS"}


def redis_calls(name: str) -> list[ApiCall]:
    calls, engine = dissect_capture(REDIS / name)
    assert engine.counters.get("parse_errors", 0) == 0
    return sorted((call for call in calls if call.protocol == "redis"), key=lambda call: call.request.ts)


def methods(calls: list[ApiCall]) -> Counter[str]:
    return Counter(call.method for call in calls if call.method not in HANDSHAKE)


@pytest.mark.parametrize("name", ["resp2.pcap", "resp3.pcap", "pubsub.pcap", "blocking.pcap", "misc.pcap"])
def test_every_client_byte_is_in_one_request(name: str) -> None:
    sent: Counter[int] = Counter()
    for packet in read_packets(REDIS / name):
        if packet.protocol == 6 and packet.dport in range(39601, 39609):
            sent[packet.sport] += len(packet.payload)
    counted: Counter[int] = Counter()
    for call in redis_calls(name):
        if not call.redis.from_server:
            counted[call.src.port] += call.request.size
    # The inline client of resp2 also sent one empty line (2 bytes), which is no command.
    empty_lines = {port: 2 for port in sent if name == "resp2.pcap" and counted[port] == sent[port] - 2}
    assert {port: counted[port] + empty_lines.get(port, 0) for port in sent} == dict(sent)


@pytest.mark.parametrize("name", ["resp2.pcap", "resp3.pcap", "auth.pcap", "blocking.pcap", "benchmark.pcap"])
def test_every_server_byte_is_in_one_reply_or_pushed_message(name: str) -> None:
    # (pubsub.pcap and misc.pcap hold confirmations absorbed by their command and MONITOR lines,
    # which are in no call.)
    sent: Counter[int] = Counter()
    seen: set[tuple[int, int]] = set()
    for packet in read_packets(REDIS / name):
        if (
            packet.protocol == 6
            and packet.sport in range(39601, 39609)
            and packet.payload
            and (packet.dport, packet.seq) not in seen
        ):
            seen.add((packet.dport, packet.seq))  # resp3.pcap holds a retransmitted push frame
            sent[packet.dport] += len(packet.payload)
    counted: Counter[int] = Counter()
    for call in redis_calls(name):
        counted[call.src.port] += call.request.size if call.redis.from_server else call.response.size
    assert {port: counted[port] for port in sent} == dict(sent)


def test_resp2_everyday_commands_pipeline_and_transactions() -> None:
    calls = redis_calls("resp2.pcap")
    counts = methods(calls)
    assert counts["SET"] == 17 and counts["MULTI"] == 3 and counts["EXEC"] == 2 and counts["DISCARD"] == 1
    statuses = {(call.method, call.path): call.status for call in calls}
    assert statuses[("GET", "missing")] == "nil"
    assert statuses[("LPUSH", "user:1")] == "WRONGTYPE"
    assert statuses[("NOSUCHCOMMAND", "")] == "ERR"
    assert statuses[("XINFO STREAM", "stream:1")] == "ok"
    pipelined = [call for call in calls if call.path.startswith("p:")]
    assert [call.redis.pipeline_depth for call in pipelined] == list(range(11))
    in_db_2 = [call for call in calls if call.path == "in-db-2"]
    assert [call.redis.db for call in in_db_2] == [2, 2]
    queued = [call for call in calls if "queued" in call.notes]
    assert [(call.method, call.status) for call in queued[:4]] == [
        ("SET", "ok"),
        ("INCRBY", "ok"),
        ("LPUSH", "WRONGTYPE"),
        ("GET", "ok"),
    ]
    assert [call.notes[-1] for call in queued[4:]] == ["transaction-aborted", "transaction-discarded"]
    inline = [(call.method, list(call.redis.args)) for call in calls if "inline" in call.notes]
    assert inline == [("PING", ["PING"]), ("SET", ["SET", "inline", "two words"]), ("GET", ["GET", "inline"])]


def test_resp3_types_tracking_push_and_pubsub_pushes() -> None:
    calls = redis_calls("resp3.pcap")
    types = {call.method: call.redis.reply_type for call in calls if call.redis.resp_version == 3}
    assert types["HGETALL"] == "map" and types["SMEMBERS"] == "set" and types["ZSCORE"] == "double"
    pushed = [(call.method, call.path) for call in calls if call.redis.from_server]
    assert pushed == [("INVALIDATE", "tracked"), ("MESSAGE", "news")]
    subscribe = next(call for call in calls if call.method == "SUBSCRIBE")
    assert (subscribe.status, subscribe.redis.reply_type) == ("ok", "push")


def test_pubsub_resp2() -> None:
    calls = redis_calls("pubsub.pcap")
    pushed = [(call.method, call.path, call.redis.args[-1]) for call in calls if call.redis.from_server]
    assert pushed == [
        ("MESSAGE", "orders", "order 1"),
        ("MESSAGE", "payments", "payment 1"),
        ("PMESSAGE", "audit.login", "alice"),
        ("SMESSAGE", "shard-1", "sharded"),
    ]
    assert all(call.outcome == OK for call in calls if call.method not in HANDSHAKE)
    confirmed = {call.method: call.status for call in calls if "SUBSCRIBE" in call.method}
    assert confirmed == dict.fromkeys(
        ["SUBSCRIBE", "PSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SSUBSCRIBE", "SUNSUBSCRIBE"], "ok"
    )
    assert methods(calls)["PUBLISH"] == 4


def test_auth_credentials_are_redacted_everywhere() -> None:
    calls = redis_calls("auth.pcap")
    for call in calls:
        wire = call.SerializeToString()
        assert not any(secret in wire for secret in SECRETS), call.method
    counts = methods(calls)
    assert counts["AUTH"] >= 4 and counts["HELLO"] == 1 and counts["MIGRATE"] == 2 and counts["RESTORE"] == 2
    statuses = Counter(call.status for call in calls if call.method == "AUTH")
    assert statuses["WRONGPASS"] >= 1 and statuses["ok"] >= 3
    hello = next(call for call in calls if call.method == "HELLO")
    assert list(hello.redis.args) == ["HELLO", "3", "AUTH", "[REDACTED]", "[REDACTED]"]


def test_blocking_commands_wait_and_pair() -> None:
    calls = {call.method: call for call in redis_calls("blocking.pcap")}
    assert calls["BLPOP"].elapsed_ns > 200_000_000 and calls["BLPOP"].status == "ok"
    assert calls["BRPOP"].elapsed_ns > 900_000_000 and calls["BRPOP"].status == "nil"
    assert calls["XREAD"].elapsed_ns > 200_000_000 and calls["XREAD"].path == "events"
    assert calls["WAIT"].status == "ok" and calls["BLMOVE"].path == "src" and calls["BZPOPMIN"].path == "zq"


def test_client_reply_monitor_reset_quit() -> None:
    calls = redis_calls("misc.pcap")
    no_reply = [tuple(call.redis.args) for call in calls if call.redis.one_way]
    assert no_reply == [
        ("CLIENT", "REPLY", "OFF"),
        ("SET", "quiet:1", "1"),
        ("SET", "quiet:2", "2"),
        ("CLIENT", "REPLY", "SKIP"),
        ("SET", "quiet:3", "3"),
    ]
    after_reset = [call for call in calls if call.method == "GET" and call.path == "quiet:3"]
    assert [call.redis.db for call in after_reset] == [0, 0]
    assert [call.redis.resp_version for call in after_reset] == [3, 2]  # RESET returns to RESP2
    _calls, engine = dissect_capture(REDIS / "misc.pcap")
    assert engine.counters["redis_monitor_lines"] == 2


def test_benchmark_pipelines() -> None:
    calls = redis_calls("benchmark.pcap")
    counts = methods(calls)
    assert (counts["SET"], counts["GET"], counts["PING"], counts["LRANGE"]) == (340, 340, 40, 20)
    assert max(call.redis.pipeline_depth for call in calls) == 15
    assert all(call.outcome == OK for call in calls)


def test_shared_benchmark_sample() -> None:
    path = SHARED_PCAPS / "redis" / "tcpdump__resp_1_benchmark.pcap"
    if not path.exists():
        pytest.skip(f"{path} is not here (the public samples live in ../shared/pcaps)")
    calls, _engine = dissect_capture(path)
    lrange = [call.response.size for call in calls if call.method == "LRANGE"]
    assert lrange == [906, 2706, 4056, 5406]  # 100, 300, 450 and 600 elements, each across segments
