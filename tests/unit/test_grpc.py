"""The gRPC layer (protocols/grpc.py) and protobuf decoding (protobuf.py) on real bytes: the DATA
payloads and headers of the grpcio captures in tests/fixtures/http2/ (read here with dpkt,
hyperframe and hpack, independently of Trawl's HTTP/2 parser; tshark is the oracle for the
message counts), messages serialized by protoc-generated classes, gzip/deflate/zstd from the
real libraries, and `protoc --decode_raw` as the reference for schemaless decoding."""

from __future__ import annotations

import base64
import bisect
import codecs
import gzip
import importlib.util
import json
import random
import subprocess
import sys
import tracemalloc
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import dpkt
import grpc
import pytest
import zstandard
from google.protobuf import descriptor_pool, json_format
from grpc_tools import protoc
from h2.errors import ErrorCodes
from hpack import Decoder
from hyperframe.frame import ContinuationFrame, DataFrame, Frame, HeadersFrame, RstStreamFrame

from tests.conftest import FIXTURES, needs_binary
from tests.unit.dissector_builders import read_capture
from trawl.dissector.protobuf import DescriptorSet, decode_schemaless, to_json_text
from trawl.dissector.protocols.grpc import (
    STATUS_NAMES,
    MessageStream,
    apply,
    is_grpc,
    message_encoding,
    parse_timeout,
    reset_outcome,
    split_path,
    status_message,
    trace_bin,
)
from trawl.dissector.protocols.trace import trace_context
from trawl.errors import ConfigError
from trawl.v1.calls_pb2 import ApiCall, Outcome

HTTP2 = FIXTURES / "http2"
ORDERS_DESC = HTTP2 / "orders.desc"
CAPTURES = {"grpc_unary": 39501, "grpc_server_streaming": 39502, "grpc_client_streaming": 39503, "grpc_bidi": 39504}
PROTO_INCLUDE = Path(protoc.__file__).parent / "_proto"
LIMIT = 64 * 1024
# The OpenCensus binary-format example (opencensus-specs, encodings/BinaryEncoding.md).
OPENCENSUS_EXAMPLE = bytes(
    [0, 0, 75, 249, 47, 53, 119, 179, 77, 166, 163, 206, 146, 157, 0, 14, 71, 54,
     1, 52, 240, 103, 170, 11, 169, 2, 183,
     2, 1]
)  # fmt: skip


# -- the captures, read without Trawl ------------------------------------------------------------


@dataclass
class Stream:
    """One HTTP/2 stream of a capture: headers by lower-case name, DATA payloads as sent."""

    stream_id: int
    request_ts: int = 0
    request_headers: dict[bytes, bytes] = field(default_factory=dict)
    response_headers: dict[bytes, bytes] = field(default_factory=dict)
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    request_data: list[bytes] = field(default_factory=list)
    response_data: list[bytes] = field(default_factory=list)
    response_end_stream: bool = False
    reset: tuple[str, bool, int] | None = None  # error code, by the client, ts


def _tcp_bytes(path: Path, port: int) -> dict[bool, tuple[bytes, list[tuple[int, int]]]]:
    """Each direction's TCP payload in sequence order (loopback: no loss), with (end offset, ts)
    per segment; keyed by "towards the server"."""
    _, frames = read_capture(path)
    segments: dict[bool, dict[int, tuple[int, bytes]]] = {True: {}, False: {}}
    for ts, raw in frames:
        tcp = dpkt.ethernet.Ethernet(raw).data.data
        if isinstance(tcp, dpkt.tcp.TCP) and tcp.data:
            segments[tcp.dport == port].setdefault(tcp.seq, (ts, bytes(tcp.data)))
    result = {}
    for to_server, by_seq in segments.items():
        data = bytearray()
        ends: list[tuple[int, int]] = []
        expected = None
        for seq in sorted(by_seq):
            ts, payload = by_seq[seq]
            if expected is not None and seq < expected:  # a retransmission overlapping what we have
                payload, seq = payload[expected - seq :], expected
            assert expected is None or seq == expected, f"{path.name}: a gap in the capture"
            data += payload
            ends.append((len(data), ts))
            expected = seq + len(payload)
        result[to_server] = (bytes(data), ends)
    return result


@cache
def capture_streams(name: str) -> dict[int, Stream]:
    port = CAPTURES[name]
    streams: dict[int, Stream] = {}
    for to_server, (data, ends) in _tcp_bytes(HTTP2 / f"{name}.pcap", port).items():
        offsets = [end for end, _ in ends]
        position = 24 if to_server else 0  # the client's connection preface
        decoder = Decoder()
        decoder.max_allowed_table_size = 1 << 20
        block = b""
        first: tuple[HeadersFrame, int] | None = None
        while position + 9 <= len(data):
            frame, length = Frame.parse_frame_header(memoryview(data[position : position + 9]))
            frame.parse_body(memoryview(data[position + 9 : position + 9 + length]))
            position += 9 + length
            ts = ends[bisect.bisect_left(offsets, position)][1]
            if isinstance(frame, HeadersFrame | ContinuationFrame):
                if isinstance(frame, HeadersFrame):
                    first = (frame, ts)
                block += frame.data
                if "END_HEADERS" not in frame.flags:
                    continue
                assert first is not None
                headers = {bytes(name).lower(): bytes(value) for name, value in decoder.decode(block, raw=True)}
                block = b""
                stream = streams.setdefault(frame.stream_id, Stream(frame.stream_id))
                if to_server:
                    stream.request_headers.update(headers)
                    stream.request_ts = first[1]
                elif not stream.response_headers:
                    stream.response_headers = headers
                    stream.response_end_stream = "END_STREAM" in first[0].flags
                else:
                    stream.trailers = headers
                    stream.response_end_stream = "END_STREAM" in first[0].flags
            elif isinstance(frame, DataFrame) and frame.stream_id:
                stream = streams.setdefault(frame.stream_id, Stream(frame.stream_id))
                (stream.request_data if to_server else stream.response_data).append(bytes(frame.data))
                if not to_server and "END_STREAM" in frame.flags:
                    stream.response_end_stream = True
            elif isinstance(frame, RstStreamFrame):
                stream = streams.setdefault(frame.stream_id, Stream(frame.stream_id))
                if stream.reset is None:
                    stream.reset = (ErrorCodes(frame.error_code).name, to_server, ts)
    return {stream_id: stream for stream_id, stream in streams.items() if stream.request_headers}


