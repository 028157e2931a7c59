"""Span export speed: the compiled span path against the OpenTelemetry SDK path, in the same run,
on the same calls, delivered to a real OTLP/gRPC receiver (or OTLP/HTTP with --http).

    python bench/otlp.py [--calls 50000] [--http] [--gzip] [--analyze [FILE]] [--handover]

1. Delivery: the enriched calls of a dissected capture (bench/dissect.py's HTTP/1.1 traffic,
   named by tests/fixtures/identity_snapshot.json's pods) handed over a CallBatch of 64 calls at
   a time, until every span is acknowledged by the receiver:
   - SDK path: `call_spans` (two ReadableSpans a call) into CountingBatchSpanProcessor in
     front of the SDK's OTLPSpanExporter (what the enricher did before the compiled path);
   - compiled path: the calls' bytes into WireSpanPath (trawl._otlpspans + WireSpanExport).
   The receiver runs in its own process (the other core): a grpc server (or http.server) that
   parses each ExportTraceServiceRequest with opentelemetry-proto and counts its spans. Each
   line: spans/s from the first hand-over to the last acknowledgement, on the caller's thread
   and the export thread of one process (one core's worth of Python: the GIL), and the
   accounting: handed = exported + dropped + failed, and exported = what the receiver counted.
2. `--analyze [FILE]`: `trawl analyze FILE --json --otlp-endpoint ...` end to end on a capture
   of `--analyze-calls` HTTP calls (made with bench/dissect.py's generator when FILE is not
   given), compiled path and SDK path (`TRAWL_SPAN_PATH=sdk` here makes the compiled encoder
   unavailable to that process only), each printing its accounting line; and the compiled path
   with OTEL_EXPORTER_OTLP_TRACES_ENDPOINT alone, i.e. without the RED metrics, which still take
   every call as an object (issue 12's second part).
3. `--handover`: the ns per span of handing ReadableSpans to the SDK's BatchSpanProcessor and
   to CountingBatchSpanProcessor (the figures of the SDK path's processor alone).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dissect import generate  # noqa: E402
from trawl import analyze as analyze_module  # noqa: E402
from trawl.collector.replay import CaptureFile  # noqa: E402
from trawl.dissector.config import DissectorSettings  # noqa: E402
from trawl.dissector.engine import Dissector  # noqa: E402
from trawl.enricher.config import EnricherSettings  # noqa: E402
from trawl.enricher.identity import IdentityMap  # noqa: E402
from trawl.enricher.span_totals import SpanCounters, SpanTotals  # noqa: E402
from trawl.metrics import Registry  # noqa: E402
from trawl.v1.calls_pb2 import ApiCall  # noqa: E402
from trawl.v1.packets_pb2 import PacketBatch  # noqa: E402

SNAPSHOT = ROOT / "tests" / "fixtures" / "identity_snapshot.json"
BATCH_CALLS = 64


def say(text: str = "") -> None:
    """A benchmark prints its figures (stdout); tools and services log instead."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# -- the receiver (its own process) -----------------------------------------------------------


def _receiver(protocol: str, ready: Connection, stop: Any) -> None:
    """Count the spans of every export; report (port) when ready and (spans) when stopped."""
    import threading

    import grpc
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    counted = [0]
    lock = threading.Lock()
    answer = ExportTraceServiceResponse().SerializeToString()

    def count(body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        spans = sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
        with lock:
            counted[0] += spans

    if protocol == "grpc":

        def export(body: bytes, context: Any) -> bytes:
            count(body)
            return answer

        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(export)},  # bytes in, bytes out
        )
        # The RED metrics of `trawl analyze --otlp-endpoint` are taken (and not looked at).
        metrics = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.metrics.v1.MetricsService",
            {"Export": grpc.unary_unary_rpc_method_handler(lambda body, context: b"")},
        )
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((handler, metrics))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        ready.send(port)
        stop.wait()
        server.stop(None)
    else:
        import gzip

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                count(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=http.serve_forever, daemon=True).start()
        ready.send(http.server_address[1])
        stop.wait()
        http.shutdown()
    ready.send(counted[0])


class Receiver:
    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        context = multiprocessing.get_context("spawn")
        self._parent, child = context.Pipe()
        self._stop = context.Event()
        self._process = context.Process(target=_receiver, args=(protocol, child, self._stop), daemon=True)
        self._process.start()
        port = self._parent.recv()
        self.endpoint = f"127.0.0.1:{port}" if protocol == "grpc" else f"http://127.0.0.1:{port}"

    def stop(self) -> int:
        """Spans received."""
        self._stop.set()
        spans: int = self._parent.recv()
        self._process.join(5)
        return spans


# -- the calls ----------------------------------------------------------------------------------


