"""GraphQL over HTTP: which operation an HTTP request carries and whether its result had errors.

Pure functions over an exchange the HTTP/1 or HTTP/2 parser already framed (method, target,
content type and the decoded body, possibly cut by the body limit), so they work the same over
both; the HTTP parser calls `parse_request` on each request, `parse_response` on its response
when the request was GraphQL, and `apply` to turn its `http` call into a `graphql` one.

Recognised requests (GraphQL over HTTP, and what clients send in practice):

- POST with a JSON object holding `query` (a document) and/or the hash of an automatic persisted
  query (`extensions.persistedQuery.sha256Hash`, Apollo's APQ: the query may be absent), whatever
  the content type says (`application/json`, `application/graphql+json`, none, `text/plain`...);
- batched POST: a JSON array of such objects;
- GET with `query=` (and `operationName=`, `variables=`, `extensions=`) in the query string;
- POST `application/graphql` (the body is the document; `operationName` may be in the target);
- POST `application/x-www-form-urlencoded` with the GET parameters in the body.

`query` is a common parameter and JSON key outside GraphQL (search APIs, Elasticsearch): a value
counts as a GraphQL document when it starts like one (`{`, `query`, `mutation`, `subscription`,
`fragment`), or when something else says GraphQL (`operationName`, `variables` or `extensions`
beside it, a persisted-query hash, a content type or target path naming graphql). A document
graphql-core cannot parse is still GraphQL when that holds (note `graphql-parse-error`).

Decisions:

- The executed operation is the one `operationName` names, else the document's only one. With
  several and no name the first is reported (note `graphql-ambiguous-operation`: the server
  refuses it); a name the document does not define keeps the name, with no type
  (`graphql-operation-not-found`).
- A persisted query sent by hash alone has no document to say its type: "query" when sent by GET
  (Apollo Server runs only queries over GET), "" (unknown) otherwise. With no `operationName` its
  path is `persisted:<first 12 hex digits of the hash>`.
- `Operation.type` is "" when it cannot be known; `call.method` is then "" too (as OpenTelemetry
  leaves `graphql.operation.type` out when unknown).
- Bounded work: the body is at most the HTTP parser's body limit; `max_tokens` bounds the
  parser's work over the whole request (a batch shares it: each document gets what the earlier
  ones left, counted by graphql-core's parser); past it a document is read only by a short scan
  of its first tokens (note `graphql-token-limit`). A body cut by the body limit is read as far
  as it goes (complete JSON members decoded, a cut `query` string scanned) and noted
  `graphql-body-truncated`.

Nothing here raises on any input: the JSON and GraphQL errors these libraries raise for bad input
(ValueError, RecursionError, GraphQLError) are caught where they can arise, and the fuzz tests
hold the rest to it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from trawl.v1.calls_pb2 import ApiCall, GraphqlDetail, Outcome

if TYPE_CHECKING:
    from graphql.language.parser import Parser

# graphql-core is imported where a document is read, not with this module: it costs about 70 ms
# to import (a third of `trawl analyze`'s start-up), and most captures hold no GraphQL at all.

# Parser tokens one request may cost (all the documents of a batch together): graphql-core
# parses about 6 us a token here, so the default bounds a request at some 30 ms. Real documents
# are a few hundred to a few thousand tokens.
MAX_TOKENS = 5000
# Tokens (and characters) of the first-tokens scan that reads a cut or unparsable document.
SCAN_TOKENS = 256
SCAN_CHARS = 16 * 1024
# Bounds on the strings that reach the record.
MAX_NAME_CHARS = 256
MAX_HASH_CHARS = 128
MAX_ERROR_CHARS = 256
# `batch` labels kept in GraphqlDetail (`operations` still counts them all).
MAX_BATCH_LABELS = 64
# Members and elements the scan of a cut JSON body visits.
MAX_ITEMS = 4096

OPERATION_TYPES = frozenset({"query", "mutation", "subscription"})
DOCUMENT_STARTS = OPERATION_TYPES | {"fragment"}
# Keys that only a GraphQL request puts beside `query`.
GRAPHQL_KEYS = ("operationName", "variables", "extensions")
# The first bytes of the key of a GraphQL JSON request: a cheap test before any JSON parse, so
# that every JSON POST of an HTTP API can be offered to parse_request.
JSON_MARKERS = (b'"query"', b'"operationName"', b'"extensions"')
PARAM_MARKERS = ("query=", "operationName=", "extensions=")

_JSON = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation a request runs: type "query" | "mutation" | "subscription" ("" when it
    cannot be known), name ("" when anonymous), the persisted-query hash ("" when none)."""

    type: str
    name: str
    persisted_hash: str


