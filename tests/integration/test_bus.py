"""The bus layer against a real nats-server."""

from __future__ import annotations

import asyncio

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
