"""The dissector's domain logic, without a bus: packet batches in, `ApiCall`s out.

    dissector = Dissector(settings, node="node-1")
    calls = dissector.feed(batch)      # a PacketBatch
    calls += dissector.expire(now_ns)  # timeouts (also run by feed as packet time advances)
    calls += dissector.finish()        # end of input: every flow ends, lone requests -> no_response

Per packet: link layer -> IP (fragments reassembled) -> TCP reassembly (`tcp.TcpTable`), UDP
flows, or the ICMP tracker. A new TCP flow's first bytes are held until a protocol is decided
(`registry` probes: content first, port hints second, within `detection_window_bytes`); a flow
whose start was not captured may be turned around when its content says so. Unknown TCP flows
are still reassembled for the diagnostics (`tcp` calls) but their bytes go nowhere.

A parser that raises `ProtocolError` (or anything else: a parser bug must not stop the service)
has its flow skipped from then on; the error is counted (`parse_errors`, and the metric
`trawl_parse_errors_total{protocol}`) and logged once with the flow. Every call is redacted
before it is returned.

TLS plaintext (`feed_tls`, a `TlsChunkBatch` from the collector's eBPF uprobes) takes the same
detection and parsers as a reassembled TCP stream: its chunks are already in order, one view
per connection (when both ends are hooked, the end whose chunk came first is kept and the
other's copies are counted, `tls_chunks_peer_view`), and its calls say `capture = tls-uprobe`.

Time: "now" is packet time (the newest timestamp seen), so a replayed capture times out the
way it did live; `expire` is run from `feed` each second of packet time, and by the service
while no packets arrive.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from trawl.dissector import express
from trawl.dissector.config import DissectorSettings
from trawl.dissector.layers import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PacketDecoder, ip_text
from trawl.dissector.protobuf import DescriptorSet
from trawl.dissector.protocols import registry
from trawl.dissector.protocols.base import (
    DatagramParser,
    Direction,
    FlowInfo,
    ParserLimits,
    ProtocolError,
    ProtocolSpec,
    StreamParser,
)
from trawl.dissector.protocols.http1 import Upgrade
from trawl.dissector.redact import Redactor
from trawl.dissector.tcp import TcpFlow, TcpTable, flow_text
from trawl.logs import get_logger
from trawl.metrics import Registry
from trawl.pcap import LINKTYPE_ETHERNET, RECORD_HEADER
from trawl.v1.calls_pb2 import ApiCall
from trawl.v1.packets_pb2 import Direction as ChunkDirection
from trawl.v1.packets_pb2 import PacketBatch, TlsChunk, TlsChunkBatch

log = get_logger(__name__)

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT
SECOND_NS = 1_000_000_000
UDP_IDLE_TIMEOUT_NS = 60 * SECOND_NS
TLS_CAPTURE = "tls-uprobe"
EGRESS = ChunkDirection.DIRECTION_EGRESS
# The keys of a TLS plaintext flow's TcpFlow: it is in no TcpTable.
TLS_KEYS: tuple[tuple[object, ...], tuple[object, ...]] = ((TLS_CAPTURE,), (TLS_CAPTURE,))


class _StreamState:
    """The engine's per-TCP-flow state (TcpFlow.user)."""

    __slots__ = ("chunks", "detecting", "marks", "parser", "protocol", "sizes")

    def __init__(self) -> None:
        self.detecting = True
        # Anomalies seen before a parser existed: (direction, note, stream offset).
        self.marks: list[tuple[Direction, str, int]] = []
        self.chunks: list[tuple[Direction, bytes, int]] = []
        self.sizes = [0, 0]
        self.parser: StreamParser | None = None
        self.protocol = ""


class _TlsFlow:
    """A connection's TLS plaintext: a TcpFlow outside the TcpTable (keys TLS_KEYS), and the end
    (ip, port) whose process's chunks it takes."""

    __slots__ = ("flow", "view")

    def __init__(self, flow: TcpFlow, view: tuple[str, int]) -> None:
        self.flow = flow
        self.view = view


class _UdpFlow:
    __slots__ = ("errors", "info", "keys", "last_ts_ns", "parser", "protocol")

    def __init__(self, info: FlowInfo, keys: tuple[tuple[object, ...], tuple[object, ...]], ts_ns: int) -> None:
        self.info = info
        self.keys = keys
        self.last_ts_ns = ts_ns
        self.parser: DatagramParser | None = None
        self.protocol = ""
        self.errors = 0


