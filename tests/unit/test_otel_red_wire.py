"""The aggregated RED path (services/enricher/red_wire.py) against the reference, red.py's
RedMetrics through the OpenTelemetry metrics SDK: the same calls give the same histograms
(resource, name, unit, attribute set, count, sum, min, max, bucket counts and bounds), both
decoded with opentelemetry-proto from the OTLP request each sends (the SDK's through its own
OTLP encoder), on every committed capture and on generated calls of every protocol; and the
same overflow counts when resources or attribute sets run out. Then what only the aggregated
path has: exemplars with the spans' ids, delta temporality, the service graph and Trawl's
counters in the same request."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2

from tests.unit.test_otel_spans import make_call
from tests.unit.test_otlp_spans_differential import CALLS, CAPTURES, IDENTITY, calls, dissected
from trawl.enricher.paths import template_path
from trawl.enricher.red import PROTOCOL_SPECS, RedMetrics
from trawl.enricher.red_wire import OVERFLOW_ATTRIBUTES, RedAggregator, quick_template, temporality_from
from trawl.enricher.spans import span_ids
from trawl.errors import ConfigError
from trawl.metrics import Registry
from trawl.v1.calls_pb2 import ApiCall


def _attributes(values: Sequence[KeyValue]) -> str:
    return json.dumps(
        sorted((kv.key, json_format.MessageToDict(kv.value)) for kv in values), sort_keys=True, default=str
    )


def histograms(request: ExportMetricsServiceRequest, names: set[str] | None = None) -> dict[tuple[str, ...], Any]:
    """Every histogram point, by (resource, metric name, unit, attribute set)."""
    found: dict[tuple[str, ...], Any] = {}
    for resource_metrics in request.resource_metrics:
        resource = _attributes(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if not metric.HasField("histogram") or (names is not None and metric.name not in names):
                    continue
                for point in metric.histogram.data_points:
                    key = (resource, metric.name, metric.unit, metric.description, _attributes(point.attributes))
                    assert key not in found, f"a series appears twice: {key}"
                    found[key] = (
                        point.count,
                        point.sum,
                        point.min,
                        point.max,
                        tuple(point.bucket_counts),
                        tuple(point.explicit_bounds),
                    )
    return found


def reference(calls: Sequence[ApiCall], **limits: int) -> tuple[ExportMetricsServiceRequest, Registry]:
    registry = Registry()
    red = RedMetrics(None, limits.get("max_resources", 2000), registry)
    for call in calls:
        red.record(call)
    return encode_metrics(red.collect()), registry


def aggregated(
    calls: Sequence[ApiCall], temporality: str = "cumulative", **limits: int
) -> tuple[ExportMetricsServiceRequest, Registry, RedAggregator]:
    registry = Registry()
    aggregator = RedAggregator(
        registry,
        max_resources=limits.get("max_resources", 2000),
        cardinality_limit=limits.get("cardinality_limit", 2000),
        temporality=temporality,
    )
    aggregator.record_calls(calls)
    body, _ = aggregator.request()
    return ExportMetricsServiceRequest.FromString(body), registry, aggregator


RED_NAMES: set[str] = set()


def assert_same_histograms(calls: Sequence[ApiCall], **limits: int) -> int:
    expected, reference_registry = reference(calls, **limits)
    got, registry, _ = aggregated(calls, **limits)
    want = histograms(expected)
    names = {key[1] for key in want} | {
        metric.name
        for resource_metrics in got.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
        if metric.name.startswith(("http.", "rpc.", "db.", "messaging.", "dns."))
    }
    assert histograms(got, names) == want
    overflow = "trawl_enricher_metric_resource_overflow_total"
    assert registry.counter(overflow, "").total() == reference_registry.counter(overflow, "").total()
    return len(want)


@pytest.mark.parametrize("identity", [None, IDENTITY], ids=["no-identity", "identity"])
@pytest.mark.parametrize("capture", CAPTURES, ids=[str(path.name) for path in CAPTURES])
def test_every_committed_capture_gives_the_reference_histograms(capture: Path, identity: Path | None) -> None:
    calls = dissected(capture, identity)
    points = assert_same_histograms(calls)
    timed = [call for call in calls if call.request.ts and call.protocol not in ("tcp", "tls", "icmp", "")]
    assert (points > 0) == any(
        call.protocol in ("http", "http2", "graphql", "grpc", "redis", "kafka", "amqp", "dns") for call in timed
    )


@CALLS
@given(st.lists(calls(), min_size=1, max_size=8))
def test_generated_calls_give_the_reference_histograms(generated: list[ApiCall]) -> None:
    # Twice each: the second goes through the key cache the first filled.
    assert_same_histograms(generated + [ApiCall.FromString(call.SerializeToString()) for call in generated])


def _field_paths() -> list[tuple[str, ...]]:
    """Every field of ApiCall, and every field of its singular submessages (src, dst, http...)."""
    paths: list[tuple[str, ...]] = []
    for field in ApiCall.DESCRIPTOR.fields:
        if field.message_type is not None and not field.is_repeated:
            paths.extend((field.name, inner.name) for inner in field.message_type.fields)
        else:
            paths.append((field.name,))
    return paths


FIELD_PATHS = _field_paths()


_INTEGER_RANGES = {1: (-(2**31), 2**31 - 1), 2: (-(2**63), 2**63 - 1), 3: (0, 2**32 - 1), 4: (0, 2**64 - 1)}


def _change_field(draw: st.DrawFn, target: Any, source: Any, name: str) -> None:
    """Give `target`'s field a drawn value (small numbers and short texts most often, so calls
    meet again), or `source`'s for repeated fields and submessages."""
    descriptor = target.DESCRIPTOR.fields_by_name[name]
    kind = descriptor.cpp_type
    if descriptor.is_repeated or kind == descriptor.CPPTYPE_MESSAGE:
        target.ClearField(name)
        if descriptor.is_repeated:
            getattr(target, name).MergeFrom(getattr(source, name))
        elif source.HasField(name):
            getattr(target, name).CopyFrom(getattr(source, name))
    elif kind in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[kind]
        setattr(target, name, draw(st.one_of(st.integers(max(low, 0), 3), st.integers(low, high))))
    elif kind == descriptor.CPPTYPE_BOOL:
        setattr(target, name, draw(st.booleans()))
    elif kind == descriptor.CPPTYPE_ENUM:
        setattr(target, name, draw(st.sampled_from([value.number for value in descriptor.enum_type.values])))
    elif kind == descriptor.CPPTYPE_STRING and descriptor.type == descriptor.TYPE_BYTES:
        setattr(target, name, draw(st.binary(max_size=4)))
    elif kind == descriptor.CPPTYPE_STRING:
        setattr(target, name, draw(st.one_of(st.sampled_from(["", "a", "1", "200", "ok"]), st.text(max_size=6))))
    else:
        setattr(target, name, draw(st.floats(allow_nan=False)))


