"""`http.route` for HTTP calls, learned with bounded cardinality.

An HTTP call's route (`ApiCall.http.route`, then the spans' `http.route` and name, the RED
metrics' `http.route`) comes from, in order:

1. The OpenAPI documents given in config (`routes.openapi`: a file or an http(s) URL, YAML or
   JSON, OpenAPI 3.x `servers` or Swagger 2.0 `basePath` prefixes), for the service each
   describes. Templates are matched segment by segment in a trie where a literal segment wins
   over a parameter (OpenAPI: "concrete paths are matched before their templated
   counterparts"), backtracking when the literal branch fails deeper.
2. gRPC carried as plain HTTP (`application/grpc*`): the path `/pkg.Service/Method` is the
   route, never collapsed (methods are bounded by the service's definition; the cap below
   holds all the same).
3. GraphQL over plain HTTP (`application/graphql`, or a path ending in `/graphql`): the
   endpoint path (the operation name is in the span name already).
4. Otherwise the span heuristic (paths.template_path: numeric, UUID and hex segments become
   {id}) then a per-service trie of the segments that replaces a position's literals with
   `{param}` once more than `collapse_after` distinct ones were seen there (the shape of
   Kubeshark's and Datadog's endpoint learners).

Calls of the gRPC and GraphQL protocols hold their own detail (the `detail` oneof), not the
HTTP one, and get no `http.route`: their span names already are their method or operation.

Bounds: per service at most `max_routes_per_service` routes (a call whose path would make one
more gets `/{overflow}`, counted in `trawl_enricher_routes_overflow_total{service}`), as
many gRPC and GraphQL paths, and 4 times as many trie nodes; at most `max_services` services
(calls of the ones past it share one trie, service "*", counted in
`trawl_enricher_routes_services_overflow_total`); at most `max_segments` segments of a path
are learned (the rest is `{rest}`). The overflow route is `/{overflow}` rather than no route
at all: without a route the spans and metrics fall back to the templated path, whose
cardinality is what the cap is there to bound.

With Redis (`routes.redis_url`, else `identity_redis_url`), the learned routes and the
collapsed positions of every service are shared by replicas and kept over restarts: loaded at
start, then written and read in two pipelines every `sync_interval_s` by a thread of the
store's (never per call, never on the enricher's thread). Given the same collapsed positions
the same path gives the same route, whichever replica saw it.

Serialized calls (`Enricher.enrich_encoded`) get their route from the compiled splicer
(trawl._calljson.Splicer's `route`, calling `RouteLearner.route_encoded` with the call's
destination, path and HTTP detail as bytes, its answers kept by those bytes): about 0.85 us
an HTTP call on bench/dissect.py's capture, against 5.2 us for parsing and serializing the
HTTP calls again in Python.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from trawl.enricher.paths import template_path
from trawl.errors import ConfigError
from trawl.logs import get_logger
from trawl.metrics import Registry
from trawl.v1.calls_pb2 import HttpDetail as _HttpDetail

if TYPE_CHECKING:
    import redis
    import yaml

    from trawl.enricher.config import OpenApiSource, RouteSettings
    from trawl.v1.calls_pb2 import ApiCall, Endpoint

log = get_logger(__name__)

PARAM = "{param}"
OVERFLOW = "/{overflow}"
REST = "{rest}"
# Calls of services past max_services share this one.
SHARED_SERVICE = "*"
# (service, host, path) -> route answers kept; emptied when full or when a position collapses.
MAX_CACHED = 65_536
# Trie nodes per service, as a multiple of its route cap: paths that reach no route still leave nodes.
NODES_PER_ROUTE = 4
_GRAPHQL_TYPES = ("application/graphql",)
_SERVER_VARIABLE = re.compile(r"\{([^{}]*)\}")


# -- OpenAPI documents ---------------------------------------------------------------------


class _TemplateNode:
    """One segment position of an OpenAPI document's paths."""

    __slots__ = ("literals", "param", "patterns", "template")

    def __init__(self) -> None:
        self.literals: dict[str, _TemplateNode] = {}
        # Segments mixing text and parameters (`{name}.{ext}`): matched by a regular expression.
        self.patterns: list[tuple[re.Pattern[str], _TemplateNode]] = []
        self.param: _TemplateNode | None = None
        self.template = ""  # the path template ending here ("" = none)

    def match(self, segments: Sequence[str], index: int) -> str:
        if index == len(segments):
            return self.template
        segment = segments[index]
        child = self.literals.get(segment)
        if child is not None:
            found = child.match(segments, index + 1)
            if found:
                return found
        for pattern, node in self.patterns:
            if pattern.fullmatch(segment):
                found = node.match(segments, index + 1)
                if found:
                    return found
        if self.param is not None and segment:
            return self.param.match(segments, index + 1)
        return ""


