"""The HTTP/2 parser (protocols/http2.py) on real bytes: the captures of tests/fixtures/http2/
(recorded from real peers; expected streams from tshark with the README's decode-as rule, e.g.
`tshark -r h2_nghttp.pcap -d tcp.port==39510,http2 -Y 'http2.type==1 || http2.type==5' -T fields
-e tcp.srcport -e http2.streamid -e http2.type -e http2.header.name -e http2.header.value`), and
conversations made in memory by the `h2` library's real client and server (padding,
CONTINUATION, table size changes, trailers, resets, GOAWAY, push)."""

from __future__ import annotations

import base64
import gc
import gzip
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame

from tests.conftest import FIXTURES
from tests.unit.dissector_builders import dissect_capture, read_capture
from trawl.dissector.layers import PROTO_TCP, PacketDecoder
from trawl.dissector.protocols import http2
from trawl.dissector.protocols.base import (
    Direction,
    FlowInfo,
    NotAtBoundary,
    ParserLimits,
    ProtocolError,
)
from trawl.dissector.protocols.http2 import PREFACE, Http2Parser, h2c_request_headers, probe
from trawl.dissector.tcp import TcpFlow, TcpTable
from trawl.v1.calls_pb2 import ApiCall, Outcome

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT
HTTP2 = FIXTURES / "http2"
FLOW = FlowInfo("tcp", "10.0.0.1", 40000, "10.0.0.2", 50051)
T0 = 1_700_000_000_000_000_000


# -- reading captures ------------------------------------------------------------------------------


@dataclass
class _Recorder:
    """A StreamSink that keeps what TCP reassembly delivers, in order."""

    events: list[tuple[str, Direction, bytes, int, int]] = field(default_factory=list)

    def stream_data(self, flow: TcpFlow, direction: Direction, data: bytes, ts_ns: int) -> None:
        self.events.append(("data", direction, data, 0, ts_ns))

    def stream_gap(self, flow: TcpFlow, direction: Direction, size: int, ts_ns: int) -> None:
        self.events.append(("gap", direction, b"", size, ts_ns))

    def stream_end(self, flow: TcpFlow, ts_ns: int) -> None:
        self.events.append(("end", C2S, b"", 0, ts_ns))

    def stream_anomaly(self, flow: TcpFlow, direction: Direction, note: str, offset: int) -> None:
        pass


def capture_chunks(name: str) -> list[tuple[Direction, bytes, int]]:
    """The one TCP connection of a capture, reassembled by the project's TcpTable: (direction,
    bytes, timestamp) in delivery order."""
    link_type, frames = read_capture(HTTP2 / f"{name}.pcap")
    recorder = _Recorder()
    table = TcpTable(sink=recorder, out=[], counters={})
    decoder = PacketDecoder(max_fragments=16, max_fragment_bytes=1 << 20, fragment_timeout_ns=10**10, counters={})
    for ts_ns, frame in frames:
        packet = decoder.decode(link_type, frame, ts_ns)
        if packet is not None and packet.proto == PROTO_TCP:
            table.segment("n1", 0, packet.src, packet.dst, packet.payload, ts_ns)
    table.finish(frames[-1][0] + 1)
    assert not [event for event in recorder.events if event[0] == "gap"], "the fixtures have no capture loss"
    return [(direction, data, ts_ns) for kind, direction, data, _, ts_ns in recorder.events if kind == "data"]


def run(
    chunks: list[tuple[Direction, bytes, int]], limits: ParserLimits | None = None, parser: Http2Parser | None = None
) -> tuple[list[ApiCall], Http2Parser]:
    parser = parser or Http2Parser(FLOW, limits or ParserLimits())
    calls: list[ApiCall] = []
    for direction, data, ts_ns in chunks:
        calls += parser.feed(direction, data, ts_ns)
    calls += parser.finish(chunks[-1][2] + 1 if chunks else T0)
    return calls, parser


def streams(calls: list[ApiCall]) -> list[tuple[int, str, str, str]]:
    return sorted((call.http2.stream_id, call.method, call.path, call.status) for call in calls)


def h2_streams(calls: list[ApiCall]) -> list[tuple[int, str, str, str]]:
    """The HTTP/2 layer of each call (its pseudo-headers), whatever layer above named it."""

    def first(headers: object, name: str) -> str:
        return next(iter(header(headers, name)), "")

    return sorted(
        (
            call.http2.stream_id,
            first(call.request.headers, ":method"),
            first(call.request.headers, ":path"),
            first(call.response.headers, ":status"),
        )
        for call in calls
    )


def by_stream(calls: list[ApiCall]) -> dict[int, ApiCall]:
    found = {call.http2.stream_id: call for call in calls}
    assert len(found) == len(calls)
    return found


def header(message_headers: object, name: str) -> list[str]:
    return [entry.value for entry in message_headers if entry.name == name]  # type: ignore[attr-defined]


# -- detection -------------------------------------------------------------------------------------


