"""TCP reassembly and diagnostics through the engine: order, retransmission, overlap, gaps,
mid-stream starts, resets, timeouts and limits."""

from __future__ import annotations

from tests.unit.dissector_builders import T0, Conversation, batch, dissect, settings, summary
from trawl.dissector.engine import Dissector
from trawl.v1.calls_pb2 import ApiCall, Outcome

REQUEST = b"GET /items?id=1 HTTP/1.1\r\nHost: shop\r\n\r\n"
BODY = bytes(range(256)) * 20
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY


def http(calls: list[ApiCall]) -> list[ApiCall]:
    return [call for call in calls if call.protocol == "http"]


def tcp(calls: list[ApiCall], method: str) -> list[ApiCall]:
    return [call for call in calls if call.protocol == "tcp" and call.method == method]


def run(conversation: Conversation, **overrides: object) -> tuple[list[ApiCall], Dissector]:
    engine = Dissector(settings(**overrides), "n1")
    return dissect(conversation.frames, dissector=engine), engine


def clean_exchange() -> Conversation:
    return Conversation().handshake().client_sends(REQUEST).server_sends(RESPONSE, 1000).close()


def test_clean_connection_gives_one_call_and_no_diagnostics() -> None:
    calls, engine = run(clean_exchange())
    (call,) = calls
    assert (call.method, call.path, call.status) == ("GET", "/items?id=1", "200")
    assert (call.src.ip, call.src.port, call.dst.ip, call.dst.port) == ("10.0.0.1", 40000, "10.0.0.2", 80)
    assert call.response.body == BODY[: 64 * 1024] and call.node == "n1" and call.transport == "tcp"
    assert engine.counters["tcp_flows_http"] == 1 and engine.counters["tcp_flows_active"] == 0


def test_out_of_order_segments_are_put_back_in_order() -> None:
    conversation = clean_exchange()
    frames = conversation.frames
    # Frames 4.. are the request then 6 response segments: deliver the response backwards.
    response_frames = frames[4:10]
    conversation.frames = frames[:4] + response_frames[::-1] + frames[10:]
    calls, engine = run(conversation)
    (call,) = http(calls)
    assert call.response.body == BODY and engine.counters["tcp_out_of_order"] == 5
    assert engine.counters.get("tcp_gaps", 0) == 0


def test_retransmissions_are_counted_and_reported() -> None:
    conversation = clean_exchange()
    frames = conversation.frames
    conversation.frames = [*frames[:6], frames[5], frames[5], *frames[6:]]
    calls, _ = run(conversation)
    assert http(calls)[0].response.body == BODY
    (report,) = tcp(calls, "retransmission")
    assert report.status == "2" and report.tcp.retransmissions == 2
    assert report.path == "10.0.0.1:40000 -> 10.0.0.2:80" and report.outcome == Outcome.OUTCOME_OK


def test_conflicting_overlap_keeps_the_first_copy_and_is_counted() -> None:
    conversation = Conversation().handshake().client_sends(REQUEST)
    header = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    conversation.server_sends(header)
    start = conversation.server_next
    conversation.raw(False, start + 5, conversation.client_next, "PA", b"FGHIJ")  # out of order first
    conversation.raw(False, start + 3, conversation.client_next, "PA", b"xxxxx")  # overlaps it, differs
    conversation.raw(False, start, conversation.client_next, "PA", b"ABC")
    calls, engine = run(conversation)
    (call,) = http(calls)
    assert call.response.body == b"ABCxxFGHIJ"
    assert engine.counters["tcp_overlap_conflicts"] == 1
    assert "overlap-conflict" in call.notes


def test_conflicting_copy_of_delivered_bytes_is_noted_on_that_call_only() -> None:
    conversation = Conversation().handshake()
    start = conversation.client_next
    conversation.client_sends(b"GET /first HTTP/1.1\r\n\r\n")
    conversation.raw(True, start, conversation.server_next, "PA", b"GET /other HTTP/1.1\r\n\r\n")
    conversation.server_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    conversation.client_sends(b"GET /second HTTP/1.1\r\n\r\n")
    conversation.server_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    calls, _ = run(conversation.close())
    assert [(call.path, list(call.notes)) for call in http(calls)] == [
        ("/first", ["overlap-conflict"]),
        ("/second", []),
    ]


