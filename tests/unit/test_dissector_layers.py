"""Link and network layers: every link type, VLAN tags, IPv6 extension headers, IP fragments."""

from __future__ import annotations

import struct

import dpkt
import pytest

from tests.unit.dissector_builders import Conversation, _addr, dissect, ethernet, ip_packet, summary, udp_datagram
from trawl.dissector.layers import PacketDecoder
from trawl.pcap import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
)

PAYLOAD = udp_datagram(1234, 53, b"query bytes")
V4 = ip_packet("192.0.2.1", "192.0.2.2", 17, PAYLOAD)
V6 = ip_packet("2001:db8::1", "2001:db8::2", 17, PAYLOAD)


def sll(ip: bytes) -> bytes:
    protocol = 0x86DD if ip[0] >> 4 == 6 else 0x0800
    return struct.pack("!HHH8sH", 0, 1, 6, b"\x02\x00\x00\x00\x00\x01\x00\x00", protocol) + ip


def sll2(ip: bytes) -> bytes:
    protocol = 0x86DD if ip[0] >> 4 == 6 else 0x0800
    return struct.pack("!HHIHBB8s", protocol, 0, 3, 1, 0, 6, b"\x02\x00\x00\x00\x00\x01\x00\x00") + ip


def null_le(ip: bytes) -> bytes:
    return struct.pack("<I", 2 if ip[0] >> 4 == 4 else 30) + ip


def loop_be(ip: bytes) -> bytes:
    return struct.pack("!I", 2 if ip[0] >> 4 == 4 else 24) + ip