def capture_calls(path: Path) -> list[ApiCall]:
    """The calls `trawl analyze` finds in the capture, enriched with the snapshot's identities."""
    identity = IdentityMap.from_snapshot(SNAPSHOT, "bench")
    dissector = Dissector(DissectorSettings.load(None, node="bench"), "bench")
    calls: list[ApiCall] = []
    sequence = link_type = 0
    for read in CaptureFile(path).batches(analyze_module.BATCH_MAX_PACKETS, analyze_module.BATCH_MAX_BYTES):
        sequence += 1
        link_type = read.link_type
        calls += dissector.feed(read.message(node="bench", shard=0, sequence=sequence, source="bench"))
    calls += dissector.feed(PacketBatch(node="bench", sequence=sequence + 1, link_type=link_type, end_of_input=True))
    calls += dissector.finish()
    identity.enrich_calls(calls)
    return calls


def settings_for(receiver: Receiver, total_spans: int, compression: str) -> EnricherSettings:
    protocol = "grpc" if receiver.protocol == "grpc" else "http/protobuf"
    # Read by both exporters (the SDK's refuses "none": left unset then).
    if compression == "gzip":
        os.environ["OTEL_EXPORTER_OTLP_COMPRESSION"] = "gzip"
    else:
        os.environ.pop("OTEL_EXPORTER_OTLP_COMPRESSION", None)
    return EnricherSettings.load(
        None,
        node="bench",
        otlp_endpoint=receiver.endpoint,
        otlp_protocol=protocol,
        otlp_timeout_s=30.0,
        # Room for every span: the figure is the delivery rate, not the drop rate.
        export_max_queue_size=total_spans,
        export_max_batch_size=512,
        export_schedule_delay_ms=100,
    )


def deliver_sdk(calls: list[ApiCall], receiver: Receiver, compression: str) -> tuple[float, SpanTotals]:
    from trawl.enricher.logic import span_exporter_for
    from trawl.enricher.otlp import span_processor
    from trawl.enricher.spans import call_spans

    settings = settings_for(receiver, 2 * len(calls), compression)
    exporter = span_exporter_for(settings)
    assert exporter is not None
    registry = Registry()
    processor = span_processor(exporter, settings, registry)
    processor.batcher.shutdown_timeout_s = 600.0  # the figure is the time to deliver everything
    started = time.perf_counter()
    for start in range(0, len(calls), BATCH_CALLS):
        processor.hand_over([span for call in calls[start : start + BATCH_CALLS] for span in call_spans(call)])
    processor.shutdown()
    elapsed = time.perf_counter() - started
    return elapsed, SpanCounters.of(registry).totals()


def deliver_compiled(calls: list[bytes], receiver: Receiver, compression: str) -> tuple[float, SpanTotals]:
    from trawl.enricher.wire_export import WireSpanPath

    settings = settings_for(receiver, 2 * len(calls), compression)
    registry = Registry()
    path = WireSpanPath.from_settings(settings, registry, os.environ)
    assert path is not None, "trawl._otlpspans is not built"
    path.export.batcher.shutdown_timeout_s = 600.0
    started = time.perf_counter()
    for start in range(0, len(calls), BATCH_CALLS):
        path.hand_over_calls(calls[start : start + BATCH_CALLS])
    path.shutdown()
    elapsed = time.perf_counter() - started
    return elapsed, SpanCounters.of(registry).totals()


