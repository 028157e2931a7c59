"""`trawl analyze FILE`: the collector's file reader, the dissector and the enricher wired in
one process (no bus), so a capture is analysed as fast as the dissector goes. The services'
own classes do the work: what this prints is what the suite would publish."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from trawl.collector.batching import ShardBatcher
from trawl.collector.replay import CaptureFile
from trawl.dissector.config import DissectorSettings
from trawl.dissector.engine import Dissector
from trawl.enricher.config import EnricherSettings
from trawl.enricher.logic import Enricher, build_enricher
from trawl.errors import InputError
from trawl.logs import configure_logging, get_logger
from trawl.render import TableWriter, call_to_json
from trawl.v1.calls_pb2 import ApiCall

log = get_logger(__name__)


class _Output:
    def __init__(self, as_json: bool, enricher: Enricher) -> None:
        self.as_json = as_json
        self.enricher = enricher
        self.table = TableWriter(sys.stdout)
        self.count = 0

    def emit(self, calls: Iterable[ApiCall]) -> None:
        enriched = [self.enricher.enrich(call) for call in calls]
        if not enriched:
            return
        self.enricher.export(enriched)
        self.count += len(enriched)
        if self.as_json:
            sys.stdout.write("".join(call_to_json(call) + "\n" for call in enriched))
        else:
            for call in enriched:
                self.table.write(call)


def analyze(
    path: Path,
    identity: Path | None = None,
    as_json: bool = False,
    otlp_endpoint: str | None = None,
    config_file: Path | None = None,
    node: str | None = None,
) -> int:
    """Print the calls of a capture; returns the exit code (2 if the file is damaged, after
    printing every call found before the damage)."""
    dissector_settings = DissectorSettings.load(config_file, node=node)
    enricher_settings = EnricherSettings.load(
        config_file, node=node, identity_snapshot=identity, otlp_endpoint=otlp_endpoint
    )
    # stdout carries the calls; stderr stays quiet (warnings and the error line) unless asked.
    explicit = "log_level" in dissector_settings.model_fields_set
    configure_logging(dissector_settings.log_level if explicit else "warning", dissector_settings.log_format)
    capture = CaptureFile(path)
    enricher = build_enricher(enricher_settings)
    dissector = Dissector(dissector_settings, node=dissector_settings.node)
    output = _Output(as_json, enricher)
    batcher = ShardBatcher(
        node=dissector_settings.node,
        shard=0,
        source=f"file:{path}",
        nanosecond=capture.format == "pcapng" or capture.nanosecond,
    )
    damage: InputError | None = None
    packets = 0
    try:
        for packet in capture.packets():
            packets += 1
            for batch in batcher.add(
                packet.ts_ns, packet.data, packet.orig_len, packet.link_type, packet.snaplen, packet.interface
            ):
                output.emit(dissector.feed(batch))
    except InputError as exc:
        damage = exc
    output.emit(dissector.feed(batcher.cut(end_of_input=True)))
    output.emit(dissector.finish())
    enricher.shutdown()
    sys.stdout.flush()
    log.info("analyze_done", file=str(path), packets=packets, calls=output.count)
    if damage is not None:
        raise damage
    return 0