def test_probe_scores_preface_frames_ports_and_other_protocols() -> None:
    server_settings = SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: 100}).serialize()
    other_port = FlowInfo("tcp", "10.0.0.1", 40000, "10.0.0.2", 7000)
    assert probe(PREFACE + server_settings, b"", other_port) == 3
    assert probe(PREFACE[:10], b"", other_port) == 2  # its start: wait for the rest
    assert probe(b"", server_settings, other_port) == 2  # a server that speaks first (nghttpd)
    assert probe(b"", server_settings + SettingsFrame(0, flags=["ACK"]).serialize(), other_port) == 2
    assert probe(b"", b"", FLOW) == 1  # 50051: a gRPC port
    assert probe(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"", FLOW) == 1
    assert probe(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 200 OK\r\n", other_port) == 0
    assert probe(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40), b"", other_port) == 0  # TLS
    assert probe(bytes(range(256)), bytes(64), other_port) == 0


def test_the_preface_is_not_taken_for_http1() -> None:
    """PRI is not an HTTP/1 method: the engine picks HTTP/2 for every prior-knowledge capture (the
    engine path, compiled lane included), and its calls are the parser's."""
    layered = {"grpc_unary": "grpc", "graphql_http2": "graphql"}  # the layers above HTTP/2 name their calls
    for name in ("h2_hypercorn_httpx", "h2_nghttp", "grpc_unary", "graphql_http2"):
        every, engine = dissect_capture(HTTP2 / f"{name}.pcap")
        calls = [call for call in every if call.protocol != "tcp"]  # TCP diagnostics aside
        assert {call.protocol for call in calls} == {layered.get(name, "http2")}, name
        assert engine.counters.get("tcp_flows_http2") == 1
        assert not engine.counters.get("parse_errors"), name
        direct, _ = run(capture_chunks(name))
        assert streams(calls) == streams(direct)


# -- the captures ----------------------------------------------------------------------------------


def test_hypercorn_httpx_conversation() -> None:
    calls, parser = run(capture_chunks("h2_hypercorn_httpx"))
    # tshark: streams 1..9, :status 200, 201, 404, 500, 200 (README).
    assert streams(calls) == [
        (1, "GET", "/orders/42", "200"),
        (3, "POST", "/orders", "201"),
        (5, "GET", "/nope", "404"),
        (7, "GET", "/boom", "500"),
        (9, "GET", "/orders/42/invoice", "200"),
    ]
    assert [call.http2.stream_id for call in calls] == [1, 3, 5, 7, 9]  # completion order
    assert not parser.counts
    calls_by_id = by_stream(calls)
    first = calls_by_id[1]
    assert first.protocol == "http2"
    assert first.outcome == Outcome.OUTCOME_OK
    assert first.http.version == "2"
    assert first.http.host == "127.0.0.1:39520"
    assert first.http.user_agent == "python-httpx/0.29.0"
    assert first.http.response_content_type == "application/json"
    assert first.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert first.parent_span_id == "00f067aa0ba902b7"
    # Pseudo-headers are kept, in order, as tshark lists them.
    assert [entry.name for entry in first.request.headers][:4] == [":method", ":authority", ":scheme", ":path"]
    assert header(first.response.headers, "content-length") == ["52"]
    assert first.response.body_size == 52 and len(first.response.body) == 52
    assert first.response.ts >= first.request.ts and first.elapsed_ns == first.response.ts - first.request.ts
    assert first.http2.request_end_stream and first.http2.response_end_stream
    post = calls_by_id[3]
    assert post.http.request_content_type == "application/json"
    assert post.request.body_size == 45  # content-length 45 in the request HEADERS
    assert post.request.body.startswith(b"{")
    assert post.http2.request_frames == 2 or post.http2.request_frames == 3
    assert calls_by_id[7].outcome == Outcome.OUTCOME_ERROR  # 500
    assert calls_by_id[5].outcome == Outcome.OUTCOME_OK  # 404 is an answer
    invoice = calls_by_id[9]
    assert invoice.http2.trailers
    assert header(invoice.response.headers, "x-invoice-sha256") == [
        "3ef491af7fbbde1c6be9653005cefe6206a189ef2add9421c8b637d5c2352205"
    ]
    for call in calls:
        # Wire sizes: every frame is at least its 9-byte header; header bytes are what HPACK sent.
        assert call.request.size >= 9 * call.http2.request_frames + call.http2.request_header_bytes
        assert call.response.size >= 9 * call.http2.response_frames + call.http2.response_header_bytes


def test_nghttp_conversation_with_a_push() -> None:
    calls, parser = run(capture_chunks("h2_nghttp"))
    # tshark: nghttp's PRIORITY frames claim idle streams 3..11, so its requests are streams 13,
    # 15, 17, 19; the PUSH_PROMISE on stream 13 promises stream 2 (/style.css).
    assert streams(calls) == [
        (2, "GET", "/style.css", "200"),
        (13, "GET", "/index.html", "200"),
        (15, "GET", "/orders.json", "200"),
        (17, "GET", "/large.bin", "200"),
        (19, "GET", "/missing.txt", "404"),
    ]
    assert not parser.counts
    calls_by_id = by_stream(calls)
    pushed = calls_by_id[2]
    assert pushed.http2.pushed and pushed.http2.parent_stream_id == 13
    assert not calls_by_id[13].http2.pushed
    assert pushed.request.ts >= calls_by_id[13].request.ts
    assert pushed.http2.request_end_stream and pushed.http2.response_end_stream
    large = calls_by_id[17]
    # 100 KiB in many DATA frames (flow control): the body is bounded, its size is not.
    assert large.response.body_size == 100 * 1024
    assert len(large.response.body) == ParserLimits().max_body_bytes
    assert large.response.body_truncated == 100 * 1024 - ParserLimits().max_body_bytes
    assert large.http2.response_frames > 3


