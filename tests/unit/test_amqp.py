"""The AMQP 0-9-1 parser on frames built with pamqp (the codec the parser decodes with): pairing
per channel, one-way messages with their content reassembled, broker closes, credentials,
bounds, gaps and the state at an exchange boundary. The recordings of a real RabbitMQ are in
test_amqp_oracle.py and test_amqp_analyze.py."""

from __future__ import annotations

import struct

import pytest
from pamqp import body as amqp_body
from pamqp import commands, frame, header
from pamqp.base import Frame

from trawl.dissector.protocols.amqp import (
    HARD_FRAME_MAX,
    PROTOCOL_HEADER,
    SPEC,
    AmqpParser,
    AmqpState,
    probe,
)
from trawl.dissector.protocols.base import Direction, FlowInfo, NotAtBoundary, ParserLimits, ProtocolError
from trawl.v1.calls_pb2 import ApiCall, Outcome

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT
FLOW = FlowInfo("tcp", "10.0.0.1", 40000, "10.0.0.2", 5672)
T0 = 1_700_000_000_000_000_000
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def method(value: Frame, channel: int = 1) -> bytes:
    return frame.marshal(value, channel)


def content(body: bytes, channel: int = 1, frame_size: int = 4096, **properties: object) -> bytes:
    """A content header and the body cut into body frames of at most `frame_size` bytes."""
    head = header.ContentHeader(0, len(body), commands.Basic.Properties(**properties))  # type: ignore[arg-type]
    frames = [frame.marshal(head, channel)]
    for start in range(0, len(body), frame_size):
        frames.append(frame.marshal(amqp_body.ContentBody(body[start : start + frame_size]), channel))
    return b"".join(frames)


def feed_all(parser: AmqpParser, steps: list[tuple[Direction, bytes]], step_ns: int = 1000) -> list[ApiCall]:
    calls: list[ApiCall] = []
    for index, (direction, data) in enumerate(steps):
        calls += parser.feed(direction, data, T0 + index * step_ns)
    return calls


def new(limits: ParserLimits | None = None) -> AmqpParser:
    return AmqpParser(FLOW, limits or ParserLimits())


def test_probe_takes_the_protocol_header_then_frames_then_the_port() -> None:
    assert probe(PROTOCOL_HEADER, b"", FLOW) == 3
    other = FlowInfo("tcp", "10.0.0.1", 40000, "10.0.0.2", 9999)
    mid = method(commands.Basic.Publish(exchange="x", routing_key="k"))
    assert probe(mid, b"", other) == 2
    assert probe(b"", frame.marshal(commands.Connection.Start(), 0), other) == 2
    assert probe(b"GET / HTTP/1.1\r\n", b"", other) == 0
    assert probe(b"AMQP\x00\x01\x00\x00", b"", other) == 0  # AMQP 1.0 is another protocol
    assert probe(b"", b"", FLOW) == 1
    assert SPEC.name == "amqp" and 5672 in SPEC.ports


def test_synchronous_methods_pair_with_their_ok_per_channel() -> None:
    parser = new()
    calls = feed_all(
        parser,
        [
            (C2S, PROTOCOL_HEADER),
            (C2S, method(commands.Queue.Declare(queue="a"), 1)),
            (C2S, method(commands.Queue.Declare(queue="b"), 2)),
            (S2C, method(commands.Queue.DeclareOk(queue="b", message_count=3, consumer_count=0), 2)),
            (S2C, method(commands.Queue.DeclareOk(queue="a", message_count=0, consumer_count=0), 1)),
            (C2S, method(commands.Basic.Qos(prefetch_count=10), 1)),
            (S2C, method(commands.Basic.QosOk(), 1)),
        ],
    )
    assert [(c.method, c.path, c.status, c.amqp.channel, c.amqp.response_method) for c in calls] == [
        ("queue.declare", "b", "ok", 2, "queue.declare-ok"),
        ("queue.declare", "a", "ok", 1, "queue.declare-ok"),
        ("basic.qos", "", "ok", 1, "basic.qos-ok"),
    ]
    assert calls[0].amqp.properties["message-count"] == "3"
    assert calls[1].elapsed_ns == 3000 and calls[1].outcome == Outcome.OUTCOME_OK
    assert (calls[1].amqp.class_name, calls[1].amqp.method_name) == ("queue", "declare")
    assert parser.snapshot().ordinal == 3


