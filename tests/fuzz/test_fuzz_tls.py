"""Hypothesis: any bytes give TLS calls or ProtocolError, never another exception; any chunking
of a real TLS stream gives the same calls."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.protocol_replay import tcp_connections
from trawl.dissector.protocols.base import Direction, FlowInfo, ParserLimits, ProtocolError
from trawl.dissector.protocols.tls import TlsStreamParser, probe
from trawl.v1.calls_pb2 import ApiCall

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FLOW = FlowInfo("tcp", "10.0.0.1", 50000, "10.0.0.2", 443)
FAST = settings(deadline=None)
PCAP = FIXTURES / "tls_handshakes.pcap"
CONNECTIONS = tcp_connections(PCAP)
INDEXES = list(range(len(CONNECTIONS)))
directions = st.sampled_from(list(Direction))
records = st.builds(
    lambda kind, minor, body: struct.pack("!BBBH", kind, 3, minor, len(body)) + body,
    st.integers(19, 25),
    st.integers(0, 5),
    st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda t, body: bytes([t]) + len(body).to_bytes(3, "big") + body,
            st.sampled_from([1, 2, 11, 13]),
            st.binary(max_size=150),
        ),
    ),
)


def run(chunks: list[tuple[Direction, bytes]], gap_at: int | None = None) -> list[ApiCall]:
    parser = TlsStreamParser(FLOW, ParserLimits(request_timeout_ns=3))
    calls: list[ApiCall] = []
    try:
        for ts, (direction, data) in enumerate(chunks):
            if ts == gap_at:
                calls += parser.gap(direction, 100, ts)
            calls += parser.feed(direction, data, ts)
            calls += parser.expire(ts)
    except ProtocolError:
        return calls
    calls += parser.finish(len(chunks))
    assert len(calls) <= 1
    return calls


@FAST
@given(st.lists(st.tuples(directions, st.one_of(st.binary(max_size=300), records)), max_size=10), st.integers(0, 12))
def test_arbitrary_bytes_and_records(chunks: list[tuple[Direction, bytes]], gap_at: int) -> None:
    run(chunks, gap_at)
    for _direction, data in chunks:
        assert probe(data, data, FLOW) in (0, 1, 2, 3)


@FAST
@given(st.data())
def test_mutated_real_handshakes(data: st.DataObject) -> None:
    segments = CONNECTIONS[data.draw(st.sampled_from(INDEXES))]
    chunks = []
    for direction, payload, _ts in segments[:4]:
        mutated = bytearray(payload)
        for _ in range(data.draw(st.integers(0, 3))):
            mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
        chunks.append((direction, bytes(mutated)))
    run(chunks)


def feed_split(index: int, cuts: list[int]) -> list[bytes]:
    parser = TlsStreamParser(FLOW, ParserLimits())
    calls: list[ApiCall] = []
    for position, (direction, data, _ts) in enumerate(CONNECTIONS[index]):
        points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts[position::3])})
        for start, end in itertools.pairwise(points):
            calls += parser.feed(direction, data[start:end], 1)
    calls += parser.finish(2)
    return [call.SerializeToString() for call in calls]


EXPECTED = {index: feed_split(index, []) for index in INDEXES}


@FAST
@given(st.sampled_from(INDEXES), st.lists(st.integers(0, 3000), max_size=30))
def test_any_chunking_gives_the_same_calls(index: int, cuts: list[int]) -> None:
    assert feed_split(index, cuts) == EXPECTED[index]
    assert len(EXPECTED[index]) == 1
