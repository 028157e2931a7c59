"""The Enricher exporting to a real OTLP receiver (gRPC and HTTP) on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import FIXTURES
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.unit.test_otel_spans import T0, make_call
from tests.unit.test_otlp_spans_differential import IDENTITY, canonical_spans, dissected, reference
from trawl import analyze as analyze_module
from trawl.enricher import otlp
from trawl.enricher.config import EnricherSettings
from trawl.enricher.logic import Enricher, build_enricher, enricher_from_settings
from trawl.enricher.span_totals import SpanCounters, SpanTotals
from trawl.v1.calls_pb2 import ApiCall

SNAPSHOT = Path(__file__).resolve().parent.parent / "fixtures" / "identity_snapshot.json"
AT = 1_795_687_200_000_000_000  # 2026-11-26T10:00:00Z, when the fixture's pods are all up


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)


def cluster_call(call_id: str = "call-1", trace: bool = False) -> ApiCall:
    """checkout (pod IP) -> payments (ClusterIP), as the dissector sends it: addresses only."""
    call = make_call(id=call_id, path="/charges/1234", status="201", method="POST")
    for endpoint in (call.src, call.dst):
        ip, port = endpoint.ip, endpoint.port
        endpoint.Clear()
        endpoint.ip, endpoint.port = ip, port
    call.src.ip, call.dst.ip, call.dst.port = "10.244.1.12", "10.96.40.5", 443
    shift = AT - T0
    for message in (call.request, call.response):
        message.ts += shift
        message.end_ts += shift
    if trace:
        call.trace_id, call.parent_span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    return call


def make_enricher(**overrides: object) -> Enricher:
    settings = EnricherSettings.load(
        None, node="test", cluster="prod", identity_snapshot=SNAPSHOT, export_schedule_delay_ms=50, **overrides
    )
    return enricher_from_settings(settings)


def by_kind(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {span.kind: span for span in spans}


def test_grpc_export_of_an_enriched_call(receiver: OtlpReceiver) -> None:
    enricher = make_enricher(otlp_endpoint=receiver.grpc_endpoint, otlp_headers={"x-tenant": "team-a"})
    call = enricher.enrich(cluster_call(trace=True))
    assert (call.src.workload, call.dst.workload, call.dst.service) == ("checkout", "payments", "payments")
    enricher.export([call])
    assert enricher.flush()
    spans = by_kind(receiver.wait_for_spans(2))
    client, server = spans["CLIENT"], spans["SERVER"]
    assert client.trace_id == server.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert client.parent_span_id == "00f067aa0ba902b7"
    assert server.parent_span_id == client.span_id
    assert client.name == server.name == "POST"
    assert client.scope == "trawl.enricher"
    assert client.resource["service.name"] == "checkout"
    assert client.resource["k8s.deployment.name"] == "checkout"
    assert client.resource["k8s.pod.name"] == "checkout-7d9f8b6c5d-x2k4q"
    assert client.resource["k8s.cluster.name"] == "prod"
    assert server.resource["service.name"] == "payments"
    assert server.resource["service.namespace"] == "shop"
    assert server.resource["k8s.deployment.name"] == "payments"
    assert client.attributes["http.request.method"] == "POST"
    assert client.attributes["http.response.status_code"] == 201
    assert client.attributes["url.template"] == "/charges/{id}"
    assert server.attributes["url.path"] == "/charges/1234"
    assert server.attributes["client.address"] == "10.244.1.12"
    assert (client.start_ns, client.end_ns) == (call.request.ts, call.response.end_ts)
    assert server.status_code == "UNSET"
    assert all(headers.get("x-tenant") == "team-a" for headers in receiver.headers)

    points = receiver.wait_for_points(2)
    names = {(p.metric, p.resource["service.name"]) for p in points if p.metric.endswith(".duration")}
    assert names == {("http.server.request.duration", "payments"), ("http.client.request.duration", "checkout")}
    # The body sizes by side, and the service graph's edge under Trawl's own resource.
    assert {(p.metric, p.resource["service.name"]) for p in points if p.metric.endswith(".body.size")} == {
        ("http.server.request.body.size", "payments"),
        ("http.server.response.body.size", "payments"),
        ("http.client.request.body.size", "checkout"),
        ("http.client.response.body.size", "checkout"),
    }
    edge = next(p for p in points if p.metric == "traces_service_graph_request_server_seconds")
    assert (edge.resource["service.name"], edge.attributes["client"], edge.attributes["server"]) == (
        "trawl",
        "checkout",
        "payments",
    )
    client_point = next(p for p in points if p.metric == "http.client.request.duration")
    assert client_point.unit == "s"
    assert client_point.count == 1
    assert client_point.attributes["server.address"] == "payments"
    enricher.shutdown()
    assert enricher.metrics.counter("trawl_enricher_spans_exported_total", "").total() == 2


def test_http_protobuf_export(receiver: OtlpReceiver) -> None:
    enricher = make_enricher(otlp_endpoint=receiver.http_endpoint, otlp_protocol="http/protobuf")
    calls = [enricher.enrich(cluster_call(f"call-{index}")) for index in range(3)]
    enricher.export(calls)
    enricher.shutdown()
    spans = receiver.wait_for_spans(6)
    assert {span.kind for span in spans} == {"CLIENT", "SERVER"}
    assert len({span.trace_id for span in spans}) == 3
    assert "/v1/traces" in receiver.http_paths
    assert "/v1/metrics" in receiver.http_paths


def test_reexport_is_idempotent(receiver: OtlpReceiver) -> None:
    enricher = make_enricher(otlp_endpoint=receiver.grpc_endpoint)
    call = enricher.enrich(cluster_call())
    enricher.export([call])
    enricher.export([ApiCall.FromString(call.SerializeToString())])
    enricher.shutdown()
    spans = receiver.wait_for_spans(4)
    assert len({(span.trace_id, span.span_id) for span in spans}) == 2


def test_unreachable_endpoint_counts_the_loss() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    enricher = make_enricher(otlp_endpoint=f"127.0.0.1:{port}", otlp_timeout_s=0.5)
    enricher.export([enricher.enrich(cluster_call())])
    assert not enricher.flush()
    enricher.shutdown()
    assert enricher.metrics.counter("trawl_enricher_spans_failed_total", "").total() == 2


def test_build_enricher_for_trawl_analyze(receiver: OtlpReceiver) -> None:
    enricher = build_enricher(SNAPSHOT, receiver.grpc_endpoint, cluster="prod")
    assert enricher.exporting
    call = enricher.enrich(cluster_call())
    assert call.dst.cluster == "prod"
    enricher.export([call])
    enricher.shutdown()
    assert len(receiver.wait_for_spans(2)) == 2
    offline = build_enricher(None, None)
    assert not offline.exporting
    named = offline.enrich(cluster_call())
    assert (named.src.name, named.dst.name) == ("10.244.1.12", "10.96.40.5")
    offline.export([named])
    offline.shutdown()


def test_build_enricher_from_loaded_settings(receiver: OtlpReceiver) -> None:
    settings = EnricherSettings.load(None, node="test", identity_snapshot=SNAPSHOT)
    enricher = build_enricher(settings, receiver.grpc_endpoint, cluster="staging")
    assert enricher.settings.cluster == "staging"
    call = enricher.enrich(cluster_call())
    assert (call.src.cluster, call.src.workload) == ("staging", "checkout")
    enricher.export([call])
    enricher.shutdown()
    assert len(receiver.wait_for_spans(2)) == 2


ANALYZED = [
    FIXTURES / "sample.pcap",
    FIXTURES / "http2" / "grpc_busy.pcap",
    FIXTURES / "http2" / "graphql_http2.pcap",
    FIXTURES / "kafka" / "kafka_flexible.pcap",
    FIXTURES / "amqp" / "amqp_publish_consume.pcap",
    FIXTURES / "redis" / "auth.pcap",
    FIXTURES / "dns_udp.pcap",
]


@pytest.mark.parametrize("traces_only", [False, True], ids=["otlp-endpoint", "traces-endpoint"])
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
@pytest.mark.parametrize("capture", ANALYZED, ids=[path.name for path in ANALYZED])
def test_trawl_analyze_sends_the_reference_spans_by_the_compiled_path(
    receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
    capture: Path,
    protocol: str,
    traces_only: bool,
) -> None:
    """`trawl analyze --json --otlp-endpoint` (in process) sends the spans the SDK path makes
    of the same calls, by the compiled path (the SDK's span processor is never built). With a
    traces endpoint alone (no RED metrics) the calls stay bytes from the dissector on."""

    def no_sdk_spans(*args: object, **kwargs: object) -> None:
        raise AssertionError("the SDK span path was used")

    monkeypatch.setattr(otlp, "span_processor", no_sdk_spans)
    monkeypatch.setattr(analyze_module.gc, "freeze", lambda: None)
    monkeypatch.setattr(analyze_module, "configure_logging", lambda *args, **kwargs: None)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint
    if traces_only:
        traces = endpoint if protocol == "grpc" else f"{endpoint}/v1/traces"
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", traces)
    given = None if traces_only else endpoint
    assert analyze_module.analyze(capture, IDENTITY, as_json=True, otlp_endpoint=given, node="node-a") == 0
    printed = capsysbinary.readouterr()
    assert b"spans:" in printed.err and b" 0 dropped" in printed.err and b" 0 failed" in printed.err
    merged = ExportTraceServiceRequest()
    for request in receiver.trace_requests:
        merged.MergeFrom(request)
    expected = canonical_spans(reference(dissected(capture, IDENTITY)))
    assert expected, "the capture gives spans"
    assert canonical_spans(merged) == expected


@pytest.mark.parametrize("span_path", ["compiled", "sdk"])
def test_the_service_enricher_sends_by_the_span_path_it_is_told(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch, span_path: str
) -> None:
    """enricher_from_settings (the service's Enricher): the compiled path by default, the SDK
    path with span_path: sdk; the same spans and the same accounting either way."""
    built: list[str] = []
    real = otlp.span_processor

    def recording(*args: Any, **kwargs: Any) -> Any:
        built.append("sdk")
        return real(*args, **kwargs)

    monkeypatch.setattr(otlp, "span_processor", recording)
    enricher = make_enricher(otlp_endpoint=receiver.grpc_endpoint, span_path=span_path)
    calls = [enricher.enrich(cluster_call(f"call-{index}", trace=index % 2 == 0)) for index in range(20)]
    enricher.export(calls)
    assert enricher.flush()
    enricher.shutdown()
    assert built == ([] if span_path == "compiled" else ["sdk"])
    totals = SpanCounters.of(enricher.metrics).totals()
    assert totals == SpanTotals(handed=40, exported=40)
    merged = ExportTraceServiceRequest()
    for request in receiver.trace_requests:
        merged.MergeFrom(request)
    assert canonical_spans(merged) == canonical_spans(reference(calls))


def _metric_requests_points(receiver: OtlpReceiver) -> dict[tuple[str, ...], tuple[object, ...]]:
    from tests.unit.test_otel_red_wire import histograms

    # Cumulative: each series' latest point is its total (the aggregated path's last export at
    # a stop holds Trawl's counters only when no call came since the export before).
    latest: dict[tuple[str, ...], tuple[object, ...]] = {}
    for request in receiver.metric_requests:
        latest.update(histograms(request, {"http.server.request.duration", "http.client.request.duration"}))
    return latest


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_aggregated_metrics_reach_the_receiver_as_the_sdk_paths_do(protocol: str) -> None:
    """The same calls through the service enricher on each metrics path, each to its own real
    receiver: the same duration histograms arrive (the aggregated request also holds the
    service graph and Trawl's counters, and its exemplars name the spans that arrived)."""
    calls = dissected(FIXTURES / "http1.pcap", IDENTITY)
    received = {}
    for path in ("aggregated", "sdk"):
        with OtlpReceiver() as running:
            endpoint = running.grpc_endpoint if protocol == "grpc" else running.http_endpoint
            enricher = make_enricher(otlp_endpoint=endpoint, otlp_protocol=protocol, metrics_path=path)
            enricher.export([ApiCall.FromString(call.SerializeToString()) for call in calls])
            assert enricher.flush()
            enricher.shutdown()
            received[path] = _metric_requests_points(running)
            if path == "aggregated":
                span_ids = {span.span_id for span in running.spans()}
                exemplar_ids = {
                    exemplar.span_id.hex()
                    for resource_metrics in running.metric_requests[0].resource_metrics
                    for scope_metrics in resource_metrics.scope_metrics
                    for metric in scope_metrics.metrics
                    if metric.name.endswith(".duration")
                    for point in metric.histogram.data_points
                    for exemplar in point.exemplars
                }
                assert exemplar_ids and exemplar_ids <= span_ids

                def names(request: object) -> set[str]:
                    return {
                        metric.name
                        for resource_metrics in request.resource_metrics  # type: ignore[attr-defined]
                        for scope_metrics in resource_metrics.scope_metrics
                        for metric in scope_metrics.metrics
                    }

                # The flush's request holds everything; the shutdown's, no call having come
                # since, only Trawl's own counters (the histograms' cumulative points were sent).
                first, last = running.metric_requests[0], running.metric_requests[-1]
                assert {"traces_service_graph_request_total", "trawl_enricher_spans_exported_total"} <= names(first)
                assert "trawl_enricher_spans_exported_total" in names(last)
                assert not {name for name in names(last) if name.endswith(".duration")}
                assert enricher.metrics.counter("trawl_enricher_metric_points_total", "").get(result="exported") > 0
    assert received["aggregated"] == received["sdk"] != {}


def test_aggregated_metrics_to_an_unreachable_endpoint_count_their_loss() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    enricher = make_enricher(otlp_endpoint=f"127.0.0.1:{port}", otlp_timeout_s=0.5)
    enricher.export([enricher.enrich(cluster_call())])
    assert not enricher.export_metrics()
    points = enricher.metrics.counter("trawl_enricher_metric_points_total", "")
    assert points.get(result="failed") > 0 and points.get(result="exported") == 0
    assert enricher.metrics.counter("trawl_enricher_metric_export_failures_total", "").total() == 1
    enricher.shutdown_spans()
