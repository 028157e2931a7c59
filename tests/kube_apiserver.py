"""A stand-in kube-apiserver for the tests: no real one can be installed here.

This is NOT Kubernetes. It is an HTTP/1.1 server speaking the part of the API server's wire
protocol that Trawl's enricher uses, close enough that the real `kubernetes` Python client
(configured from a kubeconfig file that `write_kubeconfig` writes) talks to it unchanged:

- Resources (all namespaces and per namespace where namespaced): core/v1 pods, services,
  nodes; discovery.k8s.io/v1 endpointslices; apps/v1 replicasets, deployments, statefulsets,
  daemonsets; batch/v1 jobs, cronjobs; coordination.k8s.io/v1 leases.
- GET of a collection: a `<Kind>List` JSON object with `metadata.resourceVersion` (the store's
  current one). `resourceVersion=N&resourceVersionMatch=Exact` with N older than the oldest
  event kept answers 410 Gone (a `Status` object, reason Expired), as the real server does for
  a too-old resourceVersion.
- GET with `watch=1`: a chunked stream of newline-separated JSON watch events (ADDED, MODIFIED,
  DELETED, BOOKMARK when `allowWatchBookmarks=true`) after `resourceVersion`; a watch from a
  resourceVersion older than the kept events gets one ERROR event holding a 410 `Status`
  (code 410, reason Expired), as the real server sends it. `timeoutSeconds` ends the stream
  cleanly.
- GET, POST (create, 409 AlreadyExists), PUT (replace; 409 Conflict when the body's
  resourceVersion is not the stored one: optimistic concurrency, what Lease election relies
  on) and DELETE of single objects.
- Every write advances one global resourceVersion (a decimal integer, as etcd's revision) and
  records an event; the oldest events are forgotten past `max_events` or by `compact()`.

Not implemented (the enricher does not use them): label and field selectors, `limit` and
`continue` paging, PATCH, subresources (status, log, exec), authentication (any bearer token is
accepted), admission, defaulting and validation beyond a name, server-side apply, protobuf.

The tests drive the cluster's life directly: `create`, `modify`, `delete` (each advancing the
resourceVersion and waking watches), `bookmark` (a BOOKMARK to every open watch),
`break_watches` (open watch connections cut without the chunked stream's end, as a dropped
TCP connection), `expire_watches` (an ERROR 410 to every open watch), `fail_watches` (an ERROR
event with another Status), `compact`, and faults:
`deny` (403 Forbidden with the real server's message), `garbage` (200 with a body that is not
JSON), `delay` (every answer held back), `stop` (the server gone: connection refused).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

JsonObject = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    group: str  # "" for core
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES = (
    Resource("", "v1", "pods", "Pod", True),
    Resource("", "v1", "services", "Service", True),
    Resource("", "v1", "nodes", "Node", False),
    Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    Resource("apps", "v1", "replicasets", "ReplicaSet", True),
    Resource("apps", "v1", "deployments", "Deployment", True),
    Resource("apps", "v1", "statefulsets", "StatefulSet", True),
    Resource("apps", "v1", "daemonsets", "DaemonSet", True),
    Resource("batch", "v1", "jobs", "Job", True),
    Resource("batch", "v1", "cronjobs", "CronJob", True),
    Resource("coordination.k8s.io", "v1", "leases", "Lease", True),
)
BY_KIND = {resource.kind: resource for resource in RESOURCES}
BY_PATH = {(resource.group, resource.version, resource.plural): resource for resource in RESOURCES}

ObjectKey = tuple[str, str, str]  # (plural, namespace, name)


def rfc3339(moment: float | None = None) -> str:
    """A time as the API server writes it (UTC, seconds, Z)."""
    return datetime.fromtimestamp(time.time() if moment is None else moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> JsonObject:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip


@dataclass
class _Event:
    resource_version: int
    plural: str
    namespace: str
    kind: str  # ADDED, MODIFIED, DELETED
    obj: JsonObject


def _copy(obj: Mapping[str, Any]) -> JsonObject:
    """A deep copy through JSON: what a client gets never aliases the store."""
    copied: JsonObject = json.loads(json.dumps(obj))
    return copied


class _Watch:
    """One open watch connection (its socket, so that `break_watches` can cut it)."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.broken = False
        self.expired = False
        self.error: tuple[int, str] | None = None  # an ERROR event to send, then the end
        self.bookmarks = 0