def test_grpc_unary_capture() -> None:
    calls, parser = run(capture_chunks("grpc_unary"))
    assert len(calls) == 56
    assert {(call.method, call.path) for call in calls} == {("POST", "/trawl.fixtures.Orders/GetOrder")}
    # tshark: RST_STREAM CANCEL from the client on streams 5 (the deadline) and 7 (the
    # cancellation), sent before any response frame of theirs; stream 5's answer (:status 200,
    # grpc-status 4) crossed the reset and arrives for a stream already reported.
    reset = sorted(
        (call.http2.stream_id, call.http2.reset_error, call.http2.reset_by) for call in calls if call.http2.reset_error
    )
    assert reset == [(5, "CANCEL", "client"), (7, "CANCEL", "client")]
    # The gRPC layer: stream 5 is the deadline (its reset came once grpc-timeout 201m had
    # elapsed), 7 the cancellation, 3 NOT_FOUND in a Trailers-Only answer, the rest OK.
    outcomes = {call.http2.stream_id: (call.status, call.outcome) for call in calls}
    assert outcomes.pop(5) == ("", Outcome.OUTCOME_DEADLINE_EXCEEDED)
    assert outcomes.pop(7) == ("", Outcome.OUTCOME_CANCELLED)
    assert outcomes.pop(3) == ("5", Outcome.OUTCOME_ERROR)
    assert set(outcomes.values()) == {("0", Outcome.OUTCOME_OK)}
    assert all(call.protocol == "grpc" and header(call.response.headers, ":status") in ([], ["200"]) for call in calls)
    assert parser.counts == {"http2_unknown_stream_frames": 2}  # stream 5's HEADERS and RST_STREAM
    large = by_stream(calls)[11]
    # The 200 KiB call: two DATA frames each way (131,042 + 73,776 bytes on the request, over
    # grpc-core's 4 MiB SETTINGS_MAX_FRAME_SIZE), plus HEADERS and trailers.
    assert large.http2.request_frames == 3 and large.http2.response_frames == 4
    assert large.request.body_size == 131_042 + 73_776
    traced = by_stream(calls)[1]
    assert traced.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert header(traced.request.headers, "authorization") == ["Bearer fixture-secret-token"]


@pytest.mark.parametrize(
    ("name", "expected", "resets"),
    [
        # tshark: 4 calls each; resets as the README's test_http2_fixtures counts, minus those on
        # streams already ended (a RST_STREAM after both END_STREAMs closes nothing).
        ("grpc_server_streaming", [(s, "POST", "/trawl.fixtures.Orders/ListOrders", "200") for s in (1, 3, 5, 7)],
         {5: ("CANCEL", "client"), 7: ("CANCEL", "client")}),
        ("grpc_client_streaming", [(1, "POST", "/trawl.fixtures.Orders/UploadOrders", "200"),
                                   (3, "POST", "/trawl.fixtures.Orders/UploadOrders", "200"),
                                   (5, "POST", "/trawl.fixtures.Orders/UploadOrders", "200"),
                                   (7, "POST", "/trawl.fixtures.Orders/UploadOrders", "")],
         {7: ("CANCEL", "client")}),
        # Streams 3 and 7: the server ended its side (trailers) and reset the client's half with
        # NO_ERROR (RFC 9113 section 8.1): complete answers, outcome ok.
        ("grpc_bidi", [(s, "POST", "/trawl.fixtures.Orders/Chat", "200") for s in (1, 3, 5, 7)],
         {3: ("NO_ERROR", "server"), 5: ("CANCEL", "client"), 7: ("NO_ERROR", "server")}),
        ("graphql_http2", [(s, "POST", "/graphql", "200") for s in (1, 3, 5, 7, 11, 13, 15)]
         + [(9, "GET", "/graphql?query=query+OrderStatus+%7B+order%28id%3A+%229%22%29+%7B+status+%7D+%7D", "200")],
         {}),
    ],
)  # fmt: skip
def test_grpc_and_graphql_captures(
    name: str, expected: list[tuple[int, str, str, str]], resets: dict[int, tuple[str, str]]
) -> None:
    calls, _ = run(capture_chunks(name))
    assert h2_streams(calls) == sorted(expected)
    assert {
        call.http2.stream_id: (call.http2.reset_error, call.http2.reset_by) for call in calls if call.http2.reset_error
    } == resets
    for call in calls:
        complete = call.http2.request_end_stream and call.http2.response_end_stream
        if call.protocol == "grpc":
            # The gRPC layer judges (tests/unit/test_grpc.py): its status, or the client's cancel.
            if call.http2.reset_error == "CANCEL" and not call.status:
                assert call.outcome in (Outcome.OUTCOME_CANCELLED, Outcome.OUTCOME_DEADLINE_EXCEEDED)
            else:
                assert complete or call.http2.reset_error == "NO_ERROR", call.http2.stream_id
                assert (call.outcome == Outcome.OUTCOME_OK) == (call.status == "0"), call.http2.stream_id
        elif complete:
            assert call.outcome in (Outcome.OUTCOME_OK, Outcome.OUTCOME_ERROR), call.http2.stream_id  # GraphQL errors
        else:
            assert call.outcome == Outcome.OUTCOME_ERROR and call.http2.reset_error == "CANCEL"