def chunks(payloads: list[bytes], rng: random.Random, largest: int) -> list[bytes]:
    """The payloads joined and cut again at random places (DATA frames split differently)."""
    data = b"".join(payloads)
    pieces = []
    position = 0
    while position < len(data):
        size = rng.randint(1, largest)
        pieces.append(data[position : position + size])
        position += size
    return pieces


def streams_of(
    stream: Stream, rng: random.Random | None = None, limit: int = LIMIT
) -> tuple[MessageStream, MessageStream]:
    request = MessageStream(message_encoding(stream.request_headers), limit)
    response = MessageStream(message_encoding(stream.response_headers), limit)
    for messages, payloads in ((request, stream.request_data), (response, stream.response_data)):
        pieces = payloads if rng is None else chunks(payloads, rng, rng.choice([1, 7, 300, 5000]))
        for piece in pieces:
            messages.feed(piece)
        messages.finish()
    return request, response


def grpc_call(stream: Stream, descriptors: DescriptorSet | None, rng: random.Random | None = None) -> ApiCall:
    """What the HTTP/2 parser will do with a gRPC stream, in its order."""
    request, response = streams_of(stream, rng)
    call = ApiCall(protocol="grpc")
    call.http2.response_end_stream = stream.response_end_stream
    trace_context(call, stream.request_headers)
    apply(
        call,
        stream.request_headers,
        stream.response_headers,
        stream.trailers,
        request,
        response,
        descriptors,
        bool(stream.response_headers),
    )
    if stream.reset is not None:
        code, by_client, ts = stream.reset
        reset_outcome(call, code, by_client, stream.request_ts, ts, call.grpc.timeout_ns)
    return call


# -- generated code and descriptor sets, built here with protoc ---------------------------------------


def run_protoc(*args: str) -> None:
    assert protoc.main(["protoc", f"-I{PROTO_INCLUDE}", *args]) == 0, f"protoc failed: {args}"


def import_module(name: str, directory: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, directory / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def orders_pb2(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """orders.proto compiled by protoc into Python classes (as grpcio users have them)."""
    out = tmp_path_factory.mktemp("orders")
    run_protoc(f"-I{HTTP2}", f"--python_out={out}", str(HTTP2 / "orders.proto"))
    return import_module("orders_pb2", out)


@pytest.fixture(scope="module")
def orders() -> DescriptorSet:
    return DescriptorSet.load([ORDERS_DESC])


RICH_PROTO = """
syntax = "proto2";
package trawl.testonly.rich;

message Inner {
  optional int32 a = 1;
  optional string label = 2;
  repeated Inner children = 3;
}

message Rich {
  optional string name = 1;
  optional int32 negative = 2;
  optional sint64 zigzag = 3;
  optional fixed32 f32 = 4;
  optional fixed64 f64 = 5;
  optional double ratio = 6;
  optional float weight = 7;
  optional bytes blob = 8;
  repeated string tags = 9;
  repeated int32 packed = 10 [packed = true];
  optional Inner inner = 11;
  repeated Inner items = 12;
  optional group Legacy = 13 { optional int32 x = 14; }
  optional bool flag = 15;
  optional string unicode = 16;
  optional uint64 big = 17;
  optional string empty = 18;
}
"""


@pytest.fixture(scope="module")
def rich_pb2(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    out = tmp_path_factory.mktemp("rich")
    (out / "trawl_test_rich.proto").write_text(RICH_PROTO)
    run_protoc(f"-I{out}", f"--python_out={out}", str(out / "trawl_test_rich.proto"))
    return import_module("trawl_test_rich_pb2", out)


def decode_raw(data: bytes) -> dict[str, list[object]]:
    """`protoc --decode_raw` of `data`, as {field: [values]} (strings as bytes, fixed as ints)."""
    text = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "--decode_raw"],
        input=data, capture_output=True, check=True, timeout=60,
    ).stdout.decode()  # fmt: skip
    stack: list[dict[str, list[object]]] = [{}]
    for line in text.splitlines():
        line = line.strip()
        if line == "}":
            stack.pop()
        elif line.endswith(" {"):
            nested: dict[str, list[object]] = {}
            stack[-1].setdefault(line[:-2], []).append(nested)
            stack.append(nested)
        else:
            number, _, value = line.partition(": ")
            parsed: object
            if value.startswith('"'):
                parsed = codecs.escape_decode(value[1:-1].encode())[0]
            elif value.startswith("0x"):
                parsed = int(value, 16)
            else:
                parsed = int(value)
            stack[-1].setdefault(number, []).append(parsed)
    assert len(stack) == 1
    return stack[0]


def as_decode_raw(value: object) -> object:
    """Trawl's schemaless value in decode_raw's shape."""
    if isinstance(value, dict):
        if set(value) == {"@bytes"}:
            return base64.b64decode(value["@bytes"])
        return {key: [as_decode_raw(item) for item in (v if isinstance(v, list) else [v])] for key, v in value.items()}
    if isinstance(value, str):
        return value.encode()
    return value


# -- names, paths, timeouts, messages, trace-bin -------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/grpc", True),
        ("application/grpc+proto", True),
        ("application/grpc+json", True),
        ("Application/GRPC; charset=utf-8", True),
        ("application/grpc-web", False),
        ("application/grpc-web+proto", False),
        ("application/grpc-web-text", False),
        ("application/grpc+", False),
        ("application/json", False),
        ("", False),
    ],
)
def test_is_grpc(content_type: str, expected: bool) -> None:
    assert is_grpc(content_type) is expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/trawl.fixtures.Orders/GetOrder", ("trawl.fixtures.Orders", "GetOrder")),
        ("/Greeter/SayHello", ("Greeter", "SayHello")),
        ("/grpc.health.v1.Health/Check", ("grpc.health.v1.Health", "Check")),
        ("trawl.fixtures.Orders/GetOrder", ("", "")),
        ("/trawl.fixtures.Orders", ("", "")),
        ("/trawl.fixtures.Orders/", ("", "")),
        ("//GetOrder", ("", "")),
        ("/a/b/c", ("", "")),
        ("/a/b?x=1", ("", "")),
        ("/a b/c", ("", "")),
        ("", ("", "")),
        ("/", ("", "")),
    ],
)
def test_split_path(path: str, expected: tuple[str, str]) -> None:
    assert split_path(path) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("100m", 100_000_000),
        ("201m", 201_000_000),
        ("5S", 5_000_000_000),
        ("1H", 3_600_000_000_000),
        ("2M", 120_000_000_000),
        ("250u", 250_000),
        ("99999999n", 99_999_999),
        ("0m", 0),
        (" 7S ", 7_000_000_000),
        ("123456789m", None),  # nine digits
        ("100", None),
        ("m", None),
        ("10s", None),  # units are case-sensitive: s is not a unit, S is
        ("1.5S", None),
        ("-1S", None),
        ("\u0661\u0662S", None),  # Arabic-Indic digits: digits to str.isdigit, not to gRPC
        ("", None),
    ],
)
def test_parse_timeout(value: str, expected: int | None) -> None:
    assert parse_timeout(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("no such order", "no such order"),
        ("caf%C3%A9 %E2%9C%93", "café ✓"),
        ("100%25 done", "100% done"),
        ("bad %zz escape", "bad %zz escape"),
        ("cut %E2%9C", "cut \ufffd"),
        ("%FF", "\ufffd"),
    ],
)
def test_status_message(value: str, expected: str) -> None:
    assert status_message(value) == expected


