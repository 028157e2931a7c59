"""Feed a capture file straight into one protocol module, without the dissector's engine, so a
protocol's tests do not depend on it: dpkt decodes the link and IP layers, a small in-order
TCP delivery hands each direction's bytes over in sequence, and the module's parsers turn them
into calls. Used by the DNS, ICMP and TLS unit and oracle tests."""

from __future__ import annotations

import ipaddress
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dpkt

from trawl.dissector.protocols import dns, tls
from trawl.dissector.protocols.base import (
    DatagramParser,
    Direction,
    FlowInfo,
    ParserLimits,
    ProtocolSpec,
    StreamParser,
)
from trawl.dissector.protocols.icmp import IcmpTracker
from trawl.v1.calls_pb2 import ApiCall

_IPV6_EXTENSIONS = frozenset({0, 43, 44, 60})


@dataclass(frozen=True, slots=True)
class Packet:
    ts_ns: int
    src: str
    dst: str
    protocol: int  # IP protocol number: 6, 17, 1, 58
    payload: bytes  # the TCP/UDP payload, or the whole ICMP message
    is_v6: bool
    sport: int = 0
    dport: int = 0
    tcp_flags: int = 0
    seq: int = 0


def _ip_layer(linktype: int, frame: bytes) -> bytes | None:
    if linktype == dpkt.pcap.DLT_EN10MB:
        eth = dpkt.ethernet.Ethernet(frame)
        return bytes(eth.data) if isinstance(eth.data, dpkt.ip.IP | dpkt.ip6.IP6) else None
    if linktype in (dpkt.pcap.DLT_NULL, dpkt.pcap.DLT_LOOP):
        return frame[4:]
    if linktype in (dpkt.pcap.DLT_RAW, 101, 12, 14):
        return frame
    if linktype == dpkt.pcap.DLT_LINUX_SLL:
        return frame[16:]
    if linktype == 276:  # LINKTYPE_LINUX_SLL2
        return frame[20:]
    raise ValueError(f"link type {linktype} is not handled by this test helper")


def _transport(ip: bytes, ts_ns: int) -> Packet | None:
    if not ip:
        return None
    if ip[0] >> 4 == 4:
        header = (ip[0] & 0x0F) * 4
        total = struct.unpack_from("!H", ip, 2)[0]
        protocol = ip[9]
        src, dst = str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20]))
        body, is_v6 = ip[header:total], False
    elif ip[0] >> 4 == 6:
        payload_length = struct.unpack_from("!H", ip, 4)[0]
        protocol, offset = ip[6], 40
        while protocol in _IPV6_EXTENSIONS:
            protocol, offset = ip[offset], offset + (8 if protocol == 44 else (ip[offset + 1] + 1) * 8)
        src, dst = str(ipaddress.IPv6Address(ip[8:24])), str(ipaddress.IPv6Address(ip[24:40]))
        body, is_v6 = ip[offset : 40 + payload_length], True
    else:
        return None
    if protocol == 6:
        tcp = dpkt.tcp.TCP(body)
        return Packet(ts_ns, src, dst, 6, bytes(tcp.data), is_v6, tcp.sport, tcp.dport, tcp.flags, tcp.seq)
    if protocol == 17:
        udp = dpkt.udp.UDP(body)
        return Packet(
            ts_ns, src, dst, 17, body[8 : udp.ulen] if udp.ulen >= 8 else body[8:], is_v6, udp.sport, udp.dport
        )
    if protocol in (1, 58):
        return Packet(ts_ns, src, dst, protocol, body, is_v6)
    return None


def read_packets(path: Path) -> list[Packet]:
    with path.open("rb") as handle:
        magic = handle.read(4)
        handle.seek(0)
        reader = dpkt.pcapng.Reader(handle) if magic == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(handle)
        linktype = reader.datalink()
        packets = []
        for ts, frame in reader:
            ip = _ip_layer(linktype, bytes(frame))
            packet = _transport(ip, round(float(ts) * 1e9)) if ip is not None else None
            if packet is not None:
                packets.append(packet)
        return packets