def test_a_broker_request_pairs_with_the_client_answer_and_credentials_are_never_published() -> None:
    password = b"s3cret-Hunter2"
    amqplain = b"\x05LOGINS\x00\x00\x00\x05guest\x08PASSWORDS" + struct.pack(">I", len(password)) + password
    for mechanism, response in (("PLAIN", b"\x00guest\x00" + password), ("AMQPLAIN", amqplain)):
        parser = new()
        start = commands.Connection.Start(
            server_properties={"product": "RabbitMQ", "version": "3.10.8"}, mechanisms="AMQPLAIN PLAIN"
        )
        start_ok = commands.Connection.StartOk(
            client_properties={"product": "pika"}, mechanism=mechanism, response=response.decode("latin-1")
        )
        calls = feed_all(
            parser,
            [
                (C2S, PROTOCOL_HEADER),
                (S2C, method(start, 0)),
                (C2S, method(start_ok, 0)),
                (S2C, method(commands.Connection.Secure(challenge="c"), 0)),
                (C2S, method(commands.Connection.SecureOk(response=password.decode()), 0)),
            ],
        )
        assert [(c.method, c.amqp.response_method, c.amqp.from_server) for c in calls] == [
            ("connection.start", "connection.start-ok", True),
            ("connection.secure", "connection.secure-ok", True),
        ]
        properties = calls[0].amqp.properties
        assert properties["mechanism"] == mechanism and properties["response"] == "[REDACTED]"
        assert properties["server.product"] == "RabbitMQ" and properties["client.product"] == "pika"
        for call in calls:
            assert password not in call.SerializeToString(), mechanism


def test_a_publish_is_one_way_with_its_properties_headers_trace_and_body() -> None:
    parser = new(ParserLimits(max_body_bytes=1000))
    body = bytes(range(256)) * 10
    publish = method(commands.Basic.Publish(exchange="orders", routing_key="created", mandatory=True))
    data = publish + content(
        body,
        frame_size=1000,
        content_type="application/json",
        correlation_id="c-1",
        reply_to="replies",
        message_id="m-1",
        delivery_mode=2,
        headers={"traceparent": TRACEPARENT, "tracestate": "k=v", "x-tenant": "acme", "n": 7},
    )
    calls: list[ApiCall] = []
    for index in range(len(data)):  # byte by byte: the same call as in one piece
        calls += parser.feed(C2S, data[index : index + 1], T0)
    [call] = calls
    assert [c.SerializeToString() for c in new(ParserLimits(max_body_bytes=1000)).feed(C2S, data, T0)] == [
        call.SerializeToString()
    ]
    assert (call.method, call.path, call.status, call.outcome) == (
        "basic.publish",
        "orders/created",
        "ok",
        Outcome.OUTCOME_OK,
    )
    detail = call.amqp
    assert detail.one_way and not detail.from_server
    assert (detail.exchange, detail.routing_key) == ("orders", "created")
    assert dict(detail.properties) == {
        "content-type": "application/json",
        "correlation-id": "c-1",
        "reply-to": "replies",
        "message-id": "m-1",
        "delivery-mode": "2",
    }
    assert {(h.name, h.value) for h in call.request.headers} >= {("x-tenant", "acme"), ("n", "7")}
    assert (call.trace_id, call.parent_span_id, call.trace_state) == (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "00f067aa0ba902b7",
        "k=v",
    )
    assert call.request.body == body[:1000]
    assert (call.request.body_size, call.request.body_truncated) == (2560, 1560)
    assert call.request.size == len(data)
    assert not call.HasField("response") or not call.response.ts