def _upgrade_parts(chunks: list[tuple[Direction, bytes, int]]) -> tuple[bytes, int, int]:
    """The HTTP/1.1 request head, and where each direction's HTTP/2 bytes start."""
    client = b"".join(data for direction, data, _ in chunks if direction == C2S)
    server = b"".join(data for direction, data, _ in chunks if direction == S2C)
    request_end = client.index(b"\r\n\r\n") + 4
    response_end = server.index(b"\r\n\r\n") + 4
    assert server.startswith(b"HTTP/1.1 101 ")
    assert client[request_end:].startswith(PREFACE)
    return client[:request_end], request_end, response_end


def test_h2c_upgrade_from_curl() -> None:
    """The bytes after curl's HTTP/1.1 Upgrade request and hypercorn's 101, fed after
    start_upgraded (as the engine will once an HTTP/1 parser reports the 101)."""
    chunks = capture_chunks("h2c_upgrade_curl")
    head, request_end, response_end = _upgrade_parts(chunks)
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, _ = request_line.split(" ")
    fields = [line.split(": ", 1) for line in lines if line]
    headers = [(name.encode(), value.encode()) for name, value in fields]
    settings_header = dict((name, value) for name, value in fields)["HTTP2-Settings"]
    settings = base64.urlsafe_b64decode(settings_header + "=" * (-len(settings_header) % 4))
    parser = Http2Parser(FLOW, ParserLimits())
    first_ts = chunks[0][2]
    parser.start_upgraded(
        h2c_request_headers(method.encode(), target.encode(), headers), first_ts, first_ts, request_end, settings
    )
    assert parser.settings[C2S]  # curl's HTTP2-Settings
    calls: list[ApiCall] = []
    seen = [0, 0]
    for direction, data, ts_ns in chunks:
        start = (request_end, response_end)[direction]
        skip = max(0, start - seen[direction])
        seen[direction] += len(data)
        if skip < len(data):
            calls += parser.feed(direction, data[skip:], ts_ns)
    calls += parser.finish(chunks[-1][2] + 1)
    # tshark: GET /orders/42 answered 200 on stream 1, GET /nope 404 on stream 3; curl's
    # RST_STREAM STREAM_CLOSED on stream 1 comes after its response ended.
    assert streams(calls) == [(1, "GET", "/orders/42", "200"), (3, "GET", "/nope", "404")]
    upgraded = by_stream(calls)[1]
    assert upgraded.http2.upgraded and "h2c-upgrade" in upgraded.notes
    assert upgraded.request.size == request_end
    assert upgraded.http.host == "127.0.0.1:39511"
    assert upgraded.outcome == Outcome.OUTCOME_OK
    assert header(upgraded.request.headers, "upgrade") == ["h2c"]
    assert not by_stream(calls)[3].http2.upgraded
    assert parser.counts == {"http2_unknown_stream_frames": 1}  # the late RST_STREAM


# -- conversations made by h2 ----------------------------------------------------------------------


class Talk:
    """An h2 client and server talking in memory; every byte each sent, in order."""

    def __init__(self) -> None:
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.chunks: list[tuple[Direction, bytes, int]] = []
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.flush()

    def flush(self) -> Talk:
        while True:
            sent = self.client.data_to_send()
            if sent:
                self.chunks.append((C2S, sent, T0 + len(self.chunks) * 1_000_000))
                self.server.receive_data(sent)
            answered = self.server.data_to_send()
            if answered:
                self.chunks.append((S2C, answered, T0 + len(self.chunks) * 1_000_000))
                self.client.receive_data(answered)
            if not sent and not answered:
                return self

    def request(self, stream_id: int, path: str, extra: list[tuple[str, str]] = (), body: bytes = b"") -> Talk:  # type: ignore[assignment]
        headers = [(":method", "POST" if body else "GET"), (":path", path), (":scheme", "http"), (":authority", "svc")]
        self.client.send_headers(stream_id, headers + list(extra), end_stream=not body)
        if body:
            self.client.send_data(stream_id, body, end_stream=True)
        return self.flush()

    def respond(
        self,
        stream_id: int,
        status: str = "200",
        body: bytes = b"",
        extra: list[tuple[str, str]] = (),  # type: ignore[assignment]
        trailers: list[tuple[str, str]] | None = None,
        pad: int | None = None,
    ) -> Talk:
        self.server.send_headers(stream_id, [(":status", status), *extra], end_stream=not body and trailers is None)
        if body:
            self.server.send_data(stream_id, body, end_stream=trailers is None, pad_length=pad)
        if trailers is not None:
            self.server.send_headers(stream_id, trailers, end_stream=True)
        return self.flush()


def test_padding_trailers_and_a_gzip_body() -> None:
    payload = b'{"order": 42, "items": ["a", "b", "c"]}' * 20
    talk = Talk().request(1, "/orders/42", [("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")])
    talk.respond(1, body=gzip.compress(payload), extra=[("content-encoding", "gzip")], pad=17,
                 trailers=[("x-checksum", "abc")])  # fmt: skip
    calls, parser = run(talk.chunks)
    assert not parser.counts
    (call,) = calls
    assert call.http2.padding == 17
    assert call.response.body == payload  # decoded for display, as HTTP/1 does
    assert call.response.body_size == len(gzip.compress(payload))
    assert call.http.content_encoding == "gzip"
    assert call.http2.trailers and header(call.response.headers, "x-checksum") == ["abc"]
    assert call.trace_id == "0af7651916cd43dd8448eb211c80319c"


