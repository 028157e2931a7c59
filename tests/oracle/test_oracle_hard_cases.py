"""Wireshark as the oracle on the hard cases: captures built with scapy
(tests/fixtures/make_hard_cases.py writes tests/fixtures/hard/*.pcap) run through
`trawl analyze FILE --json`, the public interface, and through tshark. Each case's calls are
first checked against what the capture was built to hold (so a test cannot pass because both
tools saw nothing), then against tshark's view of the same file:

- HTTP: per connection, the requests (method, target) and the response codes in order (equal
  sequences mean equal pairs, since HTTP/1.1 answers in order), and every pair tshark links
  with `http.request_in` (where a frame carries a single message) is one of Trawl's calls;
- DNS: every transaction (id, name, type, rcode): a response, or a query nothing answered;
  tshark's `dns.retransmission` copies of a query are the same transaction;
- TCP: resets (flow, which side, refused when no SYN-ACK came: `tcp.completeness`), zero
  windows and retransmissions counted per connection, unanswered handshakes (SYN count).

tshark options per case: Wireshark does not reassemble out-of-order segments by default, so the
reordering cases turn `tcp.reassemble_out_of_order` on; the mid-stream case runs on port 45000,
which tshark must be told is HTTP. The disagreements are asserted one by one in the tests below
that name them, each with the reason in its docstring: in every one Trawl is right by
construction of the capture.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import dns.rcode
import dns.rdatatype
import pytest

from tests.conftest import FIXTURES, needs_binary

pytestmark = needs_binary("tshark")

HARD = FIXTURES / "hard"
CASES = sorted(path.stem for path in HARD.glob("*.pcap"))
REORDERING = ("-o", "tcp.reassemble_out_of_order:TRUE")
TSHARK_OPTIONS: dict[str, tuple[str, ...]] = {
    "out_of_order": REORDERING,
    "overlap_same": REORDERING,
    "overlap_conflict": REORDERING,
    "seq_wrap": REORDERING,
    "early_fin": REORDERING,
    "midstream": ("-d", "tcp.port==45000,http"),
}
FILTER = (
    "http or dns or tcp.flags.syn==1 or tcp.flags.reset==1 or tcp.analysis.retransmission"
    " or tcp.analysis.out_of_order or tcp.analysis.zero_window or tcp.segment.overlap.conflict"
)
FIELDS = [
    "frame.number", "tcp.stream", "ip.src", "ipv6.src", "tcp.srcport", "ip.dst", "ipv6.dst", "tcp.dstport",
    "tcp.flags.syn", "tcp.flags.ack", "tcp.flags.reset", "tcp.completeness", "tcp.analysis.retransmission",
    "tcp.analysis.out_of_order", "tcp.analysis.zero_window", "tcp.segment.overlap.conflict", "http.request.method",
    "http.request.uri", "http.response.code", "http.request_in", "dns.id", "dns.qry.name", "dns.qry.type",
    "dns.flags.response", "dns.flags.rcode", "dns.retransmission",
]  # fmt: skip
AGGREGATOR = "|"  # joins several occurrences of a field in one frame

CLIENT, SERVER, RESOLVER = "192.0.2.10", "198.51.100.20", "198.51.100.53"
BODY = bytes(range(32, 127)) * 40  # the response body of make_hard_cases.py

Exchange = tuple[str, str, str]  # method, target, status ("" where there is none)
Endpoints = frozenset[tuple[str, int]]
View = dict[Endpoints, tuple[list[tuple[str, str]], list[str]]]
Transaction = tuple[int, str, str, str]  # id, name, type, rcode ("" when unanswered)
Diagnostic = tuple[str, str, str, str, bool]  # method, flow, count, reset_by, mid_stream

# What each capture was built to hold (make_hard_cases.py), as Trawl must report it.
EXPECTED_HTTP: dict[str, list[Exchange]] = {
    "out_of_order": [("GET", "/ooo/one?page=2", "200"), ("POST", "/ooo/two", "201")],
    "retransmission": [("GET", "/retx/item", "200")],
    "overlap_same": [("PUT", "/overlap/same", "200")],
    "overlap_conflict": [("GET", "/conflict/first", "200"), ("POST", "/conflict/held", "202")],
    "midstream": [
        ("GET", "/mid/next", "404"),
        ("DELETE", "/mid/item/7", "204"),
        ("", "", "200"),
        ("GET", "/mid/status", "200"),
    ],
    "seq_wrap": [("GET", "/wrap/around", "200"), ("GET", "/wrap/again", "200")],
    "early_fin": [("GET", "/close/early", "200")],
    "body_gap": [("GET", "/body/gap", "200"), ("GET", "/body/after", "404")],
    "gap": [("GET", "/gap/one", "200"), ("", "", "201"), ("GET", "/gap/three", "200")],
    "ip_fragments": [("POST", "/frag/upload", "200")],
    "vlan": [("GET", "/vlan/one", "200")],
    "sll": [("GET", "/cooked/list", "200"), ("PATCH", "/cooked/item/1", "409")],
    "sll2": [("GET", "/cooked/list", "200"), ("PATCH", "/cooked/item/1", "409")],
    "ipv6_ext": [("GET", "/v6/options", "200")],
    "reset": [("GET", "/reset/download", "200"), ("GET", "/reset/idle", "200")],
    "zero_window": [("GET", "/slow/reader", "200")],
    "pipelined": [
        ("GET", "/pipe/1", "200"),
        ("HEAD", "/pipe/2", "200"),
        ("GET", "/pipe/3", "404"),
        ("PUT", "/pipe/4", "204"),
        ("GET", "/pipe/5", "500"),
    ],
}
EXPECTED_DNS: dict[str, list[Transaction]] = {
    "out_of_order": [(0x1001, "api.svc.test", "A", "NOERROR"), (0x1002, "db.svc.test", "AAAA", "NXDOMAIN")],
    "retransmission": [(0x2001, "retx.svc.test", "A", "NXDOMAIN")],
    "ip_fragments": [(0x3001, "big.svc.test", "TXT", "NOERROR"), (0x3002, "dup.svc.test", "TXT", "NOERROR")],
    "vlan": [(0x4001, "qinq.svc.test", "A", "NOERROR")],
    "sll": [(0x5001, "cooked.svc.test", "A", "NOERROR")],
    "sll2": [(0x5001, "cooked.svc.test", "A", "NOERROR")],
    "ipv6_ext": [(0x6001, "big6.svc.test", "TXT", "NOERROR")],
}


def _flow(client_port: int, server_port: int = 80, server: str = SERVER) -> str:
    return f"{CLIENT}:{client_port} -> {server}:{server_port}"


EXPECTED_TCP: dict[str, list[Diagnostic]] = {
    "retransmission": [("retransmission", _flow(40011), "2", "", False)],
    "overlap_same": [("retransmission", _flow(40021), "2", "", False)],
    "overlap_conflict": [
        ("retransmission", _flow(40031), "1", "", False),
        ("retransmission", _flow(40032), "1", "", False),
    ],
    "refused": [("refused", _flow(40091, 8080), "1", "server", False)],
    "handshake_timeout": [
        ("handshake-timeout", _flow(40101, 8080), "3", "", False),
        ("retransmission", _flow(40101, 8080), "2", "", False),
    ],
    "reset": [("reset", _flow(40111), "1", "server", True), ("reset", _flow(40112), "1", "client", False)],
    "zero_window": [("zero-window", _flow(40121), "2", "", False)],
}


# -- running the two tools -------------------------------------------------------------------------


# `trawl analyze FILE --json` (trawl.cli.main, what the command runs) on every capture in one
# interpreter, so the suite pays the start-up once; a line "#<exit code>" ends each file's calls.
ANALYZE_EACH = """
import sys
from trawl.cli import main
for path in sys.argv[1:]:
    code = main(["analyze", path, "--json"])
    sys.stdout.write(f"#{code}\\n")
    sys.stdout.flush()