_DETAILS = {
    "http": ("http",),
    "http2": ("http",),
    "graphql": ("graphql", "http"),
    "grpc": ("grpc",),
    "redis": ("redis",),
    "kafka": ("kafka",),
    "amqp": ("amqp",),
    "dns": ("dns",),
}


def _crossed(draw: st.DrawFn, base: ApiCall, other: ApiCall) -> ApiCall:
    """`base` with one or two fields changed (one level into src, dst, http...): calls that
    differ from another in a field or two, which is where a key missing a field the attributes
    depend on would put two calls in one series."""
    crossed = ApiCall()
    crossed.CopyFrom(base)
    # Half the changes among the top-level fields, src, dst and the protocol's own detail.
    near = [
        path for path in FIELD_PATHS if path[0] in ("src", "dst", *_DETAILS.get(base.protocol, ())) or len(path) == 1
    ]
    for path in draw(st.lists(st.one_of(st.sampled_from(FIELD_PATHS), st.sampled_from(near)), min_size=1, max_size=2)):
        if len(path) == 1:
            _change_field(draw, crossed, other, path[0])
        else:
            _change_field(draw, getattr(crossed, path[0]), getattr(other, path[0]), path[1])
    return crossed


@st.composite
def neighbours(draw: st.DrawFn) -> list[ApiCall]:
    base, other = draw(calls()), draw(calls())
    # A protocol with histograms, the same for both: only the fields its mapping reads differ.
    base.protocol = other.protocol = draw(st.sampled_from(sorted(PROTOCOL_SPECS)))
    # A walk: each call is the one before with a field or two changed, so a change made early
    # (a Redis detail set) stays while later ones change its fields.
    walk = [base]
    for _ in range(draw(st.integers(1, 16))):
        walk.append(_crossed(draw, walk[-1], other))
    return [*walk, other]


