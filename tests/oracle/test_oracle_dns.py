"""Wireshark as the oracle for DNS: every transaction Trawl reports (id, name, type, rcode) is
one tshark shows in the same capture, and the other way round.

tshark lists packets; a transaction in its view is a response packet (with that response's
rcode), or a query no response points back to (`dns.response_to`), with an empty rcode.
Names are compared case-insensitively (0x20 case randomisation). The captures go through the
DNS module directly (tests/protocol_replay.py), not the engine.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import dns.rcode
import dns.rdatatype
import pytest

from tests.conftest import FIXTURES, SHARED_PCAPS, needs_binary
from tests.protocol_replay import dns_calls, tshark_fields

pytestmark = needs_binary("tshark")

CAPTURES = [
    FIXTURES / "dns_udp.pcap",
    FIXTURES / "dns_tcp.pcap",
    SHARED_PCAPS / "dns" / "arkime__dns-udp.pcap",
    SHARED_PCAPS / "dns" / "PcapPlusPlus__dns_over_tcp.pcapng",
    SHARED_PCAPS / "sll" / "PcapPlusPlus__sll.pcap",
]

Transaction = tuple[int, str, int, str]


def tshark_transactions(path: Path, ports: set[tuple[str, int]]) -> Counter[Transaction]:
    decode_as = [arg for transport, port in sorted(ports) for arg in ("-d", f"{transport}.port=={port},dns")]
    fields = ["frame.number", "dns.id", "dns.qry.name", "dns.qry.type", "dns.flags.rcode", "dns.flags.response",
              "dns.response_to"]  # fmt: skip
    rows = tshark_fields(path, "dns", fields, *decode_as)
    answered = {row[6] for row in rows if row[5] == "1" and row[6]}
    transactions: Counter[Transaction] = Counter()
    for frame, ident, name, qtype, rcode, response, _response_to in rows:
        name = "." if name == "<Root>" else name.lower()
        if response == "1":
            transactions[(int(ident, 16), name, int(qtype), dns.rcode.to_text(dns.rcode.Rcode.make(int(rcode))))] += 1
        elif frame not in answered:
            transactions[(int(ident, 16), name, int(qtype), "")] += 1
    return transactions


def trawl_transactions(path: Path) -> tuple[Counter[Transaction], set[tuple[str, int]]]:
    calls = dns_calls(path)
    transactions: Counter[Transaction] = Counter()
    for call in calls:
        qtype = int(dns.rdatatype.from_text(call.method))
        transactions[(call.dns.id, call.path.lower(), qtype, call.status)] += 1
    return transactions, {(call.transport, call.dst.port) for call in calls}


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_dns_transactions_match_tshark(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is not present")
    ours, ports = trawl_transactions(path)
    assert ours, "the capture holds DNS traffic"
    assert ours == tshark_transactions(path, ports)
