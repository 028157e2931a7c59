"""ICMP and ICMPv6, sans-IO: echo request/reply pairing and the error messages that quote a flow.

ICMP is not a stream, so this is not a `ProtocolSpec`: the engine keeps one `IcmpTracker` per
node and hands it every ICMP/ICMPv6 packet (`feed_packet`), whatever its addresses.

- Echo requests wait under (requester, target, identifier, sequence) for the reply from the
  target; a reply makes an `echo` call with status `reply` (`ok`). A request nobody answered
  becomes `no_response` after `ParserLimits.request_timeout_ns` (`expire`) or at `finish`. A
  reply nobody asked for (its request was not captured, or a duplicate) is still reported with
  the note `no-request-seen`.
- Destination-unreachable, time-exceeded, packet-too-big, parameter-problem, redirect and
  source-quench become one call each, outcome `error`, between the reporter (`src`, often a
  router) and the host it reports to (`dst`); `path` is the flow quoted inside the message
  ("udp 10.0.0.1:1234 -> 10.0.0.2:53"), `status` the code name ("port-unreachable") or number.
  Packet-too-big and IPv4 fragmentation-needed carry the next-hop MTU in the status
  ("mtu 1280", "frag-needed mtu 1400"): the code alone says little there. An error quoting an echo request that is
  still pending also closes that echo call, as an `error` with the error's status.
- Other types (neighbour discovery, router advertisements, MLD, timestamps) are not API
  traffic: they are counted in `ignored` and produce no call.

Checksums are not verified: a capture of locally sent packets holds offloaded, unfinished
checksums. A packet too short for its type raises `ProtocolError`; the tracker's state is not
affected, so the engine keeps feeding it.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from trawl.dissector.calls import finish_call, new_call
from trawl.dissector.protocols.base import FlowInfo, NotAtBoundary, ParserLimits, ProtocolError
from trawl.v1.calls_pb2 import ApiCall, Outcome

PROTOCOL = "icmp"
TRANSPORT = "icmp"
# Pending echo requests kept per tracker (one tracker serves a whole node), oldest dropped first.
DEFAULT_MAX_PENDING = 65_536

_ECHO = struct.Struct("!BBHHH")
_IP_PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 47: "gre", 50: "esp"}
_IPV6_EXTENSION_HEADERS = frozenset({0, 43, 60, 135, 139, 140})
_IPV6_FRAGMENT = 44

# (is_v6, type) -> method for the error messages that quote a datagram.
_ERROR_TYPES: dict[tuple[bool, int], str] = {
    (False, 3): "dest-unreachable",
    (False, 4): "source-quench",
    (False, 5): "redirect",
    (False, 11): "time-exceeded",
    (False, 12): "parameter-problem",
    (True, 1): "dest-unreachable",
    (True, 2): "packet-too-big",
    (True, 3): "time-exceeded",
    (True, 4): "parameter-problem",
}
_ECHO_REQUEST = {False: 8, True: 128}
_ECHO_REPLY = {False: 0, True: 129}

_CODE_NAMES: dict[tuple[bool, int], dict[int, str]] = {
    (False, 3): {
        0: "net-unreachable",
        1: "host-unreachable",
        2: "protocol-unreachable",
        3: "port-unreachable",
        4: "frag-needed",
        5: "source-route-failed",
        6: "net-unknown",
        7: "host-unknown",
        8: "source-host-isolated",
        9: "net-prohibited",
        10: "host-prohibited",
        11: "net-unreachable-for-tos",
        12: "host-unreachable-for-tos",
        13: "admin-prohibited",
        14: "host-precedence-violation",
        15: "precedence-cutoff",
    },
    (False, 5): {0: "redirect-net", 1: "redirect-host", 2: "redirect-tos-net", 3: "redirect-tos-host"},
    (False, 11): {0: "ttl-exceeded", 1: "fragment-reassembly-exceeded"},
    (False, 12): {0: "pointer-error", 1: "missing-option", 2: "bad-length"},
    (True, 1): {
        0: "no-route",
        1: "admin-prohibited",
        2: "beyond-scope",
        3: "address-unreachable",
        4: "port-unreachable",
        5: "source-policy-failed",
        6: "reject-route",
        7: "source-routing-error",
    },
    (True, 3): {0: "hop-limit-exceeded", 1: "fragment-reassembly-exceeded"},
    (True, 4): {0: "erroneous-header-field", 1: "unrecognized-next-header", 2: "unrecognized-option"},
}


def code_name(is_v6: bool, icmp_type: int, code: int) -> str:
    return _CODE_NAMES.get((is_v6, icmp_type), {}).get(code, str(code))


@dataclass(frozen=True, slots=True)
class QuotedFlow:
    """The start of the datagram an ICMP error quotes."""

    protocol: str
    src_ip: str
    dst_ip: str
    src_port: int | None = None
    dst_port: int | None = None
    # For a quoted ICMP echo request: its identifier and sequence.
    echo: tuple[int, int] | None = None

    def __str__(self) -> str:
        if self.src_port is not None and self.dst_port is not None:
            return (
                f"{self.protocol} {_host_port(self.src_ip, self.src_port)} -> {_host_port(self.dst_ip, self.dst_port)}"
            )
        return f"{self.protocol} {self.src_ip} -> {self.dst_ip}"


def _host_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def parse_quoted(datagram: bytes, is_v6: bool) -> QuotedFlow:
    """Read the IP header and the first transport bytes an ICMP error carries."""
    if is_v6:
        if len(datagram) < 40 or datagram[0] >> 4 != 6:
            raise ProtocolError("quoted IPv6 header cut short")
        src = str(ipaddress.IPv6Address(datagram[8:24]))
        dst = str(ipaddress.IPv6Address(datagram[24:40]))
        next_header, offset = datagram[6], 40
        for _ in range(8):  # extension headers, bounded
            if next_header == _IPV6_FRAGMENT and offset + 8 <= len(datagram):
                next_header, offset = datagram[offset], offset + 8
            elif next_header in _IPV6_EXTENSION_HEADERS and offset + 2 <= len(datagram):
                next_header, offset = datagram[offset], offset + (datagram[offset + 1] + 1) * 8
            else:
                break
        protocol_number = next_header
    else:
        if len(datagram) < 20 or datagram[0] >> 4 != 4:
            raise ProtocolError("quoted IPv4 header cut short")
        header_length = (datagram[0] & 0x0F) * 4
        if header_length < 20:
            raise ProtocolError("quoted IPv4 header length below 20")
        src = str(ipaddress.IPv4Address(datagram[12:16]))
        dst = str(ipaddress.IPv4Address(datagram[16:20]))
        protocol_number, offset = datagram[9], header_length
        if struct.unpack_from("!H", datagram, 6)[0] & 0x1FFF:
            # A later fragment: no transport header to read.
            return QuotedFlow(_protocol_name(protocol_number), src, dst)
    protocol = _protocol_name(protocol_number)
    transport = datagram[offset : offset + 8]
    if protocol_number in (6, 17, 132) and len(transport) >= 4:
        src_port, dst_port = struct.unpack_from("!HH", transport)
        return QuotedFlow(protocol, src, dst, src_port, dst_port)
    if protocol_number in (1, 58) and len(transport) >= 8 and transport[0] == _ECHO_REQUEST[protocol_number == 58]:
        _type, _code, _sum, identifier, sequence = _ECHO.unpack_from(transport)
        return QuotedFlow(protocol, src, dst, echo=(identifier, sequence))
    return QuotedFlow(protocol, src, dst)


def _protocol_name(number: int) -> str:
    return _IP_PROTOCOLS.get(number, f"proto-{number}")


_EchoKey = tuple[bool, str, str, int, int]  # is_v6, requester, target, identifier, sequence


@dataclass(frozen=True, slots=True)
class IcmpState:
    """A node's ICMP tracker with no echo request pending: nothing else decides the calls to
    come (an echo call's id hashes its identifier and sequence, not an ordinal), so the state
    is empty; `ignored` and `evicted` are statistics and are not part of it. No compiled lane
    takes ICMP yet; a lane that did would hand its tracker back only with no echo pending."""


class IcmpTracker:
    """ICMP state for one node: pending echo requests and the calls they and errors make."""

    def __init__(self, node: str, limits: ParserLimits, *, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self._node = node
        self._limits = limits
        self._max_pending = max_pending
        self._pending: dict[_EchoKey, ApiCall] = {}
        # Packets of types that make no call (neighbour discovery, MLD, ...).
        self.ignored = 0
        # Echo requests dropped from a full pending table (each still emitted as no_response).
        self.evicted = 0

    def snapshot(self) -> IcmpState:
        """See IcmpState; NotAtBoundary while an echo request waits for its reply."""
        if self._pending:
            raise NotAtBoundary("ICMP: an echo request is pending")
        return IcmpState()

    def restore(self, state: IcmpState) -> None:
        """Continue from `state`: echo requests pending here are forgotten."""
        self._pending.clear()

    def feed_packet(self, src_ip: str, dst_ip: str, icmp: bytes, ts_ns: int, is_v6: bool) -> list[ApiCall]:
        if len(icmp) < 4:
            raise ProtocolError(f"ICMP message of {len(icmp)} bytes is shorter than its header")
        icmp_type, code = icmp[0], icmp[1]
        if icmp_type == _ECHO_REQUEST[is_v6]:
            return self._echo_request(src_ip, dst_ip, icmp, ts_ns, is_v6)
        if icmp_type == _ECHO_REPLY[is_v6]:
            return self._echo_reply(src_ip, dst_ip, icmp, ts_ns, is_v6)
        method = _ERROR_TYPES.get((is_v6, icmp_type))
        if method is None:
            self.ignored += 1
            return []
        return self._error(method, src_ip, dst_ip, icmp, ts_ns, is_v6, icmp_type, code)

    def _new_call(self, src_ip: str, dst_ip: str, ts_ns: int, ordinal: int) -> ApiCall:
        flow = FlowInfo(TRANSPORT, src_ip, 0, dst_ip, 0, node=self._node)
        return new_call(flow, PROTOCOL, ts_ns, ordinal)

    def _echo_request(self, src_ip: str, dst_ip: str, icmp: bytes, ts_ns: int, is_v6: bool) -> list[ApiCall]:
        icmp_type, code, identifier, sequence = _echo_fields(icmp)
        key = (is_v6, src_ip, dst_ip, identifier, sequence)
        if key in self._pending:
            call = self._pending[key]
            if "retransmitted" not in call.notes:
                call.notes.append("retransmitted")
            return []
        emitted: list[ApiCall] = []
        if len(self._pending) >= self._max_pending:
            oldest_key = next(iter(self._pending))
            oldest = self._pending.pop(oldest_key)
            oldest.notes.append("pending-limit")
            self.evicted += 1
            emitted.append(finish_call(oldest, None, error=False))
        call = self._new_call(src_ip, dst_ip, ts_ns, (identifier << 16) | sequence)
        call.method = "echo"
        call.path = dst_ip
        call.request.size = len(icmp)
        call.request.end_ts = ts_ns
        call.icmp.type = icmp_type
        call.icmp.code = code
        call.icmp.identifier = identifier
        call.icmp.sequence = sequence
        self._pending[key] = call
        return emitted

    def _echo_reply(self, src_ip: str, dst_ip: str, icmp: bytes, ts_ns: int, is_v6: bool) -> list[ApiCall]:
        _type, _code, identifier, sequence = _echo_fields(icmp)
        call = self._pending.pop((is_v6, dst_ip, src_ip, identifier, sequence), None)
        if call is None:
            call = self._new_call(dst_ip, src_ip, ts_ns, (identifier << 16) | sequence)
            call.method = "echo"
            call.path = src_ip
            call.icmp.type = _ECHO_REQUEST[is_v6]
            call.icmp.identifier = identifier
            call.icmp.sequence = sequence
            call.notes.append("no-request-seen")
        call.status = "reply"
        call.response.size = len(icmp)
        call.response.end_ts = ts_ns
        return [finish_call(call, ts_ns, error=False)]

    def _error(
        self, method: str, src_ip: str, dst_ip: str, icmp: bytes, ts_ns: int, is_v6: bool, icmp_type: int, code: int
    ) -> list[ApiCall]:
        if len(icmp) < 8:
            raise ProtocolError(f"ICMP {method} of {len(icmp)} bytes carries no quoted datagram")
        call = self._new_call(src_ip, dst_ip, ts_ns, (icmp_type << 8) | code)
        call.method = method
        call.status = _error_status(is_v6, icmp_type, code, icmp)
        call.request.size = len(icmp)
        call.request.end_ts = ts_ns
        call.outcome = Outcome.OUTCOME_ERROR
        call.icmp.type = icmp_type
        call.icmp.code = code
        calls = [call]
        try:
            quoted = parse_quoted(icmp[8:], is_v6)
        except ProtocolError:
            call.path = dst_ip
            call.notes.append("quoted-datagram-truncated")
            return calls
        call.path = str(quoted)
        call.icmp.quoted_flow = call.path
        if quoted.echo is not None:
            identifier, sequence = quoted.echo
            call.icmp.identifier = identifier
            call.icmp.sequence = sequence
            echo = self._pending.pop((is_v6, quoted.src_ip, quoted.dst_ip, identifier, sequence), None)
            if echo is not None:
                echo.status = call.status
                echo.notes.append(f"answered-by-{method}")
                echo.response.size = len(icmp)
                echo.response.end_ts = ts_ns
                calls.insert(0, finish_call(echo, ts_ns, error=True))
        return calls

    def expire(self, now_ns: int) -> list[ApiCall]:
        expired: list[ApiCall] = []
        deadline = now_ns - self._limits.request_timeout_ns
        while self._pending:
            key = next(iter(self._pending))
            call = self._pending[key]
            if call.request.ts > deadline:
                break
            del self._pending[key]
            expired.append(finish_call(call, None, error=False))
        return expired

    def finish(self) -> list[ApiCall]:
        calls = [finish_call(call, None, error=False) for call in self._pending.values()]
        self._pending.clear()
        return calls


def _echo_fields(icmp: bytes) -> tuple[int, int, int, int]:
    if len(icmp) < _ECHO.size:
        raise ProtocolError(f"ICMP echo of {len(icmp)} bytes is shorter than its header")
    icmp_type, code, _checksum, identifier, sequence = _ECHO.unpack_from(icmp)
    return icmp_type, code, identifier, sequence


def _error_status(is_v6: bool, icmp_type: int, code: int, icmp: bytes) -> str:
    if is_v6 and icmp_type == 2:
        return f"mtu {struct.unpack_from('!I', icmp, 4)[0]}"
    if not is_v6 and icmp_type == 3 and code == 4:
        return f"frag-needed mtu {struct.unpack_from('!H', icmp, 6)[0]}"
    return code_name(is_v6, icmp_type, code)


__all__ = ["IcmpState", "IcmpTracker", "QuotedFlow", "code_name", "parse_quoted"]