@CALLS
@given(neighbours())
def test_calls_a_few_fields_apart_give_the_reference_histograms(generated: list[ApiCall]) -> None:
    assert_same_histograms(generated)


def _set(call: ApiCall, path: str, value: Any) -> ApiCall:
    *parents, name = path.split(".")
    target: Any = call
    for parent in parents:
        target = getattr(target, parent)
    setattr(target, name, value)
    return call


@pytest.mark.parametrize(
    ("protocol", "path", "values", "fields"),
    [
        ("redis", "redis.db", (0, 3), {"method": "GET", "status": "ok"}),
        ("http", "dst.port", (8080, 9090), {}),
        ("http", "http.version", ("1.1", "2"), {}),
        ("http", "http.route", ("", "/users/{user}"), {}),
        ("http", "http.host", ("users:80", "users.shop:8080"), {}),
        ("http", "capture", ("packet", "tls-uprobe"), {}),
        ("graphql", "graphql.errors", (0, 2), {"method": "query", "path": "GetUser"}),
        ("graphql", "graphql.http_version", ("1.1", "2"), {"method": "query", "path": "GetUser"}),
        ("grpc", "grpc.status_code", (0, 14), {"method": "POST", "path": "/pkg.Svc/Get", "status": "0"}),
        ("kafka", "path", ("topic-a", "topic-b"), {"method": "Produce", "status": "NONE"}),
        ("amqp", "amqp.queue", ("q1", "q2"), {"method": "basic.get", "status": "ok"}),
        ("amqp", "amqp.exchange", ("e1", "e2"), {"method": "basic.publish", "status": "ok"}),
        ("dns", "status", ("NOERROR", "SERVFAIL"), {"method": "A", "path": "users.shop"}),
        ("http", "dst.service", ("", "users-svc"), {}),
    ],
)
def test_each_field_the_attributes_read_splits_the_series(
    protocol: str, path: str, values: tuple[Any, Any], fields: dict[str, Any]
) -> None:
    """Two calls a field apart whose reference histograms differ: the key cache must not join them."""
    calls = [
        _set(make_call(id=f"c{index}", protocol=protocol, **fields), path, value) for index, value in enumerate(values)
    ]
    assert assert_same_histograms(calls) > len(PROTOCOL_SPECS[protocol])


@CALLS
@given(st.lists(calls(), min_size=1, max_size=8), st.integers(1, 4))
def test_the_resource_bound_overflows_as_the_reference_does(generated: list[ApiCall], max_resources: int) -> None:
    assert_same_histograms(generated, max_resources=max_resources)


def test_attribute_sets_past_the_cardinality_limit_go_to_the_overflow_set() -> None:
    calls = [make_call(id=f"c{index}", path=f"/p{index}") for index in range(5)]
    request, registry, _ = aggregated(calls, cardinality_limit=2)
    server = {key[4]: value for key, value in histograms(request, {"http.server.request.duration"}).items()}
    assert len(server) == 3
    overflow = _attributes([KeyValue(key="otel.metric.overflow", value={"bool_value": True})])
    assert server[overflow][0] == 3
    assert registry.counter("trawl_enricher_metric_attribute_overflow_total", "").total() == 3
    assert OVERFLOW_ATTRIBUTES == (("otel.metric.overflow", True),)


