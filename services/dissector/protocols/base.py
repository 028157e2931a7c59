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
from typing import ClassVar, Protocol

from trawl.v1.calls_pb2 import ApiCall


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
    """Bounds every parser honours; built from the dissector's config."""

    max_body_bytes: int = 64 * 1024
    max_header_bytes: int = 64 * 1024
    max_pending_requests: int = 1024
    request_timeout_ns: int = 30_000_000_000
    redact_headers: frozenset[str] = frozenset()
    redact_fields: frozenset[str] = frozenset()


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
