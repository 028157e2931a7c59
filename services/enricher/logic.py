"""The enricher without a bus: identity in, spans and RED metrics out.

`Enricher` is what the service's `main` drives per CallBatch and what `trawl analyze` calls
in-process (`build_enricher`). Span export is asynchronous (the SDK's BatchSpanProcessor
thread); metric export and `flush`/`shutdown` block, so async callers run them in a thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from opentelemetry.sdk.metrics.export import MetricExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from trawl.enricher.config import EnricherSettings
from trawl.enricher.identity import IdentityMap
from trawl.enricher.red import RedMetrics
from trawl.enricher.spans import call_spans, shape_call
from trawl.logs import get_logger
from trawl.metrics import Metric, Registry
from trawl.v1.calls_pb2 import ApiCall

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


def span_exporter_for(settings: EnricherSettings) -> SpanExporter | None:
    """The OTLP span exporter the settings ask for, or None when no endpoint is configured."""
    target = settings.traces_target()
    if target is None:
        return None
    if settings.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

        return HttpSpanExporter(
            endpoint=target.http_url("traces"), headers=settings.headers, timeout=settings.otlp_timeout_s
        )
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

    return GrpcSpanExporter(
        endpoint=target.endpoint,
        insecure=settings.grpc_insecure(target.endpoint),
        headers=settings.headers,
        timeout=settings.otlp_timeout_s,
    )


def metric_exporter_for(settings: EnricherSettings) -> MetricExporter | None:
    """The OTLP metric exporter the settings ask for, or None when no endpoint is configured."""
    target = settings.metrics_target()
    if target is None:
        return None
    if settings.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter

        return HttpMetricExporter(
            endpoint=target.http_url("metrics"), headers=settings.headers, timeout=settings.otlp_timeout_s
        )
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter

    return GrpcMetricExporter(
        endpoint=target.endpoint,
        insecure=settings.grpc_insecure(target.endpoint),
        headers=settings.headers,
        timeout=settings.otlp_timeout_s,
    )


class Enricher:
    """Identity for each call's two endpoints, then a CLIENT+SERVER span pair and RED metrics."""

    def __init__(
        self,
        settings: EnricherSettings,
        identity: IdentityMap,
        span_exporter: SpanExporter | None = None,
        metric_exporter: MetricExporter | None = None,
        metrics: Registry | None = None,
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.metrics = metrics if metrics is not None else Registry()
        self._calls = self.metrics.counter("trawl_enricher_calls_total", "Calls enriched, by protocol")
        self._unknown = self.metrics.counter(
            "trawl_enricher_unknown_peers_total", "Call endpoints with no Kubernetes identity, by side"
        )
        self._spans_queued = self.metrics.counter("trawl_enricher_spans_queued_total", "Spans handed to the exporter")
        self._failures = self.metrics.counter(
            "trawl_enricher_call_failures_total", "Calls that could not be enriched or turned into spans, by stage"
        )
        self._processor: BatchSpanProcessor | None = None
        if span_exporter is not None:
            counting = CountingSpanExporter(
                span_exporter,
                self.metrics.counter("trawl_enricher_spans_exported_total", "Spans the OTLP endpoint accepted"),
                self.metrics.counter("trawl_enricher_span_export_failures_total", "Spans lost to failed OTLP exports"),
            )
            self._processor = BatchSpanProcessor(
                counting,
                max_queue_size=settings.export_max_queue_size,
                schedule_delay_millis=settings.export_schedule_delay_ms,
                max_export_batch_size=min(settings.export_max_batch_size, settings.export_max_queue_size),
            )
        self.red = RedMetrics(metric_exporter, settings.max_metric_resources, self.metrics)

    @property
    def exporting(self) -> bool:
        return self._processor is not None

    def enrich(self, call: ApiCall) -> ApiCall:
        """Fill src/dst identity in place (and return the call); a call that cannot be enriched
        goes on with what it has (counted and logged), it is never dropped."""
        try:
            self.identity.enrich(call)
        except Exception as exc:  # one odd call must not stop the stream
            self._failures.inc(stage="identity")
            log.warning("enrich_failed", call_id=call.id, error=repr(exc))
        self._calls.inc(protocol=call.protocol or "unknown")
        if not call.src.workload and not call.src.node:
            self._unknown.inc(side="src")
        if not call.dst.workload and not call.dst.node and not call.dst.service:
            self._unknown.inc(side="dst")
        return call

    def export(self, calls: Iterable[ApiCall]) -> None:
        """Queue each enriched call's spans and record its RED metrics; returns without waiting for the network."""
        for call in calls:
            if not call.request.ts:
                continue  # no time, no span: a span needs a start
            try:
                if self._processor is not None:
                    for span in call_spans(call):
                        self._processor.on_end(span)
                    self._spans_queued.inc(2)
                if self.red.exporter is not None:
                    self.red.record(call, shape_call(call))
            except Exception as exc:  # one odd call must not stop the stream
                self._failures.inc(stage="export")
                log.warning("span_build_failed", call_id=call.id, error=repr(exc))

    def export_metrics(self) -> bool:
        """Push the RED histograms now (blocking)."""
        return self.red.export(self.settings.otlp_timeout_s)

    def flush(self) -> bool:
        """Send every queued span and the current metrics (blocking)."""
        spans_ok = self._processor.force_flush(int(self.settings.otlp_timeout_s * 1000)) if self._processor else True
        return self.export_metrics() and spans_ok

    def shutdown(self) -> None:
        """Flush and stop the exporters (blocking); the Enricher cannot export afterwards."""
        if self._processor is not None:
            self._processor.shutdown()  # type: ignore[no-untyped-call]
            self._processor = None
        self.red.shutdown()


def load_identity(settings: EnricherSettings) -> IdentityMap:
    if settings.identity_snapshot is None:
        return IdentityMap.empty(settings.cluster)
    identity = IdentityMap.from_snapshot(settings.identity_snapshot, settings.cluster)
    log.info("identity_loaded", snapshot=str(settings.identity_snapshot), claims=len(identity))
    return identity


def enricher_from_settings(settings: EnricherSettings, metrics: Registry | None = None) -> Enricher:
    return Enricher(
        settings, load_identity(settings), span_exporter_for(settings), metric_exporter_for(settings), metrics
    )


def build_enricher(
    source: EnricherSettings | Path | None = None,
    otlp_endpoint: str | None = None,
    *,
    cluster: str | None = None,
    config_file: Path | None = None,
    metrics: Registry | None = None,
) -> Enricher:
    """The enricher `trawl analyze` runs in-process.

    `source` is either loaded settings, or the identity snapshot path (None: no identity), in
    which case settings come from `config_file` and the environment (TRAWL_ENRICHER_*,
    OTEL_EXPORTER_OTLP_*). `otlp_endpoint` and `cluster`, when given, override either way.
    Raises InputError for a bad snapshot and ConfigError for bad settings."""
    if isinstance(source, EnricherSettings):
        updates = {key: value for key, value in (("otlp_endpoint", otlp_endpoint), ("cluster", cluster)) if value}
        settings = source.model_copy(update=updates)
    else:
        settings = EnricherSettings.load(
            config_file, identity_snapshot=source, otlp_endpoint=otlp_endpoint, cluster=cluster
        )
    return enricher_from_settings(settings, metrics)
