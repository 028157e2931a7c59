"""The compiled span path: enriched ApiCalls as bytes -> OTLP `ExportTraceServiceRequest` bytes,
without a Python object per span (trawl/_otlpspans.c says why it is C and what it writes).

`WireSpanEncoder.encode` takes serialized calls (what `Enricher.enrich_encoded` returns) and
gives `EncodedSpans`: the request's bytes, how many spans it holds, and the calls that could
not be read. Requests are at most `max_spans` spans each (the exporter's batch size), so each is
sent as it is; protobuf's concatenation rule (repeated fields append) would also let several
be joined into one. The SDK path (spans.py `call_spans` and the SDK's encoder) stays the
reference: tests/unit/test_otlp_spans_differential.py holds the two to the same spans.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trawl.enricher.spans import SCOPE, network_type, split_host

try:
    from trawl._otlpspans import SpanEncoder
except ImportError:  # not compiled: the enricher keeps the SDK path
    SpanEncoder = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class EncodedSpans:
    """One ExportTraceServiceRequest: its bytes and span count, and the indexes (in the calls
    given) of calls that did not parse, which gave no span."""

    request: bytes
    spans: int
    unreadable: tuple[int, ...] = ()


def available() -> bool:
    """Whether the compiled encoder was built (setup.py); without it the SDK path is used."""
    return SpanEncoder is not None


class WireSpanEncoder:
    """Calls -> requests of at most `max_spans` spans (a call gives two spans; a call without a
    request time gives none). Not for two threads at once (the compiled encoder refuses)."""

    def __init__(self, max_spans: int = 512) -> None:
        if SpanEncoder is None:
            raise RuntimeError("trawl._otlpspans is not compiled (pip install -e . builds it)")
        if max_spans < 2:
            raise ValueError("max_spans must be at least 2 (one call's pair)")
        self.calls_per_request = max_spans // 2
        self._encoder = SpanEncoder(SCOPE.name, SCOPE.version or "", split_host, network_type)

    def encode(self, calls: Sequence[bytes]) -> list[EncodedSpans]:
        requests: list[EncodedSpans] = []
        step = self.calls_per_request
        for start in range(0, len(calls), step):
            chunk = calls[start : start + step]
            request, spans, unreadable = self._encoder.encode(chunk)
            requests.append(EncodedSpans(request, spans, tuple(start + index for index in unreadable)))
        return requests
