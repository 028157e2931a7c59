"""The enricher service: CallBatches from TRAWL_CALLS -> enriched calls on TRAWL_ENRICHED + OTLP.

A batch is acknowledged only after every enriched call of it is stored in TRAWL_ENRICHED (async
publishes, then one wait for all acks), so a crash redelivers the batch and the per-call
Nats-Msg-Id (the call id) keeps the stream free of duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from trawl.bus import (
    COUNTERS_SUBJECTS,
    STREAM_CALLS,
    STREAM_COUNTERS,
    STREAM_ENRICHED,
    DurableOutcome,
    DurablePublisher,
    raise_if_cancelled,
)
from trawl.dedup import RecentIds
from trawl.enricher.config import EnricherSettings
from trawl.enricher.logic import Enricher, enricher_from_settings, start_kube_watch
from trawl.enricher.span_totals import EXPORT_TOTALS_EVENT, TOTALS_EVENT, ExportTotals, SpanCounters, SpanTotals
from trawl.enricher.wire_calls import CallBatchParts, EnrichedSubjects, WireError, call_id, split_call_batch
from trawl.logs import get_logger
from trawl.service import ServiceContext, main_for

if TYPE_CHECKING:
    from trawl.enricher.shared import SharedIdentity

log = get_logger(__name__)

# CallBatches enriched and published whose acks are awaited at once (about 2,000 calls).
WINDOW_BATCHES = 4


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
        self._too_large = metrics.counter(
            "trawl_enricher_enriched_too_large_total",
            "Enriched calls not published because they exceed the NATS server's max_payload",
        )
        self._publisher: DurablePublisher | None = None
        self._subjects = EnrichedSubjects()
        # Batches handled and not yet settled, in order, at most WINDOW_BATCHES; their calls' ids.
        self._settling: asyncio.Queue[_InFlight] = asyncio.Queue()
        self._window = asyncio.Semaphore(WINDOW_BATCHES)
        self._in_flight_ids: set[str] = set()
        self._lost_upstream = metrics.gauge(
            "trawl_enricher_upstream_lost_packet_batches", "Packet batches the dissector reported missing, by shard"
        )

    async def handle(self, msg: Msg) -> None:
        """Enrich and export a CallBatch, and start publishing its calls; it is acknowledged
        (or not) later, in order, once the stream has answered (`_settle`). Up to
        WINDOW_BATCHES are in flight: the next batch is enriched while the acks of the last
        come back (waiting for them one batch at a time left the enricher idle a second and
        more for 100,000 calls)."""
        try:
            batch = split_call_batch(msg.data)
            ids = [call_id(call) for call in batch.calls]
        except (WireError, IndexError, UnicodeDecodeError) as exc:
            self._bad_batches.inc()
            log.warning("bad_call_batch", subject=msg.subject, size=len(msg.data), error=str(exc))
            await msg.term()
            return
        calls = batch.calls
        fresh, fresh_ids = self._fresh(calls, ids)
        if len(fresh) != len(calls):
            self._duplicates.inc(len(calls) - len(fresh))
        try:
            enriched = self.enricher.enrich_encoded(fresh)
        except DecodeError as exc:  # a call in the batch is not an ApiCall (as CallBatch parsing refused)
            self._bad_batches.inc()
            log.warning("bad_call_batch", subject=msg.subject, size=len(msg.data), error=str(exc))
            await msg.term()
            return
        self.enricher.export_encoded(enriched)
        publishing: asyncio.Future[DurableOutcome] | None = None
        if self.ctx.settings.publish_enriched:
            publishing = asyncio.ensure_future(self._publish(enriched, fresh_ids))
        self._in_flight_ids.update(fresh_ids)
        await self._window.acquire()
        self._settling.put_nowait(_InFlight(msg, batch, fresh_ids, len(enriched), publishing))
        if batch.end_of_input:
            await self._settling.join()  # drained is announced once every batch before it is settled

    async def settle_all(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) until every batch handed over is acknowledged or not."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settling.join(), timeout_s)

    async def settle_forever(self) -> None:
        """The batches in the order they came: acked once their calls are stored, else nak'ed
        (redelivered; the stream keeps each call once, by its id)."""
        while True:
            entry = await self._settling.get()
            try:
                await self._settle(entry)
            except Exception as exc:  # the next batches must still be settled
                raise_if_cancelled()
                log.warning("batch_settle_failed", subject=entry.msg.subject, error=repr(exc))
                self._publish_failures.inc()
                with contextlib.suppress(Exception):  # the bus may be away: then it comes back after ack_wait
                    await entry.msg.nak(delay=1)
            finally:
                self._in_flight_ids.difference_update(entry.ids)
                self._window.release()
                self._settling.task_done()

    async def _settle(self, entry: _InFlight) -> None:
        if entry.publishing is not None:
            outcome = await entry.publishing
            if outcome.too_large:
                self._too_large.inc(outcome.too_large)
                log.warning("enriched_call_too_large", calls=outcome.too_large, max_payload=self.ctx.bus.nc.max_payload)
            if not outcome.complete:
                log.warning(
                    "enriched_publish_failed",
                    calls=entry.calls,
                    refused=outcome.refused,
                    unanswered=outcome.unanswered,
                    error=outcome.error,
                )
                self._publish_failures.inc()
                await entry.msg.nak(delay=1)
                return
            self.last_sequence = max(self.last_sequence, outcome.last_sequence)
        await entry.msg.ack()
        first_time = self.recent.first_time
        for identifier in entry.ids:  # remembered once stored: a batch that is redelivered is handled again
            first_time(identifier)
        self._batches.inc()
        self.emitted += entry.calls
        batch = entry.batch
        self._lost_upstream.set(batch.lost_packet_batches, node=batch.node, shard=str(batch.shard))
        if batch.end_of_input:
            await asyncio.to_thread(self.enricher.flush)
            await self.ctx.drained(emitted=self.emitted, last_stream_sequence=self.last_sequence)

    def _fresh(self, calls: list[bytes], ids: list[str]) -> tuple[list[bytes], list[str]]:
        """The calls whose id was not handled before (nor is in flight, nor earlier in the same
        batch), and their ids."""
        recent = self.recent
        in_flight = self._in_flight_ids
        if not any(identifier in recent or identifier in in_flight for identifier in ids) and len(set(ids)) == len(ids):
            return calls, ids
        seen_here: set[str] = set()
        fresh: list[bytes] = []
        fresh_ids: list[str] = []
        for call, identifier in zip(calls, ids, strict=True):
            if identifier in recent or identifier in in_flight or identifier in seen_here:
                continue
            seen_here.add(identifier)
            fresh.append(call)
            fresh_ids.append(identifier)
        return fresh, fresh_ids

    async def _publish(self, calls: list[bytes], ids: list[str]) -> DurableOutcome:
        """Publish every enriched call on its subject and wait for the stream's answers."""
        if self._publisher is None:
            self._publisher = await DurablePublisher(self.ctx.bus).start()
        subject_of = self._subjects
        return await self._publisher.publish(
            [(subject_of(call), call, identifier) for call, identifier in zip(calls, ids, strict=True)],
            self.ctx.settings.publish_timeout_s,
        )


