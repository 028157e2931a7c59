"""The enricher's watch of the Kubernetes API: list + watch per resource, into a ClusterHistory.

One thread per resource (pods, services, endpointslices, nodes, replicasets, jobs: the owner
chain's top, Deployment, CronJob, StatefulSet, DaemonSet, is named by the ownerReferences of
ReplicaSets, Jobs and pods, so those kinds are not watched) runs the protocol kubectl's
informers run, with the real `kubernetes` client:

1. list (all namespaces) and hand everything to `ClusterHistory.replace_all`, keeping the
   list's `metadata.resourceVersion`;
2. watch from that resourceVersion with `allowWatchBookmarks=true` and a server-side
   `timeoutSeconds`, applying each ADDED/MODIFIED/DELETED and moving the resourceVersion on
   with every event and BOOKMARK; a stream that ends is watched again from where it was;
3. a 410 Gone (an ERROR event with code 410, or a 410 answer) means the resourceVersion is
   too old: list again (what was deleted meanwhile ends then);
4. any other failure (connection refused or cut, timeout, 401/403, an answer that is not a
   Kubernetes list or event) is retried with exponential backoff (0.5 s doubling to
   `backoff_max_s`), watching again from the last resourceVersion when there is one.

Objects are read as JSON (`_preload_content=False`), not as the client's model classes: the
history keeps only what identity needs, so memory is bounded by ClusterHistory's limits plus
one list in flight.

While the API server is away, slow, garbled or denying, the enricher goes on enriching from
what it knows. Each resource's state changes are logged once (`kube_watch_failed` with the
reason and the fix, e.g. the RBAC rule missing; `kube_watch_recovered`), counted in
`trawl_enricher_kube_watch_errors_total{resource,reason}`, and shown by the gauge
`trawl_enricher_kube_watch_up{resource}` and in the enricher's /readyz body (`status_line`).

Configuration like kubectl's: an explicit kubeconfig file; else in a pod the in-cluster
service account (KUBERNETES_SERVICE_HOST); else KUBECONFIG or ~/.kube/config.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trawl.enricher.cluster import ClusterHistory
from trawl.errors import ConfigError, UserError
from trawl.logs import get_logger
from trawl.metrics import Registry

log = get_logger(__name__)

RBAC_FILE = "deploy/base/enricher.yaml"


@dataclass(frozen=True)
class WatchedResource:
    kind: str
    plural: str
    group: str  # "" = the core group
    api_class: str  # the kubernetes client's API class
    list_method: str  # its list-in-all-namespaces method


WATCHED = (
    WatchedResource("Pod", "pods", "", "CoreV1Api", "list_pod_for_all_namespaces"),
    WatchedResource("Service", "services", "", "CoreV1Api", "list_service_for_all_namespaces"),
    WatchedResource(
        "EndpointSlice",
        "endpointslices",
        "discovery.k8s.io",
        "DiscoveryV1Api",
        "list_endpoint_slice_for_all_namespaces",
    ),
    WatchedResource("Node", "nodes", "", "CoreV1Api", "list_node"),
    WatchedResource("ReplicaSet", "replicasets", "apps", "AppsV1Api", "list_replica_set_for_all_namespaces"),
    WatchedResource("Job", "jobs", "batch", "BatchV1Api", "list_job_for_all_namespaces"),
)


class _Gone(Exception):
    """410: the resourceVersion is older than the API server keeps; list again."""


class _Garbage(Exception):
    """An answer that is not what the API server sends."""


class _WatchError(Exception):
    """An ERROR event other than 410: the API server's Status, mid-stream."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class ResourceState:
    """One resource's watch, as /readyz and the logs tell it."""

    resource: WatchedResource
    listed: bool = False  # a first list is in
    failing: str = ""  # the reason of the current failure; "" = fine
    error: str = ""
    fix: str = ""
    resource_version: str = ""
    relists: int = 0
    events: int = 0
    responses: list[Any] = field(default_factory=list)  # the open response, to close on stop


