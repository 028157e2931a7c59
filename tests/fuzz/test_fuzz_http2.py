"""Property tests of the HTTP/2 parser: random frames and garbage give calls or ProtocolError and
nothing else, the same conversation cut anywhere gives the same calls, memory stays bounded."""

from __future__ import annotations

import itertools
import struct

from h2.config import H2Configuration
from h2.connection import H2Connection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import scaled
from trawl.dissector.protocols.base import Direction, FlowInfo, ParserLimits, ProtocolError
from trawl.dissector.protocols.http2 import PREFACE, Http2Parser
from trawl.v1.calls_pb2 import ApiCall

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT
FLOW = FlowInfo("tcp", "10.0.0.1", 40000, "10.0.0.2", 50051)
LIMITS = ParserLimits(max_body_bytes=256, max_header_bytes=512, max_pending_requests=8)
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
T0 = 1_700_000_000_000_000_000


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return struct.pack(">HBBBL", len(payload) >> 8, len(payload) & 0xFF, kind, flags, stream_id) + payload


# HPACK fragments that mean something (static and dynamic references, literals with and without
# indexing, table size updates) mixed with random bytes.
hpack_bits = st.lists(
    st.sampled_from(
        [b"\x82", b"\x83", b"\x84", b"\x86", b"\x88", b"\x8d", b"\xbe", b"\xc0", b"\xff\x10", b"\x20", b"\x3f\xe1\x1f",
         b"\x40\x01a\x01b", b"\x41\x03svc", b"\x44\x02/x", b"\x00\x01c\x01d", b"\x10\x01e\x01f", b"\x7f\x00"]
    )
    | st.binary(max_size=12),
    max_size=10,
).map(b"".join)  # fmt: skip

# Request blocks: :method GET (static), then more fields.
requests = hpack_bits.map(lambda block: b"\x82\x84" + block)
stream_ids = st.sampled_from([0, 1, 2, 3, 4, 5, 7])
promise = st.builds(lambda promised, block: struct.pack(">L", promised) + block, st.sampled_from([2, 4, 3]), hpack_bits)
frames = st.one_of(
    st.builds(frame, st.integers(0, 12), st.integers(0, 255), stream_ids, st.binary(max_size=40)),
    st.builds(frame, st.just(1), st.sampled_from([0x4, 0x5, 0x0, 0x1, 0x24, 0x2D]), st.sampled_from([1, 3]), requests),
    st.builds(frame, st.just(9), st.sampled_from([0, 4]), st.sampled_from([1, 3]), hpack_bits),
    st.builds(frame, st.just(5), st.sampled_from([4, 0xC]), st.sampled_from([1, 3]), promise),
    st.builds(frame, st.just(0), st.sampled_from([0, 1, 8, 9]), st.sampled_from([1, 3, 5, 2]), st.binary(max_size=60)),
    st.builds(frame, st.just(3), st.just(0), st.sampled_from([1, 3, 5]), st.binary(min_size=4, max_size=4)),
    st.builds(frame, st.just(7), st.just(0), st.just(0), st.binary(min_size=8, max_size=12)),
    st.builds(frame, st.just(4), st.sampled_from([0, 1]), st.just(0),
              st.lists(st.builds(lambda ident, value: struct.pack(">HL", ident, value), st.integers(1, 8),
                                 st.sampled_from([0, 1, 100, 4096, 16384, 16385, 1 << 24])), max_size=3).map(b"".join)),
    st.binary(max_size=20),
)  # fmt: skip


def _drive(steps: list[tuple[Direction, bytes]], gaps: list[int], midstream: bool) -> tuple[list[ApiCall], Http2Parser]:
    parser = Http2Parser(FLOW, LIMITS)
    calls: list[ApiCall] = []
    try:
        if midstream:
            calls += parser.gap(C2S, 0, T0)
            calls += parser.gap(S2C, 0, T0)
        else:
            calls += parser.feed(C2S, PREFACE, T0)
        for index, (direction, data) in enumerate(steps):
            calls += parser.feed(direction, data, T0 + index)
            if index < len(gaps) and gaps[index]:
                calls += parser.gap(direction, gaps[index], T0 + index)
            _check_bounds(parser)
        calls += parser.expire(T0 + 10**12)
    except ProtocolError:
        pass
    calls += parser.finish(T0 + 10**12)
    return calls, parser