class KubeApiServer:
    """The stand-in; see the module docstring. Use as a context manager or start()/stop()."""

    def __init__(self, objects: Iterable[JsonObject] = (), max_events: int = 10_000) -> None:
        self._lock = threading.Condition()
        self._objects: dict[ObjectKey, JsonObject] = {}
        self._events: list[_Event] = []
        self._max_events = max_events
        self._resource_version = 1
        self._oldest_kept = 1  # a watch from before this resourceVersion is too old
        self._watches: set[_Watch] = set()
        self._denied: set[str] = set()
        self._garbage: set[str] = set()
        self._delay_s = 0.0
        self.requests: list[tuple[str, str]] = []  # (method, path?query), for tests that check what was asked
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        for obj in objects:
            self.create(obj)

    # --- life ---------------------------------------------------------------------------------------
    def start(self) -> KubeApiServer:
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kube-apiserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """The server gone: open watches cut, new connections refused (start() again on the same port)."""
        if self._server is None:
            return
        self.break_watches()
        self._server.shutdown()
        self._server.server_close()
        self._server = None

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig file (the shape kubectl writes) whose current context points here."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "stand-in", "user": {"token": "stand-in-token"}}],
            "contexts": [
                {"name": "stand-in", "context": {"cluster": "stand-in", "user": "stand-in", "namespace": namespace}}
            ],
            "current-context": "stand-in",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # --- the cluster's life, driven by tests ------------------------------------------------------
    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._resource_version

    def load_yaml(self, text: str) -> list[JsonObject]:
        """Create every object of a (multi-document) YAML text; a `List` adds its items."""
        created = []
        for document in yaml.safe_load_all(text):
            if not document:
                continue
            items = document.get("items", []) if str(document.get("kind", "")).endswith("List") else [document]
            created.extend(self.create(item) for item in items)
        return created

    def create(self, obj: JsonObject) -> JsonObject:
        """Store a new object (ADDED); KeyError when one of that name exists."""
        with self._lock:
            resource, key = self._key(obj)
            if key in self._objects:
                raise KeyError(f"{resource.plural} {key[1]}/{key[2]} already exists")
            stored = self._stamp(resource, _copy(obj), new=True)
            self._objects[key] = stored
            self._record(resource, key, "ADDED", stored)
            return _copy(stored)

    def modify(self, obj: JsonObject) -> JsonObject:
        """Replace a stored object (MODIFIED); KeyError when there is none."""
        with self._lock:
            resource, key = self._key(obj)
            previous = self._objects[key]
            stored = _copy(obj)
            metadata = stored.setdefault("metadata", {})
            for kept in ("uid", "creationTimestamp"):
                if kept in previous["metadata"] and kept not in metadata:
                    metadata[kept] = previous["metadata"][kept]
            stored = self._stamp(resource, stored, new=False)
            self._objects[key] = stored
            self._record(resource, key, "MODIFIED", stored)
            return _copy(stored)

    def get(self, kind: str, namespace: str, name: str) -> JsonObject:
        with self._lock:
            return _copy(self._objects[(BY_KIND[kind].plural, namespace, name)])

    def delete(self, kind: str, namespace: str, name: str) -> JsonObject:
        """Remove an object (DELETED, carrying the object at a new resourceVersion)."""
        with self._lock:
            resource = BY_KIND[kind]
            key = (resource.plural, namespace if resource.namespaced else "", name)
            obj = self._objects.pop(key)
            self._resource_version += 1
            obj["metadata"]["resourceVersion"] = str(self._resource_version)
            self._append(_Event(self._resource_version, resource.plural, key[1], "DELETED", obj))
            return _copy(obj)

    def bookmark(self) -> None:
        """Every open watch that asked for bookmarks gets a BOOKMARK at the current resourceVersion."""
        with self._lock:
            for watch in self._watches:
                watch.bookmarks += 1
            self._lock.notify_all()

    def break_watches(self) -> int:
        """Cut every open watch connection mid-stream (no final chunk); returns how many."""
        with self._lock:
            watches = list(self._watches)
            for watch in watches:
                watch.broken = True
            self._lock.notify_all()
        for watch in watches:
            with contextlib.suppress(OSError):
                watch.connection.shutdown(socket.SHUT_RDWR)
        return len(watches)

    def expire_watches(self) -> int:
        """Send every open watch an ERROR event with a 410 Status and end it; returns how many."""
        with self._lock:
            for watch in self._watches:
                watch.expired = True
            self._lock.notify_all()
            return len(self._watches)

    def fail_watches(self, code: int, reason: str, message: str) -> int:
        """Send every open watch an ERROR event with this Status and end it; returns how many."""
        with self._lock:
            for watch in self._watches:
                watch.error = (code, f"{reason}\0{message}")
            self._lock.notify_all()
            return len(self._watches)

    def compact(self) -> None:
        """Forget every event so far: a watch or Exact list from an earlier resourceVersion gets 410."""
        with self._lock:
            self._events.clear()
            self._oldest_kept = self._resource_version + 1

    def open_watches(self) -> int:
        with self._lock:
            return len(self._watches)

    def wait_for_no_watch(self, timeout_s: float = 10.0) -> int:
        """Block until every watch has ended on the server's side (a client sees a cut watch end
        before the handler thread that served it has finished); the watches still open then."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._watches and deadline > time.monotonic():
                self._lock.wait(deadline - time.monotonic())
            return len(self._watches)

    def wait_for_watches(self, count: int, timeout_s: float = 10.0) -> None:
        """Block until at least `count` watches are open (AssertionError after `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while len(self._watches) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self._watches)} watches open, expected {count}")
                self._lock.wait(left)

    def deny(self, plural: str, denied: bool = True) -> None:
        """Answer 403 Forbidden to every request for `plural` (the RBAC rule missing)."""
        with self._lock:
            (self._denied.add if denied else self._denied.discard)(plural)

    def garbage(self, plural: str, on: bool = True) -> None:
        """Answer 200 with a body that is not JSON to every request for `plural`."""
        with self._lock:
            (self._garbage.add if on else self._garbage.discard)(plural)

    def delay(self, seconds: float) -> None:
        """Hold every answer back this long (a slow API server)."""
        self._delay_s = seconds

    # --- internals ----------------------------------------------------------------------------------
    def _key(self, obj: Mapping[str, Any]) -> tuple[Resource, ObjectKey]:
        resource = BY_KIND[obj["kind"]]
        metadata = obj.get("metadata") or {}
        name = metadata.get("name")
        if not name:
            raise ValueError(f"{obj['kind']} without metadata.name")
        namespace = (metadata.get("namespace") or "default") if resource.namespaced else ""
        return resource, (resource.plural, namespace, name)

    def _stamp(self, resource: Resource, obj: JsonObject, new: bool) -> JsonObject:
        self._resource_version += 1
        obj["apiVersion"] = resource.api_version
        metadata = obj.setdefault("metadata", {})
        if resource.namespaced:
            metadata.setdefault("namespace", "default")
        if new:
            metadata.setdefault("uid", str(uuid.uuid4()))
            metadata.setdefault("creationTimestamp", rfc3339())
        metadata["resourceVersion"] = str(self._resource_version)
        return obj

    def _record(self, resource: Resource, key: ObjectKey, kind: str, obj: JsonObject) -> None:
        self._append(_Event(self._resource_version, resource.plural, key[1], kind, _copy(obj)))

    def _append(self, event: _Event) -> None:
        self._events.append(event)
        if len(self._events) > self._max_events:
            dropped = len(self._events) - self._max_events
            self._oldest_kept = self._events[dropped].resource_version
            del self._events[:dropped]
        self._lock.notify_all()

    def list_objects(self, resource: Resource, namespace: str) -> tuple[list[JsonObject], int]:
        with self._lock:
            items = [
                _copy(obj)
                for (plural, obj_namespace, _), obj in sorted(self._objects.items())
                if plural == resource.plural and (not namespace or obj_namespace == namespace)
            ]
            return items, self._resource_version

    def too_old(self, resource_version: int) -> bool:
        with self._lock:
            return resource_version + 1 < self._oldest_kept

    def watch_events(
        self, watch: _Watch, resource: Resource, namespace: str, after: int, bookmarks: bool, timeout_s: float
    ) -> Iterator[JsonObject | None]:
        """The events a watch sends, in order; None = the connection is cut (no clean end)."""
        deadline = time.monotonic() + timeout_s
        sent_bookmarks = 0
        position = after
        with self._lock:
            self._watches.add(watch)
            self._lock.notify_all()
        try:
            while True:
                with self._lock:
                    if watch.broken:
                        yield None
                        return
                    if watch.error is not None:
                        reason, _, message = watch.error[1].partition("\0")
                        yield {"type": "ERROR", "object": _status(watch.error[0], reason, message)}
                        return
                    if watch.expired or position + 1 < self._oldest_kept:
                        yield {"type": "ERROR", "object": _status(410, "Expired", "too old resource version")}
                        return
                    pending = [
                        event
                        for event in self._events
                        if event.resource_version > position
                        and event.plural == resource.plural
                        and (not namespace or event.namespace == namespace)
                    ]
                    if self._events and self._events[-1].resource_version > position:
                        position = self._events[-1].resource_version
                    bookmark = bookmarks and watch.bookmarks > sent_bookmarks
                    sent_bookmarks = watch.bookmarks
                    current = self._resource_version
                    left = deadline - time.monotonic()
                    if not pending and not bookmark:
                        if left <= 0:
                            return
                        self._lock.wait(min(left, 1.0))
                        continue
                for event in pending:
                    yield {"type": event.kind, "object": event.obj}
                if bookmark:
                    yield {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": resource.kind,
                            "apiVersion": resource.api_version,
                            "metadata": {"resourceVersion": str(current)},
                        },
                    }
        finally:
            with self._lock:
                self._watches.discard(watch)
                self._lock.notify_all()


class _Handler(BaseHTTPRequestHandler):
    api: KubeApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return  # quiet: the tests' output is theirs

    def _route(self) -> tuple[Resource, str, str, dict[str, list[str]]] | None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        segments = [segment for segment in parts.path.split("/") if segment]
        if segments[:1] == ["api"] and len(segments) >= 2:
            group, version, rest = "", segments[1], segments[2:]
        elif segments[:1] == ["apis"] and len(segments) >= 3:
            group, version, rest = segments[1], segments[2], segments[3:]
        else:
            return None
        namespace = name = ""
        if len(rest) >= 2 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 2:
            return None
        resource = BY_PATH.get((group, version, rest[0]))
        if resource is None or (namespace and not resource.namespaced):
            return None
        if len(rest) == 2:
            name = rest[1]
        return resource, namespace, name, query

    def _send_json(self, code: int, body: JsonObject) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _prelude(self) -> tuple[Resource, str, str, dict[str, list[str]]] | None:
        api = self.api
        api.requests.append((self.command, self.path))
        if api._delay_s:
            time.sleep(api._delay_s)
        route = self._route()
        if route is None:
            self._send_json(
                404, _status(404, "NotFound", f"the server could not find the requested resource {self.path}")
            )
            return None
        resource = route[0]
        if resource.plural in api._denied:
            group = resource.group or '""'
            scope = f'in the namespace "{route[1]}"' if route[1] else "at the cluster scope"
            verb = {"GET": "list", "POST": "create", "PUT": "update", "DELETE": "delete"}[self.command]
            if self.command == "GET" and "watch" in route[3]:
                verb = "watch"
            message = (
                f'{resource.plural} is forbidden: User "system:serviceaccount:trawl:trawl-enricher" cannot '
                f'{verb} resource "{resource.plural}" in API group {group} {scope}'
            )
            self._send_json(403, _status(403, "Forbidden", message))
            return None
        if resource.plural in api._garbage:
            data = b"<html>502 Bad Gateway</html>"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return None
        return route

    def _body(self) -> JsonObject:
        length = int(self.headers.get("Content-Length") or 0)
        body: JsonObject = json.loads(self.rfile.read(length) or b"{}")
        return body

    def do_GET(self) -> None:
        route = self._prelude()
        if route is None:
            return
        resource, namespace, name, query = route
        api = self.api
        if name:
            try:
                obj = api.get(resource.kind, namespace, name)
            except KeyError:
                self._send_json(404, _status(404, "NotFound", f'{resource.plural} "{name}" not found'))
                return
            self._send_json(200, obj)
            return
        version_text = query.get("resourceVersion", ["0"])[0] or "0"
        if query.get("watch", [""])[0] in ("1", "true"):
            self._watch(resource, namespace, int(version_text), query)
            return
        if query.get("resourceVersionMatch", [""])[0] == "Exact" and api.too_old(int(version_text)):
            self._send_json(410, _status(410, "Expired", f"too old resource version: {version_text}"))
            return
        items, current = api.list_objects(resource, namespace)
        for item in items:
            item.setdefault("kind", resource.kind)
        self._send_json(
            200,
            {
                "kind": f"{resource.kind}List",
                "apiVersion": resource.api_version,
                "metadata": {"resourceVersion": str(current)},
                "items": items,
            },
        )

    def _watch(self, resource: Resource, namespace: str, after: int, query: dict[str, list[str]]) -> None:
        api = self.api
        if after == 0:  # "any": the real server starts with ADDED for what exists
            items, after = api.list_objects(resource, namespace)
        else:
            items = []
        timeout_s = float(query.get("timeoutSeconds", ["1800"])[0])
        bookmarks = query.get("allowWatchBookmarks", [""])[0] in ("1", "true")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        watch = _Watch(self.connection)

        def events() -> Iterator[JsonObject | None]:
            for item in items:
                yield {"type": "ADDED", "object": item}
            yield from api.watch_events(watch, resource, namespace, after, bookmarks, timeout_s)

        try:
            for event in events():
                if event is None:
                    self.close_connection = True
                    return
                data = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def do_POST(self) -> None:
        route = self._prelude()
        if route is None:
            return
        resource, namespace, _, _ = route
        body = self._body()
        body.setdefault("kind", resource.kind)
        if resource.namespaced:
            body.setdefault("metadata", {})["namespace"] = namespace or "default"
        try:
            self._send_json(201, self.api.create(body))
        except KeyError:
            name = body.get("metadata", {}).get("name", "")
            self._send_json(409, _status(409, "AlreadyExists", f'{resource.plural} "{name}" already exists'))

    def do_PUT(self) -> None:
        route = self._prelude()
        if route is None:
            return
        resource, namespace, name, _ = route
        body = self._body()
        body.setdefault("kind", resource.kind)
        metadata = body.setdefault("metadata", {})
        metadata["name"] = name
        if resource.namespaced:
            metadata["namespace"] = namespace
        api = self.api
        with api._lock:  # compare and swap: the resourceVersion read back must still be current
            try:
                stored = api.get(resource.kind, namespace, name)
            except KeyError:
                self._send_json(404, _status(404, "NotFound", f'{resource.plural} "{name}" not found'))
                return
            expected = metadata.get("resourceVersion")
            if expected and expected != stored["metadata"]["resourceVersion"]:
                message = (
                    f'Operation cannot be fulfilled on {resource.plural} "{name}": the object has been '
                    "modified; please apply your changes to the latest version and try again"
                )
                self._send_json(409, _status(409, "Conflict", message))
                return
            replaced = api.modify(body)
        self._send_json(200, replaced)

    def do_DELETE(self) -> None:
        route = self._prelude()
        if route is None:
            return
        resource, namespace, name, _ = route
        try:
            self._send_json(200, self.api.delete(resource.kind, namespace, name))
        except KeyError:
            self._send_json(404, _status(404, "NotFound", f'{resource.plural} "{name}" not found'))


def pod(
    name: str,
    ip: str,
    *,
    namespace: str = "default",
    labels: Mapping[str, str] | None = None,
    owner: tuple[str, str] | None = None,
    node: str = "node-a",
    created: str | None = None,
    ports: Iterable[int] = (),
    env: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    containers: Iterable[str] = ("app",),
    host_network: bool = False,
) -> JsonObject:
    """A Running pod as the API server would hold it (what the tests create)."""
    metadata: JsonObject = {"name": name, "namespace": namespace, "labels": dict(labels or {})}
    if created:
        metadata["creationTimestamp"] = created
    if annotations:
        metadata["annotations"] = dict(annotations)
    if owner is not None:
        metadata["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1], "uid": str(uuid.uuid4()), "controller": True}
        ]
    container_specs: list[JsonObject] = []
    for index, container in enumerate(containers):
        spec: JsonObject = {"name": container, "image": f"example/{container}:1"}
        if index == 0:
            spec["ports"] = [{"containerPort": port, "protocol": "TCP"} for port in ports]
            if env:
                spec["env"] = [{"name": key, "value": value} for key, value in env.items()]
        container_specs.append(spec)
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": metadata,
        "spec": {"nodeName": node, "containers": container_specs, "hostNetwork": host_network},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "startTime": created or rfc3339()},
    }
