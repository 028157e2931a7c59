"""The collector's own publish connection (trawl.collector.publisher) against a real nats-server:
payload pieces arrive as one message, credentials, a server restart, and the protocol's edges
(server PINGs, stale connections, a server that wants TLS) against a small scripted server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from trawl.bus import Bus
from trawl.collector.batching import FramedBatch
from trawl.collector.publisher import (
    NatsPublisher,
    NotConnectedError,
    PayloadTooLargeError,
    TlsRequiredError,
)
from trawl.collector.sinks import ClientSink, SocketSink, batch_sink
from trawl.config import NatsSettings
from trawl.embedded import EmbeddedNats, free_port, nats_server_binary
from trawl.errors import ConfigError
from trawl.v1.packets_pb2 import PacketBatch


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def subscriber(url: str, subject: str) -> AsyncIterator[list[Msg]]:
    bus = await Bus.connect(NatsSettings(servers=[url]), "test-reader")
    received: list[Msg] = []

    async def on_message(msg: Msg) -> None:
        received.append(msg)

    await bus.subscribe(subject, on_message)
    await bus.nc.flush()
    try:
        yield received
    finally:
        await bus.close()


@contextlib.contextmanager
def nats_with_auth(*auth: str) -> Iterator[str]:
    """A real nats-server that requires the given credentials; yields its plain URL."""
    port = free_port()
    process = subprocess.Popen(
        [nats_server_binary(), "--addr", "127.0.0.1", "--port", str(port), *auth],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


async def test_pieces_arrive_as_one_message_in_order(nats_url: str) -> None:
    publisher = NatsPublisher(NatsSettings(servers=[nats_url]), "test-publisher")
    async with subscriber(nats_url, "t.pieces") as received:
        await publisher.connect()
        assert publisher.max_payload == 1 << 20
        big = bytes(range(256)) * 3000
        for index in range(20):
            await publisher.publish("t.pieces", [f"{index}:".encode(), big, memoryview(b"end")])
        assert publisher.try_publish("t.pieces", [b"last"])
        await publisher.flush()
        await wait_until(lambda: len(received) == 21)
    assert [msg.data for msg in received[:20]] == [f"{index}:".encode() + big + b"end" for index in range(20)]
    assert received[20].data == b"last"
    assert not received[0].headers
    await publisher.close()
    assert not publisher.is_connected
    with pytest.raises(NotConnectedError):
        await publisher.publish("t.pieces", [b"x"])
    assert not publisher.try_publish("t.pieces", [b"x"])


async def test_a_message_over_max_payload_is_refused_before_sending(nats_url: str) -> None:
    publisher = NatsPublisher(NatsSettings(servers=[nats_url]), "test-publisher")
    await publisher.connect()
    with pytest.raises(PayloadTooLargeError):
        await publisher.publish("t.big", [b"x" * (1 << 20), b"y"])
    await publisher.flush()  # the connection is still good
    await publisher.close()


async def test_the_socket_sink_publishes_the_packet_batch_bytes(nats_url: str) -> None:
    header = PacketBatch(node="n1", shard=3, sequence=7, packet_count=2, link_type=1, nanosecond=True)
    batch = FramedBatch(header, [b"a" * 100, b"b" * 50])
    async with subscriber(nats_url, "trawl.v1.packets.n1.>") as received:
        bus = await Bus.connect(NatsSettings(servers=[nats_url]), "test-bus")
        sink = batch_sink(NatsSettings(servers=[nats_url]), "test-sink", bus, "n1")
        assert isinstance(sink, SocketSink)
        await sink.start()
        assert sink.is_connected()
        assert sink.try_publish(batch)
        await sink.publish(batch)
        await sink.flush()
        await wait_until(lambda: len(received) == 2)
        await sink.close()
        await bus.close()
    assert {msg.subject for msg in received} == {"trawl.v1.packets.n1.3"}
    assert all(PacketBatch.FromString(msg.data) == batch.message() for msg in received)


def test_tls_or_a_creds_file_goes_through_nats_py() -> None:
    assert NatsPublisher.supports(NatsSettings(servers=["nats://a:4222", "b:4222"]))
    assert not NatsPublisher.supports(NatsSettings(servers=["tls://a:4222"]))
    assert not NatsPublisher.supports(NatsSettings(servers=["nats://a:4222"], tls_ca=Path("/ca.pem")))
    assert not NatsPublisher.supports(NatsSettings(servers=["nats://a:4222"], creds_file=Path("/x.creds")))
    with pytest.raises(ConfigError):
        NatsPublisher(NatsSettings(servers=["tls://a:4222"]), "p")


@pytest.mark.parametrize(
    ("auth", "settings", "url_credentials"),
    [
        (("--user", "cap", "--pass", "s3cret"), {"user": "cap", "password": "s3cret"}, "cap:s3cret@"),
        (("--auth", "t0ken"), {"token": "t0ken"}, "t0ken@"),
    ],
)
async def test_credentials_from_the_settings_or_the_url(
    auth: tuple[str, ...], settings: dict[str, str], url_credentials: str
) -> None:
    with nats_with_auth(*auth) as url:
        for nats_settings in (
            NatsSettings(servers=[url], **settings),  # type: ignore[arg-type]
            NatsSettings(servers=[url.replace("nats://", f"nats://{url_credentials}")]),
        ):
            publisher = NatsPublisher(nats_settings, "test-publisher")
            await publisher.connect()
            await publisher.publish("t.auth", [b"ok"])
            await publisher.flush()
            await publisher.close()
        wrong = NatsPublisher(NatsSettings(servers=[url], user="cap", password="wrong"), "test-publisher")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="refused the connection") as refused:
            await wrong.connect()
        assert "wrong" not in str(refused.value)


async def test_no_server_is_a_config_error() -> None:
    settings = NatsSettings(servers=[f"nats://127.0.0.1:{free_port()}"], connect_attempts=2, connect_timeout_s=0.5)
    publisher = NatsPublisher(settings, "test-publisher", reconnect_wait_s=0.05)
    with pytest.raises(ConfigError, match="cannot reach NATS"):
        await publisher.connect()


async def test_reconnects_by_itself_after_a_server_restart(tmp_path: Path) -> None:
    port = free_port()
    server = EmbeddedNats(state_dir=tmp_path / "nats", port=port).start()
    publisher = NatsPublisher(NatsSettings(servers=[server.url]), "test-publisher", reconnect_wait_s=0.1)
    try:
        await publisher.connect()
        await publisher.publish("t.restart", [b"before"])
        await publisher.flush()
        server.stop()
        await wait_until(lambda: not publisher.is_connected)
        with pytest.raises(NotConnectedError):
            await publisher.publish("t.restart", [b"during"])
        assert not publisher.try_publish("t.restart", [b"during"])
        await asyncio.sleep(0.3)  # a few reconnect attempts fail while it is away
        server = EmbeddedNats(state_dir=tmp_path / "nats", port=port).start()
        await wait_until(lambda: publisher.is_connected, timeout_s=15)
        async with subscriber(server.url, "t.restart") as received:
            await publisher.publish("t.restart", [b"after"])
            await publisher.flush()
            await wait_until(lambda: len(received) == 1)
        assert received[0].data == b"after"
    finally:
        await publisher.close()
        server.stop()


class ScriptedServer:
    """A TCP server that speaks just enough NATS, as the test tells it to."""

    def __init__(self, info: bytes = b'INFO {"max_payload":1048576}\r\n', answer_pings: bool = True) -> None:
        self.info = info
        self.answer_pings = answer_pings
        self.received = bytearray()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"nats://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        writer.write(self.info)
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                self.received += line
                if line.startswith(b"PING") and self.answer_pings:
                    writer.write(b"PONG\r\n")
                    await writer.drain()

    async def send(self, data: bytes) -> None:
        for writer in self.writers:
            writer.write(data)
            await writer.drain()


async def test_a_server_ping_is_answered_and_an_err_keeps_the_connection() -> None:
    script = ScriptedServer()
    async with script as url:
        publisher = NatsPublisher(NatsSettings(servers=[url]), "test-publisher")
        await publisher.connect()
        await script.send(b"-ERR 'Permissions Violation for Publish to t.x'\r\nPING\r\n")
        await wait_until(lambda: script.received.count(b"PONG\r\n") == 1)
        assert publisher.is_connected
        await publisher.close()


async def test_unanswered_keepalive_pings_mean_a_stale_connection() -> None:
    script = ScriptedServer()
    async with script as url:
        publisher = NatsPublisher(
            NatsSettings(servers=[url]), "test-publisher", ping_interval_s=0.05, reconnect_wait_s=10
        )
        await publisher.connect()
        script.answer_pings = False
        await wait_until(lambda: not publisher.is_connected, timeout_s=5)
        assert script.received.count(b"PING\r\n") >= 3  # the handshake's, then two keep-alives
        await publisher.close()


async def test_garbage_from_the_server_drops_the_connection() -> None:
    script = ScriptedServer()
    async with script as url:
        publisher = NatsPublisher(NatsSettings(servers=[url]), "test-publisher", reconnect_wait_s=10)
        await publisher.connect()
        await script.send(b"MSG a 1 2\r\nhi\r\n")
        await wait_until(lambda: not publisher.is_connected)
        await publisher.close()


async def test_a_server_that_requires_tls_makes_the_sink_fall_back_to_nats_py(nats_url: str) -> None:
    script = ScriptedServer(info=b'INFO {"tls_required":true}\r\n')
    async with script as url:
        with pytest.raises(TlsRequiredError):
            await NatsPublisher(NatsSettings(servers=[url]), "test-publisher").connect()
        # The service's own nats-py connection is what a fallback publishes through.
        bus = await Bus.connect(NatsSettings(servers=[nats_url]), "test-bus")
        sink = SocketSink(NatsSettings(servers=[url]), "test-sink", bus, "n1")
        await sink.start()
        assert isinstance(sink.fallback, ClientSink)
        assert sink.is_connected() and not sink.try_publish(FramedBatch(PacketBatch(shard=0), []))
        async with subscriber(nats_url, "trawl.v1.packets.n1.>") as received:
            await sink.publish(FramedBatch(PacketBatch(node="n1", shard=0, sequence=1), [b"r"]))
            await sink.flush()
            await wait_until(lambda: len(received) == 1)
        await sink.close()
        await bus.close()