def test_deliveries_name_their_consumer_queue_and_acks_nacks_rejects_are_one_way() -> None:
    parser = new()
    calls = feed_all(
        parser,
        [
            (C2S, method(commands.Basic.Consume(queue="jobs", consumer_tag=""))),
            (S2C, method(commands.Basic.ConsumeOk(consumer_tag="ctag-1"))),
            (S2C, method(commands.Basic.Deliver("ctag-1", 1, False, "", "jobs")) + content(b"one")),
            (S2C, method(commands.Basic.Deliver("ctag-1", 2, False, "", "jobs")) + content(b"")),
            (C2S, method(commands.Basic.Ack(delivery_tag=1))),
            (C2S, method(commands.Basic.Nack(delivery_tag=2, multiple=True, requeue=False))),
            (C2S, method(commands.Basic.Reject(delivery_tag=3, requeue=True))),
        ],
    )
    consume, first, second, ack, nack, reject = calls
    assert (consume.path, consume.amqp.consumer_tag) == ("jobs", "ctag-1")
    assert (first.method, first.path, first.amqp.queue, first.amqp.delivery_tag) == (
        "basic.deliver",
        "/jobs",
        "jobs",
        1,
    )
    assert first.amqp.from_server and first.request.body == b"one"
    assert second.request.body_size == 0 and not second.notes
    assert (ack.method, ack.amqp.delivery_tag, ack.amqp.one_way, ack.status) == ("basic.ack", 1, True, "ok")
    assert (nack.amqp.multiple, nack.amqp.requeue, nack.outcome) == (True, False, Outcome.OUTCOME_OK)
    assert (reject.method, reject.amqp.requeue) == ("basic.reject", True)


def test_basic_get_carries_its_message_in_the_response_and_get_empty_answers_too() -> None:
    parser = new()
    calls = feed_all(
        parser,
        [
            (C2S, method(commands.Basic.Get(queue="jobs"))),
            (S2C, method(commands.Basic.GetOk(delivery_tag=5, exchange="", routing_key="jobs", message_count=0))),
            (S2C, content(b"payload", message_id="m")),
            (C2S, method(commands.Basic.Get(queue="jobs"))),
            (S2C, method(commands.Basic.GetEmpty())),
        ],
    )
    got, empty = calls
    assert (got.method, got.path, got.amqp.response_method, got.amqp.delivery_tag) == (
        "basic.get",
        "jobs",
        "basic.get-ok",
        5,
    )
    assert got.response.body == b"payload" and got.amqp.properties["message-id"] == "m"
    assert got.outcome == Outcome.OUTCOME_OK and got.elapsed_ns == 1000
    assert (empty.amqp.response_method, empty.status) == ("basic.get-empty", "ok")


def test_a_channel_close_answers_the_request_it_refused_and_is_a_call_itself() -> None:
    parser = new()
    text = "NOT_FOUND - no queue 'missing' in vhost '/'"
    calls = feed_all(
        parser,
        [
            (C2S, method(commands.Queue.Declare(queue="missing", passive=True))),
            (S2C, method(commands.Channel.Close(reply_code=404, reply_text=text, class_id=50, method_id=10))),
            (C2S, method(commands.Channel.CloseOk())),
        ],
    )
    declare, close = calls
    assert (declare.method, declare.status, declare.outcome) == ("queue.declare", "404", Outcome.OUTCOME_ERROR)
    assert (declare.amqp.reply_code, declare.amqp.reply_text, declare.amqp.response_method) == (
        404,
        text,
        "channel.close",
    )
    assert (close.method, close.status, close.outcome, close.amqp.from_server) == (
        "channel.close",
        "404",
        Outcome.OUTCOME_ERROR,
        True,
    )
    assert close.amqp.properties["failed-method"] == "queue.declare"
    assert close.amqp.response_method == "channel.close-ok"


