"""The collector service: packets in, `PacketBatch`es out on trawl.v1.packets.<node>.<shard>."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from trawl.bus import packets_subject
from trawl.collector.batching import ShardBatcher
from trawl.collector.config import CollectorSettings
from trawl.collector.live import serve_live
from trawl.collector.replay import CaptureFile
from trawl.errors import ConfigError
from trawl.logs import get_logger
from trawl.service import ServiceContext, main_for
from trawl.v1.packets_pb2 import PacketBatch

log = get_logger(__name__)


class Publisher:
    """Publishes batches and counts them; a flush every few batches keeps the replay from
    racing ahead of the server's buffers."""

    def __init__(self, ctx: ServiceContext[CollectorSettings]) -> None:
        self.ctx = ctx
        self.batches = ctx.metrics.counter("trawl_collector_batches_total", "Packet batches published")
        self.packets = ctx.metrics.counter("trawl_collector_packets_total", "Packets published")
        self.bytes = ctx.metrics.counter("trawl_collector_bytes_total", "Record bytes published")

    async def publish(self, batch: PacketBatch) -> None:
        shard = str(batch.shard)
        await self.ctx.bus.publish(packets_subject(batch.node, batch.shard), batch.SerializeToString())
        self.batches.inc(shard=shard)
        self.packets.inc(batch.packet_count, shard=shard)
        self.bytes.inc(len(batch.records), shard=shard)
        if batch.sequence % 16 == 0 or batch.end_of_input:
            await self.ctx.bus.nc.flush()


async def replay(ctx: ServiceContext[CollectorSettings], path: Path) -> int:
    """Publish every packet of the file, then a batch flagged end_of_input; returns packets sent."""
    settings = ctx.settings
    capture = CaptureFile(path)
    batcher = ShardBatcher(
        node=settings.node,
        shard=0,
        source=f"file:{path}",
        max_packets=settings.batch_max_packets,
        max_bytes=settings.batch_max_bytes,
        nanosecond=capture.format == "pcapng" or capture.nanosecond,
    )
    publisher = Publisher(ctx)
    sent = 0
    first_ts: int | None = None
    started = time.monotonic()
    try:
        for packet in capture.packets():
            if ctx.stopping.is_set():
                break
            if settings.replay_speed > 0:
                first_ts = packet.ts_ns if first_ts is None else first_ts
                due = started + (packet.ts_ns - first_ts) / 1e9 / settings.replay_speed
                if (delay := due - time.monotonic()) > 0:
                    # Paced replay waits, but a SIGTERM ends the wait at once.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ctx.stopping.wait(), delay)
                    if ctx.stopping.is_set():
                        break
            for batch in batcher.add(
                packet.ts_ns, packet.data, packet.orig_len, packet.link_type, packet.snaplen, packet.interface
            ):
                await publisher.publish(batch)
            sent += 1
    finally:
        # Whatever was read before a truncation still goes out, then the end marker.
        await publisher.publish(batcher.cut(end_of_input=True))
        log.info("replay_done", file=str(path), packets=sent, batches=batcher.sequence)
    return sent


async def serve(ctx: ServiceContext[CollectorSettings]) -> None:
    settings = ctx.settings
    if settings.pcap is None:
        if not settings.interfaces and not settings.pod_loopback:
            raise ConfigError(
                "collector: nothing to capture; set pcap (a capture file) or interfaces (names, 'any' or 'pods')"
            )
        await serve_live(ctx, settings)
        return
    await ctx.ready()
    await replay(ctx, settings.pcap)


def main(config_file: Path | None, pcap: Path | None = None) -> int:
    return main_for("collector", CollectorSettings, serve, config_file, pcap=pcap)