def _segment_pattern(segment: str) -> re.Pattern[str]:
    parts = re.split(r"\{[^{}/]*\}", segment)
    return re.compile("[^/]+?".join(re.escape(part) for part in parts))


@dataclass
class OpenApiDocument:
    """The path templates of one OpenAPI (3.x) or Swagger (2.0) document and its path prefixes."""

    service: str
    namespace: str | None
    source: str
    prefixes: list[str]
    root: _TemplateNode = field(default_factory=_TemplateNode)
    templates: int = 0

    def add(self, template: str) -> None:
        node = self.root
        for segment in template.split("/")[1:]:
            if segment.startswith("{") and segment.endswith("}") and segment.count("{") == 1:
                node.param = node.param or _TemplateNode()
                node = node.param
            elif "{" in segment:
                pattern = _segment_pattern(segment)
                for known, child in node.patterns:
                    if known.pattern == pattern.pattern:
                        node = child
                        break
                else:
                    child = _TemplateNode()
                    node.patterns.append((pattern, child))
                    node = child
            else:
                node = node.literals.setdefault(segment, _TemplateNode())
        if not node.template:
            node.template = template
            self.templates += 1

    def route(self, path: str) -> str:
        """The route of `path` (no query), with the matching server prefix; "" when no template matches."""
        for prefix in self.prefixes:
            if prefix and not (path == prefix or path.startswith(prefix + "/")):
                continue
            rest = path[len(prefix) :] or "/"
            found = self.root.match(rest.split("/")[1:], 0)
            if not found and len(rest) > 1 and rest.endswith("/"):
                found = self.root.match(rest[:-1].split("/")[1:], 0)
            if found:
                return prefix + found
        return ""

    def describes(self, names: Iterable[str], namespace: str) -> bool:
        if self.namespace is not None and self.namespace != namespace:
            return False
        return self.service in names


def load_openapi(spec: OpenApiSource, timeout_s: float = 10.0) -> OpenApiDocument:
    """Read one configured document; ConfigError naming the file (and line) and the fix."""
    source = spec.source
    text = _read_source(source, timeout_s)
    data, lines = _parse(text, source)
    where = _Where(source, lines)
    if not isinstance(data, dict):
        raise ConfigError("an OpenAPI document is a mapping with a 'paths' key", path=source, line=1)
    if "openapi" in data:
        if not str(data["openapi"]).startswith("3."):
            raise ConfigError(
                f"openapi {data['openapi']!r}: only OpenAPI 3.x and Swagger 2.0 documents are read",
                path=source,
                line=where.line("openapi"),
            )
        prefixes = _server_prefixes(data.get("servers"), where)
    elif str(data.get("swagger", "")) == "2.0":
        base = data.get("basePath") or ""
        if not isinstance(base, str) or (base and not base.startswith("/")):
            raise ConfigError("basePath must be a path starting with '/'", path=source, line=where.line("basePath"))
        prefixes = [base.rstrip("/")]
    else:
        raise ConfigError(
            "neither an 'openapi: 3.x' nor a 'swagger: \"2.0\"' document; give an OpenAPI document",
            path=source,
            line=1,
        )
    paths = data.get("paths")
    if not isinstance(paths, dict) or not paths:
        raise ConfigError(
            "'paths' must be a mapping of path templates (/users/{id}: ...)",
            path=source,
            line=where.line("paths") or 1,
        )
    document = OpenApiDocument(spec.service, spec.namespace, source, sorted(set(prefixes), key=len, reverse=True))
    for template in paths:
        if not isinstance(template, str) or not template.startswith("/"):
            raise ConfigError(
                f"path {template!r} must start with '/' (OpenAPI path templates are relative to the server)",
                path=source,
                line=where.line("paths", str(template)),
            )
        if template.count("{") != template.count("}"):
            raise ConfigError(
                f"path {template!r}: unbalanced braces in its parameters",
                path=source,
                line=where.line("paths", template),
            )
        document.add(template)
    log.info("openapi_loaded", source=source, service=spec.service, templates=document.templates)
    return document