def test_a_normal_close_is_ok_and_a_refused_login_is_an_error_without_close_ok() -> None:
    parser = new()
    calls = feed_all(
        parser,
        [
            (
                C2S,
                method(
                    commands.Connection.Close(reply_code=200, reply_text="Normal shutdown", class_id=0, method_id=0), 0
                ),
            ),
            (S2C, method(commands.Connection.CloseOk(), 0)),
        ],
    )
    assert [(c.method, c.status, c.outcome) for c in calls] == [("connection.close", "200", Outcome.OUTCOME_OK)]
    parser = new()
    refused = commands.Connection.Close(reply_code=403, reply_text="ACCESS_REFUSED", class_id=0, method_id=0)
    calls = parser.feed(S2C, method(refused, 0), T0) + parser.finish(T0 + 1)
    assert [(c.method, c.status, c.outcome) for c in calls] == [("connection.close", "403", Outcome.OUTCOME_ERROR)]


def test_returns_and_broker_nacks_are_errors_broker_acks_are_confirms() -> None:
    parser = new()
    calls = feed_all(
        parser,
        [
            (C2S, method(commands.Confirm.Select())),
            (S2C, method(commands.Confirm.SelectOk())),
            (S2C, method(commands.Basic.Return(312, "NO_ROUTE", "", "nowhere")) + content(b"x")),
            (S2C, method(commands.Basic.Ack(delivery_tag=1))),
            (S2C, method(commands.Basic.Nack(delivery_tag=2))),
        ],
    )
    select, returned, ack, nack = calls
    assert parser.confirm_channels == {1}
    assert (returned.method, returned.path, returned.status, returned.outcome) == (
        "basic.return",
        "/nowhere",
        "312",
        Outcome.OUTCOME_ERROR,
    )
    assert returned.amqp.reply_text == "NO_ROUTE" and returned.request.body == b"x"
    assert (ack.amqp.from_server, ack.outcome) == (True, Outcome.OUTCOME_OK)
    assert (nack.status, nack.outcome) == ("nack", Outcome.OUTCOME_ERROR)
    assert select.amqp.response_method == "confirm.select-ok"


def test_nowait_methods_are_one_way_and_heartbeats_are_counted_not_reported() -> None:
    parser = new()
    heartbeat = b"\x08\x00\x00\x00\x00\x00\x00\xce"
    calls = feed_all(
        parser,
        [
            (C2S, heartbeat),
            (C2S, method(commands.Exchange.Declare(exchange="x", nowait=True))),
            (S2C, heartbeat + heartbeat),
        ],
    )
    [declare] = calls
    assert (declare.method, declare.amqp.one_way, declare.amqp.properties["nowait"]) == (
        "exchange.declare",
        True,
        "true",
    )
    assert parser.counts == {"amqp_heartbeats": 3}


def test_pending_requests_are_bounded_and_counted() -> None:
    parser = new(ParserLimits(max_pending_requests=2))
    calls = feed_all(parser, [(C2S, method(commands.Queue.Declare(queue=f"q{i}"))) for i in range(3)])
    [dropped] = calls
    assert (dropped.path, dropped.outcome, list(dropped.notes)) == (
        "q0",
        Outcome.OUTCOME_NO_RESPONSE,
        ["pending-limit"],
    )
    assert parser.counts["amqp_pending_limit"] == 1
    assert [c.path for c in parser.finish(T0 + 10)] == ["q1", "q2"]


def test_a_timed_out_request_is_reported_and_its_late_answer_pairs_with_nothing_else() -> None:
    parser = new(ParserLimits(request_timeout_ns=10))
    parser.feed(C2S, method(commands.Queue.Declare(queue="slow")), T0)
    [late] = parser.expire(T0 + 100)
    assert (late.path, late.outcome, list(late.notes)) == ("slow", Outcome.OUTCOME_NO_RESPONSE, ["timeout"])
    calls = feed_all(
        parser,
        [
            (C2S, method(commands.Queue.Declare(queue="next"))),
            (S2C, method(commands.Queue.DeclareOk(queue="slow", message_count=0, consumer_count=0))),
            (S2C, method(commands.Queue.DeclareOk(queue="next", message_count=0, consumer_count=0))),
        ],
    )
    assert [(c.path, c.outcome) for c in calls] == [("next", Outcome.OUTCOME_OK)]