@dataclass(frozen=True, slots=True)
class GraphqlRequest:
    """The operations of a request (one per entry of a batch, in order) and what was odd."""

    operations: tuple[Operation, ...]
    batched: bool
    notes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GraphqlResponse:
    """A GraphQL result (or a batch's results): `errors` summed over them, the first error's
    message (bounded), how many results; `complete` is False when the body was cut and only the
    part seen was counted."""

    errors: int
    first_error: str
    results: int
    complete: bool = True


# -- requests ----------------------------------------------------------------------------------


def parse_request(
    method: str,
    target: str,
    content_type: str,
    body: bytes,
    body_complete: bool,
    max_tokens: int = MAX_TOKENS,
) -> GraphqlRequest | None:
    """The GraphQL operations of an HTTP request, or None when it is not a GraphQL request.

    `target` is the request target (path and query), `body` the decoded body as kept (cut when
    `body_complete` is False), `max_tokens` the parser tokens the whole request may cost."""
    verb = method.upper()
    kind = content_type.partition(";")[0].strip().lower()
    path, _, query = target.partition("?")
    hint = "graphql" in kind or "graphql" in path.lower()
    reader = _Reader(verb, hint, max_tokens)
    if verb == "GET":
        if not query or not any(marker in query for marker in PARAM_MARKERS):
            return None
        return reader.params(query, cut_last=False)
    if verb != "POST" or not body:
        return None
    if kind == "application/graphql":
        name = _params(query).get("operationName", "") if query else ""
        reader.notes_truncated(body_complete)
        text = body.decode("utf-8", "replace")
        operation = reader.document(text, _bounded(name, MAX_NAME_CHARS), "", cut=not body_complete)
        return reader.result((operation,), batched=False)
    if kind == "application/x-www-form-urlencoded":
        text = body.decode("utf-8", "replace")
        if not any(marker in text for marker in PARAM_MARKERS):
            return None
        reader.notes_truncated(body_complete)
        return reader.params(text, cut_last=not body_complete)
    if kind.startswith("multipart/"):
        return None
    start = _first_byte(body)
    if start not in (b"{", b"[") or not any(marker in body for marker in JSON_MARKERS):
        return None
    return reader.json(body, body_complete)


