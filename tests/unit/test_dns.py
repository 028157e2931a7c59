"""DNS parser: real dnspython/dnsmasq traffic (tests/fixtures/dns_*.pcap) and the pairing rules."""

from __future__ import annotations

from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest

from tests.protocol_replay import dns_calls, tcp_connections
from trawl.dissector.protocols import dns as dns_protocol
from trawl.dissector.protocols.base import Direction, FlowInfo, ParserLimits, ProtocolError
from trawl.dissector.protocols.dns import (
    SPEC,
    SPEC_TCP,
    DnsDatagramParser,
    DnsStreamParser,
    parse_message,
    probe_tcp,
    probe_udp,
)
from trawl.v1.calls_pb2 import ApiCall, Outcome

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
UDP_FLOW = FlowInfo("udp", "10.0.0.1", 40000, "10.0.0.53", 53, node="n1")
TCP_FLOW = FlowInfo("tcp", "10.0.0.1", 40000, "10.0.0.53", 53, node="n1")
OK, ERROR, NO_RESPONSE = Outcome.OUTCOME_OK, Outcome.OUTCOME_ERROR, Outcome.OUTCOME_NO_RESPONSE


def query(name: str = "svc.example.test", rdtype: str = "A", ident: int = 4660) -> dns.message.QueryMessage:
    message = dns.message.make_query(name, rdtype, use_edns=False)
    message.id = ident
    return message


def answer(message: dns.message.QueryMessage, *records: str, rcode: dns.rcode.Rcode = dns.rcode.NOERROR) -> bytes:
    response = dns.message.make_response(message)
    response.set_rcode(rcode)
    for record in records:
        response.answer.append(
            dns.rrset.from_text(message.question[0].name, 30, "IN", message.question[0].rdtype, record)
        )
    return response.to_wire()


def summary(call: ApiCall) -> tuple[str, str, str, int]:
    return (call.method, call.path, call.status, call.outcome)


def test_udp_fixture_pairs_every_query_with_its_response() -> None:
    calls = dns_calls(FIXTURES / "dns_udp.pcap")
    assert [summary(call) for call in calls] == [
        ("A", "example.test", "NOERROR", OK),
        ("AAAA", "example.test", "NOERROR", OK),
        ("TXT", "txt.svc.test", "NOERROR", OK),
        ("MX", "svc.test", "NOERROR", OK),
        ("SRV", "_http._tcp.svc.test", "NOERROR", OK),
        ("A", "alias.svc.test", "NOERROR", OK),
        ("A", "ExAmPlE.TeSt", "NOERROR", OK),
        ("A", "missing.nx.test", "NXDOMAIN", OK),
        ("A", "outside.invalid", "REFUSED", ERROR),
        ("TXT", "big.svc.test", "NOERROR", OK),
        ("A", "retry.example.test", "NOERROR", OK),
        ("A", "retry.example.test", "NOERROR", OK),
        ("A", "silent.example.test", "", NO_RESPONSE),
    ]
    by_path = {(call.method, call.path): call for call in calls}
    alias = by_path[("A", "alias.svc.test")]
    assert [(a.name, a.type, a.data) for a in alias.dns.answers] == [
        ("alias.svc.test", "CNAME", "www.svc.test."),
        ("www.svc.test", "A", "10.1.2.4"),
    ]
    assert by_path[("MX", "svc.test")].dns.answers[0].data == "10 mail.svc.test."
    assert by_path[("TXT", "big.svc.test")].dns.truncated
    assert not by_path[("TXT", "big.svc.test")].dns.answers
    for call in calls:
        assert call.protocol == "dns"
        assert call.transport == "udp"
        assert call.dst.port != call.src.port
        assert call.src.ip == call.dst.ip == "127.0.0.1"
        if call.outcome != NO_RESPONSE:
            assert call.response.ts >= call.request.ts
            assert call.elapsed_ns == call.response.ts - call.request.ts
            assert call.dns.rcode == call.status
            assert call.request.size > 12
            assert call.response.size > 12
    assert len({call.id for call in calls}) == len(calls)


def test_tcp_fixture_frames_length_prefixed_messages() -> None:
    calls = dns_calls(FIXTURES / "dns_tcp.pcap")
    assert [summary(call) for call in calls] == [
        ("A", "example.test", "NOERROR", OK),
        ("TXT", "big.svc.test", "NOERROR", OK),
        ("A", "gone.nx.test", "NXDOMAIN", OK),
        ("AAAA", "example.test", "NOERROR", OK),
    ]
    big = calls[1]
    assert not big.dns.truncated
    assert len(big.dns.answers) == 1
    assert big.dns.answers[0].data.count('"') >= 6
    assert calls[0].request.size == len(query("example.test").to_wire()) + 2  # with the length prefix


