"""Hypothesis: the gRPC layer and protobuf decoding take any bytes without raising and within
their bounds; MessageStream gives the same result however the bytes are split; valid framings
and valid wire-format messages are read completely."""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from collections.abc import Callable
from typing import Any

import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import FIXTURES, scaled
from trawl.dissector.protobuf import DescriptorSet, decode_schemaless, to_json_text
from trawl.dissector.protocols.grpc import (
    MessageStream,
    apply,
    parse_timeout,
    reset_outcome,
    split_path,
    status_message,
    trace_bin,
)
from trawl.v1.calls_pb2 import ApiCall, Outcome

FAST = settings(max_examples=scaled(300), deadline=None)
ENCODINGS = ["", "identity", "gzip", "deflate", "zstd", "snappy", "br"]
NOTES = {
    "grpc-bad-prefix",
    "grpc-impossible-length",
    "grpc-incomplete-message",
    "grpc-compressed-unknown-encoding",
    "grpc-compressed-without-encoding",
    "grpc-decompress-failed",
    "grpc-message-truncated",
}
ORDERS = DescriptorSet.load([FIXTURES / "http2" / "orders.desc"])


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    pieces = []
    start = 0
    for point in [*points, len(data)]:
        pieces.append(data[start:point])
        start = point
    return pieces


def run(encoding: str, limit: int, pieces: list[bytes]) -> MessageStream:
    stream = MessageStream(encoding, limit)
    for piece in pieces:
        stream.feed(piece)
    stream.finish()
    return stream


def state(stream: MessageStream) -> tuple[object, ...]:
    return (
        stream.messages,
        stream.message_bytes,
        stream.compressed,
        stream.first_message,
        stream.first_truncated,
        stream.notes,
        stream.stopped,
    )


# Bytes that look like gRPC framing often enough: valid prefixes with random bodies, mixed with noise.
frame = st.builds(
    lambda flag, body, declared: (
        bytes([flag]) + (len(body) if declared is None else declared).to_bytes(4, "big") + body
    ),
    st.sampled_from([0, 0, 0, 1, 2, 0x80]),
    st.binary(max_size=64),
    st.one_of(st.none(), st.integers(0, 2**32 - 1)),
)
grpc_bytes = st.one_of(st.binary(max_size=300), st.lists(frame, max_size=6).map(b"".join))


@FAST
@given(
    grpc_bytes,
    st.sampled_from(ENCODINGS),
    st.integers(0, 100),
    st.lists(st.integers(0, 400), max_size=8),
    st.lists(st.integers(0, 400), max_size=8),
)
def test_message_stream_any_bytes_any_split(
    data: bytes, encoding: str, limit: int, cuts: list[int], other_cuts: list[int]
) -> None:
    one = run(encoding, limit, split(data, cuts))
    assert state(one) == state(run(encoding, limit, split(data, other_cuts)))
    assert state(one) == state(run(encoding, limit, [data]))
    assert one.first_message is None or len(one.first_message) <= limit
    assert 0 <= one.compressed <= one.messages
    assert one.message_bytes + 5 * one.messages <= len(data)
    assert set(one.notes) <= NOTES and len(set(one.notes)) == len(one.notes)


@FAST
@given(
    st.lists(st.tuples(st.binary(max_size=200), st.booleans()), min_size=1, max_size=5),
    st.sampled_from(["gzip", "deflate", "zstd"]),
    st.integers(0, 300),
    st.lists(st.integers(0, 2000), max_size=10),
)
def test_valid_framings_are_read_completely(
    messages: list[tuple[bytes, bool]], encoding: str, limit: int, cuts: list[int]
) -> None:
    compressors: dict[str, Callable[[bytes], bytes]] = {
        "gzip": gzip.compress,
        "deflate": zlib.compress,
        "zstd": zstandard.ZstdCompressor().compress,
    }
    compress = compressors[encoding]
    wire = []
    for body, compressed in messages:
        sent = compress(body) if compressed else body
        wire.append((sent, compressed))
    data = b"".join(bytes([int(flag)]) + len(sent).to_bytes(4, "big") + sent for sent, flag in wire)
    stream = run(encoding, limit, split(data, cuts))
    assert stream.messages == len(messages)
    assert stream.message_bytes == sum(len(sent) for sent, _ in wire)
    assert stream.compressed == sum(flag for _, flag in wire)
    first = messages[0][0]
    assert stream.first_message == first[:limit]
    assert stream.first_truncated == (len(first) > limit)
    assert stream.notes == (["grpc-message-truncated"] if len(first) > limit else [])


