"""What became of the spans handed to export: the counter names, and the one-line summary that
`trawl analyze --otlp-endpoint` and `trawl up` print when they finish.

Every span handed to the export processor (trawl.enricher.otlp) ends in exactly one of
exported, dropped (queue full, or handed after / left over at shutdown) and failed (the
exporter gave up after its retries), so after a shutdown `handed == exported + dropped +
failed`. Kept apart from otlp.py so that reading the totals (from a Registry, or from the
enricher's final log event, as `trawl up` does) does not import the OpenTelemetry SDK.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from trawl.metrics import Metric, Registry

HANDED = ("trawl_enricher_spans_handed_total", "Spans handed to the OTLP export processor")
EXPORTED = ("trawl_enricher_spans_exported_total", "Spans the OTLP endpoint accepted")
DROPPED = (
    "trawl_enricher_spans_dropped_total",
    "Spans never sent, by reason (queue_full: the export queue was at its bound; shutdown: left at shutdown)",
)
FAILED = ("trawl_enricher_spans_failed_total", "Spans whose export failed after the exporter's retries")
DROP_REASONS = ("queue_full", "shutdown")

# The enricher service's last log event when it exported spans (read back by `trawl up`).
TOTALS_EVENT = "span_export_totals"


@dataclass(frozen=True)
class SpanCounters:
    """The four span counters of one Registry, every label present from the start (the export
    thread then only updates existing entries, never adds one while /metrics reads them)."""

    handed: Metric
    exported: Metric
    dropped: Metric
    failed: Metric

    @classmethod
    def of(cls, registry: Registry) -> SpanCounters:
        counters = cls(
            handed=registry.counter(*HANDED),
            exported=registry.counter(*EXPORTED),
            dropped=registry.counter(*DROPPED),
            failed=registry.counter(*FAILED),
        )
        for metric in (counters.handed, counters.exported, counters.failed):
            metric.inc(0)
        for reason in DROP_REASONS:
            counters.dropped.inc(0, reason=reason)
        return counters

    def totals(self) -> SpanTotals:
        return SpanTotals(
            handed=int(self.handed.get()),
            exported=int(self.exported.get()),
            dropped_queue_full=int(self.dropped.get(reason="queue_full")),
            dropped_shutdown=int(self.dropped.get(reason="shutdown")),
            failed=int(self.failed.get()),
        )


@dataclass(frozen=True)
class SpanTotals:
    handed: int = 0
    exported: int = 0
    dropped_queue_full: int = 0
    dropped_shutdown: int = 0
    failed: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_queue_full + self.dropped_shutdown

    @property
    def unaccounted(self) -> int:
        """Spans handed but not yet exported, dropped or failed: in the queue or in flight (0 after a shutdown)."""
        return self.handed - self.exported - self.dropped - self.failed

    @property
    def lost(self) -> int:
        return self.dropped + self.failed

    def line(self) -> str:
        """`spans: 20000 handed, 16380 exported, 3620 dropped (3620 queue full, 0 shutdown), 0 failed`."""
        return (
            f"spans: {self.handed} handed, {self.exported} exported, {self.dropped} dropped "
            f"({self.dropped_queue_full} queue full, {self.dropped_shutdown} shutdown), {self.failed} failed"
        )

    def log_fields(self) -> dict[str, int]:
        return {
            "handed": self.handed,
            "exported": self.exported,
            "dropped_queue_full": self.dropped_queue_full,
            "dropped_shutdown": self.dropped_shutdown,
            "failed": self.failed,
        }

    @classmethod
    def from_log_fields(cls, fields: Mapping[str, object]) -> SpanTotals:
        """The totals of a TOTALS_EVENT log record; ValueError when a field is missing or not a count."""
        values: dict[str, int] = {}
        for name in ("handed", "exported", "dropped_queue_full", "dropped_shutdown", "failed"):
            value = fields.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{TOTALS_EVENT}: {name} is {value!r}, not a count")
            values[name] = value
        return cls(**values)


# The enricher service's log event, at its stop, with what became of its metric points and how
# many export attempts (spans and metrics) were retried (read back by `trawl up`).
EXPORT_TOTALS_EVENT = "export_totals"
POINTS = "trawl_enricher_metric_points_total"
METRIC_RETRIES = "trawl_enricher_metric_export_retries_total"
SPAN_RETRIES = "trawl_enricher_span_export_retries_total"


@dataclass(frozen=True)
class ExportTotals:
    """Metric points exported, rejected (a partial success) and failed, and the export
    attempts retried, of spans and of metrics: the second line `trawl up` prints."""

    points_exported: int = 0
    points_rejected: int = 0
    points_failed: int = 0
    metric_retries: int = 0
    span_retries: int = 0

    @classmethod
    def of(cls, registry: Registry) -> ExportTotals:
        found = {name: values for name, _, _, values in registry.families()}
        points = found.get(POINTS, {})
        return cls(
            points_exported=int(points.get((("result", "exported"),), 0)),
            points_rejected=int(points.get((("result", "rejected"),), 0)),
            points_failed=int(points.get((("result", "failed"),), 0)),
            metric_retries=int(sum(found.get(METRIC_RETRIES, {}).values())),
            span_retries=int(sum(found.get(SPAN_RETRIES, {}).values())),
        )

    def line(self) -> str:
        """`metrics: 120 points exported, 0 rejected, 0 failed; retried: 0 span exports, 2 metric exports`."""
        return (
            f"metrics: {self.points_exported} points exported, {self.points_rejected} rejected, "
            f"{self.points_failed} failed; retried: {self.span_retries} span exports, "
            f"{self.metric_retries} metric exports"
        )

    def log_fields(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_log_fields(cls, fields: Mapping[str, object]) -> ExportTotals:
        values: dict[str, int] = {}
        for name in cls.__dataclass_fields__:
            value = fields.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{EXPORT_TOTALS_EVENT}: {name} is {value!r}, not a count")
            values[name] = value
        return cls(**values)
