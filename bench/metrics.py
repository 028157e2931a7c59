"""RED metrics speed: the aggregated path (services/enricher/red_wire.py) against the
OpenTelemetry SDK path (red.py RedMetrics, the reference), in the same run, on the same calls,
exported to a real OTLP/gRPC receiver in another process.

    python bench/metrics.py [--calls 50000] [--up FILE]

1. Recording: the enriched calls of a dissected capture (bench/dissect.py's HTTP/1.1 traffic
   named by tests/fixtures/identity_snapshot.json's pods), handed over 64 at a time as the
   enricher hands a CallBatch: SDK path = `shape_call` + `RedMetrics.record` per call (what
   Enricher.export did); aggregated path = `WireRedMetrics.record_calls` per batch. Then one
   export of each to the receiver, which decodes the ExportMetricsServiceRequest with
   opentelemetry-proto and sums the http.server.request.duration counts: both must equal the
   calls given.
2. `--up FILE`: `trawl up --pcap FILE --otlp-endpoint <receiver>` end to end, the SDK metrics
   path (TRAWL_ENRICHER_METRICS_PATH=sdk) and the aggregated one, wall time from start to exit,
   and the calls per second that makes (the calls are those trawl up counted).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent import futures
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dissect import generate  # noqa: E402
from bench.otlp import capture_calls  # noqa: E402
from trawl.metrics import Registry  # noqa: E402
from trawl.v1.calls_pb2 import ApiCall  # noqa: E402

BATCH_CALLS = 64


def say(text: str = "") -> None:
    """A benchmark prints its figures (stdout); tools and services log instead."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _receiver(ready: Connection, stop: Any) -> None:
    """Sum the http.server.request.duration counts of the last metrics request, count spans."""
    import threading

    import grpc
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    state = {"server_count": 0, "points": 0, "spans": 0, "requests": 0}
    # Cumulative: each series' latest count is its total (an export may come in several requests).
    latest: dict[tuple[bytes, bytes], int] = {}
    lock = threading.Lock()

    def metrics(body: bytes, context: Any) -> bytes:
        request = ExportMetricsServiceRequest.FromString(body)
        points = 0
        with lock:
            for resource_metrics in request.resource_metrics:
                resource = resource_metrics.resource.SerializeToString(deterministic=True)
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        data = getattr(metric, metric.WhichOneof("data") or "gauge")
                        points += len(data.data_points)
                        if metric.name == "http.server.request.duration":
                            for point in metric.histogram.data_points:
                                attributes = b"".join(kv.SerializeToString() for kv in point.attributes)
                                latest[(resource, attributes)] = point.count
            state["server_count"] = sum(latest.values())
            state["points"] += points
            state["requests"] += 1
        return b""

    def traces(body: bytes, context: Any) -> bytes:
        request = ExportTraceServiceRequest.FromString(body)
        with lock:
            state["spans"] += sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "opentelemetry.proto.collector.metrics.v1.MetricsService",
                {"Export": grpc.unary_unary_rpc_method_handler(metrics)},
            ),
            grpc.method_handlers_generic_handler(
                "opentelemetry.proto.collector.trace.v1.TraceService",
                {"Export": grpc.unary_unary_rpc_method_handler(traces)},
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ready.send(port)
    stop.wait()
    server.stop(None)
    ready.send(dict(state))


class Receiver:
    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._parent, child = context.Pipe()
        self._stop = context.Event()
        self._process = context.Process(target=_receiver, args=(child, self._stop), daemon=True)
        self._process.start()
        self.endpoint = f"127.0.0.1:{self._parent.recv()}"

    def stop(self) -> dict[str, int]:
        self._stop.set()
        state: dict[str, int] = self._parent.recv()
        self._process.join(5)
        return state


def _batches(calls: list[ApiCall]) -> list[list[ApiCall]]:
    return [calls[start : start + BATCH_CALLS] for start in range(0, len(calls), BATCH_CALLS)]


def record_sdk(calls: list[ApiCall], endpoint: str) -> tuple[float, float]:
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    from trawl.enricher.red import RedMetrics
    from trawl.enricher.spans import shape_call

    red = RedMetrics(OTLPMetricExporter(endpoint=endpoint, insecure=True), 2000, Registry())
    started = time.perf_counter()
    for batch in _batches(calls):
        for call in batch:
            red.record(call, shape_call(call))
    recorded = time.perf_counter() - started
    started = time.perf_counter()
    assert red.export(30.0)
    exported = time.perf_counter() - started
    red.shutdown()
    return recorded, exported


def record_aggregated(calls: list[ApiCall], endpoint: str) -> tuple[float, float]:
    from trawl.enricher.red_wire import GrpcMetricSender, WireRedMetrics
    from trawl.enricher.wire_export import WireExportOptions

    red = WireRedMetrics(GrpcMetricSender(WireExportOptions(endpoint)), Registry(), max_resources=2000)
    started = time.perf_counter()
    for batch in _batches(calls):
        red.record_calls(batch)
    recorded = time.perf_counter() - started
    started = time.perf_counter()
    assert red.export(30.0)
    exported = time.perf_counter() - started
    red.sender.close()
    return recorded, exported


def recording(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        capture = Path(scratch) / "calls.pcap"
        generate(
            capture, packets=3 * args.calls + 6 * (args.calls // 100 + 1), requests_per_connection=100, dns_share=0
        )
        calls = capture_calls(capture)
    timed = sum(1 for call in calls if call.request.ts)
    say(f"{len(calls)} enriched HTTP calls, RED metrics recorded in batches of {BATCH_CALLS}, one export (OTLP/gRPC)")
    runs: list[tuple[str, Callable[[list[ApiCall], str], tuple[float, float]]]] = [
        ("SDK path (shape_call + RedMetrics.record)", record_sdk),
        ("aggregated path (WireRedMetrics.record_calls)", record_aggregated),
    ]
    rates = []
    for name, run in runs:
        receiver = Receiver()
        recorded, exported = run(calls, receiver.endpoint)
        state = receiver.stop()
        rate = len(calls) / recorded
        rates.append(rate)
        per_call_us = recorded * 1e6 / len(calls)
        say(f"  {name:<48} {rate:>10,.0f} calls/s  ({per_call_us:.2f} us a call; export {exported * 1e3:.0f} ms)")
        say(f"    receiver: {state['points']} points, http.server.request.duration counts {state['server_count']}")
        assert state["server_count"] == timed, (state, timed)
    say(f"  aggregated / SDK: {rates[1] / rates[0]:.1f}x")


def up_end_to_end(capture: Path) -> None:
    say(f"trawl up --pcap {capture.name} --otlp-endpoint (OTLP/gRPC receiver in another process)")
    for name, environment, export in (
        ("no OTLP export", {}, False),
        ("SDK metrics path", {"TRAWL_ENRICHER_METRICS_PATH": "sdk"}, True),
        ("aggregated metrics path", {}, True),
    ):
        receiver = Receiver()
        env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
        env.update(environment)
        command = [sys.executable, "-m", "trawl", "up", "--pcap", str(capture), "--json"]
        if export:
            command += ["--otlp-endpoint", receiver.endpoint]
        started = time.perf_counter()
        with tempfile.TemporaryFile() as output:
            done = subprocess.run(command, stdout=output, stderr=subprocess.PIPE, text=True, env=env, check=False)
            output.seek(0)
            printed = sum(1 for _ in output)
        elapsed = time.perf_counter() - started
        state = receiver.stop()
        summary = [line for line in done.stderr.splitlines() if re.search(r"calls|spans|metric", line)][-4:]
        say(f"  {name:<28} {elapsed:6.1f} s  {printed / elapsed:>8,.0f} calls/s  (exit {done.returncode})")
        say(f"    calls printed {printed}, spans received {state['spans']}, metric requests {state['requests']}")
        say(f"    http.server.request.duration counts (each series' last) {state['server_count']}")
        for line in summary:
            say(f"    | {line.strip()[:150]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--up", type=Path, help="also run trawl up --pcap on this capture, both metrics paths")
    parser.add_argument("--up-only", action="store_true", help="skip the recording figures")
    args = parser.parse_args()
    if not args.up_only:
        recording(args)
    if args.up is not None:
        up_end_to_end(args.up)
    return 0


if __name__ == "__main__":
    sys.exit(main())
