"""The compiled lane's HTTP/2 + gRPC part (_express_h2.h) against the Python path: the same
packets must give the same calls (every field, ids included) and the same counters.

The conversations are made by the real `h2` library on both sides (its HPACK encoder, its
framing, its flow control), gRPC messages framed as grpcio frames them, over TCP segments cut
at various sizes, in batches cut at random places. They mix what the lane holds (concurrent
unary and streaming gRPC calls, Trailers-Only answers, PING, WINDOW_UPDATE, SETTINGS that grow
the header table) with everything that gives a flow back to Python mid-way (RST_STREAM, GOAWAY,
padding, a compressed message, a non-gRPC request, 1xx, a secret-named JSON key, a percent
escape in grpc-message...), so the lane's snapshots with streams open, its handovers and the
engine's dropping of the calls it already sent are all exercised.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived
from h2.settings import SettingCodes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import scaled
from tests.unit.dissector_builders import Conversation
from tests.unit.test_express_differential import Frames, assert_same, dissect
from tests.unit.test_pbjson import messages as protobuf_messages

SERVICE_PATHS = ["/trawl.test.Orders/GetOrder", "/trawl.test.Orders/ListOrders", "/grpc.health.v1.Health/Check"]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def grpc_frame(message: bytes, compressed: bool = False) -> bytes:
    return struct.pack(">BI", 1 if compressed else 0, len(message)) + message


class GrpcConnection:
    """An h2 client and server on one TCP connection; what each writes goes out as segments."""

    def __init__(self, talk: Conversation, segment: int, table_size: int | None, server_first: bool = False) -> None:
        self.talk = talk
        self.segment = segment
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.client.initiate_connection()
        self.server.initiate_connection()
        if table_size is not None:
            self.client.update_settings({SettingCodes.HEADER_TABLE_SIZE: table_size})
        self.open: list[int] = []  # streams the client opened and the server has not ended
        self.client_ended: set[int] = set()
        self.next_id = 1
        self.closed = False
        # The preface whole in the first segment (a client's first write is; a cut preface is a
        # flow the lane gives back at once, covered by the committed captures).
        self.segment = max(segment, 100)
        if server_first:  # a grpc-core server sends its SETTINGS as it accepts, racing the preface
            settings_frame = self.server.data_to_send()
            self.talk.server_sends(settings_frame, self.segment)
            self.client.receive_data(settings_frame)
        self.flush()
        self.segment = segment

    def flush(self) -> None:
        while True:
            sent = self.client.data_to_send()
            if sent:
                self.talk.client_sends(sent, self.segment)
                for event in self.server.receive_data(sent):
                    if isinstance(event, DataReceived) and event.flow_controlled_length:
                        self.server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            answered = self.server.data_to_send()
            if answered:
                self.talk.server_sends(answered, self.segment)
                for event in self.client.receive_data(answered):
                    if isinstance(event, DataReceived) and event.flow_controlled_length:
                        self.client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if not sent and not answered:
                return

    def request(self, path: str, extra: list[tuple[str, str]], content_type: str = "application/grpc") -> int:
        stream_id = self.next_id
        self.next_id += 2
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "orders:50051"),
            ("content-type", content_type),
            ("te", "trailers"),
            ("user-agent", "grpc-python/1.0"),
            *extra,
        ]
        self.client.send_headers(stream_id, headers)
        self.open.append(stream_id)
        return stream_id

    def client_message(self, stream_id: int, payload: bytes, end: bool) -> None:
        self.client.send_data(stream_id, payload, end_stream=end)
        if end:
            self.client_ended.add(stream_id)

    def respond(self, stream_id: int, messages: list[bytes], status: int, message: str, only: bool) -> None:
        base = [(":status", "200"), ("content-type", "application/grpc")]
        trailers = [("grpc-status", str(status)), ("grpc-message", message)]
        if stream_id not in self.client_ended:
            self.client_message(stream_id, b"", True)
        self.flush()  # the server answers what it received
        if only:
            self.server.send_headers(stream_id, base + trailers, end_stream=True)
        else:
            self.server.send_headers(stream_id, base)
            for payload in messages:
                self.server.send_data(stream_id, payload)
            self.server.send_headers(stream_id, trailers, end_stream=True)
        self.open.remove(stream_id)


@st.composite
def grpc_traffic(draw: st.DrawFn) -> Frames:
    """One to three connections of gRPC calls in flight together, with events that give the
    connection back to Python at random points."""
    frames: Frames = []
    pool = draw(st.lists(protobuf_messages(), min_size=1, max_size=5))
    pool += [b"\n\x07order-1\x10\x01", b'\n\x13{"password": "x"}', b'\n\x05a\\"b']
    for index in range(draw(st.integers(1, 3))):
        talk = Conversation(client=f"10.3.0.{index + 1}", server="10.4.0.1", client_port=41000 + index,
                            server_port=50051)  # fmt: skip
        talk.now += index * 7_000
        talk.handshake()
        segment = draw(st.sampled_from([9, 40, 300, 1400]))
        table_size = draw(st.sampled_from([None, None, 8192, 256]))
        h2 = GrpcConnection(talk, segment, table_size, server_first=draw(st.booleans()))
        # Mostly what the lane holds; now and then (ops 30-35) what gives the flow back.
        for op, pick in draw(st.lists(st.tuples(st.integers(0, 35), st.integers(0, 1 << 30)), max_size=30)):
            if h2.closed:
                break
            message = pool[pick % len(pool)]
            target = h2.open[pick % len(h2.open)] if h2.open else None
            if op <= 11:
                extra: list[tuple[str, str]] = []
                if pick & 1:
                    extra.append(("traceparent", TRACEPARENT))
                if pick & 2:
                    extra.append(("authorization", "Bearer s3cr3t"))
                if pick & 4:
                    extra.append(("grpc-timeout", f"{pick % 900 + 1}m"))
                stream_id = h2.request(SERVICE_PATHS[pick % len(SERVICE_PATHS)], extra)
                h2.client_message(stream_id, grpc_frame(message), end=op % 4 != 3)
            elif op <= 23 and target is not None:
                status = (0, 0, 0, 5, 1, 4, 13)[pick % 7]
                text = ("", "not found", "a%20b" if pick % 11 == 0 else "bad request")[pick % 3]
                split = pick % 3 == 0 and len(message) > 2
                answers = [grpc_frame(message)] if not split else [grpc_frame(message)[:3], grpc_frame(message)[3:]]
                h2.respond(target, answers * (1 + pick % 2), status, text, only=op % 5 == 0)
            elif op <= 27 and target is not None and target not in h2.client_ended:
                h2.client_message(target, grpc_frame(message), end=bool(pick & 1))
            elif op == 28:
                h2.client.ping(b"12345678")
            elif op == 29:
                h2.client.increment_flow_control_window(1000 + pick % 5000)
            elif op == 30 and target is not None:
                (h2.client if pick & 1 else h2.server).reset_stream(target, ErrorCodes.CANCEL)
                h2.open.remove(target)
            elif op == 31 and target is not None and pick % 4 == 0:
                h2.server.close_connection(last_stream_id=max(h2.open))
                h2.closed = True
            elif op == 32 and target is not None:
                h2.server.send_headers(target, [(":status", "200"), ("content-type", "application/grpc")])
                h2.server.send_data(target, grpc_frame(message, compressed=pick % 2 == 0), pad_length=pick % 3 or None)
                h2.server.send_headers(target, [("grpc-status", "0")], end_stream=True)
                if target not in h2.client_ended:
                    h2.client_message(target, b"", True)
                h2.open.remove(target)
            elif op == 33:
                stream_id = h2.request("/api/orders", [], content_type="application/json")
                h2.client_message(stream_id, b'{"id": 1}', end=True)
                h2.flush()
                h2.server.send_headers(stream_id, [(":status", "200")], end_stream=True)
                h2.open.remove(stream_id)
            elif op == 34 and target is not None:
                h2.server.send_headers(target, [(":status", "103"), ("link", "</a>")])
            elif op == 35 and target is not None:
                h2.respond(target, [grpc_frame(message)], pick % 3, "x%41y" if pick & 1 else "", only=bool(pick & 2))
            h2.flush()
        if draw(st.booleans()):
            talk.close()
        frames += talk.frames
    frames.sort(key=lambda frame: frame[0])
    return frames


@given(traffic=grpc_traffic(), data=st.data())
@settings(max_examples=scaled(80), deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_generated_grpc_traffic_gives_the_same_calls(traffic: Frames, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(traffic)), max_size=6))
    assert_same(traffic, cuts=cuts)


def busy_connection(calls: int, in_flight: int, segment: int = 1400) -> Frames:
    """grpcio's shape on a busy channel: `in_flight` unary calls always open, answered oldest first."""
    talk = Conversation(client="10.3.0.9", server="10.4.0.1", client_port=42000, server_port=50051)
    talk.handshake()
    h2 = GrpcConnection(talk, segment, None)
    started = 0
    while started < calls or h2.open:
        while started < calls and len(h2.open) < in_flight:
            stream_id = h2.request(SERVICE_PATHS[0], [("traceparent", TRACEPARENT)])
            h2.client_message(stream_id, grpc_frame(b"\n\x07order-%d\x10\x01" % started), end=True)
            started += 1
        h2.respond(h2.open[0], [grpc_frame(b"\n\x07order-1\x12\x02ok\x18\xcf\x0f")], 0, "", only=False)
        h2.flush()
    talk.close()
    return talk.frames