def test_bytes_acknowledged_but_never_seen_are_a_gap() -> None:
    conversation = Conversation().handshake().client_sends(REQUEST)
    header = b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n"
    conversation.server_sends(header + b"a" * 1000)
    conversation.server_next += 1000  # this segment was lost by the capture
    conversation.server_sends(b"c" * 1000)
    conversation.raw(True, conversation.client_next, conversation.server_next, "A")
    conversation.client_sends(b"GET /next HTTP/1.1\r\n\r\n")
    conversation.server_sends(b"HTTP/1.1 204 No Content\r\n\r\n")
    calls, engine = run(conversation)
    first, second = http(calls)
    assert "gap" in first.notes and first.response.body_size == 3000
    assert (second.path, second.status) == ("/next", "204")
    assert engine.counters["tcp_gaps"] == 1 and engine.counters["tcp_gap_bytes"] == 1000


def test_lost_request_head_resynchronises_at_the_next_request() -> None:
    conversation = Conversation().handshake()
    conversation.client_next += len(REQUEST)  # the first request was not captured
    conversation.client_sends(b"GET /second HTTP/1.1\r\n\r\n")
    conversation.server_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" * 2)
    calls, _ = run(conversation)
    paths = [(call.path, call.status) for call in http(calls)]
    assert ("/second", "200") in paths


def test_capture_started_mid_stream_is_oriented_by_port() -> None:
    conversation = Conversation(server_port=8080)
    conversation.client_sends(REQUEST).server_sends(RESPONSE)
    (call,) = http(run(conversation)[0])
    assert call.dst.port == 8080 and call.status == "200"


def test_mid_stream_flow_is_turned_around_by_content() -> None:
    # Both ports are high and the server's is the larger: ports point the wrong way.
    conversation = Conversation(client_port=31000, server_port=45000)
    conversation.server_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # the tail of an earlier exchange
    conversation.client_sends(b"GET /later HTTP/1.1\r\n\r\n").server_sends(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    )
    calls, engine = run(conversation)
    found = [(call.src.port, call.dst.port, call.path) for call in http(calls)]
    assert (31000, 45000, "/later") in found
    assert engine.counters["tcp_flows_turned_by_content"] == 1


def test_http_on_any_port_is_found_by_content() -> None:
    conversation = Conversation(server_port=9999).handshake().client_sends(REQUEST).server_sends(RESPONSE).close()
    assert summary(run(conversation)[0]) == [("GET", "/items?id=1", "200")]


def test_sequence_numbers_wrap() -> None:
    conversation = Conversation(client_isn=0xFFFFFFF0, server_isn=0xFFFFFF00)
    conversation.handshake().client_sends(REQUEST).server_sends(RESPONSE, 100).close()
    calls, engine = run(conversation)
    assert http(calls)[0].response.body == BODY and engine.counters.get("tcp_gaps", 0) == 0


def test_connection_refused() -> None:
    conversation = Conversation(server_port=5432)
    conversation.raw(True, conversation.client_isn, 0, "S")
    conversation.raw(False, 0, conversation.client_isn + 1, "RA")
    (refused,) = run(conversation)[0]
    assert (refused.protocol, refused.method, refused.status) == ("tcp", "refused", "1")
    assert refused.outcome == Outcome.OUTCOME_ERROR and refused.tcp.reset_by == "server"


def test_reset_mid_stream_names_the_side() -> None:
    conversation = Conversation().handshake().client_sends(REQUEST)
    conversation.raw(False, conversation.server_next, conversation.client_next, "RA")
    calls, _ = run(conversation)
    (reset,) = tcp(calls, "reset")
    assert reset.tcp.reset_by == "server" and reset.tcp.mid_stream
    (lone,) = http(calls)
    assert lone.outcome == Outcome.OUTCOME_NO_RESPONSE


def test_reset_of_an_idle_connection_is_not_mid_stream() -> None:
    conversation = Conversation().handshake().client_sends(REQUEST).server_sends(RESPONSE)
    conversation.raw(True, conversation.client_next, conversation.server_next, "A")
    conversation.raw(True, conversation.client_next, conversation.server_next, "RA")
    conversation.raw(True, conversation.client_next, conversation.server_next, "RA")  # repeated: one report
    calls, _ = run(conversation)
    (reset,) = tcp(calls, "reset")
    assert reset.tcp.reset_by == "client" and not reset.tcp.mid_stream
    assert http(calls)[0].status == "200"


def test_unanswered_syn_is_a_handshake_timeout() -> None:
    conversation = Conversation(server_port=443, step_ns=3_000_000_000)
    conversation.raw(True, conversation.client_isn, 0, "S")
    conversation.raw(True, conversation.client_isn, 0, "S")
    (timeout,) = tcp(run(conversation)[0], "handshake-timeout")
    assert (timeout.method, timeout.status, timeout.request.ts) == ("handshake-timeout", "2", T0)
    # Live, the timeout fires from expire() once handshake_timeout_s has passed.
    engine = Dissector(settings(handshake_timeout_s=5), "n1")
    assert engine.feed(batch(conversation.frames[:1])) == []
    assert tcp(engine.expire(T0 + 6_000_000_000), "handshake-timeout")


