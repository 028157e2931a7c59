"""Packets for the dissector's tests, built with dpkt (the hot path parses them by hand)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import dpkt

from trawl.dissector.config import DissectorSettings
from trawl.dissector.engine import Dissector
from trawl.pcap import LINKTYPE_ETHERNET, pack_record
from trawl.v1.calls_pb2 import ApiCall
from trawl.v1.packets_pb2 import PacketBatch

FLAGS = {"F": dpkt.tcp.TH_FIN, "S": dpkt.tcp.TH_SYN, "R": dpkt.tcp.TH_RST, "P": dpkt.tcp.TH_PUSH, "A": dpkt.tcp.TH_ACK}
T0 = 1_700_000_000_000_000_000


def _addr(ip: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)


def ip_packet(src: str, dst: str, proto: int, payload: bytes, ident: int = 1) -> bytes:
    """An IPv4 or IPv6 packet (no link layer)."""
    if ":" in src:
        return bytes(dpkt.ip6.IP6(src=_addr(src), dst=_addr(dst), nxt=proto, hlim=64, plen=len(payload), data=payload))
    packet = dpkt.ip.IP(src=_addr(src), dst=_addr(dst), p=proto, ttl=64, id=ident, data=payload)
    packet.len = 20 + len(payload)
    return bytes(packet)


def ethernet(ip: bytes, vlans: Iterable[int] = ()) -> bytes:
    """An Ethernet frame; each VLAN id adds a tag (the outer one 802.1ad when there are two)."""
    ethertype = 0x86DD if ip[0] >> 4 == 6 else 0x0800
    vlan_list = list(vlans)
    tags = b""
    for index, vlan in enumerate(vlan_list):
        tpid = 0x88A8 if index == 0 and len(vlan_list) > 1 else 0x8100
        tags += struct.pack("!HH", tpid, vlan)
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01" + tags + struct.pack("!H", ethertype) + ip


def tcp_segment(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: str,
    payload: bytes = b"",
    window: int = 65535,
) -> bytes:
    bits = 0
    for letter in flags:
        bits |= FLAGS[letter]
    segment = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq & 0xFFFFFFFF, ack=ack & 0xFFFFFFFF, flags=bits, win=window)
    segment.data = payload
    return bytes(segment)


def udp_datagram(sport: int, dport: int, payload: bytes) -> bytes:
    return bytes(dpkt.udp.UDP(sport=sport, dport=dport, ulen=8 + len(payload), data=payload))


@dataclass
class Conversation:
    """A TCP connection between a client and a server, frame by frame (Ethernet, IPv4 or IPv6).

    `frames` is a list of (ts_ns, frame bytes); every call advances time by `step_ns`.
    """

    client: str = "10.0.0.1"
    server: str = "10.0.0.2"
    client_port: int = 40000
    server_port: int = 80
    client_isn: int = 1000
    server_isn: int = 5000
    step_ns: int = 1_000_000
    vlans: tuple[int, ...] = ()
    frames: list[tuple[int, bytes]] = field(default_factory=list)
    now: int = T0
    client_next: int = 0
    server_next: int = 0

    def __post_init__(self) -> None:
        self.client_next = self.client_isn + 1
        self.server_next = self.server_isn + 1

    def raw(self, from_client: bool, seq: int, ack: int, flags: str, payload: bytes = b"", window: int = 65535) -> None:
        if from_client:
            src, dst, sport, dport = self.client, self.server, self.client_port, self.server_port
        else:
            src, dst, sport, dport = self.server, self.client, self.server_port, self.client_port
        segment = tcp_segment(src, dst, sport, dport, seq, ack, flags, payload, window)
        self.frames.append((self.now, ethernet(ip_packet(src, dst, 6, segment), self.vlans)))
        self.now += self.step_ns

    def handshake(self) -> Conversation:
        self.raw(True, self.client_isn, 0, "S")
        self.raw(False, self.server_isn, self.client_isn + 1, "SA")
        self.raw(True, self.client_isn + 1, self.server_isn + 1, "A")
        return self

    def client_sends(self, payload: bytes, segment_size: int = 1400) -> Conversation:
        for offset in range(0, len(payload), segment_size):
            piece = payload[offset : offset + segment_size]
            self.raw(True, self.client_next, self.server_next, "PA", piece)
            self.client_next += len(piece)
        return self

    def server_sends(self, payload: bytes, segment_size: int = 1400) -> Conversation:
        for offset in range(0, len(payload), segment_size):
            piece = payload[offset : offset + segment_size]
            self.raw(False, self.server_next, self.client_next, "PA", piece)
            self.server_next += len(piece)
        return self

    def close(self) -> Conversation:
        self.raw(True, self.client_next, self.server_next, "FA")
        self.client_next += 1
        self.raw(False, self.server_next, self.client_next, "FA")
        self.server_next += 1
        self.raw(True, self.client_next, self.server_next, "A")
        return self


def batch(
    frames: Iterable[tuple[int, bytes]],
    link_type: int = LINKTYPE_ETHERNET,
    node: str = "n1",
    shard: int = 0,
    sequence: int = 1,
    end_of_input: bool = False,
) -> PacketBatch:
    records = [pack_record(ts, frame) for ts, frame in frames]
    return PacketBatch(
        node=node,
        shard=shard,
        link_type=link_type,
        sequence=sequence,
        nanosecond=True,
        records=b"".join(records),
        packet_count=len(records),
        end_of_input=end_of_input,
    )


def settings(**overrides: object) -> DissectorSettings:
    return DissectorSettings.load(None, node="n1", **overrides)


def dissect(
    frames: Iterable[tuple[int, bytes]],
    link_type: int = LINKTYPE_ETHERNET,
    dissector: Dissector | None = None,
    **overrides: object,
) -> list[ApiCall]:
    """Every call the frames make, one frame per batch (as a live capture might), then finish()."""
    engine = dissector or Dissector(settings(**overrides), "n1")
    calls: list[ApiCall] = []
    for sequence, frame in enumerate(frames, start=1):
        calls += engine.feed(batch([frame], link_type, sequence=sequence))
    return calls + engine.finish()


def read_capture(path: Path) -> tuple[int, list[tuple[int, bytes]]]:
    """(link type, [(ts_ns, frame)]) of a pcap or pcapng file."""
    with path.open("rb") as handle:
        reader = dpkt.pcapng.Reader(handle) if path.suffix == ".pcapng" else dpkt.pcap.Reader(handle)
        link_type = reader.datalink()
        frames = [(round(ts * 1_000_000_000), bytes(frame)) for ts, frame in reader]
    return link_type, frames


def dissect_capture(path: Path, **overrides: object) -> tuple[list[ApiCall], Dissector]:
    link_type, frames = read_capture(path)
    engine = Dissector(settings(**overrides), "n1")
    calls = engine.feed(batch(frames, link_type)) + engine.finish()
    return calls, engine


def summary(calls: Iterable[ApiCall], protocol: str = "http") -> list[tuple[str, str, str]]:
    return [(call.method, call.path, call.status) for call in calls if call.protocol == protocol]