def test_tcp_stream_in_any_chunking_gives_the_same_calls() -> None:
    segments = tcp_connections(FIXTURES / "dns_tcp.pcap")[0]
    whole = DnsStreamParser(TCP_FLOW, ParserLimits())
    expected = [c for direction, data, _ts in segments for c in whole.feed(direction, data, 7)]
    expected += whole.finish(8)
    bytewise = DnsStreamParser(TCP_FLOW, ParserLimits())
    got = [
        c
        for direction, data, _ts in segments
        for i in range(len(data))
        for c in bytewise.feed(direction, data[i : i + 1], 7)
    ]
    got += bytewise.finish(8)
    assert [c.SerializeToString() for c in got] == [c.SerializeToString() for c in expected]
    assert len(expected) == 3


def test_response_pairs_by_id_and_question_case_insensitively() -> None:
    parser = DnsDatagramParser(UDP_FLOW, ParserLimits())
    first, second = query("A.Example.Test", ident=1), query("b.example.test", ident=1)
    assert parser.feed_datagram(Direction.CLIENT_TO_SERVER, first.to_wire(), 1_000) == []
    assert parser.feed_datagram(Direction.CLIENT_TO_SERVER, second.to_wire(), 2_000) == []
    reply = dns.message.from_wire(answer(second, "10.0.0.9"))
    [call] = parser.feed_datagram(Direction.SERVER_TO_CLIENT, reply.to_wire(), 5_000)
    assert (call.path, call.elapsed_ns, call.dns.answers[0].data) == ("b.example.test", 3_000, "10.0.0.9")
    lowered = dns.message.from_wire(answer(first, "10.0.0.8"))
    lowered.question[0].name = dns.name.from_text("a.example.test")
    [call] = parser.feed_datagram(Direction.SERVER_TO_CLIENT, lowered.to_wire(), 9_000)
    assert (call.path, call.status, call.outcome, call.elapsed_ns) == ("A.Example.Test", "NOERROR", OK, 8_000)


def test_response_without_question_pairs_by_id() -> None:
    parser = DnsDatagramParser(UDP_FLOW, ParserLimits())
    asked = query(ident=77)
    parser.feed_datagram(Direction.CLIENT_TO_SERVER, asked.to_wire(), 10)
    bare = dns.message.make_response(asked)
    bare.question = []
    bare.set_rcode(dns.rcode.FORMERR)
    [call] = parser.feed_datagram(Direction.SERVER_TO_CLIENT, bare.to_wire(), 20)
    assert summary(call) == ("A", "svc.example.test", "FORMERR", ERROR)


@pytest.mark.parametrize(
    ("rcode", "outcome"),
    [(dns.rcode.NOERROR, OK), (dns.rcode.NXDOMAIN, OK), (dns.rcode.SERVFAIL, ERROR), (dns.rcode.NOTIMP, ERROR)],
)
def test_outcome_follows_the_rcode(rcode: dns.rcode.Rcode, outcome: int) -> None:
    parser = DnsDatagramParser(UDP_FLOW, ParserLimits())
    asked = query()
    parser.feed_datagram(Direction.CLIENT_TO_SERVER, asked.to_wire(), 10)
    [call] = parser.feed_datagram(Direction.SERVER_TO_CLIENT, answer(asked, rcode=rcode), 20)
    assert call.outcome == outcome
    assert call.status == dns.rcode.to_text(rcode)


def test_roles_come_from_the_qr_bit_not_the_flow_direction() -> None:
    parser = DnsDatagramParser(UDP_FLOW, ParserLimits())
    asked = query(ident=9)
    # The engine took the resolver for the client (its packet came first): the query travels "back".
    [orphan] = parser.feed_datagram(Direction.CLIENT_TO_SERVER, answer(query(ident=8), "1.2.3.4"), 5)
    assert orphan.notes == ["no-request-seen"]
    assert orphan.src.ip == "10.0.0.53"
    assert orphan.elapsed_ns == 0
    parser.feed_datagram(Direction.SERVER_TO_CLIENT, asked.to_wire(), 10)
    [call] = parser.feed_datagram(Direction.CLIENT_TO_SERVER, answer(asked, "1.2.3.5"), 30)
    assert (call.src.ip, call.src.port, call.dst.ip, call.dst.port) == ("10.0.0.53", 53, "10.0.0.1", 40000)
    assert call.elapsed_ns == 20


def test_unanswered_queries_expire_after_the_timeout_and_at_finish() -> None:
    limits = ParserLimits(request_timeout_ns=1_000)
    parser = DnsDatagramParser(UDP_FLOW, limits)
    parser.feed_datagram(Direction.CLIENT_TO_SERVER, query(ident=1).to_wire(), 100)
    parser.feed_datagram(Direction.CLIENT_TO_SERVER, query(ident=2).to_wire(), 600)
    assert parser.expire(1_099) == []
    [expired] = parser.expire(1_100)
    assert expired.dns.id == 1
    assert expired.outcome == NO_RESPONSE
    assert expired.status == ""
    [last] = parser.finish(2_000)
    assert last.dns.id == 2
    assert last.outcome == NO_RESPONSE
    assert parser.finish(3_000) == []


