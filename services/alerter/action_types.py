"""What a rule's `actions:` list holds, as parsed from the rules file (trawl.alerter.rules).

Each action is a frozen value with a `kind` (the YAML key that names it) and `where`, the
target without anything secret in it: it labels the counters, the logs and the dead letter's
headers. The senders that carry them out are in trawl.alerter.actions and action_*.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal
from urllib.parse import urlsplit

from trawl.s3 import Credentials, LockMode

RecordScope = Literal["flow", "pods", "workloads", "namespaces"]
RECORD_SCOPES: tuple[RecordScope, ...] = ("flow", "pods", "workloads", "namespaces")


def safe_url(url: str) -> str:
    """The URL without path or query, which may hold a token: safe to log."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


@dataclass(frozen=True)
class WebhookAction:
    kind: ClassVar[str] = "webhook"

    url: str
    format: Literal["json", "slack"]
    # HMAC-SHA256 key for the X-Trawl-Signature header, read from `secret_env` at load.
    secret: bytes | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        return safe_url(self.url)

    @property
    def target(self) -> str:
        """Tells two webhook actions of one host apart in the dead letter's id (as it always did)."""
        return f"{self.where}:{self.format}"


@dataclass(frozen=True)
class RecordAction:
    """Ask the recorder (trawl.v1.control.record) for a recording of the alert's call."""

    kind: ClassVar[str] = "record"

    # What of the call's two ends is recorded: their IPs (flow), their pods, their workloads'
    # pods, or their namespaces (the last three need the recorder's identity snapshot).
    scope: RecordScope = "flow"
    # tcpdump filter ANDed with the scope (libpcap's syntax, checked at load).
    filter: str = ""
    duration_s: int = 600
    # "pcap" or "pcapng"; empty: the recorder's own default.
    format: str = ""
    # How long to wait for the recorder's answer, per attempt.
    timeout_s: float = 5.0
    # How much before the alert the recording begins (RecordRequest.since_ns, in the packets'
    # own time), as far as the recorder's look-back holds; a windowed rule's recording begins
    # this long before its window and `for` (window_s, set from the rule) too.
    lookback_s: float = 30.0
    window_s: float = 0.0

    @property
    def where(self) -> str:
        return "recorder"

    @property
    def target(self) -> str:
        return f"record:{self.scope}"


@dataclass(frozen=True)
class InfluxAction:
    """A point per alert and per resolve, in line protocol over InfluxDB's HTTP write API."""

    kind: ClassVar[str] = "influxdb"

    url: str
    measurement: str = "trawl_alerts"
    # InfluxDB 1.x: /write?db=...&rp=... ; 2.x: /api/v2/write?org=...&bucket=... (one or the other).
    db: str = ""
    retention_policy: str = ""
    bucket: str = ""
    org: str = ""
    # `Authorization: Token ...` (2.x, and 1.8+ with a token) or basic auth (1.x users).
    token: str | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        return safe_url(self.url)

    @property
    def target(self) -> str:
        return f"{self.where}/{self.db or self.bucket}"


@dataclass(frozen=True)
class ElasticsearchAction:
    """Alerts (and optionally their calls) indexed through the `_bulk` API."""

    kind: ClassVar[str] = "elasticsearch"

    url: str
    index: str = "trawl-alerts"
    include_call: bool = False
    call_index: str = "trawl-calls"
    # `Authorization: ApiKey ...` (the encoded id:key Elasticsearch gives) or basic auth.
    api_key: str | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        return safe_url(self.url)

    @property
    def target(self) -> str:
        return f"{self.where}/{self.index}"


@dataclass(frozen=True)
class S3Action:
    """The alert as a JSON object in a bucket: evidence, optionally under Object Lock."""

    kind: ClassVar[str] = "s3"

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    # From the environment variables the rule names; None: boto3's own chain (AWS_* variables,
    # a profile, an instance role).
    credentials: Credentials | None = field(default=None, repr=False)
    lock_mode: LockMode | None = None
    lock_days: int = 0

    @property
    def where(self) -> str:
        host = safe_url(self.endpoint_url) if self.endpoint_url else "aws"
        return f"{host}/{self.bucket}"

    @property
    def target(self) -> str:
        return self.where


Action = WebhookAction | RecordAction | InfluxAction | ElasticsearchAction | S3Action
