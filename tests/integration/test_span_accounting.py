"""Every span handed to export is accounted for, with a real OTLP gRPC receiver (healthy, slow,
or not there at all) and a real span flood (10,000 calls, 20,000 spans):
handed == exported + dropped + failed, exactly, in the line `trawl analyze --otlp-endpoint` and
`trawl up` print, on the enricher service's /metrics and in its final log event; and exported
is what the receiver got."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from bench.dissect import generate
from tests.integration.test_enricher_otlp import SNAPSHOT, cluster_call
from tests.otlp_receiver import OtlpReceiver
from trawl.bus import Bus, calls_subject, control_subject
from trawl.config import NatsSettings
from trawl.embedded import free_port
from trawl.enricher.span_totals import DROPPED, EXPORTED, FAILED, HANDED, TOTALS_EVENT, SpanTotals
from trawl.v1.calls_pb2 import CallBatch

CALLS = 10_000
SPANS = 2 * CALLS
TOTALS_LINE = re.compile(
    r"^spans: (\d+) handed, (\d+) exported, (\d+) dropped \((\d+) queue full, (\d+) shutdown\), (\d+) failed$"
)
# A queue far smaller than the flood, so a slow or absent endpoint makes the processor drop.
SMALL_QUEUE = "enricher:\n  export_max_queue_size: 512\n  export_max_batch_size: 128\n  export_schedule_delay_ms: 50\n"


@pytest.fixture(scope="module")
def flood(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HTTP/1.1 keep-alive traffic of exactly CALLS exchanges (3 frames each, plus handshakes)."""
    path = tmp_path_factory.mktemp("flood") / "flood.pcap"
    connections = CALLS // 100
    generate(path, packets=connections * (3 + 3 * 100 + 3), requests_per_connection=100, dns_share=0)
    return path


def without_otel_environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}


def trawl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trawl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=without_otel_environment(),
    )


def printed_totals(stderr: str) -> SpanTotals:
    """The totals line, which is the last line on stderr."""
    match = TOTALS_LINE.match(stderr.strip().splitlines()[-1])
    assert match is not None, stderr
    handed, exported, dropped, queue_full, shutdown, failed = map(int, match.groups())
    assert dropped == queue_full + shutdown
    return SpanTotals(handed, exported, queue_full, shutdown, failed)


def analyze(capture: Path, endpoint: str, config: Path) -> tuple[SpanTotals, int]:
    result = trawl("analyze", str(capture), "--json", "--otlp-endpoint", endpoint, "--config", str(config))
    assert result.returncode == 0, result.stderr
    return printed_totals(result.stderr), len(result.stdout.splitlines())


def test_analyze_to_a_healthy_endpoint_exports_every_span(flood: Path, tmp_path: Path) -> None:
    config = tmp_path / "trawl.yaml"
    config.write_text("enricher:\n  export_max_queue_size: 32768\n")
    with OtlpReceiver() as receiver:
        totals, calls = analyze(flood, receiver.grpc_endpoint, config)
        assert calls == CALLS
        assert totals == SpanTotals(handed=SPANS, exported=SPANS)
        received = receiver.wait_for_spans(SPANS)
    assert len({(span.trace_id, span.span_id) for span in received}) == SPANS


def test_analyze_to_a_slow_endpoint_waits_for_it_and_loses_nothing(flood: Path, tmp_path: Path) -> None:
    """A file is read far faster than a slow endpoint takes spans (0.05 s an export, a queue of
    512): `trawl analyze` waits for room while the endpoint keeps accepting, so nothing is
    dropped (a live pipeline drops instead: the `trawl up` test below)."""
    config = tmp_path / "trawl.yaml"
    config.write_text(SMALL_QUEUE)
    with OtlpReceiver(trace_delay_s=0.05) as receiver:
        totals, calls = analyze(flood, receiver.grpc_endpoint, config)
        assert calls == CALLS
        assert totals == SpanTotals(handed=SPANS, exported=SPANS)
        # What the processor says it exported is what the receiver holds, no more, no less.
        assert len(receiver.spans()) == SPANS


def test_analyze_with_nothing_listening_counts_every_span_as_dropped_or_failed(flood: Path, tmp_path: Path) -> None:
    config = tmp_path / "trawl.yaml"
    config.write_text(SMALL_QUEUE + "  otlp_timeout_s: 1\n")
    totals, calls = analyze(flood, f"127.0.0.1:{free_port()}", config)
    assert calls == CALLS
    assert totals.handed == SPANS
    assert totals.exported == 0
    assert totals.failed > 0
    assert totals.dropped_queue_full > 0
    assert totals.dropped + totals.failed == SPANS


