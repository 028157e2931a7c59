"""Integrity of the HTTP/2, gRPC and GraphQL captures in tests/fixtures/http2/ (recorded from real
peers by tests/fixtures/make_http2_fixtures.py): each is a readable capture that starts with the
TCP handshake, and tshark, decoding it with the rules in tests/fixtures/http2/README.md, finds the
requests, statuses, gRPC statuses, stream resets and pushes the script recorded. These are the
numbers the HTTP/2, gRPC and GraphQL dissectors of issue #9 will be held to; a fixture that is
empty, cut short or regenerated with a different conversation fails here first.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, needs_binary

pytestmark = needs_binary("tshark")

HTTP2_FIXTURES = FIXTURES / "http2"
GRPC = "/trawl.fixtures.Orders/"
FRAME_LINE = re.compile(r"^    Stream: (?P<type>Magic|[A-Z_]+)(?:, Stream ID: (?P<stream>\d+))?")
HEADER_LINE = re.compile(r"^\s+Header: (?P<name>[^:]*|:[a-z]+): (?P<value>.*)$")
ERROR_LINE = re.compile(r"^\s+Error: (?P<name>[A-Z_]+) \(\d+\)$")
HTTP1_REQUEST_LINE = re.compile(r"^    (?P<method>[A-Z]+) (?P<target>\S+) HTTP/1\.1\\r\\n$")
HTTP1_STATUS_LINE = re.compile(r"^    HTTP/1\.1 (?P<status>\d{3}) ")


@dataclass
class Decoded:
    """What tshark says one capture holds: HTTP/2 frames by type, requests (HEADERS with :method,
    HTTP/1.1 request lines too), response statuses, gRPC statuses, RST_STREAM error codes."""

    frame_types: Counter[str] = field(default_factory=Counter)
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    grpc_statuses: Counter[str] = field(default_factory=Counter)
    grpc_messages: set[str] = field(default_factory=set)
    resets: Counter[str] = field(default_factory=Counter)
    header_names: set[str] = field(default_factory=set)


def decode(path: Path, port: int, protocol: str) -> Decoded:
    text = subprocess.run(
        ["tshark", "-r", str(path), "-d", f"tcp.port=={port},{protocol}", "-V", "-O", "http,http2"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    decoded = Decoded()
    frame_type = ""
    headers: dict[str, str] = {}

    def close_frame() -> None:
        if frame_type == "HEADERS" and ":method" in headers:
            decoded.requests[(headers[":method"], headers[":path"])] += 1
        if frame_type == "HEADERS" and ":status" in headers:
            decoded.statuses[headers[":status"].split()[0]] += 1
        if "grpc-status" in headers:
            decoded.grpc_statuses[headers["grpc-status"]] += 1
        if headers.get("grpc-message"):
            decoded.grpc_messages.add(headers["grpc-message"])
        decoded.header_names.update(headers)

    for line in text.splitlines():
        if frame := FRAME_LINE.match(line):
            close_frame()
            frame_type, headers = frame["type"], {}
            decoded.frame_types[frame_type] += 1
        elif header := HEADER_LINE.match(line):
            headers[header["name"]] = header["value"]
        elif (error := ERROR_LINE.match(line)) and frame_type == "RST_STREAM":
            decoded.resets[error["name"]] += 1
        elif request := HTTP1_REQUEST_LINE.match(line):
            decoded.requests[(request["method"], request["target"])] += 1
        elif status := HTTP1_STATUS_LINE.match(line):
            decoded.statuses[status["status"]] += 1
    close_frame()
    return decoded


@dataclass(frozen=True)
class Expected:
    port: int
    decode_as: str  # "http2" for prior knowledge, "http" where HTTP/1.1 comes first (h1, h2c upgrade)
    requests: dict[tuple[str, str], int]
    statuses: dict[str, int]
    grpc_statuses: dict[str, int] = field(default_factory=dict)
    grpc_messages: frozenset[str] = frozenset()
    resets: dict[str, int] = field(default_factory=dict)
    frames_at_least: dict[str, int] = field(default_factory=dict)
    header_names: frozenset[str] = frozenset()


GRAPHQL_GET = "/graphql?query=query+OrderStatus+%7B+order%28id%3A+%229%22%29+%7B+status+%7D+%7D"
# From the run of make_http2_fixtures.py that recorded the committed files (its log lines). Where a
# count is not the obvious one, the comment says why.
EXPECTED = {
    "grpc_unary": Expected(
        39501, "http2",
        # ok, not-found, deadline, cancel, gzip, 200 KiB, and 50 in parallel on one connection.
        requests={("POST", GRPC + "GetOrder"): 56},
        # The cancelled call never got a response; the deadline one got its trailers (4) before
        # the client's RST_STREAM CANCEL reached the server.
        statuses={"200": 55},
        grpc_statuses={"0": 53, "4": 1, "5": 1},
        grpc_messages=frozenset({"no such order", "Deadline Exceeded"}),
        # CANCEL: the cancelled call and the deadline; NO_ERROR: the server ending a stream whose
        # request it no longer needed after answering.
        resets={"CANCEL": 2, "NO_ERROR": 1},
        frames_at_least={"Magic": 1, "DATA": 13},
        header_names=frozenset({"grpc-encoding", "grpc-timeout", "traceparent", "authorization", "te"}),
    ),
    "grpc_server_streaming": Expected(
        39502, "http2",
        requests={("POST", GRPC + "ListOrders"): 4},  # ok (5 messages), error midway, deadline, cancel
        statuses={"200": 4},
        grpc_statuses={"0": 1, "14": 1, "4": 1},
        grpc_messages=frozenset({"inventory offline", "Deadline Exceeded"}),
        resets={"CANCEL": 2, "NO_ERROR": 1},
        frames_at_least={"Magic": 1},
        header_names=frozenset({"grpc-timeout"}),
    ),
    "grpc_client_streaming": Expected(
        39503, "http2",
        requests={("POST", GRPC + "UploadOrders"): 4},  # ok (4 messages), invalid, gzip (3), cancel
        statuses={"200": 3},
        grpc_statuses={"0": 2, "3": 1},
        grpc_messages=frozenset({"quantity must be positive"}),
        resets={"CANCEL": 1},
        frames_at_least={"Magic": 1},
        header_names=frozenset({"grpc-encoding"}),
    ),
    "grpc_bidi": Expected(
        39504, "http2",
        requests={("POST", GRPC + "Chat"): 4},  # ok (4 each way), error, cancel after 3, deadline
        statuses={"200": 4},
        # The cancelled chat has no grpc-status: the client's RST_STREAM CANCEL ended it.
        grpc_statuses={"0": 1, "9": 1, "4": 1},
        grpc_messages=frozenset({"chat closed", "Deadline Exceeded"}),
        # Which side resets which stream is timing (see the README): the counts are this recording's.
        resets={"CANCEL": 2, "NO_ERROR": 2},
        frames_at_least={"Magic": 1},
        header_names=frozenset({"grpc-timeout"}),
    ),
    "grpc_busy": Expected(
        39505, "http2",
        # 300 unary calls, 16 always in flight on the one connection.
        requests={("POST", GRPC + "GetOrder"): 300},
        statuses={"200": 300},
        grpc_statuses={"0": 300},
        frames_at_least={"Magic": 1, "DATA": 600},
    ),
    "h2_nghttp": Expected(
        39510, "http2",
        requests={("GET", path): 1 for path in ("/index.html", "/orders.json", "/large.bin", "/missing.txt")},
        # Four answers and the pushed /style.css (stream 2), whose request is in the PUSH_PROMISE.
        statuses={"200": 4, "404": 1},
        frames_at_least={"Magic": 1, "PUSH_PROMISE": 1, "PRIORITY": 1, "GOAWAY": 1, "DATA": 8},
    ),
    "h2c_upgrade_curl": Expected(
        39511, "http",
        # /orders/42 as HTTP/1.1 with Upgrade: h2c, answered by the 101 and then on stream 1;
        # /nope on stream 3.
        requests={("GET", "/orders/42"): 1, ("GET", "/nope"): 1},
        statuses={"101": 1, "200": 1, "404": 1},
        # curl resets stream 1 after its response (hypercorn had already closed it).
        resets={"STREAM_CLOSED": 1},
        frames_at_least={"Magic": 1, "HEADERS": 3},
    ),
    "h2_hypercorn_httpx": Expected(
        39520, "http2",
        requests={
            ("GET", "/orders/42"): 1, ("POST", "/orders"): 1, ("GET", "/nope"): 1, ("GET", "/boom"): 1,
            ("GET", "/orders/42/invoice"): 1,
        },
        statuses={"200": 2, "201": 1, "404": 1, "500": 1},
        frames_at_least={"Magic": 1},
        header_names=frozenset({"traceparent", "te", "x-invoice-sha256"}),  # the last one is a trailer
    ),
    "graphql_http1": Expected(
        39530, "http",
        requests={("POST", "/graphql"): 7, ("GET", GRAPHQL_GET): 1},
        statuses={"200": 8},
    ),
    "graphql_http2": Expected(
        39531, "http2",
        requests={("POST", "/graphql"): 7, ("GET", GRAPHQL_GET): 1},
        statuses={"200": 8},
        frames_at_least={"Magic": 1},
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tshark_finds_what_the_script_recorded(name: str) -> None:
    expected = EXPECTED[name]
    decoded = decode(HTTP2_FIXTURES / f"{name}.pcap", expected.port, expected.decode_as)
    assert dict(decoded.requests) == expected.requests
    assert dict(decoded.statuses) == expected.statuses
    assert dict(decoded.grpc_statuses) == expected.grpc_statuses
    assert decoded.grpc_messages == expected.grpc_messages
    assert dict(decoded.resets) == expected.resets
    for frame_type, least in expected.frames_at_least.items():
        assert decoded.frame_types[frame_type] >= least, (frame_type, decoded.frame_types)
    assert expected.header_names <= decoded.header_names


def test_the_large_grpc_message_spans_frames_and_segments() -> None:
    """The 200 KiB request and its echo: tshark reassembles each into one gRPC message out of more
    than two full-size loopback TCP segments (MSS 65483)."""
    fields = subprocess.run(
        ["tshark", "-r", str(HTTP2_FIXTURES / "grpc_unary.pcap"), "-d", "tcp.port==39501,http2",
         "-T", "fields", "-e", "grpc.message_length", "-e", "tcp.reassembled.length"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    lengths = [int(value) for line in fields.splitlines() for value in line.split("\t")[0].split(",") if value]
    assert sum(1 for length in lengths if length > 200 * 1024) == 2
    reassembled = [int(value) for line in fields.splitlines() for value in line.split("\t")[1].split(",") if value]
    assert max(reassembled) > 4 * 65483 // 2
    frames = subprocess.run(
        ["tshark", "-r", str(HTTP2_FIXTURES / "grpc_unary.pcap"), "-d", "tcp.port==39501,http2",
         "-T", "fields", "-e", "http2.streamid", "-e", "http2.type", "-e", "http2.length"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    large_data_frames = [
        (stream, kind, length)
        for line in frames.splitlines()
        for stream, kind, length in zip(*(column.split(",") for column in line.split("\t")), strict=True)
        if stream == "11" and kind == "0" and int(length) > 16384
    ]
    assert len(large_data_frames) == 4  # two each way: the stream of the 200 KiB call


@pytest.mark.parametrize("name", ["graphql_http1", "graphql_http2"])
def test_graphql_bodies_hold_every_operation_kind(name: str) -> None:
    """The bodies are neither compressed nor encrypted, so the capture's bytes show them: the
    mutation's password variable, the batch, the application/graphql body, the errors array
    under HTTP 200 and the persisted query's hash (sent twice: with the query, then alone)."""
    data = (HTTP2_FIXTURES / f"{name}.pcap").read_bytes()
    # httpx writes compact JSON, the server json.dumps' default separators.
    assert b'"password":"hunter2-fixture"' in data
    assert b'[{"query":"query GetOrder' in data
    assert b"query Broken { broken }" in data
    assert data.count(b'"errors": [{"message": "the broken field always fails"') == 1
    assert data.count(b'"sha256Hash":"') == 2


def first_packet_flags(path: Path) -> str:
    result = subprocess.run(
        ["tshark", "-r", str(path), "-c", "1", "-T", "fields", "-e", "tcp.flags.str"],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return result.stdout.strip()


def test_every_capture_is_small_and_starts_with_a_handshake() -> None:
    captures = sorted(HTTP2_FIXTURES.glob("*.pcap"))
    assert [path.stem for path in captures] == sorted(EXPECTED)
    assert sum(path.stat().st_size for path in captures) < 5 * 1024 * 1024
    for path in captures:
        assert path.stat().st_size < 1024 * 1024, path.name
        # "··········S·": a SYN without ACK, so the connection preface or Upgrade follows.
        assert first_packet_flags(path).endswith("S·"), path.name
