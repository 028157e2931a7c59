"""Wireshark as the oracle for ICMP/ICMPv6: every echo exchange and every error message Trawl
reports is one tshark shows in the same capture, and the other way round.

- Echo: tshark's replies (`icmp.resp_to`) are answered echoes (requester, target, id, seq);
  requests no reply points to are unanswered. Trawl reports an echo answered by an error
  message as an `error` echo: in tshark's view that request is unanswered, and so it is here.
- A request captured twice (the same packet seen on two interfaces, as in zeek__icmp.pcap) is
  one call for Trawl (note `retransmitted`); tshark pairs the reply with the second copy and
  leaves the first unanswered. Unanswered copies of an answered request are left out of
  tshark's view.
- Errors: (reporter, destination, type, code, quoted flow), the quoted flow rebuilt from
  tshark's decoding of the inner IP header and ports.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, SHARED_PCAPS, needs_binary
from tests.protocol_replay import icmp_calls, tshark_fields
from trawl.v1.calls_pb2 import Outcome

pytestmark = needs_binary("tshark")

CAPTURES = [
    FIXTURES / "icmp_echo.pcap",
    FIXTURES / "icmp_errors.pcap",
    SHARED_PCAPS / "icmp" / "zeek__icmp.pcap",
    SHARED_PCAPS / "vlan" / "PcapPlusPlus__VlanPackets.pcap",
]
FIELDS = [
    "frame.number", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "icmp.type", "icmp.code", "icmpv6.type",
    "icmpv6.code", "icmp.ident", "icmp.seq", "icmpv6.echo.identifier", "icmpv6.echo.sequence_number",
    "icmp.resp_to", "icmpv6.resp_to", "udp.srcport", "udp.dstport", "tcp.srcport", "tcp.dstport",
]  # fmt: skip
ECHO_REQUEST = {"icmp": 8, "icmpv6": 128}
ECHO_REPLY = {"icmp": 0, "icmpv6": 129}
ECHO_FIELDS = {"icmp": ("icmp.ident", "icmp.seq"), "icmpv6": ("icmpv6.echo.identifier", "icmpv6.echo.sequence_number")}
ERROR_TYPES = {"icmp": {3, 4, 5, 11, 12}, "icmpv6": {1, 2, 3, 4}}

Echo = tuple[str, str, int, int, bool]
Error = tuple[str, str, int, int, str]


def _first(value: str) -> str:
    return value.split(",")[0]


def _host_port(ip: str, port: str) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def tshark_view(path: Path) -> tuple[Counter[Echo], Counter[Error]]:
    rows = [dict(zip(FIELDS, row, strict=False)) for row in tshark_fields(path, "icmp or icmpv6", FIELDS)]
    answered_frames = {row["icmp.resp_to"] or row["icmpv6.resp_to"] for row in rows}
    echoes: Counter[Echo] = Counter()
    requests: list[Echo] = []
    errors: Counter[Error] = Counter()
    for row in rows:
        family = "icmpv6" if row["icmpv6.type"] else "icmp"
        prefix = "ipv6" if family == "icmpv6" else "ip"
        sources, targets = row[f"{prefix}.src"].split(","), row[f"{prefix}.dst"].split(",")
        kind, code = int(_first(row[f"{family}.type"])), int(_first(row[f"{family}.code"]))
        ident_field, seq_field = ECHO_FIELDS[family]
        if kind == ECHO_REPLY[family]:
            echo = (targets[0], sources[0], int(_first(row[ident_field]), 0), int(_first(row[seq_field]), 0), True)
            echoes[echo] += 1
        elif kind == ECHO_REQUEST[family] and row["frame.number"] not in answered_frames:
            requests.append(
                (sources[0], targets[0], int(_first(row[ident_field]), 0), int(_first(row[seq_field]), 0), False)
            )
        elif kind in ERROR_TYPES[family]:
            inner_src, inner_dst = sources[-1], targets[-1]
            if row["udp.srcport"] or row["tcp.srcport"]:
                transport = "udp" if row["udp.srcport"] else "tcp"
                sport, dport = row[f"{transport}.srcport"], row[f"{transport}.dstport"]
                quoted = f"{transport} {_host_port(inner_src, sport)} -> {_host_port(inner_dst, dport)}"
            else:
                quoted = f"{family} {inner_src} -> {inner_dst}"
            errors[(sources[0], targets[0], kind, code, quoted)] += 1
    for request in requests:
        if (*request[:4], True) not in echoes:
            echoes[request] += 1
    return echoes, errors


def trawl_view(path: Path) -> tuple[Counter[Echo], Counter[Error]]:
    echoes: Counter[Echo] = Counter()
    errors: Counter[Error] = Counter()
    for call in icmp_calls(path):
        if call.method == "echo":
            answered = call.outcome == Outcome.OUTCOME_OK
            echoes[(call.src.ip, call.dst.ip, call.icmp.identifier, call.icmp.sequence, answered)] += 1
        else:
            errors[(call.src.ip, call.dst.ip, call.icmp.type, call.icmp.code, call.path)] += 1
    return echoes, errors


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_icmp_matches_tshark(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is not present")
    echoes, errors = trawl_view(path)
    assert echoes, "the capture holds ICMP echoes"
    assert (echoes, errors) == tshark_view(path)


def test_error_fixture_has_every_error_kind() -> None:
    _echoes, errors = trawl_view(FIXTURES / "icmp_errors.pcap")
    assert {(kind, code) for _src, _dst, kind, code, _quoted in errors} == {
        (3, 1), (3, 13), (3, 3), (11, 0), (3, 4), (1, 0), (1, 4), (3, 0), (2, 0),
    }  # fmt: skip