@dataclass(slots=True)
class _TcpDirection:
    next_seq: int | None = None
    pending: dict[int, bytes] = field(default_factory=dict)


@dataclass(slots=True)
class _Connection:
    flow: FlowInfo
    directions: tuple[_TcpDirection, _TcpDirection] = field(default_factory=lambda: (_TcpDirection(), _TcpDirection()))
    client_first: bytes = b""
    server_first: bytes = b""
    parser: StreamParser | None = None
    decided: bool = False


def _in_order(state: _TcpDirection, packet: Packet) -> bytes:
    """The new in-order bytes this segment makes available (retransmissions trimmed)."""
    if packet.tcp_flags & dpkt.tcp.TH_SYN:
        state.next_seq = (packet.seq + 1) & 0xFFFFFFFF
        return b""
    if not packet.payload:
        return b""
    if state.next_seq is None:
        state.next_seq = packet.seq
    state.pending[packet.seq] = packet.payload
    out = bytearray()
    progressed = True
    while progressed:
        progressed = False
        for seq in list(state.pending):
            data = state.pending[seq]
            offset = (state.next_seq - seq) & 0xFFFFFFFF
            if offset < len(data):
                del state.pending[seq]
                out += data[offset:]
                state.next_seq = (state.next_seq + len(data) - offset) & 0xFFFFFFFF
                progressed = True
            elif offset < 0x80000000:
                del state.pending[seq]  # entirely old
    return bytes(out)


def stream_calls(packets: list[Packet], spec: ProtocolSpec, limits: ParserLimits | None = None) -> list[ApiCall]:
    """Every TCP connection whose first bytes the spec's probe claims (>= 2) parsed by its parser."""
    limits = limits or ParserLimits()
    assert spec.new_stream is not None
    connections: dict[tuple[str, int, str, int], _Connection] = {}
    calls: list[ApiCall] = []
    for packet in packets:
        if packet.protocol != 6:
            continue
        forward = (packet.src, packet.sport, packet.dst, packet.dport)
        backward = (packet.dst, packet.dport, packet.src, packet.sport)
        if forward in connections:
            connection, direction = connections[forward], Direction.CLIENT_TO_SERVER
        elif backward in connections:
            connection, direction = connections[backward], Direction.SERVER_TO_CLIENT
        else:
            flow = FlowInfo("tcp", packet.src, packet.sport, packet.dst, packet.dport, node="test")
            connection, direction = _Connection(flow), Direction.CLIENT_TO_SERVER
            connections[forward] = connection
        data = _in_order(connection.directions[direction], packet)
        if not data:
            continue
        if not connection.decided:
            if direction is Direction.CLIENT_TO_SERVER:
                connection.client_first += data
            else:
                connection.server_first += data
            if spec.probe(connection.client_first, connection.server_first, connection.flow) < 2:
                connection.decided = True  # not this protocol: ignore the connection
                continue
            connection.decided = True
            connection.parser = spec.new_stream(connection.flow, limits)
            if connection.client_first:
                calls += connection.parser.feed(Direction.CLIENT_TO_SERVER, connection.client_first, packet.ts_ns)
            if connection.server_first:
                calls += connection.parser.feed(Direction.SERVER_TO_CLIENT, connection.server_first, packet.ts_ns)
            continue
        if connection.parser is not None:
            calls += connection.parser.feed(direction, data, packet.ts_ns)
    last_ts = packets[-1].ts_ns if packets else 0
    for connection in connections.values():
        if connection.parser is not None:
            calls += connection.parser.finish(last_ts)
    return calls