def test_status_names_match_grpcio() -> None:
    assert {code.value[0]: code.name for code in grpc.StatusCode} == STATUS_NAMES


def test_trace_bin_opencensus_example() -> None:
    expected = ("4bf92f3577b34da6a3ce929d000e4736", "34f067aa0ba902b7")
    padded = base64.b64encode(OPENCENSUS_EXAMPLE)
    assert trace_bin(padded) == expected
    assert trace_bin(padded.rstrip(b"=")) == expected  # gRPC sends -bin values unpadded
    # Options are optional; a field of a later version ends parsing without failing it.
    assert trace_bin(base64.b64encode(OPENCENSUS_EXAMPLE[:-2])) == expected
    assert trace_bin(base64.b64encode(OPENCENSUS_EXAMPLE + b"\x03whatever")) == expected


@pytest.mark.parametrize(
    "raw",
    [
        OPENCENSUS_EXAMPLE[:10],  # trace id cut short
        b"\x01" + OPENCENSUS_EXAMPLE[1:],  # version 1
        b"\x00\x00" + bytes(16) + OPENCENSUS_EXAMPLE[18:],  # all-zero trace id
        OPENCENSUS_EXAMPLE[:18] + b"\x01" + bytes(8) + b"\x02\x01",  # all-zero span id
        OPENCENSUS_EXAMPLE[:18],  # no span id
        b"",
    ],
)
def test_trace_bin_rejects(raw: bytes) -> None:
    assert trace_bin(base64.b64encode(raw)) is None


