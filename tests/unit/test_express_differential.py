"""The compiled HTTP/1 lane against the Python path: the same packets must give the same calls.

The Python path is the reference (it is held to tshark by tests/oracle). The lane may keep a
flow or give it back at any packet; whatever it does, the calls (every field, ids included)
and the counters (but the lane's own `express_*`) must be exactly those of the Python path.
Run over every committed capture, a bench-like keep-alive capture, and hypothesis-made HTTP/1
conversations with losses, duplicates, reordering, resets, timeouts and every framing, cut into
batches at random places.
"""

from __future__ import annotations

import gzip
import itertools
import json
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import scaled
from tests.unit.dissector_builders import Conversation, batch
from trawl.collector.replay import CaptureFile
from trawl.dissector.config import DissectorSettings
from trawl.dissector.engine import Dissector
from trawl.pcap import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL2, LINKTYPE_RAW

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CAPTURES = sorted([*FIXTURES.glob("*.pcap"), *(FIXTURES / "hard").glob("*.pcap"), *(FIXTURES / "http2").glob("*.pcap")])

Frames = list[tuple[int, bytes]]


def dissect(
    frames: Sequence[tuple[int, bytes]],
    express: bool,
    cuts: Iterable[int] = (),
    link_type: int = LINKTYPE_ETHERNET,
    **overrides: Any,
) -> tuple[list[bytes], dict[str, int], Dissector]:
    """Every frame through one dissector, in batches cut before each index of `cuts`."""
    dissector = Dissector(DissectorSettings.load(None, node="n1", express=express, **overrides), "n1")
    assert (dissector.lane is not None) == express, "the compiled lane is not built"
    calls = []
    bounds = sorted({0, len(frames), *(cut for cut in cuts if 0 < cut < len(frames))})
    for sequence, (low, high) in enumerate(itertools.pairwise(bounds), start=1):
        calls += dissector.feed(batch(frames[low:high], link_type=link_type, sequence=sequence))
    calls += dissector.finish()
    serialized = sorted(call.SerializeToString(deterministic=True) for call in calls)
    counters = {name: value for name, value in dissector.counters.items() if not name.startswith("express_")}
    return serialized, counters, dissector


def assert_same(
    frames: Sequence[tuple[int, bytes]], cuts: Iterable[int] = (), link_type: int = LINKTYPE_ETHERNET, **overrides: Any
) -> Dissector:
    cuts = list(cuts)
    reference, reference_counters, _ = dissect(frames, False, cuts, link_type, **overrides)
    fast, fast_counters, dissector = dissect(frames, True, cuts, link_type, **overrides)
    assert fast == reference
    assert fast_counters == reference_counters
    return dissector


def capture_frames(path: Path) -> tuple[Frames, int]:
    capture = CaptureFile(path)
    frames: Frames = []
    link_types = set()
    for packet in capture.packets():
        frames.append((packet.ts_ns, packet.data))
        link_types.add(packet.link_type)
    assert len(link_types) <= 1
    return frames, link_types.pop() if link_types else LINKTYPE_ETHERNET


@pytest.mark.parametrize("path", CAPTURES, ids=lambda path: path.name)
def test_every_committed_capture_gives_the_same_calls(path: Path) -> None:
    frames, link_type = capture_frames(path)
    assert_same(frames, link_type=link_type)
    assert_same(frames, cuts=range(3, len(frames), 7), link_type=link_type)


