"""The `influxdb` action: one point per alert and per resolve, over InfluxDB's HTTP write API.

The point, in line protocol (nanosecond precision):

    trawl_alerts,group=checkout\\ ->\\ payments,rule=errors,severity=critical,state=firing,team=pay \\
        alert_id="...",summary="...",value=0.25,window_calls=120i 1700000000000000000

Tags (indexed, for GROUP BY): the rule, its severity, the alert's group (left out when empty:
line protocol has no empty tag values), `state` (firing or resolved) and the rule's labels (a
label named like one of those four is written `label_<name>`). Fields: the aggregate's
`value` (a windowed rule's error ratio, rate...; 0 for a per-call rule), `window_calls`, the
`summary` and the alert's id. The time is when the rule fired, or for a resolve when it was
resolved. Keys and values are escaped as the line protocol reference says (commas, spaces and
`=` in tags, quotes and backslashes in strings); a newline, which nothing can escape, becomes
a space, and so does, as '/', a backslash ending a tag value or before a comma, space or `=`
in one (InfluxDB 1.x cannot read those; checked against it).

InfluxDB 1.x: `POST <url>/write?db=...[&rp=...]&precision=ns`, with basic auth for a user or
`Authorization: Token` (1.8+); 2.x: `POST <url>/api/v2/write?org=...&bucket=...&precision=ns`
with a token. 204 is success; 408, 429 and 5xx are retried; another answer (a bad point, an
unknown database, a refused login) is final and the alert is dead-lettered with InfluxDB's
error message.
"""

from __future__ import annotations

import json
import math
import re
from urllib.parse import urlencode

from trawl.alerter.action_types import InfluxAction
from trawl.alerter.config import ActionSettings
from trawl.alerter.delivery import Delivery, HttpSession, Outcome, basic_auth, http_outcome
from trawl.metrics import Registry
from trawl.v1 import alerts_pb2

_RESERVED_TAGS = frozenset({"rule", "severity", "group", "state"})
_TAG_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\ ", "\r": r"\ "})
_TAG_BACKSLASH = re.compile(r"\\(?=[,= \r\n]|$)")
_MEASUREMENT_ESCAPES = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\ ", "\r": r"\ "})


def _tag(text: str) -> str:
    # InfluxDB 1.x refuses a tag value that ends in a backslash and reads `\\` before a comma,
    # space or `=` as an escape of that character: such a backslash, which line protocol cannot
    # carry, is written as '/'. Any other backslash is taken literally (and kept).
    return _TAG_BACKSLASH.sub("/", text).translate(_TAG_ESCAPES)


def _string_field(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ").replace("\r", " ") + '"'


def point(alert: alerts_pb2.Alert, measurement: str) -> bytes:
    """The alert as one line of line protocol (with its newline)."""
    tags = {
        "rule": alert.rule,
        "severity": alerts_pb2.Severity.Name(alert.severity).removeprefix("SEVERITY_").lower(),
        "group": alert.group,
        "state": "resolved" if alert.resolved else "firing",
    }
    for name, value in alert.labels.items():
        tags[f"label_{name}" if name in _RESERVED_TAGS else name] = value
    tag_text = "".join(f",{_tag(name)}={_tag(value)}" for name, value in sorted(tags.items()) if name and value)
    fields = {"alert_id": _string_field(alert.id), "summary": _string_field(alert.summary)}
    if math.isfinite(alert.value):
        fields["value"] = repr(float(alert.value))
    fields["window_calls"] = f"{alert.window_calls}i"
    field_text = ",".join(f"{name}={value}" for name, value in sorted(fields.items()))
    at = alert.resolved_at if alert.resolved and alert.resolved_at else alert.fired_at
    stamp = f" {at}" if at else ""
    return f"{measurement.translate(_MEASUREMENT_ESCAPES)}{tag_text} {field_text}{stamp}\n".encode()


def write_url(action: InfluxAction) -> str:
    base = action.url.rstrip("/")
    if action.bucket:
        return f"{base}/api/v2/write?" + urlencode({"org": action.org, "bucket": action.bucket, "precision": "ns"})
    query = {"db": action.db, "precision": "ns"}
    if action.retention_policy:
        query["rp"] = action.retention_policy
    return f"{base}/write?" + urlencode(query)


class InfluxSender:
    """Writes alert points to InfluxDB over one aiohttp session."""

    def __init__(self, delivery: Delivery, settings: ActionSettings, session: HttpSession, metrics: Registry) -> None:
        self.delivery = delivery
        self.settings = settings
        self.session = session
        self._points = metrics.counter("trawl_alerter_influxdb_points_total", "Alert points written to InfluxDB")

    async def deliver(self, alert: alerts_pb2.Alert, action: InfluxAction) -> bool:
        body = point(alert, action.measurement)
        url = write_url(action)
        headers = {"Content-Type": "text/plain; charset=utf-8", "User-Agent": "trawl-alerter"}
        if action.token:
            headers["Authorization"] = f"Token {action.token}"
        elif action.user is not None:
            headers["Authorization"] = basic_auth(action.user, action.password or "")
        from aiohttp import ClientTimeout  # loaded with the session (delivery.LazySession)

        timeout = ClientTimeout(total=self.settings.timeout_s)

        async def attempt() -> Outcome:
            async with self.session().post(
                url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                text = (await response.read()).decode("utf-8", "replace")
                outcome = http_outcome(response.status, _influx_error(text))
                if outcome.delivered:
                    self._points.inc(rule=alert.rule)
                return outcome

        return await self.delivery.run(alert, action, self.settings, attempt)


def _influx_error(text: str) -> str:
    """InfluxDB's `{"error": "..."}` (1.x) or `{"message": "..."}` (2.x), or the start of the body."""
    try:
        document = json.loads(text)
    except ValueError:
        return text.strip()[:300]
    if isinstance(document, dict):
        message = document.get("error") or document.get("message")
        if isinstance(message, str):
            return message[:300]
    return text.strip()[:300]
