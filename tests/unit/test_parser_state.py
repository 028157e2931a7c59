"""The parsers' public state interface (protocols/base.py): `restore(snapshot())` in a fresh
parser, then the rest of the stream, gives exactly the calls the uninterrupted parser gives.

Each stream is generated (hypothesis) as a sequence of exchanges and cut at a random exchange
boundary; the parser that saw everything and the one restored at the cut must then agree call
for call (every field, ids included, since ids hash the ordinals the state carries). Taking a
snapshot anywhere else must refuse (NotAtBoundary) rather than hand on a partial state.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_icmp import echo
from tests.unit.test_tls_handshake import client_hello_body, handshake, records, server_hello_body
from trawl.dissector.protocols.base import Direction, FlowInfo, NotAtBoundary, ParserLimits
from trawl.dissector.protocols.dns import DnsDatagramParser, DnsStreamParser
from trawl.dissector.protocols.http1 import Http1Parser
from trawl.dissector.protocols.icmp import IcmpTracker
from trawl.dissector.protocols.tls import TlsStreamParser
from trawl.dissector.tcp import TcpFlow, TcpTable
from trawl.v1.calls_pb2 import ApiCall

C2S, S2C = Direction.CLIENT_TO_SERVER, Direction.SERVER_TO_CLIENT
TCP_FLOW = FlowInfo("tcp", "10.0.0.1", 40000, "10.0.0.2", 8080, node="n1")
UDP_FLOW = FlowInfo("udp", "10.0.0.1", 40000, "10.0.0.53", 53, node="n1")
LIMITS = ParserLimits()
T0 = 1_700_000_000_000_000_000

# One message of a stream: (direction, bytes, ts_ns).
Message = tuple[Direction, bytes, int]


def serialized(calls: Sequence[ApiCall]) -> list[bytes]:
    return [call.SerializeToString(deterministic=True) for call in calls]


# -- HTTP/1 -------------------------------------------------------------------------------------

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6)


@st.composite
def http_exchange(draw: st.DrawFn) -> tuple[bytes, bytes]:
    method = draw(st.sampled_from(["GET", "POST", "HEAD", "DELETE"]))
    path = "/" + draw(TOKEN)
    body = draw(st.binary(max_size=40)) if method == "POST" else b""
    request = f"{method} {path} HTTP/1.1\r\nHost: svc\r\n".encode()
    if body:
        request += b"Content-Length: %d\r\n" % len(body)
    request += b"\r\n" + body
    status = draw(st.sampled_from([200, 201, 204, 404, 503]))
    framing = draw(st.sampled_from(["length", "chunked"]))
    content = b"" if status == 204 else draw(st.binary(max_size=40))
    response = f"HTTP/1.1 {status} X\r\n".encode()
    if status == 204:
        response += b"\r\n"
    elif framing == "chunked":
        # A response to HEAD announces its framing but carries no body (RFC 9112 section 6.3).
        response += b"Transfer-Encoding: chunked\r\n\r\n"
        if method != "HEAD":
            response += (b"%x\r\n%s\r\n" % (len(content), content) if content else b"") + b"0\r\n\r\n"
    else:
        response += b"Content-Length: %d\r\n\r\n" % len(content)
        if method != "HEAD":
            response += content
    return request, response


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[low:high] for low, high in itertools.pairwise(bounds) if high > low]


@settings(deadline=None)
@given(
    exchanges=st.lists(http_exchange(), min_size=1, max_size=6),
    cut=st.integers(min_value=0, max_value=6),
    chunking=st.lists(st.integers(min_value=0, max_value=500), max_size=3),
)
def test_http1_restored_at_an_exchange_boundary_gives_the_same_calls(
    exchanges: list[tuple[bytes, bytes]], cut: int, chunking: list[int]
) -> None:
    cut = min(cut, len(exchanges))
    whole, restored = Http1Parser(TCP_FLOW, LIMITS), Http1Parser(TCP_FLOW, LIMITS)
    whole_calls: list[ApiCall] = []
    restored_calls: list[ApiCall] = []
    now = T0
    for index, (request, response) in enumerate(exchanges):
        if index == cut:
            restored.restore(whole.snapshot())
            whole_calls = []  # what came before the cut was reported by the parser that saw it
        for direction, message in ((C2S, request), (S2C, response)):
            for piece in split(message, chunking):
                now += 1000
                whole_calls += whole.feed(direction, piece, now)
                if index >= cut:
                    restored_calls += restored.feed(direction, piece, now)
    if cut == len(exchanges):
        restored.restore(whole.snapshot())
        whole_calls = []
    whole_calls += whole.finish(now)
    restored_calls += restored.finish(now)
    assert serialized(restored_calls) == serialized(whole_calls)
    assert len(whole_calls) == len(exchanges) - cut


def test_http1_snapshot_refuses_in_the_middle_of_an_exchange() -> None:
    parser = Http1Parser(TCP_FLOW, LIMITS)
    parser.feed(C2S, b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n", T0)
    with pytest.raises(NotAtBoundary):
        parser.snapshot()  # the request waits for its response
    parser.feed(S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab", T0 + 1)
    with pytest.raises(NotAtBoundary):
        parser.snapshot()  # half a body
    (call,) = parser.feed(S2C, b"cd", T0 + 2)
    assert call.status == "200"
    state = parser.snapshot()
    assert state.ordinal == 1
    assert state.offsets == (len(b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n"), 42)


# -- DNS ----------------------------------------------------------------------------------------


def dns_wire(ident: int, name: str, response: bool, answer: str = "") -> bytes:
    import dns.message
    import dns.rrset

    query = dns.message.make_query(name, "A", id=ident, use_edns=False)
    if not response:
        return query.to_wire()
    reply = dns.message.make_response(query)
    if answer:
        reply.answer.append(dns.rrset.from_text(name, 30, "IN", "A", answer))
    return reply.to_wire()


@st.composite
def dns_transactions(draw: st.DrawFn) -> list[list[tuple[bool, bytes]]]:
    """Transactions, each a list of (from client, message), every one ending answered."""
    out = []
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        ident = draw(st.sampled_from([1, 2, 3]))  # ids come back: a later query may reuse one
        name = draw(st.sampled_from(["a.example.", "B.example.", "c.example."]))
        answer = draw(st.sampled_from(["", "192.0.2.1", "192.0.2.2"]))
        shape = draw(st.sampled_from(["plain", "plain", "retransmit", "duplicate", "late-duplicate", "lone"]))
        messages = [(True, dns_wire(ident, name, False))]
        if shape == "retransmit":
            messages.append((True, dns_wire(ident, name, False)))
        if shape == "lone":
            messages = []  # a response nobody asked for (or a duplicate of an earlier answer)
        messages.append((False, dns_wire(ident, name, True, answer)))
        if shape == "duplicate":
            messages.append((False, dns_wire(ident, name, True, answer)))
        out.append(messages)
        if shape == "late-duplicate" and out:
            # The previous transaction's answer again, after this one.
            out.append([(False, dns_wire(ident, name, True, answer))])
    return out


def dns_stream_bytes(wire: bytes) -> bytes:
    return struct.pack("!H", len(wire)) + wire


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@settings(deadline=None)
@given(transactions=dns_transactions(), cut=st.integers(min_value=0, max_value=12), gap_at=st.integers(0, 12))
def test_dns_restored_between_transactions_gives_the_same_calls_and_counts(
    transport: str, transactions: list[list[tuple[bool, bytes]]], cut: int, gap_at: int
) -> None:
    cut = min(cut, len(transactions))
    whole: DnsDatagramParser | DnsStreamParser
    restored: DnsDatagramParser | DnsStreamParser
    if transport == "udp":
        whole, restored = DnsDatagramParser(UDP_FLOW, LIMITS), DnsDatagramParser(UDP_FLOW, LIMITS)
    else:
        whole, restored = DnsStreamParser(TCP_FLOW, LIMITS), DnsStreamParser(TCP_FLOW, LIMITS)

    def feed(parser: DnsDatagramParser | DnsStreamParser, from_client: bool, wire: bytes, ts: int) -> list[ApiCall]:
        direction = C2S if from_client else S2C
        if isinstance(parser, DnsDatagramParser):
            return parser.feed_datagram(direction, wire, ts)
        return parser.feed(direction, dns_stream_bytes(wire), ts)

    whole_calls: list[ApiCall] = []
    restored_calls: list[ApiCall] = []
    now = T0
    for index, transaction in enumerate([*transactions, []]):
        if index == cut:
            restored.restore(whole.snapshot())
            whole_calls = []
            duplicates_before = whole.counts.get("dns_duplicate_responses", 0)
        if index == gap_at and isinstance(whole, DnsStreamParser) and index >= cut:
            # A gap at a message boundary is remembered (noted on calls left unanswered later).
            whole.gap(C2S, 10, now)
            restored.gap(C2S, 10, now)
        for from_client, wire in transaction:
            now += 1_000_000
            whole_calls += feed(whole, from_client, wire, now)
            if index >= cut:
                restored_calls += feed(restored, from_client, wire, now)
    whole_calls += whole.finish(now)
    restored_calls += restored.finish(now)
    assert serialized(restored_calls) == serialized(whole_calls)
    whole_duplicates = whole.counts.get("dns_duplicate_responses", 0) - duplicates_before
    assert restored.counts.get("dns_duplicate_responses", 0) == whole_duplicates


def test_a_duplicate_response_is_counted_not_a_second_call() -> None:
    parser = DnsDatagramParser(UDP_FLOW, LIMITS)
    assert parser.feed_datagram(C2S, dns_wire(9, "a.example.", False), T0) == []
    (call,) = parser.feed_datagram(S2C, dns_wire(9, "a.example.", True, "192.0.2.1"), T0 + 1)
    assert call.status == "NOERROR" and "no-request-seen" not in call.notes
    # The same answer again, and a different one to the same query: neither is a call.
    assert parser.feed_datagram(S2C, dns_wire(9, "a.example.", True, "192.0.2.1"), T0 + 2) == []
    assert parser.feed_datagram(S2C, dns_wire(9, "A.EXAMPLE.", True, "192.0.2.7"), T0 + 3) == []
    assert parser.counts == {"dns_duplicate_responses": 2}
    # Past the request timeout it is no longer a duplicate of that answer: reported as unpaired.
    late = T0 + 2 + LIMITS.request_timeout_ns
    (unpaired,) = parser.feed_datagram(S2C, dns_wire(9, "a.example.", True, "192.0.2.1"), late)
    assert unpaired.notes == ["no-request-seen"]
    # A new query reusing the id pairs with its own response as usual.
    parser.feed_datagram(C2S, dns_wire(9, "a.example.", False), late + 1)
    (again,) = parser.feed_datagram(S2C, dns_wire(9, "a.example.", True, "192.0.2.1"), late + 2)
    assert again.notes == [] and parser.counts == {"dns_duplicate_responses": 2}


def test_dns_snapshot_refuses_while_a_query_is_pending() -> None:
    parser = DnsDatagramParser(UDP_FLOW, LIMITS)
    parser.feed_datagram(C2S, dns_wire(9, "a.example.", False), T0)
    with pytest.raises(NotAtBoundary):
        parser.snapshot()
    stream = DnsStreamParser(TCP_FLOW, LIMITS)
    stream.feed(C2S, dns_stream_bytes(dns_wire(9, "a.example.", False))[:5], T0)
    with pytest.raises(NotAtBoundary):
        stream.snapshot()


# -- TLS and ICMP -------------------------------------------------------------------------------


def tls_handshake_messages() -> list[Message]:
    hello = records(22, handshake(1, client_hello_body()))
    server = records(22, handshake(2, server_hello_body()))
    return [(C2S, hello, T0), (S2C, server, T0 + 1), (C2S, records(23, b"secret"), T0 + 2)]


@pytest.mark.parametrize("cut", [0, 2, 3])
def test_tls_restored_before_or_after_its_handshake_gives_the_same_calls(cut: int) -> None:
    messages = tls_handshake_messages()
    whole, restored = TlsStreamParser(TCP_FLOW, LIMITS), TlsStreamParser(TCP_FLOW, LIMITS)
    whole_calls: list[ApiCall] = []
    for direction, data, ts in messages[:cut]:
        whole_calls += whole.feed(direction, data, ts)
    assert len(whole_calls) == (1 if cut >= 2 else 0)
    restored.restore(whole.snapshot())
    assert whole.snapshot().done == (cut >= 2)
    rest_whole: list[ApiCall] = []
    rest_restored: list[ApiCall] = []
    for direction, data, ts in messages[cut:]:
        rest_whole += whole.feed(direction, data, ts)
        rest_restored += restored.feed(direction, data, ts)
    rest_whole += whole.finish(T0 + 9)
    rest_restored += restored.finish(T0 + 9)
    assert serialized(rest_restored) == serialized(rest_whole)
    assert len(rest_whole) == (1 if cut == 0 else 0)


def test_tls_snapshot_refuses_during_the_handshake() -> None:
    parser = TlsStreamParser(TCP_FLOW, LIMITS)
    direction, hello, ts = tls_handshake_messages()[0]
    parser.feed(direction, hello, ts)
    with pytest.raises(NotAtBoundary):
        parser.snapshot()


def test_icmp_restored_with_no_echo_pending_gives_the_same_calls() -> None:
    whole, restored = IcmpTracker("n1", LIMITS), IcmpTracker("n1", LIMITS)
    whole.feed_packet("10.0.0.1", "10.0.0.2", echo(8, 1, 1), T0, False)
    with pytest.raises(NotAtBoundary):
        whole.snapshot()
    assert len(whole.feed_packet("10.0.0.2", "10.0.0.1", echo(0, 1, 1), T0 + 1, False)) == 1
    restored.restore(whole.snapshot())
    rest: list[list[bytes]] = [[], []]
    for index, tracker in enumerate((whole, restored)):
        calls = tracker.feed_packet("10.0.0.1", "10.0.0.2", echo(8, 1, 2), T0 + 2, False)
        calls += tracker.feed_packet("10.0.0.2", "10.0.0.1", echo(0, 1, 2), T0 + 3, False)
        calls += tracker.feed_packet("10.0.0.1", "10.0.0.2", echo(8, 1, 3), T0 + 4, False)
        calls += tracker.finish()
        rest[index] = serialized(calls)
    assert rest[0] == rest[1] and len(rest[0]) == 2


# -- the TCP flow -------------------------------------------------------------------------------


class RecordingSink:
    """What a TcpTable delivers, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def stream_data(self, flow: TcpFlow, direction: Direction, data: bytes, ts_ns: int) -> None:
        self.events.append(("data", direction, data, ts_ns))

    def stream_gap(self, flow: TcpFlow, direction: Direction, size: int, ts_ns: int) -> None:
        self.events.append(("gap", direction, size, ts_ns))

    def stream_end(self, flow: TcpFlow, ts_ns: int) -> None:
        self.events.append(("end", ts_ns))

    def stream_anomaly(self, flow: TcpFlow, direction: Direction, note: str, offset: int) -> None:
        self.events.append(("anomaly", direction, note, offset))


