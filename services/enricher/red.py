"""RED metrics: the semantic-convention duration histograms, one set per observed service.

Like spans, metrics belong to the service that served or made the call, so each peer
Resource gets its own SDK MeterProvider. Those providers use pull readers (no thread each);
`export()` collects every provider and sends all resources in one OTLP request. The number
of providers is bounded (`max_resources`): past it, calls are recorded under one overflow
Resource (service.name = "trawl.overflow") and counted.

Attributes are the low-cardinality subset the conventions list for each histogram, taken
from the same mapping the spans use; paths appear only as `http.route` (when the dissector
knew the route) or `url.template` (numeric, UUID and hex segments replaced by {id}).
"""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.metrics import Histogram
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    ResourceMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.util.types import AttributeValue

import trawl
from trawl.enricher.paths import template_path
from trawl.enricher.spans import SpanShape, resource_for, shape_call, span_times
from trawl.logs import get_logger
from trawl.metrics import Registry
from trawl.v1.calls_pb2 import ApiCall

log = get_logger(__name__)

# Semantic-convention bucket advice for request durations, in seconds.
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
# The OpenTelemetry SDK's default explicit buckets: the conventions give body sizes no advice.
DEFAULT_BUCKETS = (
    0.0,
    5.0,
    10.0,
    25.0,
    50.0,
    75.0,
    100.0,
    250.0,
    500.0,
    750.0,
    1000.0,
    2500.0,
    5000.0,
    7500.0,
    10000.0,
)
OVERFLOW_RESOURCE = Resource({"service.name": "trawl.overflow"})


@dataclass(frozen=True)
class HistogramSpec:
    name: str
    description: str
    # Which side's Resource records it.
    side: str  # "client" or "server"
    attributes: frozenset[str]
    # What is measured: the call's duration, or the request's or the response's body size.
    value: str = "duration"  # "duration", "request_body" or "response_body"
    unit: str = "s"
    buckets: tuple[float, ...] = DURATION_BUCKETS_S


_HTTP_COMMON = {"http.request.method", "http.response.status_code", "error.type", "network.protocol.version"}
_HTTP_SERVER = frozenset({*_HTTP_COMMON, "http.route", "url.scheme", "url.template"})
_HTTP_CLIENT = frozenset({*_HTTP_COMMON, "server.address", "server.port", "url.template"})


def _body_size(name: str, description: str, side: str, attributes: frozenset[str], value: str) -> HistogramSpec:
    return HistogramSpec(name, description, side, attributes, value=value, unit="By", buckets=DEFAULT_BUCKETS)


_SPECS: dict[str, tuple[HistogramSpec, ...]] = {
    "http": (
        HistogramSpec("http.server.request.duration", "Duration of HTTP server requests.", "server", _HTTP_SERVER),
        HistogramSpec("http.client.request.duration", "Duration of HTTP client requests.", "client", _HTTP_CLIENT),
        # The body-size histograms take their side's duration attributes, as the conventions say.
        _body_size(
            "http.server.request.body.size",
            "Size of HTTP server request bodies.",
            "server",
            _HTTP_SERVER,
            "request_body",
        ),
        _body_size(
            "http.server.response.body.size",
            "Size of HTTP server response bodies.",
            "server",
            _HTTP_SERVER,
            "response_body",
        ),
        _body_size(
            "http.client.request.body.size",
            "Size of HTTP client request bodies.",
            "client",
            _HTTP_CLIENT,
            "request_body",
        ),
        _body_size(
            "http.client.response.body.size",
            "Size of HTTP client response bodies.",
            "client",
            _HTTP_CLIENT,
            "response_body",
        ),
    ),
    "grpc": (
        HistogramSpec(
            "rpc.server.call.duration",
            "Measures the duration of inbound remote procedure calls.",
            "server",
            frozenset({"rpc.system.name", "rpc.method", "rpc.response.status_code", "error.type"}),
        ),
        HistogramSpec(
            "rpc.client.call.duration",
            "Measures the duration of outbound remote procedure calls.",
            "client",
            frozenset({"rpc.system.name", "rpc.method", "rpc.response.status_code", "error.type", "server.address"}),
        ),
    ),
    "redis": (
        HistogramSpec(
            "db.client.operation.duration",
            "Duration of database client operations.",
            "client",
            frozenset({"db.system.name", "db.operation.name", "db.namespace", "db.response.status_code", "error.type"}),
        ),
    ),
    "messaging": (
        HistogramSpec(
            "messaging.client.operation.duration",
            "Duration of messaging operation initiated by a producer or consumer client.",
            "client",
            frozenset(
                {
                    "messaging.system",
                    "messaging.operation.name",
                    "messaging.operation.type",
                    "messaging.destination.name",
                    "error.type",
                }
            ),
        ),
    ),
    "dns": (
        HistogramSpec(
            "dns.lookup.duration",
            "Measures the time taken to perform a DNS lookup.",
            "client",
            frozenset({"error.type"}),
        ),
    ),
}
PROTOCOL_SPECS = {
    "http": _SPECS["http"],
    "http2": _SPECS["http"],
    "graphql": _SPECS["http"],
    "grpc": _SPECS["grpc"],
    "redis": _SPECS["redis"],
    "kafka": _SPECS["messaging"],
    "amqp": _SPECS["messaging"],
    "dns": _SPECS["dns"],
}


