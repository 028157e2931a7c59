"""`trawl analyze` on the recorded Redis captures, as a user runs it: the records (protobuf JSON)
carry the Redis detail, pub/sub messages come out one-way, credentials never come out, and the
table shows the commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import FIXTURES

REDIS = FIXTURES / "redis"
SECRETS = ("fixture-s3cret", "target-s3cret", "alice-pw-s3cret", "wrong-password")


def analyze(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "trawl", "analyze", *args], capture_output=True, text=True, timeout=120, check=True
    ).stdout


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in analyze(str(path), "--json").splitlines()]


def test_pubsub_records_carry_the_redis_detail_and_one_way_messages() -> None:
    calls = [call for call in records(REDIS / "pubsub.pcap") if call["protocol"] == "redis"]
    subscribe = next(call for call in calls if call["method"] == "SUBSCRIBE")
    assert (subscribe["path"], subscribe["status"], subscribe["outcome"]) == ("orders", "ok", "OUTCOME_OK")
    assert subscribe["redis"]["args"] == ["SUBSCRIBE", "orders", "payments"]
    assert subscribe["redis"]["reply_type"] == "array" and subscribe["redis"]["resp_version"] == 2
    messages = [call for call in calls if call["method"] in ("MESSAGE", "PMESSAGE", "SMESSAGE")]
    assert [(call["path"], call["redis"]["args"][-1]) for call in messages] == [
        ("orders", "order 1"),
        ("payments", "payment 1"),
        ("audit.login", "alice"),
        ("shard-1", "sharded"),
    ]
    for message in messages:
        assert message["redis"]["one_way"] and message["redis"]["from_server"]
        assert "response" not in message and message["request"]["size"] != "0"


def test_credentials_never_come_out() -> None:
    output = analyze(str(REDIS / "auth.pcap"), "--json")
    assert not any(secret in output for secret in SECRETS)
    calls = [json.loads(line) for line in output.splitlines()]
    auth = [call for call in calls if call["method"] == "AUTH"]
    assert {tuple(call["redis"]["args"][1:]) for call in auth} <= {("[REDACTED]",), ("[REDACTED]", "[REDACTED]")}
    assert any(call["status"] == "WRONGPASS" and call["outcome"] == "OUTCOME_ERROR" for call in auth)
    table = analyze(str(REDIS / "auth.pcap"))
    assert "MIGRATE" in table and not any(secret in table for secret in SECRETS)


def test_transactions_and_select_in_the_records() -> None:
    calls = records(REDIS / "resp2.pcap")
    exec_results = [(call["method"], call["status"]) for call in calls if "queued" in call.get("notes", [])][:4]
    assert exec_results == [("SET", "ok"), ("INCRBY", "ok"), ("LPUSH", "WRONGTYPE"), ("GET", "ok")]
    assert [call["redis"].get("db", 0) for call in calls if call.get("path") == "in-db-2"] == [2, 2]