def _fields(depth: int) -> st.SearchStrategy[bytes]:
    def key(number: int, wire_type: int) -> bytes:
        return _varint(number << 3 | wire_type)

    scalar = st.one_of(
        st.builds(lambda n, v: key(n, 0) + _varint(v), st.integers(1, 40), st.integers(0, 2**64 - 1)),
        st.builds(lambda n, v: key(n, 5) + v, st.integers(1, 40), st.binary(min_size=4, max_size=4)),
        st.builds(lambda n, v: key(n, 1) + v, st.integers(1, 40), st.binary(min_size=8, max_size=8)),
        st.builds(lambda n, v: key(n, 2) + _varint(len(v)) + v, st.integers(1, 40), st.binary(max_size=30)),
    )
    if depth == 0:
        return scalar
    nested = _fields(depth - 1)
    return st.one_of(
        scalar,
        st.builds(
            lambda n, v: key(n, 2) + _varint(len(v)) + v, st.integers(1, 40), st.lists(nested, max_size=4).map(b"".join)
        ),
        st.builds(
            lambda n, v: key(n, 3) + v + key(n, 4), st.integers(1, 40), st.lists(nested, max_size=3).map(b"".join)
        ),
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _count(value: Any, depth: int = 1) -> tuple[int, int]:
    """(fields, depth) of a schemaless result."""
    if not isinstance(value, dict) or set(value) == {"@bytes"}:
        return 0, depth - 1
    fields, deepest = 0, depth
    for key, item in value.items():
        if key.startswith("@"):
            continue
        for element in item if isinstance(item, list) else [item]:
            inner_fields, inner_depth = _count(element, depth + 1)
            fields += 1 + inner_fields
            deepest = max(deepest, inner_depth)
    return fields, deepest


@FAST
@given(st.binary(max_size=400), st.integers(1, 10), st.integers(0, 600))
def test_schemaless_any_bytes(data: bytes, max_depth: int, max_fields: int) -> None:
    decoded = decode_schemaless(data, max_depth=max_depth, max_fields=max_fields)
    assert isinstance(decoded, dict)
    json.dumps(decoded)
    fields, depth = _count(decoded)
    assert fields <= max_fields
    assert depth <= max_depth
    if "@undecoded" in decoded:
        rest = base64.b64decode(decoded["@undecoded"])
        assert rest and data.endswith(rest)


@FAST
@given(st.lists(_fields(3), max_size=8).map(b"".join))
def test_schemaless_reads_valid_messages_to_the_end(data: bytes) -> None:
    decoded = decode_schemaless(data)
    assert isinstance(decoded, dict) and "@undecoded" not in decoded


def _containers(children: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.one_of(st.lists(children, max_size=5), st.dictionaries(st.text(max_size=8), children, max_size=5))


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30)), _containers, max_leaves=30
)


@FAST
@given(json_values, st.integers(0, 400))
def test_to_json_text_bounded_and_valid(value: object, max_chars: int) -> None:
    text = to_json_text(value, max_chars)
    assert len(text) <= max_chars
    if text:
        json.loads(text)


@FAST
@given(st.binary(max_size=200), st.sampled_from(["trawl.fixtures.OrderRequest", "trawl.fixtures.OrderReply"]))
def test_descriptor_decode_any_bytes(data: bytes, type_name: str) -> None:
    decoded = ORDERS.decode(type_name, data)
    assert decoded is None or isinstance(decoded, dict)


header_names = st.sampled_from(
    [b":path", b":method", b":status", b"content-type", b"grpc-encoding", b"grpc-timeout", b"grpc-status",
     b"grpc-message", b"grpc-trace-bin", b"traceparent"]
)  # fmt: skip
headers = st.dictionaries(header_names, st.binary(max_size=40), max_size=6)


@FAST
@given(headers, headers, headers, grpc_bytes, grpc_bytes, st.booleans(), st.booleans(), st.text(max_size=20))
def test_apply_any_headers(
    request_headers: dict[bytes, bytes],
    response_headers: dict[bytes, bytes],
    trailers: dict[bytes, bytes],
    request_data: bytes,
    response_data: bytes,
    response_seen: bool,
    with_schema: bool,
    reset_code: str,
) -> None:
    request = run("gzip", 64, [request_data])
    response = run("", 64, [response_data])
    call = ApiCall(protocol="grpc")
    apply(
        call,
        request_headers,
        response_headers,
        trailers,
        request,
        response,
        ORDERS if with_schema else None,
        response_seen,
    )
    for text in (call.grpc.request_message, call.grpc.response_message):
        assert len(text) <= 64
        if text:
            json.loads(text)
    assert call.outcome != Outcome.OUTCOME_UNSPECIFIED
    reset_outcome(call, reset_code, True, 0, 5, call.grpc.timeout_ns)
    call.SerializeToString()  # every string field is valid UTF-8


@FAST
@given(st.text(max_size=40), st.binary(max_size=80))
def test_small_parsers_any_input(text: str, raw: bytes) -> None:
    timeout = parse_timeout(text)
    assert timeout is None or 0 <= timeout <= 99_999_999 * 3_600_000_000_000
    service, method = split_path(text)
    assert bool(service) == bool(method)
    status_message(text)
    ids = trace_bin(raw)
    assert ids is None or (len(ids[0]), len(ids[1])) == (32, 16)
    ids = trace_bin(base64.b64encode(b"\x00" + raw))
    assert ids is None or (len(ids[0]), len(ids[1])) == (32, 16)