def _points(request: ExportMetricsServiceRequest, name: str) -> list[Any]:
    return [
        point
        for resource_metrics in request.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
        if metric.name == name
        for point in (metric.histogram.data_points or metric.sum.data_points or metric.gauge.data_points)
    ]


def test_exemplars_carry_the_ids_of_the_calls_spans() -> None:
    fast, slow = make_call(id="fast"), make_call(id="slow")
    slow.response.end_ts = slow.request.ts + 3_000_000_000
    request, _, aggregator = aggregated([fast, slow])
    (server,) = _points(request, "http.server.request.duration")
    (client,) = _points(request, "http.client.request.duration")
    assert len(server.exemplars) == 2
    by_value = {round(exemplar.as_double, 3): exemplar for exemplar in server.exemplars}
    slow_ids, fast_ids = span_ids(slow), span_ids(fast)
    assert by_value[3.0].trace_id == slow_ids.trace_id.to_bytes(16, "big")
    assert by_value[3.0].span_id == slow_ids.server_span_id.to_bytes(8, "big")
    assert by_value[0.006].span_id == fast_ids.server_span_id.to_bytes(8, "big")
    assert {exemplar.span_id for exemplar in client.exemplars} == {
        ids.client_span_id.to_bytes(8, "big") for ids in (slow_ids, fast_ids)
    }
    # Exemplars are those since the last export; the counts stay (cumulative).
    again = ExportMetricsServiceRequest.FromString(aggregator.request()[0])
    (server,) = _points(again, "http.server.request.duration")
    assert server.count == 2 and not server.exemplars


def test_delta_sends_what_came_since_the_last_export() -> None:
    registry = Registry()
    aggregator = RedAggregator(registry, max_resources=10, temporality="delta")
    calls_counter = registry.counter("trawl_enricher_calls_total", "Calls enriched, by protocol")
    aggregator.record_calls([make_call(id="a"), make_call(id="b")])
    calls_counter.inc(2, protocol="http")
    first = ExportMetricsServiceRequest.FromString(aggregator.request()[0])
    aggregator.record_calls([make_call(id="c")])
    calls_counter.inc(1, protocol="http")
    second = ExportMetricsServiceRequest.FromString(aggregator.request()[0])
    (one,) = _points(first, "http.server.request.duration")
    (two,) = _points(second, "http.server.request.duration")
    assert (one.count, two.count) == (2, 1)
    assert two.start_time_unix_nano >= one.time_unix_nano
    metric = next(
        m
        for rm in second.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "http.server.request.duration"
    )
    assert metric.histogram.aggregation_temporality == metrics_pb2.AGGREGATION_TEMPORALITY_DELTA
    assert [p.as_double for p in _points(first, "trawl_enricher_calls_total")] == [2.0]
    assert [p.as_double for p in _points(second, "trawl_enricher_calls_total")] == [1.0]
    assert not _points(ExportMetricsServiceRequest.FromString(aggregator.request()[0]), "http.server.request.duration")


def test_lowmemory_keeps_the_registry_counters_cumulative() -> None:
    registry = Registry()
    aggregator = RedAggregator(registry, max_resources=10, temporality="lowmemory")
    counter = registry.counter("trawl_enricher_calls_total", "Calls enriched, by protocol")
    for _ in range(2):
        counter.inc(2, protocol="http")
        aggregator.record_calls([make_call()])
        request = ExportMetricsServiceRequest.FromString(aggregator.request()[0])
    (point,) = _points(request, "http.server.request.duration")
    assert point.count == 1  # the histogram is delta
    assert [p.as_double for p in _points(request, "trawl_enricher_calls_total")] == [4.0]