class _Reader:
    """One request's reading: its method, whether anything outside the body says GraphQL, the
    token budget left, and the notes gathered."""

    def __init__(self, method: str, hint: bool, max_tokens: int) -> None:
        self.method = method
        self.hint = hint
        self.budget = max(0, max_tokens)
        self.notes: list[str] = []

    def note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

    def notes_truncated(self, complete: bool) -> None:
        if not complete:
            self.note("graphql-body-truncated")

    def result(self, operations: tuple[Operation, ...], batched: bool) -> GraphqlRequest:
        return GraphqlRequest(operations, batched, tuple(self.notes))

    # -- the shapes ---------------------------------------------------------------------------

    def params(self, encoded: str, cut_last: bool) -> GraphqlRequest | None:
        """GET's query string (or a form body): query, operationName, variables, extensions."""
        values = _params(encoded)
        members: dict[str, Any] = {}
        cut_query: str | None = None
        for key in ("query", "operationName", "variables"):
            if key in values:
                members[key] = values[key]
        if "extensions" in values:
            try:
                members["extensions"] = json.loads(values["extensions"])
            except (ValueError, RecursionError):
                members["extensions"] = None
        if cut_last and encoded.rpartition("&")[2].partition("=")[0] == "query" and "query" in members:
            cut_query = members.pop("query")
        operation = self.entry(members, cut_query)
        return None if operation is None else self.result((operation,), batched=False)

    def json(self, body: bytes, complete: bool) -> GraphqlRequest | None:
        value: Any = None
        parsed = False
        if complete:
            try:
                value = json.loads(body)
                parsed = True
            except (ValueError, RecursionError):
                pass
        if parsed:
            if isinstance(value, dict):
                operation = self.entry(value, None)
                return None if operation is None else self.result((operation,), batched=False)
            if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
                return self.batch([(item, None) for item in value], None)
            return None
        # Cut by the body limit (or not quite JSON): read the members that are whole.
        text = body.decode("utf-8", "replace")
        start = _SPACE.match(text, 0)
        pos = start.end() if start else 0
        if text.startswith("{", pos):
            members, cut_query = _cut_query(text, pos)
            if not members and cut_query is None:
                return None
            self.note("graphql-body-truncated" if not complete else "graphql-json-error")
            operation = self.entry(members, cut_query)
            return None if operation is None else self.result((operation,), batched=False)
        items, cut_at = _cut_array(text, pos)
        entries: list[tuple[Mapping[str, Any], str | None]] = []
        for item in items:
            if not isinstance(item, dict):
                return None
            entries.append((item, None))
        last: tuple[Mapping[str, Any], str | None] | None = None
        if cut_at is not None and text.startswith("{", cut_at):
            last = _cut_query(text, cut_at)
        if not entries and last is None:
            return None
        self.note("graphql-body-truncated" if not complete else "graphql-json-error")
        return self.batch(entries, last)

    def batch(
        self, entries: list[tuple[Mapping[str, Any], str | None]], last: tuple[Mapping[str, Any], str | None] | None
    ) -> GraphqlRequest | None:
        """A batch: `entries` whole, `last` the entry the cut fell in (dropped when too little of
        it arrived to say what it is)."""
        operations = []
        for members, cut_query in entries:
            operation = self.entry(members, cut_query)
            if operation is None:
                return None  # an array of which one entry is not GraphQL: not a GraphQL batch
            operations.append(operation)
        if last is not None:
            operation = self.entry(*last)
            if operation is not None:
                operations.append(operation)
        return self.result(tuple(operations), batched=True) if operations else None

    # -- one entry (an object of a batch, the GET parameters) -----------------------------------

    def entry(self, members: Mapping[str, Any], cut_query: str | None) -> Operation | None:
        """The operation of one request object, or None when its shape is not GraphQL's.
        `cut_query`: the start of a `query` string the body limit cut."""
        query = members.get("query")
        text = query if isinstance(query, str) else cut_query
        raw_name = members.get("operationName")
        name = _bounded(raw_name, MAX_NAME_CHARS) if isinstance(raw_name, str) else ""
        digest = _persisted_hash(members.get("extensions"))
        keyed = any(key in members for key in GRAPHQL_KEYS)
        if text is None:
            if digest:
                # A persisted query by hash alone: Apollo Server runs only queries over GET.
                return Operation("query" if self.method == "GET" else "", name, digest)
            if (name and ("variables" in members or "extensions" in members)) or (self.hint and keyed):
                # A GraphQL client's request with no document (yet: where the body was cut, the
                # query may have followed, as Apollo Client puts it last).
                if "graphql-body-truncated" not in self.notes:
                    self.note("graphql-no-query")
                return Operation("", name, "")
            return None
        if not (digest or keyed or self.hint or _starts_document(text)):
            return None
        return self.document(text, name, digest, cut=cut_query is not None)

    def document(self, text: str, name: str, digest: str, cut: bool) -> Operation:
        """The executed operation of a document: the one `name` names, else the only one."""
        from graphql.error import GraphQLError
        from graphql.language import OperationDefinitionNode, Source
        from graphql.language.parser import Parser

        if cut:
            return _pick(_scan(text, cut=True), name, digest)
        operations: list[tuple[str, str]] | None = None
        if self.budget <= 0:
            self.note("graphql-token-limit")
        else:
            parser = Parser(Source(text), no_location=True, max_tokens=self.budget)
            try:
                document = parser.parse_document()
            except GraphQLError as exc:
                limited = "tokens" in exc.message and "aborted" in exc.message
                self.note("graphql-token-limit" if limited else "graphql-parse-error")
                self.budget = 0 if limited else self.budget - _token_count(parser, text)
            except RecursionError:  # graphql-core before 3.3 has no nesting limit of its own
                self.note("graphql-parse-error")
                self.budget -= _token_count(parser, text)
            else:
                self.budget -= _token_count(parser, text)
                operations = [
                    (
                        definition.operation.value,
                        _bounded(definition.name.value, MAX_NAME_CHARS) if definition.name else "",
                    )
                    for definition in document.definitions
                    if isinstance(definition, OperationDefinitionNode)
                ]
        if operations is None:
            return _pick(_scan(text, cut=False), name, digest)
        if name:
            for kind, defined in operations:
                if defined == name:
                    return Operation(kind, name, digest)
            self.note("graphql-operation-not-found")
            return Operation("", name, digest)
        if not operations:
            self.note("graphql-no-operation")
            return Operation("", "", digest)
        if len(operations) > 1:
            self.note("graphql-ambiguous-operation")
        kind, defined = operations[0]
        return Operation(kind, defined, digest)


