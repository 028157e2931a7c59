"""Bidirectional TCP reassembly with bounded memory, and TCP diagnostics as `tcp` calls.

Per flow and direction the reassembler keeps the next expected sequence number (unwrapped to
a 64-bit count, so flows past 4 GiB stay ordered) and the out-of-order segments waiting for a
hole to fill:

- retransmissions and overlaps: the first copy wins; a later copy whose overlapping bytes
  differ is counted as a conflicting overlap (`tcp_overlap_conflicts`) and reported to the
  sink with its offset in the stream (`StreamSink.stream_anomaly`), so the protocol can note it
  on the call that holds those bytes;
- gaps (capture loss) are declared when the peer acknowledges bytes that were never seen,
  when a direction buffers more than its limit, or at the flow's end; the sink is told the
  size of the hole (`StreamSink.stream_gap`) and the protocol resynchronises if it can;
- direction: the SYN (or SYN-ACK) names the client; a flow whose start was not captured is
  oriented by ports (a well-known or registered port is the server, else the lower port) and
  the engine may turn it around once content says otherwise (`TcpTable.swap`);
- limits: flows (the least recently active is evicted), bytes buffered per flow and in total;
  each hit is counted.

Diagnostics (`protocol="tcp"`, path = "client -> server", status = the count as a decimal
string): `refused` (a SYN answered by RST), `reset` (TcpDetail.reset_by and mid_stream: bytes
were unacknowledged when the RST came), `handshake-timeout` (SYN never answered within the
timeout; at the end of input only if the SYN was retransmitted or the timeout had elapsed),
`retransmission` and `zero-window` (counted per flow, emitted when the flow ends).
"""

from __future__ import annotations

import bisect
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from trawl.dissector.calls import new_call
from trawl.dissector.layers import ip_text
from trawl.dissector.protocols.base import Direction, FlowInfo, NotAtBoundary
from trawl.v1.calls_pb2 import ApiCall, Outcome

TCP_HEADER = struct.Struct("!HHIIBBH")
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT
WELL_KNOWN_PORT_LIMIT = 1024
# A closed flow stays in the table this long so late ACKs and repeated RSTs do not open a new one.
CLOSED_LINGER_NS = 2_000_000_000


class StreamSink(Protocol):
    """Where reassembled bytes go (the engine)."""

    def stream_data(self, flow: TcpFlow, direction: Direction, data: bytes, ts_ns: int) -> None: ...

    def stream_gap(self, flow: TcpFlow, direction: Direction, size: int, ts_ns: int) -> None: ...

    def stream_end(self, flow: TcpFlow, ts_ns: int) -> None: ...

    def stream_anomaly(self, flow: TcpFlow, direction: Direction, note: str, offset: int) -> None:
        """Something odd about the byte at `offset` of this direction's stream (0 = first byte)."""


@dataclass(frozen=True, slots=True)
class HalfStreamState:
    """One direction of a flow with nothing held out of order. Sequence numbers are unwrapped
    (64-bit counts, see HalfStream.unwrap), None where the direction has not synchronised yet.

    - `next`: the next expected sequence number;
    - `base`: the sequence number of the direction's first byte (stream offset 0);
    - `acked`: the highest sequence number the peer acknowledged, or None;
    - `last_start`, `last_data`: the last delivered segment, which a retransmission is
      compared with (a differing copy is a conflicting overlap);
    - `fin_at`: the sequence number of the direction's FIN once seen; `finished`: every byte
      up to it was delivered.
    """

    next: int | None
    base: int
    acked: int | None
    last_start: int = 0
    last_data: bytes = b""
    fin_at: int | None = None
    finished: bool = False


@dataclass(frozen=True, slots=True)
class TcpFlowState:
    """A TCP flow with nothing buffered out of order (what an exchange boundary needs of it).

    What a compiled lane must supply: the halves (client -> server, server -> client); the
    first and last packet times and the first SYN's; how the handshake went (`syn_count` SYNs
    from the client, `synack_seen`; `midstream` when the start was not captured,
    `oriented_by_handshake` when a SYN named the client); `payload_seen` once any byte was
    carried; the per-flow counts reported when the flow ends (`retransmissions`,
    `zero_windows`, `resets`) and which diagnostics were already reported (`rst_reported`,
    `handshake_reported`).
    """

    halves: tuple[HalfStreamState, HalfStreamState]
    first_ts_ns: int
    last_ts_ns: int
    syn_ts_ns: int = 0
    syn_count: int = 0
    synack_seen: bool = False
    midstream: bool = True
    oriented_by_handshake: bool = False
    payload_seen: bool = False
    retransmissions: int = 0
    zero_windows: int = 0
    resets: int = 0
    rst_reported: bool = False
    handshake_reported: bool = False