def test_service_graph_and_trawl_counters_in_the_same_request() -> None:
    ok = make_call(id="ok")
    failed = make_call(id="failed", status="503")
    redis = make_call(id="redis", protocol="redis", method="GET", path="k", status="ok")
    reset = make_call(id="reset", protocol="tcp", method="reset")
    request, registry, _ = aggregated([ok, failed, redis, reset])
    assert registry.counter("trawl_enricher_metric_attribute_overflow_total", "").total() == 0
    totals = {_attributes(p.attributes): p.as_int for p in _points(request, "traces_service_graph_request_total")}
    failures = {
        _attributes(p.attributes): p.as_int for p in _points(request, "traces_service_graph_request_failed_total")
    }
    http_edge = _attributes(
        [
            KeyValue(key="client", value={"string_value": "checkout"}),
            KeyValue(key="connection_type", value={"string_value": ""}),
            KeyValue(key="server", value={"string_value": "users"}),
        ]
    )
    db_edge = http_edge.replace('"stringValue": ""', '"stringValue": "database"')
    assert totals == {http_edge: 2, db_edge: 1}
    assert failures == {http_edge: 1, db_edge: 0}
    seconds = {
        _attributes(p.attributes): p.count for p in _points(request, "traces_service_graph_request_server_seconds")
    }
    assert seconds == {http_edge: 2, db_edge: 1}
    assert len(_points(request, "traces_service_graph_request_client_seconds")) == 2
    (tcp,) = _points(request, "trawl.tcp.diagnostics")
    assert tcp.as_int == 1 and tcp.attributes[0].value.string_value == "reset"
    trawl_resource = [
        rm
        for rm in request.resource_metrics
        if any(kv.key == "service.name" and kv.value.string_value == "trawl" for kv in rm.resource.attributes)
    ]
    assert len(trawl_resource) == 1


def test_the_temporality_preference_is_read_as_the_sdk_reads_it() -> None:
    assert temporality_from({}) == "cumulative"
    assert temporality_from({"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "Delta"}) == "delta"
    assert temporality_from({"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "lowmemory"}) == "lowmemory"
    with pytest.raises(ConfigError, match="TEMPORALITY_PREFERENCE"):
        temporality_from({"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "sometimes"})


def test_requests_are_cut_to_the_size_bound_and_hold_the_same_points() -> None:
    calls = dissected(CAPTURES[0].parent / "http1.pcap", IDENTITY) + [
        make_call(id=f"c{index}", path=f"/p{index}") for index in range(50)
    ]
    whole, _, _ = aggregated(calls)
    registry = Registry()
    aggregator = RedAggregator(registry, max_resources=2000)
    aggregator.record_calls(calls)
    pieces = aggregator.requests(max_bytes=4096)
    assert len(pieces) > 3
    joined = ExportMetricsServiceRequest.FromString(b"".join(body for body, _ in pieces))
    assert histograms(joined) == histograms(whole)
    single_metric = [
        body
        for body, _ in pieces
        if len(body) > 4096 and len(ExportMetricsServiceRequest.FromString(body).resource_metrics) != 1
    ]
    assert single_metric == []  # only a resource's single metric may pass the bound
    total_points = sum(points for _, points in pieces)
    assert total_points == sum(
        len(getattr(m, m.WhichOneof("data") or "gauge").data_points)
        for rm in joined.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    )


SEGMENTS = st.one_of(
    st.sampled_from(["", "users", "42", "0", "550E8400-e29b-41d4-a716-446655440000", "deadbeef12345", "cafe", "٣"]),
    st.text(alphabet="0123456789abcdefABCDEF-x\n", max_size=40),
    st.text(max_size=8),
)


@given(st.lists(SEGMENTS, max_size=6), st.sampled_from(["", "?q=1", "?a/1"]))
def test_the_quick_template_is_template_path(segments: list[str], query: str) -> None:
    path = "/".join(segments) + query
    assert quick_template(path) == template_path(path)
