"""Wireshark as the oracle: on real captures and on built hard cases, every TCP connection must
carry the same HTTP/1 requests (method, target) and the same responses (status), in the same
order, in Trawl's calls as in tshark's view. HTTP/1.1 pairs a connection's responses with its
requests in order, so equal sequences mean equal pairs.

Why sequences per connection rather than tshark's own pairing (`http.response_in`): tshark
pairs wrongly when several messages share one frame (two pipelined requests in a segment both
point at the first response; the second response stays unpaired); Trawl pairs them in order
(test_pipelined_requests_in_one_segment shows it). Normalised differences:
- a frame that repeats an earlier frame's sequence number (a retransmitted copy, or the same
  packet captured twice) is not another message: Trawl reassembles first;
- Trawl redacts secrets in targets (`?token=[REDACTED]`); the comparison runs with empty
  redaction lists, since it is about parsing.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import dpkt
import pytest

from tests.conftest import FIXTURES, SHARED_PCAPS, needs_binary
from tests.unit.dissector_builders import Conversation, dissect_capture
from trawl.pcap import LINKTYPE_LINUX_SLL2
from trawl.v1.calls_pb2 import ApiCall

pytestmark = needs_binary("tshark")

REAL_CAPTURES = [
    SHARED_PCAPS / "http1" / "zeek__pipelined-requests.pcap",
    SHARED_PCAPS / "http1" / "scapy__http_chunk.pcap",
    SHARED_PCAPS / "tcp" / "arkime__wireshark-retrans.pcap",
    SHARED_PCAPS / "sll" / "PcapPlusPlus__sll.pcap",
    FIXTURES / "http1.pcap",
]

Endpoints = frozenset[tuple[str, int]]
View = dict[Endpoints, tuple[list[tuple[str, str]], list[str]]]
AGGREGATOR = "|"  # joins several occurrences of a field in one frame (URIs may hold commas)


def tshark_view(path: Path) -> View:
    """Per connection: its requests (method, target) and its response codes, in order."""
    command = ["tshark", "-r", str(path), "-Y", "http", "-T", "fields"]
    command += ["-E", f"aggregator={AGGREGATOR}", "-o", "tcp.reassemble_out_of_order:TRUE"]
    fields = ("ip.src", "ipv6.src", "tcp.srcport", "ip.dst", "ipv6.dst", "tcp.dstport", "tcp.seq_raw")
    for field in (*fields, "http.request.method", "http.request.uri", "http.response.code"):
        command += ["-e", field]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout
    view: View = {}
    seen: set[tuple[Endpoints, str, str]] = set()
    for line in output.splitlines():
        src4, src6, sport, dst4, dst6, dport, seq, methods, uris, codes = (line.split("\t") + [""] * 10)[:10]
        key = frozenset({(src4 or src6, int(sport)), (dst4 or dst6, int(dport))})
        if (key, sport, seq) in seen:
            continue  # the same bytes again
        seen.add((key, sport, seq))
        requests, responses = view.setdefault(key, ([], []))
        if methods:
            requests += zip(methods.split(AGGREGATOR), uris.split(AGGREGATOR), strict=True)
        if codes:
            responses += codes.split(AGGREGATOR)
    return view


def trawl_view(path: Path) -> View:
    calls, _ = dissect_capture(path, redact_headers=[], redact_fields=[])
    view: View = {}
    by_connection: dict[Endpoints, list[ApiCall]] = {}
    for call in calls:
        if call.protocol == "http":
            key = frozenset({(call.src.ip, call.src.port), (call.dst.ip, call.dst.port)})
            by_connection.setdefault(key, []).append(call)
    for key, group in by_connection.items():
        requests = [(call.method, call.path) for call in sorted(group, key=lambda c: c.request.ts) if call.method]
        answered = sorted((call for call in group if call.status), key=lambda c: c.response.ts)
        view[key] = (requests, [call.status for call in answered])
    return view


@pytest.mark.parametrize("path", REAL_CAPTURES, ids=lambda path: path.name)
def test_real_captures_agree_with_tshark(path: Path) -> None:
    if not path.is_file():
        pytest.skip(f"{path} is not there")
    expected = tshark_view(path)
    assert expected, "the capture holds HTTP according to tshark"
    assert trawl_view(path) == expected


def _hard_cases() -> list[Conversation]:
    """Out of order, retransmitted, re-cut, pipelined, chunked; IPv6; QinQ; port 8080."""
    cases = []
    body = b"0123456789abcdef" * 200
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 700]), body[i : i + 700]) for i in range(0, len(body), 700))
        + b"0\r\n\r\n"
    )
    plain = b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    reordered = Conversation(client_port=41001).handshake()
    reordered.client_sends(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
    reordered.client_sends(b"POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
    reordered.server_sends(chunked + plain, 900)
    frames = reordered.frames
    reordered.frames = frames[:5] + frames[5:][::-1]
    reordered.close()
    cases.append(reordered)

    retransmitted = Conversation(client_port=41002).handshake().client_sends(b"GET /retx HTTP/1.1\r\n\r\n")
    start = retransmitted.server_next
    retransmitted.server_sends(plain, 1000)
    retransmitted.raw(False, start, retransmitted.client_next, "PA", plain[:1000])
    retransmitted.raw(False, start + 500, retransmitted.client_next, "PA", plain[500:2500])
    retransmitted.close()
    cases.append(retransmitted)

    v6 = Conversation(client="2001:db8::10", server="2001:db8::20", client_port=41003, server_port=8080)
    v6.handshake().client_sends(b"DELETE /v6/item HTTP/1.1\r\nHost: b\r\n\r\n").server_sends(
        b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"
    ).close()
    cases.append(v6)

    tagged = Conversation(client_port=41004, vlans=(209, 20))
    tagged.handshake().client_sends(b"PUT /vlan HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi").server_sends(
        b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    ).close()
    cases.append(tagged)
    return cases


def _write(path: Path, frames: list[tuple[int, bytes]], link_type: int = 1) -> None:
    with path.open("wb") as handle:
        writer = dpkt.pcap.Writer(handle, linktype=link_type, nano=True)
        for ts, frame in frames:  # file order is capture order, even when timestamps go back
            writer.writepkt(frame, ts=ts / 1e9)


def test_built_hard_cases_agree_with_tshark(tmp_path: Path) -> None:
    frames = [frame for case in _hard_cases() for frame in case.frames]
    path = tmp_path / "hard.pcap"
    _write(path, frames)
    expected = tshark_view(path)
    assert sum(len(requests) for requests, _ in expected.values()) == 5
    assert trawl_view(path) == expected


def test_sll2_capture_agrees_with_tshark(tmp_path: Path) -> None:
    import struct

    case = Conversation(client_port=41005).handshake().client_sends(b"GET /sll2 HTTP/1.1\r\n\r\n")
    case.server_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").close()
    header = struct.pack("!HHIHBB8s", 0x0800, 0, 2, 1, 0, 6, b"\x02\x00\x00\x00\x00\x01\x00\x00")
    path = tmp_path / "sll2.pcap"
    _write(path, [(ts, header + frame[14:]) for ts, frame in case.frames], LINKTYPE_LINUX_SLL2)
    expected = tshark_view(path)
    assert list(expected.values()) == [([("GET", "/sll2")], ["200"])]
    assert trawl_view(path) == expected


def test_pipelined_requests_in_one_segment(tmp_path: Path) -> None:
    case = Conversation(client_port=41006).handshake()
    case.client_sends(b"GET /first HTTP/1.1\r\n\r\nGET /second HTTP/1.1\r\n\r\n")
    case.server_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    case.server_sends(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").close()
    path = tmp_path / "pipelined.pcap"
    _write(path, case.frames)
    assert list(tshark_view(path).values()) == [([("GET", "/first"), ("GET", "/second")], ["200", "404"])]
    assert trawl_view(path) == tshark_view(path)
    calls, _ = dissect_capture(path)
    assert [(call.path, call.status) for call in calls] == [("/first", "200"), ("/second", "404")]
    # tshark's own pairing sends both requests to the first response.
    output = subprocess.run(
        ["tshark", "-2", "-r", str(path), "-Y", "http.request", "-T", "fields", "-e", "http.response_in"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    (both,) = output.split()
    first, second = both.split(",")
    assert first == second
