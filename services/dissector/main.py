"""The dissector service: packet batches from NATS in, `CallBatch`es on JetStream out.

- takes `PacketBatch`es from `settings.subject` in the queue group `settings.queue_group`;
- counts lost batches per (node, shard) from their sequence numbers (`trawl_bus_gaps_total`)
  and reports the count in each CallBatch (`lost_packet_batches`);
- carries calls in `CallBatch`es of up to `calls_per_batch` calls or `batch_age_ms` old on
  `trawl.v1.calls.<node>.<shard>` (stream TRAWL_CALLS, async acks, Nats-Msg-Id
  "<node>/<shard>/<sequence>"); the sequence of each (node, shard) increases by one per batch
  from the service's start time in microseconds, so a restarted dissector never reuses an id
  still inside the stream's duplicate window (its batches would be dropped as duplicates);
- runs the dissector's timeouts while no packets arrive;
- on a batch marked end_of_input: ends every flow, publishes what remains and a CallBatch
  with end_of_input for that node/shard, waits for the acks and announces `drained`.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from trawl.bus import STREAM_CALLS, Bus, calls_subject
from trawl.dissector.config import DissectorSettings
from trawl.dissector.engine import SECOND_NS, Dissector
from trawl.logs import get_logger
from trawl.metrics import Registry
from trawl.service import ServiceContext, main_for
from trawl.v1.calls_pb2 import ApiCall, CallBatch
from trawl.v1.packets_pb2 import PacketBatch

log = get_logger(__name__)


class CallPublisher:
    """Groups calls per (node, shard) into CallBatches and publishes them durably."""

    def __init__(self, bus: Bus, settings: DissectorSettings, metrics: Registry) -> None:
        self.bus = bus
        self.max_calls = settings.calls_per_batch
        self.max_age_s = settings.batch_age_ms / 1000
        self.pending: dict[tuple[str, int], list[ApiCall]] = {}
        self.opened: dict[tuple[str, int], float] = {}
        self.sequences: dict[tuple[str, int], int] = {}
        self.first_sequence = time.time_ns() // 1000
        self.lost: dict[tuple[str, int], int] = {}
        self.emitted = 0
        self.batches = metrics.counter("trawl_dissector_call_batches_total", "CallBatches published")
        self.calls = metrics.counter("trawl_dissector_calls_total", "Calls published, by protocol")

    async def add(self, calls: list[ApiCall]) -> None:
        now = time.monotonic()
        for call in calls:
            key = (call.node, call.shard)
            group = self.pending.get(key)
            if group is None:
                group = self.pending[key] = []
                self.opened[key] = now
            group.append(call)
            self.calls.inc(protocol=call.protocol)
            if len(group) >= self.max_calls:
                await self._publish(key)

    async def flush_old(self) -> None:
        now = time.monotonic()
        for key in [key for key, opened in self.opened.items() if now - opened >= self.max_age_s]:
            await self._publish(key)

    async def flush_all(self) -> None:
        for key in list(self.pending):
            await self._publish(key)

    async def end_of_input(self, node: str, shard: int) -> None:
        await self._publish((node, shard), end_of_input=True)

    async def _publish(self, key: tuple[str, int], end_of_input: bool = False) -> None:
        calls = self.pending.pop(key, [])
        self.opened.pop(key, None)
        if not calls and not end_of_input:
            return
        node, shard = key
        sequence = self.sequences.get(key, self.first_sequence - 1) + 1
        self.sequences[key] = sequence
        batch = CallBatch(
            node=node,
            shard=shard,
            sequence=sequence,
            calls=calls,
            end_of_input=end_of_input,
            lost_packet_batches=self.lost.get(key, 0),
        )
        await self.bus.publish_durable_async(
            calls_subject(node, shard), batch.SerializeToString(), msg_id=f"{node}/{shard}/{sequence}"
        )
        self.emitted += len(calls)
        self.batches.inc()


class DissectorService:
    """The bus side of one dissector replica."""

    def __init__(self, ctx: ServiceContext[DissectorSettings]) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.dissector = Dissector(ctx.settings, ctx.settings.node, ctx.metrics)
        self.publisher = CallPublisher(ctx.bus, ctx.settings, ctx.metrics)
        self.last_sequence: dict[tuple[str, int], int] = {}
        self.lock = asyncio.Lock()
        self.last_packet_wall = time.monotonic()
        self.gaps = ctx.metrics.counter("trawl_bus_gaps_total", "Packet batches lost on the bus, by node and shard")
        self.bad_batches = ctx.metrics.counter("trawl_dissector_bad_batches_total", "Messages that were not batches")
        ctx.metrics.counter("trawl_parse_errors_total", "Flows skipped because a parser failed")

    async def on_batch(self, msg: Msg) -> None:
        batch = PacketBatch()
        try:
            batch.ParseFromString(msg.data)
        except DecodeError:
            self.bad_batches.inc()
            log.warning("bad_packet_batch", subject=msg.subject, size=len(msg.data))
            return
        key = (batch.node or self.settings.node, batch.shard)
        last = self.last_sequence.get(key)
        if last is not None and batch.sequence > last + 1:
            lost = batch.sequence - last - 1
            self.gaps.inc(lost, node=key[0], shard=str(key[1]))
            self.publisher.lost[key] = self.publisher.lost.get(key, 0) + lost
            log.warning("packet_batches_lost", node=key[0], shard=key[1], lost=lost)
        elif last is not None and batch.sequence <= last:
            # The collector restarted (its sequence starts again at 1): count from here.
            log.info("packet_sequence_restarted", node=key[0], shard=key[1], sequence=batch.sequence, last=last)
        self.last_sequence[key] = batch.sequence
        async with self.lock:
            self.last_packet_wall = time.monotonic()
            await self.publisher.add(self.dissector.feed(batch))
            if batch.end_of_input:
                await self.publisher.add(self.dissector.finish())
                await self.publisher.flush_all()
                await self.publisher.end_of_input(*key)
                await self.ctx.bus.flush_durable()
                self._export_counters()
                log.info("end_of_input", node=key[0], shard=key[1], calls=self.publisher.emitted)
                await self.ctx.drained(emitted=self.publisher.emitted)

    async def tick(self) -> None:
        """Publish batches that are old enough; run timeouts while packets do not come."""
        async with self.lock:
            await self.publisher.flush_old()
            dissector = self.dissector
            if dissector.clock_ns:
                idle_s = time.monotonic() - self.last_packet_wall
                if idle_s >= self.settings.expire_interval_s:
                    # Packet time stands still while nothing arrives: advance it by the wall clock.
                    await self.publisher.add(dissector.expire(dissector.clock_ns + int(idle_s * SECOND_NS)))
            self._export_counters()

    def _export_counters(self) -> None:
        metrics = self.ctx.metrics
        for name, value in self.dissector.counters.items():
            metrics.gauge(f"trawl_dissector_{name}", f"Dissector counter {name}").set(value)

    async def stop(self) -> None:
        async with self.lock:
            await self.publisher.flush_all()
            await self.ctx.bus.flush_durable()


async def serve(ctx: ServiceContext[DissectorSettings]) -> None:
    settings = ctx.settings
    await ctx.bus.ensure_stream(STREAM_CALLS, settings.streams)
    service = DissectorService(ctx)
    await ctx.bus.subscribe(settings.subject, service.on_batch, queue=settings.queue_group)
    log.info("dissector_subscribed", subject=settings.subject, queue=settings.queue_group)
    await ctx.ready()
    period = min(settings.batch_age_ms / 1000, settings.expire_interval_s)
    while not ctx.stopping.is_set():
        try:
            await asyncio.wait_for(ctx.stopping.wait(), timeout=period)
        except TimeoutError:
            await service.tick()
    await service.stop()


def main(config_file: Path | None) -> int:
    return main_for("dissector", DissectorSettings, serve, config_file)
