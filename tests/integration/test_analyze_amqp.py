"""`trawl analyze` on the AMQP captures recorded from RabbitMQ and pika, as a user runs it: the
records (protobuf JSON) carry each method with its channel, exchange, routing key, queue,
properties, headers and body, publishes join their trace, broker errors are error outcomes
with their reply code, and the PLAIN password of a refused login never comes out."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import FIXTURES

AMQP = FIXTURES / "amqp"
SECRET_PASSWORD = "amqp-secret-Hunter2"  # make_amqp_fixtures.py's wrong password


def analyze(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "trawl", "analyze", *args], capture_output=True, text=True, timeout=120, check=True
    ).stdout


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in analyze(str(path), "--json").splitlines()]


def test_publish_consume_records() -> None:
    calls = [call for call in records(AMQP / "amqp_publish_consume.pcap") if call["protocol"] == "amqp"]
    methods = [call["method"] for call in calls]
    assert methods[:8] == [
        "connection.start",
        "connection.tune",
        "connection.open",
        "channel.open",
        "exchange.declare",
        "queue.declare",
        "queue.bind",
        "basic.qos",
    ]
    assert methods.count("basic.publish") == 6 and methods.count("basic.deliver") == 3
    publish = calls[8]
    assert (publish["method"], publish["path"], publish["status"], publish["outcome"]) == (
        "basic.publish",
        "orders/created",
        "ok",
        "OUTCOME_OK",
    )
    detail = publish["amqp"]
    assert detail["one_way"] and detail["channel"] == 1 and detail["exchange"] == "orders"
    assert detail["properties"]["correlation-id"] == "corr-1" and detail["properties"]["delivery-mode"] == "2"
    assert publish["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert base64.b64decode(publish["request"]["body"]) == b'{"order": 1}'
    headers = {header["name"]: header["value"] for header in publish["request"]["headers"]}
    assert headers["x-tenant"] == "acme"
    large = calls[9]
    assert large["request"]["body_size"] == "10000"  # three 4 KiB body frames, reassembled
    deliver = next(call for call in calls if call["method"] == "basic.deliver")
    assert deliver["amqp"]["from_server"] and deliver["amqp"]["queue"] == "orders.created"
    assert deliver["amqp"]["consumer_tag"] == "trawl-consumer"
    get_ok = next(call for call in calls if call["amqp"].get("response_method") == "basic.get-ok")
    assert base64.b64decode(get_ok["response"]["body"]) == b"for get"
    acks = [
        (call["method"], call["amqp"].get("delivery_tag"))
        for call in calls
        if call["method"] in ("basic.ack", "basic.nack", "basic.reject")
    ]
    assert acks == [("basic.ack", "1"), ("basic.nack", "2"), ("basic.reject", "3"), ("basic.ack", "4")]
    assert all(call["outcome"] == "OUTCOME_OK" for call in calls)


def test_broker_errors_and_credentials() -> None:
    output = analyze(str(AMQP / "amqp_errors.pcap"), "--json")
    calls = [json.loads(line) for line in output.splitlines()]
    errors = [
        (call["method"], call["status"])
        for call in calls
        if call["outcome"] == "OUTCOME_ERROR" and call["protocol"] == "amqp"
    ]
    assert errors == [
        ("queue.declare", "404"),
        ("channel.close", "404"),
        ("exchange.declare", "503"),
        ("connection.close", "503"),
        ("connection.close", "403"),
    ]
    declare = next(call for call in calls if call["method"] == "queue.declare")
    assert declare["amqp"]["reply_text"].startswith("NOT_FOUND")
    starts = [call for call in calls if call["method"] == "connection.start"]
    assert [call["amqp"]["properties"]["response"] for call in starts] == ["[REDACTED]", "[REDACTED]"]
    for encoded in (SECRET_PASSWORD, base64.b64encode(SECRET_PASSWORD.encode()).decode()):
        assert encoded not in output
    assert "amqp" in analyze(str(AMQP / "amqp_errors.pcap"))  # the table too


def test_confirms_and_returns() -> None:
    calls = [call for call in records(AMQP / "amqp_confirms_returns.pcap") if call["protocol"] == "amqp"]
    confirms = [
        (call["method"], call["status"], call["outcome"])
        for call in calls
        if call["amqp"].get("from_server") and call["amqp"].get("one_way")
    ]
    assert confirms == [
        ("basic.ack", "ok", "OUTCOME_OK"),
        ("basic.return", "312", "OUTCOME_ERROR"),
        ("basic.ack", "ok", "OUTCOME_OK"),
        ("basic.ack", "ok", "OUTCOME_OK"),
        ("basic.nack", "nack", "OUTCOME_ERROR"),
    ]
