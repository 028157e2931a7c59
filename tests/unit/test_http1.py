"""HTTP/1.x parser (sans-IO): framing, pairing, upgrades, bodies, trace context, gaps, limits."""

from __future__ import annotations

import gzip
import zlib

import pytest

from trawl.dissector.protocols.base import Direction, FlowInfo, ParserLimits, ProtocolError
from trawl.dissector.protocols.http1 import Http1Parser, probe
from trawl.v1.calls_pb2 import ApiCall, Outcome

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT
FLOW = FlowInfo("tcp", "10.0.0.1", 40000, "10.0.0.2", 8080, node="n1")


def run(*steps: tuple[Direction, bytes], limits: ParserLimits | None = None, finish: bool = True) -> list[ApiCall]:
    """Feed each (direction, bytes) at t = 1000, 2000, ...; then finish."""
    parser = Http1Parser(FLOW, limits or ParserLimits())
    calls: list[ApiCall] = []
    ts = 0
    for direction, data in steps:
        ts += 1000
        calls += parser.feed(direction, data, ts)
    if finish:
        calls += parser.finish(ts + 1000)
    return calls


def triple(calls: list[ApiCall]) -> list[tuple[str, str, str]]:
    return [(call.method, call.path, call.status) for call in calls]


def test_keep_alive_pairs_each_request_with_its_response() -> None:
    calls = run(
        (C2S, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"),
        (S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA"),
        (C2S, b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"),
        (S2C, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
    )
    assert triple(calls) == [("GET", "/a", "200"), ("POST", "/b", "404")]
    first, second = calls
    assert first.request.ts == 1000 and first.response.ts == 2000 and first.elapsed_ns == 1000
    assert first.response.body == b"A" and first.http.reason == "OK" and first.http.version == "1.1"
    assert second.request.body == b"abc"
    # 4xx is an answer: ok with its status (module docstring); 5xx is an error.
    assert second.outcome == Outcome.OUTCOME_OK


def test_wire_sizes_count_head_and_framed_body() -> None:
    request = b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    (call,) = run((C2S, request), (S2C, response))
    assert call.request.size == len(request)
    assert call.response.size == len(response)
    assert call.request.body == b"abc" and call.request.body_size == 3
    assert call.http.chunked_request


def test_pipelined_requests_pair_in_order() -> None:
    requests = b"".join(f"GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(5))
    statuses = [200, 201, 202, 203, 206]  # not 204: it has no body
    responses = b"".join(f"HTTP/1.1 {statuses[i]} OK\r\nContent-Length: 1\r\n\r\n{i}".encode() for i in range(5))
    calls = run((C2S, requests), (S2C, responses))
    assert triple(calls) == [("GET", f"/{i}", str(statuses[i])) for i in range(5)]
    assert [call.response.body for call in calls] == [str(i).encode() for i in range(5)]


def test_chunked_response_with_trailers() -> None:
    response = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
        b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nX-Checksum: abc\r\n\r\n"
    )
    (call,) = run((C2S, b"GET / HTTP/1.1\r\n\r\n"), (S2C, response))
    assert call.response.body == b"Wikipedia"
    assert call.http.chunked_response
    assert ("X-Checksum", "abc") in [(h.name, h.value) for h in call.response.headers]
    assert call.response.size == len(response)


def test_close_delimited_body_ends_with_the_flow() -> None:
    calls = run((C2S, b"GET / HTTP/1.0\r\n\r\n"), (S2C, b"HTTP/1.0 200 OK\r\n\r\npart one "), (S2C, b"part two"))
    (call,) = calls
    assert call.response.body == b"part one part two"
    assert call.outcome == Outcome.OUTCOME_OK and "truncated" not in call.notes


def test_head_and_bodiless_statuses_do_not_eat_the_next_response() -> None:
    calls = run(
        (C2S, b"HEAD /h HTTP/1.1\r\n\r\nGET /n HTTP/1.1\r\n\r\nGET /m HTTP/1.1\r\n\r\nGET /ok HTTP/1.1\r\n\r\n"),
        (S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
        (S2C, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"),
        (S2C, b"HTTP/1.1 204 No Content\r\n\r\n"),
        (S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    )
    assert triple(calls) == [("HEAD", "/h", "200"), ("GET", "/n", "304"), ("GET", "/m", "204"), ("GET", "/ok", "200")]
    assert calls[-1].response.body == b"ok"


def test_100_continue_is_noted_not_paired() -> None:
    calls = run(
        (C2S, b"PUT /u HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"),
        (S2C, b"HTTP/1.1 100 Continue\r\n\r\n"),
        (C2S, b"data"),
        (S2C, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"),
    )
    (call,) = calls
    assert call.status == "201" and "100-continue" in call.notes
    assert call.request.body == b"data"
    assert call.response.size == len(b"HTTP/1.1 100 Continue\r\n\r\n") + len(
        b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    )


def test_websocket_upgrade_is_reported_and_parsing_stops() -> None:
    calls = run(
        (C2S, b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
        (S2C, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi"),
        (C2S, b"\x81\x82\x00\x00\x00\x00hi not http at all"),
    )
    (call,) = calls
    assert call.status == "101" and call.http.upgrade == "websocket"


def test_a_101_without_connection_upgrade_is_still_an_upgrade() -> None:
    """llhttp pauses after every 101 head; httptools reports it as an error unless the response
    says `Connection: upgrade`. A passive observer reports what the peers did."""
    calls = run(
        (C2S, b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
        (S2C, b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\n\r\n\x81\x02hi"),
    )
    (call,) = calls
    assert call.status == "101" and call.http.upgrade == "websocket"
    assert "parse-error" not in call.notes


def test_h2c_upgrade_is_noted() -> None:
    calls = run(
        (
            C2S,
            b"GET / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMA\r\n\r\n",
        ),
        (
            S2C,
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n\x00\x00\x00\x04\x00",
        ),
    )
    (call,) = calls
    assert call.http.upgrade == "h2c" and "h2c" in call.notes


def test_an_accepted_h2c_upgrade_hands_over_the_request_and_the_bytes_after_it() -> None:
    """What the engine gives the HTTP/2 parser: the upgrade request as HTTP/2 headers (stream
    1), the client's SETTINGS from HTTP2-Settings, and each side's bytes after HTTP/1."""
    parser = Http1Parser(FLOW, ParserLimits())
    request = (
        b"GET /index HTTP/1.1\r\nHost: example:8080\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nUser-Agent: curl/8\r\n\r\n"
    )
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    server_settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    assert parser.feed(C2S, request, 1000) == []
    assert parser.upgrade is None
    # The client does not wait for the 101 here: its preface is held until the answer comes.
    assert parser.feed(C2S, preface, 1500) == []
    (call,) = parser.feed(S2C, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n" + server_settings, 2000)
    assert call.status == "101" and "h2c" in call.notes
    upgrade = parser.upgrade
    assert upgrade is not None
    assert upgrade.request_headers == [
        (b":method", b"GET"),
        (b":path", b"/index"),
        (b":scheme", b"http"),
        (b":authority", b"example:8080"),
        (b"user-agent", b"curl/8"),
    ]
    # SETTINGS_MAX_CONCURRENT_STREAMS = 100, SETTINGS_INITIAL_WINDOW_SIZE = 65535 (base64url, unpadded).
    assert upgrade.settings == bytes.fromhex("000300000064000400 00ffff".replace(" ", ""))
    assert (upgrade.client_rest, upgrade.server_rest) == (preface, server_settings)
    assert (upgrade.request_ts_ns, upgrade.request_size) == (1000, len(request))
    # HTTP/1 is done with the flow.
    assert parser.feed(C2S, b"\x00\x00\x00\x04\x01\x00\x00\x00\x00", 3000) == []


def test_refused_upgrade_keeps_parsing_http() -> None:
    calls = run(
        (C2S, b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nGET /next HTTP/1.1\r\n\r\n"),
        (
            S2C,
            b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ),
    )
    assert triple(calls) == [("GET", "/ws", "426"), ("GET", "/next", "200")]


def test_connect_tunnel_stops_parsing() -> None:
    calls = run(
        (C2S, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"),
        (S2C, b"HTTP/1.1 200 Connection Established\r\n\r\n"),
        (C2S, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
        (S2C, b"\x16\x03\x03\x00\x5a\x02"),
    )
    (call,) = calls
    assert (call.method, call.path, call.status) == ("CONNECT", "example.com:443", "200")
    assert call.http.upgrade == "tunnel"


def test_gzip_and_deflate_bodies_are_decoded_for_display() -> None:
    text = b'{"hello": "world"}' * 10
    packed = gzip.compress(text)
    deflated = zlib.compress(text)
    calls = run(
        (C2S, b"GET /g HTTP/1.1\r\n\r\nGET /d HTTP/1.1\r\n\r\n"),
        (S2C, b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(packed) + packed),
        (S2C, b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nContent-Length: %d\r\n\r\n" % len(deflated) + deflated),
    )
    assert [call.response.body for call in calls] == [text, text]
    assert calls[0].response.body_size == len(packed) and calls[0].http.content_encoding == "gzip"


def test_body_is_bounded_by_the_limit() -> None:
    body = b"x" * 10_000
    (call,) = run(
        (C2S, b"POST / HTTP/1.1\r\nContent-Length: 10000\r\n\r\n" + body),
        (S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        limits=ParserLimits(max_body_bytes=100),
    )
    assert call.request.body == b"x" * 100
    assert call.request.body_size == 10_000 and call.request.body_truncated == 9_900


def test_traceparent_and_b3_fill_the_trace_fields() -> None:
    calls = run(
        (
            C2S,
            b"GET /w3c HTTP/1.1\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
            b"tracestate: congo=t61rcWkgMzE\r\n\r\n"
            b"GET /b3 HTTP/1.1\r\nb3: 80f198ee56343ba8-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90\r\n\r\n"
            b"GET /multi HTTP/1.1\r\nX-B3-TraceId: 463ac35c9f6413ad48485a3953bb6124\r\n"
            b"X-B3-SpanId: a2fb4a1d1a96d312\r\n\r\n",
        ),
        (S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" * 3),
    )
    w3c, b3, multi = calls
    assert (w3c.trace_id, w3c.parent_span_id, w3c.trace_state) == (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "00f067aa0ba902b7",
        "congo=t61rcWkgMzE",
    )
    assert (b3.trace_id, b3.parent_span_id) == ("000000000000000080f198ee56343ba8", "e457b5a2e4d86bd1")
    assert (multi.trace_id, multi.parent_span_id) == ("463ac35c9f6413ad48485a3953bb6124", "a2fb4a1d1a96d312")


def test_server_error_is_an_error_outcome() -> None:
    (call,) = run(
        (C2S, b"GET / HTTP/1.1\r\n\r\n"), (S2C, b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    )
    assert call.outcome == Outcome.OUTCOME_ERROR and call.status == "503"


def test_lone_requests_become_no_response_at_finish_and_on_timeout() -> None:
    parser = Http1Parser(FLOW, ParserLimits(request_timeout_ns=5_000))
    assert parser.feed(C2S, b"GET /slow HTTP/1.1\r\n\r\n", 1_000) == []
    assert parser.expire(5_000) == []
    (timed_out,) = parser.expire(7_000)
    assert timed_out.outcome == Outcome.OUTCOME_NO_RESPONSE and "timeout" in timed_out.notes
    parser.feed(C2S, b"GET /never HTTP/1.1\r\n\r\n", 8_000)
    (unanswered,) = parser.finish(9_000)
    assert unanswered.path == "/never" and unanswered.outcome == Outcome.OUTCOME_NO_RESPONSE


def test_gap_inside_a_body_keeps_framing() -> None:
    parser = Http1Parser(FLOW, ParserLimits())
    parser.feed(C2S, b"GET / HTTP/1.1\r\n\r\nGET /two HTTP/1.1\r\n\r\n", 1)
    assert parser.feed(S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab", 2) == []
    assert parser.gap(S2C, 5, 3) == []
    (first,) = parser.feed(S2C, b"cde", 4)
    assert first.response.body_size == 10 and "gap" in first.notes
    (second,) = parser.feed(S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 5)
    assert second.path == "/two"


def test_gap_in_a_head_resynchronises_at_the_next_request_line() -> None:
    parser = Http1Parser(FLOW, ParserLimits())
    parser.feed(C2S, b"GET /lost HTTP/1.1\r\nHo", 1)
    parser.gap(C2S, 100, 2)
    parser.feed(C2S, b"garbage tail of something\r\n\r\nGET /found HTTP/1.1\r\nHost: x\r\n\r\n", 3)
    (call,) = parser.feed(S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 4)
    assert call.path == "/found" and "gap" in call.notes


def test_invalid_bytes_raise_protocol_error() -> None:
    parser = Http1Parser(FLOW, ParserLimits())
    with pytest.raises(ProtocolError):
        parser.feed(C2S, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 1)


def test_a_never_ending_header_is_bounded() -> None:
    parser = Http1Parser(FLOW, ParserLimits(max_header_bytes=4096))
    parser.feed(C2S, b"GET / HTTP/1.1\r\n", 1)
    for ts in range(36):  # 36 lines of 112 bytes still fit in 4096
        parser.feed(C2S, b"X-Filler: " + b"a" * 100 + b"\r\n", ts)
    with pytest.raises(ProtocolError, match="longer than"):
        parser.feed(C2S, b"X-Filler: " + b"a" * 100 + b"\r\n", 40)


def test_a_huge_content_length_keeps_only_the_body_limit() -> None:
    parser = Http1Parser(FLOW, ParserLimits(max_body_bytes=1024))
    parser.feed(C2S, b"POST / HTTP/1.1\r\nContent-Length: 10000000000\r\n\r\n", 1)
    for ts in range(200):
        parser.feed(C2S, b"z" * 65536, ts)
    reader = parser.readers[C2S]
    assert len(reader.body) == 1024 and reader.body_size == 200 * 65536 and reader.buf == b""


def test_many_pipelined_requests_without_responses_stay_bounded() -> None:
    parser = Http1Parser(FLOW, ParserLimits(max_pending_requests=10))
    dropped: list[ApiCall] = []
    for ts in range(100):
        dropped += parser.feed(C2S, b"GET /%d HTTP/1.1\r\n\r\n" % ts, ts)
    assert len(parser.pending) == 10
    assert len(dropped) == 90 and all("pending-limit" in call.notes for call in dropped)


def test_response_without_request_is_reported() -> None:
    (call,) = run((S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    assert call.status == "200" and "response without request" in call.notes


@pytest.mark.parametrize(
    ("client", "server", "port", "expected"),
    [
        (b"GET /x HTTP/1.1\r\n", b"", 9999, 3),
        (b"", b"HTTP/1.1 200 OK\r\n", 9999, 3),
        (b"POST /x", b"", 9999, 2),
        (b"\x00GET /x HTTP/1.1\r\n", b"", 9999, 2),
        (b"\x16\x03\x01", b"", 80, 1),
        (b"\x16\x03\x01", b"", 9999, 0),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"", 9999, 0),
    ],
)
def test_probe(client: bytes, server: bytes, port: int, expected: int) -> None:
    flow = FlowInfo("tcp", "10.0.0.1", 40000, "10.0.0.2", port)
    assert probe(client, server, flow) == expected


def test_a_late_response_to_a_timed_out_request_is_not_paired_with_the_next() -> None:
    parser = Http1Parser(FLOW, ParserLimits(request_timeout_ns=5_000))
    parser.feed(C2S, b"GET /slow HTTP/1.1\r\n\r\n", 1_000)
    (timed_out,) = parser.expire(10_000)
    assert timed_out.path == "/slow" and timed_out.outcome == Outcome.OUTCOME_NO_RESPONSE
    parser.feed(C2S, b"GET /fast HTTP/1.1\r\n\r\n", 11_000)
    assert parser.feed(S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow", 12_000) == []
    (fast,) = parser.feed(S2C, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", 13_000)
    assert (fast.path, fast.status) == ("/fast", "201")
    assert timed_out.status == ""  # the call already reported is not changed afterwards


def test_a_long_upload_is_not_timed_out_while_it_is_being_sent() -> None:
    parser = Http1Parser(FLOW, ParserLimits(request_timeout_ns=5_000))
    parser.feed(C2S, b"PUT /big HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345", 1_000)
    assert parser.expire(10_000) == []
    parser.feed(C2S, b"67890", 11_000)
    (call,) = parser.feed(S2C, b"HTTP/1.1 204 No Content\r\n\r\n", 12_000)
    assert call.status == "204" and call.request.body == b"1234567890"


def test_resynchronisation_keeps_its_buffer_bounded_and_finds_a_split_request_line() -> None:
    parser = Http1Parser(FLOW, ParserLimits())
    parser.gap(C2S, 10, 1)
    for ts in range(20):
        parser.feed(C2S, b"u" * 4000, ts)
        assert len(parser.readers[C2S].buf) <= 8192
    parser.feed(C2S, b"uuuGET /after HT", 30)
    parser.feed(C2S, b"TP/1.1\r\n\r\n", 31)
    (call,) = parser.feed(S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 32)
    assert call.path == "/after" and "gap" in call.notes


def test_a_body_in_an_unknown_coding_is_not_published() -> None:
    (call,) = run(
        (C2S, b"GET /export HTTP/1.1\r\n\r\n"),
        (S2C, b"HTTP/1.1 200 OK\r\nContent-Encoding: compress\r\nContent-Length: 6\r\n\r\nsecret"),
    )
    assert call.response.body == b"" and call.response.body_truncated == 6 and "body-not-decoded" in call.notes
    (broken,) = run(
        (C2S, b"GET /broken HTTP/1.1\r\n\r\n"),
        (S2C, b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 6\r\n\r\nsecret"),
    )
    assert broken.response.body == b"" and "body-not-decoded" in broken.notes


def test_protocol_errors_do_not_quote_the_bytes() -> None:
    parser = Http1Parser(FLOW, ParserLimits())
    with pytest.raises(ProtocolError) as caught:
        parser.feed(C2S, b"GET /a?token=XK9secret&q=a b HTTP/1.1\r\nHost: x\r\n\r\n", 1)
    assert "XK9secret" not in str(caught.value)


@pytest.mark.parametrize(
    "terminator", [[b"0\r\n\r\n"], [b"0\r\n", b"\r\n"], [b"0", b"\r\n\r", b"\n"]], ids=["whole", "two", "three"]
)
def test_a_stray_chunk_terminator_after_a_chunked_head_response_is_skipped_and_counted(
    terminator: list[bytes],
) -> None:
    """A server that says "chunked" to HEAD and then sends the empty body's terminator anyway:
    the next exchange on the connection still pairs."""
    parser = Http1Parser(FLOW, ParserLimits())
    steps = [
        (C2S, b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n"),
        (S2C, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        *((S2C, piece) for piece in terminator),
        (C2S, b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"),
        (S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nB"),
    ]
    calls = [call for ts, (direction, data) in enumerate(steps, 1) for call in parser.feed(direction, data, ts)]
    assert triple(calls) == [("HEAD", "/a", "200"), ("GET", "/b", "200")]
    assert calls[1].response.body == b"B"
    assert parser.counts == {"http_stray_chunk_terminators": 1}


def test_after_a_chunked_head_response_a_response_that_starts_with_0_is_not_eaten() -> None:
    """Only the exact terminator is skipped, once: the next response head is read as it is."""
    calls = run(
        (C2S, b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"),
        (S2C, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"),
    )
    assert triple(calls) == [("HEAD", "/a", "200"), ("GET", "/b", "204")]
