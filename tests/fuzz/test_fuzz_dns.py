"""Hypothesis: any bytes give DNS calls or ProtocolError, never another exception; any chunking
of a TCP DNS stream gives the same calls."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.protocol_replay import read_packets, tcp_connections
from tests.unit.test_express_differential import with_class_top_bits
from trawl.dissector.protocols.base import Direction, FlowInfo, ParserLimits, ProtocolError
from trawl.dissector.protocols.dns import DnsDatagramParser, DnsStreamParser, parse_message, probe_tcp, probe_udp
from trawl.v1.calls_pb2 import ApiCall

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
UDP_FLOW = FlowInfo("udp", "10.0.0.1", 40000, "10.0.0.53", 53)
TCP_FLOW = FlowInfo("tcp", "10.0.0.1", 40000, "10.0.0.53", 53)
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

UDP_MESSAGES = [p.payload for p in read_packets(FIXTURES / "dns_udp.pcap") if p.protocol == 17]
TCP_SEGMENTS = tcp_connections(FIXTURES / "dns_tcp.pcap")[0]  # three queries on one connection
directions = st.sampled_from(list(Direction))


def feed_datagrams(datagrams: list[tuple[Direction, bytes]]) -> list[ApiCall]:
    parser = DnsDatagramParser(UDP_FLOW, ParserLimits(max_pending_requests=8))
    calls: list[ApiCall] = []
    for ts, (direction, data) in enumerate(datagrams):
        with contextlib.suppress(ProtocolError):
            calls += parser.feed_datagram(direction, data, ts)
    return calls + parser.expire(10**12) + parser.finish(10**12)


@FAST
@given(st.lists(st.tuples(directions, st.binary(max_size=600)), max_size=8))
def test_arbitrary_datagrams(datagrams: list[tuple[Direction, bytes]]) -> None:
    for call in feed_datagrams(datagrams):
        assert call.protocol == "dns"
    for _direction, data in datagrams:
        assert probe_udp(data, b"", UDP_FLOW) in (0, 1, 2, 3)
        assert probe_tcp(data, data, TCP_FLOW) in (0, 1, 2, 3)


@FAST
@given(st.data())
def test_mutated_real_messages(data: st.DataObject) -> None:
    datagrams = []
    for index, message in enumerate(UDP_MESSAGES):
        mutated = bytearray(message)
        for _ in range(data.draw(st.integers(0, 4))):
            mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(mutated)))
        direction = Direction.CLIENT_TO_SERVER if index % 2 == 0 else Direction.SERVER_TO_CLIENT
        datagrams.append((direction, bytes(mutated[:cut]) if data.draw(st.booleans()) else bytes(mutated)))
    feed_datagrams(datagrams)


@FAST
@given(st.lists(st.tuples(directions, st.binary(max_size=300)), max_size=10), st.lists(st.integers(0, 5), max_size=3))
def test_arbitrary_tcp_stream(chunks: list[tuple[Direction, bytes]], gaps: list[int]) -> None:
    parser = DnsStreamParser(TCP_FLOW, ParserLimits())
    try:
        for ts, (direction, data) in enumerate(chunks):
            if ts in gaps:
                parser.gap(direction, 10, ts)
            parser.feed(direction, data, ts)
    except ProtocolError:
        return
    parser.expire(10**12)
    parser.finish(10**12)


def feed_split(cuts: list[int]) -> list[bytes]:
    parser = DnsStreamParser(TCP_FLOW, ParserLimits())
    calls: list[ApiCall] = []
    for index, (direction, data, _ts) in enumerate(TCP_SEGMENTS):
        points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts[index::4])})
        for start, end in itertools.pairwise(points):
            calls += parser.feed(direction, data[start:end], 1)
    calls += parser.finish(2)
    return [call.SerializeToString() for call in calls]


EXPECTED = feed_split([])


@FAST
@given(st.lists(st.integers(0, 2000), max_size=40))
def test_any_chunking_gives_the_same_calls(cuts: list[int]) -> None:
    assert feed_split(cuts) == EXPECTED
    assert len(EXPECTED) == 3


MDNS_FLOW = FlowInfo("udp", "10.0.0.1", 5353, "224.0.0.251", 5353)


@FAST
@given(st.data())
def test_mdns_class_bits_change_nothing_but_the_notes(data: st.DataObject) -> None:
    """Any real message with mDNS's class bits set reads, on an mDNS flow, as the message without
    them plus the notes; mutated copies give calls or ProtocolError, nothing else."""
    for message in UDP_MESSAGES:
        flagged = with_class_top_bits(message)
        clean = parse_message(message)
        read = parse_message(flagged, mdns=True)
        assert read.notes[: len(clean.notes)] == clean.notes
        assert set(read.notes[len(clean.notes) :]) <= {"cache-flush", "unicast-response"}
        assert "unicast-response" in read.notes  # every fixture message has a question
        read.notes = clean.notes
        assert read == clean
        mutated = bytearray(flagged)
        for _ in range(data.draw(st.integers(0, 4))):
            mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
        parser = DnsDatagramParser(MDNS_FLOW, ParserLimits())
        with contextlib.suppress(ProtocolError):
            for call in parser.feed_datagram(Direction.SERVER_TO_CLIENT, bytes(mutated), 1):
                assert call.protocol == "dns"
