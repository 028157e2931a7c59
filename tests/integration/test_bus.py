"""The bus layer against a real nats-server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from trawl.bus import STREAM_CALLS, Bus, calls_subject, enriched_subject, token
from trawl.config import NatsSettings, StreamLimits
from trawl.embedded import EmbeddedNats, free_port
from trawl.errors import ConfigError


def test_subject_tokens_are_safe() -> None:
    assert token("a.b *>c") == "a_b___c"
    assert token("") == "_"
    assert enriched_subject("http", "", "pay.ments") == "trawl.v1.enriched.http._.pay_ments"


async def test_unreachable_nats_is_a_config_error() -> None:
    settings = NatsSettings(servers=[f"nats://127.0.0.1:{free_port()}"], connect_attempts=1, connect_timeout_s=1)
    with pytest.raises(ConfigError, match=r"cannot reach NATS at nats://127.0.0.1:\d+"):
        await Bus.connect(settings, name="test")


async def test_streams_are_idempotent_and_msg_id_dedups(nats_url: str) -> None:
    bus = await Bus.connect(NatsSettings(servers=[nats_url]), name="test")
    try:
        limits = StreamLimits(max_age_s=60, max_bytes=1 << 20)
        await bus.ensure_stream(STREAM_CALLS, limits)
        await bus.ensure_stream(STREAM_CALLS, StreamLimits(max_age_s=120, max_bytes=1 << 20))
        info = await bus.js.stream_info(STREAM_CALLS)
        assert info.config.max_age == 120
        subject = calls_subject("node-x", 0)
        first = await bus.publish_durable(subject, b"one", msg_id="node-x/0/1")
        again = await bus.publish_durable(subject, b"one", msg_id="node-x/0/1")
        assert first == again
        futures = [await bus.publish_durable_async(subject, b"n", msg_id=f"node-x/0/{i}") for i in range(2, 50)]
        await bus.flush_durable()
        assert all(f.done() for f in futures)
        sub = await bus.pull(STREAM_CALLS, durable="test-reader", filter_subject=calls_subject("node-x", ">"))
        messages = await sub.fetch(100, timeout=2)
        assert [m.headers["Nats-Msg-Id"] for m in messages if m.headers] == [f"node-x/0/{i}" for i in range(1, 50)]
    finally:
        await bus.close()
    assert bus.nc.is_closed


async def test_reconnects_after_server_restart(tmp_path: object) -> None:
    port = free_port()
    server = EmbeddedNats(port=port).start()
    bus = await Bus.connect(NatsSettings(servers=[server.url]), name="test")
    received: list[bytes] = []

    async def handler(msg: object) -> None:
        received.append(msg.data)  # type: ignore[attr-defined]

    await bus.subscribe("trawl.v1.test", handler)
    server.stop()
    await asyncio.sleep(0.5)
    server = EmbeddedNats(port=port).start()
    try:
        for _ in range(100):
            if bus.nc.is_connected:
                break
            await asyncio.sleep(0.1)
        await bus.publish("trawl.v1.test", b"after")
        await bus.nc.flush()
        for _ in range(50):
            if received:
                break
            await asyncio.sleep(0.05)
        assert received == [b"after"]
    finally:
        await bus.close()
        server.stop()


async def test_close_after_the_server_is_gone_does_not_raise() -> None:
    """A service told to stop while NATS is away must still stop cleanly (exit 0)."""
    server = EmbeddedNats().start()
    bus = await Bus.connect(NatsSettings(servers=[server.url]), name="test")
    await bus.ensure_stream(STREAM_CALLS, StreamLimits(max_age_s=60, max_bytes=1 << 20))
    await bus.pull(STREAM_CALLS, durable="gone")
    await bus.publish("trawl.v1.test", b"pending")
    server.stop()
    await asyncio.sleep(0.3)
    await bus.close()
    assert bus.nc.is_closed


async def test_batch_subscription_gets_every_message_in_order(nats_url: str) -> None:
    """Messages of a batch subscription reach its handler as (subject, payload) lists, in
    order, none lost, while other subscriptions and requests on the same connection work."""
    bus = await Bus.connect(NatsSettings(servers=[nats_url]), name="test")
    sender = await Bus.connect(NatsSettings(servers=[nats_url]), name="sender")
    got: list[tuple[bytes, bytes]] = []
    calls: list[int] = []
    others: list[bytes] = []

    def handler(messages: list[tuple[bytes, bytes]]) -> None:
        calls.append(len(messages))
        got.extend(messages)

    async def other(msg: object) -> None:
        others.append(msg.data)  # type: ignore[attr-defined]

    try:
        await bus.subscribe_batches("trawl.v1.test.batch.>", handler)
        await bus.subscribe("trawl.v1.test.other", other)
        await bus.nc.flush()
        sent = []
        for index in range(5000):
            subject = f"trawl.v1.test.batch.{index % 3}"
            payload = b"x" * (index % 700) + str(index).encode()
            sent.append((subject.encode(), payload))
            await sender.nc.publish(subject, payload, headers={"k": "v"} if index % 2 else None)
            if index % 1000 == 0:
                await sender.nc.publish("trawl.v1.test.other", str(index).encode())
        await sender.nc.flush()
        for _ in range(100):
            if len(got) >= len(sent) and len(others) == 5:
                break
            await asyncio.sleep(0.05)
        assert got == sent
        assert others == [b"0", b"1000", b"2000", b"3000", b"4000"]
        assert max(calls) > 1  # handed over in lists, not one by one
    finally:
        await sender.close()
        await bus.close()


async def test_durable_publisher_counts_every_message(nats_url: str) -> None:
    """Stored, found already stored (same Nats-Msg-Id), refused (no stream), too large: each counted."""
    from trawl.bus import STREAM_ENRICHED, DurablePublisher

    bus = await Bus.connect(NatsSettings(servers=[nats_url]), name="test")
    try:
        await bus.ensure_stream(STREAM_ENRICHED, StreamLimits(max_age_s=60, max_bytes=64 << 20))
        publisher = await DurablePublisher(bus).start()
        subject = enriched_subject("http", "durable-test", "w")
        messages = [(subject, b"call %d" % index, f"durable-test-{index}") for index in range(1000)]
        first = await publisher.publish(messages, timeout_s=10)
        assert (first.stored, first.refused, first.unanswered, first.too_large) == (1000, 0, 0, 0)
        assert first.complete and first.last_sequence > 0
        again = await publisher.publish(messages[:10], timeout_s=10)  # deduplicated by the stream
        assert again.complete and again.stored == 10 and again.last_sequence <= first.last_sequence
        info = await bus.js.stream_info(STREAM_ENRICHED, subjects_filter=subject)
        assert info.state.subjects == {subject: 1000}
        huge = b"x" * (bus.nc.max_payload + 1)
        mixed = await publisher.publish(
            [("trawl.v1.nostream.x", b"lost", "nostream-1"), (subject, huge, "huge-1"), (subject, b"ok", "ok-1")],
            timeout_s=10,
        )
        assert (mixed.stored, mixed.refused, mixed.too_large, mixed.unanswered) == (1, 1, 1, 0)
        assert not mixed.complete and mixed.error
    finally:
        await bus.close()


def test_trawl_imports_nats_without_aiohttp() -> None:
    """trawl/__init__.py keeps aiohttp out of nats-py's import: a quarter of a second at every
    service's start (its SSL contexts), for a WebSocket transport used only with ws:// servers."""
    fresh = subprocess.run(
        [sys.executable, "-c", "import sys, trawl.bus, trawl.service; print('aiohttp' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert fresh.stdout.strip() == "False"


async def test_websocket_servers_get_the_transport_nats_was_imported_without(tmp_path: Path) -> None:
    """A ws:// server still connects (trawl.bus gives nats-py its aiohttp back), over a real
    nats-server's WebSocket listener."""
    import nats.aio.transport

    port, ws_port = free_port(), free_port()
    config = tmp_path / "ws.conf"
    config.write_text(f'websocket {{\n  listen: "127.0.0.1:{ws_port}"\n  no_tls: true\n}}\n')
    server = EmbeddedNats(state_dir=tmp_path / "nats", port=port, extra_args=["--config", str(config)]).start()
    try:
        bus = await Bus.connect(NatsSettings(servers=[f"ws://127.0.0.1:{ws_port}"]), name="ws-test")
        try:
            got: list[bytes] = []

            async def handler(msg: object) -> None:
                got.append(msg.data)  # type: ignore[attr-defined]

            await bus.subscribe("trawl.v1.test.ws", handler)
            await bus.nc.publish("trawl.v1.test.ws", b"over websocket")
            await bus.nc.flush()
            for _ in range(50):
                if got:
                    break
                await asyncio.sleep(0.05)
            assert got == [b"over websocket"]
            assert nats.aio.transport.aiohttp is sys.modules["aiohttp"]
        finally:
            await bus.close()
    finally:
        server.stop()