def test_a_malformed_frame_is_counted_and_skipped_with_framing_kept() -> None:
    parser = new()
    # A queue.declare whose queue name claims more bytes than the frame has: pamqp refuses it.
    bad = struct.pack(">BHI", 1, 1, 7) + struct.pack(">IHB", 0x0032000A, 0, 200) + b"\xce"
    calls = feed_all(parser, [(C2S, bad + method(commands.Queue.Declare(queue="good")))])
    assert calls == [] and parser.counts["amqp_malformed_frames"] == 1
    [call] = parser.feed(S2C, method(commands.Queue.DeclareOk(queue="good", message_count=0, consumer_count=0)), T0 + 5)
    assert call.path == "good"
    orphan = new()
    assert orphan.feed(C2S, content(b"no method"), T0) == []
    assert orphan.counts["amqp_orphan_content"] == 2  # its header and its body frame


def test_lost_framing_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="frame-end"):
        new().feed(C2S, method(commands.Tx.Select())[:-1] + b"\x00", T0)
    with pytest.raises(ProtocolError, match="frame type"):
        new().feed(C2S, b"\x09\x00\x00\x00\x00\x00\x00\xce", T0)
    with pytest.raises(ProtocolError, match="framing lost"):
        new().feed(C2S, struct.pack(">BHI", 3, 1, HARD_FRAME_MAX + 1), T0)


def test_frames_over_the_negotiated_frame_max_are_counted_and_large_method_frames_skipped() -> None:
    parser = new()
    feed_all(
        parser,
        [
            (S2C, method(commands.Connection.Tune(frame_max=131072), 0)),
            (C2S, method(commands.Connection.TuneOk(frame_max=4096), 0)),
        ],
    )
    assert parser.frame_max == 4096
    calls = parser.feed(
        C2S, method(commands.Basic.Publish(routing_key="q")) + content(b"x" * 5000, frame_size=5000), T0
    )
    assert calls[0].request.body_size == 5000
    assert parser.counts["amqp_frames_over_frame_max"] == 1
    huge = struct.pack(">BHI", 1, 1, 2 * 1024 * 1024) + b"\x00" * (2 * 1024 * 1024) + b"\xce"
    assert parser.feed(C2S, huge + method(commands.Tx.Select()), T0) == []
    assert parser.counts["amqp_frames_too_large"] == 1
    assert [c.method for c in parser.feed(S2C, method(commands.Tx.SelectOk()), T0)] == ["tx.select"]


def test_a_gap_inside_a_body_shortens_it_and_elsewhere_the_direction_resynchronises() -> None:
    parser = new()
    publish = method(commands.Basic.Publish(routing_key="q")) + content(b"a" * 3000, frame_size=3000)
    cut = len(publish) - 1001  # inside the body frame's payload, 1000 bytes before its end
    parser.feed(C2S, publish[:cut], T0)
    assert parser.gap(C2S, 500, T0 + 1) == []
    [call] = parser.feed(C2S, publish[cut + 500 :], T0 + 2)
    assert call.request.body_size == 3000 and len(call.request.body) == 2500 and list(call.notes) == ["gap"]

    parser = new()
    parser.feed(C2S, method(commands.Queue.Declare(queue="lost"))[:5], T0)
    parser.gap(C2S, 100, T0 + 1)
    # Garbage, then the tail of some frame, then a whole frame: found again.
    calls = parser.feed(C2S, b"\x01\x02garbage\xce" + method(commands.Queue.Declare(queue="found")), T0 + 2)
    calls += parser.feed(
        S2C, method(commands.Queue.DeclareOk(queue="found", message_count=0, consumer_count=0)), T0 + 3
    )
    assert [c.path for c in calls] == ["found"] and parser.counts["amqp_resyncs"] == 1


