"""`trawl up --pcap` with OTLP export: the collector's and the dissector's counters reach the
metrics export (they run in their own processes: each publishes its counters on
trawl.v1.control.metrics.<service>.<node>, the enricher sends them beside its own), and the
summary lines account for every span and metric point the receiver got."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dpkt
import pytest

from tests.conftest import FIXTURES
from tests.otlp_receiver import OtlpReceiver, attributes

HTTP1 = FIXTURES / "http1.pcap"


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


def _packets(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for _ in dpkt.pcap.Reader(handle))


def _sums(receiver: OtlpReceiver) -> tuple[dict[tuple[str, str, str], float], int]:
    """The last value of each counter or gauge by (trawl.service, node, metric name), summed
    over label sets, and the data points of every request."""
    latest: dict[tuple[str, str, str, tuple[tuple[str, object], ...]], float] = {}
    points = 0
    for request in list(receiver.metric_requests):
        for resource_metrics in request.resource_metrics:
            resource = attributes(resource_metrics.resource.attributes)
            owner = (str(resource.get("trawl.service", "")), str(resource.get("trawl.node", "")))
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    kind = metric.WhichOneof("data")
                    data = getattr(metric, kind or "gauge")
                    points += len(data.data_points)
                    if kind not in ("sum", "gauge") or resource.get("service.name") != "trawl":
                        continue
                    for point in data.data_points:
                        labels = tuple(sorted(attributes(point.attributes).items()))
                        value = point.as_double if point.HasField("as_double") else point.as_int
                        latest[(*owner, metric.name, labels)] = value
    totals: dict[tuple[str, str, str], float] = {}
    for (service, node, name, _), value in latest.items():
        totals[(service, node, name)] = totals.get((service, node, name), 0) + value
    return totals, points


def test_collector_and_dissector_counters_reach_the_metrics_export(tmp_path: Path, otlp: OtlpReceiver) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trawl", "up", "--pcap", str(HTTP1), "--json", "--state-dir", str(tmp_path / "state"),
         "--otlp-endpoint", f"http://{otlp.grpc_endpoint}"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    calls = len(result.stdout.splitlines())
    assert calls == 6
    totals, points = _sums(otlp)
    nodes = {node for service, node, _ in totals if service == "collector"}
    assert len(nodes) == 1, totals
    node = nodes.pop()
    assert totals[("collector", node, "trawl_collector_packets_total")] == _packets(HTTP1)
    assert totals[("dissector", node, "trawl_dissector_calls_total")] == calls
    # The enricher's own counters stay under Trawl's resource without a service attribute.
    assert totals[("", "", "trawl_enricher_calls_total")] == calls

    # What trawl up prints accounts for what the receiver got: every span, every metric point.
    spans_line = re.search(r"^spans: (\d+) handed, (\d+) exported", result.stderr, re.M)
    metrics_line = re.search(
        r"^metrics: (\d+) points exported, (\d+) rejected, (\d+) failed; "
        r"retried: (\d+) span exports, (\d+) metric exports$",
        result.stderr,
        re.M,
    )
    assert spans_line and metrics_line, result.stderr[-2000:]
    assert int(spans_line[1]) == int(spans_line[2]) == len(otlp.spans()) == 2 * calls
    assert int(metrics_line[1]) == points > 0
    assert metrics_line.groups()[1:] == ("0", "0", "0", "0")


async def test_an_enricher_started_later_exports_the_last_counters_of_a_stopped_service(
    nats_url: str, tmp_path: Path, otlp: OtlpReceiver
) -> None:
    """A file's collector may publish its last counters and stop before the enricher starts:
    TRAWL_COUNTERS keeps the last snapshot of each service, which the enricher exports."""
    import asyncio
    import signal

    from trawl.bus import Bus
    from trawl.config import NatsSettings, ServiceSettings
    from trawl.metrics import Registry
    from trawl.service import ServiceContext

    node = f"gone-{tmp_path.name}"
    bus = await Bus.connect(NatsSettings(servers=[nats_url]), name="test")
    try:
        registry = Registry()
        registry.counter("trawl_collector_packets_total", "Packets published").inc(1234567)
        gone = ServiceContext(name="collector", settings=ServiceSettings(node=node), bus=bus, metrics=registry)
        await gone.publish_counters()
        await bus.nc.flush()
    finally:
        await bus.close()
    config = tmp_path / "trawl.yaml"
    config.write_text(
        f"node: {node}\nnats:\n  servers: ['{nats_url}']\n"
        f"enricher:\n  otlp_endpoint: http://{otlp.grpc_endpoint}\n  durable: enricher-{node}\n"
    )
    probe = await Bus.connect(NatsSettings(servers=[nats_url]), name="probe")
    announced = asyncio.Event()

    async def on_ready(_: object) -> None:
        announced.set()

    await probe.subscribe(f"trawl.v1.control.ready.enricher.{node}", on_ready)
    await probe.nc.flush()
    enricher = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "trawl", "enricher", "--config", str(config),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        await asyncio.wait_for(announced.wait(), 60)  # subscribed to the counters before it announces
        enricher.send_signal(signal.SIGTERM)  # its stop makes the last export
        _, stderr = await asyncio.wait_for(enricher.communicate(), 30)
        assert enricher.returncode == 0, stderr.decode()[-2000:]
    finally:
        await probe.close()
        if enricher.returncode is None:
            enricher.kill()
            await enricher.wait()
    totals, _ = _sums(otlp)
    assert totals[("collector", node, "trawl_collector_packets_total")] == 1234567