def datagram_calls(
    packets: list[Packet], new_parser: Callable[[FlowInfo, ParserLimits], DatagramParser], probe: Callable[..., int]
) -> list[ApiCall]:
    """Every UDP flow whose first datagram the probe claims (>= 2), parsed datagram by datagram."""
    limits = ParserLimits()
    flows: dict[tuple[str, int, str, int], tuple[DatagramParser | None, Direction]] = {}
    parsers: list[DatagramParser] = []
    calls: list[ApiCall] = []
    for packet in packets:
        if packet.protocol != 17:
            continue
        forward = (packet.src, packet.sport, packet.dst, packet.dport)
        backward = (packet.dst, packet.dport, packet.src, packet.sport)
        if forward in flows:
            parser, direction = flows[forward][0], Direction.CLIENT_TO_SERVER
        elif backward in flows:
            parser, direction = flows[backward][0], Direction.SERVER_TO_CLIENT
        else:
            flow = FlowInfo("udp", packet.src, packet.sport, packet.dst, packet.dport, node="test")
            parser = new_parser(flow, limits) if probe(packet.payload, b"", flow) >= 2 else None
            if parser is not None:
                parsers.append(parser)
            flows[forward] = (parser, Direction.CLIENT_TO_SERVER)
            direction = Direction.CLIENT_TO_SERVER
        if parser is not None:
            calls += parser.feed_datagram(direction, packet.payload, packet.ts_ns)
    for parser in parsers:
        calls += parser.finish(0)
    return calls


def dns_calls(path: Path) -> list[ApiCall]:
    packets = read_packets(path)
    return datagram_calls(packets, dns.new_datagram, dns.probe_udp) + stream_calls(packets, dns.SPEC_TCP)


def tls_calls(path: Path, limits: ParserLimits | None = None) -> list[ApiCall]:
    return stream_calls(read_packets(path), tls.SPEC, limits)


def icmp_calls(path: Path) -> list[ApiCall]:
    tracker = IcmpTracker("test", ParserLimits())
    calls: list[ApiCall] = []
    for packet in read_packets(path):
        if packet.protocol in (1, 58):
            calls += tracker.feed_packet(packet.src, packet.dst, packet.payload, packet.ts_ns, packet.is_v6)
    return calls + tracker.finish()


def tcp_connections(path: Path) -> list[list[tuple[Direction, bytes, int]]]:
    """Each TCP connection's segments as (direction, in-order bytes, ts), in capture order; the
    client is the side that sent the SYN (or the first packet)."""
    connections: dict[tuple[str, int, str, int], list[tuple[Direction, bytes, int]]] = {}
    states: dict[tuple[str, int, str, int], _TcpDirection] = {}
    for packet in read_packets(path):
        if packet.protocol != 6:
            continue
        key = (packet.src, packet.sport, packet.dst, packet.dport)
        reverse = (packet.dst, packet.dport, packet.src, packet.sport)
        if reverse in connections:
            segments, direction = connections[reverse], Direction.SERVER_TO_CLIENT
        else:
            segments, direction = connections.setdefault(key, []), Direction.CLIENT_TO_SERVER
        data = _in_order(states.setdefault(key, _TcpDirection()), packet)
        if data:
            segments.append((direction, data, packet.ts_ns))
    return [segments for segments in connections.values() if segments]


def tshark_fields(path: Path, display_filter: str, fields: list[str], *extra: str) -> list[list[str]]:
    """tshark's view: one row per matching packet, one column per field (multi-values comma-joined)."""
    command = ["tshark", "-n", "-r", str(path), *extra, "-Y", display_filter, "-T", "fields"]
    for name in fields:
        command += ["-e", name]
    command += ["-E", "occurrence=a", "-E", "aggregator=,"]
    output = subprocess.run(command, check=True, capture_output=True, text=True, timeout=60).stdout
    return [line.split("\t") for line in output.splitlines() if line.strip()]


def tcp_server_ports(path: Path) -> set[int]:
    """Ports that accepted a connection (SYN+ACK senders), for tshark decode-as rules."""
    return {packet.sport for packet in read_packets(path) if packet.protocol == 6 and packet.tcp_flags & 0x12 == 0x12}