@pytest.mark.parametrize("ip", [V4, V6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize(
    ("link_type", "wrap"),
    [
        (LINKTYPE_ETHERNET, ethernet),
        (LINKTYPE_ETHERNET, lambda ip: ethernet(ip, vlans=(118,))),
        (LINKTYPE_ETHERNET, lambda ip: ethernet(ip, vlans=(209, 20))),
        (LINKTYPE_LINUX_SLL, sll),
        (LINKTYPE_LINUX_SLL2, sll2),
        (LINKTYPE_NULL, null_le),
        (LINKTYPE_LOOP, loop_be),
        (LINKTYPE_RAW, lambda ip: ip),
        (12, lambda ip: ip),  # DLT_RAW as most systems numbered it in files
        (14, lambda ip: ip),  # DLT_RAW as OpenBSD numbered it
    ],
    ids=["ethernet", "vlan", "qinq", "sll", "sll2", "null", "loop", "raw", "raw-12", "raw-14"],
)
def test_every_link_type_yields_the_ip_packet(link_type: int, wrap: object, ip: bytes) -> None:
    assert callable(wrap)
    packet = PacketDecoder().decode(link_type, wrap(ip), 42)
    assert packet is not None
    assert packet.proto == 17 and packet.payload == PAYLOAD and packet.ts_ns == 42
    assert packet.version == ip[0] >> 4
    assert packet.src == (_addr("192.0.2.1") if packet.version == 4 else _addr("2001:db8::1"))


def test_ipv4_and_ipv6_link_types() -> None:
    decoder = PacketDecoder()
    v4 = decoder.decode(LINKTYPE_IPV4, V4, 0)
    v6 = decoder.decode(LINKTYPE_IPV6, V6, 0)
    assert v4 is not None and v4.version == 4
    assert v6 is not None and v6.version == 6


def test_ethernet_padding_is_cut_by_the_ip_length() -> None:
    packet = PacketDecoder().decode(LINKTYPE_ETHERNET, ethernet(V4) + b"\x00" * 12, 0)
    assert packet is not None and packet.payload == PAYLOAD


def test_ipv6_extension_headers_are_walked() -> None:
    hop_by_hop = bytes([60, 0, 1, 4, 0, 0, 0, 0])  # next: destination options
    destination = bytes([43, 0, 1, 4, 0, 0, 0, 0])  # next: routing
    routing = bytes([17, 0, 0, 0, 0, 0, 0, 0])  # next: UDP
    body = hop_by_hop + destination + routing + PAYLOAD
    ip = bytes(
        dpkt.ip6.IP6(src=_addr("2001:db8::1"), dst=_addr("2001:db8::2"), nxt=0, hlim=64, plen=len(body), data=body)
    )
    packet = PacketDecoder().decode(LINKTYPE_RAW, ip, 0)
    assert packet is not None and packet.proto == 17 and packet.payload == PAYLOAD


def fragments_v4(payload: bytes, size: int, ident: int = 7) -> list[bytes]:
    pieces = []
    for offset in range(0, len(payload), size):
        chunk = payload[offset : offset + size]
        more = offset + size < len(payload)
        ip = dpkt.ip.IP(src=_addr("192.0.2.1"), dst=_addr("192.0.2.2"), p=17, id=ident, data=chunk)
        ip._flags_offset = (offset // 8) | (dpkt.ip.IP_MF if more else 0)
        ip.len = 20 + len(chunk)
        pieces.append(bytes(ip))
    return pieces


def test_ipv4_fragments_are_reassembled_in_any_order() -> None:
    big = udp_datagram(5000, 53, bytes(range(256)) * 10)
    for order in (lambda p: p, lambda p: p[::-1], lambda p: [p[1], p[0], *p[2:]]):
        decoder = PacketDecoder()
        results = [decoder.decode(LINKTYPE_RAW, piece, 0) for piece in order(fragments_v4(big, 800))]
        assert [r for r in results[:-1] if r is not None] == []
        last = results[-1]
        assert last is not None and last.payload == big
        assert decoder.counters["ip_reassembled"] == 1 and not decoder.fragments.pending


def test_overlapping_fragments_first_copy_wins() -> None:
    original = udp_datagram(5000, 53, b"A" * 1000)
    pieces = fragments_v4(original, 504)
    evil = fragments_v4(udp_datagram(5000, 53, b"B" * 1000), 504)
    decoder = PacketDecoder()
    decoder.decode(LINKTYPE_RAW, pieces[0], 0)
    decoder.decode(LINKTYPE_RAW, evil[0], 0)
    packet = decoder.decode(LINKTYPE_RAW, pieces[1], 0)
    assert packet is not None and packet.payload == original


def test_incomplete_fragments_are_bounded_and_expire() -> None:
    """A full table makes room by evicting the oldest incomplete datagram: the newest stay, so
    a datagram that completes soon after its first fragment still gets through."""
    decoder = PacketDecoder(max_fragments=5, fragment_timeout_ns=1000)
    for ident in range(20):
        assert decoder.decode(LINKTYPE_RAW, fragments_v4(udp_datagram(1, 2, b"x" * 100), 64, ident)[0], 0) is None
    assert [key[2] for key in decoder.fragments.pending] == [15, 16, 17, 18, 19]
    assert decoder.counters["ip_fragments_evicted"] == 15
    assert "ip_fragments_dropped_limit" not in decoder.counters
    last = decoder.decode(LINKTYPE_RAW, fragments_v4(udp_datagram(1, 2, b"x" * 100), 64, 19)[1], 0)
    assert last is not None and last.payload == udp_datagram(1, 2, b"x" * 100)
    decoder.fragments.expire(5000)
    assert not decoder.fragments.pending and decoder.fragments.buffered == 0
    assert decoder.counters["ip_fragments_timed_out"] == 4


def test_ipv6_fragments_are_reassembled() -> None:
    big = udp_datagram(5000, 53, b"v6" * 700)
    pieces = []
    for offset in range(0, len(big), 512):
        chunk = big[offset : offset + 512]
        more = 1 if offset + 512 < len(big) else 0
        header = struct.pack("!BBHI", 17, 0, offset | more, 99)
        body = header + chunk
        pieces.append(
            bytes(
                dpkt.ip6.IP6(
                    src=_addr("2001:db8::1"), dst=_addr("2001:db8::2"), nxt=44, hlim=1, plen=len(body), data=body
                )
            )
        )
    decoder = PacketDecoder()
    results = [decoder.decode(LINKTYPE_RAW, piece, 0) for piece in reversed(pieces)]
    last = results[-1]
    assert last is not None and last.proto == 17 and last.payload == big


@pytest.mark.parametrize(
    ("link_type", "frame", "counter"),
    [
        (LINKTYPE_ETHERNET, b"\x00" * 10, "malformed_link"),
        (LINKTYPE_ETHERNET, ethernet(V4)[:20], "malformed_ip"),
        (LINKTYPE_ETHERNET, b"\x00" * 12 + b"\x08\x06" + b"\x00" * 28, "non_ip"),
        (LINKTYPE_LINUX_SLL2, b"\x08\x00", "malformed_link"),
        (LINKTYPE_RAW, b"\x45" + b"\x00" * 5, "malformed_ip"),
        (147, V4, "unsupported_link_type"),
    ],
)
def test_bad_frames_are_counted_not_raised(link_type: int, frame: bytes, counter: str) -> None:
    decoder = PacketDecoder()
    assert decoder.decode(link_type, frame, 0) is None
    assert decoder.counters[counter] == 1


def test_http_over_sll2_ipv6_and_qinq_end_to_end() -> None:
    request = b"GET /v6 HTTP/1.1\r\nHost: x\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    conversation = Conversation(client="2001:db8::1", server="2001:db8::2", vlans=(100, 200))
    conversation.handshake().client_sends(request).server_sends(response).close()
    assert summary(dissect(conversation.frames)) == [("GET", "/v6", "200")]
    # The same conversation as a Linux "any" capture (SLL2): strip the Ethernet header, add SLL2.
    frames = [(ts, sll2(frame[14 + 8 :])) for ts, frame in conversation.frames]
    calls = dissect(frames, link_type=LINKTYPE_LINUX_SLL2)
    assert summary(calls) == [("GET", "/v6", "200")]
    assert (calls[0].src.ip, calls[0].dst.ip, calls[0].dst.port) == ("2001:db8::1", "2001:db8::2", 80)