def test_snapshot_at_a_boundary_and_restore_continue_the_same_calls() -> None:
    head = [
        (C2S, PROTOCOL_HEADER),
        (S2C, method(commands.Connection.Tune(frame_max=131072), 0)),
        (C2S, method(commands.Connection.TuneOk(frame_max=8192), 0)),
        (C2S, method(commands.Basic.Consume(queue="jobs"))),
        (S2C, method(commands.Basic.ConsumeOk(consumer_tag="t1"))),
    ]
    tail = [
        (S2C, method(commands.Basic.Deliver("t1", 1, False, "", "jobs")) + content(b"m")),
        (C2S, method(commands.Queue.Declare(queue="q"))),
        (S2C, method(commands.Queue.DeclareOk(queue="q", message_count=0, consumer_count=0))),
    ]
    whole = new()
    expected = feed_all(whole, head + tail)
    first = new()
    before = feed_all(first, head)
    state = first.snapshot()
    assert isinstance(state, AmqpState) and state.frame_max == 8192 and state.consumers == (("t1", "jobs"),)
    second = new()
    second.restore(state)
    after = [
        call for index, (d, data) in enumerate(tail) for call in second.feed(d, data, T0 + (len(head) + index) * 1000)
    ]
    assert [c.SerializeToString() for c in before + after] == [c.SerializeToString() for c in expected]
    assert after[0].amqp.queue == "jobs"
    busy = new()
    busy.feed(C2S, method(commands.Queue.Declare(queue="q")), T0)
    with pytest.raises(NotAtBoundary):
        busy.snapshot()
    partial = new()
    partial.feed(C2S, method(commands.Tx.Select())[:4], T0)
    with pytest.raises(NotAtBoundary):
        partial.snapshot()


def test_a_server_protocol_header_refuses_the_version() -> None:
    parser = new()
    parser.feed(C2S, b"AMQP\x00\x00\x09\x00", T0)
    [call] = parser.feed(S2C, PROTOCOL_HEADER, T0 + 1)
    assert (call.method, call.status, call.outcome) == (
        "connection.protocol-header",
        "version-refused",
        Outcome.OUTCOME_ERROR,
    )
    assert call.amqp.properties["server-version"] == "0-9-1"


def test_finish_reports_what_is_pending_and_a_message_cut_short() -> None:
    parser = new()
    parser.feed(C2S, method(commands.Channel.Open(), 3), T0)
    publish = method(commands.Basic.Publish(routing_key="q")) + content(b"z" * 100)
    parser.feed(C2S, publish[:-40], T0)
    calls = parser.finish(T0 + 5)
    by_method = {c.method: c for c in calls}
    assert by_method["channel.open"].outcome == Outcome.OUTCOME_NO_RESPONSE
    assert set(by_method["basic.publish"].notes) == {"truncated", "truncated-content"}
    assert parser.counts["amqp_truncated_content"] == 1


def test_a_state_taken_before_any_byte_still_reads_the_protocol_header() -> None:
    fresh = new()
    fresh.restore(new().snapshot())
    calls = fresh.feed(C2S, PROTOCOL_HEADER + method(commands.Tx.Select()), T0)
    calls += fresh.feed(S2C, method(commands.Tx.SelectOk()), T0 + 1)
    assert [c.method for c in calls] == ["tx.select"]


def test_the_late_get_ok_of_a_timed_out_get_is_framed_not_reported() -> None:
    parser = new(ParserLimits(request_timeout_ns=10))
    parser.feed(C2S, method(commands.Basic.Get(queue="slow")), T0)
    [late] = parser.expire(T0 + 100)
    assert late.outcome == Outcome.OUTCOME_NO_RESPONSE
    get_ok = commands.Basic.GetOk(delivery_tag=1, exchange="", routing_key="slow", message_count=0)
    assert parser.feed(S2C, method(get_ok) + content(b"late"), T0 + 200) == []
    assert "amqp_orphan_content" not in parser.counts
    assert parser.snapshot().ordinal == 1