def test_trace_bin_rejects_text_that_is_not_base64() -> None:
    assert trace_bin(b"not base64!") is None
    assert trace_bin(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01") is None


# -- message framing ------------------------------------------------------------------------------------


def framed(message: bytes, compressed: bool = False) -> bytes:
    return bytes([int(compressed)]) + len(message).to_bytes(4, "big") + message


@pytest.mark.parametrize("name", sorted(CAPTURES))
@needs_binary("tshark")
def test_message_counts_match_tshark(name: str) -> None:
    """Every stream's DATA cut at random places: counts, sizes and compressed flags per direction
    add up to what tshark's gRPC dissector finds in the capture."""
    port = CAPTURES[name]
    text = subprocess.run(
        ["tshark", "-r", str(HTTP2 / f"{name}.pcap"), "-d", f"tcp.port=={port},http2", "-Y", "grpc", "-T", "fields",
         "-e", "tcp.dstport", "-e", "grpc.message_length", "-e", "grpc.compressed_flag",
         "-E", "occurrence=a", "-E", "aggregator=,"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    expected: Counter[str] = Counter()
    for line in text.splitlines():
        dstport, lengths, flags = line.split("\t")
        side = "request" if int(dstport) == port else "response"
        for length, flag in zip(lengths.split(","), flags.split(","), strict=True):
            expected[f"{side}_messages"] += 1
            expected[f"{side}_bytes"] += int(length)
            expected[f"{side}_compressed"] += int(flag)
    found: Counter[str] = Counter()
    rng = random.Random(name)
    for stream in capture_streams(name).values():
        for side, messages in zip(("request", "response"), streams_of(stream, rng), strict=True):
            found[f"{side}_messages"] += messages.messages
            found[f"{side}_bytes"] += messages.message_bytes
            found[f"{side}_compressed"] += messages.compressed
            assert messages.notes == [] or messages.notes == ["grpc-message-truncated"]
    assert +found == +expected
    assert found["request_messages"] > 0


def test_fixture_messages_decode_like_grpcio(orders_pb2: ModuleType, orders: DescriptorSet) -> None:
    """The first message of each direction, after any chunking, is the message grpcio sent."""
    for name in CAPTURES:
        for stream in capture_streams(name).values():
            request, response = streams_of(stream, random.Random(stream.stream_id))
            if request.first_message is None or request.first_truncated:
                continue
            sent = orders_pb2.OrderRequest.FromString(request.first_message)
            assert orders.decode("trawl.fixtures.OrderRequest", request.first_message) == json_format.MessageToDict(
                sent, preserving_proto_field_name=True
            )
            if response.first_message is not None and not response.first_truncated:
                reply = orders_pb2.OrderReply.FromString(response.first_message)
                assert reply.order_id.startswith(sent.order_id) or sent.order_id in ("o-0", "z-0", "a")


def test_gzip_messages_of_grpc_core_inflate() -> None:
    stream = capture_streams("grpc_unary")[9]  # the gzip call
    assert stream.request_headers[b"grpc-encoding"] == b"gzip"
    request, response = streams_of(stream, random.Random(9))
    assert (request.compressed, response.compressed) == (1, 1)
    assert request.message_bytes == 84  # compressed size as sent (tshark: grpc.message_length 84)
    assert request.first_message is not None and len(request.first_message) > 84
    assert b"gzip" in request.first_message
    assert request.notes == response.notes == []


def test_large_message_is_truncated_at_the_bound() -> None:
    stream = capture_streams("grpc_unary")[11]  # 204,800-byte payload in two DATA frames
    whole = b"".join(stream.request_data)
    for limit in (0, 1, 1000, LIMIT):
        request = MessageStream("", limit)
        for piece in chunks(stream.request_data, random.Random(limit), 9000):
            request.feed(piece)
        request.finish()
        assert request.messages == 1
        assert request.message_bytes == 204_813
        assert request.first_message == whole[5 : 5 + limit]
        assert request.first_truncated
        assert request.notes == ["grpc-message-truncated"]


def test_compressed_first_message_codings() -> None:
    message = b"\x0a\x05hello" + b"\x1a\x80\x08" + bytes(range(256)) * 4
    cases = {
        "gzip": gzip.compress(message),
        "deflate": zlib.compress(message),  # zlib-wrapped, as grpc-core sends
        "zstd": zstandard.ZstdCompressor().compress(message),
    }
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    cases["deflate-raw"] = raw.compress(message) + raw.flush()  # raw deflate, as some peers send
    for encoding, compressed in cases.items():
        for size in (1, 2, 3, 64, 100_000):
            stream = MessageStream(encoding.removesuffix("-raw"), LIMIT)
            data = framed(compressed, compressed=True) + framed(b"second")
            for position in range(0, len(data), size):
                stream.feed(data[position : position + size])
            stream.finish()
            assert stream.first_message == message, (encoding, size)
            assert (stream.messages, stream.compressed, stream.notes) == (2, 1, [])
            assert stream.message_bytes == len(compressed) + len(b"second")


def test_decompression_bomb_stops_at_the_bound() -> None:
    """10 MB of zeros compress to ~10 KB: the first message stops at the bound, memory with it."""
    zeros = bytes(10_000_000)
    for encoding, compressed in (("gzip", gzip.compress(zeros)), ("zstd", zstandard.ZstdCompressor().compress(zeros))):
        assert len(compressed) < 20_000
        data = framed(compressed, compressed=True)
        tracemalloc.start()
        stream = MessageStream(encoding, LIMIT)
        for position in range(0, len(data), 1000):
            stream.feed(data[position : position + 1000])
        stream.finish()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert stream.first_message == bytes(LIMIT)
        assert stream.notes == ["grpc-message-truncated"]
        assert peak < 1_000_000, (encoding, peak)


def test_later_messages_are_skipped_not_kept() -> None:
    big = b"\x0a" + b"x" * 3_000_000
    header = b"\x00" + len(big).to_bytes(4, "big")
    tracemalloc.start()
    stream = MessageStream("", 16)
    stream.feed(framed(b"first"))
    stream.feed(header)
    for position in range(0, len(big), 65536):
        piece = big[position : position + 65536]
        stream.feed(piece)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    stream.finish()
    assert (stream.messages, stream.message_bytes, stream.first_message) == (2, 5 + len(big), b"first")
    assert peak < 500_000


@pytest.mark.parametrize(
    ("encoding", "data", "notes", "messages", "first"),
    [
        ("", framed(b"abc", compressed=True), ["grpc-compressed-without-encoding"], 1, None),
        ("snappy", framed(b"abc", compressed=True), ["grpc-compressed-unknown-encoding"], 1, None),
        ("gzip", framed(b"not gzip at all", compressed=True), ["grpc-decompress-failed"], 1, None),
        ("gzip", framed(gzip.compress(b"abcdef")[:-9], compressed=True), ["grpc-decompress-failed"], 1, None),
        ("deflate", framed(b"x", compressed=True), ["grpc-decompress-failed"], 1, None),
        ("gzip", framed(b"", compressed=True), [], 1, b""),
        ("gzip", framed(b"plain"), [], 1, b"plain"),  # the flag is per message: 0 is not compressed
        ("", framed(b"abc") + b"\x02\x00\x00\x00\x01x" + framed(b"more"), ["grpc-bad-prefix"], 1, b"abc"),
        ("", b"\x00\xff\xff\xff\xff", ["grpc-impossible-length"], 0, None),
        ("", framed(b"abc")[:-1], ["grpc-incomplete-message"], 0, None),
        ("", framed(b"abc") + b"\x00\x00", ["grpc-incomplete-message"], 1, b"abc"),
        ("", framed(b""), [], 1, b""),
        ("", b"", [], 0, None),
    ],
)
def test_message_stream_notes(encoding: str, data: bytes, notes: list[str], messages: int, first: bytes | None) -> None:
    for size in (1, 4, len(data) or 1):
        stream = MessageStream(encoding, LIMIT)
        for position in range(0, len(data), size):
            stream.feed(data[position : position + size])
        stream.finish()
        assert (stream.notes, stream.messages, stream.first_message) == (notes, messages, first)


# -- calls from the captures --------------------------------------------------------------------------


def summary(call: ApiCall) -> tuple[str, str, str, str]:
    return call.method, call.path, call.status, Outcome.Name(call.outcome)


def test_unary_calls(orders: DescriptorSet) -> None:
    streams = capture_streams("grpc_unary")
    calls = {stream_id: grpc_call(stream, orders, random.Random(stream_id)) for stream_id, stream in streams.items()}
    path = "/trawl.fixtures.Orders/GetOrder"
    ok = calls[1]
    assert summary(ok) == ("POST", path, "0", "OUTCOME_OK")
    assert (ok.grpc.service, ok.grpc.method, ok.grpc.call_type) == ("trawl.fixtures.Orders", "GetOrder", "unary")
    assert ok.grpc.content_type == "application/grpc"
    assert json.loads(ok.grpc.request_message) == {"order_id": "order-1", "quantity": 1}
    assert json.loads(ok.grpc.response_message) == {"order_id": "order-1", "status": "ok", "total_cents": "1999"}
    assert (ok.trace_id, ok.parent_span_id) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")

    not_found = calls[3]
    assert summary(not_found) == ("POST", path, "5", "OUTCOME_ERROR")
    assert not_found.grpc.trailers_only
    assert (not_found.grpc.status_code, not_found.grpc.status_message) == (5, "no such order")

    deadline = calls[5]
    assert summary(deadline) == ("POST", path, "4", "OUTCOME_DEADLINE_EXCEEDED")
    assert deadline.grpc.timeout_ns == 201_000_000
    assert deadline.grpc.status_message == "Deadline Exceeded"

    cancelled = calls[7]  # RST_STREAM CANCEL from the client, no response at all
    assert summary(cancelled) == ("POST", path, "", "OUTCOME_CANCELLED")
    assert (cancelled.grpc.status_code, cancelled.grpc.request_messages, cancelled.grpc.response_messages) == (1, 1, 0)

    compressed = calls[9]
    assert summary(compressed) == ("POST", path, "0", "OUTCOME_OK")
    detail = compressed.grpc
    assert (detail.request_encoding, detail.response_encoding) == ("gzip", "gzip")
    assert (detail.request_compressed, detail.response_compressed) == (1, 1)
    assert (detail.request_message_bytes, detail.response_message_bytes) == (84, 91)
    assert json.loads(detail.request_message)["order_id"] == "gzip"

    large = calls[11]
    assert (large.grpc.request_message_bytes, large.grpc.response_message_bytes) == (204_813, 204_818)
    assert list(large.notes) == ["request-grpc-message-truncated", "response-grpc-message-truncated"]
    partial = json.loads(large.grpc.request_message)  # schemaless: the schema cannot read a cut message
    assert partial["1"] == "large" and "@undecoded" in partial
    assert len(large.grpc.request_message) <= LIMIT

    parallel = [call for stream_id, call in calls.items() if stream_id >= 13]
    assert len(parallel) == 50
    assert {summary(call) for call in parallel} == {("POST", path, "0", "OUTCOME_OK")}
    assert sorted(json.loads(call.grpc.request_message)["order_id"] for call in parallel) == sorted(
        f"parallel-{index}" for index in range(50)
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "grpc_server_streaming",
            [("0", "OUTCOME_OK", 1, 5), ("14", "OUTCOME_ERROR", 1, 2), ("4", "OUTCOME_DEADLINE_EXCEEDED", 1, 3),
             ("", "OUTCOME_CANCELLED", 1, 2)],
        ),
        (
            "grpc_client_streaming",
            [("0", "OUTCOME_OK", 4, 1), ("3", "OUTCOME_ERROR", 2, 0), ("0", "OUTCOME_OK", 3, 1),
             ("", "OUTCOME_CANCELLED", 1, 0)],
        ),
        (
            "grpc_bidi",
            [("0", "OUTCOME_OK", 4, 4), ("9", "OUTCOME_ERROR", 2, 1), ("", "OUTCOME_CANCELLED", 3, 3),
             ("4", "OUTCOME_DEADLINE_EXCEEDED", 1, 1)],
        ),
    ],
)  # fmt: skip
def test_streaming_calls(name: str, expected: list[tuple[str, str, int, int]], orders: DescriptorSet) -> None:
    streams = capture_streams(name)
    calls = [grpc_call(streams[stream_id], orders, random.Random(stream_id)) for stream_id in sorted(streams)]
    found = [
        (call.status, Outcome.Name(call.outcome), call.grpc.request_messages, call.grpc.response_messages)
        for call in calls
    ]
    assert found == expected
    call_type = {"grpc_server_streaming": "server_streaming", "grpc_client_streaming": "client_streaming"}
    assert {call.grpc.call_type for call in calls} == {call_type.get(name, "bidi_streaming")}


def test_call_type_without_descriptors_is_inferred_from_counts() -> None:
    inferred = {
        name: [grpc_call(stream, None).grpc.call_type for _, stream in sorted(capture_streams(name).items())]
        for name in ("grpc_server_streaming", "grpc_client_streaming", "grpc_bidi")
    }
    # The documented limits show: a stream with one message (or cancelled after one) looks unary.
    assert inferred == {
        "grpc_server_streaming": ["server_streaming", "server_streaming", "server_streaming", "server_streaming"],
        "grpc_client_streaming": ["client_streaming", "client_streaming", "client_streaming", "unary"],
        "grpc_bidi": ["bidi_streaming", "client_streaming", "bidi_streaming", "unary"],
    }


def test_schemaless_messages_without_descriptors() -> None:
    call = grpc_call(capture_streams("grpc_unary")[1], None)
    assert json.loads(call.grpc.request_message) == {"1": "order-1", "2": 1}
    assert json.loads(call.grpc.response_message) == {"1": "order-1", "2": "ok", "3": 1999}


# -- apply and reset_outcome on hand-made headers ------------------------------------------------------


def headers_call(
    response: dict[bytes, bytes] | None = None,
    trailers: dict[bytes, bytes] | None = None,
    request: dict[bytes, bytes] | None = None,
    messages: tuple[bytes, bytes] = (b"", b""),
    end_stream: bool = True,
) -> ApiCall:
    request_headers = {b":method": b"POST", b":path": b"/pkg.Svc/Do", b"content-type": b"application/grpc"}
    request_headers.update(request or {})
    streams = []
    for data in messages:
        stream = MessageStream("", LIMIT)
        stream.feed(data)
        stream.finish()
        streams.append(stream)
    call = ApiCall(protocol="grpc")
    call.http2.response_end_stream = end_stream
    trace_context(call, request_headers)
    apply(call, request_headers, response or {}, trailers or {}, streams[0], streams[1], None, response is not None)
    return call


@pytest.mark.parametrize(
    ("code", "outcome"),
    [("0", "OUTCOME_OK"), ("1", "OUTCOME_CANCELLED"), ("4", "OUTCOME_DEADLINE_EXCEEDED"), ("2", "OUTCOME_ERROR"),
     ("14", "OUTCOME_ERROR"), ("16", "OUTCOME_ERROR"), ("99", "OUTCOME_ERROR")],
)  # fmt: skip
def test_outcome_by_grpc_status(code: str, outcome: str) -> None:
    call = headers_call({b":status": b"200"}, {b"grpc-status": code.encode(), b"grpc-message": b"caf%C3%A9"})
    assert (call.status, Outcome.Name(call.outcome), call.grpc.status_code) == (code, outcome, int(code))
    assert call.grpc.status_message == "café"
    assert not call.grpc.trailers_only


def test_status_without_grpc_status() -> None:
    proxy = headers_call({b":status": b"503", b"content-type": b"text/html"})
    assert (proxy.status, Outcome.Name(proxy.outcome), proxy.grpc.status_code) == ("", "OUTCOME_ERROR", 14)
    assert list(proxy.notes) == ["grpc-status-from-http"]
    ended = headers_call({b":status": b"200"})
    assert (ended.status, Outcome.Name(ended.outcome), ended.grpc.status_code) == ("", "OUTCOME_ERROR", 13)
    assert list(ended.notes) == ["grpc-status-missing"]
    unfinished = headers_call({b":status": b"200"}, end_stream=False)
    assert (unfinished.status, Outcome.Name(unfinished.outcome)) == ("", "OUTCOME_NO_RESPONSE")
    unanswered = headers_call(None, end_stream=False)
    assert (unanswered.status, Outcome.Name(unanswered.outcome)) == ("", "OUTCOME_NO_RESPONSE")
    malformed = headers_call({b":status": b"200"}, {b"grpc-status": b"ok"})
    assert (malformed.status, Outcome.Name(malformed.outcome), malformed.grpc.status_code) == ("ok", "OUTCOME_ERROR", 2)
    assert list(malformed.notes) == ["grpc-bad-status"]


def test_trailers_take_precedence_over_headers() -> None:
    call = headers_call({b":status": b"200", b"grpc-status": b"5"}, {b"grpc-status": b"0"})
    assert (call.status, call.grpc.trailers_only) == ("0", False)


def test_trace_bin_fills_trace_fields_only_when_no_other_header_did() -> None:
    value = base64.b64encode(OPENCENSUS_EXAMPLE).rstrip(b"=")
    alone = headers_call({b":status": b"200"}, {b"grpc-status": b"0"}, {b"grpc-trace-bin": value})
    assert (alone.trace_id, alone.parent_span_id) == ("4bf92f3577b34da6a3ce929d000e4736", "34f067aa0ba902b7")
    traceparent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    both = headers_call(
        {b":status": b"200"}, {b"grpc-status": b"0"}, {b"grpc-trace-bin": value, b"traceparent": traceparent}
    )
    assert (both.trace_id, both.parent_span_id) == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")


def test_timeouts_and_codecs() -> None:
    bad = headers_call({b":status": b"200"}, {b"grpc-status": b"0"}, {b"grpc-timeout": b"soon"})
    assert (bad.grpc.timeout_ns, list(bad.notes)) == (0, ["grpc-bad-timeout"])
    as_json = headers_call(
        {b":status": b"200"},
        {b"grpc-status": b"0"},
        {b"content-type": b"application/grpc+json"},
        (framed(b'{"orderId": "42", "quantity": 2}'), framed(b"not json")),
    )
    assert json.loads(as_json.grpc.request_message) == {"orderId": "42", "quantity": 2}
    assert json.loads(as_json.grpc.response_message) == {"@undecoded": base64.b64encode(b"not json").decode()}
    thrift = headers_call(
        {b":status": b"200"},
        {b"grpc-status": b"0"},
        {b"content-type": b"application/grpc+thrift"},
        (framed(b"\x0b"), b""),
    )
    assert (thrift.grpc.request_message, thrift.grpc.request_messages) == ("", 1)


@pytest.mark.parametrize(
    ("code", "by_client", "elapsed_ms", "timeout_ms", "outcome", "status_code"),
    [
        ("CANCEL", True, 202, 201, "OUTCOME_DEADLINE_EXCEEDED", 4),
        ("CANCEL", True, 200, 201, "OUTCOME_DEADLINE_EXCEEDED", 4),  # the header is rounded up
        ("CANCEL", True, 150, 201, "OUTCOME_CANCELLED", 1),
        ("CANCEL", True, 5000, 0, "OUTCOME_CANCELLED", 1),  # no deadline
        ("CANCEL", False, 500, 201, "OUTCOME_ERROR", 1),
        ("REFUSED_STREAM", False, 1, 0, "OUTCOME_ERROR", 14),
        ("INTERNAL_ERROR", False, 1, 0, "OUTCOME_ERROR", 13),
        ("ENHANCE_YOUR_CALM", False, 1, 0, "OUTCOME_ERROR", 8),
        ("PROTOCOL_ERROR", True, 1, 0, "OUTCOME_ERROR", 13),
    ],
)
def test_reset_outcome(
    code: str, by_client: bool, elapsed_ms: int, timeout_ms: int, outcome: str, status_code: int
) -> None:
    call = headers_call(None, end_stream=False)
    reset_outcome(call, code, by_client, 1_000_000_000, 1_000_000_000 + elapsed_ms * 1_000_000, timeout_ms * 1_000_000)
    assert (Outcome.Name(call.outcome), call.grpc.status_code, call.status) == (outcome, status_code, "")


def test_reset_after_status_keeps_the_status() -> None:
    call = headers_call({b":status": b"200"}, {b"grpc-status": b"0"})
    reset_outcome(call, "NO_ERROR", False, 0, 10, 0)
    assert (call.status, Outcome.Name(call.outcome), call.grpc.status_code) == ("0", "OUTCOME_OK", 0)


# -- protobuf: schemaless against protoc --decode_raw --------------------------------------------------


def test_schemaless_matches_protoc_decode_raw(rich_pb2: ModuleType, orders_pb2: ModuleType) -> None:
    rich = rich_pb2.Rich(
        name="rich-1",
        negative=-5,
        zigzag=-300,
        f32=0xDEADBEEF,
        f64=2**63 + 5,
        ratio=1.5,
        weight=0.25,
        blob=b"\x00\x01\xfe\xff",
        tags=["alpha", "beta", "gamma"],
        packed=[1, 2, 300],
        inner=rich_pb2.Inner(a=7, label="seven", children=[rich_pb2.Inner(a=8), rich_pb2.Inner(label="nine")]),
        items=[rich_pb2.Inner(a=1), rich_pb2.Inner(a=2)],
        legacy=rich_pb2.Rich.Legacy(x=9),
        flag=True,
        unicode="zürich ✓ tab\tand\nnewline",
        big=2**64 - 1,
        empty="",
    )
    messages = [
        rich.SerializeToString(),
        orders_pb2.OrderRequest(order_id="order-1", quantity=3, payload=bytes(range(40))).SerializeToString(),
        orders_pb2.OrderReply(order_id="o", status="ok", total_cents=-1999).SerializeToString(),
    ]
    for data in messages:
        decoded = decode_schemaless(data)
        assert isinstance(decoded, dict) and "@undecoded" not in decoded
        assert as_decode_raw(decoded) == decode_raw(data)
    decoded = decode_schemaless(messages[0])
    assert isinstance(decoded, dict)
    assert decoded["9"] == ["alpha", "beta", "gamma"]
    assert decoded["11"] == {"1": 7, "2": "seven", "3": [{"1": 8}, {"2": "nine"}]}
    assert decoded["13"] == {"14": 9}  # the group
    assert decoded["2"] == 2**64 - 5  # int32 -5 on the wire


def test_schemaless_prefers_printable_text_where_decode_raw_prefers_a_message() -> None:
    data = b"\x0a\x02hi"  # field 1 = "hi", which also parses as {13: 105}
    assert decode_raw(data) == {"1": [{"13": [105]}]}
    assert decode_schemaless(data) == {"1": "hi"}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", {}),
        (b"\xff\xff", {"@undecoded": "//8="}),
        (b"\x08\x01\xff", {"1": 1, "@undecoded": "/w=="}),  # a field, then garbage
        (b"\x0a\x05ab", {"@undecoded": "CgVhYg=="}),  # a length past the end
        (b"\x00\x01", {"@undecoded": "AAE="}),  # field number 0
        (b"\x0f", {"@undecoded": "Dw=="}),  # wire type 7
        (b"\x0b\x08\x01", {"@undecoded": "CwgB"}),  # a group that never ends
        (b"\x08" + b"\xff" * 11, {"@undecoded": "CP//////////////"}),  # a varint over 10 bytes
        (b"\x12\x03\x00\x01\x02", {"2": {"@bytes": "AAEC"}}),
    ],
)
def test_schemaless_bad_input(data: bytes, expected: dict[str, object]) -> None:
    assert decode_schemaless(data) == expected


