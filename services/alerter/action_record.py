"""The `record` action: ask the recorder for a recording of what the alert is about.

The request is the RecordRequest `trawl record start` sends, on the same request/reply subject
(trawl.v1.control.record, answered by one recorder of the queue group), so a recording an
alert started is listed, fetched and stopped like any other. Its scope comes from the alert's
call (the last one, for a windowed rule):

- `flow`: the two ends' IP addresses (works without the recorder's identity snapshot);
- `pods`: the two ends' pods by exact name, in their namespaces;
- `workloads`: every pod of the two ends' workloads (Deployment, ReplicaSet, StatefulSet,
  DaemonSet and Job pod names: `<workload>-<hash>-<suffix>`, `<workload>-<ordinal>`, ...);
- `namespaces`: the two ends' namespaces.

An end the enricher gave no pod (or workload, or namespace) is recorded by its IP instead, so
the scope never silently loses an end. The rule's `filter` is ANDed by the recorder. The
recording begins with the packets the recorder holds in its look-back (`recorder.lookback_s`,
30 s by default) from `since_ns` on: `lookback` (30 s) before the alert's call, and for a
windowed rule before its window and `for` too (where the behaviour began), in the packets' own
time, so a replayed capture's recording holds what came before the alert as a live one does; a
resolved alert starts none.

No recorder answering (no responder, or no reply in the action's `timeout`) is retried with
backoff and then dead-lettered; a recorder refusing the request (a bad scope, too many
recordings) is final. The recording's id is logged (`alert_recording_started`) with the alert's,
and the alert's other actions send it as the label `recording_id` (trawl.alerter.actions); the
alert stored on trawl.v1.alerts.<rule> was stored before its actions ran, and has not got it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

import nats.errors
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NatsClient

from trawl.alerter.action_types import RecordAction
from trawl.alerter.config import ActionSettings
from trawl.alerter.delivery import DELIVERED, Delivery, Outcome, timestamp
from trawl.logs import get_logger
from trawl.metrics import Registry
from trawl.recorder.control import RECORD_SUBJECT
from trawl.v1 import alerts_pb2, calls_pb2, control_pb2

log = get_logger(__name__)

# (subject, payload, timeout_s) -> the reply's payload: nats-py's request, in the service.
Request = Callable[[str, bytes, float], Awaitable[bytes]]

# Kubernetes' random suffixes (pod-template-hash, generateName) use this alphabet: no vowels,
# no 0, 1 or 3, so `api` cannot take the pods of `api-gateway`.
_SAFE = "[bcdfghjklmnpqrstvwxz2456789]"


def workload_pods(workload: str) -> str:
    """A regex for the pods of a workload: <name>-<ordinal> (StatefulSet), <name>-<5> (DaemonSet,
    Job, bare ReplicaSet), <name>-<hash>-<5> (Deployment)."""
    return rf"^{re.escape(workload)}-(?:\d+|(?:{_SAFE}{{5,10}}-)?{_SAFE}{{5}})$"


def record_request(alert: alerts_pb2.Alert, action: RecordAction) -> control_pb2.RecordRequest | str:
    """The RecordRequest for this alert, or why the alert gives nothing to record."""
    call = alert.call
    ends = [end for end in (call.src, call.dst) if end.ip or end.pod or end.namespace]
    namespaces: list[str] = []
    pods: list[str] = []
    ips: list[str] = []

    def by_ip(end: calls_pb2.Endpoint) -> None:
        if end.ip and end.ip not in ips:
            ips.append(end.ip)

    for end in ends:
        if action.scope == "flow":
            by_ip(end)
        elif action.scope == "namespaces":
            if end.namespace:
                if end.namespace not in namespaces:
                    namespaces.append(end.namespace)
            else:
                by_ip(end)
        else:
            name = end.pod if action.scope == "pods" else end.workload
            if not name or not end.namespace:
                by_ip(end)
                continue
            pattern = f"^{re.escape(name)}$" if action.scope == "pods" else workload_pods(name)
            if pattern not in pods:
                pods.append(pattern)
            if end.namespace not in namespaces:
                namespaces.append(end.namespace)
    if not (ips or pods or namespaces):
        # Without a scope the recorder would record everything on every node: not what a rule asked.
        return "the alert has no call with an address, pod or namespace to record"
    return control_pb2.RecordRequest(
        requested_by=f"alerter:{alert.rule}",
        reason=f"alert {alert.id} fired {timestamp(alert.fired_at)}: {alert.summary}"[:512],
        namespaces=namespaces,
        pods=pods,
        ips=ips,
        filter=action.filter,
        duration_s=action.duration_s,
        format=action.format,
        since_ns=since_ns(alert, action),
    )


def since_ns(alert: alerts_pb2.Alert, action: RecordAction) -> int:
    """Where the recording begins, in the packets' own time: `lookback_s` before the alert's call
    (a windowed rule's: before its window and `for`, from when it began firing). The alert's
    `fired_at` of a per-call rule is the alerter's clock, which a replayed capture is far from."""
    if alert.window_calls or alert.resolved:
        anchor = alert.fired_at
    else:
        anchor = alert.call.request.ts or alert.call.response.ts or alert.fired_at
    return max(1, anchor - int((action.lookback_s + action.window_s) * 1_000_000_000))


class RecordSender:
    """Starts recordings through the recorder's request/reply subject."""

    def __init__(
        self, delivery: Delivery, settings: ActionSettings, request: Request | None, metrics: Registry
    ) -> None:
        self.delivery = delivery
        self.settings = settings
        self.request = request
        self._started = metrics.counter("trawl_alerter_recordings_started_total", "Recordings started by alerts")

    async def deliver(
        self, alert: alerts_pb2.Alert, action: RecordAction, started: Callable[[str], None] | None = None
    ) -> bool:
        """`started` is told the recording's id once the recorder answered."""
        if alert.resolved:
            return True  # a resolve ends a firing: nothing new to record
        request = record_request(alert, action)
        if isinstance(request, str):
            return await self.delivery.run(alert, action, self.settings, _final(request))
        payload = control_pb2.RecordControl(start=request).SerializeToString()

        async def attempt() -> Outcome:
            if self.request is None:
                return Outcome("no NATS connection to ask a recorder on", retryable=False)
            try:
                data = await self.request(RECORD_SUBJECT, payload, action.timeout_s)
            except nats.errors.NoRespondersError:
                return Outcome(f"no recorder answers on {RECORD_SUBJECT}")
            except TimeoutError:
                return Outcome(f"no answer on {RECORD_SUBJECT} within {action.timeout_s:g} s")
            try:
                reply = control_pb2.RecordReply.FromString(data)
            except DecodeError:
                return Outcome("the recorder's reply is not a RecordReply", retryable=False)
            if reply.error:
                return Outcome(f"the recorder refused: {reply.error}", retryable=False)
            self._started.inc(rule=alert.rule)
            if started is not None:
                started(reply.recording_id)
            log.info(
                "alert_recording_started",
                rule=alert.rule,
                alert_id=alert.id,
                recording_id=reply.recording_id,
                scope=action.scope,
                ips=list(request.ips),
                pods=list(request.pods),
                namespaces=list(request.namespaces),
                duration_s=action.duration_s,
            )
            return DELIVERED

        return await self.delivery.run(alert, action, self.settings, attempt)


def _final(reason: str) -> Callable[[], Awaitable[Outcome]]:
    async def attempt() -> Outcome:
        return Outcome(reason, retryable=False)

    return attempt


def nats_request(client: NatsClient) -> Request:
    """`Request` over a nats-py connection."""

    async def request(subject: str, payload: bytes, timeout_s: float) -> bytes:
        reply = await client.request(subject, payload, timeout=timeout_s)
        return bytes(reply.data)

    return request
