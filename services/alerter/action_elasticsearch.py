"""The `elasticsearch` action: alerts (and, with `include_call`, their calls) through `_bulk`.

One `POST <url>/_bulk` per alert, NDJSON (`Content-Type: application/x-ndjson`): an `index`
action line and the document for the alert, and one more pair for its call:

    {"index":{"_index":"trawl-alerts","_id":"<alert id>"}}
    {"@timestamp":"2023-11-14T22:13:20.000000000Z","id":"...","rule":"...","call":{...},...}
    {"index":{"_index":"trawl-calls","_id":"<call id>"}}
    {"@timestamp":"...","id":"<call id>","protocol":"http",...}

Documents are the protobuf JSON mapping with proto field names (as the webhook sends) and an
`@timestamp` (the firing or resolve time; the call's request time), which Kibana and
OpenSearch Dashboards take as the time field. Each document's `_id` is the alert's (or call's)
id, so a retry, or an alert stored twice, overwrites the same document instead of adding one.

Elasticsearch answers a bulk request with 200 and `errors: true` when some items failed; each
item has its own `status`. Items answered 429 or 5xx are sent again (alone) with the backoff;
items answered otherwise (a mapping conflict, a closed index) are counted
(`trawl_alerter_elasticsearch_item_errors_total` by index and status) and make the alert's
delivery final: it is dead-lettered with the first item's error. The whole request answered
408, 429 or 5xx is retried; 4xx (a refused login, a body too large) is final.

Authentication: `Authorization: ApiKey <encoded>` (the `encoded` value Elasticsearch gives
for an API key), or basic auth with a user and password.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from google.protobuf.json_format import MessageToDict

from trawl.alerter.action_types import ElasticsearchAction
from trawl.alerter.config import ActionSettings
from trawl.alerter.delivery import DELIVERED, Delivery, HttpSession, Outcome, basic_auth, http_outcome, timestamp
from trawl.metrics import Registry
from trawl.v1 import alerts_pb2

NDJSON = "application/x-ndjson"
RETRYABLE_ITEM_STATUS = frozenset({408, 429})


@dataclass(frozen=True)
class BulkItem:
    """One document: its action line and source, ready to send."""

    index: str
    doc_id: str
    lines: bytes


def bulk_items(alert: alerts_pb2.Alert, action: ElasticsearchAction) -> list[BulkItem]:
    at = alert.resolved_at if alert.resolved and alert.resolved_at else alert.fired_at
    document: dict[str, Any] = {"@timestamp": timestamp(at)}
    document.update(MessageToDict(alert, preserving_proto_field_name=True))
    items = [_item(action.index, alert.id, document)]
    if action.include_call and alert.call.id:
        call: dict[str, Any] = {"@timestamp": timestamp(alert.call.request.ts or at)}
        call.update(MessageToDict(alert.call, preserving_proto_field_name=True))
        items.append(_item(action.call_index, alert.call.id, call))
    return items


def _item(index: str, doc_id: str, source: dict[str, Any]) -> BulkItem:
    head = json.dumps({"index": {"_index": index, "_id": doc_id}}, separators=(",", ":"))
    body = json.dumps(source, separators=(",", ":"), ensure_ascii=False)
    return BulkItem(index, doc_id, f"{head}\n{body}\n".encode())


class ElasticsearchSender:
    """Indexes alerts through Elasticsearch's (or OpenSearch's) `_bulk` API over one aiohttp session."""

    def __init__(self, delivery: Delivery, settings: ActionSettings, session: HttpSession, metrics: Registry) -> None:
        self.delivery = delivery
        self.settings = settings
        self.session = session
        self._indexed = metrics.counter(
            "trawl_alerter_elasticsearch_documents_total", "Documents indexed in Elasticsearch, per index"
        )
        self._item_errors = metrics.counter(
            "trawl_alerter_elasticsearch_item_errors_total",
            "Bulk items Elasticsearch refused, per index and status (429 and 5xx are sent again)",
        )

    async def deliver(self, alert: alerts_pb2.Alert, action: ElasticsearchAction) -> bool:
        pending = bulk_items(alert, action)
        url = action.url.rstrip("/") + "/_bulk"
        headers = {"Content-Type": NDJSON, "Accept": "application/json", "User-Agent": "trawl-alerter"}
        if action.api_key:
            headers["Authorization"] = f"ApiKey {action.api_key}"
        elif action.user is not None:
            headers["Authorization"] = basic_auth(action.user, action.password or "")
        from aiohttp import ClientTimeout  # loaded with the session (delivery.LazySession)

        timeout = ClientTimeout(total=self.settings.timeout_s)

        async def attempt() -> Outcome:
            nonlocal pending
            body = b"".join(item.lines for item in pending)
            async with self.session().post(
                url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                raw = await response.read()
                if response.status != 200:
                    return http_outcome(response.status, _error_text(raw))
            try:
                answer = json.loads(raw)
                results = answer["items"]
                if not isinstance(results, list) or len(results) != len(pending):
                    raise ValueError(f"{len(results)} items answered for {len(pending)} sent")
            except (ValueError, KeyError, TypeError) as exc:
                return Outcome(f"not a _bulk answer: {exc}")
            again: list[BulkItem] = []
            refused: list[str] = []
            for item, result in zip(pending, results, strict=True):
                outcome = _item_outcome(result)
                status = outcome[0]
                if 200 <= status < 300:
                    self._indexed.inc(index=item.index)
                    continue
                self._item_errors.inc(index=item.index, status=str(status))
                if status >= 500 or status in RETRYABLE_ITEM_STATUS:
                    again.append(item)
                else:
                    refused.append(f"{item.index}/{item.doc_id}: HTTP {status} {outcome[1]}")
            pending = again
            if refused:
                return Outcome(f"{len(refused)} bulk item(s) refused: {refused[0]}", retryable=False)
            if again:
                return Outcome(f"{len(again)} bulk item(s) to send again (429/5xx)")
            return DELIVERED

        return await self.delivery.run(alert, action, self.settings, attempt)


def _item_outcome(result: object) -> tuple[int, str]:
    """(status, error) of one `items` entry: {"index": {"status": 201, "error": {...}}}."""
    if not isinstance(result, dict) or len(result) != 1:
        return 0, "not a bulk item answer"
    (body,) = result.values()
    if not isinstance(body, dict):
        return 0, "not a bulk item answer"
    status = body.get("status")
    error = body.get("error")
    reason = ""
    if isinstance(error, dict):
        reason = f"{error.get('type', '')}: {error.get('reason', '')}"
    elif error is not None:
        reason = str(error)
    return (status if isinstance(status, int) else 0), reason[:300]


def _error_text(raw: bytes) -> str:
    try:
        document = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace").strip()[:300]
    error = document.get("error") if isinstance(document, dict) else None
    if isinstance(error, dict):
        return f"{error.get('type', '')}: {error.get('reason', '')}"[:300]
    return str(error or document)[:300]