CLIENT_IP, SERVER_IP = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


def tcp_header(
    sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes = b"", window: int = 65535
) -> bytes:
    header = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, window, 0, 0)
    return header + payload


@st.composite
def tcp_conversations(draw: st.DrawFn) -> tuple[list[tuple[bool, bytes]], list[int]]:
    """Segments (from client, TCP bytes) of one connection, and the indexes after which nothing
    is held out of order (the cut candidates). Retransmissions, conflicting copies, a swapped
    pair of segments and a RST or FIN close make the counts and notes the state carries."""
    client_seq, server_seq = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))
    segments: list[tuple[bool, bytes]] = [
        (True, tcp_header(40000, 8080, client_seq, 0, 0x02)),
        (False, tcp_header(8080, 40000, server_seq, client_seq + 1, 0x12)),
    ]
    client_seq += 1
    server_seq += 1
    segments.append((True, tcp_header(40000, 8080, client_seq, server_seq, 0x10)))
    boundaries = [len(segments)]
    for _ in range(draw(st.integers(1, 5))):
        from_client = draw(st.booleans())
        payload = draw(st.binary(min_size=1, max_size=30))
        kind = draw(st.sampled_from(["plain", "plain", "retransmit", "conflict", "swapped", "zero-window"]))
        seq, ack = (client_seq, server_seq) if from_client else (server_seq, client_seq)
        ports = (40000, 8080) if from_client else (8080, 40000)
        if kind == "swapped" and len(payload) > 1:
            half = len(payload) // 2
            segments.append((from_client, tcp_header(*ports, seq + half, ack, 0x18, payload[half:])))
            segments.append((from_client, tcp_header(*ports, seq, ack, 0x18, payload[:half])))
        else:
            segments.append((from_client, tcp_header(*ports, seq, ack, 0x18, payload)))
            if kind == "retransmit":
                segments.append((from_client, tcp_header(*ports, seq, ack, 0x18, payload)))
            if kind == "conflict":
                segments.append((from_client, tcp_header(*ports, seq, ack, 0x18, bytes(len(payload)))))
        if kind == "zero-window":
            segments.append((not from_client, tcp_header(ports[1], ports[0], ack, seq + len(payload), 0x10, window=0)))
        if from_client:
            client_seq += len(payload)
        else:
            server_seq += len(payload)
        boundaries.append(len(segments))
    end = draw(st.sampled_from(["fin", "rst", "none"]))
    if end == "fin":
        segments.append((True, tcp_header(40000, 8080, client_seq, server_seq, 0x11)))
        segments.append((False, tcp_header(8080, 40000, server_seq, client_seq + 1, 0x11)))
    elif end == "rst":
        segments.append((False, tcp_header(8080, 40000, server_seq, client_seq, 0x14, b"bye")))
    return segments, boundaries


