"""The one retry loop every alert action goes through (trawl.alerter.actions routes to it).

An action's sender makes one attempt and says how it went in an `Outcome`: delivered, or an
error that is worth retrying (the peer is away, slow, or asks to be asked later) or final (the
peer refused this alert and would again). `Delivery.run` retries after backoff_s,
2*backoff_s, ... (at most backoff_max_s), `retries` times, and hands what is not carried out
to the dead-letter callback, counted per rule and action kind.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from trawl.alerter.action_types import Action
from trawl.logs import get_logger
from trawl.metrics import Registry
from trawl.v1 import alerts_pb2

if TYPE_CHECKING:
    import aiohttp

log = get_logger(__name__)

# The HTTP actions' (webhook, InfluxDB, Elasticsearch) aiohttp session, asked for when one is sent.
HttpSession = Callable[[], "aiohttp.ClientSession"]

# Answers worth asking again besides 5xx: the request took too long, or the server asks for time.
RETRYABLE_STATUS = frozenset({408, 429})


@dataclass(frozen=True)
class Outcome:
    """One attempt: delivered (no error), or an error, retryable or final."""

    error: str = ""
    retryable: bool = True

    @property
    def delivered(self) -> bool:
        return not self.error


DELIVERED = Outcome()


class RetryPolicy(Protocol):
    """What the loop reads of an action kind's settings (WebhookSettings, ActionSettings)."""

    @property
    def retries(self) -> int: ...

    @property
    def backoff_s(self) -> float: ...

    @property
    def backoff_max_s(self) -> float: ...


def http_outcome(status: int, detail: str = "") -> Outcome:
    """2xx delivered; 408, 429 and 5xx retried; any other status final."""
    if 200 <= status < 300:
        return DELIVERED
    reason = f"HTTP {status}" + (f": {detail}" if detail else "")
    return Outcome(reason, retryable=status >= 500 or status in RETRYABLE_STATUS)


def basic_auth(user: str, password: str) -> str:
    """The Authorization header's value for HTTP basic authentication."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def timestamp(ns: int) -> str:
    """RFC 3339 in UTC with all nine digits of nanoseconds (Elasticsearch's date_nanos reads it)."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{fraction:09d}Z"


def exception_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass(frozen=True)
class DeliveryFailure:
    """Why an action could not be carried out: what the dead letter carries besides the alert."""

    alert: alerts_pb2.Alert
    action: Action
    reason: str
    attempts: int


DeadLetter = Callable[[DeliveryFailure], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]


class Delivery:
    """The retry loop, the counters and the dead letter that every action shares."""

    def __init__(self, dead_letter: DeadLetter, metrics: Registry | None = None, sleep: Sleep = asyncio.sleep) -> None:
        self.dead_letter = dead_letter
        self.sleep = sleep
        metrics = metrics or Registry()
        self._delivered = metrics.counter(
            "trawl_alerter_actions_delivered_total", "Actions carried out, per rule and action kind"
        )
        self._retried = metrics.counter(
            "trawl_alerter_action_retries_total", "Action attempts retried, per rule and action kind"
        )
        self._failed = metrics.counter(
            "trawl_alerter_actions_failed_total",
            "Actions not carried out after retries (or refused, or over the in-flight bound), per rule and kind",
        )
        self._dead = metrics.counter(
            "trawl_alerter_dead_letters_total", "Alerts that could not be delivered after retries, per rule"
        )
        # The webhook's own counters, as they were before the other actions came.
        self._webhooks_delivered = metrics.counter(
            "trawl_alerter_webhooks_delivered_total", "Webhook deliveries, per rule"
        )
        self._webhooks_retried = metrics.counter(
            "trawl_alerter_webhook_retries_total", "Webhook attempts retried, per rule"
        )

    async def run(
        self,
        alert: alerts_pb2.Alert,
        action: Action,
        policy: RetryPolicy,
        attempt: Callable[[], Awaitable[Outcome]],
    ) -> bool:
        """True once carried out; False after the dead letter was handed over."""
        attempts = 0
        outcome = DELIVERED
        while True:
            attempts += 1
            try:
                outcome = await attempt()
            except Exception as exc:  # a peer's error not foreseen by its sender: retried, then dead-lettered
                outcome = Outcome(exception_reason(exc), retryable=True)
                log.debug("action_attempt_raised", rule=alert.rule, action=action.kind, exc_info=True)
            if outcome.delivered:
                self._delivered.inc(rule=alert.rule, action=action.kind)
                if action.kind == "webhook":
                    self._webhooks_delivered.inc(rule=alert.rule)
                return True
            if not outcome.retryable or attempts > policy.retries:
                break
            self._retried.inc(rule=alert.rule, action=action.kind)
            if action.kind == "webhook":
                self._webhooks_retried.inc(rule=alert.rule)
            delay = min(policy.backoff_s * 2 ** (attempts - 1), policy.backoff_max_s)
            log.info(
                "action_retry",
                rule=alert.rule,
                action=action.kind,
                to=action.where,
                attempt=attempts,
                error=outcome.error,
                delay_s=delay,
            )
            await self.sleep(delay)
        await self.give_up(alert, action, outcome.error, attempts)
        return False

    async def give_up(self, alert: alerts_pb2.Alert, action: Action, reason: str, attempts: int) -> None:
        """Count and dead-letter an action that will not be carried out."""
        self._failed.inc(rule=alert.rule, action=action.kind)
        self._dead.inc(rule=alert.rule)
        log.error(
            "action_failed",
            rule=alert.rule,
            alert_id=alert.id,
            action=action.kind,
            to=action.where,
            attempts=attempts,
            error=reason,
        )
        await self.dead_letter(DeliveryFailure(alert, action, reason, attempts))


class LazySession:
    """The alerter's one aiohttp session, made when the first HTTP action goes: aiohttp's import
    and its connector's SSL context cost 0.13 s of CPU at start (a tenth of what ten rules add
    to `trawl up --pcap`), which rules that only record, upload or alert on NATS never use."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def __call__(self) -> aiohttp.ClientSession:
        if self._session is None:
            import aiohttp

            # No total connection limit (aiohttp's default is 100): a request waiting for a pooled
            # connection spends its timeout there. Each target is bounded by webhook.max_in_flight.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
