"""`trawl analyze FILE`: the collector's file reader, the dissector and the enricher wired in
one process (no bus), so a capture is analysed as fast as the dissector goes. The services'
own classes do the work: what this prints is what the suite would publish.

Everything around the dissector costs little per packet and per call: the file is read in
whole batches of records (`CaptureFile.batches`); with `--json` the calls stay serialized
from the dissector (`Dissector.feed_encoded`: the compiled lane's calls never become Python
objects) through enrichment (`Enricher.enrich_encoded`, spliced in C) to the NDJSON, written by
one compiled call and one write per batch (`JsonLinesWriter`). The table and the RED metrics of
OTLP export (`--otlp-endpoint`, or an endpoint in the config) read fields of each call, so they
take the calls as objects (`Dissector.feed`, `Enricher.enrich_calls`); the NDJSON is the same
bytes either way (tests/unit/test_analyze_encoded.py).

Spans take the compiled path when it is built (trawl.enricher.wire_export.WireSpanPath: the
enriched calls' bytes straight to OTLP request bytes, no SDK span objects), else the SDK path
of the Enricher; both count every span in the same counters, printed as one line at the end.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from trawl.collector.replay import CaptureFile
from trawl.dissector.config import DissectorSettings
from trawl.dissector.engine import Dissector
from trawl.enricher.config import EnricherSettings
from trawl.enricher.logic import (
    Enricher,
    build_enricher,
    load_identity,
    metric_exporter_for,
    red_metrics_for,
    route_learner_for,
)
from trawl.enricher.span_totals import SpanCounters
from trawl.errors import InputError
from trawl.logs import configure_logging, get_logger
from trawl.metrics import Registry
from trawl.render import JsonLinesWriter, TableWriter, calls_to_json_lines
from trawl.v1.calls_pb2 import ApiCall
from trawl.v1.packets_pb2 import PacketBatch

if TYPE_CHECKING:
    from trawl.enricher.wire_export import WireSpanPath

log = get_logger(__name__)

# PacketBatch limits for the in-process dissector: smaller than the collector's defaults (4096
# packets, 1 MiB), since batches that stay in the CPU caches dissect about 30% faster here.
BATCH_MAX_PACKETS = 1024
BATCH_MAX_BYTES = 256 << 10


class _Output:
    def __init__(self, as_json: bool, enricher: Enricher) -> None:
        self.as_json = as_json
        self.enricher = enricher
        # The compiled span path, when it sends the spans (set by `analyze`).
        self.spans: WireSpanPath | None = None
        # Serialized calls end to end when nothing needs their fields as objects.
        self.encoded = as_json and not enricher.exports_calls
        self.table = TableWriter(sys.stdout)
        # NDJSON is ASCII: it goes to the binary stream under stdout, when there is one.
        binary: BinaryIO | None = getattr(sys.stdout, "buffer", None)
        self.lines = JsonLinesWriter(binary) if binary is not None else None
        self.count = 0

    def feed(self, dissector: Dissector, batch: PacketBatch) -> None:
        if self.encoded:
            self.emit_encoded(dissector.feed_encoded(batch))
        else:
            self.emit(dissector.feed(batch))

    def finish(self, dissector: Dissector) -> None:
        if self.encoded:
            self.emit_encoded(dissector.finish_encoded())
        else:
            self.emit(dissector.finish())

    def emit(self, calls: Sequence[ApiCall]) -> None:
        if not calls:
            return
        enriched = self.enricher.enrich_calls(calls)
        self.enricher.export(enriched)
        if self.spans is not None:
            self.spans.hand_over_calls([call.SerializeToString() for call in enriched])
        self.count += len(enriched)
        if self.as_json:
            self._write_lines(enriched)
        else:
            for call in enriched:
                self.table.write(call)

    def emit_encoded(self, calls: list[bytes]) -> None:
        if not calls:
            return
        enriched = self.enricher.enrich_encoded(calls)
        if self.spans is not None:
            self.spans.hand_over_calls(enriched)
        self.count += len(enriched)
        self._write_lines(enriched)

    def _write_lines(self, calls: Sequence[ApiCall | bytes]) -> None:
        if self.lines is not None:
            self.lines.write(calls)
        else:
            sys.stdout.write(calls_to_json_lines(calls).decode("ascii"))


def analyze(
    path: Path,
    identity: Path | None = None,
    as_json: bool = False,
    otlp_endpoint: str | None = None,
    config_file: Path | None = None,
    node: str | None = None,
    proto_descriptors: Sequence[Path] = (),
) -> int:
    """Print the calls of a capture; returns the exit code (2 if the file is damaged, after
    printing every call found before the damage)."""
    dissector_settings = DissectorSettings.load(config_file, node=node)
    if proto_descriptors:
        dissector_settings.proto_descriptors = [*dissector_settings.proto_descriptors, *proto_descriptors]
    enricher_settings = EnricherSettings.load(
        config_file, node=node, identity_snapshot=identity, otlp_endpoint=otlp_endpoint
    )
    # stdout carries the calls; stderr stays quiet (warnings and the error line) unless asked.
    explicit = "log_level" in dissector_settings.model_fields_set
    configure_logging(dissector_settings.log_level if explicit else "warning", dissector_settings.log_format)
    capture = CaptureFile(path)
    metrics = Registry()
    spans: WireSpanPath | None = None
    if enricher_settings.traces_target() is not None:
        # Imported only to export: the OpenTelemetry packages cost start-up that a plain
        # `trawl analyze` skips (tests/unit/test_enricher_batch.py holds it to that).
        from trawl.enricher.wire_export import WireSpanPath

        # A file can wait for the backend: spans are dropped only when it fails, not because the
        # file is read faster than a healthy backend takes them.
        spans = WireSpanPath.from_settings(enricher_settings, metrics, os.environ, wait_for_room=True)
    if spans is None:
        enricher = build_enricher(enricher_settings, metrics=metrics)
    else:  # the Enricher without its SDK span exporter: the compiled path sends the spans
        red = red_metrics_for(enricher_settings, metrics)  # RED metrics aggregated, when a metrics endpoint is set
        enricher = Enricher(
            enricher_settings,
            load_identity(enricher_settings),
            None,
            metric_exporter_for(enricher_settings) if red is None else None,
            metrics,
            red_metrics=red,
            routes=route_learner_for(enricher_settings, metrics),
        )
    node_name = dissector_settings.node
    dissector = Dissector(dissector_settings, node=node_name)
    output = _Output(as_json, enricher)
    output.spans = spans
    sys.stdout.flush()  # what the text layer holds goes before the binary writes
    # The objects of start-up (modules, settings, schemas) live as long as the process: out of the
    # cyclic collector's walks, which otherwise cost about 5% of a large capture's time.
    gc.freeze()
    # Each batch allocates thousands of short-lived tuples and bytes (no cycles among them); at
    # the default threshold of 700 allocations the young-generation walks cost about 7% here.
    gc.set_threshold(100_000, 50, 100)
    source = f"file:{path}"
    damage: InputError | None = None
    packets = 0
    sequence = 0
    last_link_type = 0
    try:
        for batch in capture.batches(BATCH_MAX_PACKETS, BATCH_MAX_BYTES):
            sequence += 1
            packets += batch.packet_count
            last_link_type = batch.link_type
            output.feed(dissector, batch.message(node=node_name, shard=0, sequence=sequence, source=source))
    except InputError as exc:
        damage = exc
    end = PacketBatch(
        node=node_name, shard=0, sequence=sequence + 1, link_type=last_link_type, source=source, end_of_input=True
    )
    output.feed(dissector, end)
    output.finish(dissector)
    exporting = enricher.exporting or spans is not None
    enricher.shutdown()
    if spans is not None:
        spans.shutdown()
    sys.stdout.flush()
    if exporting:
        # What became of every span: exported, dropped or failed (the shutdown settled them all).
        totals = SpanCounters.of(enricher.metrics).totals()
        print(totals.line(), file=sys.stderr)  # noqa: T201 - the summary line a user reads
    log.info("analyze_done", file=str(path), packets=packets, calls=output.count)
    if damage is not None:
        raise damage
    return 0