@pytest.mark.parametrize("in_flight", [1, 16])
def test_a_busy_connection_stays_in_the_lane_and_is_identical(in_flight: int) -> None:
    """Every call of a connection with calls always in flight is made by the lane (snapshots are
    taken with streams open), identical to Python's; only the end of input gives it back."""
    frames = busy_connection(600, in_flight)
    dissector = assert_same(frames, cuts=range(97, len(frames), 97))
    counters: dict[str, Any] = dissector.lane.counters  # type: ignore[union-attr]
    assert counters["calls_grpc"] == 600
    demotions = {name: value for name, value in counters.items() if name.startswith("express_demotions_")}
    assert demotions == {"express_demotions_finish": 1}


def test_a_reset_mid_way_gives_back_the_open_streams_and_drops_the_calls_sent() -> None:
    """A RST_STREAM after many calls with others open: Python resumes from the lane's last
    snapshot (streams open in it), replays, and the engine drops the calls the lane already sent
    (the same calls, the same ids): no call twice, none lost."""
    frames = busy_connection(300, 8)
    talk = Conversation(client="10.3.0.9", server="10.4.0.1", client_port=42000, server_port=50051)
    # The same connection again, with a client reset half way.
    talk.handshake()
    h2 = GrpcConnection(talk, 1400, None)
    for number in range(300):
        stream_id = h2.request(SERVICE_PATHS[0], [])
        h2.client_message(stream_id, grpc_frame(b"\x08%c" % (number % 100)), end=True)
        if len(h2.open) > 8:
            h2.respond(h2.open[0], [grpc_frame(b"\x08\x01")], 0, "", only=False)
        if number == 150:
            h2.client.reset_stream(h2.open[-1], ErrorCodes.CANCEL)
            h2.open.pop()
        h2.flush()
    frames = talk.frames
    reference, _, _ = dissect(frames, express=False)
    dissector = assert_same(frames)
    counters: dict[str, Any] = dissector.lane.counters  # type: ignore[union-attr]
    assert counters["express_demotions_http2_stream"] == 1
    assert 0 < counters["calls_grpc"] < len(reference)