def new_table(sink: RecordingSink, out: list[ApiCall]) -> TcpTable:
    return TcpTable(sink=sink, out=out, counters={})


def feed_segment(table: TcpTable, from_client: bool, segment: bytes, ts_ns: int) -> None:
    src, dst = (CLIENT_IP, SERVER_IP) if from_client else (SERVER_IP, CLIENT_IP)
    table.segment("n1", 0, src, dst, segment, ts_ns)


@settings(deadline=None)
@given(conversation=tcp_conversations(), data=st.data())
def test_tcp_flow_restored_with_nothing_out_of_order_continues_the_same(
    conversation: tuple[list[tuple[bool, bytes]], list[int]], data: st.DataObject
) -> None:
    segments, boundaries = conversation
    cut = data.draw(st.sampled_from(boundaries))
    whole_sink, restored_sink = RecordingSink(), RecordingSink()
    whole_out: list[ApiCall] = []
    restored_out: list[ApiCall] = []
    whole, restored = new_table(whole_sink, whole_out), new_table(restored_sink, restored_out)
    stamps = [T0 + index * 1000 for index in range(len(segments))]
    for (from_client, segment), ts in zip(segments[:cut], stamps, strict=False):
        feed_segment(whole, from_client, segment, ts)
    (flow,) = whole.lru.values()
    state = flow.snapshot()
    restored.adopt(TcpFlow.from_snapshot(flow.info, flow.keys, state))
    assert restored.lru and next(iter(restored.lru.values())).snapshot() == state
    whole_sink.events.clear()
    whole_out.clear()
    for (from_client, segment), ts in zip(segments[cut:], stamps[cut:], strict=True):
        feed_segment(whole, from_client, segment, ts)
        feed_segment(restored, from_client, segment, ts)
    whole.finish(stamps[-1] + 1)
    restored.finish(stamps[-1] + 1)
    assert restored_sink.events == whole_sink.events
    assert serialized(restored_out) == serialized(whole_out)


def test_tcp_snapshot_refuses_with_segments_held_out_of_order() -> None:
    table = new_table(RecordingSink(), [])
    feed_segment(table, True, tcp_header(40000, 8080, 100, 0, 0x02), T0)
    feed_segment(table, False, tcp_header(8080, 40000, 500, 101, 0x12), T0 + 1)
    feed_segment(table, True, tcp_header(40000, 8080, 111, 501, 0x18, b"later"), T0 + 2)  # 10 bytes early
    (flow,) = table.lru.values()
    with pytest.raises(NotAtBoundary):
        flow.snapshot()