def _check_bounds(parser: Http2Parser) -> None:
    assert len(parser.streams) <= LIMITS.max_pending_requests
    for reader in parser.readers:
        # A whole frame is held only up to the header-block bound; a resynchronisation its window.
        assert len(reader.buf) <= max(4 * LIMITS.max_header_bytes, 64 * 1024) + 9 + 64 * 1024
        table = reader.decoder.header_table
        assert len(table.dynamic_entries) * 32 <= 64 * 1024
    for stream in parser.streams.values():
        assert all(len(body) <= LIMITS.max_body_bytes for body in stream.bodies)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([C2S, S2C]), st.binary(max_size=300)), max_size=12), st.booleans())
def test_garbage_gives_calls_or_protocol_error(steps: list[tuple[Direction, bytes]], midstream: bool) -> None:
    _drive(steps, [], midstream)


@settings(FUZZ, max_examples=scaled(600))
@given(
    st.lists(st.tuples(st.sampled_from([C2S, S2C]), st.lists(frames, max_size=6).map(b"".join)), max_size=14),
    st.lists(st.integers(min_value=0, max_value=40), max_size=14),
    st.booleans(),
)
def test_random_frames_give_calls_or_protocol_error(
    steps: list[tuple[Direction, bytes]], gaps: list[int], midstream: bool
) -> None:
    calls, _ = _drive(steps, gaps, midstream)
    for call in calls:
        assert call.protocol == "http2"
        assert len(call.request.body) <= LIMITS.max_body_bytes
        assert len(call.response.body) <= LIMITS.max_body_bytes
        call.SerializeToString()


def _conversation() -> list[tuple[Direction, bytes]]:
    """A real conversation by h2: several streams interleaved, bodies, trailers, a push, a reset."""
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    chunks: list[tuple[Direction, bytes]] = []

    def flush() -> None:
        while True:
            sent = client.data_to_send()
            if sent:
                chunks.append((C2S, sent))
                server.receive_data(sent)
            answered = server.data_to_send()
            if answered:
                chunks.append((S2C, answered))
                client.receive_data(answered)
            if not sent and not answered:
                return

    client.initiate_connection()
    server.initiate_connection()
    flush()
    for stream_id in (1, 3, 5, 7):
        headers = [(":method", "POST"), (":path", f"/s/{stream_id}"), (":scheme", "http"), (":authority", "svc"),
                   ("x-request", "r" * stream_id)]  # fmt: skip
        client.send_headers(stream_id, headers)
        client.send_data(stream_id, b"q" * (100 * stream_id), end_stream=True)
    flush()
    server.push_stream(1, 2, [(":method", "GET"), (":path", "/pushed"), (":scheme", "http"), (":authority", "svc")])
    server.send_headers(2, [(":status", "200")], end_stream=True)
    for stream_id in (3, 1, 7):
        server.send_headers(stream_id, [(":status", "200"), ("x-answer", str(stream_id))])
        server.send_data(stream_id, b"a" * (150 * stream_id), pad_length=stream_id)
        server.send_headers(stream_id, [("x-trailer", "t")], end_stream=True)
        flush()
    client.reset_stream(5)
    flush()
    return chunks


CONVERSATION = _conversation()


def _feed_pieces(pieces: list[tuple[Direction, bytes]]) -> list[bytes]:
    parser = Http2Parser(FLOW, LIMITS)
    calls: list[ApiCall] = []
    for direction, data in pieces:
        calls += parser.feed(direction, data, T0)
    calls += parser.finish(T0)
    return [call.SerializeToString() for call in calls]


WHOLE = _feed_pieces(CONVERSATION)


@FUZZ
@given(st.lists(st.integers(min_value=0, max_value=4000), max_size=40))
def test_chunking_does_not_change_the_calls(cuts: list[int]) -> None:
    pieces: list[tuple[Direction, bytes]] = []
    for direction, data in CONVERSATION:
        points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
        pieces += [(direction, data[start:end]) for start, end in itertools.pairwise(points) if end > start]
    assert _feed_pieces(pieces) == WHOLE


def test_the_conversation_gives_its_calls() -> None:
    assert len(WHOLE) == 5  # streams 1, 3, 7 answered, 5 reset, 2 pushed