def _pick(scanned: list[tuple[str, str]], name: str, digest: str) -> Operation:
    """The operation of a document read only by its first tokens (cut or unparsable)."""
    for kind, defined in scanned:
        if not name or defined == name:
            return Operation(kind, defined, digest)
    return Operation("", name, digest)


def _scan(text: str, cut: bool) -> list[tuple[str, str]]:
    """(type, name) of the operations defined in the first SCAN_TOKENS tokens of a document cut
    short (`cut`) or refused by the parser, read with graphql-core's lexer: an operation starts
    at the outermost level with `query`/`mutation`/`subscription` (its name follows) or `{`."""
    from graphql.error import GraphQLError
    from graphql.language import Lexer, Source, TokenKind

    source = text[:SCAN_CHARS]
    # A token that ends where a cut text ends may be part of a longer one (`GetOr|der`).
    end = len(source) if cut or len(source) < len(text) else len(source) + 1
    lexer = Lexer(Source(source))
    found: list[tuple[str, str]] = []
    depth = parens = 0
    header = False  # between a definition's first word and its selection set
    pending = ""  # an operation type whose name may come next
    for _ in range(SCAN_TOKENS):
        try:
            token = lexer.advance()
        except GraphQLError:
            break
        kind = token.kind
        if kind == TokenKind.EOF or token.end >= end:
            break
        if pending:
            named = kind == TokenKind.NAME
            found.append((pending, _bounded(token.value or "", MAX_NAME_CHARS) if named else ""))
            pending = ""
            if named:
                continue
        if kind == TokenKind.PAREN_L:
            parens += 1
        elif kind == TokenKind.PAREN_R:
            parens = max(0, parens - 1)
        elif parens:
            continue  # braces inside arguments and variable defaults are object values
        elif kind == TokenKind.BRACE_L:
            if depth == 0 and not header:
                found.append(("query", ""))  # the `{ ... }` shorthand
            header = False
            depth += 1
        elif kind == TokenKind.BRACE_R:
            depth = max(0, depth - 1)
        elif depth == 0 and not header and kind == TokenKind.NAME:
            header = True
            if token.value in OPERATION_TYPES:
                pending = token.value or ""
    if pending:
        found.append((pending, ""))
    return found


def _starts_document(text: str) -> bool:
    """The text's first token starts an executable GraphQL definition."""
    from graphql.error import GraphQLError
    from graphql.language import Lexer, Source, TokenKind

    try:
        token = Lexer(Source(text[:SCAN_CHARS])).advance()
    except GraphQLError:
        return False
    return token.kind == TokenKind.BRACE_L or (token.kind == TokenKind.NAME and token.value in DOCUMENT_STARTS)


def _token_count(parser: Parser, text: str) -> int:
    # graphql-core 3.3 counts the tokens it read; 3.2 does not: charge the text's length then.
    count = getattr(parser, "token_count", None)
    return count if isinstance(count, int) else len(text)


def _persisted_hash(extensions: Any) -> str:
    if not isinstance(extensions, dict):
        return ""
    persisted = extensions.get("persistedQuery")
    if not isinstance(persisted, dict):
        return ""
    digest = persisted.get("sha256Hash")
    return _bounded(digest, MAX_HASH_CHARS) if isinstance(digest, str) else ""


def _params(encoded: str) -> dict[str, str]:
    """The first value of each parameter of a query string or form body, unquoted."""
    values: dict[str, str] = {}
    for pair in encoded.split("&"):
        raw_name, _, raw_value = pair.partition("=")
        name = unquote_plus(raw_name)
        if name in ("query", "operationName", "variables", "extensions") and name not in values:
            values[name] = unquote_plus(raw_value)
    return values


# -- JSON cut by the body limit ------------------------------------------------------------------


