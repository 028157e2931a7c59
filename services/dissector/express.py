"""The compiled lane's Python side: building the lane, and taking flows back from it.

`trawl.dissector._express` (C) dissects the common cases, in-order HTTP/1.x with Content-Length
bodies, gRPC over HTTP/2 with prior knowledge (_express_h2.h), RESP2 Redis commands
(_express_redis.h), Kafka requests and responses (_express_kafka.h) and everyday DNS over UDP,
on every link type, without a Python call per packet or call.
It keeps a flow only while the flow stays that simple; the moment a packet is anything else (a
reordering, a loss, a RST or a FIN with a request outstanding, chunked or compressed bodies,
pipelining, a secret in a body, a byte it does not expect...) it gives the flow back
("demotes" it) with:

- the flow's state as of its last quiescent point (both directions between messages, no
  request pending), or none when it never reached one (then the flow is replayed from its SYN);
- copies of the flow's packets since that point, the one that caused the demotion included.

Redis, like HTTP/2, sends each call as its reply comes while others may be pending (pipelining),
with the same `emitted` ids; its state is RedisState's ordinal. Kafka does the same (a response
answers its request by correlation id, others in flight); its state is KafkaState (the ordinal and
the topic ids learnt from Metadata), and which connections it holds is the engine's own detection
asked once per connection (`first_chunk_claims`).

HTTP/2 differs in one way: calls finish while other streams are open, so its quiescent points
are frame boundaries in both directions, taken with no stream open or, on a connection with
calls always in flight, every 64 KiB of packets with the open streams in the state
(`http2.Http2StreamState`). The lane sends each call as it finishes and lists in the handover
the ids of those sent since the state (`emitted`): the replay makes them again, the same calls
with the same ids, and the engine drops them (`engine._take_back`).

DNS over UDP takes the lane too: a flow opened by a plain query (one Python's `_udp_new` would
make a DNS flow of, its sender the client) stays there while every datagram is a query from the
client or the response to a pending one that `dns._parse_common` reads; its calls leave when no
query is pending (the quiescent point, whose state is the count of calls begun). A quiet flow
idle past the UDP timeout simply ends there, as Python would end it with nothing to report.

`restore` rebuilds the Python flow from that state through the parsers' public state interface
(protocols/base.py: `TcpFlow.from_snapshot(TcpFlowState)`, `Http1Parser.restore(Http1State)`,
`Http2Parser.restore(Http2State)`;
`restore_udp`: the _UdpFlow's FlowInfo and `DnsDatagramParser.restore(DnsState)`), never by
writing their private fields, and the engine replays the packets through its ordinary path:
from then on the Python code, which stays the reference, is exactly where it would have been
had it seen every packet. The differential test
(tests/unit/test_express_differential.py) holds the two paths to identical calls and counters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trawl.dissector.config import DissectorSettings
from trawl.dissector.layers import ip_text
from trawl.dissector.protocols import dns, grpc, kafka, redis
from trawl.dissector.protocols.base import FlowInfo, ParserLimits, ProtocolSpec
from trawl.dissector.protocols.http1 import Http1Parser, Http1State
from trawl.dissector.protocols.http2 import Http2Parser, Http2State, Http2StreamState
from trawl.dissector.redact import Redactor
from trawl.dissector.tcp import HalfStreamState, TcpFlow, TcpFlowState, TcpTable
from trawl.logs import get_logger

log = get_logger(__name__)

try:
    from trawl.dissector._express import Express
except ImportError:  # pragma: no cover - the extension is built by every install
    Express = None  # type: ignore[assignment,misc]


def flow_strings(
    node: str, client_ip: bytes, client_port: int, server_ip: bytes, server_port: int
) -> tuple[str, str, bytes]:
    """A TCP flow's texts as the Python path writes them: both addresses (`ip_text`) and the
    start of the call-id hash input (`calls.new_call`). The lane writes them itself
    (`_express.flow_strings`); this is the reference its tests hold it to."""
    return _flow_strings("tcp", "http", node, client_ip, client_port, server_ip, server_port)


def dns_flow_strings(
    node: str, client_ip: bytes, client_port: int, server_ip: bytes, server_port: int
) -> tuple[str, str, bytes]:
    """`flow_strings` for a DNS-over-UDP flow."""
    return _flow_strings("udp", "dns", node, client_ip, client_port, server_ip, server_port)


def _flow_strings(
    transport: str, protocol: str, node: str, client_ip: bytes, client_port: int, server_ip: bytes, server_port: int
) -> tuple[str, str, bytes]:
    client, server = ip_text(client_ip), ip_text(server_ip)
    key = FlowInfo(transport, client, client_port, server, server_port, node).key
    return client, server, f"{node}|{key}|{protocol}|".encode()


def build_lane(
    settings: DissectorSettings, redactor: Redactor, tcp_specs: tuple[ProtocolSpec, ...] | None = None
) -> Any | None:
    """The lane for these settings, or None when it is off (or, on a broken install, missing).
    `tcp_specs` are the engine's detection probes: with them the lane holds Kafka connections
    that detection would make Kafka at their first chunk (`first_chunk_claims`)."""
    if not settings.express:
        return None
    if Express is None:
        log.warning("express_lane_missing", reason="trawl.dissector._express is not built: every packet takes Python")
        return None
    return Express(
        redactor.header_kind,
        redactor.param_is_secret,
        redactor.key_is_secret,
        None,  # flow_strings: the lane writes them itself, exactly as `flow_strings` below (tested)
        settings.max_body_bytes,
        settings.max_header_bytes,
        settings.max_flows,
        settings.express_max_retained_bytes,
        dns_flow_strings=None,
        dns_type_text=dns.type_text,
        dns_rcode_text=dns.rcode_text,
        edns_option_opaque=dns.edns_option_is_opaque,
        max_pending_requests=settings.max_pending_requests,
        # The lane's copies for a replay count against the same bound as the Python path's buffers.
        max_total_retained_bytes=settings.max_total_buffered_bytes,
        # With descriptor sets the first gRPC messages are decoded with their schema: Python's work.
        http2=not settings.proto_descriptors,
        redis_rule=redis.lane_rule,
        kafka_api=kafka.lane_api if tcp_specs else None,
        kafka_claims=first_chunk_claims(tcp_specs, kafka.PROTOCOL) if tcp_specs else None,
        kafka_errors=kafka.ERRORS if tcp_specs else None,
    )


def first_chunk_claims(specs: tuple[ProtocolSpec, ...], protocol: str) -> Callable[[bytes, str, int, str, int], bool]:
    """Whether the engine's detection (`engine._detect`) makes a flow seen from its handshake
    `protocol` as soon as the client's first chunk `data` comes, before the server says anything:
    the highest probe score, the first spec in registry order among equals, is `protocol`'s, and
    it is certain (3) or likely (2) with at least the spec's `probe_bytes`."""

    def claims(data: bytes, client_ip: str, client_port: int, server_ip: str, server_port: int) -> bool:
        info = FlowInfo("tcp", client_ip, client_port, server_ip, server_port)
        best: ProtocolSpec | None = None
        best_score = 0
        for spec in specs:
            try:
                score = spec.probe(data, b"", info)
            except Exception:
                return False  # the engine counts a failing probe: the Python path's to do
            if score > best_score:
                best, best_score = spec, score
        if best is None or best.name != protocol:
            return False
        return best_score >= 3 or (best_score == 2 and len(data) >= best.probe_bytes)

    return claims


