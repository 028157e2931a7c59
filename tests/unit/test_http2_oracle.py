"""tshark as the oracle for HTTP/2 and gRPC: every stream tshark pairs on the recorded captures
(tests/fixtures/http2, with the decode-as rules of their README) and on the public samples in
../shared/pcaps is a call of Trawl's with the same method, path, status, grpc-status and
RST_STREAM error code; and Trawl invents no stream tshark does not see.

tshark is read through `-T json --no-duplicate-keys`: every HEADERS / PUSH_PROMISE /
RST_STREAM frame with its stream id, its direction (the TCP source port) and its decoded
header list. Where the two legitimately differ, the test says why next to the exception.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.conftest import FIXTURES, SHARED_PCAPS, needs_binary
from tests.unit.dissector_builders import dissect_capture
from trawl.v1.calls_pb2 import ApiCall, Message, Outcome

HTTP2 = FIXTURES / "http2"
ERROR_CODES = {
    0: "NO_ERROR",
    1: "PROTOCOL_ERROR",
    2: "INTERNAL_ERROR",
    3: "FLOW_CONTROL_ERROR",
    4: "SETTINGS_TIMEOUT",
    5: "STREAM_CLOSED",
    6: "FRAME_SIZE_ERROR",
    7: "REFUSED_STREAM",
    8: "CANCEL",
    9: "COMPRESSION_ERROR",
    10: "CONNECT_ERROR",
    11: "ENHANCE_YOUR_CALM",
    12: "INADEQUATE_SECURITY",
    13: "HTTP_1_1_REQUIRED",
}

# (capture, server port for the decode-as rule, tshark's dissector for that port)
CAPTURES = [
    (HTTP2 / "grpc_unary.pcap", 39501, "http2"),
    (HTTP2 / "grpc_server_streaming.pcap", 39502, "http2"),
    (HTTP2 / "grpc_client_streaming.pcap", 39503, "http2"),
    (HTTP2 / "grpc_bidi.pcap", 39504, "http2"),
    (HTTP2 / "h2_nghttp.pcap", 39510, "http2"),
    (HTTP2 / "h2c_upgrade_curl.pcap", 39511, "http"),
    (HTTP2 / "h2_hypercorn_httpx.pcap", 39520, "http2"),
    (HTTP2 / "graphql_http2.pcap", 39531, "http2"),
    (SHARED_PCAPS / "http2" / "scapy__http2_h2c.pcap", 80, "http"),
    (SHARED_PCAPS / "grpc" / "deepflow__grpc-unary.pcap", 30035, "http2"),
]


@dataclass
class Stream:
    """One HTTP/2 stream as tshark decoded it."""

    request: dict[str, str] = field(default_factory=dict)
    response: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)
    reset: str = ""
    pushed: bool = False


def _frames(layers: object) -> list[dict[str, object]]:
    """The http2.stream dicts of a packet's http2 layer(s), however tshark nested them."""
    found: list[dict[str, object]] = []
    if isinstance(layers, list):
        for item in layers:
            found += _frames(item)
    elif isinstance(layers, dict):
        stream = layers.get("http2.stream")
        if stream is not None:
            found += _frames(stream) if isinstance(stream, list) else [stream]  # type: ignore[list-item]
        elif "http2.type" in layers:
            found.append(layers)
    return found


def _headers(frame: dict[str, object]) -> dict[str, str]:
    entries = frame.get("http2.header", [])
    if isinstance(entries, dict):
        entries = [entries]
    headers: dict[str, str] = {}
    for entry in entries:  # type: ignore[union-attr]
        name = str(entry.get("http2.header.name", ""))
        headers.setdefault(name, str(entry.get("http2.header.value", "")))
    return headers


