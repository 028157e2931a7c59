"""Redaction: secrets are replaced by "[REDACTED]" before a call leaves the dissector.

Applied to every call, whatever its protocol: header values whose name matches the header
list; query parameters (in the path and in URL-valued headers such as Referer and Location)
and the password of a URL's user information (`http://user:[REDACTED]@host/`); form fields,
multipart/form-data fields and JSON object keys (also when written with `\\u` escapes) that
match the field list; Redis credentials (AUTH, HELLO's AUTH, MIGRATE's AUTH/AUTH2, CONFIG SET of
passwords, ACL SETUSER password rules: `redis.redact_args`). Names compare case-insensitively and may
use shell wildcards (`*token*`). A JSON body cut short by the body limit is still redacted:
keys are then found by pattern rather than by parsing. (A body whose Content-Encoding the
parser could not decode never gets here: the HTTP parser drops it, since what cannot be read
cannot be redacted.)
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote_plus

from trawl.dissector.protocols.redis import redact_args as redact_redis_args
from trawl.v1.calls_pb2 import ApiCall, Message

REDACTED = "[REDACTED]"
_KEEP, _REDACT, _URL = 0, 1, 2
# Header values that are URLs (or request targets, HTTP/2's `:path`) whose query may hold secrets.
URL_HEADERS = frozenset(
    {"referer", "location", "content-location", "origin", "x-original-url", "x-rewrite-url", ":path"}
)
# scheme://user:password@ (or //user:password@): group 1 up to the user, group 2 the password.
URL_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//[^/?#@:]*):([^/?#@]*)@")
MULTIPART_FIELD = re.compile(
    rb'(Content-Disposition:[^\r\n]*?\bname="([^"\r\n]*)"[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n)(.*?)(?=\r\n--|\Z)',
    re.IGNORECASE | re.DOTALL,
)
# GraphQL: an argument or input field with a string value (`password: "x"`, `key: """x"""`);
# the same inside a JSON string (quotes escaped); a `$variable` named in a message; an error's
# message in a result cut short.
GRAPHQL_ARGUMENT = re.compile(r'([_A-Za-z][_0-9A-Za-z]*)(\s*:\s*)("""(?:[^"\\]|\\.|"(?!""))*"""|"(?:[^"\\\n]|\\.)*")')
GRAPHQL_ESCAPED_ARGUMENT = re.compile(rb'([_A-Za-z][_0-9A-Za-z]*)(\s*:\s*)\\"(?:[^"\\]|\\[^"])*\\"')
GRAPHQL_VARIABLE = re.compile(r"\$([_A-Za-z][_0-9A-Za-z]*)")
GRAPHQL_ERROR_MESSAGE = re.compile(rb'("message"\s*:\s*)"((?:[^"\\]|\\.)*)"?')
# A form body (`name=value&...`) as opposed to a GraphQL document or JSON.
FORM_BODY = re.compile(rb"\s*[\w.%+\-\[\]]+=")
# A query parameter value that is a JSON object or array, raw or percent-encoded.
JSON_PARAM_STARTS = ("{", "[", "%7B", "%7b", "%5B", "%5b")
JSON_KEY = re.compile(rb'"((?:[^"\\]|\\.){1,256})"\s*:')
JSON_PAIR = re.compile(rb'"((?:[^"\\]|\\.){1,256})"\s*:\s*("(?:[^"\\]|\\.)*"?|[^,}\]\s]*)')


class _Matcher:
    """Exact names in a set, wildcard names in one compiled pattern."""

    def __init__(self, names: Iterable[str]) -> None:
        exact: set[str] = set()
        patterns: list[str] = []
        for name in names:
            lowered = name.strip().lower()
            if not lowered:
                continue
            if any(ch in lowered for ch in "*?["):
                patterns.append(fnmatch.translate(lowered))
            else:
                exact.add(lowered)
        self.exact = frozenset(exact)
        self.pattern = re.compile("|".join(patterns)) if patterns else None
        self.cache: dict[str, bool] = {}

    def __call__(self, name: str) -> bool:
        hit = self.cache.get(name)
        if hit is None:
            lowered = name.lower()
            hit = lowered in self.exact or (self.pattern is not None and self.pattern.match(lowered) is not None)
            if len(self.cache) < 4096:
                self.cache[name] = hit
        return hit


class Redactor:
    """Configured once from the dissector's settings, applied to each outgoing call."""

    def __init__(self, headers: Iterable[str], fields: Iterable[str]) -> None:
        self.header = _Matcher(headers)
        self.field = _Matcher(fields)
        # Per header name: REDACT, URL (may carry a query) or KEEP; the same few names recur.
        self._header_kind: dict[str, int] = {}
        # Per raw parameter name and per raw JSON key: does it name a secret?
        self._param_hit: dict[str, bool] = {}
        self._key_hit: dict[bytes, bool] = {}

    def _kind(self, name: str) -> int:
        kind = self._header_kind.get(name)
        if kind is None:
            kind = _REDACT if self.header(name) else _URL if name.lower() in URL_HEADERS else _KEEP
            if len(self._header_kind) < 4096:
                self._header_kind[name] = kind
        return kind

    # -- the decisions, one name at a time (the compiled HTTP/1 lane asks these and caches them) --

    def header_kind(self, name: str) -> int:
        """0: keep the value; 1: redact it; 2: a URL-valued header whose query may hold secrets."""
        kind = self._header_kind.get(name)
        return self._kind(name) if kind is None else kind

    def param_is_secret(self, raw_name: str) -> bool:
        """A query parameter's name as written (before unquoting) names a secret."""
        hit = self._param_hit.get(raw_name)
        if hit is None:
            hit = self.field(unquote_plus(raw_name))
            if len(self._param_hit) < 4096:
                self._param_hit[raw_name] = hit
        return hit

    def key_is_secret(self, raw_key: bytes) -> bool:
        """A JSON key as written (escapes and all) names a secret."""
        hit = self._key_hit.get(raw_key)
        return self._key_is_secret(raw_key) if hit is None else hit

    def apply(self, call: ApiCall) -> ApiCall:
        path = call.path
        if "?" in path or "@" in path:
            call.path = self.url(path)
        http = call.http if call.HasField("http") else None
        kinds = self._header_kind
        for message in (call.request, call.response):
            for header in message.headers:
                name = header.name
                kind = kinds.get(name)
                if kind is None:
                    kind = self._kind(name)
                if kind == _REDACT:
                    header.value = REDACTED
                elif kind == _URL:
                    value = header.value
                    if "?" in value or "@" in value:
                        header.value = self.url(value)
            if message.body:
                content_type = ""
                if http is not None:
                    content_type = http.request_content_type if message is call.request else http.response_content_type
                self._body(message, content_type)
        protocol = call.protocol
        if protocol == "grpc" and call.HasField("grpc"):
            self._grpc(call)
        elif protocol == "graphql" and call.HasField("graphql"):
            self._graphql(call)
        if protocol == "redis" and call.HasField("redis"):
            redact_redis_args(call.redis.args)
        return call

    def url(self, target: str) -> str:
        """Redact a URL's password (user information) and its matching query parameters."""
        found = URL_USERINFO.match(target) if "@" in target else None
        if found is not None:
            target = f"{found.group(1)}:{REDACTED}@{target[found.end() :]}"
        return self.query(target) if "?" in target else target

    def query(self, target: str) -> str:
        """Redact matching parameters of a URL or request target ("/p?a=1&token=x")."""
        base, sep, query = target.partition("?")
        if not sep:
            return target
        fragment = ""
        if "#" in query:
            query, _, fragment = query.partition("#")
            fragment = "#" + fragment
        return base + "?" + self._pairs(query) + fragment

    def _pairs(self, encoded: str) -> str:
        parts = []
        changed = False
        hits = self._param_hit
        for pair in encoded.split("&"):
            name, eq, value = pair.partition("=")
            hit = hits.get(name)
            if hit is None:
                hit = self.param_is_secret(name)
            if eq and hit:
                parts.append(f"{name}={REDACTED}")
                changed = True
            elif eq and unquote_plus(name).lower() == "query" and ("{" in value or "%7B" in value.upper()):
                # GraphQL over GET: the document's secret arguments.
                document = self.graphql_document(unquote_plus(value))
                if document is None:
                    parts.append(pair)
                else:
                    parts.append(f"{name}={quote(document, safe='')}")
                    changed = True
            elif value.startswith(JSON_PARAM_STARTS):
                # A JSON document as a parameter (GraphQL's GET `variables=`): its keys, too.
                redacted = self._json_bytes(unquote_plus(value).encode())
                if redacted is None:
                    parts.append(pair)
                else:
                    parts.append(f"{name}={quote(redacted.decode(), safe='')}")
                    changed = True
            else:
                parts.append(pair)
        return "&".join(parts) if changed else encoded

    def _body(self, message: Message, content_type: str) -> None:
        body = message.body
        kind = content_type.lower()
        if "x-www-form-urlencoded" in kind:
            text = body.decode("utf-8", "replace")
            redacted = self._pairs(text.strip())
            if redacted != text.strip():
                message.body = redacted.encode()
            return
        if "multipart/form-data" in kind:
            fields = MULTIPART_FIELD.sub(self._multipart_field, body)
            if fields != body:
                message.body = fields
            return
        first = body[:1]
        if first.isspace():
            first = body.lstrip()[:1]
        if "json" in kind or first in (b"{", b"["):
            self._json(message, body)

    def _multipart_field(self, match: re.Match[bytes]) -> bytes:
        name = match.group(2).decode("utf-8", "replace")
        if self.field(name):
            return match.group(1) + REDACTED.encode()
        return match.group(0)

    def _key_is_secret(self, key: bytes) -> bool:
        """A JSON key as written (escapes and all) names a secret field."""
        hit = self._key_hit.get(key)
        if hit is None:
            text = key.decode("utf-8", "replace")
            if "\\" in text:
                try:
                    text = str(json.loads('"' + text + '"'))
                except ValueError:
                    text = text.replace("\\", "")
            hit = self.field(text)
            if len(self._key_hit) < 4096:
                self._key_hit[key] = hit
        return hit

    # -- GraphQL ---------------------------------------------------------------------------------

    def _graphql(self, call: ApiCall) -> None:
        """A GraphQL call lost its HTTP detail (content types): its bodies are told apart by
        their shape. On top of the JSON keys (variables), the documents' own arguments
        (`login(password: "x")`) and the server's error messages that quote a secret variable
        are redacted; the request target's `query=` is a document too."""
        graphql = call.graphql
        target = graphql.target
        if "?" in target or "@" in target:
            graphql.target = self.url(target)
        request = call.request
        body = request.body
        if body:
            stripped = body.lstrip()
            start = stripped[:1]
            # `{ me { id } }` is a document (application/graphql), `{"query": ...}` JSON.
            if start == b"[" or (start == b"{" and stripped[1:].lstrip()[:1] in (b'"', b"}", b"")):
                redacted = self._graphql_json(body)
                if redacted is not None:
                    request.body = redacted
            elif FORM_BODY.match(body):
                text = body.decode("utf-8", "replace").strip()
                pairs = self._pairs(text)
                if pairs != text:
                    request.body = pairs.encode()
            else:  # application/graphql: the document itself
                document = self.graphql_document(body.decode("utf-8", "replace"))
                if document is not None:
                    request.body = document.encode()
        response = call.response
        if response.body and response.body.lstrip()[:1] in (b"{", b"["):
            redacted = self._graphql_errors(response.body)
            if redacted is not None:
                response.body = redacted
        if graphql.first_error and self._quotes_secret_variable(graphql.first_error):
            graphql.first_error = REDACTED

    def graphql_document(self, text: str) -> str | None:
        """A GraphQL document with the string values of secret arguments and input fields
        (`password: "x"`, block strings too) redacted; None when nothing changed."""
        changed = False

        def replace(match: re.Match[str]) -> str:
            nonlocal changed
            if self.field(match.group(1)):
                changed = True
                return f'{match.group(1)}{match.group(2)}"{REDACTED}"'
            return match.group(0)

        redacted = GRAPHQL_ARGUMENT.sub(replace, text)
        return redacted if changed else None

    def _graphql_json(self, body: bytes) -> bytes | None:
        """A JSON request (one operation or a batch): `query` documents and `variables` keys."""
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            # Cut by the body limit: the pairs it shows, and arguments in the escaped document.
            fallback = self._json_fallback(body)
            escaped = GRAPHQL_ESCAPED_ARGUMENT.sub(self._escaped_argument, fallback)
            return escaped if escaped != body else None
        operations = document if isinstance(document, list) else [document]
        changed = False
        for operation in operations:
            if isinstance(operation, dict) and isinstance(operation.get("query"), str):
                query = self.graphql_document(operation["query"])
                if query is not None:
                    operation["query"] = query
                    changed = True
        try:
            changed = self._walk(document) or changed
        except RecursionError:
            return self._json_fallback(body)
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode() if changed else None

    def _escaped_argument(self, match: re.Match[bytes]) -> bytes:
        if self._key_is_secret(match.group(1)):
            return match.group(1) + match.group(2) + b'\\"' + REDACTED.encode() + b'\\"'
        return match.group(0)

    def _quotes_secret_variable(self, message: str) -> bool:
        return any(self.field(name) for name in GRAPHQL_VARIABLE.findall(message))

    def _graphql_errors(self, body: bytes) -> bytes | None:
        """A result whose error messages name a secret variable (graphql-core's `Variable
        '$password' got invalid value ...` quotes the value): those messages are redacted."""
        if b"$" not in body:
            return None
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            return None if b'"errors"' not in body else self._graphql_errors_fallback(body)
        changed = False
        for result in document if isinstance(document, list) else [document]:
            errors = result.get("errors") if isinstance(result, dict) else None
            for error in errors if isinstance(errors, list) else []:
                message = error.get("message") if isinstance(error, dict) else None
                if isinstance(message, str) and self._quotes_secret_variable(message):
                    error["message"] = REDACTED
                    changed = True
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode() if changed else None

    def _graphql_errors_fallback(self, body: bytes) -> bytes | None:
        def replace(match: re.Match[bytes]) -> bytes:
            if self._quotes_secret_variable(match.group(2).decode("utf-8", "replace")):
                return match.group(1) + b'"' + REDACTED.encode() + b'"'
            return match.group(0)

        redacted = GRAPHQL_ERROR_MESSAGE.sub(replace, body)
        return redacted if redacted != body else None

    # -- gRPC ------------------------------------------------------------------------------------

    def _grpc(self, call: ApiCall) -> None:
        """The decoded gRPC messages (JSON text) are redacted by field name, as JSON bodies are.
        Their raw bytes hold the same secret in protobuf's binary form, where no rule can find
        it: when a decoded message had a field redacted, the body it came from is dropped."""
        grpc = call.grpc
        for message, text in ((call.request, grpc.request_message), (call.response, grpc.response_message)):
            if not text:
                continue
            redacted = self._json_bytes(text.encode())
            if redacted is None:
                continue
            if message is call.request:
                grpc.request_message = redacted.decode()
            else:
                grpc.response_message = redacted.decode()
            if message.body:
                message.body_truncated += len(message.body)
                message.body = b""
                if "body-redacted" not in call.notes:
                    call.notes.append("body-redacted")

    def _json(self, message: Message, body: bytes) -> None:
        redacted = self._json_bytes(body)
        if redacted is not None:
            message.body = redacted

    def _json_bytes(self, body: bytes) -> bytes | None:
        """JSON text with the values of secret keys redacted; None when nothing changed."""
        # Most bodies hold no secret key: look at the keys before paying for a parse.
        hits = self._key_hit
        for key in JSON_KEY.findall(body):
            hit = hits.get(key)
            if hit or (hit is None and self._key_is_secret(key)):
                break
        else:
            return None
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            fallback = self._json_fallback(body)
            return fallback if fallback != body else None
        try:
            changed = self._walk(document)
        except RecursionError:
            fallback = self._json_fallback(body)
            return fallback if fallback != body else None
        if changed:
            return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
        return None

    def _walk(self, node: Any) -> bool:
        changed = False
        if isinstance(node, dict):
            for key, value in node.items():
                if self.field(str(key)):
                    if value != REDACTED:
                        node[key] = REDACTED
                        changed = True
                elif isinstance(value, dict | list):
                    changed = self._walk(value) or changed
        elif isinstance(node, list):
            for item in node:
                if isinstance(item, dict | list):
                    changed = self._walk(item) or changed
        return changed

    def _json_fallback(self, body: bytes) -> bytes:
        """A JSON body cut by the size limit (or not quite JSON): redact `"key": value` pairs."""

        def replace(match: re.Match[bytes]) -> bytes:
            if self._key_is_secret(match.group(1)):
                return match.group(0)[: match.start(2) - match.start(0)] + b'"' + REDACTED.encode() + b'"'
            return match.group(0)

        return JSON_PAIR.sub(replace, body)
