"""The enricher without a bus: identity in, spans and RED metrics out.

`Enricher` is what the service's `main` drives per CallBatch and what `trawl analyze` calls
in-process (`build_enricher`). Span export is asynchronous (the batching thread of
trawl.enricher.otlp); metric export and `flush`/`shutdown` block, so async callers run them in a thread.

Per call, with no identity snapshot and no OTLP endpoint, enrichment is naming both endpoints
by their address (about 0.3 us); with a snapshot, a compiled lookup per endpoint (see
identity.py). `enrich_calls` moves the counters once per batch. The OpenTelemetry SDK is
imported only when an endpoint is configured (trawl.enricher.otlp, .red, .spans).

`enrich_encoded` does the same on serialized calls without making objects of them (what
`trawl analyze --json` prints from): the compiled splicer (trawl._calljson.Splicer) rewrites
each call's src and dst with the identity fields `IdentityMap.describe_address` answered for
that address, once per address; the bytes are those of the enriched object serialized.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING

from trawl.enricher.config import EnricherSettings
from trawl.enricher.identity import AddressPlan, IdentityMap
from trawl.logs import get_logger
from trawl.metrics import Registry
from trawl.v1.calls_pb2 import ApiCall, CallBatch

try:
    from trawl._calljson import Splicer
except ImportError:  # not compiled: serialized calls are enriched as objects
    Splicer = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricExporter
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

    from trawl.enricher.k8s_watch import KubeWatcher
    from trawl.enricher.otlp import CountingBatchSpanProcessor
    from trawl.enricher.red import RedMetrics
    from trawl.enricher.red_wire import WireRedMetrics
    from trawl.enricher.routes import RouteLearner
    from trawl.enricher.wire_export import WireSpanPath

log = get_logger(__name__)

# ApiCall.protocol (field 2, length 3) "dns", within a serialized call's first bytes (after the id).
_DNS_PROTOCOL = b"\x12\x03dns"

# The splicer's own bound on the addresses it keeps (Splicer's max_addresses default).
SPLICER_ADDRESSES = 65_536

_protocol_of = attrgetter("protocol")


def span_exporter_for(settings: EnricherSettings) -> SpanExporter | None:
    """The OTLP span exporter the settings ask for, or None when no endpoint is configured."""
    target = settings.traces_target()
    if target is None:
        return None
    if settings.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

        return HttpSpanExporter(
            endpoint=target.http_url("traces"), headers=settings.headers, timeout=settings.otlp_timeout_s
        )
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

    return GrpcSpanExporter(
        endpoint=target.endpoint,
        insecure=settings.grpc_insecure(target.endpoint),
        headers=settings.headers,
        timeout=settings.otlp_timeout_s,
    )


def metric_exporter_for(settings: EnricherSettings) -> MetricExporter | None:
    """The OTLP metric exporter the settings ask for, or None when no endpoint is configured."""
    target = settings.metrics_target()
    if target is None:
        return None
    if settings.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter

        return HttpMetricExporter(
            endpoint=target.http_url("metrics"), headers=settings.headers, timeout=settings.otlp_timeout_s
        )
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter

    return GrpcMetricExporter(
        endpoint=target.endpoint,
        insecure=settings.grpc_insecure(target.endpoint),
        headers=settings.headers,
        timeout=settings.otlp_timeout_s,
    )


class NoMetricExport:
    """`Enricher.red` when no metrics endpoint is configured: records and exports nothing, and
    keeps the OpenTelemetry metrics SDK unimported."""

    exporter: None = None
    resources = 0

    def export(self, timeout_s: float = 10.0) -> bool:
        return True

    def shutdown(self) -> None:
        return None


class Enricher:
    """Identity for each call's two endpoints, then a CLIENT+SERVER span pair and RED metrics."""

    def __init__(
        self,
        settings: EnricherSettings,
        identity: IdentityMap,
        span_exporter: SpanExporter | None = None,
        metric_exporter: MetricExporter | None = None,
        metrics: Registry | None = None,
        span_path: WireSpanPath | None = None,
        red_metrics: WireRedMetrics | None = None,
        routes: RouteLearner | None = None,
    ) -> None:
        self.settings = settings
        # http.route of HTTP calls (trawl.enricher.routes), set after identity (it keys on the
        # destination service); None: routes off.
        self.routes = routes
        self.identity = identity
        self.metrics = metrics if metrics is not None else Registry()
        self._calls = self.metrics.counter("trawl_enricher_calls_total", "Calls enriched, by protocol")
        self._unknown = self.metrics.counter(
            "trawl_enricher_unknown_peers_total", "Call endpoints with no Kubernetes identity, by side"
        )
        self._failures = self.metrics.counter(
            "trawl_enricher_call_failures_total", "Calls that could not be enriched or turned into spans, by stage"
        )
        # The splicer of `identity` (rebuilt when the map is replaced, or when an address it
        # described has changed since: a live map): it keeps the map's answers.
        self._splicer: Splicer | None = None
        self._splicer_identity: IdentityMap | None = None
        self._splicer_generation = 0
        self._described: set[str] = set()
        # Counts every span it is handed as exported, dropped or failed (trawl.enricher.span_totals).
        self._processor: CountingBatchSpanProcessor | None = None
        # The compiled span path (trawl.enricher.wire_export), when it replaces the processor:
        # the same counters, the calls handed over as bytes.
        self._wire = span_path
        if span_exporter is not None:
            from trawl.enricher.otlp import span_processor

            self._processor = span_processor(span_exporter, settings, self.metrics)
        self.red: RedMetrics | WireRedMetrics | NoMetricExport = NoMetricExport()
        # The aggregated RED path (trawl.enricher.red_wire) takes a batch at once, not a call.
        self._aggregated = red_metrics
        if red_metrics is not None:
            self.red = red_metrics
        elif metric_exporter is not None:
            from trawl.enricher.red import RedMetrics

            self.red = RedMetrics(metric_exporter, settings.max_metric_resources, self.metrics)

    @property
    def exporting(self) -> bool:
        return self._processor is not None or self._wire is not None

    @property
    def exports_calls(self) -> bool:
        """Whether `export` does anything (spans or RED metrics are configured): it needs objects."""
        return self._processor is not None or self._wire is not None or self.red.exporter is not None

    def enrich(self, call: ApiCall) -> ApiCall:
        """Fill src/dst identity in place (and return the call); a call that cannot be enriched
        goes on with what it has (counted and logged), it is never dropped."""
        self.enrich_calls((call,))
        return call

    def enrich_calls(self, calls: Sequence[ApiCall]) -> Sequence[ApiCall]:
        """`enrich` a batch (in place; returns `calls`): the identity map's batch walk, and the
        counters moved once per batch rather than once per call."""
        if not calls:
            return calls
        try:
            unknown_sources, unknown_destinations = self.identity.enrich_calls(calls)
        except Exception:  # one odd call must not stop the stream: find it, enrich the others
            unknown_sources, unknown_destinations = self._enrich_one_by_one(calls)
        self._note_dns(call for call in calls if call.protocol == "dns")
        if self.routes is not None:
            self._set_routes(calls)
        if len(calls) == 1:
            self._calls.inc(protocol=calls[0].protocol or "unknown")
        else:
            for protocol, count in Counter(map(_protocol_of, calls)).items():
                self._calls.inc(count, protocol=protocol or "unknown")
        if unknown_sources:
            self._unknown.inc(unknown_sources, side="src")
        if unknown_destinations:
            self._unknown.inc(unknown_destinations, side="dst")
        return calls

    def enrich_encoded(self, calls: Sequence[bytes]) -> list[bytes]:
        """`enrich_calls` on serialized calls: returns them enriched, as the objects would
        serialize, counted the same way. Calls the splicer does not cover (endpoints already
        holding identity fields, src or dst absent) and every call when the splicer is not
        compiled or fails are enriched as objects."""
        if not calls:
            return []
        splicer = self._splicer
        identity = self.identity
        if splicer is None or self._splicer_identity is not identity or self._stale(identity):
            if Splicer is None:
                return self._enrich_as_objects(calls)
            splicer = self._splicer = self._new_splicer(identity)
        try:
            enriched, unknown_sources, unknown_destinations, protocols, odd = splicer.enrich(calls)
        except Exception as exc:  # a bug on the compiled side must not lose the batch
            log.warning("splice_failed", calls=len(calls), error=repr(exc))
            return self._enrich_as_objects(calls)
        if odd:
            objects = [ApiCall.FromString(enriched[index]) for index in odd]
            self.enrich_calls(objects)
            for index, call in zip(odd, objects, strict=True):
                enriched[index] = call.SerializeToString()
        if b"dns" in protocols:  # their answers name addresses (the splicer counted them: no scan otherwise)
            self._note_dns(ApiCall.FromString(call) for call in enriched if _DNS_PROTOCOL in call[:64])
        if self.routes is not None:
            self.routes.after_batch()  # the splicer set the routes (calling routes.route_encoded)
        for protocol, count in protocols.items():
            self._calls.inc(count, protocol=protocol.decode("utf-8", "replace") or "unknown")
        if unknown_sources:
            self._unknown.inc(unknown_sources, side="src")
        if unknown_destinations:
            self._unknown.inc(unknown_destinations, side="dst")
        return enriched

    def _new_splicer(self, identity: IdentityMap) -> Splicer:
        """A splicer asking `identity`, which notes every address it describes (see `_stale`)."""
        described = self._described = set()
        describe_address = identity.describe_address

        def describe(ip: str) -> AddressPlan:
            described.add(ip)
            return describe_address(ip)

        self._splicer_identity = identity
        self._splicer_generation = identity.generation
        return Splicer(describe, route=self.routes.route_encoded if self.routes is not None else None)

    def _stale(self, identity: IdentityMap) -> bool:
        """Whether the splicer may hold an answer the (live) map has changed since: an address it
        described changed. Changes to addresses it never asked about keep it (and its cache)."""
        if len(self._described) > SPLICER_ADDRESSES:
            return True  # the splicer emptied its cache by now; a new one starts a new record
        generation = identity.generation
        if generation == self._splicer_generation:
            return False
        changed = identity.changed_since(self._splicer_generation)
        if changed is None or not changed.isdisjoint(self._described):
            return True
        self._splicer_generation = generation
        return False

    def _set_routes(self, calls: Sequence[ApiCall]) -> None:
        assert self.routes is not None
        try:
            self.routes.apply(calls)
        except Exception as exc:  # a route is a bonus: never lose the batch over it
            self._failures.inc(stage="routes")
            log.warning("routes_failed", calls=len(calls), error=repr(exc))

    def _note_dns(self, calls: Iterable[ApiCall]) -> None:
        """Names from the DNS answers of a batch, for the calls after it (IdentityMap.note_dns)."""
        identity = self.identity
        for call in calls:
            try:
                identity.note_dns(call)
            except Exception as exc:  # naming is a bonus: never lose the batch over it
                self._failures.inc(stage="dns_names")
                log.warning("dns_names_failed", call_id=call.id, error=repr(exc))

    def _enrich_as_objects(self, calls: Sequence[bytes]) -> list[bytes]:
        objects = [ApiCall.FromString(call) for call in calls]
        self.enrich_calls(objects)
        return [call.SerializeToString() for call in objects]

    def _enrich_one_by_one(self, calls: Sequence[ApiCall]) -> tuple[int, int]:
        unknown_sources = unknown_destinations = 0
        for call in calls:
            try:
                sources, destinations = self.identity.enrich_calls((call,))
            except Exception as exc:
                self._failures.inc(stage="identity")
                log.warning("enrich_failed", call_id=call.id, error=repr(exc))
                sources = destinations = 1
            unknown_sources += sources
            unknown_destinations += destinations
        return unknown_sources, unknown_destinations

    def export(self, calls: Iterable[ApiCall]) -> None:
        """Queue each enriched call's spans and record its RED metrics; returns without waiting for the network."""
        if self._wire is not None or self._aggregated is not None:
            calls = calls if isinstance(calls, Sequence) else list(calls)
        if self._wire is not None:
            self._wire.hand_over_calls([call.SerializeToString() for call in calls if call.request.ts])
        self._export_objects(calls)

    def export_encoded(self, calls: Sequence[bytes]) -> None:
        """`export` of serialized enriched calls: the compiled span path takes the bytes as they
        are; objects are made only for what reads fields (the RED metrics, the SDK span path)."""
        if self._wire is not None:
            self._wire.hand_over_calls(calls)
        if self._aggregated is None and self._processor is None and self.red.exporter is None:
            return
        self._export_objects(_as_objects(calls))

    def _export_objects(self, calls: Iterable[ApiCall]) -> None:
        processor = self._processor
        red = self.red
        if self._aggregated is not None:
            try:
                self._aggregated.record_calls(calls)
            except Exception as exc:  # a bug in the aggregation must not stop the stream: counted
                self._failures.inc(len(calls), stage="metrics")  # type: ignore[arg-type]
                log.warning("metrics_record_failed", calls=len(calls), error=repr(exc))  # type: ignore[arg-type]
        record_each = red.exporter is not None and self._aggregated is None
        if processor is None and not record_each:
            return  # nothing else configured: not even a walk over the calls
        from trawl.enricher.spans import call_spans, shape_call

        spans: list[ReadableSpan] = []
        for call in calls:
            if not call.request.ts:
                continue  # no time, no span: a span needs a start
            try:
                if processor is not None:
                    spans.extend(call_spans(call))
                if record_each:
                    red.record(call, shape_call(call))  # type: ignore[union-attr]
            except Exception as exc:  # one odd call must not stop the stream
                self._failures.inc(stage="export")
                log.warning("span_build_failed", call_id=call.id, error=repr(exc))
        if processor is not None:
            processor.hand_over(spans)  # one hand-over per batch: the processor counts each span

    def export_metrics(self) -> bool:
        """Push the RED histograms now (blocking)."""
        return self.red.export(self.settings.otlp_timeout_s)

    def flush(self) -> bool:
        """Send every queued span and the current metrics (blocking)."""
        spans_ok = self._processor.force_flush(int(self.settings.otlp_timeout_s * 1000)) if self._processor else True
        if self._wire is not None:
            spans_ok = self._wire.flush(self.settings.otlp_timeout_s) and spans_ok
        return self.export_metrics() and spans_ok

    def shutdown_spans(self) -> None:
        """Flush and stop the span export (blocking): after it, every span handed over is counted
        as exported, dropped or failed (trawl.enricher.span_totals)."""
        if self._processor is not None:
            self._processor.shutdown()
            self._processor = None
        if self._wire is not None:
            self._wire.shutdown()
            self._wire = None

    def shutdown(self) -> None:
        """Flush and stop the exporters (blocking); the Enricher cannot export afterwards."""
        self.shutdown_spans()
        self.red.shutdown()
        if self.routes is not None:
            self.routes.close()