class HalfStream:
    """One direction of a flow."""

    __slots__ = (
        "acked",
        "base",
        "buffered",
        "fin_at",
        "finished",
        "last_data",
        "last_start",
        "next",
        "segments",
        "starts",
    )

    def __init__(self) -> None:
        self.next: int | None = None  # next expected (unwrapped) sequence number; None until synced
        self.base = 0  # sequence number of the stream's first byte (offset 0 for the parser)
        self.starts: list[int] = []  # sorted starts of buffered out-of-order segments
        self.segments: dict[int, bytes] = {}
        self.buffered = 0
        self.fin_at: int | None = None  # sequence number of the FIN, once seen
        self.finished = False  # every byte up to the FIN delivered
        self.acked: int | None = None  # highest sequence number the peer acknowledged
        self.last_start = 0  # the last delivered segment, to compare retransmissions with
        self.last_data = b""

    def unwrap(self, seq: int) -> int:
        reference = self.next if self.next is not None else seq
        return reference + ((seq - (reference & 0xFFFFFFFF) + 0x80000000) & 0xFFFFFFFF) - 0x80000000

    def snapshot(self) -> HalfStreamState:
        if self.starts:
            raise NotAtBoundary("TCP: segments are held out of order")
        return HalfStreamState(
            self.next, self.base, self.acked, self.last_start, self.last_data, self.fin_at, self.finished
        )

    @classmethod
    def from_snapshot(cls, state: HalfStreamState) -> HalfStream:
        half = cls()
        half.next = state.next
        half.base = state.base
        half.acked = state.acked
        half.last_start = state.last_start
        half.last_data = state.last_data
        half.fin_at = state.fin_at
        half.finished = state.finished
        return half


class TcpFlow:
    """State of one TCP connection; `info` orients it client -> server."""

    __slots__ = (
        "closed_ns",
        "first_ts_ns",
        "halves",
        "handshake_reported",
        "info",
        "keys",
        "last_ts_ns",
        "midstream",
        "oriented_by_handshake",
        "payload_seen",
        "resets",
        "retransmissions",
        "rst_reported",
        "syn_count",
        "syn_ts_ns",
        "synack_seen",
        "user",
        "zero_windows",
    )

    def __init__(self, info: FlowInfo, keys: tuple[tuple[object, ...], tuple[object, ...]], ts_ns: int) -> None:
        self.info = info
        self.keys = keys  # (client -> server key, server -> client key)
        self.halves = (HalfStream(), HalfStream())
        self.first_ts_ns = ts_ns
        self.last_ts_ns = ts_ns
        self.closed_ns: int | None = None
        self.midstream = True
        self.oriented_by_handshake = False
        self.syn_count = 0
        self.syn_ts_ns = 0
        self.synack_seen = False
        self.payload_seen = False
        self.retransmissions = 0
        self.zero_windows = 0
        self.resets = 0
        self.rst_reported = False
        self.handshake_reported = False
        # The engine's per-flow state (protocol parser, detection buffer).
        self.user: object = None

    @property
    def flow_text(self) -> str:
        return flow_text(self.info)

    def snapshot(self) -> TcpFlowState:
        """The flow's state; NotAtBoundary while segments are held out of order. A closed flow
        (`closed_ns`) is not one to hand on: it only lingers."""
        if self.closed_ns is not None:
            raise NotAtBoundary("TCP: the flow is closed")
        client, server = self.halves
        return TcpFlowState(
            halves=(client.snapshot(), server.snapshot()),
            first_ts_ns=self.first_ts_ns,
            last_ts_ns=self.last_ts_ns,
            syn_ts_ns=self.syn_ts_ns,
            syn_count=self.syn_count,
            synack_seen=self.synack_seen,
            midstream=self.midstream,
            oriented_by_handshake=self.oriented_by_handshake,
            payload_seen=self.payload_seen,
            retransmissions=self.retransmissions,
            zero_windows=self.zero_windows,
            resets=self.resets,
            rst_reported=self.rst_reported,
            handshake_reported=self.handshake_reported,
        )

    @classmethod
    def from_snapshot(
        cls, info: FlowInfo, keys: tuple[tuple[object, ...], tuple[object, ...]], state: TcpFlowState
    ) -> TcpFlow:
        """A flow continuing from `state` (oriented by `info`, looked up by `keys` as
        TcpTable makes them); hand it to `TcpTable.adopt`."""
        flow = cls(info, keys, state.first_ts_ns)
        flow.halves = (HalfStream.from_snapshot(state.halves[0]), HalfStream.from_snapshot(state.halves[1]))
        flow.last_ts_ns = state.last_ts_ns
        flow.syn_ts_ns = state.syn_ts_ns
        flow.syn_count = state.syn_count
        flow.synack_seen = state.synack_seen
        flow.midstream = state.midstream
        flow.oriented_by_handshake = state.oriented_by_handshake
        flow.payload_seen = state.payload_seen
        flow.retransmissions = state.retransmissions
        flow.zero_windows = state.zero_windows
        flow.resets = state.resets
        flow.rst_reported = state.rst_reported
        flow.handshake_reported = state.handshake_reported
        return flow


