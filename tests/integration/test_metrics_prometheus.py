"""/metrics is prometheus_client's rendering of a service's Registry, and Debian's Prometheus
scrapes it: a real enricher process enriches calls, a real `prometheus` scrapes it every
second, and Prometheus's query API returns the counts the service holds."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import needs_binary
from trawl.bus import STREAM_CALLS, Bus, calls_subject
from trawl.config import NatsSettings, StreamLimits
from trawl.embedded import free_port
from trawl.metrics import Registry
from trawl.v1.calls_pb2 import ApiCall, CallBatch, Endpoint, Message


def test_large_counters_keep_every_digit_and_help_is_escaped() -> None:
    from prometheus_client.exposition import generate_latest

    registry = Registry()
    registry.counter("trawl_test_packets_total", 'Packets\nseen "here" \\ there').inc(1234567)
    registry.counter("trawl_test_packets_total", "").inc(2, shard="0")
    registry.gauge("trawl_test_queue", "Queue").set(0.25)
    families = {family.name: family for family in text_string_to_metric_families(generate_latest(registry).decode())}
    packets = families["trawl_test_packets"]
    assert packets.type == "counter"
    assert packets.documentation == 'Packets\nseen "here" \\ there'
    assert {(tuple(sorted(s.labels.items())), s.value) for s in packets.samples} == {
        ((), 1234567.0),
        ((("shard", "0"),), 2.0),
    }
    assert families["trawl_test_queue"].samples[0].value == 0.25
    assert "trawl_test_packets_total 1234567\n" in registry.render()  # the compact form: every digit too


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def _query(port: int, expression: str) -> list[dict[str, object]]:
    answer = json.loads(_get(f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expression)}"))
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


@needs_binary("prometheus")
async def test_prometheus_scrapes_a_running_service(nats_url: str, tmp_path: Path) -> None:
    service_port, prometheus_port = free_port(), free_port()
    config = tmp_path / "trawl.yaml"
    config.write_text(f"node: scraped\nhttp_port: {service_port}\nnats:\n  servers: ['{nats_url}']\n")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: trawl\n    static_configs: [{{targets: ['127.0.0.1:{service_port}']}}]\n"
    )
    enricher = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "trawl", "enricher", "--config", str(config),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    prometheus = await asyncio.create_subprocess_exec(
        "prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prometheus_port}",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    bus = await Bus.connect(NatsSettings(servers=[nats_url]), name="test")
    try:
        await bus.ensure_stream(STREAM_CALLS, StreamLimits())
        calls = [
            ApiCall(
                id=f"scraped-{index}",
                protocol="http",
                node="scraped",
                request=Message(ts=1),
                dst=Endpoint(ip="10.0.0.1"),
            )
            for index in range(1500)
        ]
        batch = CallBatch(node="scraped", sequence=1, calls=calls)
        await bus.publish_durable(calls_subject("scraped", 0), batch.SerializeToString(), "scraped/0/1")
        deadline = time.monotonic() + 60
        found: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            try:
                found = _query(prometheus_port, 'trawl_enricher_calls_total{job="trawl",protocol="http"}')
            except OSError:  # Prometheus is still starting
                found = []
            if found and found[0]["value"][1] == "1500":  # type: ignore[index]
                break
            await asyncio.sleep(0.5)
        assert found and found[0]["value"][1] == "1500", found  # type: ignore[index]
        targets = json.loads(_get(f"http://127.0.0.1:{prometheus_port}/api/v1/targets"))["data"]["activeTargets"]
        assert [(t["health"], t["lastError"]) for t in targets] == [("up", "")]
        # Every family the service exposes reached Prometheus, under the same names.
        exposed = {
            sample.name
            for family in text_string_to_metric_families(_get(f"http://127.0.0.1:{service_port}/metrics"))
            for sample in family.samples
        }
        names = set(json.loads(_get(f"http://127.0.0.1:{prometheus_port}/api/v1/label/__name__/values"))["data"])
        assert exposed and exposed <= names, exposed - names
    finally:
        await bus.close()
        prometheus.terminate()
        enricher.send_signal(signal.SIGTERM)
        await asyncio.wait_for(prometheus.wait(), 10)
        _, stderr = await asyncio.wait_for(enricher.communicate(), 20)
        assert enricher.returncode == 0, stderr.decode()[-2000:]