def test_schemaless_bounds() -> None:
    nested = b"\x08\x01"
    for _ in range(20):
        nested = b"\x12" + bytes([len(nested)]) + nested if len(nested) < 128 else nested
    deep = decode_schemaless(nested, max_depth=3)
    depth = 0
    value: Any = deep
    while isinstance(value, dict) and "2" in value:
        value = value["2"]
        depth += 1
    assert depth == 3 and set(value) == {"@bytes"}  # the fourth level is shown as bytes
    many = b"\x08\x01" * 1000
    bounded = decode_schemaless(many, max_fields=100)
    assert isinstance(bounded, dict)
    assert bounded["1"] == [1] * 100
    assert base64.b64decode(bounded["@undecoded"]) == b"\x08\x01" * 900


# -- protobuf: descriptor sets -------------------------------------------------------------------------


def test_descriptor_set_methods_and_decoding(orders: DescriptorSet, orders_pb2: ModuleType) -> None:
    assert orders.missing == {} and orders.problems == []
    method = orders.method("trawl.fixtures.Orders", "Chat")
    assert method is not None
    assert (method.input_type, method.output_type) == ("trawl.fixtures.OrderRequest", "trawl.fixtures.OrderReply")
    assert (method.client_streaming, method.server_streaming, method.call_type) == (True, True, "bidi_streaming")
    shapes = [orders.method("trawl.fixtures.Orders", name) for name in ("GetOrder", "ListOrders", "UploadOrders")]
    assert [shape.call_type if shape else "" for shape in shapes] == ["unary", "server_streaming", "client_streaming"]
    assert orders.method("trawl.fixtures.Orders", "Nope") is None
    assert orders.method("other.Service", "GetOrder") is None
    reply = orders_pb2.OrderReply(order_id="o-1", status="shipped", total_cents=2**40, payload=b"\x00\xff")
    data = reply.SerializeToString()
    assert orders.decode("trawl.fixtures.OrderReply", data) == json_format.MessageToDict(
        reply, preserving_proto_field_name=True
    )
    assert orders.decode(".trawl.fixtures.OrderReply", data) == orders.decode("trawl.fixtures.OrderReply", data)
    assert orders.decode("trawl.fixtures.Nope", data) is None
    assert orders.decode("trawl.fixtures.OrderReply", b"\x0a\x05ab") is None  # does not parse


