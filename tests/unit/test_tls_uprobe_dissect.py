"""The dissector's TLS plaintext path (`Dissector.feed_tls`): `TlsChunkBatch`es as the
collector's eBPF uprobes publish them, dissected as already-reassembled streams.

The HTTP/1.1 bytes are written by h11's encoder (a maintained HTTP/1.1 implementation), cut into
chunks as SSL_write/SSL_read calls would move them; the live test (tests/live/
test_tls_uprobes_live.py) takes them from real OpenSSL processes."""

from __future__ import annotations

import json

import h2.config
import h2.connection
import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.dissector_builders import settings
from trawl.dissector.engine import Dissector
from trawl.v1.calls_pb2 import ApiCall, Outcome
from trawl.v1.packets_pb2 import Direction, TlsChunk, TlsChunkBatch

CLIENT = ("10.0.0.1", 40000)
SERVER = ("10.0.0.2", 443)
EGRESS = Direction.DIRECTION_EGRESS
INGRESS = Direction.DIRECTION_INGRESS
SECOND = 1_000_000_000


def http_exchange() -> tuple[list[bytes], list[bytes]]:
    """Two requests on one keep-alive connection and their responses: (client's writes,
    server's writes), each message's bytes as h11 writes them."""
    client = h11.Connection(h11.CLIENT)
    server = h11.Connection(h11.SERVER)
    requests = [
        (b"GET", b"/orders/7", [(b"Host", b"shop"), (b"Authorization", b"Bearer s3cr3t-token")], b""),
        (
            b"POST",
            b"/login",
            [(b"Host", b"shop"), (b"Content-Type", b"application/json")],
            json.dumps({"user": "ann", "password": "hunter2"}).encode(),
        ),
    ]
    responses = [(200, b'{"id": 7}'), (401, b"no")]
    sent: list[bytes] = []
    answered: list[bytes] = []
    for (method, target, headers, body), (status, reply) in zip(requests, responses, strict=True):
        headers = [*headers, (b"Content-Length", str(len(body)).encode())]
        data = client.send(h11.Request(method=method, target=target, headers=headers))
        data += client.send(h11.Data(data=body)) if body else b""
        data += client.send(h11.EndOfMessage())
        sent.append(data)
        server.receive_data(data)
        while not isinstance(server.next_event(), h11.EndOfMessage):
            pass
        out = server.send(h11.Response(status_code=status, headers=[(b"Content-Length", str(len(reply)).encode())]))
        out += server.send(h11.Data(data=reply)) + server.send(h11.EndOfMessage())
        answered.append(out)
        client.receive_data(out)
        while not isinstance(client.next_event(), h11.EndOfMessage):
            pass
        client.start_next_cycle()
        server.start_next_cycle()
    return sent, answered


def chunk(sender: tuple[str, int], receiver: tuple[str, int], direction: int, data: bytes, ts: int) -> TlsChunk:
    return TlsChunk(
        pid=1,
        src_ip=sender[0],
        src_port=sender[1],
        dst_ip=receiver[0],
        dst_port=receiver[1],
        direction=direction,  # type: ignore[arg-type]
        ts_ns=ts,
        data=data,
        library="openssl",
    )


def views(sent: list[bytes], answered: list[bytes], start_ts: int = 1_700_000_000 * SECOND) -> list[TlsChunk]:
    """Both ends hooked, as on one machine: each message seen by its writer (EGRESS) and its
    reader (INGRESS)."""
    chunks = []
    ts = start_ts
    for request, response in zip(sent, answered, strict=True):
        chunks += [chunk(CLIENT, SERVER, EGRESS, request, ts), chunk(CLIENT, SERVER, INGRESS, request, ts + 10)]
        ts += 1000
        chunks += [chunk(SERVER, CLIENT, EGRESS, response, ts), chunk(SERVER, CLIENT, INGRESS, response, ts + 10)]
        ts += 1000
    return chunks


def feed(engine: Dissector, chunks: list[TlsChunk]) -> list[ApiCall]:
    return engine.feed_tls(TlsChunkBatch(node="n1", sequence=1, chunks=chunks))


def summary(calls: list[ApiCall]) -> list[tuple[str, str, str, str, int, str, int]]:
    return [
        (call.method, call.path, call.status, call.src.ip, call.src.port, call.dst.ip, call.dst.port) for call in calls
    ]


def test_both_ends_hooked_give_each_call_once_with_capture_tls_uprobe() -> None:
    sent, answered = http_exchange()
    engine = Dissector(settings(), "n1")
    calls = feed(engine, views(sent, answered))
    assert summary(calls) == [
        ("GET", "/orders/7", "200", *CLIENT, *SERVER),
        ("POST", "/login", "401", *CLIENT, *SERVER),
    ]
    assert {call.capture for call in calls} == {"tls-uprobe"}
    assert {call.node for call in calls} == {"n1"}
    # The server's copies of the same bytes were counted, not dissected a second time.
    assert engine.counters["tls_chunks_peer_view"] == 4
    assert engine.counters["tls_chunks"] == 8
    # Redaction applies as on packets.
    text = b"".join(call.SerializeToString() for call in calls)
    assert b"s3cr3t" not in text and b"hunter2" not in text
    headers = {header.name.lower(): header.value for header in calls[0].request.headers}
    assert headers["authorization"] != "Bearer s3cr3t-token"


