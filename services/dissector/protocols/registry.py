"""Every protocol the dissector knows, in one list.

Detection runs every TCP spec's probe on the first bytes of a new flow (and every UDP spec's
on its first datagram) and picks the highest score: content first, port hints second. ICMP is
not a TCP/UDP protocol: its tracker is wired by the engine separately (`ICMP`).
"""

from __future__ import annotations

from trawl.dissector.protocols import amqp, dns, http1, http2, icmp, kafka, redis, tls
from trawl.dissector.protocols.base import ProtocolSpec

SPECS: tuple[ProtocolSpec, ...] = (
    http1.SPEC,
    http2.SPEC,
    tls.SPEC,
    dns.SPEC,
    dns.SPEC_TCP,
    amqp.SPEC,
    redis.SPEC,
    kafka.SPEC,
)

# The ICMP/ICMPv6 tracker class: IcmpTracker(...).feed_packet(src_ip, dst_ip, icmp_bytes, ts_ns, is_v6).
ICMP = icmp.IcmpTracker


def tcp_specs() -> tuple[ProtocolSpec, ...]:
    return tuple(spec for spec in SPECS if spec.transport == "tcp" and spec.new_stream is not None)


def udp_specs() -> tuple[ProtocolSpec, ...]:
    return tuple(spec for spec in SPECS if spec.transport == "udp" and spec.new_datagram is not None)
