"""RED metrics: semantic-convention histograms per peer resource, with bounded attributes."""

from __future__ import annotations

from opentelemetry.sdk.metrics.export import HistogramDataPoint, MetricsData

from tests.unit.test_otel_spans import make_call
from trawl.enricher.red import DURATION_BUCKETS_S, RedMetrics
from trawl.metrics import Registry


def points(data: MetricsData) -> list[tuple[str, str, dict[str, object], HistogramDataPoint]]:
    found = []
    for resource_metrics in data.resource_metrics:
        service = str(resource_metrics.resource.attributes["service.name"])
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    assert isinstance(point, HistogramDataPoint)
                    found.append((service, metric.name, dict(point.attributes or {}), point))
    return found


def test_http_durations_per_side_with_templated_paths() -> None:
    red = RedMetrics(None, max_resources=100, registry=Registry())
    for user in ("1", "2", "3"):
        red.record(make_call(id=f"c{user}", path=f"/users/{user}"))
    red.record(make_call(id="c9", path="/users/9", status="500"))
    found = points(red.collect())
    server = [p for p in found if p[1] == "http.server.request.duration"]
    client = [p for p in found if p[1] == "http.client.request.duration"]
    assert {p[0] for p in server} == {"users"}
    assert {p[0] for p in client} == {"checkout"}
    ok = next(p for p in server if p[2].get("http.response.status_code") == 200)
    assert ok[2] == {
        "http.request.method": "GET",
        "http.response.status_code": 200,
        "url.scheme": "http",
        "url.template": "/users/{id}",
    }
    assert ok[3].count == 3
    assert abs(ok[3].sum - 3 * 0.006) < 1e-9
    assert tuple(ok[3].explicit_bounds) == DURATION_BUCKETS_S
    failed = next(p for p in server if p[2].get("http.response.status_code") == 500)
    assert failed[2]["error.type"] == "500"
    assert failed[3].count == 1
    # The client side names the peer by its workload (no service here), never by pod IP.
    assert {p[2]["server.address"] for p in client} == {"users"}


def test_resources_are_bounded() -> None:
    registry = Registry()
    red = RedMetrics(None, max_resources=2, registry=registry)
    for index in range(5):
        call = make_call(id=f"c{index}")
        call.src.name = call.src.workload = f"caller-{index}"
        red.record(call)
    services = {p[0] for p in points(red.collect())}
    assert services == {"caller-0", "users", "trawl.overflow"}
    assert registry.counter("trawl_enricher_metric_resource_overflow_total", "").total() == 4
    assert red.resources == 3


def test_calls_without_a_known_protocol_or_time_record_nothing() -> None:
    red = RedMetrics(None, max_resources=10, registry=Registry())
    red.record(make_call(protocol="tcp", method="reset"))
    untimed = make_call()
    untimed.request.ts = 0
    red.record(untimed)
    assert points(red.collect()) == []