def kube_api_client(kubeconfig: Path | None = None) -> Any:
    """A kubernetes ApiClient configured like kubectl (see the module docstring)."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        if kubeconfig is not None:
            if not kubeconfig.is_file():
                raise ConfigError(f"kubeconfig {kubeconfig} does not exist; give a kubeconfig file (kubectl's)")
            return config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            return client.ApiClient(configuration)
        return config.new_client_from_config()  # type: ignore[no-untyped-call]
    except ConfigException as exc:
        where = str(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG", "~/.kube/config")
        raise ConfigError(
            f"cannot configure the Kubernetes client from {where}: {exc}; give a kubeconfig file "
            "(--kubeconfig, KUBECONFIG, the enricher's `kubeconfig` key) or run in a pod with a service account",
        ) from None


class KubeWatcher:
    """List + watch of every WATCHED resource into `history`, on daemon threads; see the module docstring."""

    def __init__(
        self,
        history: ClusterHistory,
        api_client: Any,
        metrics: Registry | None = None,
        *,
        watch_timeout_s: int = 300,
        request_timeout_s: float = 30.0,
        backoff_max_s: float = 30.0,
        resources: tuple[WatchedResource, ...] = WATCHED,
    ) -> None:
        from kubernetes import client

        self.history = history
        self.api_client = api_client
        self.server = str(getattr(api_client.configuration, "host", ""))
        self.watch_timeout_s = watch_timeout_s
        self.request_timeout_s = request_timeout_s
        self.backoff_max_s = backoff_max_s
        self.states = {resource.kind: ResourceState(resource) for resource in resources}
        self._apis = {resource.kind: getattr(client, resource.api_class)(api_client) for resource in resources}
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._synced = threading.Event()
        metrics = metrics if metrics is not None else Registry()
        self._up = metrics.gauge(
            "trawl_enricher_kube_watch_up", "1 while the watch of a Kubernetes resource is current, by resource"
        )
        self._errors = metrics.counter(
            "trawl_enricher_kube_watch_errors_total",
            "Failed lists and watches of the Kubernetes API, by resource and reason",
        )
        self._relists = metrics.counter(
            "trawl_enricher_kube_relists_total", "Lists after a 410 Gone or a failure, by resource"
        )
        self._events = metrics.counter("trawl_enricher_kube_events_total", "Watch events applied, by resource and type")
        self._bad_objects = metrics.counter(
            "trawl_enricher_kube_bad_objects_total", "Kubernetes objects identity could not read, by resource"
        )
        self._claims = metrics.gauge("trawl_enricher_identity_claims", "IP claims in the identity history, by state")
        self._forgotten = metrics.gauge(
            "trawl_enricher_identity_forgotten_claims", "Ended IP claims dropped past the history's bound"
        )
        for resource in resources:
            self._up.set(0, resource=resource.plural)

    # --- life ---------------------------------------------------------------------------------------
    def start(self) -> KubeWatcher:
        for state in self.states.values():
            thread = threading.Thread(
                target=self._run, args=(state,), name=f"kube-watch-{state.resource.plural}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        for state in self.states.values():
            for response in list(state.responses):
                _interrupt(response)
        for thread in self._threads:
            thread.join(timeout_s)

    def wait_synced(self, timeout_s: float) -> bool:
        """Block until every resource has been listed once (True), or `timeout_s` passed (False)."""
        return self._synced.wait(timeout_s)

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    @property
    def degraded(self) -> list[ResourceState]:
        return [state for state in self.states.values() if state.failing]

    def status_line(self) -> str:
        """What /readyz says about identity: current, syncing, or which resources fail and why."""
        failing = self.degraded
        if failing:
            parts = "; ".join(f"{state.resource.plural}: {state.failing} ({state.fix})" for state in failing)
            return f"kubernetes watch of {self.server}: degraded, enriching from what is known: {parts}"
        if not self.synced:
            return f"kubernetes watch of {self.server}: listing"
        return f"kubernetes watch of {self.server}: current"

    def update_gauges(self) -> None:
        counts = self.history.counts()
        self._claims.set(counts["open_claims"], state="open")
        self._claims.set(counts["closed_claims"], state="closed")
        self._forgotten.set(self.history.forgotten)

    # --- one resource -------------------------------------------------------------------------------
    def _run(self, state: ResourceState) -> None:
        backoff = 0.5
        resource_version = ""
        while not self._stopping.is_set():
            try:
                if not resource_version:
                    resource_version = self._list(state)
                resource_version = self._watch(state, resource_version)
                backoff = 0.5
            except Exception as exc:
                if self._stopping.is_set():
                    return
                if _is_gone(exc):
                    resource_version = ""  # list again, at once
                    self._relists.inc(resource=state.resource.plural)
                    log.info("kube_watch_expired", resource=state.resource.plural, action="listing again")
                    continue
                self._failed(state, exc)
                if self._stopping.wait(backoff * random.uniform(0.8, 1.2)):
                    return
                backoff = min(self.backoff_max_s, backoff * 2)
                if not state.listed or isinstance(exc, _Garbage):
                    resource_version = ""

    def _list(self, state: ResourceState) -> str:
        resource = state.resource
        method: Callable[..., Any] = getattr(self._apis[resource.kind], resource.list_method)
        response = method(_preload_content=False, _request_timeout=self.request_timeout_s)
        try:
            document = json.loads(response.data)
        except ValueError as exc:
            raise _Garbage(f"the list of {resource.plural} is not JSON ({exc})") from None
        finally:
            _close(response)
        items, resource_version = _list_parts(document)
        if items is None or not resource_version:
            raise _Garbage(f"the list of {resource.plural} is not a Kubernetes list (no items or resourceVersion)")
        for item in items:
            item.setdefault("kind", resource.kind)
        faults = self.history.replace_all(resource.kind, items)
        self._bad_object_faults(state, faults)
        if state.listed:
            state.relists += 1
        state.listed = True
        state.resource_version = resource_version
        self._recovered(state)
        self.update_gauges()
        if not self._synced.is_set() and all(other.listed for other in self.states.values()):
            self.history.mark_synced()
            self._synced.set()
            log.info("kube_watch_synced", server=self.server, **self.history.counts())
        return resource_version

    def _watch(self, state: ResourceState, resource_version: str) -> str:
        """Apply events until the stream ends; returns the resourceVersion to go on from."""
        from urllib3.exceptions import ProtocolError

        resource = state.resource
        method: Callable[..., Any] = getattr(self._apis[resource.kind], resource.list_method)
        response = method(
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout_s,
            _preload_content=False,
            # Connect timeout; reads wait past the server's own timeout (bookmarks come at most every minute).
            _request_timeout=(self.request_timeout_s, self.watch_timeout_s + self.request_timeout_s + 60),
        )
        state.responses.append(response)
        if state.listed:
            self._recovered(state)
        started, events = time.monotonic(), state.events
        try:
            for line in _lines(response, self._stopping):
                resource_version = self._event(state, line, resource_version)
        except ProtocolError as exc:  # the stream cut mid-way: watch again from where it was
            log.info("kube_watch_cut", resource=resource.plural, error=str(exc), resource_version=resource_version)
        finally:
            state.responses.remove(response)
            _close(response)
        if state.events == events and time.monotonic() - started < 1.0:
            # An empty stream that ended at once (a proxy closing it): not a hot loop of watches.
            self._stopping.wait(1.0)
        return resource_version

    def _event(self, state: ResourceState, line: str, resource_version: str) -> str:
        resource = state.resource
        try:
            event = json.loads(line)
        except ValueError:
            raise _Garbage(f"a watch event of {resource.plural} is not JSON: {line[:80]!r}") from None
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            raise _Garbage(f"a watch event of {resource.plural} has no object: {line[:80]!r}")
        kind, obj = event.get("type"), event["object"]
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone()
            code = obj.get("code")
            if isinstance(code, int) and not isinstance(code, bool):
                raise _WatchError(code, str(obj.get("message", "")))
            raise _Garbage(f"the watch of {resource.plural} failed: {obj.get('message', obj)}")
        metadata = obj.get("metadata")
        version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        if kind == "BOOKMARK":
            return str(version or resource_version)
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            raise _Garbage(f"a watch event of {resource.plural} has the type {kind!r}")
        obj.setdefault("kind", resource.kind)
        try:
            self.history.apply(resource.kind, kind, obj)
        except Exception as exc:  # one bad object (InputError, or a shape the reader did not expect): counted
            self._bad_object_faults(state, [str(exc)])
        state.events += 1
        self._events.inc(resource=resource.plural, type=kind)
        if kind != "MODIFIED":
            self.update_gauges()
        state.resource_version = str(version or resource_version)
        return state.resource_version

    # --- state --------------------------------------------------------------------------------------
    def _bad_object_faults(self, state: ResourceState, faults: list[str]) -> None:
        for fault in faults:
            self._bad_objects.inc(resource=state.resource.plural)
            log.warning("kube_object_unreadable", resource=state.resource.plural, error=fault)

    def _failed(self, state: ResourceState, exc: Exception) -> None:
        reason, fix = self._diagnose(state.resource, exc)
        self._errors.inc(resource=state.resource.plural, reason=reason)
        self._up.set(0, resource=state.resource.plural)
        error = _describe(exc)
        if state.failing != reason:  # one line per change of state, not per retry
            log.warning(
                "kube_watch_failed",
                resource=state.resource.plural,
                server=self.server,
                reason=reason,
                error=error,
                fix=fix,
                enriching="from what is known",
            )
        state.failing, state.error, state.fix = reason, error, fix

    def _recovered(self, state: ResourceState) -> None:
        self._up.set(1, resource=state.resource.plural)
        if state.failing:
            log.info("kube_watch_recovered", resource=state.resource.plural, after=state.failing)
        state.failing = state.error = state.fix = ""

    def _diagnose(self, resource: WatchedResource, exc: Exception) -> tuple[str, str]:
        from kubernetes.client.exceptions import ApiException

        group = resource.group or '"" (core)'
        if isinstance(exc, ApiException | _WatchError):
            status = exc.status if isinstance(exc, ApiException) else exc.code
            if status == 403:
                return "forbidden", (
                    f"grant get, list and watch on {resource.plural} in API group {group} to the enricher's "
                    f"ServiceAccount (the ClusterRole in {RBAC_FILE})"
                )
            if status == 401:
                return "unauthorized", "check the kubeconfig's credentials or the pod's service account token"
            return f"http {status}", f"see the API server's answer: {_describe(exc)}"
        if isinstance(exc, _Garbage):
            return "garbage", f"check that {self.server} is a Kubernetes API server (not a proxy's error page)"
        text = _describe(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text:  # ssl's verification error, under urllib3's wrappers
            return "untrusted", (
                f"the API server at {self.server} presents a certificate no trusted CA signed: give the "
                "enricher the CA that did (the service account's ca.crt in a pod, the kubeconfig's "
                "certificate-authority elsewhere)"
            )
        if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
            return "slow", f"the API server at {self.server} did not answer in {self.request_timeout_s:g} s"
        return "unreachable", f"check that the API server at {self.server} is up and reachable from the enricher"


def dump_identity(
    kubeconfig: Path | None, cluster: str = "", watch_s: float = 0.0, timeout_s: float = 60.0
) -> dict[str, object]:
    """What `trawl identity dump` writes: the cluster listed (and watched `watch_s` more seconds,
    so churn in that time is history too) as a snapshot with every claim (IdentityMap.to_document).
    UserError when the lists cannot be had within `timeout_s` (the reason and the fix in it)."""
    history = ClusterHistory(cluster=cluster)
    watcher = KubeWatcher(history, kube_api_client(kubeconfig), request_timeout_s=min(30.0, timeout_s), backoff_max_s=2)
    watcher.start()
    try:
        if not watcher.wait_synced(timeout_s):
            raise UserError(f"cannot list the cluster in {timeout_s:g} s: {watcher.status_line()}")
        if watch_s > 0:
            time.sleep(watch_s)
        return history.identity.to_document()
    finally:
        watcher.stop()


def _is_gone(exc: Exception) -> bool:
    from kubernetes.client.exceptions import ApiException

    return isinstance(exc, _Gone) or (isinstance(exc, ApiException) and exc.status == 410)


def _list_parts(document: object) -> tuple[list[dict[str, Any]] | None, str]:
    if not isinstance(document, dict):
        return None, ""
    items, metadata = document.get("items"), document.get("metadata")
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        return None, ""
    version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
    return items, str(version or "")


def _lines(response: Any, stopping: threading.Event) -> Iterator[str]:
    """The stream's lines (one watch event each), the last one even without its newline (so an
    answer that is not a stream of events is seen, not dropped)."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        if stopping.is_set():
            return
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield line.decode("utf-8", "replace")
    if buffer.strip() and not stopping.is_set():
        yield buffer.decode("utf-8", "replace")


def _describe(exc: BaseException) -> str:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        try:
            message = json.loads(exc.body or "{}").get("message", "")
        except (ValueError, AttributeError):
            message = ""
        return f"{exc.status} {exc.reason}: {message}" if message else f"{exc.status} {exc.reason}"
    reason = getattr(exc, "reason", None)  # urllib3's MaxRetryError wraps the cause
    return f"{type(exc).__name__}: {reason or exc}"


def _interrupt(response: Any) -> None:
    """Wake the thread reading a watch: shut its socket down. (Closing the response from
    another thread would wait for the reader's buffer lock, held while it waits for data.)"""
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError as exc:  # already closed: the reader is waking anyway
        log.debug("kube_watch_interrupt_failed", error=repr(exc))


def _close(response: Any) -> None:
    try:
        response.close()
        response.release_conn()
    except Exception as exc:  # closing what may already be gone: nothing to lose
        log.debug("kube_response_close_failed", error=repr(exc))
