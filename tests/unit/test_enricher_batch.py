"""The enricher's batch path (`Enricher.enrich_calls`) and what `trawl analyze` does not import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from trawl.enricher.identity import IdentityMap
from trawl.enricher.logic import Enricher, NoMetricExport, build_enricher
from trawl.v1.calls_pb2 import ApiCall

SNAPSHOT = FIXTURES / "identity_snapshot.json"
WHEN = 1_795_687_200_000_000_000  # 2026-11-26T10:00:00Z, inside the snapshot's pods' lifetimes


def call(protocol: str, src: str, dst: str, dst_port: int = 80) -> ApiCall:
    made = ApiCall(id=f"{protocol}-{src}-{dst}", protocol=protocol)
    made.src.ip, made.src.port = src, 40000
    made.dst.ip, made.dst.port = dst, dst_port
    made.request.ts = WHEN
    return made


def calls() -> list[ApiCall]:
    return [
        call("http", "10.244.1.12", "10.96.12.34"),
        call("http", "192.0.2.1", "10.96.12.34"),
        call("dns", "10.244.1.12", "192.0.2.53", 53),
        call("", "192.0.2.1", "192.0.2.2"),
    ]


def counters(enricher: Enricher) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    names = ("trawl_enricher_calls_total", "trawl_enricher_unknown_peers_total", "trawl_enricher_call_failures_total")
    return {name: dict(enricher.metrics.counter(name, "").values) for name in names}


def test_a_batch_enriches_and_counts_as_call_by_call() -> None:
    batched, single = build_enricher(SNAPSHOT), build_enricher(SNAPSHOT)
    batch = calls()
    assert batched.enrich_calls(batch) is batch
    one_by_one = [single.enrich(c) for c in calls()]
    assert batch == one_by_one
    assert counters(batched) == counters(single)
    seen = counters(batched)
    assert seen["trawl_enricher_calls_total"] == {
        (("protocol", "http"),): 2,
        (("protocol", "dns"),): 1,
        (("protocol", "unknown"),): 1,
    }
    assert seen["trawl_enricher_unknown_peers_total"] == {(("side", "src"),): 2, (("side", "dst"),): 2}
    assert batch[0].dst.namespace and batch[1].src.name == "192.0.2.1"


def test_one_odd_call_is_counted_and_the_rest_enriched(monkeypatch: pytest.MonkeyPatch) -> None:
    enricher = build_enricher(SNAPSHOT)
    real = IdentityMap.enrich_calls

    def picky(identity: IdentityMap, batch: list[ApiCall]) -> tuple[int, int]:
        if any(c.protocol == "dns" for c in batch):
            raise ValueError("odd call")
        return real(identity, batch)

    monkeypatch.setattr(IdentityMap, "enrich_calls", picky)
    batch = enricher.enrich_calls(calls())
    assert counters(enricher)["trawl_enricher_call_failures_total"] == {(("stage", "identity"),): 1}
    assert batch[0].dst.namespace and batch[3].dst.name == "192.0.2.2" and not batch[2].src.name
    assert sum(enricher.metrics.counter("trawl_enricher_calls_total", "").values.values()) == 4


def test_without_endpoints_nothing_is_exported_and_flush_is_immediate() -> None:
    enricher = build_enricher(None)
    assert isinstance(enricher.red, NoMetricExport) and not enricher.exporting
    batch = enricher.enrich_calls(calls())
    enricher.export(batch)
    assert enricher.flush() is True
    enricher.shutdown()
    assert [c.src.name for c in batch] == ["10.244.1.12", "192.0.2.1", "10.244.1.12", "192.0.2.1"]


def test_analyze_starts_without_the_otel_sdk_and_yaml(tmp_path: Path) -> None:
    """`trawl analyze FILE --json` without --otlp-endpoint or --config imports neither."""
    script = (
        "import sys, io, contextlib\n"
        "from pathlib import Path\n"
        "from trawl.analyze import analyze\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    analyze(Path({str(FIXTURES / 'http1.pcap')!r}), as_json=True)\n"
        "loaded = [m for m in sys.modules if m.startswith(('opentelemetry', 'yaml', 'trawl.enricher.spans'))]\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert result.stdout.strip() == ""
