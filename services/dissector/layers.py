"""Link and network layers: pcap link types down to an IP packet's transport payload.

Link types: Ethernet (with 802.1Q / 802.1ad / QinQ tags), Linux cooked capture v1 (SLL) and v2
(SLL2), BSD loopback (NULL, LOOP), raw IP (RAW, IPV4, IPV6, and the historical DLT_RAW values 12
and 14 that BSD tools wrote into files). Network: IPv4 with bounded fragment reassembly, IPv6
with its extension headers (fragments reassembled the same way).

This is the per-packet hot path, so it indexes the bytes directly instead of building dpkt
objects (dpkt allocates an object per layer and costs about ten times more per packet);
tests build their packets with dpkt and check this module against it.
"""

from __future__ import annotations

import socket
from bisect import bisect_right
from collections import OrderedDict
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
    LINKTYPE_RAW_HISTORICAL,
)

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
VLAN_TYPES = frozenset({0x8100, 0x88A8, 0x9100, 0x9200})
# Extension headers whose length is (byte 1 + 1) * 8.
IPV6_OPTION_HEADERS = frozenset({0, 43, 60, 135, 139, 140, 253, 254})
IPV6_FRAGMENT = 44
IPV6_AH = 51
IPV6_NO_NEXT = 59
RAW_IP_LINK_TYPES = frozenset({LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6, *LINKTYPE_RAW_HISTORICAL})
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


FragmentKey = tuple[bytes, bytes, int, int]  # source, destination, identification, protocol
MAX_DATAGRAM = 65535  # an IP datagram's largest length (the IPv4 total length field)


class _Datagram:
    """The pieces of one incomplete datagram, kept disjoint and sorted by offset."""

    __slots__ = ("chunks", "first_ts_ns", "size", "starts", "total")

    def __init__(self, first_ts_ns: int) -> None:
        self.first_ts_ns = first_ts_ns
        self.starts: list[int] = []  # the offset of each chunk, ascending (bisected, never re-sorted)
        self.chunks: list[bytes] = []
        self.size = 0  # bytes held; the chunks never overlap, so complete when size == total
        self.total = -1  # the datagram's length, known once its last fragment arrived