def restore(
    table: TcpTable, handover: dict[str, Any], limits: ParserLimits
) -> tuple[TcpFlow, Http1Parser | Http2Parser | redis.RedisParser | kafka.KafkaParser, str]:
    """Rebuild a demoted flow's Python state as of its last quiescent point, through the public
    `TcpFlow.from_snapshot` and `Http1Parser.restore` (or `Http2Parser.restore` for an HTTP/2
    flow); returns the flow, its parser and the protocol's name. The caller gives the flow its
    parser (`flow.user` is the engine's)."""
    node: str = handover["node"]
    shard: int = handover["shard"]
    client_ip, client_port = handover["client"]
    server_ip, server_port = handover["server"]
    c2s_key = (node, client_ip, client_port, server_ip, server_port)
    s2c_key = (node, server_ip, server_port, client_ip, client_port)
    for key in (c2s_key, s2c_key):
        entry = table.flows.get(key)
        if entry is not None:
            table.discard(entry[0])  # a closed flow lingering on the same 4-tuple
    info = FlowInfo("tcp", ip_text(client_ip), client_port, ip_text(server_ip), server_port, node=node, shard=shard)
    state: dict[str, Any] = handover["state"]
    flow_state, http1_state = tcp_states(state)
    flow = TcpFlow.from_snapshot(info, (c2s_key, s2c_key), flow_state)
    parser: Http1Parser | Http2Parser | redis.RedisParser | kafka.KafkaParser
    if "kafka" in state:
        parser = kafka.KafkaParser(info, limits)
        parser.restore(kafka.KafkaState(ordinal=state["ordinal"], topic_names=state["kafka"]["topic_names"]))
        protocol = "kafka"
    elif "redis" in state:
        parser = redis.RedisParser(info, limits)
        parser.restore(redis.RedisState(ordinal=state["ordinal"]))
        protocol = "redis"
    elif "http2" in state:
        parser = Http2Parser(info, limits)
        parser.restore(http2_state(state["ordinal"], state["http2"]))
        protocol = "http2"
    else:
        parser = Http1Parser(info, limits)
        parser.restore(http1_state)
        protocol = "http"
    table.adopt(flow)
    return flow, parser, protocol


