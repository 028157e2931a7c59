"""The collector service: packets in, `PacketBatch`es out on trawl.v1.packets.<node>.<shard>."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path

from nats.errors import Error as NatsError

from trawl.bus import MSG_ID_HEADER, packets_subject
from trawl.collector.config import CollectorSettings
from trawl.collector.live import serve_live
from trawl.collector.replay import CaptureFile
from trawl.errors import ConfigError, UserError
from trawl.logs import get_logger
from trawl.service import ServiceContext, main_for
from trawl.v1.packets_pb2 import PacketBatch

log = get_logger(__name__)


class Publisher:
    """Publishes a replayed file's batches into the packet stream, each acknowledged by it, and
    counts them.

    A file has no deadline, so each batch is stored or tried again: a NATS server that
    restarts mid-replay (taking the in-memory stream with it) gets the stream made again and
    the batch re-sent, and the stream's duplicate window (Nats-Msg-Id "<node>/<shard>/<start
    time>/<sequence>") stores a re-sent batch once. One round trip per batch of up to
    `batch_max_packets` packets; the replay is paced by the acks, so it cannot outrun the
    server either. (Live capture cannot wait: it publishes on core NATS, see live.py.)"""

    def __init__(self, ctx: ServiceContext[CollectorSettings]) -> None:
        self.ctx = ctx
        self.started_us = time.time_ns() // 1000
        self.batches = ctx.metrics.counter("trawl_collector_batches_total", "Packet batches published")
        self.packets = ctx.metrics.counter("trawl_collector_packets_total", "Packets published")
        self.bytes = ctx.metrics.counter("trawl_collector_bytes_total", "Record bytes published")
        self.retries = ctx.metrics.counter(
            "trawl_collector_publish_retries_total", "Replayed batches sent again because NATS did not store them"
        )

    async def publish(self, batch: PacketBatch) -> None:
        shard = str(batch.shard)
        subject = packets_subject(batch.node, batch.shard)
        payload = batch.SerializeToString()
        msg_id = f"{batch.node}/{batch.shard}/{self.started_us}/{batch.sequence}"
        bus, failures = self.ctx.bus, 0
        while True:
            try:
                await bus.js.publish(subject, payload, timeout=5.0, headers={MSG_ID_HEADER: msg_id})
                break
            except (NatsError, OSError, TimeoutError) as exc:
                if self.ctx.stopping.is_set():
                    raise
                failures += 1
                self.retries.inc(shard=shard)
                if failures == 1 or failures % 20 == 0:
                    log.warning("replay_publish_retry", sequence=batch.sequence, error=str(exc) or type(exc).__name__)
                await asyncio.sleep(min(2.0, 0.1 * failures))
                with contextlib.suppress(NatsError, OSError, TimeoutError):
                    await bus.ensure_packet_stream(self.ctx.settings.packet_retention)
        self.batches.inc(shard=shard)
        self.packets.inc(batch.packet_count, shard=shard)
        self.bytes.inc(len(batch.records), shard=shard)


async def replay(ctx: ServiceContext[CollectorSettings], path: Path) -> int:
    """Publish every packet of the file, then a batch flagged end_of_input; returns packets sent.

    The file is read in whole batches (`CaptureFile.batches`). Paced replay (replay_speed > 0)
    publishes a batch when its last packet is due, as a packet-by-packet batcher would have."""
    settings = ctx.settings
    capture = CaptureFile(path)
    source = f"file:{path}"
    # Each batch is stored with an ack (see Publisher): the stream must exist before the first.
    await ctx.bus.ensure_packet_stream(settings.packet_retention)
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
        tls = await _start_tls(ctx)
        if not settings.interfaces and not settings.pod_loopback:
            if tls is None:
                raise ConfigError(
                    "collector: nothing to capture; set pcap (a capture file), interfaces (names, 'any' or"
                    " 'pods') or tls.mode (auto or on: TLS plaintext through eBPF uprobes)"
                )
            await ctx.ready()
            await tls
            return
        try:
            await serve_live(ctx, settings)
        finally:
            if tls is not None:
                ctx.stopping.set()
                await tls
        return
    await ctx.ready()
    await replay(ctx, settings.pcap)


async def _start_tls(ctx: ServiceContext[CollectorSettings]) -> asyncio.Task[None] | None:
    """TLS plaintext capture (trawl.collector.tls_uprobes) when configured: loaded here, so
    that mode "on" fails the start with the reason; then published by a task of its own."""
    settings = ctx.settings
    if settings.tls.mode == "off":
        return None
    from trawl.collector.tls_uprobes import TlsCapture, TlsUnavailable

    capture = TlsCapture(settings.tls, settings.node, ctx.bus.publish, ctx.metrics)
    try:
        await capture.start(ctx.bus.nc.subscribe)
    except TlsUnavailable as exc:
        raise ConfigError(f"tls.mode is on but TLS uprobes cannot be used: {exc}") from exc
    return asyncio.create_task(capture.pump(ctx.stopping), name="tls-uprobes")


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
