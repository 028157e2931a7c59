"""The OpenTelemetry SDK side of span export, imported only when an OTLP endpoint is configured:
the SDK costs about 40 ms of start-up that `trawl analyze` without `--otlp-endpoint` skips."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from trawl.enricher.config import EnricherSettings
from trawl.logs import get_logger
from trawl.metrics import Metric, Registry

log = get_logger(__name__)


class CountingSpanExporter(SpanExporter):
    """Counts what the wrapped exporter sent and what it failed to send (loss is never silent)."""

    def __init__(self, inner: SpanExporter, exported: Metric, failed: Metric) -> None:
        self.inner = inner
        self._exported = exported
        self._failed = failed

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as exc:
            log.warning("span_export_failed", spans=len(spans), error=str(exc))
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self._exported.inc(len(spans))
        else:
            self._failed.inc(len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


def span_processor(exporter: SpanExporter, settings: EnricherSettings, metrics: Registry) -> BatchSpanProcessor:
    """The SDK's batching thread in front of `exporter`, counting exported and lost spans in `metrics`."""
    counting = CountingSpanExporter(
        exporter,
        metrics.counter("trawl_enricher_spans_exported_total", "Spans the OTLP endpoint accepted"),
        metrics.counter("trawl_enricher_span_export_failures_total", "Spans lost to failed OTLP exports"),
    )
    return BatchSpanProcessor(
        counting,
        max_queue_size=settings.export_max_queue_size,
        schedule_delay_millis=settings.export_schedule_delay_ms,
        max_export_batch_size=min(settings.export_max_batch_size, settings.export_max_queue_size),
    )
