"""`trawl analyze` on the recorded HTTP/2, gRPC and GraphQL captures, as a user runs it: the
records (protobuf JSON) carry the gRPC and GraphQL details, descriptor sets name the message
fields, secrets in metadata and variables never come out, and the table shows the stream."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import FIXTURES

HTTP2 = FIXTURES / "http2"


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trawl", "analyze", *args], capture_output=True, text=True, timeout=120, check=True
    )


def records(path: Path, *args: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in analyze(str(path), "--json", *args).stdout.splitlines()]


def by_stream(calls: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {call["http2"]["stream_id"]: call for call in calls if "http2" in call}


def test_grpc_records_with_and_without_descriptor_sets() -> None:
    plain = by_stream(records(HTTP2 / "grpc_unary.pcap"))
    named = by_stream(records(HTTP2 / "grpc_unary.pcap", "--proto-descriptors", str(HTTP2 / "orders.desc")))
    first = plain[1]
    assert (first["protocol"], first["method"], first["path"], first["status"]) == (
        "grpc",
        "POST",
        "/trawl.fixtures.Orders/GetOrder",
        "0",
    )
    assert first["grpc"]["service"] == "trawl.fixtures.Orders" and first["grpc"]["call_type"] == "unary"
    # Schemaless: field numbers; with orders.desc: OrderRequest's field names.
    assert json.loads(first["grpc"]["request_message"])["1"] == "order-1"
    assert json.loads(named[1]["grpc"]["request_message"])["order_id"] == "order-1"
    assert json.loads(named[1]["grpc"]["response_message"])["order_id"] == "order-1"
    # The metadata's bearer token is redacted; the traceparent joined the trace.
    headers = {header["name"]: header["value"] for header in first["request"]["headers"]}
    assert headers["authorization"] == "[REDACTED]"
    assert first["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    # NOT_FOUND (Trailers-Only), the deadline and the cancellation.
    assert (plain[3]["status"], plain[3]["grpc"]["status_message"], plain[3]["grpc"]["trailers_only"]) == (
        "5",
        "no such order",
        True,
    )
    assert plain[5]["outcome"] == "OUTCOME_DEADLINE_EXCEEDED" and plain[5]["grpc"]["timeout_ns"] == "201000000"
    assert plain[7]["outcome"] == "OUTCOME_CANCELLED" and plain[7]["http2"]["reset_error"] == "CANCEL"


def test_graphql_over_http2_records_and_redacted_variables() -> None:
    calls = by_stream(records(HTTP2 / "graphql_http2.pcap"))
    login = next(call for call in calls.values() if call["path"] == "Login")
    assert (login["protocol"], login["method"], login["graphql"]["http_version"]) == ("graphql", "mutation", "2")
    body = json.loads(base64.b64decode(login["request"]["body"]))
    assert body["variables"]["password"] == "[REDACTED]"
    broken = next(call for call in calls.values() if call["path"] == "Broken")
    assert broken["outcome"] == "OUTCOME_ERROR" and broken["graphql"]["errors"] == 1 and broken["status"] == "200"


def test_the_table_shows_streams_and_grpc_details() -> None:
    table = analyze(str(HTTP2 / "grpc_unary.pcap")).stdout.splitlines()
    assert table[0].split()[-1] == "INFO"
    deadline = next(line for line in table if "deadline_exceeded" in line)
    assert "stream 5" in deadline and "RST_STREAM CANCEL by client" in deadline
