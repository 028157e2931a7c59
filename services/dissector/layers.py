"""Link and network layers: pcap link types down to an IP packet's transport payload.

Link types: Ethernet (with 802.1Q / 802.1ad / QinQ tags), Linux cooked capture v1 (SLL) and v2
(SLL2), BSD loopback (NULL, LOOP), raw IP (RAW, IPV4, IPV6). Network: IPv4 with bounded
fragment reassembly, IPv6 with its extension headers (fragments reassembled the same way).

This is the per-packet hot path, so it indexes the bytes directly instead of building dpkt
objects (dpkt allocates an object per layer and costs about ten times more per packet);
tests build their packets with dpkt and check this module against it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import NamedTuple

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

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
VLAN_TYPES = frozenset({0x8100, 0x88A8, 0x9100, 0x9200})
# Extension headers whose length is (byte 1 + 1) * 8.
IPV6_OPTION_HEADERS = frozenset({0, 43, 60, 135, 139, 140, 253, 254})
IPV6_FRAGMENT = 44
IPV6_AH = 51
IPV6_NO_NEXT = 59
# BSD loopback address families meaning IPv6 (the value differs per OS).
NULL_AF_IPV6 = frozenset({10, 24, 28, 30})

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58


class IpPacket(NamedTuple):
    """What the transport layer needs from one IP datagram (after fragment reassembly)."""

    ts_ns: int
    version: int  # 4 or 6
    src: bytes  # 4 or 16 raw address bytes
    dst: bytes
    proto: int  # IP protocol number of `payload`
    payload: bytes


_ntop_cache: dict[bytes, str] = {}


def ip_text(address: bytes) -> str:
    """Printable form of a raw IPv4/IPv6 address (cached: the same few addresses recur)."""
    text = _ntop_cache.get(address)
    if text is None:
        if len(_ntop_cache) > 65536:
            _ntop_cache.clear()
        text = socket.inet_ntop(socket.AF_INET if len(address) == 4 else socket.AF_INET6, address)
        _ntop_cache[address] = text
    return text


@dataclass
class _Datagram:
    first_ts_ns: int
    pieces: list[tuple[int, bytes]] = field(default_factory=list)
    size: int = 0
    total: int = -1  # known once the last fragment arrived


class FragmentReassembler:
    """Bounded IPv4/IPv6 fragment reassembly: at most `max_datagrams` incomplete datagrams and
    `max_bytes` buffered in all; an incomplete datagram is dropped after `timeout_ns`."""

    def __init__(self, max_datagrams: int, max_bytes: int, timeout_ns: int, counters: dict[str, int]) -> None:
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        self.timeout_ns = timeout_ns
        self.counters = counters
        self.pending: dict[tuple[bytes, bytes, int, int], _Datagram] = {}
        self.buffered = 0

    def add(self, key: tuple[bytes, bytes, int, int], offset: int, more: bool, data: bytes, ts_ns: int) -> bytes | None:
        """Store one fragment; return the whole payload once every piece is there."""
        counters = self.counters
        counters["ip_fragments"] = counters.get("ip_fragments", 0) + 1
        datagram = self.pending.get(key)
        if datagram is None:
            if len(self.pending) >= self.max_datagrams or self.buffered + len(data) > self.max_bytes:
                self.expire(ts_ns)
                if len(self.pending) >= self.max_datagrams or self.buffered + len(data) > self.max_bytes:
                    counters["ip_fragments_dropped_limit"] = counters.get("ip_fragments_dropped_limit", 0) + 1
                    return None
            datagram = self.pending[key] = _Datagram(ts_ns)
        elif self.buffered + len(data) > self.max_bytes or offset + len(data) > 65535:
            counters["ip_fragments_dropped_limit"] = counters.get("ip_fragments_dropped_limit", 0) + 1
            self._drop(key, datagram)
            return None
        datagram.pieces.append((offset, data))
        datagram.size += len(data)
        self.buffered += len(data)
        if not more:
            datagram.total = offset + len(data)
        if datagram.total < 0:
            return None
        # Complete when the pieces, sorted by offset, cover [0, total) without a hole.
        pieces = sorted(datagram.pieces, key=lambda piece: piece[0])
        covered = 0
        for start, chunk in pieces:
            if start > covered:
                return None
            covered = max(covered, start + len(chunk))
        if covered < datagram.total:
            return None
        whole = bytearray()
        for start, chunk in pieces:
            end = start + len(chunk)
            if end > len(whole):
                # First copy (lowest offset) wins where fragments overlap.
                whole += chunk[len(whole) - start :]
        self._drop(key, datagram)
        counters["ip_reassembled"] = counters.get("ip_reassembled", 0) + 1
        return bytes(whole[: datagram.total])

    def _drop(self, key: tuple[bytes, bytes, int, int], datagram: _Datagram) -> None:
        self.buffered -= datagram.size
        self.pending.pop(key, None)

    def expire(self, now_ns: int) -> None:
        stale = [key for key, datagram in self.pending.items() if now_ns - datagram.first_ts_ns > self.timeout_ns]
        for key in stale:
            self.counters["ip_fragments_timed_out"] = self.counters.get("ip_fragments_timed_out", 0) + 1
            self._drop(key, self.pending[key])


class PacketDecoder:
    """Decodes pcap records of any supported link type into `IpPacket`s (or None, counted)."""

    def __init__(
        self,
        max_fragments: int = 10_000,
        max_fragment_bytes: int = 16 << 20,
        fragment_timeout_ns: int = 30_000_000_000,
        counters: dict[str, int] | None = None,
    ) -> None:
        self.counters: dict[str, int] = counters if counters is not None else {}
        self.fragments = FragmentReassembler(max_fragments, max_fragment_bytes, fragment_timeout_ns, self.counters)

    def _skip(self, reason: str) -> None:
        self.counters[reason] = self.counters.get(reason, 0) + 1

    def decode(self, link_type: int, data: bytes, ts_ns: int) -> IpPacket | None:
        """The IP packet inside one captured frame; None for non-IP, malformed or incomplete input."""
        size = len(data)
        if link_type == LINKTYPE_ETHERNET:
            if size < 14:
                self._skip("malformed_link")
                return None
            ethertype = (data[12] << 8) | data[13]
            offset = 14
            while ethertype in VLAN_TYPES:
                if size < offset + 4:
                    self._skip("malformed_link")
                    return None
                ethertype = (data[offset + 2] << 8) | data[offset + 3]
                offset += 4
        elif link_type == LINKTYPE_LINUX_SLL:
            if size < 16:
                self._skip("malformed_link")
                return None
            ethertype = (data[14] << 8) | data[15]
            offset = 16
        elif link_type == LINKTYPE_LINUX_SLL2:
            if size < 20:
                self._skip("malformed_link")
                return None
            ethertype = (data[0] << 8) | data[1]
            offset = 20
        elif link_type in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
            if size < 1:
                self._skip("malformed_link")
                return None
            version = data[0] >> 4
            ethertype = ETH_IPV4 if version == 4 else ETH_IPV6 if version == 6 else 0
            offset = 0
        elif link_type in (LINKTYPE_NULL, LINKTYPE_LOOP):
            if size < 4:
                self._skip("malformed_link")
                return None
            family_le = data[0] | (data[1] << 8) | (data[2] << 16) | (data[3] << 24)
            family_be = (data[0] << 24) | (data[1] << 16) | (data[2] << 8) | data[3]
            # NULL is in the capturing host's byte order, LOOP in network order: accept both.
            if family_le == 2 or family_be == 2:
                ethertype = ETH_IPV4
            elif family_le in NULL_AF_IPV6 or family_be in NULL_AF_IPV6:
                ethertype = ETH_IPV6
            else:
                ethertype = 0
            offset = 4
        else:
            self._skip("unsupported_link_type")
            return None
        if ethertype == ETH_IPV4:
            return self._ipv4(data, offset, ts_ns)
        if ethertype == ETH_IPV6:
            return self._ipv6(data, offset, ts_ns)
        self._skip("non_ip")
        return None

    def _ipv4(self, data: bytes, offset: int, ts_ns: int) -> IpPacket | None:
        size = len(data)
        if size < offset + 20 or data[offset] >> 4 != 4:
            self._skip("malformed_ip")
            return None
        header_len = (data[offset] & 0x0F) * 4
        total = (data[offset + 2] << 8) | data[offset + 3]
        if header_len < 20 or total < header_len or size < offset + header_len:
            self._skip("malformed_ip")
            return None
        end = offset + total
        if end > size:
            # Cut by the snap length (or a TSO super-frame with total 0): keep what was captured.
            self._skip("truncated_ip")
            end = size
        flags = (data[offset + 6] << 8) | data[offset + 7]
        proto = data[offset + 9]
        src = data[offset + 12 : offset + 16]
        dst = data[offset + 16 : offset + 20]
        payload = data[offset + header_len : end]
        if flags & 0x3FFF:  # MF set or a non-zero fragment offset
            ident = (data[offset + 4] << 8) | data[offset + 5]
            whole = self.fragments.add(
                (src, dst, ident, proto), (flags & 0x1FFF) * 8, bool(flags & 0x2000), payload, ts_ns
            )
            if whole is None:
                return None
            payload = whole
        return IpPacket(ts_ns, 4, src, dst, proto, payload)

    def _ipv6(self, data: bytes, offset: int, ts_ns: int) -> IpPacket | None:
        size = len(data)
        if size < offset + 40 or data[offset] >> 4 != 6:
            self._skip("malformed_ip")
            return None
        payload_len = (data[offset + 4] << 8) | data[offset + 5]
        next_header = data[offset + 6]
        src = data[offset + 8 : offset + 24]
        dst = data[offset + 24 : offset + 40]
        end = offset + 40 + payload_len
        if end > size or payload_len == 0:
            if end > size:
                self._skip("truncated_ip")
            end = size  # payload length 0 means a jumbogram: take what was captured
        body = data[offset + 40 : end]
        walked = self._ipv6_extensions(body, next_header, src, dst, ts_ns)
        if walked is None:
            return None
        proto, payload = walked
        return IpPacket(ts_ns, 6, src, dst, proto, payload)

    def _ipv6_extensions(
        self, body: bytes, next_header: int, src: bytes, dst: bytes, ts_ns: int
    ) -> tuple[int, bytes] | None:
        position = 0
        size = len(body)
        for _ in range(16):  # bounded: a chain of more than 16 extension headers is not real traffic
            if next_header in IPV6_OPTION_HEADERS:
                if size < position + 8:
                    self._skip("malformed_ip")
                    return None
                length = (body[position + 1] + 1) * 8
                next_header = body[position]
                position += length
            elif next_header == IPV6_AH:
                if size < position + 8:
                    self._skip("malformed_ip")
                    return None
                length = (body[position + 1] + 2) * 4
                next_header = body[position]
                position += length
            elif next_header == IPV6_FRAGMENT:
                if size < position + 8:
                    self._skip("malformed_ip")
                    return None
                inner = body[position]
                frag = (body[position + 2] << 8) | body[position + 3]
                ident = int.from_bytes(body[position + 4 : position + 8], "big")
                fragment = body[position + 8 :]
                if frag & 0xFFF9 == 0:  # an atomic fragment: offset 0, no more fragments
                    body, position, size, next_header = fragment, 0, len(fragment), inner
                    continue
                whole = self.fragments.add(
                    (src, dst, ident, 256 + inner), frag & 0xFFF8, bool(frag & 1), fragment, ts_ns
                )
                if whole is None:
                    return None
                body, position, size, next_header = whole, 0, len(whole), inner
            else:
                if position > size:
                    self._skip("malformed_ip")
                    return None
                return next_header, body[position:] if position else body
        self._skip("malformed_ip")
        return None