class _Where:
    def __init__(self, source: str, lines: dict[tuple[str, ...], int]) -> None:
        self.source = source
        self.lines = lines

    def line(self, *key: str) -> int | None:
        return self.lines.get(key)


def _read_source(source: str, timeout_s: float) -> str:
    if urlsplit(source).scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(source, timeout=timeout_s) as answer:
                return str(answer.read().decode("utf-8"))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ConfigError(
                f"cannot fetch the OpenAPI document: {reason}; check that the URL is right and "
                "reachable from the enricher, or give a copy of the document as a file",
                path=source,
            ) from None
        except UnicodeDecodeError:
            raise ConfigError("the OpenAPI document is not UTF-8 text", path=source) from None
    try:
        return Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read the OpenAPI document: {exc.strerror}; fix the path in routes.openapi "
            "(relative paths are read from the enricher's working directory)",
            path=source,
        ) from None
    except UnicodeDecodeError:
        raise ConfigError("the OpenAPI document is not UTF-8 text", path=source) from None


def _parse(text: str, source: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """The document and the line of each key (YAML reads JSON too; json's own parser when it does not)."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        try:
            return json.loads(text), {}
        except json.JSONDecodeError:
            pass
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"not a YAML or JSON OpenAPI document: {problem}", path=source, line=mark.line + 1 if mark else None
        ) from None
    lines: dict[tuple[str, ...], int] = {}
    if node is not None:
        _collect_lines(node, (), lines, depth=2)
    return data, lines


def _collect_lines(node: yaml.Node, prefix: tuple[str, ...], out: dict[tuple[str, ...], int], depth: int) -> None:
    import yaml

    if depth and isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, str(key_node.value))
            out[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key, out, depth - 1)


def _server_prefixes(servers: object, where: _Where) -> list[str]:
    """The path part of each OpenAPI 3 server URL (variables at their defaults); [""] when none."""
    if servers is None:
        return [""]
    if not isinstance(servers, list):
        raise ConfigError("'servers' must be a list of {url: ...}", path=where.source, line=where.line("servers"))
    prefixes = []
    for server in servers:
        if not isinstance(server, dict) or not isinstance(server.get("url"), str):
            raise ConfigError("each server needs a 'url'", path=where.source, line=where.line("servers"))
        variables = server.get("variables") or {}

        def default(match: re.Match[str], variables: Any = variables) -> str:
            value = variables.get(match.group(1), {}) if isinstance(variables, dict) else {}
            return str(value.get("default", "")) if isinstance(value, dict) else ""

        url = _SERVER_VARIABLE.sub(default, server["url"])
        path = urlsplit(url).path if "://" in url else url
        prefixes.append("/" + path.strip("/") if path.strip("/") else "")
    return prefixes or [""]


# -- the learner ---------------------------------------------------------------------------


class _Node:
    """One segment position of a service's learned paths. Collapsed (`param` set): every
    segment there is `{param}` and `literals` is empty."""

    __slots__ = ("literals", "param", "terminal")

    def __init__(self) -> None:
        self.literals: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.terminal = False


class _Service:
    __slots__ = ("collapsed", "kept", "new_collapsed", "new_routes", "nodes", "root", "routes")

    def __init__(self) -> None:
        self.root = _Node()
        self.routes = 0
        self.nodes = 1
        self.collapsed: set[str] = set()
        self.kept: set[str] = set()  # gRPC and GraphQL paths, routes as they are (RouteLearner.keep)
        # Learned here since the last Redis write.
        self.new_routes: set[str] = set()
        self.new_collapsed: set[str] = set()


def _merge(into: _Node, other: _Node, collapse_after: int) -> None:
    into.terminal = into.terminal or other.terminal
    if into.param is not None:
        for child in other.literals.values():
            _merge(into.param, child, collapse_after)
    else:
        for name, child in other.literals.items():
            mine = into.literals.get(name)
            if mine is None:
                into.literals[name] = child
            else:
                _merge(mine, child, collapse_after)
        if len(into.literals) > collapse_after:
            _collapse(into, collapse_after)
    if other.param is not None:
        if into.param is None:
            _collapse(into, collapse_after)
        assert into.param is not None
        _merge(into.param, other.param, collapse_after)


def _collapse(node: _Node, collapse_after: int) -> _Node:
    merged = node.param or _Node()
    literals, node.literals = node.literals, {}
    node.param = merged
    for child in literals.values():
        _merge(merged, child, collapse_after)
    return merged


def _walk(node: _Node, prefix: str, routes: set[str], collapsed: set[str], counts: list[int]) -> None:
    counts[0] += 1
    if node.terminal:
        routes.add(prefix or "/")
    if node.param is not None:
        collapsed.add(prefix)  # the root's is "": "/" is the position after a first empty segment
        _walk(node.param, f"{prefix}/{PARAM}", routes, collapsed, counts)
    for name, child in node.literals.items():
        _walk(child, f"{prefix}/{name}", routes, collapsed, counts)


def _template_segment(segment: str) -> str:
    """{id} for a numeric, UUID or hex segment: the span heuristic's, so both agree."""
    return template_path(segment)


def service_of(dst: Endpoint) -> str:
    """The service a call's routes are learned for: its destination's service or workload (in
    its namespace), else its name or address and port."""
    if dst.service:
        return f"{dst.namespace}/{dst.service}"
    if dst.workload:
        return f"{dst.namespace}/{dst.workload}"
    return f"{dst.name or dst.ip}:{dst.port}"


class RouteLearner:
    """Routes of HTTP calls per destination service (see the module docstring)."""

    def __init__(
        self,
        documents: Sequence[OpenApiDocument] = (),
        *,
        collapse_after: int = 32,
        max_routes_per_service: int = 500,
        max_services: int = 1000,
        max_segments: int = 16,
        metrics: Registry | None = None,
        store: RedisRouteStore | None = None,
    ) -> None:
        self.documents = list(documents)
        self.collapse_after = collapse_after
        self.max_routes = max_routes_per_service
        self.max_nodes = max_routes_per_service * NODES_PER_ROUTE
        self.max_services = max_services
        self.max_segments = max_segments
        self._services: dict[str, _Service] = {}
        self._cache: dict[tuple[str, str, str], str] = {}
        self._raw: dict[tuple[bytes, bytes, bytes], tuple[str, str]] = {}  # route_encoded's answers, by its arguments
        self._documents_of: dict[tuple[str, str], list[OpenApiDocument]] = {}
        self._endpoints: dict[bytes, tuple[Endpoint, str]] = {}  # route_encoded's destinations, parsed once
        self._dirty: set[str] = set()  # services with routes or collapses not handed to Redis yet
        metrics = metrics if metrics is not None else Registry()
        self._overflow = metrics.counter(
            "trawl_enricher_routes_overflow_total",
            "HTTP calls given the route /{overflow}: their service has max_routes_per_service routes, by service",
        )
        self._services_overflow = metrics.counter(
            "trawl_enricher_routes_services_overflow_total",
            "HTTP calls of services past routes.max_services, learned together as service '*'",
        )
        self._collapses = metrics.counter(
            "trawl_enricher_routes_collapsed_total", "Path positions turned into {param}, by service"
        )
        self._routes_gauge = metrics.gauge("trawl_enricher_routes", "Routes learned, all services together")
        self.store = store
        if store is not None:
            store.load(self)

    @classmethod
    def from_settings(
        cls, settings: RouteSettings, metrics: Registry, redis_url: str | None = None
    ) -> RouteLearner | None:
        """The learner the settings ask for (None: routes off). ConfigError for a bad document."""
        if not settings.active:
            return None
        documents = [load_openapi(spec, settings.fetch_timeout_s) for spec in settings.openapi]
        url = settings.redis_url or redis_url
        store = RedisRouteStore(url, settings.redis_prefix, settings.sync_interval_s, metrics) if url else None
        return cls(
            documents,
            collapse_after=settings.collapse_after,
            max_routes_per_service=settings.max_routes_per_service,
            max_services=settings.max_services,
            max_segments=settings.max_segments,
            metrics=metrics,
            store=store,
        )

    # -- per call --------------------------------------------------------------------------

    def apply(self, calls: Iterable[ApiCall]) -> int:
        """Set `http.route` on the HTTP calls that have none; returns how many were set."""
        count = 0
        for call in calls:
            if call.WhichOneof("detail") != "http" or call.http.route:
                continue
            route = self.route_of(call)
            if route:
                call.http.route = route
                count += 1
        self.after_batch()
        return count

    def route_encoded(self, dst: bytes, path: bytes, http: bytes) -> str | None:
        """`route_of` for the compiled splicer (trawl._calljson.Splicer's route): the call's
        enriched destination Endpoint, path and HttpDetail, serialized. Answers are kept by
        those bytes (the query cut off): the calls of a connection mostly share them, and are
        then routed without a parse."""
        key = (dst, path.partition(b"?")[0], http)
        found = self._raw.get(key)
        if found is not None:
            if found[0] == OVERFLOW:
                self._count_overflow(found[1])
            return found[0] or None
        known = self._endpoints.get(dst)
        if known is None:
            from trawl.v1.calls_pb2 import Endpoint

            if len(self._endpoints) >= MAX_CACHED:
                self._endpoints.clear()
            endpoint = Endpoint.FromString(dst)
            known = self._endpoints[dst] = (endpoint, service_of(endpoint))
        detail = _HttpDetail.FromString(http)
        route = self._route(
            known[0], path.decode("utf-8", "replace"), detail.host, detail.request_content_type, known[1]
        )
        if len(self._raw) >= MAX_CACHED:
            self._raw.clear()
        self._raw[key] = (route, known[1])
        return route or None

    def after_batch(self) -> None:
        """Hand what was learned to the Redis store and take in what it read (no I/O here)."""
        if self.store is not None:
            self.store.hand_over(self)

    def route_of(self, call: ApiCall) -> str:
        detail = call.http
        return self._route(call.dst, call.path, detail.host, detail.request_content_type)

    def _route(self, dst: Endpoint, path: str, host: str, content_type: str, service: str = "") -> str:
        if not path.startswith("/"):
            if not path.startswith(("http://", "https://")):
                return ""  # CONNECT's authority, OPTIONS' *: no path, no route
            path = urlsplit(path).path or "/"
        path = path.partition("?")[0]
        service = service or service_of(dst)
        key = (service, host, path)
        found = self._cache.get(key)
        if found is not None:
            if found == OVERFLOW:
                self._count_overflow(service)
            return found
        route = ""
        if content_type.startswith(("application/grpc", *_GRAPHQL_TYPES)) or path.endswith("/graphql"):
            route = self.keep(service, path)
        elif self.documents:
            for document in self._documents_for(service, dst, host):
                route = document.route(path)
                if route:
                    break
        if not route:
            route = self.learn(service, path)
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[key] = route
        return route

    def _documents_for(self, service: str, dst: Endpoint, host: str) -> list[OpenApiDocument]:
        key = (service, host)
        found = self._documents_of.get(key)
        if found is None:
            names = {dst.service, dst.workload, dst.name, dst.pod, host, host.rpartition(":")[0]} - {""}
            found = [document for document in self.documents if document.describes(names, dst.namespace)]
            if len(self._documents_of) >= MAX_CACHED:
                self._documents_of.clear()
            self._documents_of[key] = found
        return found

    def _state(self, service: str) -> tuple[str, _Service]:
        state = self._services.get(service)
        if state is None:
            if len(self._services) >= self.max_services:
                self._services_overflow.inc()
                service = SHARED_SERVICE
                state = self._services.get(service)
            if state is None:
                state = self._services[service] = _Service()
        return service, state

    def keep(self, service: str, path: str) -> str:
        """`path` as its own route (a gRPC method, a GraphQL endpoint: no segment of it is a
        parameter), under the service's cap of routes all the same."""
        service, state = self._state(service)
        if path in state.kept:
            return path
        if len(state.kept) >= self.max_routes:
            self._overflowed(service, count=True)
            return OVERFLOW
        state.kept.add(path)
        return path

    def learn(self, service: str, path: str) -> str:
        """The learned route of `path` (no query) for `service`, learning it."""
        service, state = self._state(service)
        segments = path.split("/")
        if len(segments) > self.max_segments + 1:
            segments = [*segments[: self.max_segments + 1], REST]
        route = self._insert(service, state, segments[1:], remote=False)
        return route or OVERFLOW

    def _insert(self, service: str, state: _Service, segments: Sequence[str], remote: bool) -> str:
        """The route of a path's segments (`remote`: a route learned elsewhere), learning it."""
        node = state.root
        out = [""]
        count = not remote
        for segment in segments:
            if remote and segment == PARAM and node.param is None:
                self._collapse(service, state, node)  # a route learned elsewhere says so
            if node.param is not None:
                node = node.param
                out.append(PARAM)
                continue
            child = node.literals.get(segment)
            if child is None and not remote:
                # Ids are never kept as literals: a segment found among them is no id, and only
                # the others are templated (most segments of a path are found).
                segment = _template_segment(segment)
                child = node.literals.get(segment)
            if child is None:
                if len(node.literals) >= self.collapse_after:
                    node = self._collapse(service, state, node)
                    out.append(PARAM)
                    continue
                if state.routes >= self.max_routes or state.nodes >= self.max_nodes:
                    return self._overflowed(service, count)
                child = node.literals[segment] = _Node()
                state.nodes += 1
            node = child
            out.append(segment)
        route = "/".join(out) or "/"
        if not node.terminal:
            if state.routes >= self.max_routes:
                return self._overflowed(service, count)
            node.terminal = True
            state.routes += 1
            state.new_routes.add(route)
            self._dirty.add(service)
            self._routes_gauge.inc()
        return route

    def _count_overflow(self, service: str) -> None:
        """An overflowed call answered from a cache: counted as `learn` counted the first."""
        self._overflow.inc(service=service if service in self._services else SHARED_SERVICE)

    def _overflowed(self, service: str, count: bool) -> str:
        if count:
            self._overflow.inc(service=service)
        return ""

    def _collapse(self, service: str, state: _Service, node: _Node) -> _Node:
        """Turn `node`'s position into {param}; returns the {param} node."""
        before: set[str] = set()
        _walk(state.root, "", before, set(), [0])
        param = _collapse(node, self.collapse_after)
        routes: set[str] = set()
        collapsed: set[str] = set()
        counts = [0]
        _walk(state.root, "", routes, collapsed, counts)
        self._routes_gauge.inc(len(routes) - state.routes)
        state.routes = len(routes)
        state.nodes = counts[0]
        fresh = collapsed - state.collapsed
        state.collapsed = collapsed
        state.new_collapsed |= fresh
        self._dirty.add(service)
        # Merged routes (/users/{param}) are new though their node was terminal already.
        state.new_routes |= routes - before
        self._collapses.inc(len(fresh), service=service)
        self._cache.clear()  # answers given before the collapse may have changed
        self._raw.clear()
        return param

    # -- shared state ----------------------------------------------------------------------

    def services(self) -> dict[str, _Service]:
        return self._services

    def merge_remote(self, service: str, collapsed: Iterable[str], routes: Iterable[str]) -> None:
        """Positions and routes learned elsewhere (another replica, an earlier run)."""
        state = self._services.get(service)
        if state is None:
            if len(self._services) >= self.max_services:
                return
            state = self._services[service] = _Service()
        new_routes, new_collapsed = set(state.new_routes), set(state.new_collapsed)
        for prefix in sorted(collapsed, key=len):
            segments = prefix.split("/")[1:]
            node = self._walk_to(service, state, segments)
            if node is not None and node.param is None:
                self._collapse(service, state, node)
        for route in routes:
            segments = route.split("/")[1:]
            self._insert(service, state, segments, remote=True)
        # What came from Redis is not written back to it.
        state.new_routes, state.new_collapsed = new_routes, new_collapsed
        state.collapsed |= set(collapsed)
        self._cache.clear()
        self._raw.clear()

    def _walk_to(self, service: str, state: _Service, segments: Sequence[str]) -> _Node | None:
        node = state.root
        for segment in segments:
            if segment == PARAM and node.param is None:
                self._collapse(service, state, node)
            if node.param is not None:
                node = node.param
                continue
            child = node.literals.get(segment)
            if child is None:
                if state.nodes >= self.max_nodes:
                    return None
                child = node.literals[segment] = _Node()
                state.nodes += 1
            node = child
        return node

    def routes(self, service: str) -> set[str]:
        """The routes learned for `service` (tests, debugging)."""
        return self.learned(service)[0]

    def learned(self, service: str) -> tuple[set[str], set[str]]:
        """The routes and the collapsed positions of `service`, as Redis keeps them."""
        routes: set[str] = set()
        collapsed: set[str] = set()
        state = self._services.get(service)
        if state is not None:
            _walk(state.root, "", routes, collapsed, [0])
        return routes, collapsed

    def take_new(self) -> dict[str, tuple[set[str], set[str]]]:
        """The routes and collapsed positions learned here since the last call, by service."""
        taken = {}
        for service in self._dirty:
            state = self._services.get(service)
            if state is not None and (state.new_routes or state.new_collapsed):
                taken[service] = (state.new_routes, state.new_collapsed)
                state.new_routes, state.new_collapsed = set(), set()
        self._dirty.clear()
        return taken

    def close(self) -> None:
        """Write what was learned since the last sync (blocking)."""
        if self.store is not None:
            self.store.close(self)


class RedisRouteStore:
    """Learned routes in Redis: per service a set of routes and one of collapsed positions, and
    a hash of services to a version bumped on every write (so a sync reads only what changed).

    Redis is spoken to by a thread of its own every `interval_s` (and once, blocking, at start
    and at close): the enricher's thread only hands over what it learned and takes in what the
    thread read, so a slow or unreachable Redis never holds a batch up. What could not be
    written is kept (bounded by the learned routes) and written when Redis is back."""

    def __init__(self, url: str, prefix: str, interval_s: float, metrics: Registry) -> None:
        import redis

        self.client: redis.Redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.prefix = prefix
        self.interval_s = interval_s
        self._outbox: queue.SimpleQueue[dict[str, tuple[set[str], set[str]]]] = queue.SimpleQueue()
        self._inbox: queue.SimpleQueue[tuple[str, set[str], set[str]]] = queue.SimpleQueue()
        # The thread's own: what is still to write, and the version of each service last read.
        self._unsent: dict[str, tuple[set[str], set[str]]] = {}
        self._versions: dict[str, int] = {}
        self._run_id = ""  # the Redis server's run at the last exchange: a restarted one may be empty
        # Everything written, to write again to a Redis that restarted (the strings are the learner's).
        self._written: dict[str, tuple[set[str], set[str]]] = {}
        self._max_services = 0
        self._failing = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors = metrics.counter(
            "trawl_enricher_routes_redis_errors_total", "Failed syncs of learned routes with Redis"
        )

    def _key(self, service: str, kind: str) -> str:
        return f"{self.prefix}:{kind}:{service}"

    def load(self, learner: RouteLearner) -> None:
        """What is in Redis, into `learner` (blocking, at start); then the thread takes over."""
        self._max_services = learner.max_services
        self.exchange()
        self.hand_over(learner)
        self._thread = threading.Thread(target=self._run, name="routes-redis", daemon=True)
        self._thread.start()

    def hand_over(self, learner: RouteLearner) -> None:
        """The enricher's side: what it learned out to the thread, what the thread read in."""
        outgoing = learner.take_new()
        if outgoing:
            self._outbox.put(outgoing)
        while True:
            try:
                service, collapsed, routes = self._inbox.get_nowait()
            except queue.Empty:
                return
            learner.merge_remote(service, collapsed, routes)

    def close(self, learner: RouteLearner) -> None:
        """Stop the thread and write what is left (blocking)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)
        self.hand_over(learner)
        self.exchange()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            self.exchange()

    def exchange(self) -> None:
        """Write what was handed over, read what changed elsewhere: two pipelines."""
        import redis

        unsent = self._unsent
        while True:
            try:
                _merge_into(unsent, self._outbox.get_nowait())
            except queue.Empty:
                break
        index = f"{self.prefix}:services"
        try:
            run_id = str(self.client.info("server").get("run_id", ""))
            if self._run_id and run_id != self._run_id:
                # Redis restarted (without its data, maybe): everything is written again, and
                # every service read again.
                log.info("routes_redis_restarted", before=self._run_id, now=run_id)
                _merge_into(unsent, self._written)
                self._versions.clear()
            self._run_id = run_id
            pipe = self.client.pipeline(transaction=False)
            for name, (routes, collapsed) in unsent.items():
                if routes:
                    pipe.sadd(self._key(name, "routes"), *routes)
                if collapsed:
                    pipe.sadd(self._key(name, "collapsed"), *collapsed)
                pipe.hincrby(index, name, 1)
            pipe.hgetall(index)
            answers = pipe.execute()
            _merge_into(self._written, unsent)
            unsent.clear()
            versions = {key.decode(): int(value) for key, value in answers[-1].items()}
            changed = [(name, version) for name, version in versions.items() if self._versions.get(name) != version]
            changed = changed[: self._max_services]
            if changed:
                pipe = self.client.pipeline(transaction=False)
                for name, _ in changed:
                    pipe.smembers(self._key(name, "collapsed"))
                    pipe.smembers(self._key(name, "routes"))
                answers = pipe.execute()
                for position, (name, version) in enumerate(changed):
                    collapsed = {item.decode() for item in answers[2 * position]}
                    routes = {item.decode() for item in answers[2 * position + 1]}
                    self._inbox.put((name, collapsed, routes))
                    self._versions[name] = version
            if self._failing:
                log.info("routes_redis_recovered")
            self._failing = False
        except redis.RedisError as exc:
            self._errors.inc()
            if not self._failing:
                log.warning(
                    "routes_redis_failed",
                    error=repr(exc),
                    effect="routes are learned locally and written when Redis is back",
                    fix="check that Redis at routes.redis_url (or identity_redis_url) is up and reachable",
                )
            self._failing = True


def _merge_into(into: dict[str, tuple[set[str], set[str]]], other: dict[str, tuple[set[str], set[str]]]) -> None:
    for name, (routes, collapsed) in other.items():
        known = into.setdefault(name, (set(), set()))
        known[0].update(routes)
        known[1].update(collapsed)
