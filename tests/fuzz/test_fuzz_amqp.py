"""Property tests of the AMQP 0-9-1 parser: conversations built from pamqp frames give the same
calls however the bytes are cut; garbage, mutated frames and gaps give calls or ProtocolError
and nothing else; what is buffered and pending stays within its bounds; counters add up."""

from __future__ import annotations

import itertools
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import body as amqp_body
from pamqp import commands, frame, header
from pamqp.base import Frame
from pamqp.common import FieldTable

from tests.conftest import scaled
from trawl.dissector.protocols.amqp import MAX_BUFFERED_FRAME, PROTOCOL_HEADER, RESYNC_FRAME_MAX, AmqpParser
from trawl.dissector.protocols.base import Direction, FlowInfo, ParserLimits, ProtocolError
from trawl.v1.calls_pb2 import ApiCall

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT
FLOW = FlowInfo("tcp", "10.0.0.1", 40000, "10.0.0.2", 5672)
LIMITS = ParserLimits(max_body_bytes=64, max_pending_requests=4, request_timeout_ns=10**9)
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
T0 = 1_700_000_000_000_000_000
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"


def method(value: Frame, channel: int) -> bytes:
    return frame.marshal(value, channel)


def message(body: bytes, channel: int, frame_size: int, traceparent: bool) -> bytes:
    headers: FieldTable = {"traceparent": TRACEPARENT} if traceparent else {}
    properties = commands.Basic.Properties(content_type="text/plain", message_id="m", headers=headers)
    parts = [frame.marshal(header.ContentHeader(0, len(body), properties), channel)]
    parts += [
        frame.marshal(amqp_body.ContentBody(body[start : start + frame_size]), channel)
        for start in range(0, len(body), frame_size)
    ]
    return b"".join(parts)


names = st.sampled_from(["", "q", "orders.created", "amq.gen-1"])
channels = st.integers(0, 3)
# One step of a conversation: which side sends it and its bytes (requests, answers, one-way
# messages with content, closes, heartbeats), so pairs, orphans and interleavings all occur.
steps = st.one_of(
    st.builds(lambda q, c: (C2S, method(commands.Queue.Declare(queue=q), c)), names, channels),
    st.builds(
        lambda q, c: (S2C, method(commands.Queue.DeclareOk(queue=q, message_count=1, consumer_count=0), c)),
        names,
        channels,
    ),
    st.builds(lambda c: (C2S, method(commands.Basic.Qos(prefetch_count=5), c)), channels),
    st.builds(lambda c: (S2C, method(commands.Basic.QosOk(), c)), channels),
    st.builds(
        lambda q, c, body, size, trace: (
            C2S,
            method(commands.Basic.Publish(exchange="x", routing_key=q), c) + message(body, c, size, trace),
        ),
        names,
        channels,
        st.binary(max_size=200),
        st.integers(1, 80),
        st.booleans(),
    ),
    st.builds(
        lambda c, tag, body: (
            S2C,
            method(commands.Basic.Deliver("ctag", tag, False, "x", "k"), c) + message(body, c, 50, False),
        ),
        channels,
        st.integers(1, 9),
        st.binary(max_size=120),
    ),
    st.builds(lambda c, tag: (C2S, method(commands.Basic.Ack(delivery_tag=tag), c)), channels, st.integers(1, 9)),
    st.builds(lambda c: (S2C, method(commands.Basic.Nack(delivery_tag=1), c)), channels),
    st.builds(lambda q, c: (C2S, method(commands.Basic.Get(queue=q), c)), names, channels),
    st.builds(
        lambda c, body: (
            S2C,
            method(commands.Basic.GetOk(delivery_tag=1, exchange="", routing_key="q", message_count=0), c)
            + message(body, c, 30, False),
        ),
        channels,
        st.binary(max_size=90),
    ),
    st.builds(lambda c: (S2C, method(commands.Basic.GetEmpty(), c)), channels),
    st.builds(
        lambda code, c: (
            S2C,
            method(commands.Channel.Close(reply_code=code, reply_text="x", class_id=50, method_id=10), c),
        ),
        st.sampled_from([200, 404, 406]),
        channels,
    ),
    st.builds(lambda c: (C2S, method(commands.Channel.CloseOk(), c)), channels),
    st.builds(lambda c: (C2S, method(commands.Tx.Select(), c)), channels),
    st.builds(lambda c: (S2C, method(commands.Tx.SelectOk(), c)), channels),
    st.builds(
        lambda frame_max: (C2S, method(commands.Connection.TuneOk(channel_max=0, frame_max=frame_max, heartbeat=0), 0)),
        st.sampled_from([0, 4096, 131072]),
    ),
    st.builds(lambda d: (d, HEARTBEAT), st.sampled_from([C2S, S2C])),
)
conversations = st.lists(steps, max_size=14)