def test_padded_headers_with_priority_built_frame_by_frame() -> None:
    """h2 does not pad HEADERS: these frames are hyperframe's and the blocks hpack's encoder's."""
    client, server = Encoder(), Encoder()
    fields = [(":method", "GET"), (":path", "/p"), (":scheme", "http"), (":authority", "a")]
    flags = ["END_HEADERS", "END_STREAM", "PADDED", "PRIORITY"]
    request = HeadersFrame(1, data=client.encode(fields), flags=flags, pad_length=9, stream_weight=200)
    response = HeadersFrame(1, data=server.encode([(":status", "204")]), flags=["END_HEADERS", "PADDED"], pad_length=3)
    data = DataFrame(1, data=b"", flags=["END_STREAM", "PADDED"], pad_length=5)
    settings = SettingsFrame(0).serialize()
    chunks = [
        (C2S, PREFACE + settings + request.serialize(), T0),
        (S2C, settings + response.serialize() + data.serialize(), T0 + 5),
    ]
    calls, parser = run(chunks)
    assert streams(calls) == [(1, "GET", "/p", "204")]
    assert calls[0].http2.padding == 9 + 3 + 5
    assert calls[0].http2.response_frames == 2
    assert not parser.counts


def test_large_headers_in_continuation_frames() -> None:
    big = "x" * 40_000  # over the 16 KiB max frame size: h2 continues the block
    talk = Talk().request(1, "/big", [("x-big", big)])
    talk.respond(1, extra=[("x-big-answer", big[:20_000])])
    calls, parser = run(talk.chunks)
    (call,) = calls
    assert header(call.request.headers, "x-big") == [big]
    assert header(call.response.headers, "x-big-answer") == [big[:20_000]]
    assert call.http2.request_frames >= 3  # HEADERS + CONTINUATIONs
    assert call.http2.request_header_bytes > 16_384
    assert not parser.counts


@pytest.mark.parametrize("table_size", [0, 256, 16_384])
def test_header_table_size_settings(table_size: int) -> None:
    """The client's SETTINGS_HEADER_TABLE_SIZE: the server's encoder resizes its table (a dynamic
    table size update at the start of its next block) and every response still decodes."""
    talk = Talk().request(1, "/first")
    talk.respond(1, extra=[("x-a", "1"), ("x-b", "2")])
    talk.client.update_settings({SettingCodes.HEADER_TABLE_SIZE: table_size})
    talk.flush()
    for stream_id in range(3, 15, 2):
        talk.request(stream_id, f"/n/{stream_id}", [("x-request", str(stream_id))])
        talk.respond(stream_id, extra=[("x-a", "1"), ("x-b", str(stream_id)), ("x-long", "v" * 300)])
    calls, parser = run(talk.chunks)
    assert not parser.counts
    assert len(calls) == 7
    for call in calls[1:]:
        stream_id = call.http2.stream_id
        assert call.path == f"/n/{stream_id}" and call.status == "200"
        assert header(call.response.headers, "x-b") == [str(stream_id)]
        assert header(call.response.headers, "x-long") == ["v" * 300]
    assert parser.readers[S2C].decoder.header_table.maxsize == table_size
    assert parser.settings[C2S][SettingCodes.HEADER_TABLE_SIZE] == table_size


def test_reset_goaway_refusal_and_interim_response() -> None:
    talk = Talk().request(1, "/cancelled").request(3, "/continued").request(5, "/refused").request(7, "/refused-too")
    talk.client.reset_stream(1, ErrorCodes.CANCEL)
    talk.flush()
    talk.server.send_headers(3, [(":status", "100")])
    talk.flush()
    # The server answers stream 3, then says it processed nothing above 3.
    talk.respond(3, body=b"done")
    talk.server.close_connection(error_code=ErrorCodes.NO_ERROR, last_stream_id=3)
    talk.flush()
    calls, parser = run(talk.chunks)
    calls_by_id = by_stream(calls)
    cancelled = calls_by_id[1]
    assert cancelled.outcome == Outcome.OUTCOME_ERROR
    assert (cancelled.http2.reset_error, cancelled.http2.reset_by) == ("CANCEL", "client")
    assert not cancelled.status
    answered = calls_by_id[3]
    assert answered.status == "200" and answered.outcome == Outcome.OUTCOME_OK
    assert "100-continue" in answered.notes
    assert header(answered.response.headers, ":status") == ["200", "100"]
    for stream_id in (5, 7):
        refused = calls_by_id[stream_id]
        assert refused.outcome == Outcome.OUTCOME_ERROR
        assert refused.http2.goaway_error == "NO_ERROR" and "refused" in refused.notes
    assert [call.http2.stream_id for call in calls] == [1, 3, 5, 7]  # completion order
    assert parser.goaways[S2C] == (3, 0)