def test_a_handshake_timeout_is_found_behind_younger_flows() -> None:
    """The idle scan stops at the first young flow of the LRU; a SYN's timeout runs from the SYN,
    so a flow whose SYN was never answered is checked wherever its last packet put it."""
    unanswered = Conversation(client_port=40001, server_port=443)
    unanswered.raw(True, unanswered.client_isn, 0, "S")
    busy = Conversation(client_port=40002, server_port=443, step_ns=100_000_000)
    busy.now = T0 + 11_000_000_000
    busy.handshake()  # its last packet comes before the unanswered flow's last one
    unanswered.now = T0 + 11_900_000_000
    unanswered.raw(True, unanswered.client_isn + 1, 0, "A")  # no SYN-ACK seen, ever
    engine = Dissector(settings(handshake_timeout_s=10, express=False), "n1")
    calls = engine.feed(batch(sorted(unanswered.frames + busy.frames)))  # expires as of its newest packet
    (timeout,) = tcp(calls + engine.expire(T0 + 12_000_000_000), "handshake-timeout")
    assert timeout.src.port == 40001


def test_zero_window_is_counted() -> None:
    conversation = Conversation().handshake().client_sends(REQUEST)
    conversation.raw(True, conversation.client_next, conversation.server_next, "A", window=0)
    conversation.server_sends(RESPONSE).close()
    (report,) = tcp(run(conversation)[0], "zero-window")
    assert report.status == "1" and report.tcp.zero_windows == 1


def test_syn_flood_stays_within_max_flows() -> None:
    engine = Dissector(settings(max_flows=10), "n1")
    for port in range(1000, 1100):
        conversation = Conversation(client_port=port)
        conversation.raw(True, conversation.client_isn, 0, "S")
        engine.feed(batch(conversation.frames))
        assert engine.counters["tcp_flows_active"] <= 10
    assert engine.counters["tcp_flows_evicted_limit"] == 90


