"""A stand-in for Elasticsearch's `_bulk` API, for tests: no Elasticsearch or OpenSearch server
can be installed here (neither is packaged by Debian, and their own downloads are not reachable),
so this aiohttp server speaks the part of the protocol the alerter uses, as the reference
describes it and as the official `elasticsearch` Python client expects it:

- `POST /_bulk` and `POST /<index>/_bulk`: NDJSON, action lines (`index`, `create`, `update`,
  `delete`) each followed by its source line (not for `delete`); the body must end with a
  newline (else 400 `illegal_argument_exception`, as Elasticsearch answers); a line that is not
  JSON is a 400 `x_content_parse_exception` for the whole request. The answer is the real shape:
  `{"took", "errors", "items": [{"index": {"_index", "_id", "_version", "result", "_shards",
  "_seq_no", "_primary_term", "status"}}]}`, an item's failure as `{"status", "error": {"type",
  "reason"}}`; `create` of an existing id is a 409 `version_conflict_engine_exception`; an index
  name Elasticsearch refuses (uppercase, `_` first...) a 400 `invalid_index_name_exception`.
- `GET /` (the cluster's banner), `GET /<index>/_doc/<id>`, `POST /<index>/_refresh`.
- Every answer carries `X-Elastic-Product: Elasticsearch`, which the official client checks.
- Optional authentication: an API key (`Authorization: ApiKey ...`) or basic credentials; a
  request without them is a 401 `security_exception`.

Faults on demand: `fail_requests` (statuses for the next whole requests: 429 is
`es_rejected_execution_exception`, 5xx `unavailable_shards_exception`) and `item_faults`
(statuses for the next items of an index: 429 and 503 as above, 400 `mapper_parsing_exception`).
What arrives is kept: `requests` (headers and raw body) and `documents` (index -> id -> source).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

PRODUCT_HEADER = {"X-Elastic-Product": "Elasticsearch"}
_BAD_INDEX_CHARS = set('\\/*?"<>| ,#:')
_ERROR_TYPES = {
    400: "mapper_parsing_exception",
    409: "version_conflict_engine_exception",
    429: "es_rejected_execution_exception",
    500: "exception",
    503: "unavailable_shards_exception",
}


def _index_problem(name: str) -> str | None:
    if not name or name in (".", ".."):
        return "must not be empty, '.' or '..'"
    if name != name.lower():
        return "must be lowercase"
    if name[0] in "-_+":
        return "must not start with '_', '-', or '+'"
    if _BAD_INDEX_CHARS & set(name):
        return 'must not contain the following characters [\\, /, *, ?, ", <, >, |, " ", ",", #, :]'
    return None


@dataclass
class ElasticBulk:
    """The stand-in's state; `app()` serves it."""

    api_key: str | None = None
    basic: tuple[str, str] | None = None
    fail_requests: list[int] = field(default_factory=list)
    item_faults: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    documents: dict[str, dict[str, dict[str, Any]]] = field(default_factory=lambda: defaultdict(dict))
    _versions: dict[tuple[str, str], int] = field(default_factory=dict)
    _seq_no: int = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=100 * 1024 * 1024)
        app.router.add_get("/", self.banner)
        app.router.add_post("/_bulk", self.bulk)
        app.router.add_put("/_bulk", self.bulk)
        app.router.add_post("/{index}/_bulk", self.bulk)
        app.router.add_get("/{index}/_doc/{id}", self.get_document)
        app.router.add_post("/{index}/_refresh", self.refresh)
        return app

    def _error(self, status: int, kind: str, reason: str) -> web.Response:
        body = {"error": {"root_cause": [{"type": kind, "reason": reason}], "type": kind, "reason": reason}}
        body["status"] = status
        return web.json_response(body, status=status, headers=PRODUCT_HEADER)

    def _authorized(self, request: web.Request) -> bool:
        if self.api_key is None and self.basic is None:
            return True
        given = request.headers.get("Authorization", "")
        if self.api_key is not None and given == f"ApiKey {self.api_key}":
            return True
        if self.basic is not None:
            expected = base64.b64encode(f"{self.basic[0]}:{self.basic[1]}".encode()).decode()
            return given == f"Basic {expected}"
        return False

    async def banner(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "name": "stand-in",
                "cluster_name": "trawl-tests",
                "version": {"number": "8.15.0", "build_flavor": "default", "lucene_version": "9.11.1"},
                "tagline": "You Know, for Search",
            },
            headers=PRODUCT_HEADER,
        )

    async def refresh(self, request: web.Request) -> web.Response:
        return web.json_response({"_shards": {"total": 1, "successful": 1, "failed": 0}}, headers=PRODUCT_HEADER)

    async def get_document(self, request: web.Request) -> web.Response:
        index, doc_id = request.match_info["index"], request.match_info["id"]
        source = self.documents.get(index, {}).get(doc_id)
        if source is None:
            return web.json_response(
                {"_index": index, "_id": doc_id, "found": False}, status=404, headers=PRODUCT_HEADER
            )
        return web.json_response(
            {
                "_index": index,
                "_id": doc_id,
                "_version": self._versions[(index, doc_id)],
                "_seq_no": 0,
                "_primary_term": 1,
                "found": True,
                "_source": source,
            },
            headers=PRODUCT_HEADER,
        )

    async def bulk(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.requests.append((dict(request.headers), raw))
        if not self._authorized(request):
            response = self._error(401, "security_exception", "missing authentication credentials for REST request")
            response.headers["WWW-Authenticate"] = 'Basic realm="security", charset="UTF-8"'
            return response
        if self.fail_requests:
            status = self.fail_requests.pop(0)
            return self._error(status, _ERROR_TYPES.get(status, "exception"), f"stand-in told to answer {status}")
        content_type = request.headers.get("Content-Type", "")
        if "json" not in content_type:
            return self._error(406, "media_type_header_exception", f"Content-Type [{content_type}] is not supported")
        if not raw.endswith(b"\n"):
            return self._error(
                400, "illegal_argument_exception", "The bulk request must be terminated by a newline [\\n]"
            )
        lines = raw.split(b"\n")[:-1]
        default_index = request.match_info.get("index")
        started = time.monotonic()
        items: list[dict[str, Any]] = []
        position = 0
        while position < len(lines):
            try:
                header = json.loads(lines[position])
            except ValueError:
                return self._error(400, "x_content_parse_exception", f"[{position + 1}:1] malformed action line")
            if not isinstance(header, dict) or len(header) != 1:
                return self._error(400, "illegal_argument_exception", "Malformed action/metadata line")
            ((operation, meta),) = header.items()
            if operation not in ("index", "create", "update", "delete"):
                return self._error(
                    400, "illegal_argument_exception", f"Malformed action/metadata line [{position + 1}]"
                )
            position += 1
            source: Any = None
            if operation != "delete":
                if position >= len(lines):
                    return self._error(400, "illegal_argument_exception", "source is missing for the last action")
                try:
                    source = json.loads(lines[position])
                except ValueError:
                    return self._error(400, "x_content_parse_exception", f"[{position + 1}:1] malformed source")
                position += 1
            items.append({operation: self._item(operation, dict(meta), source, default_index)})
        body = {
            "took": int((time.monotonic() - started) * 1000),
            "errors": any("error" in next(iter(item.values())) for item in items),
            "items": items,
        }
        return web.json_response(body, headers=PRODUCT_HEADER)

    def _item(self, operation: str, meta: dict[str, Any], source: Any, default_index: str | None) -> dict[str, Any]:
        index = meta.get("_index", default_index) or ""
        doc_id = str(meta.get("_id") or secrets.token_urlsafe(15)[:20])
        out: dict[str, Any] = {"_index": index, "_id": doc_id}
        problem = _index_problem(index)
        if problem:
            out["status"] = 400
            out["error"] = {
                "type": "invalid_index_name_exception",
                "reason": f"Invalid index name [{index}], {problem}",
            }
            return out
        faults = self.item_faults.get(index)
        if faults:
            status = faults.pop(0)
            out["status"] = status
            out["error"] = {
                "type": _ERROR_TYPES.get(status, "exception"),
                "reason": f"stand-in told to answer {status}",
            }
            return out
        key = (index, doc_id)
        exists = doc_id in self.documents[index]
        if operation == "create" and exists:
            out["status"] = 409
            out["error"] = {
                "type": "version_conflict_engine_exception",
                "reason": f"[{doc_id}]: version conflict, document already exists",
            }
            return out
        if operation == "delete":
            if not exists:
                out.update(status=404, result="not_found")
                return out
            del self.documents[index][doc_id]
            result, status = "deleted", 200
        elif operation == "update":
            if not exists:
                out["status"] = 404
                out["error"] = {"type": "document_missing_exception", "reason": f"[{doc_id}]: document missing"}
                return out
            if not isinstance(source, dict) or not isinstance(source.get("doc"), dict):
                out["status"] = 400
                out["error"] = {"type": "action_request_validation_exception", "reason": "script or doc is missing"}
                return out
            self.documents[index][doc_id].update(source["doc"])
            result, status = "updated", 200
        else:
            if not isinstance(source, dict):
                out["status"] = 400
                out["error"] = {"type": "mapper_parsing_exception", "reason": "failed to parse: not an object"}
                return out
            self.documents[index][doc_id] = source
            result, status = ("updated", 200) if exists else ("created", 201)
        self._versions[key] = self._versions.get(key, 0) + 1
        self._seq_no += 1
        out.update(
            _version=self._versions[key],
            result=result,
            _shards={"total": 2, "successful": 1, "failed": 0},
            _seq_no=self._seq_no - 1,
            _primary_term=1,
            status=status,
        )
        return out