def test_server_push_made_by_h2() -> None:
    talk = Talk().request(1, "/index.html")
    talk.server.push_stream(
        1, 2, [(":method", "GET"), (":path", "/app.js"), (":scheme", "http"), (":authority", "svc")]
    )
    talk.server.send_headers(2, [(":status", "200"), ("content-type", "text/javascript")])
    talk.server.send_data(2, b"alert(1)", end_stream=True)
    talk.respond(1, body=b"<html></html>")
    calls, parser = run(talk.chunks)
    assert streams(calls) == [(1, "GET", "/index.html", "200"), (2, "GET", "/app.js", "200")]
    pushed = by_stream(calls)[2]
    assert pushed.http2.pushed and pushed.http2.parent_stream_id == 1
    assert pushed.response.body == b"alert(1)"
    assert pushed.http.response_content_type == "text/javascript"
    assert [call.http2.stream_id for call in calls] == [2, 1]
    assert parser.last_ids == [1, 2]


def test_expire_and_finish() -> None:
    talk = Talk().request(1, "/slow").request(3, "/half").request(5, "/open")
    talk.server.send_headers(3, [(":status", "200")])
    talk.server.send_data(3, b"part")
    talk.flush()
    parser = Http2Parser(FLOW, ParserLimits(request_timeout_ns=5_000_000_000))
    for direction, data, ts_ns in talk.chunks:
        assert parser.feed(direction, data, ts_ns) == []
    assert parser.expire(T0 + 1_000_000_000) == []
    # Streams 1 and 5 have no answer, stream 3 has one under way: only the unanswered expire.
    expired = parser.expire(T0 + 60_000_000_000)
    assert [call.http2.stream_id for call in expired] == [1, 5]
    for call in expired:
        assert call.outcome == Outcome.OUTCOME_NO_RESPONSE and "timeout" in call.notes
    (half,) = parser.finish(T0 + 61_000_000_000)
    assert (half.http2.stream_id, half.status, half.outcome) == (3, "200", Outcome.OUTCOME_OK)
    assert "truncated" in half.notes and half.response.body == b"part"
    assert not half.http2.response_end_stream
    # A flow that ends with a request unanswered: no_response.
    lone = Talk().request(1, "/lone")
    calls, _ = run(lone.chunks)
    assert [(call.outcome, list(call.notes)) for call in calls] == [(Outcome.OUTCOME_NO_RESPONSE, [])]


# -- limits and bad input --------------------------------------------------------------------------


def test_open_stream_limit() -> None:
    talk = Talk()
    for stream_id in (1, 3, 5):
        talk.request(stream_id, f"/p{stream_id}")
    for stream_id in (1, 3, 5):
        talk.respond(stream_id, body=b"ok")
    calls, parser = run(talk.chunks, ParserLimits(max_pending_requests=2))
    assert streams(calls) == [(1, "GET", "/p1", "200"), (3, "GET", "/p3", "200")]
    assert parser.counts["http2_streams_over_limit"] == 1
    assert parser.counts["http2_unknown_stream_frames"] == 2  # stream 5's response HEADERS and DATA


def test_header_block_limit_keeps_the_table_right() -> None:
    talk = Talk().request(1, "/one", [("x-big", "y" * 3000)])
    talk.respond(1)
    talk.request(3, "/two", [("x-big", "y" * 3000)])  # indexed: refers to the entry block 1 added
    talk.respond(3)
    calls, parser = run(talk.chunks, ParserLimits(max_header_bytes=2048))
    first, second = calls
    assert "headers-too-large" in first.notes and not first.method and not first.request.headers
    assert parser.counts["http2_header_blocks_over_limit"] == 1
    # The second block is small (indexed fields) and decodes right: the first was still fed to HPACK.
    assert (second.method, second.path, second.status) == ("GET", "/two", "200")
    assert header(second.request.headers, "x-big") == ["y" * 3000]


def test_body_limit() -> None:
    talk = Talk().request(1, "/upload", body=b"a" * 5000)
    talk.respond(1, body=b"b" * 7000)
    calls, _ = run(talk.chunks, ParserLimits(max_body_bytes=1000))
    (call,) = calls
    assert (len(call.request.body), call.request.body_size, call.request.body_truncated) == (1000, 5000, 4000)
    assert (len(call.response.body), call.response.body_size, call.response.body_truncated) == (1000, 7000, 6000)


