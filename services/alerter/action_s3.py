"""The `s3` action: the alert as evidence, a JSON object in a bucket.

Key: `<prefix><rule>/<YYYY>/<MM>/<DD>/<alert id>.json` (the day the rule fired, UTC); a resolve
has an id of its own and so its own object. The body is the alert in protobuf's JSON mapping
with proto field names (what the webhook sends, the triggering call included). It is written
through trawl.s3 as the recorder's sealed files are: PUT with its SHA-256 (S3 refuses a body
that arrived different) and, with `object_lock`, the retention mode and retain-until date
(the bucket needs Object Lock enabled), then HEAD to check both.

boto3 blocks, so each upload runs in a worker thread; one client per endpoint, region and
credentials, made once (boto3 makes clients unsafely from several threads, so under a lock).
S3 away (connection refused, timeouts), throttling (SlowDown, 429, 503) and 5xx are retried with
the backoff; another refusal (NoSuchBucket, AccessDenied, InvalidRequest for a lock on a bucket
without Object Lock) is final and the alert is dead-lettered with S3's error code.
"""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from google.protobuf.json_format import MessageToDict

from trawl.alerter.action_types import S3Action
from trawl.alerter.config import ActionSettings
from trawl.alerter.delivery import DELIVERED, Delivery, Outcome, exception_reason
from trawl.logs import get_logger
from trawl.metrics import Registry
from trawl.s3 import Credentials, UploadError, put_verified, retain_until, s3_client, sha256_hex
from trawl.v1 import alerts_pb2

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = get_logger(__name__)

_RETRYABLE_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "Throttling"}
)


def object_key(alert: alerts_pb2.Alert, prefix: str) -> str:
    day = datetime.fromtimestamp(alert.fired_at / 1e9, UTC).strftime("%Y/%m/%d")
    return f"{prefix}{alert.rule}/{day}/{alert.id}.json"


def evidence(alert: alerts_pb2.Alert) -> bytes:
    return json.dumps(
        MessageToDict(alert, preserving_proto_field_name=True), separators=(",", ":"), sort_keys=True
    ).encode()


class _Endpoint:
    """What a client is made for (S3Action's endpoint, region and credentials)."""

    def __init__(self, endpoint_url: str | None, region: str | None) -> None:
        self.endpoint_url = endpoint_url
        self.region = region


class S3Sender:
    """Uploads alert evidence to S3 (or an S3-compatible store), in worker threads."""

    def __init__(self, delivery: Delivery, settings: ActionSettings, metrics: Registry) -> None:
        self.delivery = delivery
        self.settings = settings
        self._clients: dict[tuple[str | None, str | None, Credentials | None], S3Client] = {}
        self._lock = threading.Lock()
        self._uploaded = metrics.counter("trawl_alerter_s3_objects_total", "Alert evidence objects uploaded to S3")

    def client(self, action: S3Action) -> S3Client:
        key = (action.endpoint_url, action.region, action.credentials)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = s3_client(
                    _Endpoint(action.endpoint_url, action.region),
                    action.credentials,
                    connect_timeout_s=self.settings.timeout_s,
                    read_timeout_s=self.settings.timeout_s,
                )
            return client

    def upload(self, alert: alerts_pb2.Alert, action: S3Action, body: bytes) -> str:
        """PUT and verify (worker thread); the version id."""
        until = retain_until(action.lock_days) if action.lock_mode else None
        return put_verified(
            self.client(action),
            action.bucket,
            object_key(alert, action.prefix),
            body,
            sha256_hex(body),
            action.lock_mode,
            until,
            content_type="application/json",
            metadata={"rule": alert.rule, "alert-id": alert.id, "state": "resolved" if alert.resolved else "firing"},
        )

    async def deliver(self, alert: alerts_pb2.Alert, action: S3Action) -> bool:
        body = evidence(alert)

        async def attempt() -> Outcome:
            try:
                version = await asyncio.to_thread(self.upload, alert, action, body)
            except Exception as exc:
                return _s3_outcome(exc)
            self._uploaded.inc(rule=alert.rule)
            log.info(
                "alert_evidence_uploaded",
                rule=alert.rule,
                alert_id=alert.id,
                bucket=action.bucket,
                key=object_key(alert, action.prefix),
                version=version,
            )
            return DELIVERED

        return await self.delivery.run(alert, action, self.settings, attempt)


def _s3_outcome(exc: Exception) -> Outcome:
    """Retry what S3 (or the way to it) may get over; a refusal of this request is final."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        reason = f"S3 {code or 'error'} (HTTP {status}): {error.get('Message', '')}".strip()
        retryable = code in _RETRYABLE_CODES or status >= 500 or status in (408, 429)
        return Outcome(reason, retryable=retryable)
    if isinstance(exc, UploadError):
        return Outcome(f"S3 upload did not verify: {exc}")
    return Outcome(exception_reason(exc))  # BotoCoreError: the endpoint away, a timeout