def keep_alive_flows(connections: int, requests: int) -> Frames:
    frames: Frames = []
    body = json.dumps({"items": [1, 2, 3], "next": None, "total": 3}).encode()
    for index in range(connections):
        talk = Conversation(
            client=f"10.1.0.{index + 1}", server="10.2.0.1", client_port=30000 + index, server_port=8080
        )
        talk.now += index * 1000
        talk.handshake()
        for number in range(requests):
            talk.client_sends(
                b"GET /api/v1/orders/%d?page=%d&token=s3cr3t HTTP/1.1\r\nHost: orders:8080\r\n"
                b"Authorization: Bearer abc\r\nUser-Agent: t/1\r\n"
                b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n" % (index, number)
            )
            talk.server_sends(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            talk.raw(True, talk.client_next, talk.server_next, "A")
        talk.close()
        frames += talk.frames
    frames.sort(key=lambda frame: frame[0])
    return frames


@pytest.mark.parametrize("link_type", [LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL2, LINKTYPE_RAW])
def test_keep_alive_traffic_is_taken_by_the_lane_and_identical(link_type: int) -> None:
    frames = relinked(keep_alive_flows(connections=6, requests=20), link_type)
    dissector = assert_same(frames, cuts=range(50, len(frames), 50), link_type=link_type)
    assert dissector.lane is not None
    lane_counters = dissector.lane.counters
    # Every packet went through C but each flow's FIN, FIN, ACK: the closed flows still linger at
    # the end of input and go back then (demote_all), those three packets replayed.
    assert lane_counters["packets"] == len(frames) - 3 * 6
    assert lane_counters.get("express_flows_adopted", 0) == 6
    assert lane_counters["express_demotions"] == lane_counters["express_demotions_finish"] == 6


# -- hypothesis-made conversations ------------------------------------------------------------

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, str]:
    method = draw(st.sampled_from(["GET", "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]))
    path = "/" + draw(TOKEN)
    params = draw(
        st.lists(
            st.tuples(st.sampled_from(["page", "token", "q", "api_key", "x"]), TOKEN)
            # JSON as a value (GraphQL's GET variables), raw or %-encoded, with and without a secret key.
            | st.sampled_from(
                [
                    ("variables", '{"password":"p","id":1}'),
                    ("variables", "%7B%22token%22%3A%22t%22%7D"),
                    ("variables", '{"id":1}'),
                    ("ids", "[1,2]"),
                    # GraphQL over GET: a document whose argument is a secret.
                    ("query", 'mutation{login(password:"p"){token}}'),
                    ("query", "query%20Q%7Bme(token%3A%22t%22)%7Bid%7D%7D"),
                    ("query", "red+shoes"),
                ]
            ),
            max_size=3,
        )
    )
    if params:
        path += "?" + "&".join(f"{name}={value}" for name, value in params)
    headers = [("Host", "svc:8080")]
    extra = draw(
        st.lists(
            st.sampled_from(
                [
                    ("Authorization", "Bearer xyz"),
                    ("User-Agent", "hyp/1"),
                    ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                    ("traceparent", "00-zz-00f067aa0ba902b7-01"),
                    ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
                    ("X-B3-TraceId", "463ac35c9f6413ad"),
                    ("X-B3-SpanId", "a2fb4a1d1a96d312"),
                    ("Cookie", "a=b"),
                    ("Referer", "http://x/y?password=1"),
                    ("Expect", "100-continue"),
                    ("Connection", "Upgrade"),
                    ("Upgrade", "websocket"),
                    ("host", "dup"),
                    ("X-Odd", "trailing "),
                ]
            ),
            max_size=4,
        )
    )
    headers += extra
    body = b""
    kind = draw(
        st.sampled_from(
            ["none", "json", "secret-json", "form", "chunked", "escaped-json", "graphql", "graphql-document"]
        )
    )
    if method in ("POST", "PUT", "PATCH") and kind != "none":
        if kind == "json":
            body = b'{"name": "a", "items": [1, 2]}'
            headers.append(("Content-Type", "application/json"))
        elif kind == "secret-json":
            body = b'{"user": "a", "password": "p"}'
            headers.append(("Content-Type", "application/json"))
        elif kind == "escaped-json":
            body = b'{"pass\\u0077ord": "p", "a": "\\""}'
        elif kind == "form":
            body = b"user=a&password=p"
            headers.append(("Content-Type", "application/x-www-form-urlencoded"))
        elif kind == "graphql":
            body = b'{"query": "mutation Login { login(password: \\"p\\") { token } }", "variables": {"x": 1}}'
            headers.append(("Content-Type", "application/json"))
        elif kind == "graphql-document":
            body = b"query Q { me { id } }"
            headers.append(("Content-Type", "application/graphql"))
        if kind == "chunked":
            headers.append(("Transfer-Encoding", "chunked"))
            wire_body = b"5\r\nhello\r\n0\r\n\r\n"
        else:
            headers.append(("Content-Length", str(len(body))))
            wire_body = body
    else:
        wire_body = b""
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    return head.encode() + wire_body, method


@st.composite
def responses(draw: st.DrawFn, method: str) -> bytes:
    status = draw(st.sampled_from([200, 200, 201, 204, 304, 404, 500, 503, 100, 101]))
    prefix = b""
    if status == 100:
        prefix = b"HTTP/1.1 100 Continue\r\n\r\n"
        status = 200
    reason = draw(st.sampled_from(["OK", "", "Fine Thing"]))
    headers = [("Content-Type", draw(st.sampled_from(["application/json", "text/plain"])))]
    body = draw(st.sampled_from([b"", b'{"ok": true}', b'{"token": "t"}', b"plain text", b"x" * 3000]))
    framing = draw(st.sampled_from(["length", "length", "chunked", "gzip", "close"]))
    if status == 101:
        headers.append(("Upgrade", "websocket"))
        framing = "none"
    if method == "HEAD" or status in (204, 304):
        wire = b""
        headers.append(("Content-Length", str(len(body))))
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        wire = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    elif framing == "gzip":
        packed = gzip.compress(body)
        headers += [("Content-Encoding", "gzip"), ("Content-Length", str(len(packed)))]
        wire = packed
    elif framing == "close":
        wire = body
    elif framing == "none":
        wire = b""
    else:
        headers.append(("Content-Length", str(len(body))))
        wire = body
    status_line = f"HTTP/1.1 {status} {reason}".rstrip(" ") if reason else f"HTTP/1.1 {status}"
    head = status_line + "\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    return prefix + head.encode() + wire


@st.composite
def conversations(draw: st.DrawFn) -> Frames:
    frames: Frames = []
    flows = draw(st.integers(min_value=1, max_value=3))
    for index in range(flows):
        talk = Conversation(
            client=f"10.9.0.{index + 1}",
            server="10.9.1.1" if index % 2 else "fd00::1",
            client_port=41000 + index,
            server_port=draw(st.sampled_from([80, 8080, 9999])),
            client_isn=draw(st.sampled_from([1000, 0xFFFFFF00])),
            step_ns=draw(st.sampled_from([1_000_000, 3_000_000_000, 7_000_000_000, 11_000_000_000])),
        )
        if ":" in talk.server:
            talk.client = f"fd00::{index + 10}"
        talk.now += index * 333
        opening = draw(st.sampled_from(["handshake", "handshake", "handshake", "syn-only", "syn-retried", "syn-talks"]))
        if opening != "handshake":
            # Never answered: a handshake timeout, wherever the flow's later packets put it.
            talk.raw(True, talk.client_isn, 0, "S")
            if opening == "syn-retried":
                talk.raw(True, talk.client_isn, 0, "S")
            elif opening == "syn-talks":
                talk.client_sends(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            frames += talk.frames
            continue
        talk.handshake()
        segment = draw(st.sampled_from([1400, 50, 7]))
        for _ in range(draw(st.integers(min_value=1, max_value=4))):
            request, method = draw(requests())
            talk.client_sends(request, segment)
            if draw(st.booleans()) and draw(st.booleans()):
                second, _ = draw(requests())
                talk.client_sends(second, segment)  # pipelined: answered (or not) below
            if draw(st.integers(min_value=0, max_value=9)) == 0:
                continue  # never answered
            talk.server_sends(draw(responses(method)), segment)
            if draw(st.booleans()):
                talk.raw(True, talk.client_next, talk.server_next, "A", window=draw(st.sampled_from([65535, 0])))
        ending = draw(
            st.sampled_from(
                ["close", "close", "reset", "none", "server-closes", "close-late", "close-reuse", "fin-data"]
            )
        )
        if ending in ("close", "close-late", "close-reuse"):
            talk.close()
        elif ending == "reset":
            talk.raw(draw(st.booleans()), talk.client_next, talk.server_next, "R")
        elif ending == "server-closes":  # an idle keep-alive connection closed by the server
            talk.raw(False, talk.server_next, talk.client_next, "FA")
            talk.server_next += 1
            talk.raw(True, talk.client_next, talk.server_next, "A")
            talk.raw(True, talk.client_next, talk.server_next, "FA")
            talk.client_next += 1
            talk.raw(False, talk.server_next, talk.client_next, "A")
        elif ending == "fin-data":  # half-close, then the other side still talks
            talk.raw(True, talk.client_next, talk.server_next, "FA")
            talk.client_next += 1
            talk.server_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        if ending == "close-late":  # late packets to the closed flow: a repeated FIN, a RST
            talk.raw(False, talk.server_next - 1, talk.client_next, "FA")
            talk.raw(draw(st.booleans()), talk.client_next, talk.server_next, "R")
        if ending == "close-reuse":  # the same 4-tuple, a new connection
            talk.client_isn += 77_777
            talk.server_isn += 99_999
            talk.client_next, talk.server_next = talk.client_isn + 1, talk.server_isn + 1
            talk.handshake()
            request, method = draw(requests())
            talk.client_sends(request, segment)
            talk.server_sends(draw(responses(method)), segment)
        frames += talk.frames
    frames.sort(key=lambda frame: frame[0])
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        if len(frames) < 2:
            break
        at = draw(st.integers(min_value=0, max_value=len(frames) - 2))
        change = draw(st.sampled_from(["drop", "duplicate", "swap"]))
        if change == "drop":
            del frames[at]
        elif change == "duplicate":
            frames.insert(at, frames[at])
        else:
            frames[at], frames[at + 1] = frames[at + 1], frames[at]
    return frames


@settings(
    max_examples=scaled(200), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(frames=conversations(), data=st.data())
def test_generated_conversations_give_the_same_calls(frames: Frames, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=max(1, len(frames) - 1)), max_size=4))
    link_type = data.draw(st.sampled_from([LINKTYPE_ETHERNET, LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL2, LINKTYPE_RAW]))
    assert_same(relinked(frames, link_type), cuts, link_type)


def relinked(frames: Frames, link_type: int) -> Frames:
    """The same packets as another link type captures them (their Ethernet header replaced):
    SLL2 is what an `any` capture gives, raw IP what a tun device gives."""
    if link_type == LINKTYPE_ETHERNET:
        return frames
    out: Frames = []
    for ts, frame in frames:
        ip = frame[14:]
        if link_type == LINKTYPE_LINUX_SLL2:
            # protocol, reserved, ifindex 2, ARPHRD_ETHER, packet type (host or outgoing), address
            header = frame[12:14] + b"\x00\x00" + (2).to_bytes(4, "big") + b"\x00\x01" + bytes([ts % 5 == 0 and 4])
            header += b"\x06" + frame[6:12] + b"\x00\x00"
            out.append((ts, header + ip))
        else:
            out.append((ts, ip))
    return out


# -- DNS over UDP -------------------------------------------------------------------------------

DNS_SERVER = "10.96.0.10"
QUESTION_NAMES = [
    "orders.shop.svc.cluster.local",
    "OrDeRs.ShOp.SvC.cluster.local",  # 0x20 case randomisation
    "a.b",
    ".",
    "x\\.y.example",  # an escaped dot inside a label
    "odd\\200byte.example",
    "what?token=1.example",  # a '?' the redactor would read as a query
    "at\\@sign.example",
]
ANSWER_RECORDS = [
    ("A", ["10.0.0.1"]),
    ("A", ["10.0.0.1", "10.0.0.2", "10.0.0.1"]),
    ("AAAA", ["fd00::1", "::ffff:1.2.3.4", "::1.2.3.4", "2001:db8::", "1:0:0:1:0:0:0:1", "::"]),
    ("CNAME", ["target.example."]),
    ("MX", ["10 mx.example."]),
    ("SRV", ["0 5 5060 sip.example."]),
    ("SOA", ["ns.example. host.example. 1 7200 3600 1209600 4294967295"]),
    ("NS", ["ns1.example.", "ns2.example."]),
    ("PTR", ["p.example."]),
    ("TXT", ['"hello"']),
]


def dns_message(
    ident: int,
    name: str,
    rdtype: str,
    response: bool,
    rcode: int = 0,
    answers: Sequence[tuple[str, str, Sequence[str], int]] = (),
    edns: int = -1,
    option: int = 0,
    truncated: bool = False,
    question_name: str | None = None,
) -> bytes:
    import dns.edns
    import dns.flags
    import dns.message
    import dns.name
    import dns.rrset

    qname = dns.name.from_text(name)
    query = dns.message.make_query(
        qname, rdtype, use_edns=edns, options=[dns.edns.GenericOption(option, b"ab")] if option else None, id=ident
    )
    if not response:
        return query.to_wire()
    reply = dns.message.make_response(query)
    if question_name is not None:
        reply.question[0].name = dns.name.from_text(question_name)
    reply.set_rcode(rcode)
    for owner, kind, datas, ttl in answers:
        absolute = dns.name.from_text(owner)
        reply.answer.append(dns.rrset.from_text(absolute, ttl, "IN", kind, *datas))
    if truncated:
        reply.flags |= dns.flags.TC
    return reply.to_wire(want_shuffle=False)  # dnspython shuffles records otherwise


@st.composite
def dns_traffic(draw: st.DrawFn) -> Frames:
    from tests.unit.dissector_builders import T0, ethernet, ip_packet, udp_datagram

    frames: Frames = []
    now = T0 + draw(st.integers(min_value=0, max_value=5000))
    step = draw(st.sampled_from([1_000_000, 2_000_000_000, 31_000_000_000, 61_000_000_000]))
    server_port = draw(st.sampled_from([53, 53, 53, 5353, 9999, 137]))
    for index in range(draw(st.integers(min_value=1, max_value=4))):
        client = f"10.5.0.{index + 1}" if index % 3 else "fd00::5"
        server = "fd00::a" if ":" in client else DNS_SERVER
        port = 30000 + draw(st.integers(min_value=0, max_value=3))  # the same port again: the same flow

        def send(from_client: bool, wire: bytes, client: str = client, server: str = server, port: int = port) -> None:
            nonlocal now
            src, dst, sport, dport = (
                (client, server, port, server_port) if from_client else (server, client, server_port, port)
            )
            frames.append((now, ethernet(ip_packet(src, dst, 17, udp_datagram(sport, dport, wire)))))
            now += draw(st.sampled_from([step, 1000, 0]))

        for _ in range(draw(st.integers(min_value=1, max_value=3))):
            ident = draw(st.sampled_from([0, 7, 4242, 65535]))
            name = draw(st.sampled_from(QUESTION_NAMES))
            rdtype = draw(st.sampled_from(["A", "AAAA", "SRV", "PTR", "TXT", "MX"]))
            edns = draw(st.sampled_from([-1, 0]))
            option = draw(st.sampled_from([0, 0, 8, 12, 65001])) if edns == 0 else 0
            query = dns_message(ident, name, rdtype, False, edns=edns, option=option)
            shape = draw(
                st.sampled_from(
                    ["answered"] * 5
                    + ["unanswered", "retransmit", "response-first", "parallel", "malformed", "formerr", "swap-sides"]
                    + ["duplicate-response", "mdns-class-bits"]
                )
            )
            records = [
                (
                    draw(st.sampled_from([name, "other.example."])) if name != "." else ".",
                    kind,
                    datas,
                    draw(st.sampled_from([30, 0, 0x80000000])),
                )
                for kind, datas in draw(st.lists(st.sampled_from(ANSWER_RECORDS), max_size=3))
            ]
            reply = dns_message(
                ident,
                name,
                rdtype,
                True,
                rcode=draw(st.sampled_from([0, 0, 3, 2, 5, 16])),
                answers=records,
                edns=edns,
                truncated=draw(st.booleans()),
                question_name=name.lower() if draw(st.booleans()) else None,
            )
            if shape == "response-first":
                send(False, reply)
                continue
            if shape == "swap-sides":
                send(False, query)
                send(True, reply)
                continue
            send(True, query)
            if shape == "unanswered":
                continue
            if shape == "retransmit":
                send(True, query)
            if shape == "parallel":
                other = dns_message(ident + 1 if ident < 65535 else 1, name, "AAAA", False, edns=edns)
                send(True, other)
                if draw(st.booleans()):
                    send(False, reply)
                    send(False, dns_message(ident + 1 if ident < 65535 else 1, name, "AAAA", True, edns=edns))
                else:
                    send(False, dns_message(ident + 1 if ident < 65535 else 1, name, "AAAA", True, edns=edns))
                    send(False, reply)
                continue
            if shape == "malformed":
                at = draw(st.integers(min_value=0, max_value=len(reply) - 1))
                reply = reply[:at] + bytes([draw(st.integers(min_value=0, max_value=255))]) + reply[at + 1 :]
                if draw(st.booleans()):
                    reply = reply[: draw(st.integers(min_value=0, max_value=len(reply)))]
            if shape == "formerr":
                reply = bytes([ident >> 8, ident & 0xFF, 0x81, 0x01]) + bytes(8)
            if shape == "mdns-class-bits":
                reply = with_class_top_bits(reply)
            send(False, reply)
            if shape == "duplicate-response":
                send(False, reply)  # answered twice: counted, not a second call
    return frames


def with_class_top_bits(wire: bytes) -> bytes:
    """The message with the top bit set in every question's QCLASS and record's CLASS (but
    OPT's): mDNS's unicast-response and cache-flush bits."""
    import dns.name

    copy = bytearray(wire)
    counts = struct.unpack_from("!HHHH", wire, 4)
    position = 12
    for section, count in enumerate(counts):
        for _ in range(count):
            _name, used = dns.name.from_wire(wire, position)
            position += used
            if section == 0:
                copy[position + 2] |= 0x80
                position += 4
                continue
            rdtype, _rdclass, _ttl, rdlen = struct.unpack_from("!HHIH", wire, position)
            if rdtype != 41:
                copy[position + 2] |= 0x80
            position += 10 + rdlen
    return bytes(copy)


@st.composite
def mixed_traffic(draw: st.DrawFn) -> Frames:
    frames = draw(dns_traffic())
    if draw(st.booleans()):
        frames += draw(conversations())
    frames.sort(key=lambda frame: frame[0])
    return frames


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(frames=mixed_traffic(), data=st.data())
def test_generated_dns_traffic_gives_the_same_calls(frames: Frames, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=max(1, len(frames) - 1)), max_size=4))
    assert_same(frames, cuts)


def resolver_traffic(lookups: int) -> Frames:
    """A resolver's lookups, each from a new source port, answered; some A and AAAA in parallel."""
    from tests.unit.dissector_builders import T0, ethernet, ip_packet, udp_datagram

    frames: Frames = []
    now = T0
    for index in range(lookups):
        client, port = f"10.7.{index // 200}.{index % 200 + 1}", 20000 + index
        name = f"svc-{index % 7}.shop.svc.cluster.local"
        pairs = [("A", ["10.96.3.7"])] + ([("AAAA", ["fd00::7"])] if index % 3 == 0 else [])
        for offset, (kind, _datas) in enumerate(pairs):
            query = dns_message(index + offset, name, kind, False)
            frames.append((now, ethernet(ip_packet(client, DNS_SERVER, 17, udp_datagram(port, 53, query)))))
            now += 20_000
        for offset, (kind, datas) in enumerate(pairs):
            reply = dns_message(index + offset, name, kind, True, answers=[(name + ".", kind, datas, 30)])
            frames.append((now, ethernet(ip_packet(DNS_SERVER, client, 17, udp_datagram(53, port, reply)))))
            now += 20_000
    return frames


def test_resolver_traffic_is_taken_by_the_lane_and_identical() -> None:
    frames = resolver_traffic(300) + keep_alive_flows(connections=2, requests=5)
    frames.sort(key=lambda frame: frame[0])
    dissector = assert_same(frames, cuts=range(100, len(frames), 100))
    assert dissector.lane is not None
    lane_counters = dissector.lane.counters
    assert lane_counters.get("express_dns_flows_adopted", 0) == 300
    assert lane_counters.get("calls_dns", 0) == 400
    assert lane_counters.get("express_demotions", 0) == 2  # the two HTTP flows' FINs


def test_idle_dns_flows_end_and_timeouts_are_pythons() -> None:
    from tests.unit.dissector_builders import T0, ethernet, ip_packet, udp_datagram

    frames: Frames = []
    for index, gap in enumerate([0, 10, 31, 61, 62, 125]):
        ts = T0 + gap * 1_000_000_000
        query = dns_message(index, "late.example", "A", False)
        frames.append((ts, ethernet(ip_packet("10.8.0.1", DNS_SERVER, 17, udp_datagram(40000 + index % 2, 53, query)))))
    assert_same(frames, cuts=range(1, len(frames)))
    assert_same(frames)


@pytest.mark.parametrize("every", [1, 30, 10_000])
def test_the_udp_flow_limit_holds_across_both_paths(every: int) -> None:
    # Some lookups unanswered: an evicted flow reports its pending query as no_response.
    frames = [frame for index, frame in enumerate(resolver_traffic(120)) if index % 7 != 3]
    dissector = assert_same(frames, cuts=range(every, len(frames), every), max_flows=20)
    assert dissector.counters["udp_flows_evicted_limit"] > 0