def test_bytes_that_are_not_http2() -> None:
    with pytest.raises(ProtocolError):
        Http2Parser(FLOW, ParserLimits()).feed(C2S, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", T0)
    parser = Http2Parser(FLOW, ParserLimits())
    parser.feed(C2S, PREFACE, T0)
    with pytest.raises(ProtocolError):
        parser.feed(S2C, b"\x00\x80\x00\x00\x00\x00\x00\x00\x00", T0)  # 32 KiB frame: over the 16 KiB default


def test_malformed_frames_are_counted_and_skipped() -> None:
    talk = Talk().request(1, "/a")
    talk.respond(1, body=b"first")
    talk.request(3, "/b")
    talk.respond(3, body=b"second")
    chunks = list(talk.chunks)
    bad_settings = b"\x00\x00\x07\x04\x00\x00\x00\x00\x00" + bytes(7)  # SETTINGS of 7 bytes
    bad_ping = b"\x00\x00\x03\x06\x00\x00\x00\x00\x00" + bytes(3)  # PING of 3 bytes
    corrupt_block = b"\x00\x00\x02\x01\x05\x00\x00\x00\x09\xff\xff"  # HEADERS, stream 9: an HPACK integer cut short
    position = next(index for index, chunk in enumerate(chunks) if chunk[0] == C2S and index > 2)
    direction, data, ts_ns = chunks[position]
    chunks[position] = (direction, bad_settings + bad_ping + data, ts_ns)
    calls, parser = run(chunks)
    assert streams(calls)[:2] == [(1, "GET", "/a", "200"), (3, "GET", "/b", "200")] or streams(calls)
    assert parser.counts["http2_malformed_frames"] == 2
    chunks.append((C2S, corrupt_block, chunks[-1][2] + 1))
    calls, parser = run(chunks)
    assert parser.counts["http2_hpack_errors"] == 1
    lost = by_stream(calls)[9]
    assert "hpack-error" in lost.notes and lost.outcome == Outcome.OUTCOME_NO_RESPONSE


# -- mid-connection starts and gaps ----------------------------------------------------------------


def test_placeholder_entries_after_a_cut() -> None:
    """A capture that starts after request 1: request 2's fields that index entries request 1 added
    read "[unknown]" with a note; request 3's new entries are learnt, so request 4 decodes fully.
    An entry whose name came from an unseen entry keeps an unknown name (x-tenant: green)."""
    talk = Talk().request(1, "/a", [("x-tenant", "blue")])
    talk.respond(1)
    cut = len(talk.chunks)
    talk.request(3, "/a", [("x-tenant", "blue")])
    talk.respond(3)
    talk.request(5, "/c", [("x-tenant", "green"), ("x-zone", "north")])
    talk.respond(5)
    talk.request(7, "/c", [("x-tenant", "green"), ("x-zone", "north")])
    talk.respond(7)
    parser = Http2Parser(FLOW, ParserLimits())
    parser.gap(C2S, 0, T0)
    parser.gap(S2C, 0, T0)
    calls, _ = run(talk.chunks[cut:], parser=parser)
    calls_by_id = by_stream(calls)
    assert sorted(calls_by_id) == [3, 5, 7]
    second = calls_by_id[3]
    assert second.method == "GET" and second.status == "200"
    assert "hpack-unknown-entry" in second.notes
    assert second.path == ""  # its :path was an indexed entry never seen: not guessed
    assert ("[unknown]", "[unknown]") in [(entry.name, entry.value) for entry in second.request.headers]
    # Request 4: :authority indexes the entry request 1 added (never seen); x-tenant's name came
    # from that request too, its value from request 3; x-zone and :path are entries request 3 added.
    fourth = calls_by_id[7]
    assert [(entry.name, entry.value) for entry in fourth.request.headers] == [
        (":method", "GET"), (":path", "/c"), (":scheme", "http"), ("[unknown]", "[unknown]"),
        ("[unknown]", "green"), ("x-zone", "north"),
    ]  # fmt: skip
    assert fourth.path == "/c" and fourth.status == "200"


def _frame_starts(stream: bytes, start: int) -> list[tuple[int, int, int, int]]:
    """(offset, type, stream id, length) of every frame from `start`, read with plain arithmetic
    (an oracle independent of the parser's reading)."""
    frames = []
    pos = start
    while pos + 9 <= len(stream):
        length = int.from_bytes(stream[pos : pos + 3], "big")
        frames.append((pos, stream[pos + 3], int.from_bytes(stream[pos + 5 : pos + 9], "big") & 0x7FFFFFFF, length))
        pos += 9 + length
    return frames


def _sync_point(frames: list[tuple[int, int, int, int]], cut: int) -> int | None:
    """Where a resynchronisation after a cut at `cut` is sure to land: the first frame boundary
    after it followed by three frames of at most 16 KiB (the default max frame size; after a
    mid-connection start the receiver's SETTINGS are unknown)."""
    for index, (offset, _, _, _) in enumerate(frames):
        if offset >= cut:
            following = frames[index : index + 3]
            if len(following) == 3 and all(length <= 16_384 for *_, length in following):
                return offset
    return None


@pytest.mark.parametrize("name", ["h2_hypercorn_httpx", "grpc_unary", "graphql_http2", "grpc_bidi"])
def test_mid_connection_starts(name: str) -> None:
    """Cut the capture at many chunk boundaries and inside chunks: every call whose request
    HEADERS start after the cut, with at least three frames after the first frame boundary of each
    direction (what a resynchronisation needs), is found with its method and status, and its path
    unless the path was an unseen table entry (then the call says so); no other call is made."""
    chunks = capture_chunks(name)
    full = by_stream(run(chunks)[0])
    client = b"".join(data for direction, data, _ in chunks if direction == C2S)
    server = b"".join(data for direction, data, _ in chunks if direction == S2C)
    frames = (_frame_starts(client, len(PREFACE)), _frame_starts(server, 0))
    first_request: dict[int, int] = {}
    for offset, kind, stream_id, _ in frames[C2S]:
        if kind == 1:
            first_request.setdefault(stream_id, offset)
    first_response: dict[int, int] = {}
    for offset, kind, stream_id, _ in frames[S2C]:
        if kind in (1, 5):
            first_response.setdefault(stream_id, offset)
    step = max(1, len(chunks) // 40)
    checked = 0
    for index in range(1, len(chunks), step):
        for inside in (0, 5, 13):
            direction, data, ts_ns = chunks[index]
            if inside >= len(data):
                continue
            cut_chunks = [(direction, data[inside:], ts_ns), *chunks[index + 1 :]]
            offsets = [0, 0]
            for earlier_direction, earlier, _ in chunks[:index]:
                offsets[earlier_direction] += len(earlier)
            offsets[direction] += inside
            parser = Http2Parser(FLOW, ParserLimits())
            parser.gap(C2S, 0, ts_ns)
            parser.gap(S2C, 0, ts_ns)
            calls, _ = run(cut_chunks, parser=parser)
            found = by_stream(calls)
            for stream_id, call in found.items():
                reference = full[stream_id]  # nothing invented
                assert call.method == reference.method
                assert call.path == reference.path or (not call.path and "hpack-unknown-entry" in call.notes)
                if call.protocol != reference.protocol:
                    # What said gRPC / GraphQL was an unseen table entry or body: plain HTTP/2 then.
                    assert call.protocol == "http2" and "hpack-unknown-entry" in call.notes, (stream_id, call)
                    continue
                assert call.status in (reference.status, "")
            request_sync = _sync_point(frames[C2S], offsets[C2S])
            response_sync = _sync_point(frames[S2C], offsets[S2C])
            for stream_id, request_at in first_request.items():
                if request_sync is None or request_at < request_sync or stream_id not in full:
                    continue
                response_at = first_response.get(stream_id)
                assert stream_id in found, (index, inside, stream_id)
                answered = response_at is not None and response_sync is not None and response_at >= response_sync
                if answered and found[stream_id].protocol == full[stream_id].protocol:
                    assert found[stream_id].status == full[stream_id].status, (index, inside, stream_id)
                checked += 1
    assert checked > 20


def test_a_gap_inside_data_and_a_gap_between_frames() -> None:
    talk = Talk().request(1, "/one")
    talk.respond(1, body=b"z" * 3000)
    talk.request(3, "/two")
    talk.respond(3, body=b"w" * 10)
    calls, _ = run(talk.chunks)
    assert len(calls) == 2
    # Lose 1000 bytes of the first response's DATA payload: framing survives.
    chunks = []
    for direction, data, ts_ns in talk.chunks:
        at = data.find(b"z" * 1000)
        if direction == S2C and at >= 0:
            chunks.append((direction, data[:at], ts_ns))
            chunks.append((direction, b"", -1000))
            chunks.append((direction, data[at + 1000 :], ts_ns))
        else:
            chunks.append((direction, data, ts_ns))
    parser = Http2Parser(FLOW, ParserLimits())
    out: list[ApiCall] = []
    for direction, data, ts_ns in chunks:
        out += parser.gap(direction, 1000, T0) if ts_ns == -1000 else parser.feed(direction, data, ts_ns)
    out += parser.finish(T0 + 10**9)
    first, second = out
    assert "gap" in first.notes and first.response.body_size == 3000 and len(first.response.body) == 2000
    assert first.outcome == Outcome.OUTCOME_OK and "gap" not in second.notes


@pytest.mark.parametrize(
    "name", ["h2_hypercorn_httpx", "grpc_unary", "grpc_server_streaming", "grpc_client_streaming", "grpc_bidi"]
)
def test_snapshot_and_restore_at_every_boundary(name: str) -> None:
    """At every frame boundary, streams open or not, a parser restored from the snapshot gives
    the calls the one that saw everything gives (the compiled lane hands flows back this way)."""
    chunks = capture_chunks(name)
    full, _ = run(chunks)
    parser = Http2Parser(FLOW, ParserLimits())
    done: list[ApiCall] = []
    boundaries = with_streams = 0
    for position, (direction, data, ts_ns) in enumerate(chunks):
        done += parser.feed(direction, data, ts_ns)
        try:
            state = parser.snapshot()
        except NotAtBoundary:
            # Mid-frame, or a stream the state does not describe (a compressed message, a note).
            mid_frame = any(reader.buf or reader.state != http2.HEADER for reader in parser.readers)
            assert mid_frame or position == 0 or parser.streams
            continue
        boundaries += 1
        with_streams += bool(state.streams)
        fresh = Http2Parser(FLOW, ParserLimits())
        fresh.restore(state)
        assert fresh.snapshot() == state
        rest, _ = run(chunks[position + 1 :], parser=fresh)
        assert [call.SerializeToString() for call in done + rest] == [call.SerializeToString() for call in full]
    assert boundaries >= 4
    if name != "h2_hypercorn_httpx":
        assert with_streams >= 1  # restored with a gRPC stream open, its message readers mid-way
    talk = Talk().request(1, "/open")
    opened = Http2Parser(FLOW, ParserLimits())
    for direction, data, ts_ns in talk.chunks:
        opened.feed(direction, data[:-1], ts_ns)  # the last frame cut short
    with pytest.raises(NotAtBoundary):
        opened.snapshot()


def test_spec_is_registered() -> None:
    from trawl.dissector.protocols import registry

    assert http2.SPEC in registry.tcp_specs()
    assert http2.SPEC.name == "http2" and 50051 in http2.SPEC.ports
    assert Path(http2.__file__).name == "http2.py"


def test_finished_streams_are_freed_without_the_garbage_collector() -> None:
    """A stream, its message readers and header lists go when its call is made: a reference
    cycle per stream (a data sink holding its stream) left them all to the collector, which
    then cost about a tenth of the dissection time."""
    chunks = capture_chunks("grpc_unary")
    run(chunks)  # warm the per-process caches
    gc.collect()
    gc.disable()
    try:
        calls, _ = run(chunks)
        assert len(calls) == 56
        assert gc.collect() == 0
    finally:
        gc.enable()