def _as_objects(calls: Sequence[bytes]) -> Sequence[ApiCall]:
    """ApiCall objects of serialized calls, parsed as one CallBatch (field 4 each): one parse
    instead of one per call."""
    parts: list[bytes] = []
    for call in calls:
        parts += (b"\x22", _varint(len(call)), call)
    return CallBatch.FromString(b"".join(parts)).calls


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def load_identity(settings: EnricherSettings) -> IdentityMap:
    if settings.identity_snapshot is None:
        return IdentityMap.empty(settings.cluster)
    identity = IdentityMap.from_snapshot(settings.identity_snapshot, settings.cluster)
    log.info("identity_loaded", snapshot=str(settings.identity_snapshot), claims=len(identity))
    return identity


def start_kube_watch(settings: EnricherSettings, identity: IdentityMap, metrics: Registry) -> KubeWatcher | None:
    """The Kubernetes watch feeding `identity`, started, when the settings ask for one (None
    otherwise). Raises ConfigError when no Kubernetes client configuration can be found."""
    if not settings.kube_watch:
        return None
    from trawl.enricher.cluster import ClusterHistory
    from trawl.enricher.k8s_watch import KubeWatcher, kube_api_client

    history = ClusterHistory(identity, settings.cluster, max_closed_claims=settings.max_history_claims)
    watcher = KubeWatcher(
        history,
        kube_api_client(settings.kubeconfig),
        metrics,
        watch_timeout_s=settings.kube_watch_timeout_s,
        request_timeout_s=settings.kube_request_timeout_s,
        backoff_max_s=settings.kube_backoff_max_s,
    )
    log.info("kube_watch_starting", server=watcher.server, kubeconfig=str(settings.kubeconfig or ""))
    return watcher.start()


