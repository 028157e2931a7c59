"""ICMP tracker: real `ping` traffic (tests/fixtures/icmp_*.pcap) and the pairing rules."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.protocol_replay import icmp_calls
from trawl.dissector.protocols.base import ParserLimits, ProtocolError
from trawl.dissector.protocols.icmp import IcmpTracker, parse_quoted
from trawl.v1.calls_pb2 import ApiCall, Outcome

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
OK, ERROR, NO_RESPONSE = Outcome.OUTCOME_OK, Outcome.OUTCOME_ERROR, Outcome.OUTCOME_NO_RESPONSE


def echo(icmp_type: int, identifier: int, sequence: int, payload: bytes = b"abcdefgh") -> bytes:
    return struct.pack("!BBHHH", icmp_type, 0, 0, identifier, sequence) + payload


def ipv4_header(src: str, dst: str, protocol: int) -> bytes:
    return struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 60, 1, 0, 64, protocol, 0, *(bytes(map(int, a.split("."))) for a in (src, dst))
    )


def summary(call: ApiCall) -> tuple[str, str, str, str, str, int]:
    return (call.src.ip, call.dst.ip, call.method, call.path, call.status, call.outcome)


def test_loopback_pings_pair_every_echo() -> None:
    calls = icmp_calls(FIXTURES / "icmp_echo.pcap")
    assert [summary(call) for call in calls] == [
        ("127.0.0.1", "127.0.0.1", "echo", "127.0.0.1", "reply", OK),
        ("127.0.0.1", "127.0.0.1", "echo", "127.0.0.1", "reply", OK),
        ("127.0.0.1", "127.0.0.1", "echo", "127.0.0.1", "reply", OK),
        ("::1", "::1", "echo", "::1", "reply", OK),
        ("::1", "::1", "echo", "::1", "reply", OK),
    ]
    assert [call.icmp.sequence for call in calls] == [1, 2, 3, 1, 2]
    assert [call.icmp.type for call in calls] == [8, 8, 8, 128, 128]
    for call in calls:
        assert call.protocol == "icmp"
        assert call.transport == "icmp"
        assert 0 < call.elapsed_ns < 1_000_000_000
        assert call.response.ts == call.request.ts + call.elapsed_ns
    assert len({call.id for call in calls}) == len(calls)


def test_namespace_errors_quote_the_flow_they_answer() -> None:
    calls = icmp_calls(FIXTURES / "icmp_errors.pcap")
    a, b, r = "10.99.1.2", "10.99.2.2", "10.99.1.1"
    a6, b6, r6 = "fd99:1::2", "fd99:2::2", "fd99:1::1"
    rows = [summary(call) for call in calls]
    udp_v4 = next(call for call in calls if call.path.startswith("udp 10."))
    udp_v6 = next(call for call in calls if call.path.startswith("udp ["))
    assert rows == [
        (a, b, "echo", b, "reply", OK),
        (a, b, "echo", b, "reply", OK),
        (a, "10.99.3.5", "echo", "10.99.3.5", "host-unreachable", ERROR),
        (r, a, "dest-unreachable", f"icmp {a} -> 10.99.3.5", "host-unreachable", ERROR),
        (a, "10.99.4.5", "echo", "10.99.4.5", "admin-prohibited", ERROR),
        (r, a, "dest-unreachable", f"icmp {a} -> 10.99.4.5", "admin-prohibited", ERROR),
        (b, a, "dest-unreachable", udp_v4.path, "port-unreachable", ERROR),
        (a, b, "echo", b, "ttl-exceeded", ERROR),
        (r, a, "time-exceeded", f"icmp {a} -> {b}", "ttl-exceeded", ERROR),
        (a, b, "echo", b, "frag-needed mtu 1280", ERROR),
        (r, a, "dest-unreachable", f"icmp {a} -> {b}", "frag-needed mtu 1280", ERROR),
        (a6, b6, "echo", b6, "reply", OK),
        (a6, b6, "echo", b6, "reply", OK),
        (a6, "fd99:3::5", "echo", "fd99:3::5", "no-route", ERROR),
        (r6, a6, "dest-unreachable", f"icmpv6 {a6} -> fd99:3::5", "no-route", ERROR),
        (b6, a6, "dest-unreachable", udp_v6.path, "port-unreachable", ERROR),
        (a6, b6, "echo", b6, "hop-limit-exceeded", ERROR),
        (r6, a6, "time-exceeded", f"icmpv6 {a6} -> {b6}", "hop-limit-exceeded", ERROR),
        (a6, b6, "echo", b6, "mtu 1280", ERROR),
        (r6, a6, "packet-too-big", f"icmpv6 {a6} -> {b6}", "mtu 1280", ERROR),
    ]
    assert udp_v4.path.endswith(f" -> {b}:33434")
    assert udp_v4.path.startswith(f"udp {a}:")
    assert udp_v6.path.startswith(f"udp [{a6}]:")
    assert udp_v6.path.endswith(f" -> [{b6}]:33434")
    assert udp_v4.icmp.quoted_flow == udp_v4.path
    answered = [call for call in calls if call.method == "echo" and call.outcome == ERROR]
    assert all(call.notes[0].startswith("answered-by-") for call in answered)


def test_unanswered_echo_expires_and_orphan_reply_is_reported() -> None:
    tracker = IcmpTracker("n1", ParserLimits(request_timeout_ns=1_000))
    assert tracker.feed_packet("10.0.0.1", "10.0.0.2", echo(8, 7, 1), 100, False) == []
    assert tracker.expire(1_099) == []
    [lost] = tracker.expire(1_100)
    assert summary(lost) == ("10.0.0.1", "10.0.0.2", "echo", "10.0.0.2", "", NO_RESPONSE)
    [orphan] = tracker.feed_packet("10.0.0.2", "10.0.0.1", echo(0, 7, 2), 2_000, False)
    assert summary(orphan) == ("10.0.0.1", "10.0.0.2", "echo", "10.0.0.2", "reply", OK)
    assert orphan.notes == ["no-request-seen"]
    tracker.feed_packet("10.0.0.1", "10.0.0.2", echo(8, 7, 3), 3_000, False)
    [pending] = tracker.finish()
    assert pending.icmp.sequence == 3
    assert pending.outcome == NO_RESPONSE


def test_reply_must_come_from_the_target_with_the_same_id_and_sequence() -> None:
    tracker = IcmpTracker("n1", ParserLimits())
    tracker.feed_packet("10.0.0.1", "10.0.0.2", echo(8, 7, 1), 100, False)
    [wrong_sequence] = tracker.feed_packet("10.0.0.2", "10.0.0.1", echo(0, 7, 9), 200, False)
    [wrong_host] = tracker.feed_packet("10.0.0.3", "10.0.0.1", echo(0, 7, 1), 200, False)
    assert wrong_sequence.notes == wrong_host.notes == ["no-request-seen"]
    [paired] = tracker.feed_packet("10.0.0.2", "10.0.0.1", echo(0, 7, 1), 300, False)
    assert paired.elapsed_ns == 200
    assert not paired.notes


def test_pending_table_is_bounded() -> None:
    tracker = IcmpTracker("n1", ParserLimits(), max_pending=2)
    for sequence in range(3):
        emitted = tracker.feed_packet("10.0.0.1", "10.0.0.2", echo(8, 1, sequence), sequence, False)
    [evicted] = emitted
    assert evicted.icmp.sequence == 0
    assert evicted.notes == ["pending-limit"]
    assert tracker.evicted == 1
    assert [call.icmp.sequence for call in tracker.finish()] == [1, 2]


def test_other_types_are_counted_not_reported() -> None:
    tracker = IcmpTracker("n1", ParserLimits())
    neighbor_solicitation = bytes([135, 0, 0, 0]) + bytes(20)
    assert tracker.feed_packet("fe80::1", "ff02::1:ff00:2", neighbor_solicitation, 1, True) == []
    assert tracker.feed_packet("10.0.0.1", "10.0.0.2", bytes([13, 0, 0, 0]) + bytes(16), 1, False) == []
    assert tracker.ignored == 2


@pytest.mark.parametrize(
    ("packet", "is_v6"),
    [(b"", False), (b"\x08\x00\x00", False), (b"\x80\x00\x00\x00\x00", True), (b"\x03\x03\x00\x00", False)],
)
def test_short_packets_are_protocol_errors(packet: bytes, is_v6: bool) -> None:
    with pytest.raises(ProtocolError):
        IcmpTracker("n1", ParserLimits()).feed_packet("10.0.0.1", "10.0.0.2", packet, 1, is_v6)


def test_truncated_quoted_datagram_is_noted() -> None:
    tracker = IcmpTracker("n1", ParserLimits())
    [call] = tracker.feed_packet("10.0.0.254", "10.0.0.1", bytes([3, 1, 0, 0, 0, 0, 0, 0]) + b"\x45\x00", 1, False)
    assert call.method == "dest-unreachable"
    assert call.path == "10.0.0.1"
    assert call.notes == ["quoted-datagram-truncated"]


def test_quoted_flows() -> None:
    tcp = ipv4_header("10.0.0.1", "10.0.0.2", 6) + struct.pack("!HHI", 40000, 443, 1)
    assert str(parse_quoted(tcp, False)) == "tcp 10.0.0.1:40000 -> 10.0.0.2:443"
    gre = ipv4_header("10.0.0.1", "10.0.0.2", 47) + bytes(8)
    assert str(parse_quoted(gre, False)) == "gre 10.0.0.1 -> 10.0.0.2"
    src, dst = bytes.fromhex("20010db8" + "00" * 11 + "01"), bytes.fromhex("20010db8" + "00" * 11 + "02")
    # IPv6 with a hop-by-hop options header before UDP.
    ipv6 = (
        bytes([0x60, 0, 0, 0, 0, 16, 0, 64])
        + src
        + dst
        + bytes([17, 0])
        + bytes(6)
        + struct.pack("!HHHH", 5353, 53, 8, 0)
    )
    assert str(parse_quoted(ipv6, True)) == "udp [2001:db8::1]:5353 -> [2001:db8::2]:53"
    with pytest.raises(ProtocolError):
        parse_quoted(bytes(10), False)