class Dissector:
    """Sans-IO dissection of packet batches from any number of nodes and shards."""

    def __init__(self, settings: DissectorSettings, node: str, metrics: Registry | None = None) -> None:
        self.settings = settings
        self.node = node
        self.metrics = metrics
        self._counters: dict[str, int] = {}
        # Completed calls until the next take: ApiCall objects from the Python path, serialized
        # bytes (already redacted and counted) from the compiled lane, in completion order.
        self._out: list[Any] = []
        # How many of `_out`'s items are the compiled lane's calls (bytes, ready to leave).
        self._lane_calls = 0
        descriptors = DescriptorSet.load(settings.proto_descriptors) if settings.proto_descriptors else None
        if descriptors is not None:
            for warning in descriptors.warnings():
                log.warning("proto_descriptors_incomplete", problem=warning)
        self.limits = ParserLimits(
            grpc_descriptors=descriptors,
            max_body_bytes=settings.max_body_bytes,
            max_header_bytes=settings.max_header_bytes,
            max_pending_requests=settings.max_pending_requests,
            request_timeout_ns=int(settings.request_timeout_s * SECOND_NS),
            redact_headers=frozenset(name.lower() for name in settings.redacted_headers),
            redact_fields=frozenset(name.lower() for name in settings.redacted_fields),
        )
        self.redactor = Redactor(settings.redacted_headers, settings.redacted_fields)
        self.tcp_specs = registry.tcp_specs()
        # What takes a flow on after an accepted `Upgrade: h2c` (None until HTTP/2 is registered).
        self.h2c_spec = next((spec for spec in self.tcp_specs if spec.name == "http2"), None)
        self.udp_specs = registry.udp_specs()
        self.decoder = PacketDecoder(
            max_fragments=settings.max_ip_fragments,
            max_fragment_bytes=settings.max_ip_fragment_bytes,
            fragment_timeout_ns=int(settings.ip_fragment_timeout_s * SECOND_NS),
            counters=self._counters,
        )
        server_ports: set[int] = set()
        for spec in self.tcp_specs:
            server_ports |= spec.ports
        self.tcp = TcpTable(
            sink=self,
            out=self._out,
            counters=self._counters,
            max_flows=settings.max_flows,
            max_bytes_per_flow=settings.max_bytes_per_flow,
            max_total_buffered_bytes=settings.max_total_buffered_bytes,
            idle_timeout_ns=int(settings.flow_idle_timeout_s * SECOND_NS),
            handshake_timeout_ns=int(settings.handshake_timeout_s * SECOND_NS),
            server_ports=frozenset(server_ports),
            on_flow_created=self._flow_created,
        )
        self.udp_flows: dict[tuple[object, ...], tuple[_UdpFlow, Direction]] = {}
        self.udp_lru: OrderedDict[int, _UdpFlow] = OrderedDict()
        self.icmp: dict[str, Any] = {}
        self._icmp_errors = 0
        self.clock_ns = 0
        self._last_expire_ns = 0
        self._window = settings.detection_window_bytes
        # (node, one end, the other end, lower first) -> the connection's TLS plaintext flow.
        self.tls_flows: OrderedDict[tuple[str, str, int, str, int], _TlsFlow] = OrderedDict()
        self.lane = express.build_lane(settings, self.redactor, self.tcp_specs)
        if self.lane is not None:
            lane = self.lane
            self.tcp.lane_flows = lambda: lane.tcp_active
            self.tcp.make_room = self._room_from_lane

    # -- public API ----------------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        """Cumulative counts (packets, flows, gaps, limits hit, parse errors, calls...)."""
        snapshot = dict(self._counters)
        snapshot["tcp_flows_active"] = len(self.tcp)
        snapshot["udp_flows_active"] = len(self.udp_lru)
        snapshot["tcp_buffered_bytes"] = self.tcp.total_buffered
        snapshot["tls_flows_active"] = len(self.tls_flows)
        if self.lane is not None:
            for name, value in self.lane.counters.items():
                snapshot[name] = snapshot.get(name, 0) + value
            snapshot["tcp_flows_active"] += self.lane.tcp_active
            snapshot["udp_flows_active"] += self.lane.udp_active
        return snapshot

    def feed(self, batch: PacketBatch) -> list[ApiCall]:
        """Dissect one batch; returns the calls it completed (redacted)."""
        self._ingest(batch)
        return self._take()

    def feed_encoded(self, batch: PacketBatch) -> list[bytes]:
        """`feed`, with each call as serialized ApiCall bytes: those the compiled lane made are
        never turned into Python objects (what the dissector publishes and `trawl analyze`
        prints are bytes anyway)."""
        self._ingest(batch)
        return self._take_encoded()

    def _ingest(self, batch: PacketBatch) -> None:
        node = batch.node or self.node
        shard = batch.shard
        link_type = batch.link_type
        lane = self.lane
        if lane is not None:
            self._feed_express(lane, batch.records, link_type, batch.nanosecond, node, shard)
            return
        packets, clock = self._walk(batch.records, 0, 1 if batch.nanosecond else 1000, node, shard, link_type)
        self._count("packets", packets)
        self._advance(clock)

    def _feed_express(self, lane: Any, records: bytes, link_type: int, nanosecond: bool, node: str, shard: int) -> None:
        """The compiled lane takes the packets of the flows it holds; the rest comes back as work
        for the Python path, in order: single frames, flows it gave back (with the packets to
        replay), a damaged tail to walk, and the calls the lane completed, in line so that calls
        leave in the order of their last packets whichever path made them."""
        work, _, newest, others = lane.feed(
            records, link_type, nanosecond, node, shard, self.tcp.flows, self.udp_flows, len(self.udp_lru)
        )
        clock = max(self.clock_ns, newest)
        out = self._out
        if not others:  # only calls (serialized, redacted and counted by the lane): taken at once
            out.extend(work)
            self._lane_calls += len(work)
            self._count("packets", 0)
            self._advance(clock)
            return
        packets = 0
        frame = self._frame
        for item in work:
            if type(item) is bytes:
                out.append(item)
                self._lane_calls += 1
                continue
            kind = item[0]
            if kind == 0:
                packets += 1
                frame(records, item[1], item[2], item[3], node, shard, link_type)
            elif kind == 1:
                packets += self._take_back(item[1])
            else:
                walked, newest = self._walk(records, item[1], 1 if nanosecond else 1000, node, shard, link_type)
                packets += walked
                clock = max(clock, newest)
        self._count("packets", packets)
        self._advance(clock)

    def feed_tls(self, batch: TlsChunkBatch) -> list[ApiCall]:
        """Dissect one batch of TLS plaintext chunks; returns the calls it completed (redacted)."""
        self._ingest_tls(batch)
        return self._take()

    def feed_tls_encoded(self, batch: TlsChunkBatch) -> list[bytes]:
        self._ingest_tls(batch)
        return self._take_encoded()

    def _ingest_tls(self, batch: TlsChunkBatch) -> None:
        node = batch.node or self.node
        clock = self.clock_ns
        for chunk in batch.chunks:
            self._tls_chunk(node, chunk)
            if chunk.ts_ns > clock:
                clock = chunk.ts_ns
        self._count("tls_chunks", len(batch.chunks))
        self._advance(clock)

    def finish_tls_encoded(self) -> list[bytes]:
        """Every TLS plaintext flow ends (this replica stops taking the chunks), counted."""
        now = self.clock_ns
        self._count("tls_flows_ended_by_handover", len(self.tls_flows))
        while self.tls_flows:
            self._tls_end(self.tls_flows.popitem(last=False)[1], now)
        return self._take_encoded()

    def _tls_chunk(self, node: str, chunk: TlsChunk) -> None:
        sender = (chunk.src_ip, chunk.src_port)
        receiver = (chunk.dst_ip, chunk.dst_port)
        local = sender if chunk.direction == EGRESS else receiver
        low, high = (sender, receiver) if sender <= receiver else (receiver, sender)
        key = (node, low[0], low[1], high[0], high[1])
        ts_ns = chunk.ts_ns
        entry = self.tls_flows.get(key)
        if entry is None:
            if len(self.tls_flows) >= self.settings.max_flows:
                self._count("tls_flows_evicted_limit")
                _, oldest = self.tls_flows.popitem(last=False)
                self._tls_end(oldest, ts_ns)
            # The writer of the first bytes is taken for the client; detection turns the flow
            # around when the content says otherwise (a server that speaks first).
            info = FlowInfo("tcp", chunk.src_ip, chunk.src_port, chunk.dst_ip, chunk.dst_port, node, 0)
            flow = TcpFlow(info, TLS_KEYS, ts_ns)
            flow.midstream = False
            flow.user = _StreamState()
            entry = self.tls_flows[key] = _TlsFlow(flow, local)
            self._count("tls_flows")
        elif entry.view != local:
            self._count("tls_chunks_peer_view")
            return
        else:
            self.tls_flows.move_to_end(key)
        flow = entry.flow
        flow.last_ts_ns = ts_ns
        info = flow.info
        direction = C2S if sender == (info.client_ip, info.client_port) else S2C
        start = len(self._out)
        if chunk.data:
            self.stream_data(flow, direction, chunk.data, ts_ns)
        if chunk.truncated:
            self._count("tls_truncated_bytes", chunk.truncated)
            self.stream_gap(flow, direction, chunk.truncated, ts_ns)
        self._tls_mark(start)

    def _tls_end(self, entry: _TlsFlow, ts_ns: int) -> None:
        start = len(self._out)
        self.stream_end(entry.flow, ts_ns)
        self._tls_mark(start)

    def _tls_mark(self, start: int) -> None:
        """The calls a TLS flow just completed (from `start` in `_out`) say how they were captured."""
        for item in self._out[start:]:
            if type(item) is not bytes:
                item.capture = TLS_CAPTURE

    def _expire_tls(self, now_ns: int) -> None:
        idle_ns = self.tcp.idle_timeout_ns
        for key, entry in list(self.tls_flows.items()):
            flow = entry.flow
            if now_ns - flow.last_ts_ns >= idle_ns:
                del self.tls_flows[key]
                self._tls_end(entry, now_ns)
                continue
            state: _StreamState = flow.user  # type: ignore[assignment]
            if state.parser is None:
                continue
            start = len(self._out)
            if not self._guard(state.protocol, flow_text(flow.info), state.parser.expire, now_ns):
                self._parser_counts(state.parser)
                state.parser = None
            self._tls_mark(start)

    def _swap(self, flow: TcpFlow) -> None:
        """Turn a flow around before any delivery: a packet flow in its table, a TLS flow in place."""
        if flow.keys is not TLS_KEYS:
            self.tcp.swap(flow)
            return
        info = flow.info
        flow.info = FlowInfo(
            info.transport, info.server_ip, info.server_port, info.client_ip, info.client_port, info.node, info.shard
        )
        flow.halves = (flow.halves[1], flow.halves[0])

    def _walk(self, records: bytes, offset: int, scale: int, node: str, shard: int, link_type: int) -> tuple[int, int]:
        """Every pcap record of `records` from `offset` through the Python path; returns the
        packets seen and the newest timestamp."""
        unpack = RECORD_HEADER.unpack_from
        frame = self._frame
        end = len(records)
        packets = 0
        clock = self.clock_ns
        while offset < end:
            if offset + 16 > end:
                self._count("malformed_batches")
                break
            seconds, frac, incl, _ = unpack(records, offset)
            offset += 16
            if offset + incl > end:
                self._count("malformed_batches")
                break
            ts_ns = seconds * SECOND_NS + frac * scale
            packets += 1
            if ts_ns > clock:
                clock = ts_ns
            frame(records, offset, offset + incl, ts_ns, node, shard, link_type)
            offset += incl
        return packets, clock

    def _frame(self, records: bytes, start: int, end: int, ts_ns: int, node: str, shard: int, link_type: int) -> None:
        """One frame, records[start:end], through the Python path."""
        # Fast path for the common frame (Ethernet, IPv4 without options or fragments, TCP):
        # no copy of the frame, no decoder call. Anything else takes the general decoder.
        if (
            link_type == LINKTYPE_ETHERNET
            and end - start >= 54
            and records[start + 12] == 8
            and records[start + 13] == 0
            and records[start + 14] == 0x45
            and records[start + 23] == PROTO_TCP
            and not (records[start + 20] & 0x3F or records[start + 21])
        ):
            ip_end = start + 14 + ((records[start + 16] << 8) | records[start + 17])
            if start + 54 <= ip_end <= end:
                self.tcp.segment(
                    node,
                    shard,
                    records[start + 26 : start + 30],
                    records[start + 30 : start + 34],
                    records[start + 34 : ip_end],
                    ts_ns,
                )
                return
        packet = self.decoder.decode(link_type, records[start:end], ts_ns)
        if packet is None:
            return
        proto = packet.proto
        if proto == PROTO_TCP:
            self.tcp.segment(node, shard, packet.src, packet.dst, packet.payload, ts_ns)
        elif proto == PROTO_UDP:
            self._udp(node, shard, packet.src, packet.dst, packet.payload, ts_ns)
        elif proto in (PROTO_ICMP, PROTO_ICMPV6):
            self._icmp(node, shard, packet.src, packet.dst, packet.payload, ts_ns, packet.version == 6)
        else:
            self._count("other_ip_protocols")

    def _take_back(self, handover: dict[str, Any]) -> int:
        """A flow the compiled lane gave back: rebuild it (or not: replayed from its SYN), then
        replay its packets; returns how many."""
        if handover["transport"] == "udp":
            if handover["state"] is not None:
                self._udp_restore(handover)
        elif handover["state"] is not None:
            flow, parser, protocol = express.restore(self.tcp, handover, self.limits)
            state: _StreamState = flow.user  # type: ignore[assignment]
            state.detecting = False
            state.parser = parser
            state.protocol = protocol
        node, shard, link_type = handover["node"], handover["shard"], handover["link_type"]
        frames = handover["records"]
        frame = self._frame
        out = self._out
        start = len(out)
        for data, ts_ns in frames:
            frame(data, 0, len(data), ts_ns, node, shard, link_type)
        emitted = handover.get("emitted")
        if emitted:
            # An HTTP/2 flow's lane sent these calls already (redacted and counted there); the
            # replay from its last snapshot makes them again, the same calls with the same ids.
            sent = set(emitted)
            out[start:] = [call for call in out[start:] if type(call) is bytes or call.id not in sent]
        return len(frames)

    def _udp_restore(self, handover: dict[str, Any]) -> None:
        """A DNS-over-UDP flow given back by the lane, as of its last quiescent point."""
        info, parser, last_ts_ns = express.restore_udp(handover, self.limits)
        node = handover["node"]
        client_ip, client_port = handover["client"]
        server_ip, server_port = handover["server"]
        c2s_key = (node, client_ip, client_port, server_ip, server_port)
        s2c_key = (node, server_ip, server_port, client_ip, client_port)
        for key in (c2s_key, s2c_key):
            entry = self.udp_flows.get(key)
            if entry is not None:
                self._udp_remove(entry[0])  # as TcpTable.discard in express.restore: never expected
        flow = _UdpFlow(info, (c2s_key, s2c_key), last_ts_ns)
        flow.parser = parser
        flow.protocol = "dns"
        self.udp_flows[c2s_key] = (flow, C2S)
        self.udp_flows[s2c_key] = (flow, S2C)
        self.udp_lru[id(flow)] = flow

    def _room_from_lane(self) -> None:
        """The flow table is full and the Python side holds no flow: the lane gives back its
        least recently active one, which the table then evicts like any other."""
        assert self.lane is not None
        handover = self.lane.demote_oldest()
        if handover is not None:
            self._count("packets", self._take_back(handover))

    def _advance(self, clock: int) -> None:
        self.clock_ns = clock
        if clock - self._last_expire_ns >= SECOND_NS:
            self._expire(clock)

    def expire(self, now_ns: int) -> list[ApiCall]:
        """Time out requests and flows as of `now_ns` (packet time)."""
        self._expire(now_ns)
        return self._take()

    def expire_encoded(self, now_ns: int) -> list[bytes]:
        self._expire(now_ns)
        return self._take_encoded()

    def finish(self, node: str | None = None, shard: int | None = None) -> list[ApiCall]:
        """End of input; see `_end_input`."""
        self._end_input(node, shard)
        return self._take()

    def finish_encoded(self, node: str | None = None, shard: int | None = None) -> list[bytes]:
        self._end_input(node, shard)
        return self._take_encoded()

    def _end_input(self, node: str | None, shard: int | None) -> None:
        """End of input: every flow ends, pending requests become `no_response`.

        With `node` and/or `shard`, only the TCP and UDP flows of that node/shard end (one shard's
        input ended, or this replica gave the shard to another). ICMP state is kept per node,
        across shards: it ends with `node` alone (all of that node's input ended), and is left to
        its timeouts when a single shard ends.
        """
        now = self.clock_ns
        if self.lane is not None:
            self._count("packets", sum(self._take_back(handover) for handover in self.lane.demote_all(node, shard)))
        if node is not None or shard is not None:
            self.tcp.finish(now, node, shard)
            for udp in [
                udp
                for udp in self.udp_lru.values()
                if (node is None or udp.info.node == node) and (shard is None or udp.info.shard == shard)
            ]:
                self._udp_end(udp, now)
                self._udp_remove(udp)
            tracker = self.icmp.pop(node, None) if node is not None and shard is None else None
            if tracker is not None:
                self._guard("icmp", "icmp", tracker.finish)
            if node is not None and shard is None:
                # TLS plaintext has no shard: its flows end with all of their node's input.
                for key in [key for key in self.tls_flows if key[0] == node]:
                    self._tls_end(self.tls_flows.pop(key), now)
            return
        self.tcp.finish(now)
        while self.tls_flows:
            self._tls_end(self.tls_flows.popitem(last=False)[1], now)
        for flow in list(self.udp_lru.values()):
            self._udp_end(flow, now)
        self.udp_flows.clear()
        self.udp_lru.clear()
        for tracker in self.icmp.values():
            self._guard("icmp", "icmp", tracker.finish)

    # -- shared helpers ------------------------------------------------------------------------

    def _count(self, name: str, amount: int = 1) -> None:
        self._counters[name] = self._counters.get(name, 0) + amount

    def _take(self) -> list[ApiCall]:
        """The calls completed since the last take, redacted, as Python objects."""
        parse = ApiCall.FromString
        return [parse(item) if type(item) is bytes else item for item in self._drain()]

    def _take_encoded(self) -> list[bytes]:
        """`_take`, as serialized ApiCalls."""
        lane_only = len(self._out) == self._lane_calls
        items = self._drain()
        if lane_only:
            return items
        return [item if type(item) is bytes else item.SerializeToString() for item in items]

    def _drain(self) -> list[Any]:
        """Empty `_out`, redacting and counting the Python path's calls (the lane's bytes are
        redacted and counted already)."""
        out = self._out
        if not out:
            return []
        items = list(out)
        out.clear()  # the TcpTable appends to this same list
        lane_calls = self._lane_calls
        self._lane_calls = 0
        # Only the lane puts bytes in `_out`, each counted: as many items as that are all its calls.
        if len(items) == lane_calls:
            return items
        apply = self.redactor.apply
        counters = self._counters
        for item in items:
            if type(item) is bytes:
                continue
            apply(item)
            key = "calls_" + item.protocol
            counters[key] = counters.get(key, 0) + 1
            counters["calls"] = counters.get("calls", 0) + 1
        return items

    def _parse_error(self, protocol: str, where: str, exc: BaseException, log_it: bool = True) -> None:
        self._count("parse_errors")
        if self.metrics is not None:
            self.metrics.counter("trawl_parse_errors_total", "Flows skipped because a parser failed").inc(
                protocol=protocol
            )
        if not log_it:
            return
        if isinstance(exc, ProtocolError):
            log.warning("parse_error", protocol=protocol, flow=where, error=str(exc))
        else:
            self._count("parser_bugs")
            log.error("parser_failed", protocol=protocol, flow=where, error=repr(exc), exc_info=exc)

    def _guard(self, protocol: str, where: str, action: Callable[..., list[ApiCall]], *args: Any) -> bool:
        """Run one parser call; False (counted, logged) when it failed."""
        try:
            calls = action(*args)
        except Exception as exc:  # ProtocolError, or a parser bug: neither may stop the service
            self._parse_error(protocol, where, exc)
            return False
        if calls:
            self._out.extend(calls)
        return True

    def _expire(self, now_ns: int) -> None:
        self._last_expire_ns = now_ns
        if self.lane is not None:
            # Flows the lane holds are simple, but their timeouts are the Python path's to call.
            given_back = self.lane.demote_stale(
                now_ns,
                self.tcp.idle_timeout_ns,
                self.limits.request_timeout_ns,
                self.tcp.handshake_timeout_ns,
                UDP_IDLE_TIMEOUT_NS,
            )
            self._count("packets", sum(self._take_back(handover) for handover in given_back))
        self.decoder.fragments.expire(now_ns)
        self.tcp.expire(now_ns)
        for flow in self.tcp.lru.values():
            state = flow.user
            if not isinstance(state, _StreamState) or state.parser is None:
                continue
            if not self._guard(state.protocol, flow_text(flow.info), state.parser.expire, now_ns):
                self._parser_counts(state.parser)
                state.parser = None
        if self.tls_flows:
            self._expire_tls(now_ns)
        stale: list[_UdpFlow] = []
        for udp in self.udp_lru.values():
            if now_ns - udp.last_ts_ns >= UDP_IDLE_TIMEOUT_NS:
                stale.append(udp)
            elif udp.parser is not None and not self._guard(
                udp.protocol, flow_text(udp.info), udp.parser.expire, now_ns
            ):
                self._parser_counts(udp.parser)
                udp.parser = None
        for udp in stale:
            self._udp_end(udp, now_ns)
            self._udp_remove(udp)
        for tracker in self.icmp.values():
            self._guard("icmp", "icmp", tracker.expire, now_ns)

    # -- TCP: the StreamSink the TcpTable calls ------------------------------------------------

    def _flow_created(self, flow: TcpFlow) -> None:
        flow.user = _StreamState()

    def stream_data(self, flow: TcpFlow, direction: Direction, data: bytes, ts_ns: int) -> None:
        state: _StreamState = flow.user  # type: ignore[assignment]
        parser = state.parser
        if parser is not None:
            try:
                calls = parser.feed(direction, data, ts_ns)
            except Exception as exc:  # as in _guard, inlined on the per-segment path
                self._parser_failed(flow, state, exc)
                return
            if calls:
                self._out.extend(calls)
                if state.protocol == "http" and parser.upgrade is not None:  # type: ignore[attr-defined]
                    self._upgrade(flow, state, parser.upgrade, ts_ns)  # type: ignore[attr-defined]
        elif state.detecting:
            state.chunks.append((direction, data, ts_ns))
            state.sizes[direction] += len(data)
            self._detect(flow, state, final=False)

    def _upgrade(self, flow: TcpFlow, state: _StreamState, upgrade: Upgrade, ts_ns: int) -> None:
        """The server accepted `Upgrade: h2c`: the HTTP/1 parser is done with the flow and the
        HTTP/2 parser takes it on, with the upgrade request as stream 1 and the bytes each side
        sent after the HTTP/1 messages."""
        old = state.parser
        if old is not None:
            self._parser_counts(old)
        where = flow_text(flow.info)
        if self.h2c_spec is None or self.h2c_spec.new_stream is None:
            state.parser = None
            return
        try:
            parser = self.h2c_spec.new_stream(flow.info, self.limits)
            parser.start_upgraded(  # type: ignore[attr-defined]
                upgrade.request_headers,
                upgrade.request_ts_ns,
                upgrade.request_end_ts_ns,
                upgrade.request_size,
                upgrade.settings,
            )
        except Exception as exc:
            state.parser = None
            self._parse_error("http2", where, exc)
            return
        state.parser = parser
        state.protocol = "http2"
        self._count("tcp_flows_h2c")
        for direction, rest in ((C2S, upgrade.client_rest), (S2C, upgrade.server_rest)):
            if rest and state.parser is parser:
                self.stream_data(flow, direction, rest, ts_ns)

    def stream_gap(self, flow: TcpFlow, direction: Direction, size: int, ts_ns: int) -> None:
        state: _StreamState = flow.user  # type: ignore[assignment]
        if state.detecting and self._detect(flow, state, final=True):
            direction = direction.reverse  # the flow was just turned around
        parser = state.parser
        if parser is not None:
            try:
                calls = parser.gap(direction, size, ts_ns)
            except Exception as exc:
                self._parser_failed(flow, state, exc)
                return
            if calls:
                self._out.extend(calls)

    def stream_end(self, flow: TcpFlow, ts_ns: int) -> None:
        state: _StreamState = flow.user  # type: ignore[assignment]
        if state.detecting:
            self._detect(flow, state, final=True)
        parser = state.parser
        if parser is not None:
            state.parser = None
            self._guard(state.protocol, flow_text(flow.info), parser.finish, ts_ns)
            self._parser_counts(parser)

    def stream_anomaly(self, flow: TcpFlow, direction: Direction, note: str, offset: int) -> None:
        """Hand a reassembly anomaly to parsers that can place it on a call (an optional
        `mark(direction, offset, note)` method); others only see it counted."""
        state: _StreamState = flow.user  # type: ignore[assignment]
        if state.detecting:
            if len(state.marks) < 64:
                state.marks.append((direction, note, offset))
            return
        mark = getattr(state.parser, "mark", None)
        if mark is not None:
            self._guard(state.protocol, flow_text(flow.info), mark, direction, offset, note)

    def _parser_failed(self, flow: TcpFlow, state: _StreamState, exc: BaseException) -> None:
        parser = state.parser
        state.parser = None
        self._parse_error(state.protocol, flow_text(flow.info), exc)
        if parser is not None:
            self._parser_counts(parser)
            # What the parser completed before the bad bytes still counts (lone requests -> no_response).
            try:
                calls = parser.finish(flow.last_ts_ns)
            except Exception:
                return
            for call in calls:
                call.notes.append("parse-error")
            self._out.extend(calls)

    def _detect(self, flow: TcpFlow, state: _StreamState, final: bool) -> bool:
        """Decide the flow's protocol if its first bytes allow; True if it turned the flow around."""
        client = b"".join(chunk for direction, chunk, _ in state.chunks if direction == C2S)
        server = b"".join(chunk for direction, chunk, _ in state.chunks if direction == S2C)
        info = flow.info
        swapped_info = FlowInfo(
            info.transport, info.server_ip, info.server_port, info.client_ip, info.client_port, info.node, info.shard
        )
        best: ProtocolSpec | None = None
        best_score = 0
        best_swapped = False
        for spec in self.tcp_specs:
            score = self._probe(spec, client, server, info)
            if score > best_score:
                best, best_score, best_swapped = spec, score, False
            if not flow.oriented_by_handshake:
                score = self._probe(spec, server, client, swapped_info)
                if score > best_score:
                    best, best_score, best_swapped = spec, score, True
        full = state.sizes[0] + state.sizes[1] >= self._window
        # A TLS flow is oriented by its first writer alone (no SYN). While one side alone has
        # spoken and the best protocol reads those bytes alike either way round, the other
        # side's first bytes decide: an HTTP/2 server sends its SETTINGS as the handshake ends,
        # racing the client's preface, and taken for the client it made the parser refuse the
        # preface and drop every call of the connection.
        if (
            flow.keys is TLS_KEYS
            and best is not None
            and best_score < 3
            and 0 in state.sizes
            and not (final or full)
            and self._probe(best, client, server, info) == self._probe(best, server, client, swapped_info)
        ):
            return False
        if best_score >= 3:
            pass
        elif best_score == 2 and best is not None:
            if not (final or full or all(size >= best.probe_bytes for size in state.sizes if size)):
                return False
        elif not (final or full):
            return False
        state.detecting = False
        chunks, marks = state.chunks, state.marks
        state.chunks, state.marks = [], []
        if best is None or best.new_stream is None:
            self._count("tcp_flows_unknown")
            return False
        if best_swapped:
            self._swap(flow)
            self._count("tcp_flows_turned_by_content")
            chunks = [(direction.reverse, data, ts) for direction, data, ts in chunks]
        where = flow_text(flow.info)
        try:
            parser = best.new_stream(flow.info, self.limits)
        except Exception as exc:
            self._parse_error(best.name, where, exc)
            return best_swapped
        state.parser = parser
        state.protocol = best.name
        self._count("tcp_flows_" + best.name)
        mark = getattr(parser, "mark", None)
        if mark is not None:
            for direction, note, offset in marks:
                self._guard(best.name, where, mark, direction.reverse if best_swapped else direction, offset, note)
        if flow.midstream and chunks:
            first_ts = chunks[0][2]
            for direction in (C2S, S2C):
                if not self._guard(best.name, where, parser.gap, direction, 0, first_ts):
                    state.parser = None
                    return best_swapped
        for direction, data, ts in chunks:
            self.stream_data(flow, direction, data, ts)
            if state.parser is not parser:
                break  # the parser failed on these bytes
        return best_swapped

    def _probe(self, spec: ProtocolSpec, client: bytes, server: bytes, info: FlowInfo) -> int:
        try:
            return spec.probe(client, server, info)
        except Exception as exc:
            self._parse_error(spec.name, flow_text(info), exc)
            return 0

    # -- UDP -----------------------------------------------------------------------------------

    def _udp(self, node: str, shard: int, src: bytes, dst: bytes, payload: bytes, ts_ns: int) -> None:
        if len(payload) < 8:
            self._count("udp_malformed")
            return
        sport = (payload[0] << 8) | payload[1]
        dport = (payload[2] << 8) | payload[3]
        length = (payload[4] << 8) | payload[5]
        data = payload[8:length] if 8 <= length <= len(payload) else payload[8:]
        key = (node, src, sport, dst, dport)
        entry = self.udp_flows.get(key)
        if entry is None:
            flow, direction = self._udp_new(node, shard, src, sport, dst, dport, data, ts_ns)
        else:
            flow, direction = entry
            self.udp_lru.move_to_end(id(flow))
        flow.last_ts_ns = ts_ns
        parser = flow.parser
        if parser is None:
            return
        try:
            calls = parser.feed_datagram(direction, data, ts_ns)
        except ProtocolError as exc:
            # One bad datagram does not poison a UDP flow: each datagram stands alone. Each is
            # counted; the flow is logged once.
            self._parse_error(flow.protocol, flow_text(flow.info), exc, log_it=not flow.errors)
            flow.errors += 1
            return
        except Exception as exc:
            self._parse_error(flow.protocol, flow_text(flow.info), exc)
            flow.parser = None
            self._parser_counts(parser)
            return
        if calls:
            self._out.extend(calls)

    def _udp_new(
        self, node: str, shard: int, src: bytes, sport: int, dst: bytes, dport: int, data: bytes, ts_ns: int
    ) -> tuple[_UdpFlow, Direction]:
        lane = self.lane
        if len(self.udp_lru) + (lane.udp_active if lane is not None else 0) >= self.settings.max_flows:
            self._count("udp_flows_evicted_limit")
            self._udp_evict_oldest(ts_ns)
        src_ip, dst_ip = ip_text(src), ip_text(dst)
        as_client = FlowInfo("udp", src_ip, sport, dst_ip, dport, node, shard)
        as_server = FlowInfo("udp", dst_ip, dport, src_ip, sport, node, shard)
        best: ProtocolSpec | None = None
        best_score = 0
        src_is_client = True
        for spec in self.udp_specs:
            score = self._probe(spec, data, b"", as_client)
            if score > best_score:
                best, best_score, src_is_client = spec, score, True
            score = self._probe(spec, b"", data, as_server)
            if score > best_score:
                best, best_score, src_is_client = spec, score, False
        if best is None:
            # Unknown: orient by ports, as TCP does.
            src_is_client = not (sport < dport and sport < 1024)
        info = as_client if src_is_client else as_server
        c2s_key = (node, src, sport, dst, dport) if src_is_client else (node, dst, dport, src, sport)
        s2c_key = (c2s_key[0], c2s_key[3], c2s_key[4], c2s_key[1], c2s_key[2])
        flow = _UdpFlow(info, (c2s_key, s2c_key), ts_ns)
        if best is not None and best.new_datagram is not None:
            try:
                flow.parser = best.new_datagram(info, self.limits)
                flow.protocol = best.name
                self._count("udp_flows_" + best.name)
            except Exception as exc:
                self._parse_error(best.name, flow_text(info), exc)
        else:
            self._count("udp_flows_unknown")
        self.udp_flows[c2s_key] = (flow, C2S)
        self.udp_flows[s2c_key] = (flow, S2C)
        self.udp_lru[id(flow)] = flow
        self._count("udp_flows")
        return flow, C2S if src_is_client else S2C

    def _udp_evict_oldest(self, ts_ns: int) -> None:
        """The least recently active UDP flow ends, whichever path holds it (the lane gives it
        back first)."""
        oldest = next(iter(self.udp_lru.values()), None)
        if self.lane is not None and self.lane.udp_active:
            handover = self.lane.demote_oldest(True, None if oldest is None else oldest.last_ts_ns)
            if handover is not None:
                self._count("packets", self._take_back(handover))
                node = handover["node"]
                entry = self.udp_flows.get((node, *handover["client"], *handover["server"]))
                oldest = entry[0] if entry is not None else None
        if oldest is not None:
            self._udp_end(oldest, ts_ns)
            self._udp_remove(oldest)

    def _udp_end(self, flow: _UdpFlow, ts_ns: int) -> None:
        parser = flow.parser
        if parser is not None:
            flow.parser = None
            self._guard(flow.protocol, flow_text(flow.info), parser.finish, ts_ns)
            self._parser_counts(parser)

    def _parser_counts(self, parser: object) -> None:
        """A parser that is done adds what it counted without making calls (its optional
        `counts`, e.g. DNS duplicate responses)."""
        counts: dict[str, int] | None = getattr(parser, "counts", None)
        if counts:
            for name, value in counts.items():
                self._count(name, value)

    def _udp_remove(self, flow: _UdpFlow) -> None:
        for key in flow.keys:
            entry = self.udp_flows.get(key)
            if entry is not None and entry[0] is flow:
                del self.udp_flows[key]
        self.udp_lru.pop(id(flow), None)

    # -- ICMP ----------------------------------------------------------------------------------

    def _icmp(self, node: str, shard: int, src: bytes, dst: bytes, payload: bytes, ts_ns: int, is_v6: bool) -> None:
        tracker = self.icmp.get(node)
        if tracker is None:
            tracker = self.icmp[node] = registry.ICMP(node, self.limits)
        try:
            calls = tracker.feed_packet(ip_text(src), ip_text(dst), payload, ts_ns, is_v6)
        except Exception as exc:
            # ICMP has no flow to skip: every bad packet is counted, the first few are logged.
            self._icmp_errors += 1
            self._parse_error("icmp", f"{ip_text(src)} -> {ip_text(dst)}", exc, log_it=self._icmp_errors <= 10)
            return
        for call in calls:
            call.shard = shard
        self._out.extend(calls)