def test_up_prints_the_totals_and_they_match_the_receiver(flood: Path, tmp_path: Path) -> None:
    """With the span queue dropping when full (a live capture's way; a file's calls wait for
    room by default, the next test), every span is exported or counted as dropped."""
    config = tmp_path / "trawl.yaml"
    config.write_text(SMALL_QUEUE + "  export_wait_for_room: false\n")
    with OtlpReceiver(trace_delay_s=0.2) as receiver:
        result = trawl(
            "up", "--pcap", str(flood), "--json", "--otlp-endpoint", receiver.grpc_endpoint,
            "--config", str(config), "--state-dir", str(tmp_path / "state"),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(result.stdout.splitlines()) == CALLS
        totals = printed_totals(result.stderr)
        assert totals.handed == SPANS
        assert totals.dropped_queue_full > 0
        assert totals.exported + totals.dropped + totals.failed == SPANS
        assert len(receiver.spans()) == totals.exported


def test_up_of_a_file_waits_for_a_slow_backend_and_delivers_every_span(flood: Path, tmp_path: Path) -> None:
    """trawl up --pcap: the enricher's span queue waits for room (export_wait_for_room, set for a
    file), so a backend slower than the file's reading gets every span, none dropped."""
    config = tmp_path / "trawl.yaml"
    config.write_text(SMALL_QUEUE)
    with OtlpReceiver(trace_delay_s=0.05) as receiver:
        result = trawl(
            "up", "--pcap", str(flood), "--json", "--otlp-endpoint", receiver.grpc_endpoint,
            "--config", str(config), "--state-dir", str(tmp_path / "state"),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        totals = printed_totals(result.stderr)
        assert totals == SpanTotals(handed=SPANS, exported=SPANS)
        assert len(receiver.spans()) == SPANS


def test_up_with_nothing_listening_prints_totals_that_add_up(flood: Path, tmp_path: Path) -> None:
    """The enricher's shutdown settles and logs its span totals before anything slower (the
    metric exporter's own shutdown), so `trawl up` has them even when the endpoint is gone."""
    config = tmp_path / "trawl.yaml"
    config.write_text(SMALL_QUEUE + "  otlp_timeout_s: 1\n")
    result = trawl(
        "up", "--pcap", str(flood), "--json", "--otlp-endpoint", f"127.0.0.1:{free_port()}",
        "--config", str(config), "--state-dir", str(tmp_path / "state"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "service_killed" not in result.stderr
    totals = printed_totals(result.stderr)
    assert totals.handed == SPANS
    assert totals.exported == 0
    assert totals.dropped + totals.failed == SPANS


def scrape(port: int) -> dict[str, float]:
    """The /metrics samples by name and labels, as `name{labels}` -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@pytest.fixture
def slow_receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver(trace_delay_s=0.2) as receiver:
        yield receiver


async def test_enricher_service_counts_on_metrics_and_logs_the_same_totals(
    nats_url: str, tmp_path: Path, slow_receiver: OtlpReceiver
) -> None:
    node = f"spans-{uuid.uuid4().hex[:8]}"
    port = free_port()
    config = tmp_path / "trawl.yaml"
    config.write_text(
        f"node: {node}\nhttp_port: {port}\nnats:\n  servers: ['{nats_url}']\n"
        f"enricher:\n  identity_snapshot: {SNAPSHOT}\n  otlp_endpoint: {slow_receiver.grpc_endpoint}\n"
        f"  durable: enricher-{node}\n  calls_filter_subject: trawl.v1.calls.{node}.>\n  fetch_timeout_s: 0.2\n"
        "  publish_enriched: false\n  export_max_queue_size: 512\n  export_max_batch_size: 128\n"
        "  export_schedule_delay_ms: 50\n"
    )
    probe = await Bus.connect(NatsSettings(servers=[nats_url]), "probe")
    ready = asyncio.Event()
    drained: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_ready(_: Msg) -> None:
        ready.set()

    await probe.nc.subscribe(control_subject("ready", "enricher", node), cb=on_ready)
    await probe.nc.subscribe(control_subject("drained", "enricher", node), cb=drained.put)
    service = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "trawl", "enricher", "--config", str(config),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=without_otel_environment(),
    )  # fmt: skip
    try:
        await asyncio.wait_for(ready.wait(), 30)
        batches = 5
        for sequence in range(1, batches + 1):
            calls = [cluster_call(f"{node}-{sequence}-{index}") for index in range(1000)]
            batch = CallBatch(node=node, shard=0, sequence=sequence, calls=calls, end_of_input=sequence == batches)
            await probe.publish_durable(calls_subject(node, 0), batch.SerializeToString(), f"{node}-b{sequence}")
        await asyncio.wait_for(drained.get(), 120)
        # At end of input the enricher flushed: nothing is queued or in flight, so the counters add up now.
        samples = scrape(port)
        on_metrics = SpanTotals(
            handed=int(samples[HANDED[0]]),
            exported=int(samples[EXPORTED[0]]),
            dropped_queue_full=int(samples[f'{DROPPED[0]}{{reason="queue_full"}}']),
            dropped_shutdown=int(samples[f'{DROPPED[0]}{{reason="shutdown"}}']),
            failed=int(samples[FAILED[0]]),
        )
        assert on_metrics.handed == 2 * 5000
        assert on_metrics.dropped_queue_full > 0
        assert on_metrics.exported + on_metrics.dropped + on_metrics.failed == on_metrics.handed
        assert len(slow_receiver.spans()) == on_metrics.exported
    finally:
        service.send_signal(signal.SIGTERM)
        _, stderr_bytes = await asyncio.wait_for(service.communicate(), 60)
        stderr = stderr_bytes.decode()
        await probe.close()
    assert service.returncode == 0, stderr
    events = [json.loads(line) for line in stderr.splitlines() if TOTALS_EVENT in line]
    assert len(events) == 1, stderr
    assert events[0]["level"] == "warning"  # spans were lost
    assert SpanTotals.from_log_fields(events[0]) == on_metrics
