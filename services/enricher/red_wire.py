"""RED and service-graph metrics without the OpenTelemetry SDK on each call: the histograms
red.py records through the SDK (its reference), aggregated here into plain bucket arrays and
exported as OTLP `ExportMetricsServiceRequest` bytes built once per export.

Per call, the work is a key of the few fields the metric attributes depend on (protocol,
method, status, outcome, both endpoints' identity, and per protocol what its mapping reads:
the HTTP version, route, host and templated path, the gRPC code, the Redis database, the
messaging destination...), one dict lookup of that key, then a bisect and a few integer adds
per histogram. What the key stands for (the series each histogram of the call goes to, whether
the call failed, its service-graph edge) is worked out once per distinct key with red.py's own
mapping (spans.shape_call), so both paths give the same attribute sets;
tests/unit/test_otel_red_wire.py holds them to the same counts, sums, min, max and buckets.

Bounds, as the SDK has them: `max_resources` peer resources (past it, the overflow resource
service.name=trawl.overflow, calls counted in trawl_enricher_metric_resource_overflow_total),
and `cardinality_limit` attribute sets per histogram and resource (past it, the SDK's overflow
set {otel.metric.overflow: true}, calls counted in trawl_enricher_metric_attribute_overflow_total).
The key cache is only a cache: cleared when it holds `MAX_KEYS`.

Temporality follows OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE as the SDK reads it:
`cumulative` (default) keeps the points from the first call on; `delta` and `lowmemory` send
what came since the last export (histograms and counters), then forget the series (attribute
sets come back with their next call). Trawl's own counters (the enricher's registry: calls by
protocol, spans exported, dropped and failed, upstream losses per shard...) and the TCP
diagnostics the calls carry (resets, retransmissions, refused connections, by kind) go in the
same request under the resource service.name=trawl, as do the service-graph series.

Exemplars: each histogram bucket keeps the last call that fell in it since the previous export
(the SDK's aligned-bucket reservoir), exported with the trace and span ids spans.span_ids gives
that call, i.e. those of the spans both span paths send: the SERVER span for a server-side
histogram, the CLIENT span for a client-side one and for the service graph.

Service graph (Tempo's metrics-generator and the Collector's servicegraph connector name these):
traces_service_graph_request_total, ..._request_failed_total, ..._request_server_seconds and
..._request_client_seconds, with client, server (the two resources' service.name) and
connection_type ("" for a direct request, messaging_system, database). Trawl sees both ends of
a call at once, so no span pairing is needed; both sides' spans cover the same interval, so the
server and client histograms are the same points.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import trawl
from trawl.enricher.paths import template_path
from trawl.enricher.red import OVERFLOW_RESOURCE, PROTOCOL_SPECS, HistogramSpec
from trawl.enricher.spans import resource_for, shape_call, span_ids
from trawl.enricher.wire_export import Attempt
from trawl.logs import get_logger
from trawl.metrics import Registry
from trawl.v1.calls_pb2 import ApiCall, Endpoint

if TYPE_CHECKING:
    from typing import TypeAlias

    from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

    from trawl.enricher.config import EnricherSettings
    from trawl.enricher.wire_export import Sender, WireExportOptions

    Temporality: TypeAlias = AggregationTemporality.ValueType

log = get_logger(__name__)

# The SDK's default cardinality limit per metric stream (opentelemetry-sdk _view_instrument_match).
CARDINALITY_LIMIT = 2000
OVERFLOW_ATTRIBUTES: tuple[tuple[str, object], ...] = (("otel.metric.overflow", True),)
MAX_KEYS = 65_536
MAX_TEMPLATES = 16_384
# What one export request holds at most (a gRPC receiver takes 4 MiB by default).
MAX_REQUEST_BYTES = 1 << 20
# Tempo's metrics-generator default buckets for the service-graph histograms, in seconds.
SERVICE_GRAPH_BUCKETS_S = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8)
TRAWL_RESOURCE: tuple[tuple[str, object], ...] = (("service.name", "trawl"), ("service.version", trawl.__version__))
TEMPORALITY_ENV = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"
TEMPORALITIES = ("cumulative", "delta", "lowmemory")
SCOPE_NAME = "trawl.enricher"

Attrs = tuple[tuple[str, object], ...]
# What an exemplar keeps of its call: id, trace id and parent span id (its spans' ids follow
# from them, spans.span_ids), and its end time.
Sample = tuple[str, str, str, int]


def temporality_from(environ: Mapping[str, str]) -> str:
    """The OTLP temporality preference (the SDK's variable); a clear error for an unknown one."""
    value = environ.get(TEMPORALITY_ENV, "").strip().lower() or "cumulative"
    if value not in TEMPORALITIES:
        from trawl.errors import ConfigError

        raise ConfigError(f"{TEMPORALITY_ENV}: expected one of {', '.join(TEMPORALITIES)}, got {value!r}")
    return value


class Series:
    """One histogram data point: bucket counts over fixed bounds, count, sum, min, max, and the
    last call of each bucket (its exemplar)."""

    __slots__ = (
        "attributes",
        "bounds",
        "count",
        "counts",
        "exemplar_values",
        "exemplars",
        "max",
        "min",
        "start_ns",
        "sum",
    )

    def __init__(self, attributes: Attrs, bounds: tuple[float, ...], start_ns: int) -> None:
        self.attributes = attributes
        self.bounds = bounds
        self.start_ns = start_ns
        self.counts = [0] * (len(bounds) + 1)
        # Per bucket, the last call's Sample and value: a few of its fields, not the call (a
        # call parsed from a CallBatch would keep the whole batch's memory alive).
        self.exemplars: list[Sample | None] = [None] * (len(bounds) + 1)
        self.exemplar_values: list[float] = [0.0] * (len(bounds) + 1)
        self.count = 0
        # An int while the values are (body sizes), as the SDK sums them: exact past 2**53.
        self.sum: float = 0
        self.min = float("inf")
        self.max = float("-inf")

    def add(self, value: float, sample: Sample) -> None:
        # bisect_left: a value equal to a bound is in that bound's bucket, as OTLP (and the SDK) say.
        index = bisect_left(self.bounds, value)
        self.counts[index] += 1
        self.exemplars[index] = sample
        self.exemplar_values[index] = value
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value


@dataclass
class _Stream:
    """One histogram of one resource: its series by attribute set, bounded."""

    spec: HistogramSpec
    series: dict[Attrs, Series]


class _Edge:
    __slots__ = ("attributes", "failed", "group", "seconds")

    def __init__(self, attributes: Attrs, start_ns: int) -> None:
        self.attributes = attributes
        self.failed = 0
        self.seconds = Series(attributes, SERVICE_GRAPH_BUCKETS_S, start_ns)
        self.group = (self.seconds,)


@dataclass(frozen=True)
class _Entry:
    """What one key stands for: the series each of its histograms goes to, and its edge."""

    # The series of each measured value; the series of one value share their bucket bounds.
    durations: tuple[Series, ...]
    request_bodies: tuple[Series, ...]
    response_bodies: tuple[Series, ...]
    edge: _Edge | None
    failed: bool
    resource_overflow: bool
    attribute_overflow: bool


def _endpoint_key(endpoint: Endpoint) -> tuple[str, ...]:
    return (
        endpoint.name,
        endpoint.namespace,
        endpoint.pod,
        endpoint.workload,
        endpoint.workload_kind,
        endpoint.node,
        endpoint.cluster,
        endpoint.ip,
        endpoint.service,
    )


# One metric of a Registry: name, help, kind ("counter" or "gauge") and values by label set.
Family = tuple[str, str, str, dict[tuple[tuple[str, str], ...], float]]
# Services whose counters are kept at most (a peer that stops publishing stays until replaced).
MAX_PEERS = 1024


class PeerCounters:
    """The latest counters each other Trawl service published (trawl.service publishes its
    Registry on trawl.v1.control.metrics.<service>.<node> every few seconds, when drained and
    when it stops), by (service, node): exported by RedAggregator beside the enricher's own,
    so the collector's packets and drops and the dissector's parse errors reach the OTLP
    metrics without an exporter in each of them (nor its OpenTelemetry imports at start)."""

    def __init__(self, skip_service: str | None = "enricher", max_peers: int = MAX_PEERS) -> None:
        # Enrichers export their own registry: another replica's snapshot would be sent twice.
        self.skip_service = skip_service
        self.max_peers = max_peers
        self._latest: dict[tuple[str, str], list[Family]] = {}

    def update(self, payload: bytes) -> tuple[str, str] | None:
        """Keep a published snapshot; the (service, node) it is of, None when it is not one
        (or an enricher's, or past max_peers)."""
        try:
            document = json.loads(payload)
            peer = (str(document["service"]), str(document["node"]))
            families: list[Family] = [
                (
                    str(family["name"]),
                    str(family.get("help", "")),
                    "counter" if family.get("kind") == "counter" else "gauge",
                    {
                        tuple(sorted((str(k), str(v)) for k, v in labels.items())): float(value)
                        for labels, value in family.get("values", [])
                    },
                )
                for family in document["families"]
            ]
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if peer[0] == self.skip_service or (peer not in self._latest and len(self._latest) >= self.max_peers):
            return None
        self._latest[peer] = families  # one assignment: an export in another thread sees old or new
        return peer

    def items(self) -> list[tuple[tuple[str, str], list[Family]]]:
        return list(self._latest.items())


class RedAggregator:
    """The enricher's RED and service-graph metrics as bucket arrays (module docstring)."""

    def __init__(
        self,
        registry: Registry,
        *,
        max_resources: int,
        cardinality_limit: int = CARDINALITY_LIMIT,
        temporality: str = "cumulative",
        max_edges: int = CARDINALITY_LIMIT,
    ) -> None:
        if temporality not in TEMPORALITIES:
            raise ValueError(f"temporality: expected one of {TEMPORALITIES}, got {temporality!r}")
        self.registry = registry
        self.max_resources = max_resources
        self.cardinality_limit = cardinality_limit
        self.max_edges = max_edges
        self.delta = temporality != "cumulative"
        # The registry's counters are read as totals, as an asynchronous counter observes: under
        # `lowmemory` the SDK keeps those cumulative (only synchronous counters and histograms
        # go delta).
        self.registry_delta = temporality == "delta"
        self._start_ns = time.time_ns()
        self._resources: dict[tuple[tuple[str, object], ...], dict[str, _Stream]] = {}
        self._edges: dict[Attrs, _Edge] = {}
        self._entries: dict[tuple[object, ...], _Entry] = {}
        self._templates: dict[str, str] = {}
        self._tcp: dict[str, int] = {}
        self._counter_baseline: dict[tuple[object, ...], float] = {}
        # A call was recorded since the last request was made (WireRedMetrics.shutdown reads it).
        self.recorded = False
        # The collector's and dissector's counters, when the enricher service receives them.
        self.peers: PeerCounters | None = None
        self._resource_overflow = registry.counter(
            "trawl_enricher_metric_resource_overflow_total",
            "Calls whose RED metrics went to the overflow resource because max_metric_resources was reached",
        )
        self._attribute_overflow = registry.counter(
            "trawl_enricher_metric_attribute_overflow_total",
            "Calls recorded under the otel.metric.overflow attribute set (cardinality limit reached)",
        )
        self._keyers: dict[str, Callable[[ApiCall], tuple[object, ...]]] = {
            "http": self._http_key,
            "http2": self._http_key,
            "graphql": self._graphql_key,
            "grpc": _grpc_key,
            "redis": _redis_key,
            "kafka": _kafka_key,
            "amqp": _amqp_key,
            "dns": _common_key,
        }

    # -- per call ---------------------------------------------------------------------------------

    def record_calls(self, calls: Iterable[ApiCall]) -> None:
        entries = self._entries
        keyers = self._keyers
        tcp = self._tcp
        resource_overflows = attribute_overflows = 0
        for call in calls:
            request = call.request
            start = request.ts
            protocol = call.protocol
            if protocol == "tcp":  # TCP diagnostics: counted by kind (reset, retransmission...)
                tcp[call.method] = tcp.get(call.method, 0) + 1
                continue
            if not start:
                continue
            keyer = keyers.get(protocol)
            if keyer is None:
                continue
            key = keyer(call)
            entry = entries.get(key)
            if entry is None:
                entry = self._entry(call, key)
            response = call.response
            end = response.end_ts or response.ts or request.end_ts or start
            seconds = (end - start) / 1e9 if end > start else 0.0
            sample = (call.id, call.trace_id, call.parent_span_id, end if end > start else start)
            _add(entry.durations, seconds, sample)
            if entry.request_bodies:
                _add(entry.request_bodies, request.body_size, sample)
                _add(entry.response_bodies, response.body_size, sample)
            edge = entry.edge
            if edge is not None:
                _add(edge.group, seconds, sample)
                if entry.failed:
                    edge.failed += 1
            if entry.resource_overflow:
                resource_overflows += 1
            if entry.attribute_overflow:
                attribute_overflows += 1
        self.recorded = True
        if resource_overflows:
            self._resource_overflow.inc(resource_overflows)
        if attribute_overflows:
            self._attribute_overflow.inc(attribute_overflows)

    def _template(self, path: str) -> str:
        """paths.template_path, cached, and quicker on the paths the cache misses (the ones
        with ids): a segment is only matched against the patterns its length allows
        (test_otel_red_wire holds the two equal on generated paths)."""
        templates = self._templates
        found = templates.get(path)
        if found is None:
            if len(templates) >= MAX_TEMPLATES:
                templates.clear()
            found = templates[path] = quick_template(path)
        return found

    def _http_key(self, call: ApiCall) -> tuple[object, ...]:
        """_common_key's fields and the HTTP ones, in one flat tuple (the most frequent key:
        each endpoint and the detail read once, no tuple built to be unpacked)."""
        src, dst, detail = call.src, call.dst, call.http
        return (
            call.protocol,
            call.method,
            call.status,
            call.outcome,
            call.capture,
            src.name,
            src.namespace,
            src.pod,
            src.workload,
            src.workload_kind,
            src.node,
            src.cluster,
            src.ip,
            src.service,
            dst.name,
            dst.namespace,
            dst.pod,
            dst.workload,
            dst.workload_kind,
            dst.node,
            dst.cluster,
            dst.ip,
            dst.service,
            detail.version,
            detail.route,
            detail.host,
            dst.port,
            self._template(call.path),
        )

    def _graphql_key(self, call: ApiCall) -> tuple[object, ...]:
        detail = call.graphql
        return (
            *_common_key(call),
            call.http.version,
            call.http.route,
            call.http.host,
            call.dst.port,
            call.HasField("graphql"),
            detail.http_version,
            detail.errors > 0,
        )

    # -- per key ----------------------------------------------------------------------------------

    def _entry(self, call: ApiCall, key: tuple[object, ...]) -> _Entry:
        """The series a key's calls go to, found with red.py's mapping (the reference's)."""
        shape = shape_call(call)
        specs = PROTOCOL_SPECS[call.protocol]
        resource_overflow = attribute_overflow = False
        durations: list[Series] = []
        request_bodies: list[Series] = []
        response_bodies: list[Series] = []
        # Resources are taken in the order of the histograms, as red.py takes them (which one
        # gets the last place under max_resources depends on it), and only for the sides some
        # histogram records: a Redis server gets no resource of its own.
        resources: dict[str, Attrs] = {}
        for spec in specs:
            if spec.side not in resources:
                attributes, overflowed = self._resource(call.src if spec.side == "client" else call.dst)
                resources[spec.side] = attributes
                resource_overflow = resource_overflow or overflowed
        for spec in specs:
            client = spec.side == "client"
            merged = {**shape.common, **(shape.client if client else shape.server)}
            if "url.template" in spec.attributes and "url.template" not in merged and call.protocol != "graphql":
                # A learned or documented route bounds the series; the templated path otherwise.
                merged["url.template"] = call.http.route or template_path(call.path)
            if client and "server.address" in spec.attributes:
                merged["server.address"] = call.dst.service or call.dst.workload or merged.get("server.address", "")
            attributes = tuple(sorted((k, v) for k, v in merged.items() if k in spec.attributes))
            series, overflowed = self._series(resources[spec.side], spec, attributes)
            attribute_overflow = attribute_overflow or overflowed
            target = (
                durations
                if spec.value == "duration"
                else request_bodies
                if spec.value == "request_body"
                else response_bodies
            )
            target.append(series)
        failed = bool(shape.client_error or shape.server_error)
        connection_type = (
            "messaging_system"
            if "messaging.system" in shape.common
            else "database"
            if "db.system.name" in shape.common
            else ""
        )
        edge = self._edge(
            (
                ("client", _service_name(call.src)),
                ("connection_type", connection_type),
                ("server", _service_name(call.dst)),
            )
        )
        if edge is None:
            attribute_overflow = True
            edge = self._edge(OVERFLOW_ATTRIBUTES, force=True)
        entry = _Entry(
            tuple(durations),
            tuple(request_bodies),
            tuple(response_bodies),
            edge,
            failed,
            resource_overflow,
            attribute_overflow,
        )
        if len(self._entries) >= MAX_KEYS:
            self._entries.clear()
        self._entries[key] = entry
        return entry

    def _resource(self, endpoint: Endpoint) -> tuple[Attrs, bool]:
        attributes = tuple(resource_for(endpoint).attributes.items())
        if attributes in self._resources:
            return attributes, False
        if len(self._resources) >= self.max_resources:
            overflow = tuple(OVERFLOW_RESOURCE.attributes.items())
            self._resources.setdefault(overflow, {})
            return overflow, True
        self._resources[attributes] = {}
        return attributes, False

    def _series(self, resource: Attrs, spec: HistogramSpec, attributes: Attrs) -> tuple[Series, bool]:
        streams = self._resources[resource]
        stream = streams.get(spec.name)
        if stream is None:
            stream = streams[spec.name] = _Stream(spec, {})
        series = stream.series.get(attributes)
        if series is not None:
            return series, attributes == OVERFLOW_ATTRIBUTES
        overflowed = len(stream.series) >= self.cardinality_limit
        if overflowed:
            attributes = OVERFLOW_ATTRIBUTES
            series = stream.series.get(attributes)
            if series is not None:
                return series, True
        series = stream.series[attributes] = Series(attributes, spec.buckets, self._start_ns)
        return series, overflowed

    def _edge(self, attributes: Attrs, force: bool = False) -> _Edge | None:
        edge = self._edges.get(attributes)
        if edge is None:
            if len(self._edges) >= self.max_edges and not force:
                return None
            edge = self._edges[attributes] = _Edge(attributes, self._start_ns)
        return edge

    # -- export -----------------------------------------------------------------------------------

    @property
    def resources(self) -> int:
        return len(self._resources)

    def request(self, now_ns: int | None = None) -> tuple[bytes, int]:
        """The ExportMetricsServiceRequest of everything recorded (for delta: since the last
        call), and how many data points it holds. With delta temporality the series are
        forgotten afterwards, so the caller sends it or counts it lost."""
        request, points = self._request(now_ns)
        return request.SerializeToString(), points

    def requests(
        self, max_bytes: int = MAX_REQUEST_BYTES, now_ns: int | None = None, *, counters_only: bool = False
    ) -> list[tuple[bytes, int]]:
        """`request` cut into requests of at most about `max_bytes` each (a receiver refuses a
        gRPC message past its limit, 4 MiB by default, and a refused request is retried to no
        end): whole resources together, a resource too large for one alone one metric a
        request. Each with its data points. `counters_only`: Trawl's own counters (the
        registry's and the other services'), not the histograms, the service graph and the
        TCP events (the last export at a stop, when no call came since the one before)."""
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

        request, _ = self._request(now_ns, counters_only)
        pieces: list[tuple[bytes, int]] = []
        for resource_metrics in request.resource_metrics:
            piece = ExportMetricsServiceRequest()
            piece.resource_metrics.add().CopyFrom(resource_metrics)
            body = piece.SerializeToString()
            if len(body) <= max_bytes:
                pieces.append((body, _points_of(piece)))
                continue
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    single = ExportMetricsServiceRequest()
                    part = single.resource_metrics.add()
                    part.resource.CopyFrom(resource_metrics.resource)
                    scope = part.scope_metrics.add()
                    scope.scope.CopyFrom(scope_metrics.scope)
                    scope.metrics.add().CopyFrom(metric)
                    pieces.append((single.SerializeToString(), _points_of(single)))
        # Joined back up to the bound: serialized requests concatenated are one request (their
        # resource_metrics append), so no message is built twice.
        joined: list[tuple[bytes, int]] = []
        for body, points in pieces:
            if joined and len(joined[-1][0]) + len(body) <= max_bytes:
                joined[-1] = (joined[-1][0] + body, joined[-1][1] + points)
            else:
                joined.append((body, points))
        return joined

    def _request(self, now_ns: int | None, counters_only: bool = False) -> tuple[Any, int]:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
        from opentelemetry.proto.metrics.v1 import metrics_pb2

        now_ns = now_ns or time.time_ns()
        temporality = (
            metrics_pb2.AGGREGATION_TEMPORALITY_DELTA if self.delta else metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
        )
        request = ExportMetricsServiceRequest()
        points = 0
        self.recorded = False
        for resource, streams in self._resources.items():
            if not streams or counters_only:
                continue
            resource_metrics = request.resource_metrics.add()
            _fill_attributes(resource_metrics.resource.attributes, resource)
            scope_metrics = resource_metrics.scope_metrics.add()
            scope_metrics.scope.name, scope_metrics.scope.version = SCOPE_NAME, trawl.__version__
            for stream in streams.values():
                spec = stream.spec
                live = [series for series in stream.series.values() if series.count]
                if not live:
                    continue
                metric = scope_metrics.metrics.add()
                metric.name, metric.description, metric.unit = spec.name, spec.description, spec.unit
                metric.histogram.aggregation_temporality = temporality
                for series in live:
                    _fill_histogram(metric.histogram.data_points.add(), series, now_ns, spec.side == "client")
                    points += 1
        points += self._trawl_metrics(request, temporality, now_ns, counters_only)
        self._forget(now_ns)
        return request, points

    def _trawl_metrics(
        self, request: object, temporality: Temporality, now_ns: int, counters_only: bool = False
    ) -> int:
        """Service graph, TCP diagnostics and the registry's counters, under Trawl's resource."""
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

        assert isinstance(request, ExportMetricsServiceRequest)
        resource_metrics = request.resource_metrics.add()
        _fill_attributes(resource_metrics.resource.attributes, TRAWL_RESOURCE)
        scope_metrics = resource_metrics.scope_metrics.add()
        scope_metrics.scope.name, scope_metrics.scope.version = SCOPE_NAME, trawl.__version__
        metrics = scope_metrics.metrics
        points = 0
        edges = [] if counters_only else [edge for edge in self._edges.values() if edge.seconds.count]
        if edges:
            for name, failed in (
                ("traces_service_graph_request_total", False),
                ("traces_service_graph_request_failed_total", True),
            ):
                metric = metrics.add()
                metric.name, metric.unit = name, "1"
                metric.description = "Requests between two services (Trawl sees both ends of each call)"
                metric.sum.aggregation_temporality = temporality
                metric.sum.is_monotonic = True
                for edge in edges:
                    point = metric.sum.data_points.add()
                    _fill_attributes(point.attributes, edge.attributes)
                    point.start_time_unix_nano, point.time_unix_nano = edge.seconds.start_ns, now_ns
                    point.as_int = edge.failed if failed else edge.seconds.count
                    points += 1
            for name, client in (
                ("traces_service_graph_request_server_seconds", False),
                ("traces_service_graph_request_client_seconds", True),
            ):
                metric = metrics.add()
                metric.name, metric.unit = name, "s"
                metric.description = "Duration of requests between two services, seen from one side"
                metric.histogram.aggregation_temporality = temporality
                for edge in edges:
                    _fill_histogram(metric.histogram.data_points.add(), edge.seconds, now_ns, client)
                    points += 1
        if self._tcp and not counters_only:
            metric = metrics.add()
            metric.name, metric.unit = "trawl.tcp.diagnostics", "{event}"
            metric.description = "TCP events seen on the wire (reset, refused, retransmission, zero-window...)"
            metric.sum.aggregation_temporality = temporality
            metric.sum.is_monotonic = True
            for kind, count in sorted(self._tcp.items()):
                point = metric.sum.data_points.add()
                _fill_attributes(point.attributes, (("trawl.tcp.event", kind),))
                point.start_time_unix_nano, point.time_unix_nano, point.as_int = self._start_ns, now_ns, count
                points += 1
        from opentelemetry.proto.metrics.v1 import metrics_pb2

        registry_temporality = (
            metrics_pb2.AGGREGATION_TEMPORALITY_DELTA
            if self.registry_delta
            else metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
        )
        points += self._registry_metrics(metrics, registry_temporality, now_ns)
        points += self._peer_metrics(request, registry_temporality, now_ns)
        return points

    def _registry_metrics(self, metrics: object, temporality: Temporality, now_ns: int) -> int:
        """The registry's counters (as monotonic sums: deltas since the last export when asked)
        and gauges."""
        return self._families_metrics(metrics, self.registry.families(), temporality, now_ns, ())

    def _peer_metrics(self, request: object, temporality: Temporality, now_ns: int) -> int:
        """The other services' counters (PeerCounters): a resource each, Trawl's with the
        service and node that published them."""
        if self.peers is None:
            return 0
        points = 0
        for (service, node), families in self.peers.items():
            resource_metrics = request.resource_metrics.add()  # type: ignore[attr-defined]
            _fill_attributes(
                resource_metrics.resource.attributes,
                (*TRAWL_RESOURCE, ("trawl.service", service), ("trawl.node", node)),
            )
            scope_metrics = resource_metrics.scope_metrics.add()
            scope_metrics.scope.name, scope_metrics.scope.version = SCOPE_NAME, trawl.__version__
            points += self._families_metrics(scope_metrics.metrics, families, temporality, now_ns, (service, node))
        return points

    def _families_metrics(
        self, metrics: object, families: Iterable[Family], temporality: Temporality, now_ns: int, owner: tuple[str, ...]
    ) -> int:
        from opentelemetry.proto.metrics.v1 import metrics_pb2

        points = 0
        for name, help_text, kind, values in families:
            if not values:
                continue
            metric = metrics.add()  # type: ignore[attr-defined]
            metric.name, metric.description = name, help_text
            counter = kind == "counter"
            data = metric.sum if counter else metric.gauge
            if counter:
                metric.sum.aggregation_temporality = temporality
                metric.sum.is_monotonic = True
            for labels, value in sorted(values.items()):
                if counter and temporality == metrics_pb2.AGGREGATION_TEMPORALITY_DELTA:
                    baseline_key = (*owner, name, labels)
                    value, self._counter_baseline[baseline_key] = (
                        value - self._counter_baseline.get(baseline_key, 0),
                        value,
                    )
                point = data.data_points.add()
                _fill_attributes(point.attributes, labels)
                point.start_time_unix_nano, point.time_unix_nano = self._start_ns, now_ns
                point.as_double = float(value)
                points += 1
        return points

    def _forget(self, now_ns: int) -> None:
        """Delta: what was exported starts again from zero (series, edges, the key cache that
        points at them). Cumulative: only the exemplars, as the SDK's reservoirs reset."""
        if self.delta:
            for streams in self._resources.values():
                streams.clear()
            self._edges.clear()
            self._entries.clear()
            self._tcp.clear()
            self._start_ns = now_ns
            return
        for streams in self._resources.values():
            for stream in streams.values():
                for series in stream.series.values():
                    series.exemplars = [None] * len(series.exemplars)
        for edge in self._edges.values():
            edge.seconds.exemplars = [None] * len(edge.seconds.exemplars)


def _add(group: tuple[Series, ...], value: float, sample: Sample) -> None:
    """Series.add on each series of a group (one bisect: they share their bounds), inline."""
    if not group:
        return
    index = bisect_left(group[0].bounds, value)
    for series in group:
        series.counts[index] += 1
        series.exemplars[index] = sample
        series.exemplar_values[index] = value
        series.count += 1
        series.sum += value
        if value < series.min:
            series.min = value
        if value > series.max:
            series.max = value


# A whole path segment that paths.template_path turns into {id}: digits, a UUID, or a hex id of
# at least 12 characters with a digit (its _NUMERIC, _UUID and _HEX_ID), between slashes.
_ID_SEGMENT = re.compile(
    r"(?:(?<=/)|\A)"
    r"(?:[0-9]+"
    r"|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|(?=[0-9a-fA-F]*[0-9])[0-9a-fA-F]{12,})"
    r"(?=/|\Z)"
)


def quick_template(path: str) -> str:
    """paths.template_path in one pass of one regular expression (a URL with an id misses the
    template cache: this runs for most HTTP calls; test_otel_red_wire holds the two equal)."""
    return _ID_SEGMENT.sub("{id}", path.split("?", 1)[0])


def _points_of(request: Any) -> int:
    return sum(
        len(getattr(metric, metric.WhichOneof("data") or "gauge").data_points)
        for resource_metrics in request.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
    )


def _service_name(endpoint: Endpoint) -> str:
    """The service.name of the endpoint's resource (the one its spans carry)."""
    return str(resource_for(endpoint).attributes["service.name"])


def _common_key(call: ApiCall) -> tuple[object, ...]:
    return (
        call.protocol,
        call.method,
        call.status,
        call.outcome,
        call.capture,
        _endpoint_key(call.src),
        _endpoint_key(call.dst),
    )


def _grpc_key(call: ApiCall) -> tuple[object, ...]:
    has = call.HasField("grpc")
    return (*_common_key(call), call.path, has, call.grpc.status_code if has else -1)


def _redis_key(call: ApiCall) -> tuple[object, ...]:
    has = call.HasField("redis")
    return (*_common_key(call), has, call.redis.from_server, call.redis.db, call.path)


def _kafka_key(call: ApiCall) -> tuple[object, ...]:
    has = call.HasField("kafka")
    return (*_common_key(call), has, tuple(call.kafka.topics) if has else call.path)


def _amqp_key(call: ApiCall) -> tuple[object, ...]:
    has = call.HasField("amqp")
    return (*_common_key(call), has, call.amqp.exchange, call.amqp.queue, call.path)


def _fill_attributes(target: object, attributes: Iterable[tuple[str, object]]) -> None:
    for key, value in attributes:
        attribute = target.add()  # type: ignore[attr-defined]
        attribute.key = key
        if isinstance(value, bool):
            attribute.value.bool_value = value
        elif isinstance(value, int):
            attribute.value.int_value = value
        elif isinstance(value, float):
            attribute.value.double_value = value
        elif isinstance(value, (list, tuple)):
            for item in value:
                attribute.value.array_value.values.add().string_value = str(item)
        else:
            attribute.value.string_value = str(value)


def _fill_histogram(point: object, series: Series, now_ns: int, client: bool) -> None:
    point.start_time_unix_nano = series.start_ns  # type: ignore[attr-defined]
    point.time_unix_nano = now_ns  # type: ignore[attr-defined]
    point.count = series.count  # type: ignore[attr-defined]
    point.sum = series.sum  # type: ignore[attr-defined]
    point.min = series.min  # type: ignore[attr-defined]
    point.max = series.max  # type: ignore[attr-defined]
    point.bucket_counts.extend(series.counts)  # type: ignore[attr-defined]
    point.explicit_bounds.extend(series.bounds)  # type: ignore[attr-defined]
    _fill_attributes(point.attributes, series.attributes)  # type: ignore[attr-defined]
    for sample, measured in zip(series.exemplars, series.exemplar_values, strict=True):
        if sample is None:
            continue
        call_id, trace_id, parent_span_id, end = sample
        ids = span_ids(ApiCall(id=call_id, trace_id=trace_id, parent_span_id=parent_span_id))
        exemplar = point.exemplars.add()  # type: ignore[attr-defined]
        exemplar.time_unix_nano = end
        exemplar.as_double = float(measured)
        exemplar.trace_id = ids.trace_id.to_bytes(16, "big")
        exemplar.span_id = (ids.client_span_id if client else ids.server_span_id).to_bytes(8, "big")


# -- export -----------------------------------------------------------------------------------------

METRICS_EXPORT_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"


def metric_export_options(settings: EnricherSettings, environ: Mapping[str, str]) -> WireExportOptions | None:
    """The span path's options (wire_export.WireExportOptions) for the metrics signal: the
    metrics endpoint, and the OTEL_EXPORTER_OTLP_METRICS_* variables where the span path reads
    the _TRACES_ ones (protocol, headers, timeout, compression, certificates, insecure)."""
    from trawl.enricher.wire_export import WireExportOptions

    target = settings.metrics_target()
    if target is None:
        return None
    signal = "OTEL_EXPORTER_OTLP_METRICS_"
    renamed = {key: value for key, value in environ.items() if not key.startswith("OTEL_EXPORTER_OTLP_TRACES_")}
    renamed.update(
        {
            key.replace(signal, "OTEL_EXPORTER_OTLP_TRACES_"): value
            for key, value in environ.items()
            if key.startswith(signal)
        }
    )
    options = WireExportOptions.from_settings(settings.model_copy(update={"otlp_endpoint": target.endpoint}), renamed)
    if options is None:  # pragma: no cover - the endpoint was just set
        return None
    endpoint = target.http_url("metrics") if options.protocol == "http/protobuf" else target.endpoint
    return replace(options, endpoint=endpoint)


def metric_sender_for(options: WireExportOptions) -> Sender:
    from trawl.enricher.wire_export import HttpSender

    if options.protocol == "http/protobuf":
        return HttpSender(options)  # the URL is the metrics one; the response reads alike (below)
    return GrpcMetricSender(options)


class GrpcMetricSender:
    """wire_export.GrpcSender (its channel, TLS, compression, retryable codes and RetryInfo) on
    MetricsService/Export. An ExportMetricsServiceResponse reads as an
    ExportTraceServiceResponse: its partial_success has the same field numbers
    (rejected_data_points is 1, error_message 2), so the sender's `rejected` counts points."""

    def __init__(self, options: WireExportOptions) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        from trawl.enricher.wire_export import GrpcSender

        self._sender = GrpcSender(options)
        self._sender._export = self._sender._channel.unary_unary(
            METRICS_EXPORT_METHOD,
            request_serializer=None,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )

    def send(self, body: bytes, timeout_s: float) -> Attempt:
        return self._sender.send(body, timeout_s)

    def close(self) -> None:
        self._sender.close()


class WireRedMetrics:
    """The enricher's `red` on the aggregated path: `record_calls` per batch (RedAggregator),
    `export` sends one request of everything (blocking: the service runs it in a thread every
    metrics_export_interval_s), retried as the span path retries (exponential backoff with
    jitter on retryable answers, the server's delay when it gives one, within the export
    timeout). Counted: exports, points exported and failed (a failed delta export loses its
    points: counted, as the SDK would drop them), retries."""

    def __init__(
        self,
        sender: Sender,
        registry: Registry,
        *,
        max_resources: int,
        temporality: str = "cumulative",
        timeout_s: float = 10.0,
        initial_backoff_s: float = 1.0,
        max_backoff_s: float = 32.0,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.sender = sender
        self.max_request_bytes = max_request_bytes
        self.aggregator = RedAggregator(registry, max_resources=max_resources, temporality=temporality)
        self.timeout_s = timeout_s
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self._lock = threading.Lock()  # export (a thread) against record_calls (the service)
        self._stop = threading.Event()
        self._exports = registry.counter("trawl_enricher_metric_exports_total", "OTLP metric exports, by result")
        self._points = registry.counter(
            "trawl_enricher_metric_points_total", "Metric data points sent, by result (exported, rejected, failed)"
        )
        self._failures = registry.counter(
            "trawl_enricher_metric_export_failures_total", "OTLP metric exports that failed"
        )
        self._retries = registry.counter(
            "trawl_enricher_metric_export_retries_total", "Metric export attempts retried (backend unavailable or busy)"
        )

    @classmethod
    def from_settings(
        cls, settings: EnricherSettings, registry: Registry, environ: Mapping[str, str]
    ) -> WireRedMetrics | None:
        options = metric_export_options(settings, environ)
        if options is None:
            return None
        return cls(
            metric_sender_for(options),
            registry,
            max_resources=settings.max_metric_resources,
            temporality=temporality_from(environ),
            timeout_s=options.timeout_s,
        )

    @property
    def exporter(self) -> Sender:
        """Not None: the enricher's test that metrics are configured."""
        return self.sender

    @property
    def resources(self) -> int:
        return self.aggregator.resources

    def record_calls(self, calls: Iterable[ApiCall]) -> None:
        with self._lock:
            self.aggregator.record_calls(calls)

    def export(self, timeout_s: float | None = None, *, counters_only: bool = False) -> bool:
        """Send everything recorded, in requests of at most `max_request_bytes`; False when
        one of them failed (its points counted failed, the others sent all the same)."""
        with self._lock:
            pieces = self.aggregator.requests(self.max_request_bytes, counters_only=counters_only)
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.timeout_s)
        ok = True
        for body, points in pieces:
            attempt = self._send(body, max(0.0, deadline - time.monotonic()))
            if attempt.accepted:
                rejected = min(points, attempt.rejected)
                self._exports.inc(result="success")
                self._points.inc(points - rejected, result="exported")
                if rejected:
                    self._points.inc(rejected, result="rejected")
                    log.warning("metric_points_rejected", points=rejected, message=attempt.message)
                continue
            ok = False
            self._exports.inc(result="failure")
            self._failures.inc()
            self._points.inc(points, result="failed")
            log.warning("metric_export_failed", points=points, bytes=len(body), message=attempt.message)
        return ok

    def _send(self, body: bytes, timeout_s: float) -> Attempt:
        deadline = time.monotonic() + timeout_s
        retry = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Attempt(False, message="export timeout")
            attempt = self.sender.send(body, remaining)
            if attempt.accepted or not attempt.retryable or self._stop.is_set():
                return attempt
            backoff = min(self.max_backoff_s, self.initial_backoff_s * 2**retry) * (0.8 + 0.4 * random.random())
            delay = attempt.retry_after_s if attempt.retry_after_s is not None else backoff
            if time.monotonic() + delay >= deadline:
                return attempt
            self._retries.inc()
            if self._stop.wait(delay):
                return attempt
            retry += 1

    def shutdown(self) -> None:
        """One last export (within the export timeout), then the sender is closed. When no call
        came since the last export (a file's end flushed them), only Trawl's own counters go:
        the histograms' cumulative points are those sent already (building and sending them
        again took some 0.5 s for 100,000 calls), a delta would be empty."""
        self.export(counters_only=not self.aggregator.recorded)
        self._stop.set()
        self.sender.close()