@dataclass
class _InFlight:
    msg: Msg
    batch: CallBatchParts
    ids: list[str]
    calls: int
    publishing: asyncio.Future[DurableOutcome] | None


async def _follow_peer_counters(ctx: ServiceContext[EnricherSettings], enricher: Enricher) -> None:
    """The other services' counters (trawl.service publishes them) into the aggregated RED
    export, which sends them beside the enricher's own (red_wire.PeerCounters)."""
    aggregator = getattr(enricher.red, "aggregator", None)
    if aggregator is None:
        return  # no metrics export, or the SDK path (the reference: the enricher's counters only)
    from trawl.enricher.red_wire import PeerCounters

    peers = aggregator.peers = PeerCounters()

    async def on_counters(msg: Msg) -> None:
        peers.update(msg.data)

    # The last snapshot of each service first (one that already stopped, as a file's collector
    # may have before this enricher started), then each new one.
    await ctx.bus.ensure_counters_stream()
    await ctx.bus.js.subscribe(
        COUNTERS_SUBJECTS,
        cb=on_counters,
        stream=STREAM_COUNTERS,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
    )


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
        await _follow_peer_counters(ctx, enricher)
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
        stop = asyncio.ensure_future(ctx.stopping.wait())
        settler = asyncio.create_task(pipeline.settle_forever())
        try:
            while not ctx.stopping.is_set():
                # A stop ends the wait for work at once (it waited up to fetch_timeout_s, which
                # `trawl up` waited too after every file). Messages a cancelled fetch took are
                # not acked: the stream delivers them again.
                pulled = subscription.fetch(settings.fetch_batch, timeout=settings.fetch_timeout_s)
                fetch = asyncio.ensure_future(pulled)
                await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await fetch
                    break
                try:
                    messages = fetch.result()
                except (TimeoutError, NatsTimeoutError):
                    continue
                for msg in messages:
                    await pipeline.handle(msg)
        finally:
            stop.cancel()
            # What was published gets its answer (bounded): acked now rather than redelivered.
            await pipeline.settle_all(settings.publish_timeout_s)
            settler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await settler
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
        if enricher.exporting or enricher.red.exporter is not None:
            # After the last metric export (in shutdown): its points are counted.
            log.info(EXPORT_TOTALS_EVENT, **ExportTotals.of(ctx.metrics).log_fields())


def _log_span_totals(totals: SpanTotals) -> None:
    """The final word on span export (what `trawl up` reads back and prints): after the
    shutdown every span handed over is exported, dropped or failed."""
    if totals.lost:
        log.warning(TOTALS_EVENT, **totals.log_fields())
    else:
        log.info(TOTALS_EVENT, **totals.log_fields())


def main(config_file: Path | None) -> int:
    return main_for("enricher", EnricherSettings, serve, config_file)