def delivery(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        capture = Path(scratch) / "calls.pcap"
        generate(
            capture, packets=3 * args.calls + 6 * (args.calls // 100 + 1), requests_per_connection=100, dns_share=0
        )
        calls = capture_calls(capture)
    serialized = [call.SerializeToString() for call in calls]
    protocol = "http" if args.http else "grpc"
    compression = "gzip" if args.gzip else "none"
    say(f"{len(calls)} enriched HTTP calls ({2 * len(calls)} spans), OTLP/{protocol}, compression {compression}")
    runs: list[tuple[str, Callable[[Receiver], tuple[float, SpanTotals]]]] = [
        ("SDK path (call_spans + OTLPSpanExporter)", lambda r: deliver_sdk(calls, r, compression)),
        ("compiled path (trawl._otlpspans + WireSpanExport)", lambda r: deliver_compiled(serialized, r, compression)),
    ]
    rates = []
    for name, run in runs:
        receiver = Receiver(protocol)
        elapsed, totals = run(receiver)
        received = receiver.stop()
        rate = totals.exported / elapsed
        rates.append(rate)
        say(f"  {name:<52} {rate:>9,.0f} spans/s  ({elapsed:.2f} s)")
        say(f"    {totals.line()}; the receiver counted {received}")
        assert totals.unaccounted == 0 and received == totals.exported, (totals, received)
    say(f"  compiled / SDK: {rates[1] / rates[0]:.1f}x")


# -- trawl analyze end to end -------------------------------------------------------------------


def analyze_end_to_end(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        capture: Path = args.analyze if isinstance(args.analyze, Path) else Path(scratch) / "analyze.pcap"
        if not isinstance(args.analyze, Path):
            calls = args.analyze_calls
            generate(capture, packets=3 * calls + 6 * (calls // 100 + 1), requests_per_connection=100, dns_share=0)
        say(f"trawl analyze {capture.name} --json --otlp-endpoint (OTLP/gRPC receiver in another process)")
        variants = (
            ("compiled path", {}, True),
            ("SDK path", {"TRAWL_SPAN_PATH": "sdk"}, True),
            ("compiled path, traces only (no RED metrics)", {}, False),
        )
        for name, environment, red in variants:
            receiver = Receiver("grpc")
            env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
            env.update(environment)
            endpoint = ["--otlp-endpoint", receiver.endpoint] if red else []
            if not red:
                env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = receiver.endpoint
            program = (
                "import os, sys\n"
                "if os.environ.get('TRAWL_SPAN_PATH') == 'sdk':\n"
                "    import trawl.enricher.wire_spans as w; w.SpanEncoder = None\n"
                "from trawl.cli import main\n"
                "sys.exit(main())\n"
            )
            command = [sys.executable, "-c", program, "analyze", str(capture), "--json", *endpoint]
            started = time.perf_counter()
            done = subprocess.run(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, check=False
            )
            elapsed = time.perf_counter() - started
            received = receiver.stop()
            line = next((text for text in done.stderr.splitlines() if text.startswith("spans:")), done.stderr.strip())
            say(f"  {name:<44} {elapsed:6.2f} s  ({received / elapsed:>9,.0f} spans/s delivered end to end)")
            say(f"    {line}; the receiver counted {received}")


# -- the SDK path's processor alone -----------------------------------------------------------


def handover(args: argparse.Namespace) -> None:
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from trawl.enricher.otlp import CountingBatchSpanProcessor
    from trawl.enricher.spans import call_spans

    queue, batch = 1 << 20, 512
    spans: list[ReadableSpan] = []
    for index in range(BATCH_CALLS * 8):
        call = ApiCall(id=f"call-{index}", protocol="http", transport="tcp", method="GET", path=f"/items/{index}")
        call.src.ip, call.dst.ip, call.dst.port = "10.244.1.12", "10.244.2.9", 8080
        call.request.ts, call.response.ts, call.response.end_ts = 1_700_000_000_000_000_000, 1, 2
        call.status = "200"
        spans.extend(call_spans(call))
    rounds = max(1, 400_000 // len(spans))
    total = rounds * len(spans)
    chunks = [spans[start : start + 2 * BATCH_CALLS] for start in range(0, len(spans), 2 * BATCH_CALLS)]

    def timed(processor: SpanProcessor, hand: Callable[[], None]) -> float:
        started = time.perf_counter()
        hand()
        elapsed = time.perf_counter() - started
        processor.shutdown()
        return elapsed / total * 1e9

    sdk = BatchSpanProcessor(InMemorySpanExporter(), max_queue_size=queue, max_export_batch_size=batch)
    counting = CountingBatchSpanProcessor(
        InMemorySpanExporter(),
        SpanCounters.of(Registry()),
        max_queue_size=queue,
        max_export_batch_size=batch,
        schedule_delay_s=1.0,
        shutdown_timeout_s=30.0,
    )
    results = [
        (
            "SDK BatchSpanProcessor.on_end, per span",
            timed(sdk, lambda: [sdk.on_end(s) for _ in range(rounds) for s in spans]),
        ),
        (
            f"CountingBatchSpanProcessor.hand_over, {2 * BATCH_CALLS} spans at a time",
            timed(counting, lambda: [counting.hand_over(c) for _ in range(rounds) for c in chunks]),
        ),
    ]
    say(f"{total} spans handed over, queue {queue}, export batches of {batch}")
    for name, nanoseconds in results:
        say(f"  {name:<62} {nanoseconds:7.0f} ns/span  ({nanoseconds / results[0][1]:4.2f}x the SDK's)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=50_000, help="calls of the delivery comparison")
    parser.add_argument("--http", action="store_true", help="OTLP/HTTP protobuf instead of OTLP/gRPC")
    parser.add_argument("--gzip", action="store_true", help="gzip the exports")
    parser.add_argument("--analyze", nargs="?", const=True, type=Path, help="also time trawl analyze (on FILE)")
    parser.add_argument("--analyze-calls", type=int, default=100_000)
    parser.add_argument("--handover", action="store_true", help="also the SDK path's processor hand-over alone")
    args = parser.parse_args()
    delivery(args)
    if args.analyze:
        analyze_end_to_end(args)
    if args.handover:
        handover(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
