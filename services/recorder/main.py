"""The recorder service: every PacketBatch on the packet subject goes into rotating pcap files.

Each recorder subscribes with a plain subscription (not a queue group): every recorder
records everything. On a batch marked end_of_input (a replayed file is done) it seals its
files and announces `trawl.v1.control.drained.recorder.<node>` with the files sealed since
the previous announcement; on SIGTERM it finishes the batches already received and seals.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from trawl.errors import ConfigError
from trawl.logs import get_logger
from trawl.recorder.config import RecorderSettings
from trawl.recorder.writer import PcapWriter
from trawl.service import ServiceContext, main_for
from trawl.v1 import packets_pb2

log = get_logger(__name__)

RETENTION_INTERVAL_S = 60.0


class SequenceGaps:
    """Counts batches missing from each (node, shard) sequence; a restart (lower number) starts over."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, int], int] = {}

    def observe(self, node: str, shard: int, sequence: int) -> int:
        key = (node, shard)
        last = self._last.get(key)
        self._last[key] = sequence
        if last is None or sequence <= last:
            return 0
        return sequence - last - 1


def open_directory(directory: Path) -> None:
    """Create the recordings directory, or fail at start naming it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"recorder.directory {directory}: cannot create it ({exc.strerror}); set it to a writable folder"
        ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"recorder.directory {directory}: not writable; set it to a writable folder")


async def serve(ctx: ServiceContext[RecorderSettings]) -> None:
    settings = ctx.settings
    directory = settings.directory.resolve()  # Drained lists absolute paths
    open_directory(directory)
    writer = PcapWriter(
        directory,
        rotate_bytes=settings.rotate_bytes,
        rotate_seconds=settings.rotate_seconds,
        max_age_s=settings.retention.max_age_s,
        max_total_bytes=settings.retention.max_total_bytes,
        metrics=ctx.metrics,
    )
    writer.recover()
    announced = len(writer.sealed)
    gaps = SequenceGaps()
    lost = ctx.metrics.counter("trawl_recorder_lost_batches_total", "Packet batches missing from a shard's sequence")
    undecodable = ctx.metrics.counter("trawl_recorder_undecodable_total", "Messages that were not a PacketBatch")

    async def on_batch(msg: Msg) -> None:
        nonlocal announced
        try:
            batch = packets_pb2.PacketBatch.FromString(msg.data)
        except DecodeError as exc:
            undecodable.inc()
            log.warning("recorder_undecodable", subject=msg.subject, error=str(exc))
            return
        try:
            missing = gaps.observe(batch.node, batch.shard, batch.sequence)
            if missing:
                lost.inc(missing, node=batch.node, shard=str(batch.shard))
            writer.write(batch)
            if batch.end_of_input:
                writer.seal_all()
                files = [str(path) for path in writer.sealed[announced:]]
                announced = len(writer.sealed)
                await ctx.drained(emitted=writer.packets_written, files=files)
        except Exception:  # one bad batch must not stop the recording
            log.exception("recorder_batch_failed", subject=msg.subject)

    subscription = await ctx.bus.subscribe(settings.subject, on_batch)
    await ctx.ready()
    tick = min(1.0, settings.rotate_seconds)
    since_retention = 0.0
    while not ctx.stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.stopping.wait(), timeout=tick)
        writer.rotate_due()
        since_retention += tick
        if since_retention >= RETENTION_INTERVAL_S:
            since_retention = 0.0
            writer.apply_retention()
    # Write what was already received, then seal: a stopped recorder leaves only sealed files.
    with contextlib.suppress(Exception):
        await subscription.drain()  # type: ignore[no-untyped-call]
    writer.seal_all()


def main(config_file: Path | None) -> int:
    return main_for("recorder", RecorderSettings, serve, config_file)
