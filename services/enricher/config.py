"""Enricher settings: where identities come from, where spans and metrics go, how calls are consumed.

The OTLP keys follow the OpenTelemetry SDK environment conventions: when `otlp_endpoint`,
`otlp_protocol` or `otlp_headers` are not set here, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` /
`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL` and `OTEL_EXPORTER_OTLP_HEADERS`
are used. No endpoint anywhere means no export (the enricher still publishes enriched calls).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from trawl.config import ServiceSettings
from trawl.errors import ConfigError

OtlpProtocol = Literal["grpc", "http/protobuf"]
OTLP_PROTOCOLS: tuple[OtlpProtocol, ...] = ("grpc", "http/protobuf")

ENV_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENV_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
ENV_METRICS_ENDPOINT = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
ENV_PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
ENV_HEADERS = "OTEL_EXPORTER_OTLP_HEADERS"


def parse_otlp_headers(text: str, source: str) -> dict[str, str]:
    """The OTLP exporter header list `k=v,k2=v2` (values percent-encoded, per the OTel spec)."""
    headers: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"{source}: expected 'name=value' pairs separated by commas, got {item.strip()!r}")
        headers[unquote(name.strip()).lower()] = unquote(value.strip())
    return headers


class OtlpTarget:
    """Where one signal goes: a full URL for OTLP/HTTP, `host:port` or a URL for gRPC."""

    def __init__(self, endpoint: str, is_signal_specific: bool) -> None:
        self.endpoint = endpoint
        # A signal-specific endpoint (…_TRACES_ENDPOINT) is used as is; a base endpoint gets
        # /v1/traces or /v1/metrics appended for OTLP/HTTP, as the OTel spec says.
        self.is_signal_specific = is_signal_specific

    def http_url(self, signal: Literal["traces", "metrics"]) -> str:
        if self.is_signal_specific:
            return self.endpoint
        return self.endpoint.rstrip("/") + f"/v1/{signal}"


class OpenApiSource(BaseModel):
    """One OpenAPI document and the service it describes."""

    model_config = ConfigDict(extra="forbid")

    # Matched against the call's destination service, workload, pod or name, or its Host header.
    service: str = Field(min_length=1)
    # Only calls to this namespace (None: any).
    namespace: str | None = None
    # A file (relative to the working directory) or an http(s) URL; YAML or JSON, OpenAPI 3.x or Swagger 2.0.
    source: str = Field(min_length=1)


class RouteSettings(BaseModel):
    """`http.route` of HTTP calls (trawl.enricher.routes): from OpenAPI documents, else learned."""

    model_config = ConfigDict(extra="forbid")

    # Routes for every HTTP call (the default: what bounds the spans' and metrics' series); off,
    # calls keep the route the dissector gave (none today) and spans and metrics template the
    # path. Giving OpenAPI documents turns it on whatever this says.
    enabled: bool = True
    openapi: list[OpenApiSource] = Field(default_factory=list)
    # A path position becomes {param} once it has seen more distinct segments than this.
    collapse_after: int = Field(default=32, ge=1)
    # Past it a service's new routes are /{overflow} (trawl_enricher_routes_overflow_total).
    max_routes_per_service: int = Field(default=500, gt=0)
    # Services learned apart; the calls of later ones share one trie ("*").
    max_services: int = Field(default=1000, gt=0)
    max_segments: int = Field(default=16, gt=0)
    # Learned routes shared by replicas and kept over restarts; None: identity_redis_url when set.
    redis_url: str | None = None
    redis_prefix: str = Field(default="trawl:routes:v1", min_length=1)
    sync_interval_s: float = Field(default=5.0, gt=0)
    # How long fetching an OpenAPI document from a URL may take at start.
    fetch_timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        if url is not None and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("expected a redis://, rediss:// or unix:// URL")
        return url

    @property
    def active(self) -> bool:
        return self.enabled or bool(self.openapi)


class EnricherSettings(ServiceSettings):
    service_name: ClassVar[str] = "enricher"
    model_config = SettingsConfigDict(env_prefix="TRAWL_ENRICHER_")

    # `kubectl get pods,services,nodes -A -o json` output; None = no Kubernetes identity (peers named by IP).
    identity_snapshot: Path | None = None
    # The cluster name written into every identity and span resource (k8s.cluster.name).
    cluster: str = ""
    # Watch the Kubernetes API for identities (trawl.enricher.k8s_watch): pods, services,
    # endpointslices, nodes, replicasets, jobs; get/list/watch RBAC (deploy/base/enricher.yaml).
    # With a snapshot too, the snapshot's claims are the history the watch goes on from.
    kube_watch: bool = False
    # A kubeconfig file; None: in a pod its service account, else KUBECONFIG or ~/.kube/config.
    kubeconfig: Path | None = None
    # How long the enricher waits for the first lists before consuming calls (it goes on
    # without them, enriching what it knows, when the API server is away).
    kube_sync_wait_s: float = Field(default=30.0, ge=0)
    kube_watch_timeout_s: int = Field(default=300, gt=0)
    kube_request_timeout_s: float = Field(default=30.0, gt=0)
    kube_backoff_max_s: float = Field(default=30.0, gt=0)
    # Ended IP claims kept (pod churn history); the oldest ended are forgotten past it.
    max_history_claims: int = Field(default=1_000_000, gt=0)
    # Identity shared between replicas through Redis (trawl.enricher.shared): one replica,
    # elected through a coordination.k8s.io Lease, watches and writes; the others read. None:
    # every replica keeps its own (in-process). The Lease needs get/create/update on leases.
    identity_redis_url: str | None = None
    lease_namespace: str = ""  # "": the pod's own namespace (POD_NAMESPACE, the service account's)
    lease_name: str = Field(default="trawl-enricher", min_length=1)
    lease_holder: str = ""  # "": the pod's name and the process id
    lease_duration_s: float = Field(default=15.0, gt=0)
    lease_renew_s: float = Field(default=5.0, gt=0)

    # OTLP export; None falls back to the OTEL_EXPORTER_OTLP_* environment (see module docstring).
    otlp_endpoint: str | None = None
    otlp_protocol: OtlpProtocol | None = None
    otlp_headers: dict[str, str] | None = None
    # None: decided by the endpoint's scheme (http:// is plaintext, https:// is TLS, host:port is plaintext).
    otlp_insecure: bool | None = None
    otlp_timeout_s: float = Field(default=10.0, gt=0)
    # Span batching (otlp.CountingBatchSpanProcessor, the SDK's shape): every span handed over ends
    # exported, dropped (queue full, shutdown) or failed, each counted.
    export_max_queue_size: int = Field(default=8192, gt=0)
    export_max_batch_size: int = Field(default=512, gt=0)
    export_schedule_delay_ms: int = Field(default=1000, gt=0)
    # A file's calls (trawl up --pcap sets it): a hand-over the span queue has no room for waits
    # for room while the backend accepts batches (as trawl analyze does), instead of dropping.
    export_wait_for_room: bool = False
    # How spans are made: "compiled" (trawl._otlpspans + wire_export: the enriched calls' bytes
    # straight to OTLP bytes; the SDK path when the extension is not built) or "sdk" (spans.py
    # call_spans through the OpenTelemetry SDK, the reference).
    span_path: Literal["compiled", "sdk"] = "compiled"
    # RED metrics: how often histograms are pushed, and how many distinct peer resources are kept.
    metrics_export_interval_s: float = Field(default=15.0, gt=0)
    max_metric_resources: int = Field(default=2000, gt=0)
    # How RED metrics are made: "aggregated" (red_wire: bucket arrays per batch, OTLP bytes per
    # export, with the service graph and Trawl's counters) or "sdk" (red.py through the
    # OpenTelemetry metrics SDK, the reference).
    metrics_path: Literal["aggregated", "sdk"] = "aggregated"
    # http.route of HTTP calls, from OpenAPI documents or learned (trawl.enricher.routes).
    routes: RouteSettings = Field(default_factory=RouteSettings)

    # JetStream consumption of TRAWL_CALLS.
    durable: str = Field(default="enricher", min_length=1, pattern=r"^[A-Za-z0-9_\-]+$")
    # Restrict this enricher to some call subjects (e.g. one node's: trawl.v1.calls.node-1.>).
    calls_filter_subject: str | None = None
    fetch_batch: int = Field(default=64, gt=0)
    # Calls handled last, by id (trawl/dedup.py): a redelivered batch, or calls a dissector
    # derived again after a takeover, are not enriched, exported or published twice.
    recent_call_ids: int = Field(default=200_000, gt=0)
    fetch_timeout_s: float = Field(default=1.0, gt=0)
    # Publish every enriched call on trawl.v1.enriched.<protocol>.<namespace>.<workload>.
    publish_enriched: bool = True
    # How long a batch's enriched calls wait for TRAWL_ENRICHED's acks; past it the CallBatch is
    # redelivered (the stream keeps each call once, by its id).
    publish_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _fill_from_otel_environment(self) -> EnricherSettings:
        if self.otlp_protocol is None:
            env_protocol = os.environ.get(ENV_PROTOCOL, "").strip()
            if env_protocol and env_protocol not in OTLP_PROTOCOLS:
                raise ConfigError(f"{ENV_PROTOCOL}: expected one of {', '.join(OTLP_PROTOCOLS)}, got {env_protocol!r}")
            self.otlp_protocol = "http/protobuf" if env_protocol == "http/protobuf" else "grpc"
        if self.otlp_headers is None:
            self.otlp_headers = parse_otlp_headers(os.environ.get(ENV_HEADERS, ""), ENV_HEADERS)
        target = self.traces_target()
        if target is not None and self.otlp_protocol == "http/protobuf":
            _require_http_url(target.endpoint, "otlp_endpoint (OTLP/HTTP)")
        return self

    @property
    def protocol(self) -> OtlpProtocol:
        return self.otlp_protocol or "grpc"

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.otlp_headers or {})

    def traces_target(self) -> OtlpTarget | None:
        return self._target(ENV_TRACES_ENDPOINT)

    def metrics_target(self) -> OtlpTarget | None:
        return self._target(ENV_METRICS_ENDPOINT)

    def _target(self, signal_env: str) -> OtlpTarget | None:
        if self.otlp_endpoint:
            return OtlpTarget(self.otlp_endpoint, is_signal_specific=False)
        if os.environ.get(signal_env, "").strip():
            return OtlpTarget(os.environ[signal_env].strip(), is_signal_specific=True)
        if os.environ.get(ENV_ENDPOINT, "").strip():
            return OtlpTarget(os.environ[ENV_ENDPOINT].strip(), is_signal_specific=False)
        return None

    def grpc_insecure(self, endpoint: str) -> bool:
        if self.otlp_insecure is not None:
            return self.otlp_insecure
        return urlsplit(endpoint).scheme != "https"


def _require_http_url(endpoint: str, what: str) -> None:
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{what}: expected an http:// or https:// URL, got {endpoint!r}")
