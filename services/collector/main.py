"""The collector service: packets in, `PacketBatch`es out on trawl.v1.packets.<node>.<shard>."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path

from trawl.bus import packets_subject
from trawl.collector.config import CollectorSettings
from trawl.collector.live import serve_live
from trawl.collector.replay import CaptureFile
from trawl.errors import ConfigError, UserError
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
    """Publish every packet of the file, then a batch flagged end_of_input; returns packets sent.

    The file is read in whole batches (`CaptureFile.batches`). Paced replay (replay_speed > 0)
    publishes a batch when its last packet is due, as a packet-by-packet batcher would have."""
    settings = ctx.settings
    capture = CaptureFile(path)
    source = f"file:{path}"
    publisher = Publisher(ctx)
    sent = 0
    sequence = 0
    link_type, snaplen, interface = 0, 0, ""
    nanosecond = capture.format == "pcapng" or capture.nanosecond
    first_ts: int | None = None
    started = time.monotonic()
    try:
        for records in capture.batches(settings.batch_max_packets, settings.batch_max_bytes):
            if ctx.stopping.is_set():
                break
            if settings.replay_speed > 0:
                first_ts = records.first_ts_ns if first_ts is None else first_ts
                due = started + (records.last_ts_ns - first_ts) / 1e9 / settings.replay_speed
                if (delay := due - time.monotonic()) > 0:
                    # Paced replay waits, but a SIGTERM ends the wait at once.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ctx.stopping.wait(), delay)
                    if ctx.stopping.is_set():
                        break
            sequence += 1
            link_type, snaplen, interface = records.link_type, records.snaplen, records.interface
            nanosecond = records.nanosecond
            batch = records.message(node=settings.node, shard=0, sequence=sequence, source=source)
            batch.packets_before = sent
            await publisher.publish(batch)
            sent += records.packet_count
    finally:
        # Whatever was read before a truncation (or a stop) still goes out, then the end marker.
        sequence += 1
        end = PacketBatch(
            node=settings.node,
            interface=interface,
            link_type=link_type,
            snaplen=snaplen,
            shard=0,
            sequence=sequence,
            nanosecond=nanosecond,
            end_of_input=True,
            source=source,
            packets_before=sent,
        )
        await publisher.publish(end)
        log.info("replay_done", file=str(path), packets=sent, batches=sequence)
    return sent


async def serve(ctx: ServiceContext[CollectorSettings]) -> None:
    settings = ctx.settings
    # The window of batches NATS keeps for readers that restart or take a shard over; the
    # batches themselves go out on core NATS, with no ack to wait for.
    await ctx.bus.ensure_packet_stream(settings.packet_retention)
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
    # A file that cannot be replayed (not a capture, a link type Trawl cannot decode) is one line
    # and exit 2 before anything connects or logs, as `trawl analyze` and `trawl up --pcap` say it.
    try:
        replayed = CollectorSettings.load(config_file, pcap=pcap).pcap
        if replayed is not None:
            CaptureFile(replayed)
    except UserError as exc:
        print(f"trawl collector: {exc}", file=sys.stderr)  # noqa: T201 - the one line a user reads
        return exc.exit_code
    return main_for("collector", CollectorSettings, serve, config_file, pcap=pcap)