def test_retransmitted_query_is_one_call_and_the_pending_table_is_bounded() -> None:
    parser = DnsDatagramParser(UDP_FLOW, ParserLimits(max_pending_requests=2))
    parser.feed_datagram(Direction.CLIENT_TO_SERVER, query(ident=1).to_wire(), 1)
    assert parser.feed_datagram(Direction.CLIENT_TO_SERVER, query(ident=1).to_wire(), 2) == []
    parser.feed_datagram(Direction.CLIENT_TO_SERVER, query(ident=2).to_wire(), 3)
    [evicted] = parser.feed_datagram(Direction.CLIENT_TO_SERVER, query(ident=3).to_wire(), 4)
    assert evicted.dns.id == 1
    assert evicted.notes == ["retransmitted", "pending-limit"]
    assert [call.dns.id for call in parser.finish(5)] == [2, 3]


def test_malformed_records_still_pair_on_header_and_question() -> None:
    asked = query()
    wire = answer(asked, "10.9.9.9")
    parser = DnsDatagramParser(UDP_FLOW, ParserLimits())
    parser.feed_datagram(Direction.CLIENT_TO_SERVER, asked.to_wire(), 1)
    [call] = parser.feed_datagram(Direction.SERVER_TO_CLIENT, wire[:-3], 2)  # the A record cut short
    assert summary(call) == ("A", "svc.example.test", "NOERROR", OK)
    assert call.notes == ["malformed-records"]
    assert not call.dns.answers


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"\x12\x34\x01\x00",
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03abc",
        b"\x00\x01\x01\x00\x00\x01" + bytes(6) + b"\xc0\x0c",
    ],
)
def test_unreadable_header_or_question_is_a_protocol_error(wire: bytes) -> None:
    parser = DnsDatagramParser(UDP_FLOW, ParserLimits())
    with pytest.raises(ProtocolError):
        parser.feed_datagram(Direction.CLIENT_TO_SERVER, wire, 1) if wire else parse_message(wire)


def test_tcp_length_below_a_header_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        DnsStreamParser(TCP_FLOW, ParserLimits()).feed(Direction.CLIENT_TO_SERVER, b"\x00\x05hello", 1)


def test_tcp_gap_resynchronises_at_the_next_message() -> None:
    parser = DnsStreamParser(TCP_FLOW, ParserLimits())
    lost, kept = query(ident=1), query("kept.example.test", ident=2)
    framed = [len(w).to_bytes(2, "big") + w for w in (lost.to_wire(), kept.to_wire())]
    parser.feed(Direction.CLIENT_TO_SERVER, framed[0] + framed[1], 1)
    lost_reply = answer(lost, "1.1.1.1")
    parser.feed(Direction.SERVER_TO_CLIENT, (len(lost_reply).to_bytes(2, "big") + lost_reply)[:7], 2)
    parser.gap(Direction.SERVER_TO_CLIENT, 40, 3)
    assert parser.feed(Direction.SERVER_TO_CLIENT, b"junk that is not a message", 4) == []
    reply = answer(kept, "2.2.2.2")
    [call] = parser.feed(Direction.SERVER_TO_CLIENT, len(reply).to_bytes(2, "big") + reply, 5)
    assert call.path == "kept.example.test"
    assert call.outcome == OK
    [unanswered] = parser.finish(6)
    assert unanswered.dns.id == 1
    assert unanswered.notes == ["capture-gap"]


def test_probes_score_content_first_then_ports() -> None:
    wire = query().to_wire()
    other = FlowInfo("udp", "10.0.0.1", 40000, "10.0.0.2", 9999)
    assert probe_udp(wire, b"", UDP_FLOW) == 3
    assert probe_udp(wire, b"", other) == 2
    assert probe_udp(b"", answer(query(), "1.2.3.4"), other) == 2
    assert probe_udp(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"", UDP_FLOW) == 0
    assert probe_udp(b"", b"", UDP_FLOW) == 1
    assert probe_udp(b"", b"", other) == 0
    framed = len(wire).to_bytes(2, "big") + wire
    assert probe_tcp(framed[:14], b"", TCP_FLOW) == 3
    assert probe_tcp(framed, b"", FlowInfo("tcp", "10.0.0.1", 1, "10.0.0.2", 2)) == 2
    assert probe_tcp(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(20), b"", TCP_FLOW) == 0
    assert SPEC.transport == "udp"
    assert SPEC_TCP.transport == "tcp"
    assert SPEC.name == SPEC_TCP.name == "dns"
    assert SPEC.new_datagram is not None
    assert SPEC_TCP.new_stream is not None


def test_truncated_flag_and_answer_bounds() -> None:
    asked = query(rdtype="A")
    response = dns.message.make_response(asked)
    response.flags |= dns.flags.TC
    rrset = dns.rrset.from_text_list(
        asked.question[0].name, 5, "IN", "A", [f"10.0.{i // 256}.{i % 256}" for i in range(100)]
    )
    response.answer.append(rrset)
    parser = DnsDatagramParser(UDP_FLOW, ParserLimits())
    parser.feed_datagram(Direction.CLIENT_TO_SERVER, asked.to_wire(), 1)
    [call] = parser.feed_datagram(Direction.SERVER_TO_CLIENT, response.to_wire(), 2)
    assert call.dns.truncated
    assert len(call.dns.answers) == dns_protocol.MAX_ANSWERS
    assert "answers-truncated" in call.notes
    assert call.dns.answers[0].ttl == 5