def _check_bounds(parser: AmqpParser) -> None:
    assert len(parser.pending) <= LIMITS.max_pending_requests
    for reader in parser.readers:
        assert len(reader.buf) <= MAX_BUFFERED_FRAME + 8
    for content in parser.contents.values():
        assert len(content.body) <= LIMITS.max_body_bytes
    assert all(value >= 0 for value in parser.counts.values())


def _well_formed(calls: list[ApiCall]) -> None:
    for call in calls:
        assert call.protocol == "amqp" and call.method and call.id
        assert call.amqp.class_name and call.amqp.method_name
        assert len(call.request.body) <= LIMITS.max_body_bytes and len(call.response.body) <= LIMITS.max_body_bytes


def _drive(
    pieces: list[tuple[Direction, bytes]], gaps: dict[int, int] | None = None
) -> tuple[list[ApiCall], AmqpParser]:
    parser = AmqpParser(FLOW, LIMITS)
    calls: list[ApiCall] = []
    try:
        for index, (direction, data) in enumerate(pieces):
            calls += parser.feed(direction, data, T0 + index)
            if gaps and index in gaps:
                calls += parser.gap(direction, gaps[index], T0 + index)
            _check_bounds(parser)
        calls += parser.expire(T0 + 10**12)
    except ProtocolError:
        pass
    calls += parser.finish(T0 + 10**12)
    _well_formed(calls)
    return calls, parser


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[start:end] for start, end in itertools.pairwise(points) if end > start]


def _summary(calls: list[ApiCall]) -> list[tuple[str, str, str, int, bytes, int, tuple[str, ...]]]:
    """What must not depend on where the bytes were cut (the timestamps do: a frame's time is the
    time of the segment that began it)."""
    return [
        (c.method, c.path, c.status, c.outcome, c.request.body + c.response.body, c.request.body_size, tuple(c.notes))
        for c in calls
    ]


@settings(FUZZ, max_examples=scaled(200))
@given(conversations, st.lists(st.integers(0, 10**6), max_size=12))
def test_a_conversation_cut_anywhere_gives_the_same_calls(
    conversation: list[tuple[Direction, bytes]], cuts: list[int]
) -> None:
    whole = [(C2S, PROTOCOL_HEADER), *conversation]
    expected, reference = _drive(whole)
    pieces = [(direction, piece) for direction, data in whole for piece in _cut(data, cuts)]
    found, parser = _drive(pieces)
    assert _summary(found) == _summary(expected)
    assert parser.counts == reference.counts
    heartbeats = sum(1 for _, data in conversation if data == HEARTBEAT)
    assert reference.counts.get("amqp_heartbeats", 0) == heartbeats


@settings(FUZZ, max_examples=scaled(200))
@given(st.lists(st.tuples(st.sampled_from([C2S, S2C]), st.binary(max_size=64)), max_size=12))
def test_garbage_gives_calls_or_protocol_error_only(pieces: list[tuple[Direction, bytes]]) -> None:
    _drive([(C2S, PROTOCOL_HEADER), *pieces])
    _drive(pieces)


@settings(FUZZ, max_examples=scaled(200))
@given(conversations, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_frames_give_calls_or_protocol_error_only(
    conversation: list[tuple[Direction, bytes]], flips: list[tuple[int, int]]
) -> None:
    pieces = []
    for index, (direction, data) in enumerate(conversation):
        mutable = bytearray(data)
        for position, value in flips:
            if mutable and position % len(conversation or [1]) == index:
                mutable[position % len(mutable)] = value
        pieces.append((direction, bytes(mutable)))
    _drive(pieces)


@settings(FUZZ, max_examples=scaled(150))
@given(conversations, st.dictionaries(st.integers(0, 14), st.integers(0, 300), max_size=3), st.binary(max_size=40))
def test_gaps_resynchronise_or_stop_cleanly(
    conversation: list[tuple[Direction, bytes]], gaps: dict[int, int], noise: bytes
) -> None:
    _, parser = _drive([(C2S, PROTOCOL_HEADER), *conversation, (C2S, noise)], gaps)
    # A resynchronisation needs a frame's end in view: what waits for one stays within that bound.
    for reader in parser.readers:
        assert len(reader.buf) <= RESYNC_FRAME_MAX + 8 or not reader.resync


def test_a_declared_frame_size_never_grows_the_buffer_past_its_bound() -> None:
    parser = AmqpParser(FLOW, LIMITS)
    size = MAX_BUFFERED_FRAME + 10
    parser.feed(C2S, struct.pack(">BHI", 1, 1, size), T0)
    for _ in range(size // 50_000):
        assert parser.feed(C2S, b"\x00" * 50_000, T0) == []
        _check_bounds(parser)
    parser.feed(C2S, b"\x00" * (size % 50_000) + b"\xce" + frame.marshal(commands.Tx.Select(), 1), T0)
    [call] = parser.feed(S2C, frame.marshal(commands.Tx.SelectOk(), 1), T0)
    assert call.method == "tx.select" and parser.counts["amqp_frames_too_large"] == 1
