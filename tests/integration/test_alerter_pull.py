"""The alerter's pull consumer (trawl.alerter.pull) over a real nats-server: batches of the stream's
messages in order, each once, with their stream sequences; acks by the last call (AckPolicy.ALL)
or each call, naks redelivered; an idle fetch times out and a stopping one returns at once; and a
durable made with the other ack policy is made again from where its acks ended."""

from __future__ import annotations

import asyncio
import uuid

import nats.errors
import pytest
from nats.js.api import AckPolicy

from trawl.alerter.pull import BatchPuller, Delivery, open_consumer
from trawl.bus import STREAM_ENRICHED, Bus, enriched_subject
from trawl.config import NatsSettings, StreamLimits


async def stream_of(bus: Bus, count: int) -> list[bytes]:
    await bus.ensure_stream(STREAM_ENRICHED, StreamLimits())
    payloads = [f"call-{uuid.uuid4().hex}-{index}".encode() for index in range(count)]
    for payload in payloads:
        await bus.js.publish(enriched_subject("http", "shop", "pay"), payload)
    return payloads


async def drain(puller: BatchPuller, batch: int, stop_after: int) -> list[Delivery]:
    got: list[Delivery] = []
    while len(got) < stop_after:
        got += await puller.fetch(batch, 2.0)
    return got


@pytest.mark.parametrize("ack_all", [True, False])
async def test_batches_in_order_once_each_and_acked(nats_url: str, ack_all: bool) -> None:
    bus = await Bus.connect(NatsSettings(servers=[nats_url]), "test-pull")
    try:
        payloads = await stream_of(bus, 700)
        durable = f"pull-{uuid.uuid4().hex[:8]}"
        await open_consumer(bus.js, STREAM_ENRICHED, durable, ack_all)
        puller = await BatchPuller(bus, STREAM_ENRICHED, durable).start()
        got: list[Delivery] = []
        while len(got) < len(payloads):
            batch = await puller.fetch(64, 2.0)
            assert 0 < len(batch) <= 64
            got += batch
            await puller.ack(batch[-1:] if ack_all else batch)
        assert [delivery.data for delivery in got] == payloads
        first = got[0].stream_sequence
        assert [delivery.stream_sequence for delivery in got] == list(range(first, first + len(payloads)))
        with pytest.raises(nats.errors.TimeoutError):
            await puller.fetch(64, 0.3)
        await bus.nc.flush()
        info = await bus.js.consumer_info(STREAM_ENRICHED, durable)
        assert info.config.ack_policy == (AckPolicy.ALL if ack_all else AckPolicy.EXPLICIT)
        assert info.num_ack_pending == 0 and info.num_pending == 0
        assert info.ack_floor.stream_seq == got[-1].stream_sequence
        await puller.stop()
    finally:
        await bus.close()


async def test_nak_redelivers_and_a_stopping_fetch_returns_at_once(nats_url: str) -> None:
    bus = await Bus.connect(NatsSettings(servers=[nats_url]), "test-pull")
    try:
        payloads = await stream_of(bus, 10)
        durable = f"pull-{uuid.uuid4().hex[:8]}"
        await open_consumer(bus.js, STREAM_ENRICHED, durable, ack_all=True)
        puller = await BatchPuller(bus, STREAM_ENRICHED, durable).start()
        first = await drain(puller, 100, len(payloads))
        await puller.nak(first)  # at once: the consumer delivers them again before anything new
        again = await drain(puller, 100, len(payloads))
        assert [delivery.data for delivery in again] == payloads
        await puller.ack(again[-1:])
        stop = asyncio.Event()
        stop.set()
        with pytest.raises(nats.errors.TimeoutError):
            # One linger round, not the hour asked (wait_for's own TimeoutError is not nats's).
            await asyncio.wait_for(puller.fetch(100, 3600.0, stop), 60)
        await puller.stop()
    finally:
        await bus.close()


async def test_a_durable_with_the_other_ack_policy_is_made_again_after_its_acks(nats_url: str) -> None:
    """An EXPLICIT durable (an alerter before AckPolicy.ALL) that acked the first 30 of 50 calls:
    made again with ALL, it delivers the other 20 (and not the 30 again)."""
    bus = await Bus.connect(NatsSettings(servers=[nats_url]), "test-pull")
    try:
        payloads = await stream_of(bus, 50)
        durable = f"pull-{uuid.uuid4().hex[:8]}"
        await open_consumer(bus.js, STREAM_ENRICHED, durable, ack_all=False)
        puller = await BatchPuller(bus, STREAM_ENRICHED, durable).start()
        first = await drain(puller, 30, 30)
        await puller.ack(first[:30])
        await bus.nc.flush()
        await puller.stop()
        await asyncio.sleep(0.2)  # the acks reach the consumer before it is replaced
        await open_consumer(bus.js, STREAM_ENRICHED, durable, ack_all=True)
        info = await bus.js.consumer_info(STREAM_ENRICHED, durable)
        assert info.config.ack_policy == AckPolicy.ALL
        puller = await BatchPuller(bus, STREAM_ENRICHED, durable).start()
        rest = await drain(puller, 100, 20)
        assert [delivery.data for delivery in rest] == payloads[30:]
        await open_consumer(bus.js, STREAM_ENRICHED, durable, ack_all=True)  # the same policy: kept
        assert (await bus.js.consumer_info(STREAM_ENRICHED, durable)).created == info.created
        await puller.stop()
    finally:
        await bus.close()
