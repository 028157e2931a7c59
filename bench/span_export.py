"""What counting every span costs the enricher: the hand-over of spans to the export processor,
Trawl's CountingBatchSpanProcessor against the OpenTelemetry SDK's BatchSpanProcessor, in the
same run, on the same spans, both in front of the SDK's in-memory exporter.

    python bench/span_export.py [--spans 400000] [--batch-calls 64]

The SDK's processor takes spans one `on_end` at a time; the enricher hands Trawl's the spans of
a whole CallBatch in one `hand_over` (and `on_end` one at a time is measured too). Each figure
is nanoseconds of the caller's thread per span, with the export thread running alongside (it
competes for the GIL, as it does in the service). The queue is large enough that neither drops.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from trawl.enricher.otlp import CountingBatchSpanProcessor
from trawl.enricher.span_totals import SpanCounters
from trawl.enricher.spans import call_spans
from trawl.metrics import Registry
from trawl.v1.calls_pb2 import ApiCall

QUEUE = 1 << 20
BATCH = 512


def say(text: str = "") -> None:
    """A benchmark prints its figures (stdout); tools and services log instead."""
    sys.stdout.write(text + "\n")


def sample_spans(calls: int) -> list[ReadableSpan]:
    spans: list[ReadableSpan] = []
    for index in range(calls):
        call = ApiCall(id=f"call-{index}", protocol="http", transport="tcp", method="GET", path=f"/items/{index}")
        call.src.ip, call.dst.ip, call.dst.port = "10.244.1.12", "10.244.2.9", 8080
        call.request.ts, call.response.ts, call.response.end_ts = 1_700_000_000_000_000_000, 1, 2
        call.status = "200"
        spans.extend(call_spans(call))
    return spans


def timed(processor: SpanProcessor, hand: Callable[[], None], total: int) -> float:
    started = time.perf_counter()
    hand()
    elapsed = time.perf_counter() - started
    processor.shutdown()
    return elapsed / total * 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spans", type=int, default=400_000)
    parser.add_argument("--batch-calls", type=int, default=64, help="calls per hand-over (the enricher's fetch batch)")
    args = parser.parse_args()
    spans = sample_spans(args.batch_calls * 8)
    rounds = max(1, args.spans // len(spans))
    total = rounds * len(spans)
    chunks = [spans[start : start + 2 * args.batch_calls] for start in range(0, len(spans), 2 * args.batch_calls)]

    sdk = BatchSpanProcessor(
        InMemorySpanExporter(), max_queue_size=QUEUE, max_export_batch_size=BATCH, schedule_delay_millis=1000
    )

    def sdk_one_by_one() -> None:
        for _ in range(rounds):
            for span in spans:
                sdk.on_end(span)

    def counting(registry: Registry) -> CountingBatchSpanProcessor:
        return CountingBatchSpanProcessor(
            InMemorySpanExporter(),
            SpanCounters.of(registry),
            max_queue_size=QUEUE,
            max_export_batch_size=BATCH,
            schedule_delay_s=1.0,
            shutdown_timeout_s=30.0,
        )

    one_registry = Registry()
    one = counting(one_registry)

    def counting_one_by_one() -> None:
        for _ in range(rounds):
            for span in spans:
                one.on_end(span)

    batch_registry = Registry()
    batched = counting(batch_registry)

    def counting_per_batch() -> None:
        for _ in range(rounds):
            for chunk in chunks:
                batched.hand_over(chunk)

    results = [
        ("SDK BatchSpanProcessor.on_end, per span", timed(sdk, sdk_one_by_one, total)),
        ("CountingBatchSpanProcessor.on_end, per span", timed(one, counting_one_by_one, total)),
        (
            f"CountingBatchSpanProcessor.hand_over, {2 * args.batch_calls} spans at a time",
            timed(batched, counting_per_batch, total),
        ),
    ]
    for registry in (one_registry, batch_registry):
        totals = SpanCounters.of(registry).totals()
        assert totals.handed == totals.exported == total, totals  # nothing lost, nothing counted twice
    say(f"{total} spans handed over ({len(spans)} distinct), queue {QUEUE}, export batches of {BATCH}")
    baseline = results[0][1]
    for name, nanoseconds in results:
        say(f"  {name:<62} {nanoseconds:7.0f} ns/span  ({nanoseconds / baseline:4.2f}x the SDK's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
