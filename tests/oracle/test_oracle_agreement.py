"""Four cases where Trawl and Wireshark must agree (issue #8, item 8), each on a capture
generated here, run through both dissector paths (the compiled lane and the Python path alone)
and through tshark:

- a HEAD answered with `Transfer-Encoding: chunked`: the response has no body (RFC 9112
  section 6.3), so the exchange is a call and the next request on the connection pairs too;
- a RST that carries payload: a reset like any other. Wireshark shows the payload as the
  reset's "Reset cause" (RFC 1122 section 4.2.2.12: diagnostic text) and gives it to no
  protocol; Trawl does not deliver it to the stream either;
- a second response to an answered DNS query (Wireshark: `dns.retransmit_response`): one call,
  the duplicates counted (`dns_duplicate_responses`), not reported as calls;
- mDNS with the cache-flush bit on records and the unicast-response bit on the question
  (Wireshark: `dns.resp.cache_flush`, `dns.qry.qu`, class IN): read as class IN, flags noted.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import dpkt
import pytest

from tests.conftest import needs_binary
from tests.unit.dissector_builders import (
    T0,
    Conversation,
    batch,
    ethernet,
    ip_packet,
    read_capture,
    settings,
    udp_datagram,
)
from tests.unit.test_express_differential import dns_message, with_class_top_bits
from trawl.dissector.engine import Dissector
from trawl.v1.calls_pb2 import ApiCall, Outcome

pytestmark = needs_binary("tshark")

Frames = list[tuple[int, bytes]]


def write_pcap(path: Path, frames: Frames) -> Path:
    with path.open("wb") as handle:
        writer = dpkt.pcap.Writer(handle, nano=True)
        for ts_ns, frame in frames:
            writer.writepkt(frame, ts=ts_ns / 1e9)
    return path


def both_paths(path: Path) -> list[tuple[list[ApiCall], dict[str, int]]]:
    """The calls and counters of the lane and of the Python path alone (they must agree)."""
    link_type, frames = read_capture(path)
    results = []
    for express in (True, False):
        dissector = Dissector(settings(express=express), "n1")
        calls = dissector.feed(batch(frames, link_type)) + dissector.finish()
        results.append((calls, dissector.counters))
    lane, python = results
    assert sorted(call.SerializeToString(deterministic=True) for call in lane[0]) == sorted(
        call.SerializeToString(deterministic=True) for call in python[0]
    )
    return results


def tshark(path: Path, *fields: str, display_filter: str) -> list[list[str]]:
    command = ["tshark", "-n", "-r", str(path), "-Y", display_filter, "-T", "fields", "-E", "occurrence=a"]
    for name in fields:
        command += ["-e", name]
    output = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    return [line.split("\t") for line in output.splitlines()]


def test_head_answered_with_a_chunked_header_is_a_call(tmp_path: Path) -> None:
    talk = Conversation(server_port=80).handshake()
    talk.client_sends(b"HEAD /status HTTP/1.1\r\nHost: svc\r\n\r\n")
    talk.server_sends(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/html\r\n\r\n")
    talk.client_sends(b"GET /next HTTP/1.1\r\nHost: svc\r\n\r\n")
    talk.server_sends(b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope")
    talk.close()
    path = write_pcap(tmp_path / "head_chunked.pcap", talk.frames)
    for calls, _ in both_paths(path):
        http = [(call.method, call.path, call.status, call.outcome, call.response.size) for call in calls]
        head_size = len(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/html\r\n\r\n")
        assert http == [
            ("HEAD", "/status", "200", Outcome.OUTCOME_OK, head_size),
            (
                "GET",
                "/next",
                "404",
                Outcome.OUTCOME_OK,
                len(b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope"),
            ),
        ]
        assert calls[0].http.chunked_response is False  # announced, but a HEAD response has no body
    rows = tshark(path, "http.request.method", "http.response.code", "http.request_in", display_filter="http")
    # tshark pairs the same way: request frame 4 (HEAD) -> response 5 (200), 6 (GET) -> 7 (404).
    assert rows == [["HEAD", "", ""], ["", "200", "4"], ["GET", "", ""], ["", "404", "6"]]


def test_a_reset_carrying_payload_is_a_reset(tmp_path: Path) -> None:
    talk = Conversation(server_port=80).handshake()
    talk.client_sends(b"GET /download HTTP/1.1\r\nHost: svc\r\n\r\n")
    # The server aborts with a RST whose payload reads like a response: a reset's diagnostic text.
    talk.raw(False, talk.server_next, talk.client_next, "RA", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    path = write_pcap(tmp_path / "reset_payload.pcap", talk.frames)
    for calls, counters in both_paths(path):
        summary = sorted((call.protocol, call.method, call.status, call.outcome, call.tcp.reset_by) for call in calls)
        assert summary == [
            ("http", "GET", "", Outcome.OUTCOME_NO_RESPONSE, ""),
            ("tcp", "reset", "1", Outcome.OUTCOME_ERROR, "server"),
        ]
        assert counters["tcp_resets"] == 1
    rows = tshark(
        path, "tcp.srcport", "tcp.flags.reset", "tcp.len", "tcp.reset_cause", display_filter="tcp.flags.reset==1"
    )
    assert rows == [["80", "1", "40", "HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok"]]
    # ...and no HTTP response is dissected from it.
    assert tshark(path, "http.response.code", display_filter="http.response") == []


def udp_frame(ts_ns: int, src: str, dst: str, sport: int, dport: int, wire: bytes) -> tuple[int, bytes]:
    return ts_ns, ethernet(ip_packet(src, dst, 17, udp_datagram(sport, dport, wire)))


def test_a_second_response_to_an_answered_query_is_not_a_second_call(tmp_path: Path) -> None:
    query = dns_message(0x4A4A, "api.svc.test.", "A", False)
    answer = dns_message(0x4A4A, "api.svc.test.", "A", True, answers=[("api.svc.test.", "A", ["10.0.0.7"], 30)])
    other = dns_message(0x4A4A, "api.svc.test.", "A", True, answers=[("api.svc.test.", "A", ["10.0.0.8"], 30)])
    client, server = ("10.0.0.1", 41000), ("10.0.0.53", 53)
    frames = [
        udp_frame(T0, client[0], server[0], client[1], server[1], query),
        udp_frame(T0 + 1_000_000, server[0], client[0], server[1], client[1], answer),
        udp_frame(T0 + 2_000_000, server[0], client[0], server[1], client[1], answer),  # the same again
        udp_frame(T0 + 3_000_000, server[0], client[0], server[1], client[1], other),  # a different answer
    ]
    path = write_pcap(tmp_path / "dns_duplicate.pcap", frames)
    for calls, counters in both_paths(path):
        assert [(call.method, call.path, call.status, list(call.notes)) for call in calls] == [
            ("A", "api.svc.test", "NOERROR", [])
        ]
        assert [answer.data for answer in calls[0].dns.answers] == ["10.0.0.7"]
        assert counters["dns_duplicate_responses"] == 2
    rows = tshark(path, "frame.number", "dns.retransmit_response", "dns.retransmit_response_in", display_filter="dns")
    # Wireshark: frames 3 and 4 are retransmitted responses of frame 2's.
    assert rows == [["1", "", ""], ["2", "", ""], ["3", "1", "2"], ["4", "1", "2"]]


def test_mdns_cache_flush_and_unicast_response_bits_read_as_class_in(tmp_path: Path) -> None:
    query = with_class_top_bits(dns_message(0, "printer.local.", "A", False))  # QU: unicast response
    answer = with_class_top_bits(
        dns_message(0, "printer.local.", "A", True, answers=[("printer.local.", "A", ["192.168.7.20"], 120)])
    )
    client, responder = ("10.0.0.1", 5353), ("10.0.0.20", 5353)
    frames = [
        udp_frame(T0, client[0], responder[0], client[1], responder[1], query),
        udp_frame(T0 + 1_000_000, responder[0], client[0], responder[1], client[1], answer),
    ]
    path = write_pcap(tmp_path / "mdns.pcap", frames)
    for calls, counters in both_paths(path):
        (call,) = calls
        assert (call.method, call.path, call.status) == ("A", "printer.local", "NOERROR")
        assert "malformed-records" not in call.notes
        assert sorted(call.notes) == ["cache-flush", "unicast-response"]
        assert [(answer.name, answer.type, answer.ttl, answer.data) for answer in call.dns.answers] == [
            ("printer.local", "A", 120, "192.168.7.20")
        ]
        assert counters.get("parse_errors", 0) == 0
    rows = tshark(
        path,
        "dns.qry.qu",
        "dns.qry.class",
        "dns.resp.cache_flush",
        "dns.resp.class",
        "dns.a",
        display_filter="mdns",
    )
    # The response repeats the question, its QU bit included.
    assert rows == [["1", "0x0001", "", "", ""], ["1", "0x0001", "1", "0x0001", "192.168.7.20"]]


@pytest.mark.parametrize("port", [53, 5353])
def test_class_bits_outside_mdns_are_not_flags(tmp_path: Path, port: int) -> None:
    """Only mDNS gives the top bit of a class a meaning: on port 53 the class stays as sent."""
    query = with_class_top_bits(dns_message(3, "host.example.", "A", False))
    frames = [udp_frame(T0, "10.0.0.1", "10.0.0.53", port, port, query)]
    path = write_pcap(tmp_path / "class_bits.pcap", frames)
    for calls, _ in both_paths(path):
        (call,) = calls
        assert ("unicast-response" in call.notes) == (port == 5353)