"""


def run_trawl(paths: list[Path]) -> list[list[dict[str, Any]]]:
    """Each capture's calls (`trawl analyze FILE --json`: one ApiCall per line)."""
    command = [sys.executable, "-c", ANALYZE_EACH, *map(str, paths)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    outputs: list[list[dict[str, Any]]] = [[]]
    for line in result.stdout.splitlines():
        if line.startswith("#"):
            assert line == "#0", f"trawl analyze {paths[len(outputs) - 1]} exited with {line[1:]}: {result.stderr}"
            outputs.append([])
        else:
            outputs[-1].append(json.loads(line))
    assert len(outputs) == len(paths) + 1
    return outputs[:-1]


def run_tshark(
    path: Path, *options: str, display_filter: str = FILTER, fields: tuple[str, ...] = tuple(FIELDS)
) -> list[dict[str, str]]:
    """One row per frame that matches, one value per field (several occurrences joined)."""
    command = ["tshark", "-n", "-r", str(path), *options, "-Y", display_filter, "-T", "fields"]
    command += ["-E", "occurrence=a", "-E", f"aggregator={AGGREGATOR}"]
    for name in fields:
        command += ["-e", name]
    output = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    return [dict(zip(fields, line.split("\t"), strict=True)) for line in output.splitlines()]


@dataclass(frozen=True)
class Views:
    calls: list[dict[str, Any]]
    rows: list[dict[str, str]]


@cache
def trawl_calls() -> dict[str, list[dict[str, Any]]]:
    return dict(zip(CASES, run_trawl([HARD / f"{case}.pcap" for case in CASES]), strict=True))


@cache
def tshark_rows(case: str) -> list[dict[str, str]]:
    return run_tshark(HARD / f"{case}.pcap", *TSHARK_OPTIONS.get(case, ()))


def views(case: str) -> Views:
    return Views(trawl_calls()[case], tshark_rows(case))


# -- Trawl's side ----------------------------------------------------------------------------------


def _request_ts(call: dict[str, Any]) -> int:
    return int(call.get("request", {}).get("ts", 0) or call.get("response", {}).get("ts", 0))


def trawl_exchanges(calls: list[dict[str, Any]]) -> list[Exchange]:
    http = sorted((call for call in calls if call["protocol"] == "http"), key=_request_ts)
    return [(call.get("method", ""), call.get("path", ""), call.get("status", "")) for call in http]


def _endpoints(call: dict[str, Any]) -> Endpoints:
    return frozenset({(call["src"]["ip"], call["src"]["port"]), (call["dst"]["ip"], call["dst"]["port"])})


def trawl_http_view(calls: list[dict[str, Any]]) -> View:
    view: View = {}
    for call in sorted((call for call in calls if call["protocol"] == "http"), key=_request_ts):
        requests, _ = view.setdefault(_endpoints(call), ([], []))
        if call.get("method"):
            requests.append((call["method"], call["path"]))
    answered = (call for call in calls if call["protocol"] == "http" and call.get("status"))
    for call in sorted(answered, key=lambda call: int(call["response"]["ts"])):
        view.setdefault(_endpoints(call), ([], []))[1].append(call["status"])
    return view


def trawl_dns(calls: list[dict[str, Any]]) -> Counter[Transaction]:
    return Counter(
        (call["dns"].get("id", 0), call["path"].lower(), call["method"], call.get("status", ""))
        for call in calls
        if call["protocol"] == "dns"
    )


def trawl_tcp(calls: list[dict[str, Any]]) -> list[Diagnostic]:
    return sorted(
        (
            call["method"],
            call["path"],
            call["status"],
            call.get("tcp", {}).get("reset_by", ""),
            call.get("tcp", {}).get("mid_stream", False),
        )
        for call in calls
        if call["protocol"] == "tcp"
    )


def trawl_counts(calls: list[dict[str, Any]], method: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for call in calls:
        if call["protocol"] == "tcp" and call["method"] == method:
            counts[call["path"]] += int(call["status"])
    return counts


# -- tshark's side ---------------------------------------------------------------------------------


def _values(row: dict[str, str], name: str) -> list[str]:
    return row[name].split(AGGREGATOR) if row[name] else []


def _src(row: dict[str, str]) -> tuple[str, int]:
    return (row["ip.src"] or row["ipv6.src"]), int(row["tcp.srcport"])


def _dst(row: dict[str, str]) -> tuple[str, int]:
    return (row["ip.dst"] or row["ipv6.dst"]), int(row["tcp.dstport"])


def _endpoint_text(endpoint: tuple[str, int]) -> str:
    ip, port = endpoint
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def tshark_http_view(rows: list[dict[str, str]]) -> View:
    view: View = {}
    for row in rows:
        methods, codes = _values(row, "http.request.method"), _values(row, "http.response.code")
        if not (methods or codes):
            continue
        requests, responses = view.setdefault(frozenset({_src(row), _dst(row)}), ([], []))
        requests += zip(methods, _values(row, "http.request.uri"), strict=True)
        responses += codes
    return view


def tshark_pairs(rows: list[dict[str, str]]) -> list[Exchange]:
    """The pairs tshark links itself (`http.request_in`), where both frames carry one message."""
    requests = {
        row["frame.number"]: (row["http.request.method"], row["http.request.uri"])
        for row in rows
        if len(_values(row, "http.request.method")) == 1
    }
    pairs = []
    for row in rows:
        codes = _values(row, "http.response.code")
        if len(codes) == 1 and row["http.request_in"] in requests:
            pairs.append((*requests[row["http.request_in"]], codes[0]))
    return pairs


def tshark_dns(rows: list[dict[str, str]]) -> Counter[Transaction]:
    """Responses, plus queries no response points back to; a retransmitted query is not another."""
    transactions: Counter[Transaction] = Counter()
    answered: set[tuple[int, str, str]] = set()
    queries: list[tuple[int, str, str]] = []
    for row in rows:
        if not row["dns.id"] or row["dns.retransmission"]:
            continue
        rcodes = iter(_values(row, "dns.flags.rcode"))
        messages = zip(
            _values(row, "dns.id"),
            _values(row, "dns.qry.name"),
            _values(row, "dns.qry.type"),
            _values(row, "dns.flags.response"),
            strict=True,
        )
        for ident, name, qtype, response in messages:
            key = (int(ident, 16), name.lower(), dns.rdatatype.to_text(dns.rdatatype.RdataType.make(int(qtype))))
            if response in ("1", "True"):
                answered.add(key)
                rcode = dns.rcode.to_text(dns.rcode.Rcode.make(int(next(rcodes))))
                transactions[(*key, rcode)] += 1
            else:
                queries.append(key)
    for key in queries:
        if key not in answered:
            transactions[(*key, "")] += 1
    return transactions


def _clients(rows: list[dict[str, str]]) -> dict[str, tuple[tuple[str, int], tuple[str, int]]]:
    """tcp.stream -> (client, server), the client being the SYN's sender."""
    return {
        row["tcp.stream"]: (_src(row), _dst(row))
        for row in rows
        if row["tcp.flags.syn"] in ("1", "True") and row["tcp.flags.ack"] in ("0", "False")
    }


def _flow_of(row: dict[str, str], clients: dict[str, tuple[tuple[str, int], tuple[str, int]]]) -> str:
    """Trawl's `client -> server` text for the row's connection (whose SYN tshark saw)."""
    if row["tcp.stream"] not in clients:
        return f"tcp.stream {row['tcp.stream']} (no SYN captured)"
    client, server = clients[row["tcp.stream"]]
    return f"{_endpoint_text(client)} -> {_endpoint_text(server)}"


def tshark_resets(rows: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    """(refused or reset, flow, which side), one per connection: its first RST. Refused: no
    SYN-ACK had been seen (tcp.completeness bit 2) when the server's RST came."""
    clients = _clients(rows)
    resets: dict[str, tuple[str, str, str]] = {}
    for row in rows:
        if row["tcp.flags.reset"] not in ("1", "True") or row["tcp.stream"] in resets:
            continue
        oriented = row["tcp.stream"] in clients
        side = ("client" if _src(row) == clients[row["tcp.stream"]][0] else "server") if oriented else "unknown"
        refused = side == "server" and not int(row["tcp.completeness"] or "0") & 2
        resets[row["tcp.stream"]] = ("refused" if refused else "reset", _flow_of(row, clients), side)
    return sorted(resets.values())


def tshark_counts(rows: list[dict[str, str]], field: str) -> Counter[str]:
    clients = _clients(rows)
    return Counter(_flow_of(row, clients) for row in rows if row[field])


def tshark_unanswered_handshakes(rows: list[dict[str, str]]) -> Counter[str]:
    """Connections that are nothing but SYNs: the number of SYNs sent."""
    clients = _clients(rows)
    by_stream: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_stream.setdefault(row["tcp.stream"], []).append(row)
    unanswered: Counter[str] = Counter()
    for stream, group in by_stream.items():
        if stream not in clients:
            continue
        only_syns = all(row["tcp.flags.syn"] in ("1", "True") and _src(row) == clients[stream][0] for row in group)
        if only_syns and not any(row["tcp.flags.reset"] in ("1", "True") for row in group):
            unanswered[_flow_of(group[0], clients)] = len(group)
    return unanswered


def _trawl_resets(calls: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    diagnostics = trawl_tcp(calls)
    return sorted((method, flow, side) for method, flow, _, side, _ in diagnostics if method in ("reset", "refused"))


# -- what the captures hold, and where the two agree -----------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_trawl_reports_what_the_capture_holds(case: str) -> None:
    calls = views(case).calls
    assert trawl_exchanges(calls) == EXPECTED_HTTP.get(case, [])
    assert trawl_dns(calls) == Counter(EXPECTED_DNS.get(case, []))
    assert trawl_tcp(calls) == sorted(EXPECTED_TCP.get(case, []))
    assert {call["protocol"] for call in calls} <= {"http", "dns", "tcp"}


HTTP_AGREES = sorted(set(EXPECTED_HTTP) - {"midstream", "reset", "early_fin", "body_gap"})


@pytest.mark.parametrize("case", HTTP_AGREES)
def test_http_matches_tshark(case: str) -> None:
    run = views(case)
    assert trawl_http_view(run.calls) == tshark_http_view(run.rows)
    exchanges = trawl_exchanges(run.calls)
    for pair in tshark_pairs(run.rows):
        assert pair in exchanges


@pytest.mark.parametrize("case", sorted(EXPECTED_DNS))
def test_dns_matches_tshark(case: str) -> None:
    run = views(case)
    assert trawl_dns(run.calls) == tshark_dns(run.rows)


@pytest.mark.parametrize("case", CASES)
def test_resets_zero_windows_and_handshakes_match_tshark(case: str) -> None:
    run = views(case)
    assert _trawl_resets(run.calls) == tshark_resets(run.rows)
    assert trawl_counts(run.calls, "zero-window") == tshark_counts(run.rows, "tcp.analysis.zero_window")
    assert trawl_counts(run.calls, "handshake-timeout") == tshark_unanswered_handshakes(run.rows)


@pytest.mark.parametrize("case", sorted(set(CASES) - {"out_of_order", "overlap_same", "overlap_conflict"}))
def test_retransmission_counts_match_tshark(case: str) -> None:
    run = views(case)
    assert trawl_counts(run.calls, "retransmission") == tshark_counts(run.rows, "tcp.analysis.retransmission")


def test_conflicting_ip_fragment_keeps_the_first_copy() -> None:
    """A fragment sent twice, the copy's bytes changed (`d` -> `X` in the fourth TXT string):
    both reassemble the datagram from the first copy."""
    run = views("ip_fragments")
    (call,) = (call for call in run.calls if call.get("path") == "dup.svc.test")
    ours = [answer["data"].strip('"') for answer in call["dns"]["answers"]]
    (row,) = run_tshark(
        HARD / "ip_fragments.pcap", display_filter="dns.flags.response==1 and dns.id==0x3002", fields=("dns.txt",)
    )
    assert ours == row["dns.txt"].split(AGGREGATOR) == [bytes([97 + index]).decode() * 200 for index in range(8)]


# -- documented disagreements ----------------------------------------------------------------------


def test_out_of_order_segments_are_not_retransmissions() -> None:
    """tshark guesses from timing: a segment below the highest sequence number seen that comes
    more than a round trip (1 ms here, from the handshake) after it is flagged a retransmission.
    The client's request was cut in three and sent 3-1-2: the third frame (bytes 10-30) had
    never been captured before, so Trawl, which compares bytes, counts no retransmission."""
    run = views("out_of_order")
    assert trawl_counts(run.calls, "retransmission") == Counter()
    assert tshark_counts(run.rows, "tcp.analysis.retransmission") == Counter({_flow(40001): 1})


def test_overlap_with_the_same_bytes_counts_the_resent_segments() -> None:
    """Trawl counts two retransmissions: the request's second segment repeats 10 bytes already
    delivered, and the response segment [2000, 3867) repeats 800 bytes held out of order from
    [1400, 2800). tshark, by timing (each came within a round trip of the highest segment),
    calls both and the hole-filling head "out of order" and none a retransmission."""
    run = views("overlap_same")
    assert [row["frame.number"] for row in run.rows if row["tcp.analysis.out_of_order"]] == ["5", "8", "9"]
    assert tshark_counts(run.rows, "tcp.analysis.retransmission") == Counter()
    assert trawl_counts(run.calls, "retransmission") == Counter({_flow(40021): 2})


def test_conflicting_overlap_keeps_the_first_copy() -> None:
    """Both keep the first copy: the in-order request stays GET /conflict/first, and the held
    body stays `amount=100` although a later copy of those bytes said `amount=999`. tshark
    reports the conflict only where it reassembles several segments (`tcp.segment.overlap.conflict`
    on the held request); a whole single-segment message sent again with other bytes is just a
    retransmission to it. Retransmissions differ as in the out-of-order case: the segment that
    fills the hole on port 40032 is a first copy for Trawl and a late one for tshark."""
    run = views("overlap_conflict")
    held = next(call for call in run.calls if call.get("path") == "/conflict/held")
    assert base64.b64decode(held["request"]["body"]) == b"amount=100"
    fields = ("http.request.uri", "http.file_data")
    bodies = run_tshark(HARD / "overlap_conflict.pcap", *REORDERING, display_filter="http.request", fields=fields)
    assert [(row["http.request.uri"], row["http.file_data"]) for row in bodies] == [
        ("/conflict/first", ""),
        ("/conflict/held", "amount=100"),
    ]
    conflicts = [row["frame.number"] for row in run.rows if row["tcp.segment.overlap.conflict"]]
    assert conflicts == ["16"]
    tshark_retransmissions = tshark_counts(run.rows, "tcp.analysis.retransmission")
    assert tshark_retransmissions == Counter({_flow(40031): 1, _flow(40032): 2})
    assert trawl_counts(run.calls, "retransmission") == Counter({_flow(40031): 1, _flow(40032): 1})


def test_conflicting_overlap_is_noted_on_the_call() -> None:
    """Issue 3: a conflicting overlap is an anomaly the call must show (the engine counts it in
    `tcp_overlap_conflicts`): each request whose bytes were contradicted by another copy carries
    the note `overlap-conflict`, whichever copy came first."""
    calls = views("overlap_conflict").calls
    noted = {call["path"]: call.get("notes", []) for call in calls if call["protocol"] == "http"}
    assert noted == {"/conflict/first": ["overlap-conflict"], "/conflict/held": ["overlap-conflict"]}


def test_midstream_start_is_oriented_by_content() -> None:
    """The capture starts inside a response body on a connection whose server port (45000) is
    above the client's (33000), so the port rule alone would get the direction wrong; Trawl
    turns the flow around from the content and reports both exchanges. tshark, told the port
    is HTTP, glues the orphaned body bytes in front of the next response and parses
    `HTTP/1.1 404 Not Found` as a header line: that response has no status in its view, though
    the frame starts with it."""
    run = views("midstream")
    key = frozenset({(CLIENT, 33000), (SERVER, 45000)})
    assert {(call["src"]["port"], call["dst"]["port"]) for call in run.calls if key == _endpoints(call)} == {
        (33000, 45000)
    }
    assert tshark_http_view(run.rows)[key] == ([("GET", "/mid/next"), ("DELETE", "/mid/item/7")], ["204"])
    assert trawl_http_view(run.calls)[key] == ([("GET", "/mid/next"), ("DELETE", "/mid/item/7")], ["404", "204"])
    (frame,) = run_tshark(HARD / "midstream.pcap", display_filter="frame.number==6", fields=("tcp.payload",))
    assert bytes.fromhex(frame["tcp.payload"]).startswith(b"HTTP/1.1 404 Not Found\r\n")


def test_midstream_request_body_resynchronises_at_the_next_request() -> None:
    """The second connection's capture starts inside a request body (`part=uuu...u`) whose last
    byte is a letter, directly followed on the wire by the next request, `GET /mid/status`.
    The answer to the unseen request is a response without request; the next request line is
    found although a letter precedes it (a body may end with anything). tshark takes every
    client byte after the capture's start for the continuation of a body and shows no request
    on this connection."""
    run = views("midstream")
    key = frozenset({(CLIENT, 33001), (SERVER, 8080)})
    assert tshark_http_view(run.rows)[key] == ([], ["200", "200"])
    assert trawl_http_view(run.calls)[key] == ([("GET", "/mid/status")], ["200", "200"])


def test_fin_before_the_last_data_ends_the_body_after_it() -> None:
    """A close-delimited body (HTTP/1.0, no Content-Length) whose FIN is captured before the
    body's middle segment: the body ends at the FIN's sequence number, not at its arrival, so
    Trawl keeps all 3,800 bytes. tshark (even reassembling out-of-order segments) never
    finishes that response and shows only the request."""
    run = views("early_fin")
    (call,) = (call for call in run.calls if call["protocol"] == "http")
    assert call["response"]["body_size"] == str(len(BODY))
    assert call.get("notes", []) == []
    assert tshark_http_view(run.rows) == {frozenset({(CLIENT, 40151), (SERVER, 80)}): ([("GET", "/close/early")], [])}


def test_gap_resynchronises_at_the_next_request() -> None:
    """The second request was lost (the server acknowledged it, so the loss is known). Both
    show its response alone and the third exchange after it, and Trawl notes the gap on the
    call that follows it. With out-of-order reassembly on (needed for the reordering cases),
    tshark waits for the lost bytes forever and shows nothing the client sent after them:
    no single tshark setting reads both kinds of capture, Trawl reads both."""
    run = views("gap")
    third = next(call for call in run.calls if call.get("path") == "/gap/three")
    assert "gap" in third.get("notes", [])
    orphan = next(call for call in run.calls if call.get("status") == "201")
    assert "response without request" in orphan.get("notes", [])
    reordering = run_tshark(HARD / "gap.pcap", *REORDERING)
    requests = [row["http.request.uri"] for row in reordering if row["http.request.method"]]
    assert requests == ["/gap/one"]


def test_gap_inside_a_body_keeps_the_framing() -> None:
    """A segment lost in the middle of a Content-Length body: the length still says where the
    body ends, so Trawl reports the 200 (noted `gap`, its body size the declared 3,800 bytes)
    and the next exchange. tshark never completes the reassembly of that response and drops
    it; it still finds the next exchange."""
    run = views("body_gap")
    damaged = next(call for call in run.calls if call.get("path") == "/body/gap")
    assert damaged.get("notes", []) == ["gap"]
    assert damaged["response"]["body_size"] == str(len(BODY))
    key = frozenset({(CLIENT, 40161), (SERVER, 80)})
    assert tshark_http_view(run.rows) == {key: ([("GET", "/body/gap"), ("GET", "/body/after")], ["404"])}
    assert trawl_http_view(run.calls) == {key: ([("GET", "/body/gap"), ("GET", "/body/after")], ["200", "404"])}
    assert ("GET", "/body/after", "404") in tshark_pairs(run.rows)


def test_reset_mid_response() -> None:
    """The server resets while its response body is in flight: Trawl reports the response's
    status from the head it saw, with the note `truncated`, and a `reset` by the server with
    `mid_stream` (bytes unacknowledged); tshark never completes the reassembly, so the response
    is absent from its view. The idle keep-alive connection reset by the client agrees."""
    run = views("reset")
    download = frozenset({(CLIENT, 40111), (SERVER, 80)})
    idle = frozenset({(CLIENT, 40112), (SERVER, 80)})
    assert tshark_http_view(run.rows) == {
        download: ([("GET", "/reset/download")], []),
        idle: ([("GET", "/reset/idle")], ["200"]),
    }
    assert trawl_http_view(run.calls) == {
        download: ([("GET", "/reset/download")], ["200"]),
        idle: ([("GET", "/reset/idle")], ["200"]),
    }
    truncated = next(call for call in run.calls if call.get("path") == "/reset/download")
    assert truncated.get("notes", []) == ["truncated"]


def test_pipelined_responses_pair_in_order() -> None:
    """Three requests in one segment and their three responses in one segment, then two
    requests in two segments answered in one. tshark links every response of a frame to one
    request frame (`http.request_in`): 204 and 500 both to GET /pipe/5. HTTP/1.1 answers in
    order, so the 204 belongs to PUT /pipe/4, as Trawl pairs it; the sequences agree
    (test_http_matches_tshark)."""
    rows = views("pipelined").rows
    last = next(row for row in rows if row["http.response.code"] == f"204{AGGREGATOR}500")
    linked = next(row for row in rows if row["frame.number"] == last["http.request_in"])
    assert linked["http.request.uri"] == "/pipe/5"
    assert ("PUT", "/pipe/4", "204") in trawl_exchanges(views("pipelined").calls)


def test_retransmitted_dns_query_is_one_transaction() -> None:
    """The same query (id, bytes) sent twice before its answer: tshark lists both and marks the
    second `dns.retransmission`; Trawl reports one transaction noted `retransmitted`."""
    run = views("retransmission")
    queries = [row for row in run.rows if row["dns.id"] and row["dns.flags.response"] in ("0", "False")]
    assert [bool(row["dns.retransmission"]) for row in queries] == [False, True]
    (call,) = (call for call in run.calls if call["protocol"] == "dns")
    assert call.get("notes", []) == ["retransmitted"]


@pytest.fixture(scope="module", autouse=True)
def _prefetch() -> None:
    """Run both tools on every capture once, side by side, before the tests read them."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        trawl = pool.submit(trawl_calls)
        for case in CASES:
            tshark_rows(case)
        trawl.result()
