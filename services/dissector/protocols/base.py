"""The one small interface every protocol module implements (sans-IO, h11-style).

A protocol module knows nothing of NATS, sockets or capture: the engine hands it the bytes
of one flow, with direction and timestamp, and it returns finished `ApiCall`s (a request
paired with its response, a lone request that timed out, a one-way message). Pairing lives
in the module because only the protocol knows its rule (HTTP/1 in order, DNS by id, Kafka by
correlation id...).

Registration: each module defines one `ProtocolSpec` and is listed in `registry.py`.
Detection is by content first (`probe` on the first bytes of each direction), port hints
second, so HTTP on port 9999 is still HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

from trawl.v1.calls_pb2 import ApiCall

if TYPE_CHECKING:
    from trawl.dissector.protobuf import DescriptorSet


class Direction(IntEnum):
    """Which way bytes travel: from the side that opened the flow (client) or back."""

    CLIENT_TO_SERVER = 0
    SERVER_TO_CLIENT = 1

    @property
    def reverse(self) -> Direction:
        return Direction(1 - self.value)


class ProtocolError(Exception):
    """The one error type a parser raises for bytes it cannot parse; the engine counts it,
    logs the flow once, and stops feeding that flow to the parser."""


class NotAtBoundary(Exception):
    """`snapshot()` was asked of a parser (or TCP flow) that is not at an exchange boundary:
    something is buffered or pending, so no small state could stand for it."""


@dataclass(frozen=True, slots=True)
class FlowInfo:
    """Who talks to whom, as the engine resolved it (client = the side that opened the flow)."""

    transport: str  # "tcp" or "udp"
    client_ip: str
    client_port: int
    server_ip: str
    server_port: int
    node: str = ""
    shard: int = 0

    @property
    def key(self) -> str:
        return f"{self.transport}:{self.client_ip}:{self.client_port}-{self.server_ip}:{self.server_port}"


@dataclass(frozen=True, slots=True)
class ParserLimits:
    """Bounds every parser honours, and what else of the dissector's config parsers read."""

    max_body_bytes: int = 64 * 1024
    max_header_bytes: int = 64 * 1024
    max_pending_requests: int = 1024
    request_timeout_ns: int = 30_000_000_000
    redact_headers: frozenset[str] = frozenset()
    redact_fields: frozenset[str] = frozenset()
    # gRPC message types from the configured descriptor sets (`proto_descriptors`), if any.
    grpc_descriptors: DescriptorSet | None = None


class StreamParser(Protocol):
    """Parser state for one TCP connection (both directions)."""

    def feed(self, direction: Direction, data: bytes, ts_ns: int) -> list[ApiCall]:
        """Bytes of one direction, in order; returns the calls they completed."""

    def gap(self, direction: Direction, size: int, ts_ns: int) -> list[ApiCall]:
        """`size` bytes of this direction were never captured; resynchronise if the protocol allows."""

    def expire(self, now_ns: int) -> list[ApiCall]:
        """Requests older than the timeout become `no_response` calls."""

    def finish(self, ts_ns: int) -> list[ApiCall]:
        """The flow ended (FIN/RST/eviction/end of input): emit everything still pending."""


class DatagramParser(Protocol):
    """Parser state for one UDP flow (one 5-tuple in both directions)."""

    def feed_datagram(self, direction: Direction, data: bytes, ts_ns: int) -> list[ApiCall]: ...

    def expire(self, now_ns: int) -> list[ApiCall]: ...

    def finish(self, ts_ns: int) -> list[ApiCall]: ...


# -- state at an exchange boundary ---------------------------------------------------------------
#
# Every parser (and tcp.TcpFlow) exposes its state at an exchange boundary (both directions
# between messages, nothing buffered, no request pending) as a frozen dataclass, the way h11's
# connection states or Zeek's analyzers expose theirs:
#
#     state = parser.snapshot()        # NotAtBoundary when it is not at one
#     fresh = new_parser(flow, limits)
#     fresh.restore(state)             # `fresh` now parses the rest exactly as `parser` would
#
# This is how the compiled lane (express.py) gives a flow back to the Python path: it supplies
# the fields of the state dataclass (each dataclass's docstring says what they mean), and the
# Python parser is rebuilt from them with `restore`, never by writes to its private fields.
# A state holds what decides the calls still to come (ordinals that call ids hash, stream
# offsets, remembered answers); cumulative statistics kept for the flow's end are not state.

StateT = TypeVar("StateT")


class Snapshotting(Protocol[StateT]):
    """A parser whose state at an exchange boundary can be taken and given to a fresh one."""

    def snapshot(self) -> StateT:
        """The state now; raises NotAtBoundary unless between exchanges."""

    def restore(self, state: StateT) -> None:
        """Continue from `state` (taken from a parser of the same flow, or supplied by the lane)."""


# A probe looks at the first bytes seen in each direction (either may be empty) and the
# ports, and returns a confidence: 0 = not this protocol, 1 = port hint only, 2 = plausible
# content, 3 = certain (a magic string, a preface).
Probe = Callable[[bytes, bytes, FlowInfo], int]


@dataclass(frozen=True, slots=True)
class ProtocolSpec:
    """One registry entry."""

    name: str  # the ApiCall.protocol value
    transport: str  # "tcp" or "udp"
    probe: Probe
    new_stream: Callable[[FlowInfo, ParserLimits], StreamParser] | None = None
    new_datagram: Callable[[FlowInfo, ParserLimits], DatagramParser] | None = None
    ports: frozenset[int] = frozenset()
    # Bytes a probe wants before it can decide (detection waits for that many, or the flow's end).
    probe_bytes: int = 16

    kind: ClassVar[str] = "protocol"