def _cut_object(text: str, pos: int) -> tuple[dict[str, Any], str | None, int]:
    """The whole members of the JSON object at text[pos] ("{") whose text may be cut, the key
    whose value the cut fell in (None when the cut fell elsewhere) and where that value starts."""
    members: dict[str, Any] = {}
    pos += 1
    for _ in range(MAX_ITEMS):
        pos = _skip_space(text, pos)
        if pos >= len(text) or text[pos] == "}":
            break
        if text[pos] == ",":
            pos += 1
            continue
        try:
            key, pos = _JSON.raw_decode(text, pos)
        except (ValueError, RecursionError):
            break
        pos = _skip_space(text, pos)
        if not isinstance(key, str) or not text.startswith(":", pos):
            break
        pos = _skip_space(text, pos + 1)
        try:
            members[key], pos = _JSON.raw_decode(text, pos)
        except (ValueError, RecursionError):
            return members, key, pos
    return members, None, pos


def _cut_query(text: str, pos: int) -> tuple[dict[str, Any], str | None]:
    """A cut request object: its whole members, and the start of its `query` string when that
    is where the cut fell."""
    members, cut_key, cut_at = _cut_object(text, pos)
    if cut_key == "query":
        if cut_at >= len(text):
            return members, ""  # `{"query":` and the cut
        if text.startswith('"', cut_at):
            return members, _cut_string(text[cut_at + 1 :])
    elif cut_key is not None:
        members.setdefault(cut_key, None)  # its value is lost, but the key says what it is
    return members, None


def _cut_array(text: str, pos: int) -> tuple[list[Any], int | None]:
    """The whole elements of the JSON array at text[pos] ("[") whose text may be cut, and where
    the element the cut fell in starts (None when none did)."""
    items: list[Any] = []
    if not text.startswith("[", pos):
        return items, None
    pos += 1
    for _ in range(MAX_ITEMS):
        pos = _skip_space(text, pos)
        if pos >= len(text) or text[pos] == "]":
            return items, None
        if text[pos] == ",":
            pos += 1
            continue
        try:
            item, pos = _JSON.raw_decode(text, pos)
        except (ValueError, RecursionError):
            return items, pos
        items.append(item)
    return items, None


def _cut_string(rest: str) -> str | None:
    """The text of a JSON string whose end was cut: `rest` follows the opening quote; a cut
    escape sequence at its end is dropped."""
    for drop in range(min(6, len(rest)) + 1):
        try:
            value = json.loads('"' + rest[: len(rest) - drop] + '"')
        except ValueError:
            continue
        return value if isinstance(value, str) else None
    return None


def _skip_space(text: str, pos: int) -> int:
    match = _SPACE.match(text, pos)
    return match.end() if match else pos


def _first_byte(body: bytes) -> bytes:
    start = body[:1]
    return body.lstrip()[:1] if start.isspace() else start


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit]


# -- responses ---------------------------------------------------------------------------------


def parse_response(content_type: str, body: bytes, body_complete: bool) -> GraphqlResponse | None:
    """The errors of a GraphQL result (`{"data": ..., "errors": [...]}`), or of the array of
    results answering a batch; None when the body is not a GraphQL result. `content_type` may be
    application/json, application/graphql-response+json, or anything over a JSON body."""
    kind = content_type.partition(";")[0].strip().lower()
    if kind and "json" not in kind and not kind.startswith("text/plain"):
        return None
    if _first_byte(body) not in (b"{", b"["):
        return None
    if body_complete:
        try:
            value = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if isinstance(value, dict):
            return _results([value], complete=True)
        if isinstance(value, list) and value:
            return _results(value, complete=True)
        return None
    text = body.decode("utf-8", "replace")
    pos = _skip_space(text, 0)
    if text.startswith("{", pos):
        return _cut_result(text, pos, [])
    items, cut_at = _cut_array(text, pos)
    if cut_at is not None and text.startswith("{", cut_at):
        return _cut_result(text, cut_at, items)
    return _results(items, complete=False) if items else None


def _results(items: list[Any], complete: bool) -> GraphqlResponse | None:
    errors = 0
    first = ""
    for item in items:
        if not isinstance(item, dict) or ("data" not in item and "errors" not in item):
            return None
        count, message = _errors(item.get("errors"))
        if count and not errors:
            first = message
        errors += count
    return GraphqlResponse(errors, first, len(items), complete)


