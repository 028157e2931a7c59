"""The counting batch span processor: whatever the sequence of spans, flushes and queue limits,
and whether the exporter delivers or fails, every span it was handed is counted exactly once
(exported, dropped for a full queue or at shutdown, or failed), and never a span twice."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.unit.test_otel_spans import make_call
from trawl.embedded import free_port
from trawl.enricher.otlp import CountingBatchSpanProcessor
from trawl.enricher.span_totals import SpanCounters, SpanTotals
from trawl.enricher.spans import call_spans
from trawl.metrics import Registry

# Two spans per call; built once, the processor does not care that spans repeat.
SPANS = [span for index in range(8) for span in call_spans(make_call(id=f"call-{index}"))]


def processor(exporter: SpanExporter, queue: int, batch: int, registry: Registry) -> CountingBatchSpanProcessor:
    return CountingBatchSpanProcessor(
        exporter,
        SpanCounters.of(registry),
        max_queue_size=queue,
        max_export_batch_size=batch,
        # Long: the test's flushes and the shutdown send, not the schedule, so the counts are deterministic.
        schedule_delay_s=60,
        shutdown_timeout_s=5,
    )


def refused_exporter() -> OTLPSpanExporter:
    """The real OTLP gRPC exporter aimed at a closed port, with a deadline too short for a retry."""
    return OTLPSpanExporter(endpoint=f"127.0.0.1:{free_port()}", insecure=True, timeout=0.2)


operations = st.lists(st.one_of(st.integers(min_value=1, max_value=16), st.just("flush")), max_size=12)


@settings(deadline=None)
@given(
    operations=operations,
    queue=st.integers(min_value=1, max_value=8),
    batch=st.integers(min_value=1, max_value=8),
    delivering=st.booleans(),
)
def test_every_span_handed_over_is_counted_once(
    operations: list[int | str], queue: int, batch: int, delivering: bool
) -> None:
    registry = Registry()
    memory = InMemorySpanExporter()
    spans_processor = processor(memory if delivering else refused_exporter(), queue, batch, registry)
    handed = 0
    try:
        for operation in operations:
            if operation == "flush":
                spans_processor.force_flush(10_000)
                totals = spans_processor.totals()
                # After a flush nothing is queued: every span so far is settled.
                assert totals.unaccounted == 0
                continue
            assert isinstance(operation, int)
            spans = [SPANS[index % len(SPANS)] for index in range(operation)]
            if operation % 2:  # one at a time, as the SDK hands spans over
                for span in spans:
                    spans_processor.on_end(span)
            else:  # a CallBatch's spans at once, as the enricher does
                spans_processor.hand_over(spans)
            handed += operation
            totals = spans_processor.totals()
            assert totals.handed == handed
            assert 0 <= totals.unaccounted <= queue
    finally:
        spans_processor.shutdown()
    totals = spans_processor.totals()
    assert totals.handed == handed
    assert totals.unaccounted == 0
    if delivering:
        assert totals.failed == 0
        assert totals.exported == len(memory.get_finished_spans())
    else:
        assert totals.exported == 0
    # The registry (what /metrics shows) says the same as the processor.
    assert SpanCounters.of(registry).totals() == totals


def test_a_hand_over_larger_than_the_room_keeps_the_oldest_and_counts_the_rest() -> None:
    registry = Registry()
    memory = InMemorySpanExporter()
    spans_processor = processor(memory, queue=5, batch=5, registry=registry)
    spans_processor.hand_over(SPANS[:3])
    spans_processor.hand_over(SPANS[3:9])  # room for 2 of these 6, unless the thread sent a batch already
    spans_processor.shutdown()
    totals = spans_processor.totals()
    assert totals.handed == 9
    assert totals.exported + totals.dropped_queue_full == 9
    exported_ids = [span.context.span_id for span in memory.get_finished_spans()]
    assert exported_ids == [span.context.span_id for span in SPANS[: totals.exported]]


def test_a_full_queue_drops_the_new_span_and_counts_it() -> None:
    registry = Registry()
    memory = InMemorySpanExporter()
    spans_processor = processor(memory, queue=4, batch=4, registry=registry)
    for span in SPANS[:6]:
        spans_processor.on_end(span)
    # A full batch wakes the export thread: the first four are sent or still queued, never dropped.
    spans_processor.shutdown()
    totals = spans_processor.totals()
    assert totals.handed == 6
    assert totals.exported + totals.dropped_queue_full == 6
    assert [span.context.span_id for span in memory.get_finished_spans()][:4] == [
        span.context.span_id for span in SPANS[:4]
    ]


def test_spans_after_shutdown_are_dropped_as_shutdown() -> None:
    registry = Registry()
    spans_processor = processor(InMemorySpanExporter(), queue=8, batch=8, registry=registry)
    spans_processor.on_end(SPANS[0])
    spans_processor.shutdown()
    spans_processor.on_end(SPANS[1])
    assert spans_processor.totals() == SpanTotals(handed=2, exported=1, dropped_shutdown=1)
    rendered = registry.render()
    assert 'trawl_enricher_spans_dropped_total{reason="shutdown"} 1' in rendered
    assert 'trawl_enricher_spans_dropped_total{reason="queue_full"} 0' in rendered
    assert "trawl_enricher_spans_failed_total 0" in rendered


def test_a_refused_export_is_failed_not_exported() -> None:
    registry = Registry()
    spans_processor = processor(refused_exporter(), queue=8, batch=8, registry=registry)
    for span in SPANS[:3]:
        spans_processor.on_end(span)
    assert not spans_processor.force_flush(10_000)
    assert spans_processor.totals() == SpanTotals(handed=3, failed=3)
    spans_processor.shutdown()
    assert spans_processor.totals() == SpanTotals(handed=3, failed=3)


@given(st.dictionaries(st.text(max_size=20), st.one_of(st.integers(), st.text(max_size=5), st.none(), st.booleans())))
def test_totals_from_a_log_event_are_counts_or_a_clear_error(fields: dict[str, object]) -> None:
    names = ("handed", "exported", "dropped_queue_full", "dropped_shutdown", "failed")
    values = [fields.get(name) for name in names]
    counts = all(isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in values)
    if not counts:
        with pytest.raises(ValueError, match=r"span_export_totals: .* not a count"):
            SpanTotals.from_log_fields(fields)
        return
    assert SpanTotals.from_log_fields(fields).log_fields() == {name: fields[name] for name in names}


def test_totals_line() -> None:
    totals = SpanTotals(handed=20000, exported=16380, dropped_queue_full=3600, dropped_shutdown=20, failed=0)
    assert totals.line() == "spans: 20000 handed, 16380 exported, 3620 dropped (3600 queue full, 20 shutdown), 0 failed"
    assert SpanTotals.from_log_fields(totals.log_fields()) == totals