def tcp_states(state: dict[str, Any]) -> tuple[TcpFlowState, Http1State]:
    """The states a demoted HTTP/1 flow's handover stands for. The lane holds a flow only from
    its SYN, through a handshake it saw whole, and gives it back at a quiescent point: an
    established flow, one SYN, payload seen, nothing held out of order, nothing to report yet."""
    halves = tuple(
        HalfStreamState(next=next_seq, base=base, acked=acked, last_start=last_start, last_data=last_data)
        for next_seq, base, acked, last_start, last_data in state["halves"]
    )
    client_half, server_half = halves
    flow_state = TcpFlowState(
        halves=(client_half, server_half),
        first_ts_ns=state["first_ts_ns"],
        last_ts_ns=state["last_ts_ns"],
        syn_ts_ns=state["syn_ts_ns"],
        syn_count=1,
        synack_seen=True,
        midstream=False,
        oriented_by_handshake=True,
        payload_seen=True,
    )
    client_offset, server_offset = state["offsets"]
    return flow_state, Http1State(ordinal=state["ordinal"], offsets=(client_offset, server_offset))


def http2_state(ordinal: int, fields: dict[str, Any]) -> Http2State:
    """The Http2State a demoted HTTP/2 flow's handover stands for (_express_h2.h): a connection
    the lane held from its SYN and its preface, so nothing was ever unknown, no GOAWAY, no push;
    its open streams are gRPC calls (Http2StreamState, their readers grpc.MessageState)."""
    streams = tuple(
        Http2StreamState(
            **{name: value for name, value in stream.items() if name != "messages"},
            messages=(_message_state(stream["messages"][0]), _message_state(stream["messages"][1])),
        )
        for stream in fields["streams"]
    )
    return Http2State(
        ordinal=ordinal,
        tables=fields["tables"],
        table_sizes=fields["table_sizes"],
        allowed_table_sizes=fields["allowed_table_sizes"],
        max_frame_sizes=fields["max_frame_sizes"],
        settings=fields["settings"],
        last_stream_ids=(fields["last_client_id"], 0),
        ids_uncertain=False,
        goaways=(None, None),
        streams=streams,
    )


def _message_state(fields: tuple[Any, ...] | None) -> grpc.MessageState | None:
    if fields is None:
        return None
    messages, message_bytes, first_message, prefix, length, remaining, collected = fields
    return grpc.MessageState(messages, message_bytes, first_message, prefix, length, remaining, collected)


def dns_state(state: dict[str, Any]) -> dns.DnsState:
    """The state a demoted DNS-over-UDP flow's handover stands for: the calls begun and the
    questions answered, as of its last quiescent point (no query pending)."""
    answered = tuple(
        dns.AnsweredQuery(ident, (name.lower(), qtype, qclass), ts_ns)
        for ident, name, qtype, qclass, ts_ns in state["answered"]
    )
    return dns.DnsState(ordinal=state["ordinal"], answered=answered)


def restore_udp(handover: dict[str, Any], limits: ParserLimits) -> tuple[FlowInfo, dns.DnsDatagramParser, int]:
    """A DNS-over-UDP flow given back at a quiescent point: its FlowInfo (the client is the side
    that asked first), its parser as of then (`DnsDatagramParser.restore`), and its last
    activity; the engine makes the flow."""
    client_ip, client_port = handover["client"]
    server_ip, server_port = handover["server"]
    state: dict[str, Any] = handover["state"]
    info = FlowInfo(
        "udp", ip_text(client_ip), client_port, ip_text(server_ip), server_port, handover["node"], handover["shard"]
    )
    parser = dns.DnsDatagramParser(info, limits)
    parser.restore(dns_state(state))
    last_ts_ns: int = state["last_ts_ns"]
    return info, parser, last_ts_ns
