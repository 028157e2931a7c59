"""The enricher service: CallBatches from TRAWL_CALLS -> enriched calls on TRAWL_ENRICHED + OTLP.

A batch is acknowledged only after every enriched call of it is stored in TRAWL_ENRICHED (async
publishes, then one wait for all acks), so a crash redelivers the batch and the per-call
Nats-Msg-Id (the call id) keeps the stream free of duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import PubAck

from trawl.bus import STREAM_CALLS, STREAM_ENRICHED, enriched_subject
from trawl.dedup import RecentIds
from trawl.enricher.config import EnricherSettings
from trawl.enricher.logic import Enricher, enricher_from_settings, start_kube_watch
from trawl.enricher.span_totals import TOTALS_EVENT, SpanCounters, SpanTotals
from trawl.logs import get_logger
from trawl.service import ServiceContext, main_for
from trawl.v1.calls_pb2 import ApiCall, CallBatch

if TYPE_CHECKING:
    from trawl.enricher.shared import SharedIdentity

log = get_logger(__name__)


class _Pipeline:
    """Per-message handling, with the counters and the last TRAWL_ENRICHED sequence it saw."""

    def __init__(self, ctx: ServiceContext[EnricherSettings], enricher: Enricher) -> None:
        self.ctx = ctx
        self.enricher = enricher
        self.emitted = 0
        self.last_sequence = 0
        metrics = ctx.metrics
        self._batches = metrics.counter("trawl_enricher_batches_total", "CallBatches processed")
        self._bad_batches = metrics.counter("trawl_enricher_bad_batches_total", "Messages that were not a CallBatch")
        self._publish_failures = metrics.counter(
            "trawl_enricher_publish_failures_total", "Batches redelivered because an enriched call was not stored"
        )
        self.recent = RecentIds(ctx.settings.recent_call_ids)
        self._duplicates = metrics.counter(
            "trawl_enricher_duplicate_calls_total", "Calls skipped because a call with the same id was handled"
        )
        self._lost_upstream = metrics.gauge(
            "trawl_enricher_upstream_lost_packet_batches", "Packet batches the dissector reported missing, by shard"
        )

    async def handle(self, msg: Msg) -> None:
        batch = CallBatch()
        try:
            batch.ParseFromString(msg.data)
        except Exception as exc:
            self._bad_batches.inc()
            log.warning("bad_call_batch", subject=msg.subject, size=len(msg.data), error=str(exc))
            await msg.term()
            return
        calls: Sequence[ApiCall] = batch.calls
        fresh = self._fresh(calls)
        if len(fresh) != len(calls):
            self._duplicates.inc(len(calls) - len(fresh))
            calls = fresh
        self.enricher.enrich_calls(calls)
        self.enricher.export(calls)
        if self.ctx.settings.publish_enriched and not await self._publish(calls):
            self._publish_failures.inc()
            await msg.nak(delay=1)
            return
        await msg.ack()
        for call in calls:  # remembered once stored: a batch that is redelivered is handled again
            self.recent.first_time(call.id)
        self._batches.inc()
        self.emitted += len(calls)
        self._lost_upstream.set(batch.lost_packet_batches, node=batch.node, shard=str(batch.shard))
        if batch.end_of_input:
            await asyncio.to_thread(self.enricher.flush)
            await self.ctx.drained(emitted=self.emitted, last_stream_sequence=self.last_sequence)

    def _fresh(self, calls: Sequence[ApiCall]) -> list[ApiCall]:
        """The calls whose id was not handled before (nor earlier in the same batch)."""
        recent = self.recent
        seen_here: set[str] = set()
        fresh = []
        for call in calls:
            if call.id in recent or call.id in seen_here:
                continue
            seen_here.add(call.id)
            fresh.append(call)
        return fresh

    async def _publish(self, calls: Sequence[ApiCall]) -> bool:
        """Publish every call, wait for all acks; False when any was not stored."""
        bus = self.ctx.bus
        pending: list[asyncio.Future[PubAck]] = []
        for call in calls:
            subject = enriched_subject(call.protocol or "_", call.dst.namespace or "_", call.dst.workload or "_")
            pending.append(await bus.publish_durable_async(subject, call.SerializeToString(), call.id))
        try:
            await bus.flush_durable()
        except Exception as exc:
            log.warning("enriched_publish_failed", calls=len(calls), error=str(exc))
            return False
        stored = True
        for future in pending:
            if not future.done() or future.cancelled() or future.exception() is not None:
                stored = False
                continue
            self.last_sequence = max(self.last_sequence, int(future.result().seq))
        return stored


async def _export_metrics_periodically(enricher: Enricher, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await asyncio.to_thread(enricher.export_metrics)


async def serve(ctx: ServiceContext[EnricherSettings]) -> None:
    settings = ctx.settings
    enricher = enricher_from_settings(settings, ctx.metrics)
    shared: SharedIdentity | None = None
    watcher = None
    if settings.identity_redis_url:
        from trawl.enricher.shared import SharedIdentity

        shared = SharedIdentity(settings, enricher.identity, ctx.metrics).start()
        ctx.status_lines.append(shared.status_line)
    else:
        watcher = start_kube_watch(settings, enricher.identity, ctx.metrics)
    pipeline = _Pipeline(ctx, enricher)
    metrics_task: asyncio.Task[None] | None = None
    subscription: JetStreamContext.PullSubscription | None = None
    try:
        if watcher is not None:
            ctx.status_lines.append(watcher.status_line)
            if not await asyncio.to_thread(watcher.wait_synced, settings.kube_sync_wait_s):
                log.warning(
                    "kube_watch_not_synced",
                    waited_s=settings.kube_sync_wait_s,
                    state=watcher.status_line(),
                    enriching="from what is known, catching up as the watch does",
                )
        await ctx.bus.ensure_stream(STREAM_CALLS, settings.streams)
        await ctx.bus.ensure_stream(STREAM_ENRICHED, settings.streams)
        subscription = await ctx.bus.pull(STREAM_CALLS, settings.durable, settings.calls_filter_subject)
        if enricher.red.exporter is not None:
            metrics_task = asyncio.create_task(
                _export_metrics_periodically(enricher, settings.metrics_export_interval_s)
            )
        await ctx.ready()
        log.info(
            "enricher_consuming",
            durable=settings.durable,
            filter=settings.calls_filter_subject or "trawl.v1.calls.>",
            exporting=enricher.exporting,
            identities=len(enricher.identity),
        )
        while not ctx.stopping.is_set():
            try:
                messages = await subscription.fetch(settings.fetch_batch, timeout=settings.fetch_timeout_s)
            except (TimeoutError, NatsTimeoutError):
                continue
            for msg in messages:
                await pipeline.handle(msg)
    finally:
        if watcher is not None:
            await asyncio.to_thread(watcher.stop)
        if shared is not None:
            await asyncio.to_thread(shared.stop)
        if subscription is not None:
            # A pull subscription keeps the replies of expired fetches queued with no reader;
            # left subscribed, the connection's drain would wait its full timeout for them.
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        if metrics_task is not None:
            metrics_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await metrics_task
        if enricher.exporting:
            # Spans first, and their totals logged at once: the metric exporter's own shutdown
            # can take its whole timeout, and `trawl up` stops waiting for a child after a while.
            await asyncio.to_thread(enricher.shutdown_spans)
            _log_span_totals(SpanCounters.of(ctx.metrics).totals())
        await asyncio.to_thread(enricher.shutdown)


def _log_span_totals(totals: SpanTotals) -> None:
    """The final word on span export (what `trawl up` reads back and prints): after the
    shutdown every span handed over is exported, dropped or failed."""
    if totals.lost:
        log.warning(TOTALS_EVENT, **totals.log_fields())
    else:
        log.info(TOTALS_EVENT, **totals.log_fields())


def main(config_file: Path | None) -> int:
    return main_for("enricher", EnricherSettings, serve, config_file)