def endpoint_text(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def flow_text(info: FlowInfo) -> str:
    return f"{endpoint_text(info.client_ip, info.client_port)} -> {endpoint_text(info.server_ip, info.server_port)}"


class TcpTable:
    """All TCP flows of the dissector; `segment` takes one TCP segment (header + payload)."""

    def __init__(
        self,
        sink: StreamSink,
        out: list[ApiCall],
        counters: dict[str, int],
        max_flows: int = 100_000,
        max_bytes_per_flow: int = 1 << 20,
        max_total_buffered_bytes: int = 256 << 20,
        idle_timeout_ns: int = 300_000_000_000,
        handshake_timeout_ns: int = 10_000_000_000,
        server_ports: frozenset[int] = frozenset(),
        on_flow_created: Callable[[TcpFlow], None] | None = None,
    ) -> None:
        self.sink = sink
        self.out = out
        self.counters = counters
        self.max_flows = max_flows
        self.max_bytes_per_flow = max_bytes_per_flow
        self.max_total_buffered_bytes = max_total_buffered_bytes
        self.idle_timeout_ns = idle_timeout_ns
        self.handshake_timeout_ns = handshake_timeout_ns
        self.server_ports = server_ports
        self.on_flow_created = on_flow_created
        self.flows: dict[tuple[object, ...], tuple[TcpFlow, Direction]] = {}
        self.lru: OrderedDict[int, TcpFlow] = OrderedDict()
        self.total_buffered = 0
        # The LRU is in order of last activity only while packet time never goes back. Flows
        # touched by an older packet (a capture's timestamps out of order, a flow given back by
        # the compiled lane and replayed) are also kept here, by id, for `expire` to check.
        self.newest_ns = 0
        self.behind: set[int] = set()
        # Flows whose SYN has no SYN-ACK yet: their handshake timeout runs from the SYN, not from
        # their last packet, so the LRU order says nothing about them either.
        self.handshaking: set[int] = set()
        # Flows held elsewhere that count toward `max_flows` (the compiled lane's), and how to
        # get one of them back when this table is full and empty (set by the engine).
        self.lane_flows: Callable[[], int] | None = None
        self.make_room: Callable[[], None] | None = None

    def _count(self, name: str, amount: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + amount

    def __len__(self) -> int:
        return len(self.lru)

    # -- flows ---------------------------------------------------------------------------------

    def _is_server_port(self, port: int) -> bool:
        return port in self.server_ports or port < WELL_KNOWN_PORT_LIMIT

    def _full(self) -> bool:
        held = len(self.lru) + (self.lane_flows() if self.lane_flows is not None else 0)
        return held >= self.max_flows

    def _evict_for_room(self, ts_ns: int) -> None:
        if not self.lru and self.make_room is not None:
            self.make_room()  # the lane's oldest flow comes back into this table
        if not self.lru:
            return
        self._count("tcp_flows_evicted_limit")
        _, oldest = self.lru.popitem(last=False)
        self._end(oldest, ts_ns, evicting=True)

    def _new_flow(
        self, node: str, shard: int, src: bytes, sport: int, dst: bytes, dport: int, flags: int, ts_ns: int
    ) -> TcpFlow:
        if self._full():
            self._evict_for_room(ts_ns)
        if flags & SYN:
            src_is_client = not flags & ACK
        else:
            src_server = self._is_server_port(sport)
            dst_server = self._is_server_port(dport)
            src_is_client = dst_server if src_server != dst_server else sport >= dport
        if src_is_client:
            cip, cport, sip, sport_ = src, sport, dst, dport
        else:
            cip, cport, sip, sport_ = dst, dport, src, sport
        info = FlowInfo("tcp", ip_text(cip), cport, ip_text(sip), sport_, node=node, shard=shard)
        c2s_key = (node, cip, cport, sip, sport_)
        s2c_key = (node, sip, sport_, cip, cport)
        flow = TcpFlow(info, (c2s_key, s2c_key), ts_ns)
        flow.oriented_by_handshake = bool(flags & SYN)
        flow.midstream = not flags & SYN
        self.flows[c2s_key] = (flow, C2S)
        self.flows[s2c_key] = (flow, S2C)
        self.lru[id(flow)] = flow
        self._count("tcp_flows")
        if self.on_flow_created is not None:
            self.on_flow_created(flow)
        return flow

    def adopt(self, flow: TcpFlow) -> None:
        """Take in a flow built elsewhere (the compiled lane's handover; counted there). The lane
        no longer holds it, so the limit is checked as for a new flow."""
        if self._full():
            self._evict_for_room(flow.last_ts_ns)
        self.flows[flow.keys[0]] = (flow, C2S)
        self.flows[flow.keys[1]] = (flow, S2C)
        self.lru[id(flow)] = flow
        if flow.last_ts_ns < self.newest_ns:
            self.behind.add(id(flow))
        if flow.syn_count and not flow.synack_seen:
            self.handshaking.add(id(flow))
        if self.on_flow_created is not None:
            self.on_flow_created(flow)

    def discard(self, flow: TcpFlow) -> None:
        """Forget a flow without ending it (a closed one lingering on a 4-tuple taken over)."""
        self._remove(flow)

    def swap(self, flow: TcpFlow) -> None:
        """Turn a flow around (content showed the other side is the client); before any delivery."""
        info = flow.info
        flow.info = FlowInfo(
            info.transport, info.server_ip, info.server_port, info.client_ip, info.client_port, info.node, info.shard
        )
        c2s_key, s2c_key = flow.keys
        flow.keys = (s2c_key, c2s_key)
        flow.halves = (flow.halves[1], flow.halves[0])
        self.flows[s2c_key] = (flow, C2S)
        self.flows[c2s_key] = (flow, S2C)

    def _remove(self, flow: TcpFlow) -> None:
        for key in flow.keys:
            entry = self.flows.get(key)
            if entry is not None and entry[0] is flow:
                del self.flows[key]
        self.lru.pop(id(flow), None)
        self.behind.discard(id(flow))
        self.handshaking.discard(id(flow))
        for half in flow.halves:
            self.total_buffered -= half.buffered
            half.buffered = 0
            half.segments.clear()
            half.starts.clear()

    # -- segments ------------------------------------------------------------------------------

    def segment(self, node: str, shard: int, src: bytes, dst: bytes, tcp: bytes, ts_ns: int) -> None:
        if len(tcp) < 20:
            self._count("tcp_malformed")
            return
        sport, dport, seq, ack, offset_byte, flags, window = TCP_HEADER.unpack_from(tcp)
        header_len = (offset_byte >> 4) * 4
        if header_len < 20 or header_len > len(tcp):
            self._count("tcp_malformed")
            return
        entry = self.flows.get((node, src, sport, dst, dport))
        if entry is None:
            if flags & RST:
                self._count("tcp_stray_resets")
                return
            flow = self._new_flow(node, shard, src, sport, dst, dport, flags, ts_ns)
            direction = C2S if flow.keys[0] == (node, src, sport, dst, dport) else S2C
        else:
            flow, direction = entry
            if flow.closed_ns is not None:
                if flags & SYN and not flags & ACK:
                    # The 4-tuple is reused by a new connection.
                    self._remove(flow)
                    flow = self._new_flow(node, shard, src, sport, dst, dport, flags, ts_ns)
                    direction = C2S
                else:
                    if flags & RST:
                        flow.resets += 1
                    flow.last_ts_ns = ts_ns
                    return
            else:
                self.lru.move_to_end(id(flow))
        flow.last_ts_ns = ts_ns
        if ts_ns >= self.newest_ns:
            self.newest_ns = ts_ns
            if self.behind:
                self.behind.discard(id(flow))
        else:
            self.behind.add(id(flow))
        half = flow.halves[direction]
        if flags & SYN:
            self._syn(flow, half, direction, seq, flags, ts_ns)
        if flags & RST:
            self._reset(flow, direction, ts_ns)
            return
        if flags & ACK:
            peer = flow.halves[1 - direction]
            if peer.next is not None:
                acked = peer.unwrap(ack)
                if peer.acked is None or acked > peer.acked:
                    peer.acked = acked
                limit = acked if peer.fin_at is None else min(acked, peer.fin_at)
                if limit > peer.next:
                    # The peer acknowledged bytes the capture never saw: they are lost, not late.
                    self._count("tcp_acked_unseen")
                    self._flush(flow, peer, limit, ts_ns)
            if window == 0 and not flags & SYN:
                flow.zero_windows += 1
                self._count("tcp_zero_windows")
        size = len(tcp) - header_len
        if size > 0:
            flow.payload_seen = True
            start = seq + 1 if flags & SYN else seq
            if half.next is None:
                half.next = half.base = start
            self._data(flow, half, half.unwrap(start), tcp[header_len:], ts_ns)
        if flags & FIN:
            if half.next is None:
                half.next = half.base = seq
            fin_at = half.unwrap(seq + (1 if flags & SYN else 0)) + size
            if half.fin_at is None:
                half.fin_at = fin_at
            self._maybe_finish_half(flow, half, ts_ns)

    def _syn(self, flow: TcpFlow, half: HalfStream, direction: Direction, seq: int, flags: int, ts_ns: int) -> None:
        if direction == C2S and not flags & ACK:
            if flow.syn_count and half.next is not None and half.unwrap(seq) + 1 == half.next:
                flow.retransmissions += 1
                self._count("tcp_retransmissions")
            flow.syn_count += 1
            if flow.syn_count == 1:
                flow.syn_ts_ns = ts_ns
            flow.midstream = False
            if not flow.synack_seen:
                self.handshaking.add(id(flow))
        elif direction == S2C and flags & ACK:
            if flow.synack_seen:
                flow.retransmissions += 1
                self._count("tcp_retransmissions")
            flow.synack_seen = True
            self.handshaking.discard(id(flow))
        if half.next is None:
            half.next = half.base = seq + 1

    def _data(self, flow: TcpFlow, half: HalfStream, start: int, data: bytes, ts_ns: int) -> None:
        expected = half.next
        assert expected is not None
        end = start + len(data)
        if end <= expected:
            if len(data) == 1 and end == expected:
                self._count("tcp_keepalives")  # one old byte at next-1: a keep-alive probe
                return
            flow.retransmissions += 1
            self._count("tcp_retransmissions")
            self._check_conflict(flow, half, start, data)
            return
        if start < expected:
            flow.retransmissions += 1
            self._count("tcp_retransmissions")
            self._check_conflict(flow, half, start, data[: expected - start])
            data = data[expected - start :]
            start = expected
        if start == expected:
            half.next = end
            half.last_start = start
            half.last_data = data
            self.sink.stream_data(flow, self._direction(flow, half), data, ts_ns)
            if half.starts:
                self._drain(flow, half, ts_ns)
            return
        # Out of order: hold it until the hole before it fills (or is declared lost). Where it
        # overlaps segments already held, those win: only the bytes nobody holds yet are kept.
        self._count("tcp_out_of_order")
        pieces = [(start, data)]
        conflict_at: int | None = None
        for other in half.starts:
            if other >= end:
                break
            other_data = half.segments[other]
            other_end = other + len(other_data)
            if other_end <= start:
                continue
            kept: list[tuple[int, bytes]] = []
            for piece_start, piece in pieces:
                piece_end = piece_start + len(piece)
                low, high = max(piece_start, other), min(piece_end, other_end)
                if low >= high:
                    kept.append((piece_start, piece))
                    continue
                if (
                    conflict_at is None
                    and piece[low - piece_start : high - piece_start] != other_data[low - other : high - other]
                ):
                    conflict_at = low
                if piece_start < other:
                    kept.append((piece_start, piece[: other - piece_start]))
                if piece_end > other_end:
                    kept.append((other_end, piece[other_end - piece_start :]))
            pieces = kept
        if conflict_at is not None:
            self._count("tcp_overlap_conflicts")
            self.sink.stream_anomaly(flow, self._direction(flow, half), "overlap-conflict", conflict_at - half.base)
        if sum(len(piece) for _, piece in pieces) < len(data):
            flow.retransmissions += 1
            self._count("tcp_retransmissions")
        for piece_start, piece in pieces:
            bisect.insort(half.starts, piece_start)
            half.segments[piece_start] = piece
            half.buffered += len(piece)
            self.total_buffered += len(piece)
        if half.buffered > self.max_bytes_per_flow:
            self._count("tcp_flow_buffer_limit")
            self._flush(flow, half, None, ts_ns)
        elif self.total_buffered > self.max_total_buffered_bytes:
            self._count("tcp_total_buffer_limit")
            self._flush(flow, half, None, ts_ns)

    def _check_conflict(self, flow: TcpFlow, half: HalfStream, start: int, data: bytes) -> None:
        """A copy of bytes already delivered: compare it with the last delivered segment."""
        last_start, last = half.last_start, half.last_data
        low, high = max(start, last_start), min(start + len(data), last_start + len(last))
        if low < high and data[low - start : high - start] != last[low - last_start : high - last_start]:
            self._count("tcp_overlap_conflicts")
            self.sink.stream_anomaly(flow, self._direction(flow, half), "overlap-conflict", low - half.base)

    @staticmethod
    def _direction(flow: TcpFlow, half: HalfStream) -> Direction:
        # Looked up at each delivery: detection may turn the flow around (swap) in between.
        return C2S if half is flow.halves[0] else S2C

    def _drain(self, flow: TcpFlow, half: HalfStream, ts_ns: int) -> None:
        """Deliver buffered segments that are now contiguous."""
        starts, segments = half.starts, half.segments
        while starts and half.next is not None and starts[0] <= half.next:
            start = starts.pop(0)
            data = segments.pop(start)
            half.buffered -= len(data)
            self.total_buffered -= len(data)
            end = start + len(data)
            if end <= half.next:
                continue
            data = data[half.next - start :]
            half.last_start = half.next
            half.last_data = data
            half.next = end
            self.sink.stream_data(flow, self._direction(flow, half), data, ts_ns)
        self._maybe_finish_half(flow, half, ts_ns)

    def _flush(self, flow: TcpFlow, half: HalfStream, upto: int | None, ts_ns: int) -> None:
        """Declare lost every byte missing before `upto` (None: before every buffered segment)."""
        while half.next is not None:
            target = upto
            if half.starts and (target is None or half.starts[0] < target):
                target = half.starts[0]
            if target is None or target <= half.next:
                if half.starts and half.starts[0] <= half.next:
                    self._drain(flow, half, ts_ns)
                    continue
                break
            lost = target - half.next
            half.next = target
            self._count("tcp_gaps")
            self._count("tcp_gap_bytes", lost)
            self.sink.stream_gap(flow, self._direction(flow, half), lost, ts_ns)
            self._drain(flow, half, ts_ns)
        self._maybe_finish_half(flow, half, ts_ns)

    def _maybe_finish_half(self, flow: TcpFlow, half: HalfStream, ts_ns: int) -> None:
        if half.finished or half.fin_at is None or half.next is None or half.next < half.fin_at:
            return
        half.finished = True
        half.next = half.fin_at + 1
        other = flow.halves[0] if half is flow.halves[1] else flow.halves[1]
        if other.finished and flow.closed_ns is None:
            self._end(flow, ts_ns)

    # -- endings -------------------------------------------------------------------------------

    def _reset(self, flow: TcpFlow, direction: Direction, ts_ns: int) -> None:
        flow.resets += 1
        self._count("tcp_resets")
        if flow.syn_count and not flow.synack_seen and not flow.payload_seen and direction == S2C:
            self._count("tcp_refused")
            self._diagnostic(flow, "refused", flow.syn_ts_ns, 1, reset_by="server")
            flow.rst_reported = True
        elif not flow.rst_reported:
            mid_stream = any(
                half.next is not None
                and half.acked is not None
                and half.acked < half.next - (1 if half.finished else 0)
                for half in flow.halves
            ) or any(half.starts for half in flow.halves)
            self._diagnostic(
                flow, "reset", ts_ns, 1, reset_by="client" if direction == C2S else "server", mid_stream=mid_stream
            )
            flow.rst_reported = True
        self._end(flow, ts_ns)

    def _diagnostic(
        self,
        flow: TcpFlow,
        method: str,
        ts_ns: int,
        count: int,
        reset_by: str = "",
        mid_stream: bool = False,
        error: bool = True,
    ) -> None:
        ordinal = {"reset": 0, "refused": 1, "handshake-timeout": 2, "retransmission": 3, "zero-window": 4}[method]
        call = new_call(flow.info, "tcp", ts_ns, ordinal)
        call.method = method
        call.path = flow_text(flow.info)
        call.status = str(count)
        call.outcome = Outcome.OUTCOME_ERROR if error else Outcome.OUTCOME_OK
        detail = call.tcp
        detail.reset_by = reset_by
        detail.mid_stream = mid_stream
        detail.retransmissions = flow.retransmissions
        detail.zero_windows = flow.zero_windows
        self.out.append(call)

    def _end(self, flow: TcpFlow, ts_ns: int, evicting: bool = False, at_finish: bool = False) -> None:
        """The flow is over: flush what is buffered, tell the sink, report the counts."""
        if flow.closed_ns is not None:
            if evicting:
                self._remove(flow)
            return
        for half in tuple(flow.halves):  # by object: a flush may turn the flow around
            if half.starts:
                self._flush(flow, half, None, ts_ns)
        flow.closed_ns = ts_ns
        self.sink.stream_end(flow, ts_ns)
        self._report_handshake(flow, ts_ns, at_finish)
        if flow.retransmissions:
            self._diagnostic(flow, "retransmission", flow.first_ts_ns, flow.retransmissions, error=False)
        if flow.zero_windows:
            self._diagnostic(flow, "zero-window", flow.first_ts_ns, flow.zero_windows, error=False)
        if evicting:
            self._remove(flow)

    def _report_handshake(self, flow: TcpFlow, now_ns: int, at_finish: bool) -> None:
        if not flow.syn_count or flow.synack_seen or flow.resets or flow.handshake_reported:
            return
        if flow.halves[S2C].next is not None:
            return  # the server answered somehow (a capture that missed the SYN-ACK)
        waited = now_ns - flow.syn_ts_ns >= self.handshake_timeout_ns
        if waited or (at_finish and flow.syn_count > 1):
            flow.handshake_reported = True
            self._count("tcp_handshake_timeouts")
            self._diagnostic(flow, "handshake-timeout", flow.syn_ts_ns, flow.syn_count)

    def expire(self, now_ns: int) -> None:
        """Evict idle flows, drop lingering closed ones, report unanswered handshakes."""
        stale: list[TcpFlow] = []
        scanned: set[int] = set()
        for flow in self.lru.values():
            if self._is_stale(flow, now_ns):
                stale.append(flow)
                scanned.add(id(flow))
            elif now_ns - flow.last_ts_ns < min(CLOSED_LINGER_NS, self.handshake_timeout_ns):
                # The LRU order is by last activity: everything after this is younger, but for
                # the flows an older packet touched (`behind`) and those still waiting for a
                # SYN-ACK (`handshaking`), checked one by one below.
                break
        for unordered in (self.behind, self.handshaking):
            for key in list(unordered):
                held = self.lru.get(key)
                if held is None:
                    unordered.discard(key)
                elif key not in scanned and self._is_stale(held, now_ns):
                    stale.append(held)
                    scanned.add(key)
        for flow in stale:
            if flow.closed_ns is None:
                self._count("tcp_flows_evicted_idle")
            self._end(flow, now_ns, evicting=True)

    def _is_stale(self, flow: TcpFlow, now_ns: int) -> bool:
        idle = now_ns - flow.last_ts_ns
        if flow.closed_ns is not None:
            return idle >= CLOSED_LINGER_NS
        return idle >= self.idle_timeout_ns or bool(
            flow.syn_count and not flow.synack_seen and now_ns - flow.syn_ts_ns >= self.handshake_timeout_ns
        )

    def finish(self, now_ns: int, node: str | None = None, shard: int | None = None) -> None:
        """End of input: every flow ends now (only those of `node` and/or `shard` when given)."""
        for flow in list(self.lru.values()):
            info = flow.info
            if (node is None or info.node == node) and (shard is None or info.shard == shard):
                self._end(flow, max(now_ns, flow.last_ts_ns), evicting=True, at_finish=True)
