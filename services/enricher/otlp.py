"""The OpenTelemetry SDK side of span export, imported only when an OTLP endpoint is configured:
the SDK costs about 40 ms of start-up that `trawl analyze` without `--otlp-endpoint` skips.

`CountingBatchSpanProcessor` has the SDK BatchSpanProcessor's shape (the processor owns the
queue, its bound, the batching thread, the drop counting and the flush; the exporter only
encodes and sends) but accounts for every span it is handed. The SDK's processor drops the
oldest span silently (a log line, no count) when its queue is full, and leaves uncounted what
is still queued when its shutdown times out; here each span ends in exactly one of
`trawl_enricher_spans_exported_total`, `..._dropped_total{reason="queue_full"|"shutdown"}` and
`..._failed_total` (the exporter's result per batch, after its own retries, counted per span).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from trawl.enricher.config import EnricherSettings
from trawl.enricher.span_totals import SpanCounters, SpanTotals
from trawl.logs import get_logger
from trawl.metrics import Registry

log = get_logger(__name__)

# A worker that does not come back from an export this long after the exporter was shut down
# is left behind; its batch is then counted as dropped at shutdown.
_WORKER_GRACE_S = 2.0
SHUTDOWN_TIMEOUT_S = 5.0


class CountingBatchSpanProcessor(SpanProcessor):
    """Spans queue up to `max_queue_size` (more are dropped and counted as `queue_full`); a
    thread exports them in batches of `max_export_batch_size`, when a batch is full or every
    `schedule_delay_s`. `shutdown` sends what is queued within `shutdown_timeout_s`, then stops
    the exporter (which ends an export in progress) and counts what is left as `shutdown`."""

    def __init__(
        self,
        exporter: SpanExporter,
        counters: SpanCounters,
        *,
        max_queue_size: int,
        max_export_batch_size: int,
        schedule_delay_s: float,
        shutdown_timeout_s: float,
    ) -> None:
        if max_queue_size <= 0 or max_export_batch_size <= 0 or schedule_delay_s <= 0 or shutdown_timeout_s <= 0:
            raise ValueError("queue size, batch size, schedule delay and shutdown timeout must be positive")
        self.exporter = exporter
        self.counters = counters
        self.max_queue_size = max_queue_size
        self.max_export_batch_size = min(max_export_batch_size, max_queue_size)
        self.schedule_delay_s = schedule_delay_s
        self.shutdown_timeout_s = shutdown_timeout_s
        # `_lock` guards the queue, the state flags and every counter update, so the counters
        # add up at any instant the lock is free; `_export_lock` lets one export run at a time
        # (the worker's or a force_flush's), so batches leave in the order they were queued.
        self._lock = threading.Lock()
        self._export_lock = threading.Lock()
        self._queue: deque[ReadableSpan] = deque()
        self._in_flight = 0
        self._stopping = False  # no more spans accepted
        self._cut_off = False  # shutdown's time is up: no further batch is started
        self._finished = False  # accounting closed: a late export result is no longer counted
        self._wake = threading.Event()
        self._consecutive_failures = 0
        self._worker = threading.Thread(target=self._work, name="trawl-span-export", daemon=True)
        self._worker.start()

    # -- SpanProcessor ---------------------------------------------------------------------------

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Spans are handed over finished (`on_end`); nothing to do when one starts."""

    def on_end(self, span: ReadableSpan) -> None:
        self.hand_over((span,))

    def hand_over(self, spans: Sequence[ReadableSpan]) -> None:
        """`on_end` for many spans at once: one lock and one update of each counter for all of
        them (the enricher hands over a CallBatch's spans this way)."""
        if not spans:
            return
        with self._lock:
            self.counters.handed.inc(len(spans))
            if self._stopping:
                self.counters.dropped.inc(len(spans), reason="shutdown")
                return
            room = self.max_queue_size - len(self._queue)
            if room < len(spans):
                # The queue keeps what it holds and the newest spans are the ones dropped.
                self.counters.dropped.inc(len(spans) - max(0, room), reason="queue_full")
                spans = spans[: max(0, room)]
            self._queue.extend(spans)
            batch_ready = len(self._queue) >= self.max_export_batch_size
        if batch_ready:
            self._wake.set()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export every queued span now, in the caller's thread; False when the deadline passed
        with spans still queued, or a batch failed."""
        deadline = time.monotonic() + timeout_millis / 1000
        all_sent = True
        while time.monotonic() < deadline:
            sent = self._export_one_batch()
            if sent is None:
                return all_sent
            all_sent = all_sent and sent
        with self._lock:
            return all_sent and not self._queue

    def shutdown(self) -> None:
        """Send what is queued (within `shutdown_timeout_s`), stop the exporter, and close the
        accounting: afterwards every span handed over is counted exactly once."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._wake.set()
        self._worker.join(self.shutdown_timeout_s)
        with self._lock:
            self._cut_off = True
        # Ends an export still in progress (the gRPC exporter closes its channel) so the worker
        # can return; what it was sending then counts as failed.
        try:
            self.exporter.shutdown()
        except Exception as exc:
            log.warning("span_exporter_shutdown_failed", error=repr(exc))
        self._worker.join(_WORKER_GRACE_S)
        with self._lock:
            self._finished = True
            left = len(self._queue) + self._in_flight
            self._queue.clear()
            self._in_flight = 0
            if left:
                self.counters.dropped.inc(left, reason="shutdown")
        if left:
            log.warning("spans_dropped_at_shutdown", spans=left, timeout_s=self.shutdown_timeout_s)

    # -- accounting ------------------------------------------------------------------------------

    def totals(self) -> SpanTotals:
        with self._lock:
            return self.counters.totals()

    # -- the export thread -----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            self._wake.wait(self.schedule_delay_s)
            self._wake.clear()
            # A full batch goes at once; a partial one when the delay passed (or at shutdown).
            while self._export_one_batch() is not None:
                with self._lock:
                    if self._stopping:
                        continue  # at shutdown: everything queued, until shutdown gives up
                    if len(self._queue) < self.max_export_batch_size:
                        break
            with self._lock:
                if self._stopping and (not self._queue or self._cut_off):
                    return

    def _export_one_batch(self) -> bool | None:
        """Export the oldest batch; None when nothing is queued, else whether it was accepted."""
        with self._export_lock:
            with self._lock:
                if not self._queue or self._cut_off:
                    return None
                count = min(self.max_export_batch_size, len(self._queue))
                batch = [self._queue.popleft() for _ in range(count)]
                self._in_flight = count
            result = self._export(batch)
            with self._lock:
                if self._finished:
                    return False  # shutdown counted this batch as dropped already
                self._in_flight = 0
                if result is SpanExportResult.SUCCESS:
                    self.counters.exported.inc(count)
                else:
                    self.counters.failed.inc(count)
            self._note(result, count)
            return result is SpanExportResult.SUCCESS

    def _export(self, batch: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            return self.exporter.export(batch)
        except Exception as exc:  # an exporter bug must not stop the thread: the batch failed
            log.warning("span_export_raised", spans=len(batch), error=repr(exc))
            return SpanExportResult.FAILURE

    def _note(self, result: SpanExportResult, count: int) -> None:
        """One warning when exports start failing and one when they recover, not one per batch
        (the counters carry the numbers)."""
        if result is SpanExportResult.SUCCESS:
            if self._consecutive_failures:
                log.info("span_export_recovered", failed_batches=self._consecutive_failures)
            self._consecutive_failures = 0
            return
        if not self._consecutive_failures:
            log.warning("span_export_failing", spans=count)
        self._consecutive_failures += 1


def span_processor(exporter: SpanExporter, settings: EnricherSettings, metrics: Registry) -> CountingBatchSpanProcessor:
    """The batching thread in front of `exporter`, counting every span's fate in `metrics`."""
    # The SDK exporters log a warning for each retry of each batch; the processor's counters and
    # its failing/recovered events say the same once. Their final error per batch stays.
    logging.getLogger("opentelemetry.exporter.otlp").setLevel(logging.ERROR)
    return CountingBatchSpanProcessor(
        exporter,
        SpanCounters.of(metrics),
        max_queue_size=settings.export_max_queue_size,
        max_export_batch_size=settings.export_max_batch_size,
        schedule_delay_s=settings.export_schedule_delay_ms / 1000,
        # What a shutdown may spend sending the queue: one export's timeout, at most 5 s (a
        # healthy endpoint takes a full default queue in well under that), so the enricher
        # stops within the time `trawl up` or an orchestrator gives it; the rest is counted.
        shutdown_timeout_s=min(settings.otlp_timeout_s, SHUTDOWN_TIMEOUT_S),
    )