def test_out_of_order_buffer_is_bounded_per_flow() -> None:
    engine = Dissector(settings(max_bytes_per_flow=5000), "n1")
    conversation = Conversation().handshake().client_sends(b"POST /up HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
    conversation.client_next += 1000  # a hole nobody fills
    conversation.client_sends(b"x" * 20_000, 1000)
    for sequence, frame in enumerate(conversation.frames, start=1):
        engine.feed(batch([frame], sequence=sequence))
        assert engine.counters["tcp_buffered_bytes"] <= 5000
    assert engine.counters["tcp_flow_buffer_limit"] >= 1 and engine.counters["tcp_gaps"] >= 1


def test_idle_flows_are_evicted_and_end_their_requests() -> None:
    engine = Dissector(settings(flow_idle_timeout_s=60), "n1")
    conversation = Conversation().handshake().client_sends(REQUEST)
    engine.feed(batch(conversation.frames))
    (lone,) = engine.expire(T0 + 61_000_000_000)
    assert lone.outcome == Outcome.OUTCOME_NO_RESPONSE and engine.counters["tcp_flows_evicted_idle"] == 1


def test_port_reuse_after_close_starts_a_new_flow() -> None:
    first = clean_exchange()
    second = Conversation(client_isn=90000, server_isn=70000, now=first.now)
    second.handshake().client_sends(b"GET /again HTTP/1.1\r\n\r\n").server_sends(RESPONSE).close()
    calls, engine = run(Conversation(frames=first.frames + second.frames))
    assert [call.path for call in http(calls)] == ["/items?id=1", "/again"]
    assert engine.counters["tcp_flows"] == 2


def test_same_flow_on_two_nodes_is_two_flows() -> None:
    engine = Dissector(settings(), "n1")
    frames = clean_exchange().frames
    calls = engine.feed(batch(frames, node="a")) + engine.feed(batch(frames, node="b")) + engine.finish()
    assert sorted(call.node for call in http(calls)) == ["a", "b"]
    assert not tcp(calls, "retransmission")


def test_parse_error_skips_only_that_flow() -> None:
    from trawl.metrics import Registry

    metrics = Registry()
    engine = Dissector(settings(), "n1", metrics)
    bad = Conversation(client_port=1111).handshake().client_sends(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    bad.server_sends(b"HTTP/1.1 200 OK\r\nContent-Length: zz\r\n\r\n")
    good = clean_exchange()
    calls = engine.feed(batch(bad.frames)) + engine.feed(batch(good.frames)) + engine.finish()
    assert summary(calls) == [("GET", "/", ""), ("GET", "/items?id=1", "200")]
    assert "parse-error" in calls[0].notes
    assert engine.counters["parse_errors"] == 1
    assert metrics.counter("trawl_parse_errors_total", "").get(protocol="http") == 1


def test_secrets_are_redacted_before_calls_leave_the_engine() -> None:
    request = (
        b"POST /login?user=bob&password=hunter2 HTTP/1.1\r\nAuthorization: Bearer abc.def\r\n"
        b"Cookie: sid=s3cr3t\r\nContent-Type: application/json\r\nContent-Length: 41\r\n\r\n"
        b'{"user": "bob", "api_key": "k-123456789"}'
    )
    response = b"HTTP/1.1 200 OK\r\nSet-Cookie: sid=new-s3cr3t\r\nContent-Length: 0\r\n\r\n"
    conversation = Conversation().handshake().client_sends(request).server_sends(response).close()
    (call,) = run(conversation)[0]
    text = call.SerializeToString()
    for secret in (b"hunter2", b"abc.def", b"s3cr3t", b"k-123456789"):
        assert secret not in text
    assert call.path == "/login?user=bob&password=[REDACTED]"
    assert {h.name: h.value for h in call.request.headers}["Authorization"] == "[REDACTED]"


def test_keepalive_probe_is_not_a_retransmission() -> None:
    conversation = Conversation().handshake().client_sends(REQUEST).server_sends(RESPONSE)
    conversation.raw(True, conversation.client_next - 1, conversation.server_next, "A", b"\x00")
    conversation.raw(False, conversation.server_next, conversation.client_next, "A")
    calls, engine = run(conversation.close())
    assert not tcp(calls, "retransmission") and engine.counters["tcp_keepalives"] == 1


def test_websocket_after_upgrade_is_not_parsed_as_http() -> None:
    conversation = Conversation().handshake()
    conversation.client_sends(b"GET /chat HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    conversation.server_sends(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    for _ in range(5):
        conversation.client_sends(b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58")
        conversation.server_sends(b"\x81\x05Hello")
    calls, engine = run(conversation.close())
    (call,) = http(calls)
    assert call.status == "101" and call.http.upgrade == "websocket"
    assert engine.counters.get("parse_errors", 0) == 0


def test_fragmented_request_is_reassembled_end_to_end() -> None:
    import dpkt

    from tests.unit.dissector_builders import _addr, ethernet, tcp_segment

    conversation = Conversation().handshake()
    request = b"POST /frag HTTP/1.1\r\nContent-Length: 2000\r\n\r\n" + b"f" * 2000
    segment = tcp_segment(
        "10.0.0.1", "10.0.0.2", 40000, 80, conversation.client_next, conversation.server_next, "PA", request
    )
    conversation.client_next += len(request)
    pieces = []
    for offset in range(0, len(segment), 800):
        chunk = segment[offset : offset + 800]
        ip = dpkt.ip.IP(src=_addr("10.0.0.1"), dst=_addr("10.0.0.2"), p=6, id=77, data=chunk)
        ip._flags_offset = (offset // 8) | (dpkt.ip.IP_MF if offset + 800 < len(segment) else 0)
        ip.len = 20 + len(chunk)
        pieces.append(ethernet(bytes(ip)))
    for frame in reversed(pieces):
        conversation.frames.append((conversation.now, frame))
    conversation.server_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").close()
    calls, engine = run(conversation)
    (call,) = http(calls)
    assert (call.path, call.status, call.request.body_size) == ("/frag", "200", 2000)
    assert engine.counters["ip_reassembled"] == 1


def test_turning_a_flow_around_mid_delivery_keeps_held_segments_in_their_direction() -> None:
    # Ports point the wrong way (mid-stream, client port 31000 below the server's 45000). The
    # first bytes are not enough to decide; the third segment arrives before the second and is
    # held; the second decides the protocol and turns the flow around before the held one is
    # drained: it must still be delivered as client bytes.
    conversation = Conversation(client_port=31000, server_port=45000)
    pieces = [b"GET /tur", b"ned HTTP/1.1\r\nHo", b"st: x\r\n\r\n"]
    offsets = [0, len(pieces[0]), len(pieces[0]) + len(pieces[1])]
    for index in (0, 2, 1):
        seq = conversation.client_next + offsets[index]
        conversation.raw(True, seq, conversation.server_next, "PA", pieces[index])
    conversation.client_next += sum(len(piece) for piece in pieces)
    conversation.server_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    calls, engine = run(conversation)
    assert [(call.src.port, call.path, call.status) for call in http(calls)] == [(31000, "/turned", "200")]
    assert engine.counters.get("parse_errors", 0) == 0