def test_descriptor_set_uses_a_private_pool(tmp_path: Path) -> None:
    (tmp_path / "trawl_private.proto").write_text(
        'syntax = "proto3";\npackage trawl.testonly.private;\nmessage Thing { string name = 1; }\n'
    )
    run_protoc(
        f"-I{tmp_path}", f"--descriptor_set_out={tmp_path / 'private.desc'}", str(tmp_path / "trawl_private.proto")
    )
    loaded = DescriptorSet.load([tmp_path / "private.desc"])
    assert loaded.decode("trawl.testonly.private.Thing", b"\x0a\x02ab") == {"name": "ab"}
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindMessageTypeByName("trawl.testonly.private.Thing")


def test_descriptor_set_without_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built without --include_imports: Timestamp comes from the protobuf package; the types of an
    import that is nowhere read as bytes (enums as numbers); everything else decodes."""
    (tmp_path / "gx_b.proto").write_text(
        'syntax = "proto3";\npackage gx.b;\nmessage Box { string label = 1; }\n'
        "enum Kind { KIND_UNSET = 0; KIND_BIG = 2; }\n"
    )
    (tmp_path / "gx_a.proto").write_text(
        'syntax = "proto3";\npackage gx.a;\nimport "gx_b.proto";\nimport "google/protobuf/timestamp.proto";\n'
        "message Parcel { gx.b.Box box = 1; gx.b.Kind kind = 2; google.protobuf.Timestamp at = 3; string note = 4;\n"
        "  repeated gx.b.Box more = 5; }\n"
        "service Depot { rpc Put(stream gx.b.Box) returns (Parcel); rpc Get(Parcel) returns (Parcel); }\n"
    )
    (tmp_path / "gx_c.proto").write_text('syntax = "proto3";\npackage gx.c;\nmessage Lone { int32 n = 1; }\n')
    protos = [str(tmp_path / name) for name in ("gx_a.proto", "gx_c.proto")]
    run_protoc(f"-I{tmp_path}", f"--descriptor_set_out={tmp_path / 'partial.desc'}", *protos)
    run_protoc(f"-I{tmp_path}", f"--python_out={tmp_path}", *protos, str(tmp_path / "gx_b.proto"))
    monkeypatch.syspath_prepend(str(tmp_path))
    gx_a = import_module("gx_a_pb2", tmp_path)
    gx_b = import_module("gx_b_pb2", tmp_path)

    loaded = DescriptorSet.load([tmp_path / "partial.desc"])
    assert loaded.missing == {"gx_b.proto": ["gx_a.proto"]}
    assert loaded.problems == []
    assert any("gx_b.proto" in line and "--include_imports" in line for line in loaded.warnings())
    parcel = gx_a.Parcel(box=gx_b.Box(label="fragile"), kind=gx_b.KIND_BIG, note="hello", more=[gx_b.Box(label="x")])
    parcel.at.FromSeconds(1_700_000_000)
    decoded = loaded.decode("gx.a.Parcel", parcel.SerializeToString())
    assert decoded == {
        "box": base64.b64encode(gx_b.Box(label="fragile").SerializeToString()).decode(),
        "kind": 2,
        "at": "2023-11-14T22:13:20Z",
        "note": "hello",
        "more": [base64.b64encode(gx_b.Box(label="x").SerializeToString()).decode()],
    }
    assert loaded.decode("gx.c.Lone", b"\x08\x07") == {"n": 7}
    put = loaded.method("gx.a.Depot", "Put")
    assert put is not None and (put.input_type, put.call_type) == ("gx.b.Box", "client_streaming")
    assert loaded.decode("gx.b.Box", b"\x0a\x01x") is None  # its file is not in the set


def test_descriptor_sets_load_together(tmp_path: Path) -> None:
    (tmp_path / "gy.proto").write_text('syntax = "proto3";\npackage gy;\nmessage Y { int32 n = 1; }\n')
    run_protoc(f"-I{tmp_path}", f"--descriptor_set_out={tmp_path / 'gy.desc'}", str(tmp_path / "gy.proto"))
    loaded = DescriptorSet.load([ORDERS_DESC, tmp_path / "gy.desc", ORDERS_DESC])
    assert loaded.decode("gy.Y", b"\x08\x02") == {"n": 2}
    assert loaded.method("trawl.fixtures.Orders", "GetOrder") is not None


@pytest.mark.parametrize(
    ("name", "content"),
    [("orders.proto", (HTTP2 / "orders.proto").read_bytes()), ("empty.desc", b""), ("noise.desc", b"\xff" * 64)],
)
def test_descriptor_set_errors_name_the_file_and_the_fix(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as raised:
        DescriptorSet.load([path])
    assert str(path) in str(raised.value)
    assert "--descriptor_set_out" in str(raised.value)


def test_descriptor_set_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        DescriptorSet.load([tmp_path / "absent.desc"])


# -- JSON text -----------------------------------------------------------------------------------------


def test_to_json_text_is_valid_and_bounded_at_every_size() -> None:
    value = {
        "1": "x" * 100,
        "2": [1, 2.5, True, None, {"a": "b" * 50}, [[["q" * 20]]]],
        "3": {"4": 'y\n"é' * 30, "5": {"@bytes": "AAEC"}},
    }
    full = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for size in range(len(full) + 2):
        text = to_json_text(value, size)
        assert len(text) <= size
        if size >= 20:
            parsed = json.loads(text)
            assert isinstance(parsed, dict)
        if size >= len(full):
            assert text == full
    cut = json.loads(to_json_text(value, 60))
    assert cut == {"1": "x" * 33 + "…", "@truncated": True}
    assert to_json_text(value, 19) == ""


def test_to_json_text_edge_values() -> None:
    assert to_json_text([float("nan"), float("inf"), -float("inf")], 100) == '["NaN","Infinity","-Infinity"]'
    assert to_json_text({"a": object()}, 100) == ""
    assert to_json_text("z" * 100, 30) == '"' + "z" * 9 + '…"'