class FragmentReassembler:
    """Bounded IPv4/IPv6 fragment reassembly: at most `max_datagrams` incomplete datagrams,
    `max_bytes` held in all and `max_pieces` pieces per datagram; an incomplete datagram is
    dropped after `timeout_ns`.

    A fragment costs the same however many datagrams are pending and however many pieces they
    hold, so a flood of fragments costs what ordinary packets cost:

    - pending datagrams sit in an OrderedDict in order of their first fragment, so the oldest is
      the first: timing out (from the front) and eviction (the oldest incomplete datagram makes
      room when the table or the byte budget is full) take O(1) a datagram, with no scan;
    - a datagram's pieces stay disjoint and sorted: a new piece finds its place by bisection and
      only its bytes not held yet are kept (the first copy wins where pieces overlap, as tshark
      reassembles), and the datagram is whole when the bytes held reach its length;
    - a piece with no bytes, one whose bytes are all held already, and one that contradicts the
      datagram's end are rejected and counted; none of them is held or counts against a bound;
    - a datagram that needs more than `max_pieces` pieces or, alone, more than `max_bytes` is
      dropped (counted), without evicting the others.

    The oldest-first order is the order of arrival: a datagram whose first fragment carries an
    older timestamp than one before it waits for that one to time out (or for eviction).
    """

    def __init__(
        self,
        max_datagrams: int,
        max_bytes: int,
        timeout_ns: int,
        counters: dict[str, int],
        max_pieces: int = 256,
    ) -> None:
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        self.timeout_ns = timeout_ns
        # 64 KiB over the smallest IPv6 MTU (1280) is 52 pieces, over a 576-byte IPv4 path 117.
        self.max_pieces = max_pieces
        self.counters = counters
        self.pending: OrderedDict[FragmentKey, _Datagram] = OrderedDict()
        self.buffered = 0

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def add(self, key: FragmentKey, offset: int, more: bool, data: bytes, ts_ns: int) -> bytes | None:
        """Store one fragment; return the whole payload once every piece is there."""
        counters = self.counters
        counters["ip_fragments"] = counters.get("ip_fragments", 0) + 1
        length = len(data)
        end = offset + length
        if not length:
            self._count("ip_fragments_empty")
            return None
        if end > MAX_DATAGRAM:
            self._count("ip_fragments_inconsistent")
            return None
        datagram = self.pending.get(key)
        if datagram is None:
            if length > self.max_bytes:  # could never be held: refused without evicting anyone
                self._count("ip_fragments_dropped_limit")
                return None
            if not self._make_room(length, ts_ns, None):
                self._count("ip_fragments_dropped_limit")
                return None
            datagram = self.pending[key] = _Datagram(ts_ns)
        starts, chunks = datagram.starts, datagram.chunks
        total = datagram.total
        if (total >= 0 and (end > total or (not more and end != total))) or (
            not more and total < 0 and starts and starts[-1] + len(chunks[-1]) > end
        ):
            # Past the end the last fragment gave, a second and different end, or an end before
            # bytes already held: the first word on the datagram's length stands.
            self._count("ip_fragments_inconsistent")
            return None
        if not more:
            datagram.total = end
        gaps = _uncovered(starts, chunks, offset, end)
        if not gaps:
            self._count("ip_fragments_duplicate")
            return self._complete(key, datagram)
        new_bytes = 0
        for _, start, stop in gaps:
            new_bytes += stop - start
        if new_bytes < length:
            self._count("ip_fragments_overlapping")
        if len(starts) + len(gaps) > self.max_pieces:
            self._count("ip_fragments_dropped_limit")
            self._count("ip_fragments_too_many_pieces")
            self._drop(key, datagram)
            return None
        if datagram.size + new_bytes > self.max_bytes:
            # This datagram alone would pass the byte budget: it goes, not the others.
            self._count("ip_fragments_dropped_limit")
            self._count("ip_fragments_too_large")
            self._drop(key, datagram)
            return None
        if self.buffered + new_bytes > self.max_bytes and not self._make_room(new_bytes, ts_ns, key):
            self._count("ip_fragments_dropped_limit")
            return None
        for index, start, stop in reversed(gaps):  # from the right, so each index stays valid
            starts.insert(index, start)
            chunks.insert(index, data if stop - start == length else data[start - offset : stop - offset])
        datagram.size += new_bytes
        self.buffered += new_bytes
        return self._complete(key, datagram)

    def _complete(self, key: FragmentKey, datagram: _Datagram) -> bytes | None:
        if datagram.size != datagram.total:
            return None
        self._drop(key, datagram)
        self._count("ip_reassembled")
        return b"".join(datagram.chunks)

    def _make_room(self, length: int, now_ns: int, current: FragmentKey | None) -> bool:
        """Drop the oldest datagrams until a new one (`current` None) or `length` more bytes for
        `current` fit; False when they cannot (the limits are smaller than that, or `current`
        itself was the oldest and went)."""
        pending = self.pending
        while pending and (
            (current is None and len(pending) >= self.max_datagrams) or self.buffered + length > self.max_bytes
        ):
            oldest_key, oldest = pending.popitem(last=False)
            self.buffered -= oldest.size
            stale = now_ns - oldest.first_ts_ns > self.timeout_ns
            self._count("ip_fragments_timed_out" if stale else "ip_fragments_evicted")
            if oldest_key == current:
                return False
        return (current is not None or len(pending) < self.max_datagrams) and self.buffered + length <= self.max_bytes

    def _drop(self, key: FragmentKey, datagram: _Datagram) -> None:
        self.buffered -= datagram.size
        self.pending.pop(key, None)

    def expire(self, now_ns: int) -> None:
        """Drop the datagrams whose first fragment is older than the timeout (from the oldest on)."""
        pending = self.pending
        while pending:
            oldest = next(iter(pending.values()))
            if now_ns - oldest.first_ts_ns <= self.timeout_ns:
                return
            pending.popitem(last=False)
            self.buffered -= oldest.size
            self._count("ip_fragments_timed_out")


def _uncovered(starts: list[int], chunks: list[bytes], offset: int, end: int) -> list[tuple[int, int, int]]:
    """The parts of [offset, end) no chunk holds, as (insertion index, start, stop); `starts` is
    sorted and the chunks are disjoint, so only the chunks that overlap the range are looked at."""
    index = bisect_right(starts, offset)
    position = offset
    if index and (previous_end := starts[index - 1] + len(chunks[index - 1])) > position:
        position = previous_end
    gaps: list[tuple[int, int, int]] = []
    count = len(starts)
    while position < end:
        if index < count and starts[index] < end:
            if starts[index] > position:
                gaps.append((index, position, starts[index]))
            position = max(position, starts[index] + len(chunks[index]))
            index += 1
        else:
            gaps.append((index, position, end))
            break
    return gaps


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
        elif link_type in RAW_IP_LINK_TYPES:
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
