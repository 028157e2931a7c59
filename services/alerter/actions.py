"""Alert actions: one retry loop for all of them, a sender per kind, a bound per target.

`Delivery.run` is the loop every action goes through: an attempt, and on a retryable failure
another after backoff_s, 2*backoff_s, ... (at most backoff_max_s), `retries` times; an action
that fails for good (a final answer, or its retries spent) is handed to the dead-letter
callback (the service publishes it on trawl.v1.alerts._dead.<rule>) and counted: never
silently lost. Each kind's sender only makes one attempt and says how it went (`Outcome`):

- webhook (here): POST the Alert in protobuf's JSON mapping with proto field names
  (`format: json`), or `{"text": "..."}` for Slack incoming webhooks (`format: slack`). With a
  secret, the request carries `X-Trawl-Signature: sha256=<hex HMAC-SHA256 of the exact body>`:
  a receiver recomputes it over the raw bytes it got and compares in constant time.
  Connection errors, timeouts, 408, 429 and 5xx are retried; any other non-2xx answer is final
  (the receiver rejected this alert and will do so again). Redirects are not followed: a POST
  that is redirected would arrive as a GET, or not at all.
- record (action_record.py): ask the recorder for a recording of the alert's call.
- influxdb (action_influxdb.py): a point in line protocol over the HTTP write API.
- elasticsearch (action_elasticsearch.py): the alert (and its call) through `_bulk`.
- s3 (action_s3.py): the alert as a JSON object, checksummed, optionally under Object Lock.

`ActionSender.deliver` routes an alert's action to its sender. Each target (a webhook URL, an
index, a bucket...) has at most `webhook.max_in_flight` deliveries in progress; one more is
dead-lettered at once with the reason "overflow" and counted, so a target that is down holds
neither rule evaluation nor the other targets, however long its retries take.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json

from google.protobuf.json_format import MessageToDict

from trawl.alerter.action_elasticsearch import ElasticsearchSender
from trawl.alerter.action_influxdb import InfluxSender
from trawl.alerter.action_record import RecordSender, Request
from trawl.alerter.action_s3 import S3Sender
from trawl.alerter.action_types import (
    Action,
    ElasticsearchAction,
    InfluxAction,
    RecordAction,
    S3Action,
    WebhookAction,
)
from trawl.alerter.config import ActionSettings, WebhookSettings
from trawl.alerter.delivery import (
    DELIVERED,
    DeadLetter,
    Delivery,
    DeliveryFailure,
    HttpSession,
    Outcome,
    Sleep,
    http_outcome,
)
from trawl.metrics import Registry
from trawl.v1 import alerts_pb2

SIGNATURE_HEADER = "X-Trawl-Signature"
# The label the alert's other actions send with the id of the recording its record action started.
RECORDING_LABEL = "recording_id"
RECORDING_ID_KEPT_S = 60.0

__all__ = ["DELIVERED", "ActionSender", "Delivery", "DeliveryFailure", "Outcome", "WebhookSender"]


def dead_letter_headers(failure: DeliveryFailure, msg_id_header: str) -> dict[str, str]:
    """The dead letter's headers: its id (one per alert and target, so a redelivered alert's
    dead letter is stored once), why, after how many attempts, and which action."""
    action = failure.action
    headers = {
        msg_id_header: f"{failure.alert.id}:dead:{action.target}",
        # A header value ends at a line break: a peer's multi-line error would cut the message.
        "Trawl-Failure": " ".join(failure.reason[:1024].split()),
        "Trawl-Attempts": str(failure.attempts),
        "Trawl-Action": action.kind,
        "Trawl-Target": action.where,
    }
    if isinstance(action, WebhookAction):
        headers["Trawl-Webhook"] = action.where
    return headers


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
        session: HttpSession,
        settings: WebhookSettings,
        dead_letter: DeadLetter,
        metrics: Registry | None = None,
        sleep: Sleep = asyncio.sleep,
        delivery: Delivery | None = None,
    ) -> None:
        self.session = session
        self.settings = settings
        self.delivery = delivery or Delivery(dead_letter, metrics, sleep)
        self.default_secret = settings.hmac_secret.get_secret_value().encode() if settings.hmac_secret else None

    async def deliver(self, alert: alerts_pb2.Alert, action: WebhookAction) -> bool:
        """True once delivered; False after the dead letter was handed over."""
        body = webhook_body(alert, action.format)
        headers = {"Content-Type": "application/json", "User-Agent": "trawl-alerter"}
        secret = action.secret or self.default_secret
        if secret:
            headers[SIGNATURE_HEADER] = signature(secret, body)
        from aiohttp import ClientTimeout  # loaded with the session (delivery.LazySession)

        timeout = ClientTimeout(total=self.settings.timeout_s)

        async def attempt() -> Outcome:
            async with self.session().post(
                action.url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                await response.read()
                return http_outcome(response.status)

        return await self.delivery.run(alert, action, self.settings, attempt)


class ActionSender:
    """Every action of an alert, each to its kind's sender, at most `max_in_flight` per target."""

    def __init__(
        self,
        session: HttpSession,
        webhook: WebhookSettings,
        actions: ActionSettings,
        dead_letter: DeadLetter,
        metrics: Registry | None = None,
        request: Request | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        metrics = metrics or Registry()
        self.delivery = Delivery(dead_letter, metrics, sleep)
        self.max_in_flight = webhook.max_in_flight
        self.webhook = WebhookSender(session, webhook, dead_letter, delivery=self.delivery)
        self.record = RecordSender(self.delivery, actions, request, metrics)
        self.influxdb = InfluxSender(self.delivery, actions, session, metrics)
        self.elasticsearch = ElasticsearchSender(self.delivery, actions, session, metrics)
        self.s3 = S3Sender(self.delivery, actions, metrics)
        self._in_flight: dict[str, int] = {}
        # The delivery of each (target, rule, group) that the next one waits for.
        self._last_of_group: dict[tuple[str, str, str], asyncio.Future[None]] = {}
        # Recordings being asked for, by alert id, and how long the alert's other actions wait.
        self._recordings: dict[str, tuple[asyncio.Future[str], float]] = {}
        self._in_flight_gauge = metrics.gauge("trawl_alerter_actions_in_flight", "Actions being carried out now")
        self._overflow = metrics.counter(
            "trawl_alerter_actions_overflow_total",
            "Actions dead-lettered at once: their target had max_in_flight deliveries in progress",
        )

    async def deliver(self, alert: alerts_pb2.Alert, action: Action) -> bool:
        """True once carried out (or not applicable: no recording is started for a resolve);
        False once counted and dead-lettered.

        An alert's record action, started first (the rules file puts it first), makes the
        alert's other actions wait for the recording's id, at most the record action's timeout,
        and send it as the label `recording_id`: the webhook, the point, the document and the
        evidence name the recording. Without an answer in that time they go without it."""
        target = f"{action.kind}:{action.target}"
        if self._in_flight.get(target, 0) >= self.max_in_flight:
            self._overflow.inc(rule=alert.rule, action=action.kind)
            reason = f"overflow: {self.max_in_flight} deliveries to {action.where} in progress"
            await self.delivery.give_up(alert, action, reason, 0)
            return False
        self._in_flight[target] = self._in_flight.get(target, 0) + 1
        self._in_flight_gauge.inc()
        # A windowed rule's alerts of one group reach a target in the order they were made: a
        # resolve never arrives before its firing (which may wait for its recording's id, or be
        # retried). A per-call rule's alerts are events of their own and go out side by side.
        key = (target, alert.rule, alert.group)
        ordered = bool(alert.window_calls or alert.resolved)
        previous = self._last_of_group.get(key) if ordered else None
        finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if ordered:
            self._last_of_group[key] = finished
        try:
            if previous is not None:
                await asyncio.shield(previous)
            if isinstance(action, RecordAction):
                return await self._record(alert, action)
            return await self._dispatch(await self._with_recording(alert), action)
        finally:
            finished.set_result(None)
            if self._last_of_group.get(key) is finished:
                del self._last_of_group[key]
            self._in_flight_gauge.inc(-1)
            left = self._in_flight[target] - 1
            if left:
                self._in_flight[target] = left
            else:
                del self._in_flight[target]

    async def _record(self, alert: alerts_pb2.Alert, action: RecordAction) -> bool:
        if alert.resolved or alert.id in self._recordings:
            return await self.record.deliver(alert, action)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._recordings[alert.id] = (future, action.timeout_s)

        def started(recording_id: str) -> None:
            if not future.done():
                future.set_result(recording_id)

        try:
            return await self.record.deliver(alert, action, started)
        finally:
            started("")
            # Kept a while for the alert's actions still to start (a redelivered alert's too).
            asyncio.get_running_loop().call_later(RECORDING_ID_KEPT_S, self._recordings.pop, alert.id, None)

    async def _with_recording(self, alert: alerts_pb2.Alert) -> alerts_pb2.Alert:
        """The alert with its recording's id as a label, once the recorder answered (or as it is)."""
        entry = self._recordings.get(alert.id)
        if entry is None:
            return alert
        future, timeout_s = entry
        try:
            recording_id = await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            return alert
        if not recording_id:
            return alert
        labelled = alerts_pb2.Alert()
        labelled.CopyFrom(alert)
        labelled.labels[RECORDING_LABEL] = recording_id
        return labelled

    async def _dispatch(self, alert: alerts_pb2.Alert, action: Action) -> bool:
        if isinstance(action, WebhookAction):
            return await self.webhook.deliver(alert, action)
        if isinstance(action, RecordAction):
            return await self.record.deliver(alert, action)
        if isinstance(action, InfluxAction):
            return await self.influxdb.deliver(alert, action)
        if isinstance(action, ElasticsearchAction):
            return await self.elasticsearch.deliver(alert, action)
        assert isinstance(action, S3Action)
        return await self.s3.deliver(alert, action)