def red_metrics_for(settings: EnricherSettings, metrics: Registry) -> WireRedMetrics | None:
    """The aggregated RED path (trawl.enricher.red_wire) when the settings ask for it and a
    metrics endpoint is configured; None otherwise (then `metric_exporter_for`, the SDK path)."""
    if settings.metrics_path != "aggregated" or settings.metrics_target() is None:
        return None
    from trawl.enricher.red_wire import WireRedMetrics

    return WireRedMetrics.from_settings(settings, metrics, os.environ)


def route_learner_for(settings: EnricherSettings, metrics: Registry) -> RouteLearner | None:
    """The `http.route` learner the settings ask for (None: routes off); ConfigError for a bad
    OpenAPI document. Imported only then."""
    if not settings.routes.active:
        return None
    from trawl.enricher.routes import RouteLearner

    return RouteLearner.from_settings(settings.routes, metrics, settings.identity_redis_url)


def enricher_from_settings(settings: EnricherSettings, metrics: Registry | None = None) -> Enricher:
    metrics = metrics if metrics is not None else Registry()
    routes = route_learner_for(settings, metrics)  # first: a bad OpenAPI document stops the start before any export
    wire = None
    if settings.span_path == "compiled" and settings.traces_target() is not None:
        # Imported only with an endpoint: an enricher without one starts without the OTLP packages.
        from trawl.enricher.wire_export import WireSpanPath

        # None: not built, or no endpoint.
        wire = WireSpanPath.from_settings(settings, metrics, os.environ, wait_for_room=settings.export_wait_for_room)
    span_exporter = span_exporter_for(settings) if wire is None else None
    red = red_metrics_for(settings, metrics)
    metric_exporter = metric_exporter_for(settings) if red is None else None
    return Enricher(
        settings,
        load_identity(settings),
        span_exporter,
        metric_exporter,
        metrics,
        span_path=wire,
        red_metrics=red,
        routes=routes,
    )


def build_enricher(
    source: EnricherSettings | Path | None = None,
    otlp_endpoint: str | None = None,
    *,
    cluster: str | None = None,
    config_file: Path | None = None,
    metrics: Registry | None = None,
) -> Enricher:
    """The enricher `trawl analyze` runs in-process.

    `source` is either loaded settings, or the identity snapshot path (None: no identity), in
    which case settings come from `config_file` and the environment (TRAWL_ENRICHER_*,
    OTEL_EXPORTER_OTLP_*). `otlp_endpoint` and `cluster`, when given, override either way.
    Raises InputError for a bad snapshot and ConfigError for bad settings."""
    if isinstance(source, EnricherSettings):
        updates = {key: value for key, value in (("otlp_endpoint", otlp_endpoint), ("cluster", cluster)) if value}
        settings = source.model_copy(update=updates)
    else:
        settings = EnricherSettings.load(
            config_file, identity_snapshot=source, otlp_endpoint=otlp_endpoint, cluster=cluster
        )
    return enricher_from_settings(settings, metrics)
