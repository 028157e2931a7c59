"""The OpenTelemetry SDK side of span export, imported only when an OTLP endpoint is configured:
the SDK costs about 40 ms of start-up that `trawl analyze` without `--otlp-endpoint` skips.

`CountingBatchSpanProcessor` is an SDK SpanProcessor over batching.CountingBatcher (the queue,
its bound, the batching thread, the drop counting and the flush, shared with the compiled span
path) in front of an SDK SpanExporter. The SDK's own BatchSpanProcessor drops the oldest span
silently (a log line, no count) when its queue is full, and leaves uncounted what is still
queued when its shutdown times out; here each span ends in exactly one of
`trawl_enricher_spans_exported_total`, `..._dropped_total{reason="queue_full"|"shutdown"}` and
`..._failed_total` (the exporter's result per batch, after its own retries, counted per span).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from trawl.enricher.batching import CountingBatcher, Sent
from trawl.enricher.config import EnricherSettings
from trawl.enricher.span_totals import SpanCounters, SpanTotals
from trawl.metrics import Registry

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
        self.exporter = exporter
        self.counters = counters
        self.batcher: CountingBatcher[ReadableSpan] = CountingBatcher(
            self._export,
            exporter.shutdown,
            counters,
            weight=None,
            max_queue_spans=max_queue_size,
            max_batch_spans=max_export_batch_size,
            schedule_delay_s=schedule_delay_s,
            shutdown_timeout_s=shutdown_timeout_s,
        )

    def _export(self, batch: list[ReadableSpan], count: int) -> Sent:
        result = self.exporter.export(batch)
        return Sent(count, 0) if result is SpanExportResult.SUCCESS else Sent(0, count, f"exporter: {result.name}")

    # -- SpanProcessor ---------------------------------------------------------------------------

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Spans are handed over finished (`on_end`); nothing to do when one starts."""

    def on_end(self, span: ReadableSpan) -> None:
        self.batcher.hand_over((span,))

    def hand_over(self, spans: Sequence[ReadableSpan]) -> None:
        """`on_end` for many spans at once: one lock and one update of each counter for all of
        them (the enricher hands over a CallBatch's spans this way)."""
        self.batcher.hand_over(spans)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export every queued span now, in the caller's thread; False when the deadline passed
        with spans still queued, or a batch failed."""
        return self.batcher.force_flush(timeout_millis / 1000)

    def shutdown(self) -> None:
        """Send what is queued (within the shutdown timeout), stop the exporter, and close the
        accounting: afterwards every span handed over is counted exactly once."""
        self.batcher.shutdown()

    def totals(self) -> SpanTotals:
        return self.batcher.totals()


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