def test_the_server_view_alone_is_oriented_by_its_content() -> None:
    """Only the server is hooked, and its first chunk is a read: the client is still the side
    that sent the request."""
    sent, answered = http_exchange()
    server_view = [c for c in views(sent, answered) if (c.src_ip, c.src_port) == SERVER or c.direction == INGRESS]
    server_view = [c for c in server_view if (c.direction == INGRESS) == ((c.dst_ip, c.dst_port) == SERVER)]
    engine = Dissector(settings(), "n1")
    calls = feed(engine, server_view)
    assert summary(calls) == [
        ("GET", "/orders/7", "200", *CLIENT, *SERVER),
        ("POST", "/login", "401", *CLIENT, *SERVER),
    ]
    assert engine.counters.get("tls_chunks_peer_view", 0) == 0


def test_a_response_first_is_turned_around_by_detection() -> None:
    """The first bytes seen are the server's (the request was read before the hooks): the
    flow is created with the server as client, and detection turns it around."""
    sent, answered = http_exchange()
    chunks = views(sent, answered)[2:]  # from the first response on
    engine = Dissector(settings(), "n1")
    calls = feed(engine, chunks) + engine.finish()
    assert ("POST", "/login", "401", *CLIENT, *SERVER) in summary(calls)


def h2_exchange() -> tuple[bytes, bytes, list[bytes], list[bytes]]:
    """An HTTP/2 connection as the h2 library writes it: (the server's SETTINGS, the client's
    preface with its SETTINGS, then the client's writes and the server's writes after them):
    two GETs and their responses."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    settings_frame = server.data_to_send()
    client.initiate_connection()
    preface = client.data_to_send()
    server.receive_data(preface)
    client.receive_data(settings_frame)
    sent, answered = [client.data_to_send()], [server.data_to_send()]  # the SETTINGS acks
    for stream, path in ((1, "/orders/1"), (3, "/orders/2")):
        client.send_headers(
            stream, [(":method", "GET"), (":path", path), (":scheme", "https"), (":authority", "shop")], end_stream=True
        )
        sent.append(client.data_to_send())
        server.receive_data(sent[-1])
        server.send_headers(stream, [(":status", "200")])
        server.send_data(stream, b"{}", end_stream=True)
        answered.append(server.data_to_send())
        client.receive_data(answered[-1])
    return settings_frame, preface, sent, answered


@pytest.mark.parametrize("hooked", ["server", "both"])
def test_an_http2_server_s_settings_before_the_client_s_preface_is_turned_around(hooked: str) -> None:
    """A Go (or nghttp2) HTTP/2 server writes its SETTINGS as the TLS handshake ends, racing
    the client's preface: the server's write can be the connection's first chunk, which makes
    the server the flow's first writer. Detection waits for the other side (a lone SETTINGS
    frame reads as HTTP/2 either way round), and the preface turns the flow around: every call
    is there, client to server (a live run had lost all four of a Go client's calls so)."""
    settings_frame, preface, sent, answered = h2_exchange()
    ts = 1_700_000_000 * SECOND
    server_view = [chunk(SERVER, CLIENT, EGRESS, settings_frame, ts), chunk(CLIENT, SERVER, INGRESS, preface, ts + 20)]
    client_view = [
        chunk(CLIENT, SERVER, EGRESS, preface, ts + 10),
        chunk(SERVER, CLIENT, INGRESS, settings_frame, ts + 30),
    ]
    for index, (request, response) in enumerate(zip(sent, answered, strict=True)):
        at = ts + 1000 * (index + 1)
        server_view += [
            chunk(CLIENT, SERVER, INGRESS, request, at + 10),
            chunk(SERVER, CLIENT, EGRESS, response, at + 20),
        ]
        client_view += [chunk(CLIENT, SERVER, EGRESS, request, at), chunk(SERVER, CLIENT, INGRESS, response, at + 30)]
    chunks = server_view if hooked == "server" else server_view + client_view
    engine = Dissector(settings(), "n1")
    calls = feed(engine, sorted(chunks, key=lambda c: c.ts_ns)) + engine.finish()
    assert sorted(summary(calls)) == [
        ("GET", "/orders/1", "200", *CLIENT, *SERVER),
        ("GET", "/orders/2", "200", *CLIENT, *SERVER),
    ]
    assert {call.protocol for call in calls} == {"http2"}
    assert engine.counters["tcp_flows_turned_by_content"] == 1
    assert engine.counters.get("parse_errors", 0) == 0


def test_a_truncated_chunk_is_a_counted_gap() -> None:
    sent, answered = http_exchange()
    response = answered[0]
    cut = len(response) - 4
    chunks = [
        chunk(CLIENT, SERVER, EGRESS, sent[0], 1000),
        chunk(SERVER, CLIENT, INGRESS, response[:cut], 2000),
    ]
    chunks[1].truncated = 4
    chunks += [chunk(CLIENT, SERVER, EGRESS, sent[1], 3000), chunk(SERVER, CLIENT, INGRESS, answered[1], 4000)]
    engine = Dissector(settings(), "n1")
    calls = feed(engine, chunks) + engine.finish()
    assert engine.counters["tls_truncated_bytes"] == 4
    assert [call.path for call in calls][:1] == ["/orders/7"]
    assert calls[0].status == "200"
    assert {call.capture for call in calls} == {"tls-uprobe"}


def test_a_lone_request_times_out_as_a_tls_uprobe_call() -> None:
    sent, _ = http_exchange()
    engine = Dissector(settings(request_timeout_s=5), "n1")
    assert feed(engine, [chunk(CLIENT, SERVER, EGRESS, sent[0], 10 * SECOND)]) == []
    calls = engine.expire(10 * SECOND + int(engine.settings.flow_idle_timeout_s * SECOND) + SECOND)
    assert [(call.path, call.outcome, call.capture) for call in calls] == [
        ("/orders/7", Outcome.OUTCOME_NO_RESPONSE, "tls-uprobe")
    ]
    assert engine.counters["tls_flows_active"] == 0


def test_connections_stay_apart_and_end_with_their_node() -> None:
    sent, answered = http_exchange()
    other_client = ("10.0.0.9", 50000)
    first = views(sent, answered)
    second = [
        chunk(
            other_client if (c.src_ip, c.src_port) == CLIENT else SERVER,
            other_client if (c.dst_ip, c.dst_port) == CLIENT else SERVER,
            c.direction,
            c.data,
            c.ts_ns + 5,
        )
        for c in first
    ]
    engine = Dissector(settings(), "n1")
    mixed = [c for pair in zip(first, second, strict=True) for c in pair]
    calls = feed(engine, mixed)
    assert sorted(summary(calls)) == sorted(
        [
            ("GET", "/orders/7", "200", *CLIENT, *SERVER),
            ("POST", "/login", "401", *CLIENT, *SERVER),
            ("GET", "/orders/7", "200", *other_client, *SERVER),
            ("POST", "/login", "401", *other_client, *SERVER),
        ]
    )
    assert engine.counters["tls_flows_active"] == 2
    engine.finish(node="n1")
    assert engine.counters["tls_flows_active"] == 0


@given(st.data())
def test_any_cut_of_the_calls_into_chunks_gives_the_same_calls(data: st.DataObject) -> None:
    """SSL_read hands over what it has: the same bytes in any number of chunks make the same
    calls, and every chunk is counted."""
    sent, answered = http_exchange()
    chunks = []
    ts = 1000
    for request, response in zip(sent, answered, strict=True):
        for sender, receiver, payload in ((CLIENT, SERVER, request), (SERVER, CLIENT, response)):
            cuts = sorted(data.draw(st.sets(st.integers(1, len(payload) - 1), max_size=6)))
            for start, end in zip([0, *cuts], [*cuts, len(payload)], strict=True):
                direction = EGRESS if sender == CLIENT else INGRESS
                chunks.append(chunk(sender, receiver, direction, payload[start:end], ts))
                ts += 1
    engine = Dissector(settings(), "n1")
    calls = feed(engine, chunks)
    assert summary(calls) == [
        ("GET", "/orders/7", "200", *CLIENT, *SERVER),
        ("POST", "/login", "401", *CLIENT, *SERVER),
    ]
    assert engine.counters["tls_chunks"] == len(chunks)


def test_a_handover_ends_every_tls_flow_and_counts_them() -> None:
    """A replica that gives shard 0 up stops taking TLS chunks: its flows end at once."""
    sent, answered = http_exchange()
    engine = Dissector(settings(), "n1")
    feed(
        engine,
        [*views(sent, answered)[:2], chunk(("10.0.0.5", 1), SERVER, EGRESS, sent[0], 1_700_000_000 * SECOND + 5000)],
    )
    assert engine.counters["tls_flows_active"] == 2
    ended = [ApiCall.FromString(data) for data in engine.finish_tls_encoded()]
    assert [(call.path, call.outcome) for call in ended] == [("/orders/7", Outcome.OUTCOME_NO_RESPONSE)] * 2
    assert engine.counters["tls_flows_ended_by_handover"] == 2
    assert engine.counters["tls_flows_active"] == 0