def _cut_result(text: str, pos: int, before: list[Any]) -> GraphqlResponse | None:
    """A result object at text[pos] that the body limit cut, after the whole results `before`:
    its errors as far as they were seen (none when the cut fell in `data` before them)."""
    counted = _results(before, complete=False) if before else GraphqlResponse(0, "", 0, False)
    members, cut_key, cut_at = _cut_object(text, pos)
    if counted is None or not ("data" in members or "errors" in members or cut_key in ("data", "errors")):
        return None
    count, message = _errors(members.get("errors"))
    if cut_key == "errors" and text.startswith("[", cut_at):
        seen, item_at = _cut_array(text, cut_at)
        if item_at is not None and text.startswith("{", item_at):
            seen.append(_cut_object(text, item_at)[0])
        count, message = _errors(seen)
    first = counted.first_error if counted.errors else message
    return GraphqlResponse(counted.errors + count, first, counted.results + 1, complete=False)


def _errors(value: Any) -> tuple[int, str]:
    """How many errors a result's `errors` holds, and the first one's message."""
    if value is None:
        return 0, ""
    if not isinstance(value, list):
        return 1, _bounded(value, MAX_ERROR_CHARS) if isinstance(value, str) else ""
    if not value:
        return 0, ""
    head = value[0]
    message = head.get("message") if isinstance(head, dict) else head
    return len(value), _bounded(message, MAX_ERROR_CHARS) if isinstance(message, str) else ""


# -- the record --------------------------------------------------------------------------------


def operation_label(operation: Operation) -> str:
    """What `path` shows: the operation's name, `persisted:<12 hex>` for a persisted query known
    only by its hash, else "anonymous"."""
    if operation.name:
        return operation.name
    if operation.persisted_hash:
        return "persisted:" + operation.persisted_hash[:12]
    return "anonymous"


def apply(
    call: ApiCall,
    request: GraphqlRequest,
    response: GraphqlResponse | None,
    http_version: str,
    http_status: int,
) -> None:
    """Turn an HTTP call (method, path = the request target, status, outcome, http detail filled
    by the HTTP parser) into a GraphQL one: protocol "graphql", method = the (first) operation's
    type, path = its label, status kept (the HTTP status); GraphqlDetail replaces the http detail
    (the oneof holds one) and carries the target, HTTP version and status over. The outcome turns
    to error when the result has errors (even under HTTP 200) or the status is 5xx; a call
    without a response (or cancelled) keeps its outcome. Call it after `finish_call` (which would
    set the outcome from the HTTP status alone) and while `path` still holds the target."""
    first = request.operations[0] if request.operations else Operation("", "", "")
    target = call.path
    call.protocol = "graphql"
    call.method = first.type
    call.path = operation_label(first)
    detail = GraphqlDetail(
        operation_type=first.type,
        operation_name=first.name,
        persisted_query_hash=first.persisted_hash,
        operations=len(request.operations),
        http_version=http_version,
        http_status=max(0, http_status),
        target=target,
    )
    if request.batched:
        detail.batch.extend(
            f"{operation.type} {operation_label(operation)}" if operation.type else operation_label(operation)
            for operation in request.operations[:MAX_BATCH_LABELS]
        )
    notes = list(request.notes)
    if request.batched and len(request.operations) > MAX_BATCH_LABELS:
        notes.append("graphql-batch-labels-cut")
    if response is not None:
        detail.errors = response.errors
        detail.first_error = response.first_error
        if not response.complete:
            notes.append("graphql-response-truncated")
    call.graphql.CopyFrom(detail)
    for note in notes:
        if note not in call.notes:
            call.notes.append(note)
    if call.outcome in (Outcome.OUTCOME_OK, Outcome.OUTCOME_ERROR, Outcome.OUTCOME_UNSPECIFIED) and (
        (response is not None and response.errors > 0) or http_status >= 500
    ):
        call.outcome = Outcome.OUTCOME_ERROR


__all__ = [
    "MAX_TOKENS",
    "GraphqlRequest",
    "GraphqlResponse",
    "Operation",
    "apply",
    "operation_label",
    "parse_request",
    "parse_response",
]


def from_http(call: ApiCall, status: int) -> None:
    """Offer a finished HTTP call (HTTP/1.1 or HTTP/2, `call.http` filled, `path` the target)
    to GraphQL: a GraphQL operation becomes a `graphql` call, anything else stays as it is.
    `status` is the HTTP status (0 when no response came)."""
    detail = call.http
    request = parse_request(
        call.method, call.path, detail.request_content_type, call.request.body, call.request.body_truncated == 0
    )
    if request is None:
        return
    response = None
    if call.response.body:
        response = parse_response(detail.response_content_type, call.response.body, call.response.body_truncated == 0)
    apply(call, request, response, detail.version or "1.1", status)
