"""Webhook delivery: POST the alert, retry with exponential backoff, dead-letter what never arrives.

The body is the Alert in protobuf's JSON mapping with proto field names (`format: json`), or
`{"text": "..."}` for Slack incoming webhooks (`format: slack`). With a secret, the request
carries `X-Trawl-Signature: sha256=<hex HMAC-SHA256 of the exact body>`: a receiver recomputes
it over the raw bytes it got and compares in constant time.

Connection errors, timeouts, 408, 429 and 5xx are retried; any other non-2xx answer is final
(the receiver rejected this alert and will do so again). Redirects are not followed: a POST
that is redirected would arrive as a GET, or not at all. A delivery that fails for good is
handed to the dead-letter callback (the service publishes it on trawl.v1.alerts._dead.<rule>)
and counted: never silently lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from google.protobuf.json_format import MessageToDict

from trawl.alerter.config import WebhookSettings
from trawl.alerter.rules import WebhookAction
from trawl.logs import get_logger
from trawl.metrics import Registry
from trawl.v1 import alerts_pb2

log = get_logger(__name__)

SIGNATURE_HEADER = "X-Trawl-Signature"
RETRYABLE_STATUS = frozenset({408, 429})


@dataclass(frozen=True)
class DeliveryFailure:
    """Why a webhook could not be delivered: what the dead letter carries besides the alert."""

    alert: alerts_pb2.Alert
    action: WebhookAction
    reason: str
    attempts: int


DeadLetter = Callable[[DeliveryFailure], Awaitable[None]]


def alert_json(alert: alerts_pb2.Alert) -> dict[str, object]:
    return MessageToDict(alert, preserving_proto_field_name=True)


def webhook_body(alert: alerts_pb2.Alert, fmt: str) -> bytes:
    if fmt == "slack":
        severity = alerts_pb2.Severity.Name(alert.severity).removeprefix("SEVERITY_")
        group = f" [{alert.group}]" if alert.group else ""
        return json.dumps({"text": f"[{severity}] {alert.rule}{group}: {alert.summary}"}).encode()
    return json.dumps(alert_json(alert), separators=(",", ":")).encode()


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookSender:
    """Delivers alerts to webhook actions over one aiohttp session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: WebhookSettings,
        dead_letter: DeadLetter,
        metrics: Registry | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.session = session
        self.settings = settings
        self.dead_letter = dead_letter
        self.sleep = sleep
        self.default_secret = settings.hmac_secret.get_secret_value().encode() if settings.hmac_secret else None
        metrics = metrics or Registry()
        self._delivered = metrics.counter("trawl_alerter_webhooks_delivered_total", "Webhook deliveries, per rule")
        self._retried = metrics.counter("trawl_alerter_webhook_retries_total", "Webhook attempts retried, per rule")
        self._dead = metrics.counter(
            "trawl_alerter_dead_letters_total", "Alerts that could not be delivered after retries, per rule"
        )

    async def deliver(self, alert: alerts_pb2.Alert, action: WebhookAction) -> bool:
        """True once delivered; False after the dead letter was handed over."""
        body = webhook_body(alert, action.format)
        headers = {"Content-Type": "application/json", "User-Agent": "trawl-alerter"}
        secret = action.secret or self.default_secret
        if secret:
            headers[SIGNATURE_HEADER] = signature(secret, body)
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        attempts = 0
        reason = ""
        while True:
            attempts += 1
            retryable = True
            try:
                async with self.session.post(
                    action.url, data=body, headers=headers, timeout=timeout, allow_redirects=False
                ) as response:
                    await response.read()
                    if 200 <= response.status < 300:
                        self._delivered.inc(rule=alert.rule)
                        return True
                    reason = f"HTTP {response.status}"
                    retryable = response.status >= 500 or response.status in RETRYABLE_STATUS
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if not retryable or attempts > self.settings.retries:
                break
            self._retried.inc(rule=alert.rule)
            delay = min(self.settings.backoff_s * 2 ** (attempts - 1), self.settings.backoff_max_s)
            log.info("webhook_retry", rule=alert.rule, to=action.where, attempt=attempts, error=reason, delay_s=delay)
            await self.sleep(delay)
        self._dead.inc(rule=alert.rule)
        log.error(
            "webhook_failed", rule=alert.rule, alert_id=alert.id, to=action.where, attempts=attempts, error=reason
        )
        await self.dead_letter(DeliveryFailure(alert, action, reason, attempts))
        return False
