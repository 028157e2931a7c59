"""`trawl analyze` on the Kafka captures recorded from the real kafka-python client and the
stand-in broker (tests/fixtures/kafka), as a user runs it: the records (protobuf JSON) name every
API with its topics, partitions, group, acks, records and error names, a Produce with acks=0 is a
one-way record, and the SASL/PLAIN passwords on the wire never come out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import FIXTURES

KAFKA = FIXTURES / "kafka"


def analyze(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "trawl", "analyze", *args], capture_output=True, text=True, timeout=120, check=True
    ).stdout


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in analyze(str(path), "--json").splitlines()]


def test_producers_and_a_consumer_group_as_records() -> None:
    calls = [call for call in records(KAFKA / "kafka_flexible.pcap") if call["protocol"] == "kafka"]
    produces = [call for call in calls if call["method"] == "Produce"]
    assert len(produces) == 3
    one_way = [call for call in produces if call["kafka"].get("one_way")]
    assert len(one_way) == 1
    (lone,) = one_way
    assert "response" not in lone and lone["outcome"] == "OUTCOME_OK" and lone["notes"] == ["one-way"]
    answered = sorted(call["kafka"]["acks"] for call in produces if not call["kafka"].get("one_way"))
    assert answered == [-1, 1]
    for call in produces:
        detail = call["kafka"]
        assert call["path"] == "orders" and detail["topics"] == ["orders"] and detail["partitions"] == [0]
        assert (detail["record_count"], detail["compression"], detail["api_version"]) == ("2", "none", 9)
    (fetch,) = [call for call in calls if call["method"] == "Fetch"]
    assert (fetch["status"], fetch["kafka"]["record_count"], fetch["kafka"]["client_id"]) == ("NONE", "6", "consumer")
    (commit,) = [call for call in calls if call["method"] == "OffsetCommit"]
    assert (commit["path"], commit["kafka"]["group_id"]) == ("orders", "billing")
    joins = [(call["status"], call["outcome"]) for call in calls if call["method"] == "JoinGroup"]
    assert joins[0] == ("MEMBER_ID_REQUIRED", "OUTCOME_ERROR") and joins[1:] == [("NONE", "OUTCOME_OK")] * 2
    (refused,) = [call for call in calls if call.get("path") == "forbidden"]
    assert (refused["method"], refused["status"], refused["kafka"]["error_code"]) == (
        "Metadata",
        "TOPIC_AUTHORIZATION_FAILED",
        29,
    )


def test_text_output_shows_the_triple() -> None:
    lines = analyze(str(KAFKA / "kafka_legacy.pcap")).splitlines()
    produce = next(line for line in lines if "Produce" in line and "NONE" in line)
    assert "kafka" in produce and "payments" in produce


def test_sasl_passwords_never_come_out() -> None:
    raw = (KAFKA / "kafka_sasl.pcap").read_bytes()
    assert b"s3cret-kafka-password" in raw and b"wrong-password" in raw
    for args in (("--json",), ()):
        output = analyze(str(KAFKA / "kafka_sasl.pcap"), *args)
        assert "SaslAut" in output  # the text table cuts the method to its column
        assert "s3cret" not in output and "wrong-password" not in output
    calls = records(KAFKA / "kafka_sasl.pcap")
    statuses = sorted(call["status"] for call in calls if call["method"] == "SaslAuthenticate")
    assert statuses == ["NONE", "NONE", "SASL_AUTHENTICATION_FAILED"]