def tshark_streams(path: Path, port: int, dissector: str) -> dict[int, Stream]:
    """Stream id -> what tshark saw on it (client-initiated and pushed streams)."""
    output = subprocess.run(
        [
            "tshark", "-r", str(path), "-d", f"tcp.port=={port},{dissector}", "-T", "json",
            "--no-duplicate-keys", "-J", "tcp http2", "-Y", "http2",
        ],
        capture_output=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    streams: dict[int, Stream] = {}
    for packet in json.loads(output):
        layers = packet["_source"]["layers"]
        from_server = int(layers["tcp"]["tcp.srcport"]) == port
        for frame in _frames(layers.get("http2", [])):
            kind = int(str(frame.get("http2.type", "-1")))
            stream_id = int(str(frame.get("http2.streamid", "0")))
            if kind == 1:  # HEADERS
                stream = streams.setdefault(stream_id, Stream())
                headers = _headers(frame)
                if not from_server:
                    stream.request.update(headers)
                elif not stream.response:
                    stream.response = headers
                    if "grpc-status" in headers:  # Trailers-Only
                        stream.trailers = headers
                else:
                    stream.trailers = headers
            elif kind == 5:  # PUSH_PROMISE: the promised stream's request
                promised = int(str(frame.get("http2.push_promise.promised_stream_id", "0")))
                pushed = streams.setdefault(promised, Stream(pushed=True))
                pushed.request.update(_headers(frame))
            elif kind == 3 and stream_id in streams:  # RST_STREAM
                code = int(str(frame.get("http2.rst_stream.error", "0")))
                streams[stream_id].reset = streams[stream_id].reset or ERROR_CODES.get(code, str(code))
    return {stream_id: stream for stream_id, stream in streams.items() if stream_id}


def tshark_upgrade_request(path: Path, port: int) -> tuple[str, str]:
    """The HTTP/1.1 request that asked for h2c: HTTP/2 stream 1's request (RFC 9113 3.2), which
    tshark shows as HTTP, not on the stream."""
    output = subprocess.run(
        ["tshark", "-r", str(path), "-d", f"tcp.port=={port},http", "-Y", "http.upgrade", "-T", "fields",
         "-e", "http.request.method", "-e", "http.request.uri"],
        capture_output=True, check=True, timeout=120, text=True,
    ).stdout  # fmt: skip
    method, uri = next(line for line in output.splitlines() if line.strip()).split("\t")
    return method, uri


def trawl_streams(path: Path) -> dict[int, ApiCall]:
    calls, _ = dissect_capture(path)
    return {call.http2.stream_id: call for call in calls if call.HasField("http2")}


@needs_binary("tshark")
@pytest.mark.parametrize(("path", "port", "dissector"), CAPTURES, ids=lambda value: getattr(value, "name", ""))
def test_every_stream_tshark_pairs_is_a_call_with_the_same_triple(path: Path, port: int, dissector: str) -> None:
    if not path.exists():
        pytest.skip(f"{path} is not there (the public samples live in ../shared/pcaps)")
    expected = tshark_streams(path, port, dissector)
    assert expected, "tshark found no HTTP/2 stream: the decode-as rule is wrong"
    found = trawl_streams(path)
    assert sorted(found) == sorted(expected)
    for stream_id, stream in expected.items():
        call = found[stream_id]
        where = f"{path.name} stream {stream_id}"
        request = dict(stream.request)
        if call.http2.upgraded:
            # Stream 1 of an h2c connection: its request is the HTTP/1.1 one that asked for h2c.
            assert stream_id == 1 and not request, where
            request[":method"], request[":path"] = tshark_upgrade_request(path, port)
        assert first_header(call.request, ":method") == request.get(":method", ""), where
        assert call.http2.pushed == stream.pushed, where
        if stream.reset and not call.http2.reset_error:
            # A RST_STREAM after both END_STREAMs (curl resets the finished stream 1 with
            # STREAM_CLOSED) ends nothing: the call was complete, tshark lists the frame anyway.
            assert call.http2.request_end_stream and call.http2.response_end_stream, where
        else:
            assert call.http2.reset_error == stream.reset, where
        crossed = False
        if call.protocol == "grpc":
            assert call.method == "POST" and call.path == request[":path"], where
            status = stream.trailers.get("grpc-status", "")
            if call.status == "" and status == "4" and call.outcome == Outcome.OUTCOME_DEADLINE_EXCEEDED:
                # The client's RST_STREAM CANCEL ended the call when its deadline passed; the
                # server's DEADLINE_EXCEEDED trailers crossed it and came for a closed stream,
                # which tshark still shows on it. Trawl's outcome says the same.
                assert call.http2.reset_error == "CANCEL" and call.http2.reset_by == "client", where
                crossed = True
            else:
                assert call.status == status, where
                assert call.grpc.status_message == unquote(stream.trailers.get("grpc-message", "")), where
        elif call.protocol == "graphql":
            # The summary triple is the operation's; the HTTP/2 layer is in the detail and headers.
            assert call.graphql.target == request[":path"], where
            assert call.status == stream.response.get(":status", ""), where
        else:
            assert (call.method, call.path) == (request.get(":method", ""), request.get(":path", "")), where
            assert call.status == stream.response.get(":status", ""), where
        if not crossed:
            assert first_header(call.response, ":status") == stream.response.get(":status", ""), where
        if not stream.response and not stream.reset:
            assert call.outcome == Outcome.OUTCOME_NO_RESPONSE, where


def first_header(message: Message, name: str) -> str:
    return next((header.value for header in message.headers if header.name == name), "")