class _ResourceMeters:
    """One peer's MeterProvider with its pull reader and histograms."""

    def __init__(self, resource: Resource) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader], resource=resource, shutdown_on_exit=False)
        self._meter = self.provider.get_meter("trawl.enricher", trawl.__version__)
        self._histograms: dict[str, Histogram] = {}

    def histogram(self, spec: HistogramSpec) -> Histogram:
        histogram = self._histograms.get(spec.name)
        if histogram is None:
            histogram = self._histograms[spec.name] = self._meter.create_histogram(
                spec.name,
                unit=spec.unit,
                description=spec.description,
                explicit_bucket_boundaries_advisory=spec.buckets,
            )
        return histogram


class RedMetrics:
    def __init__(self, exporter: MetricExporter | None, max_resources: int, registry: Registry) -> None:
        self.exporter = exporter
        self.max_resources = max_resources
        self._meters: dict[Resource, _ResourceMeters] = {}
        self._overflow = registry.counter(
            "trawl_enricher_metric_resource_overflow_total",
            "Calls whose RED metrics went to the overflow resource because max_metric_resources was reached",
        )
        self._export_failures = registry.counter(
            "trawl_enricher_metric_export_failures_total", "OTLP metric exports that failed"
        )

    def _for(self, resource: Resource) -> tuple[_ResourceMeters, bool]:
        """The resource's meters, or the overflow resource's (then True) past `max_resources`."""
        meters = self._meters.get(resource)
        if meters is not None:
            return meters, False
        overflowed = len(self._meters) >= self.max_resources
        if overflowed:
            resource = OVERFLOW_RESOURCE
            meters = self._meters.get(resource)
        if meters is None:
            meters = self._meters[resource] = _ResourceMeters(resource)
        return meters, overflowed

    def record(self, call: ApiCall, shape: SpanShape | None = None) -> None:
        specs = PROTOCOL_SPECS.get(call.protocol)
        if not specs or not call.request.ts:
            return
        shape = shape or shape_call(call)
        start, end = span_times(call)
        seconds = (end - start) / 1e9
        overflowed = False
        for spec in specs:
            endpoint = call.src if spec.side == "client" else call.dst
            side_attributes = shape.client if spec.side == "client" else shape.server
            merged: dict[str, AttributeValue] = {**shape.common, **side_attributes}
            if "url.template" in spec.attributes and "url.template" not in merged and call.protocol != "graphql":
                # A learned or documented route bounds the series; the templated path otherwise.
                merged["url.template"] = call.http.route or template_path(call.path)
            if spec.side == "client" and "server.address" in spec.attributes:
                # Metrics name the peer's service or workload, not its pod IP: one series per pod would
                # follow every rollout. Unknown peers keep their address (the SDK caps attribute sets).
                merged["server.address"] = call.dst.service or call.dst.workload or merged.get("server.address", "")
            attributes = {key: value for key, value in merged.items() if key in spec.attributes}
            measured = (
                seconds
                if spec.value == "duration"
                else call.request.body_size
                if spec.value == "request_body"
                else call.response.body_size
            )
            meters, overflow = self._for(resource_for(endpoint))
            overflowed = overflowed or overflow
            meters.histogram(spec).record(measured, attributes)
        if overflowed:  # once per call, whichever of its histograms overflowed
            self._overflow.inc()

    @property
    def resources(self) -> int:
        return len(self._meters)

    def collect(self) -> MetricsData:
        resource_metrics: list[ResourceMetrics] = []
        for meters in list(self._meters.values()):
            data = meters.reader.get_metrics_data()
            if data is not None:
                resource_metrics.extend(data.resource_metrics)
        return MetricsData(resource_metrics=resource_metrics)

    def export(self, timeout_s: float = 10.0) -> bool:
        """Push every resource's histograms (cumulative); blocking, so async callers use a thread."""
        if self.exporter is None:
            return True
        data = self.collect()
        if not data.resource_metrics:
            return True
        result = self.exporter.export(data, timeout_millis=timeout_s * 1000)
        if result is not MetricExportResult.SUCCESS:
            self._export_failures.inc()
            log.warning("metric_export_failed", resources=len(data.resource_metrics))
            return False
        return True

    def shutdown(self) -> None:
        self.export()
        for meters in list(self._meters.values()):
            meters.provider.shutdown()
        if self.exporter is not None:
            self.exporter.shutdown()
