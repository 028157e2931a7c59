"""The cluster's history as the API server's watch tells it: objects in, IP claims [from, to) out.

`ClusterHistory` keeps the live objects it needs (reduced to the fields identity uses: the
snapshot reader of identity.py parses each one, so a watched cluster and a snapshot of it
resolve alike) and turns every change into claims on an `IdentityMap`:

- a pod's IPs are claimed from its creation (or, for an IP it got later, from when the watch
  said so) until it is deleted (the deletion time, or when the DELETED event came if that was
  earlier), or its containers finished; a pod deleted and created again under the same name
  (a StatefulSet's pod rescheduled) is a new claim, and an IP reused by another pod is another
  claim on the same address: a call at time T is matched to whoever held it at T;
- a Service's ClusterIPs, externalIPs and LoadBalancer ingress IPs, named after the one
  workload behind its selector when there is exactly one;
- EndpointSlice endpoints give the pods they list their service, and pods the watch does not
  (yet) hold a name; Node InternalIP/ExternalIP addresses name the node;
- the owner chain: a pod's controller ReplicaSet resolves to its Deployment, a Job to its
  CronJob (through the watched ReplicaSets and Jobs, else by the controllers' naming rules);
  StatefulSet, DaemonSet, Deployment and CronJob objects themselves are never needed.

When what an address means changes while its holder lives (a Service starts selecting a pod,
its ReplicaSet appears), the old claim ends and the new one starts at that moment: answers for
earlier times do not change. Until `mark_synced` (every resource's first list is in), changes
replace claims outright instead, so the order in which the first lists arrive does not split
every pod's history at start-up.

Memory is bounded: live objects are kept reduced, and claims that have ended are kept up to
`max_closed_claims`, the oldest ended forgotten first (`forgotten` counts them).

Thread-safety: the watch threads call `apply` and `replace_all` concurrently (one lock);
lookups on the map need no lock (see IdentityMap).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from trawl.enricher.identity import (
    Identity,
    IdentityMap,
    IpClaim,
    _PodRecord,
    _selects,
    _ServiceRecord,
    _SlicePod,
    _SnapshotReader,
    _Workload,
)
from trawl.errors import InputError

ObjectKey = tuple[str, str]  # (namespace, name); namespace "" for nodes
SourceKey = tuple[str, str, str]  # ("pod" | "slicepod" | "service" | "node", namespace, name)

WATCHED_KINDS = ("Pod", "Service", "EndpointSlice", "Node", "ReplicaSet", "Job")


class ClusterHistory:
    """Kubernetes objects from a watch -> time-aware claims on `identity`."""

    def __init__(
        self,
        identity: IdentityMap | None = None,
        cluster: str = "",
        clock: Callable[[], int] = time.time_ns,
        max_closed_claims: int = 1_000_000,
    ) -> None:
        self.identity = identity if identity is not None else IdentityMap.empty(cluster)
        self.cluster = cluster
        self.clock = clock
        self.max_closed_claims = max_closed_claims
        self.synced = False
        self.forgotten = 0  # ended claims dropped past max_closed_claims
        self._lock = threading.RLock()
        self._reader = _SnapshotReader("<watch>", cluster)
        self._pods: dict[ObjectKey, _PodRecord] = {}
        self._pod_owner: dict[ObjectKey, tuple[str, str]] = {}  # the controller reference as written
        self._pods_in: dict[str, set[str]] = {}
        self._services: dict[ObjectKey, _ServiceRecord] = {}
        self._services_in: dict[str, set[str]] = {}
        self._selected_by: dict[ObjectKey, frozenset[str]] = {}  # pod -> services whose selector picks it
        self._behind: dict[ObjectKey, Counter[tuple[str, str]]] = {}  # service -> workloads of its pods
        self._slices: dict[ObjectKey, dict[ObjectKey, _SlicePod]] = {}
        self._pod_slices: dict[ObjectKey, set[ObjectKey]] = {}
        self._replica_set_owners: dict[ObjectKey, _Workload] = {}
        self._job_owners: dict[ObjectKey, _Workload] = {}
        self._nodes: set[str] = set()
        self._open: dict[SourceKey, list[IpClaim]] = {}
        self._closed: deque[IpClaim] = deque()
        # Claims the map held before the watch (a snapshot, or the history another replica
        # wrote to Redis): the open ones are reconciled with the first lists (`mark_synced`).
        self._seed_open = [claim for claim in self.identity.claims() if claim.end_ns is None]

    # --- what the watch calls ----------------------------------------------------------------------
    def apply(self, kind: str, event: str, obj: Mapping[str, object]) -> None:
        """One watch event (ADDED, MODIFIED, DELETED) for one object of a WATCHED_KINDS kind.
        Raises InputError (naming the object and field) for an object that is not well formed;
        nothing is changed then."""
        with self._lock:
            getattr(self, f"_apply_{kind.lower()}")(event, obj)

    def replace_all(self, kind: str, objects: Iterable[Mapping[str, object]]) -> list[str]:
        """A (re)list: `objects` is everything of `kind` now; what is known but not listed was
        deleted while the watch was away (ended now). Returns the faults of objects not taken."""
        faults = []
        with self._lock:
            listed: set[ObjectKey] = set()
            for obj in objects:
                listed.add(_object_key(obj))
                try:
                    self.apply(kind, "MODIFIED", obj)
                except (InputError, ValueError) as exc:
                    faults.append(str(exc))
            for key in self._known(kind) - listed:
                self.apply(kind, "DELETED", {"metadata": {"namespace": key[0], "name": key[1]}})
        return faults

    def mark_synced(self) -> None:
        """Every resource's first list is in: from now on changes are history (see the module
        docstring). A seed's open claims that the lists confirm become the watch's (keeping the
        earlier start); the others end now: what they named is gone from the cluster."""
        with self._lock:
            if not self.synced:
                self._adopt_seed()
            self.synced = True

    def _adopt_seed(self) -> None:
        identity = self.identity
        watched: dict[tuple[object, ...], tuple[SourceKey, int]] = {}
        for source, claims in self._open.items():
            for index, claim in enumerate(claims):
                watched.setdefault(claim.holder, (source, index))
        now = self.clock()
        for seed in self._seed_open:
            if seed not in identity.claims_of(seed.ip):
                continue  # changed or gone since
            match = watched.get(seed.holder)
            if match is None:
                ended = replace(seed, end_ns=max(seed.start_ns, now))
                identity.replace_claim(seed, ended)
                self._closed.append(ended)
                continue
            source, index = match
            claim = self._open[source][index]
            identity.remove_claim(seed)
            if seed.start_ns < claim.start_ns:
                earlier = replace(claim, start_ns=seed.start_ns)
                identity.replace_claim(claim, earlier)
                self._open[source][index] = earlier
        self._seed_open = []

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "pods": len(self._pods),
                "services": len(self._services),
                "endpointslices": len(self._slices),
                "nodes": len(self._nodes),
                "open_claims": sum(len(claims) for claims in self._open.values()),
                "closed_claims": len(self._closed),
            }

    # --- per kind -----------------------------------------------------------------------------------
    def _known(self, kind: str) -> set[ObjectKey]:
        if kind == "Node":
            return {("", name) for name in self._nodes}
        known: dict[str, Iterable[ObjectKey]] = {
            "Pod": self._pods,
            "Service": self._services,
            "EndpointSlice": self._slices,
            "ReplicaSet": self._replica_set_owners,
            "Job": self._job_owners,
        }
        return set(known.get(kind, ()))

    def _where(self, kind: str, obj: Mapping[str, object]) -> str:
        namespace, name = _object_key(obj)
        self._reader.where = f"{kind} {namespace + '/' if namespace else ''}{name}"
        return self._reader.where

    def _apply_pod(self, event: str, obj: Mapping[str, object]) -> None:
        key = _object_key(obj)
        now = self.clock()
        if event == "DELETED":
            old = self._pods.get(key)
            end = now
            if old is not None and old.end_ns is not None:
                end = max(old.start_ns, min(now, old.end_ns))
            if obj.get("spec") is not None:  # the final object: its deletion time, when earlier
                final = self._parse_pod(obj)
                if final.end_ns is not None:
                    end = max(final.start_ns, min(end, final.end_ns))
            self._update_pod(key, None, end)
            return
        self._update_pod(key, self._parse_pod(obj), now)

    def _parse_pod(self, obj: Mapping[str, object]) -> _PodRecord:
        where = self._where("Pod", obj)
        reader = self._reader
        record = reader._pod(where, dict(obj), self._replica_set_owners, self._job_owners)
        controller = reader._controller(reader.obj(obj, "metadata"))
        self._pod_owner[_object_key(obj)] = (controller.kind, controller.name) if controller else ("", "")
        reader.where = ""
        return record

    def _update_pod(self, key: ObjectKey, new: _PodRecord | None, at_ns: int) -> None:
        namespace, name = key
        old = self._pods.get(key)
        if new is not None and old is not None and new.uid and old.uid and new.uid != old.uid:
            self._update_pod(key, None, at_ns)  # the same name, another pod: the first one ended
            old = None
        old_selected = self._selected_by.get(key, frozenset())
        new_selected = frozenset(
            service
            for service in self._services_in.get(namespace, ())
            if new is not None and _selects(self._services[(namespace, service)], new)
        )
        if new is None:
            self._pods.pop(key, None)
            self._pod_owner.pop(key, None)
            self._selected_by.pop(key, None)
            names = self._pods_in.get(namespace)
            if names is not None:
                names.discard(name)
                if not names:
                    del self._pods_in[namespace]
        else:
            self._pods[key] = new
            self._pods_in.setdefault(namespace, set()).add(name)
            self._selected_by[key] = new_selected
        old_workload = (old.workload.kind, old.workload.name) if old is not None else None
        new_workload = (new.workload.kind, new.workload.name) if new is not None else None
        for service in old_selected | new_selected:
            behind = self._behind.setdefault((namespace, service), Counter())
            before = set(behind)
            if service in old_selected and old_workload is not None:
                behind[old_workload] -= 1
                if behind[old_workload] <= 0:
                    del behind[old_workload]
            if service in new_selected and new_workload is not None:
                behind[new_workload] += 1
            if set(behind) != before:
                self._refresh_service((namespace, service), at_ns)
        source: SourceKey = ("pod", namespace, name)
        if new is None:
            self._set_claims(source, [], at_ns, ended=True)
            self._open.pop(source, None)
        else:
            services = set(new_selected)
            for slice_key in self._pod_slices.get(key, ()):
                services.update(self._slices[slice_key][key].services)
            self._set_claims(source, new.claims(self._intern(new.identity(services, self.cluster))), at_ns)
        self._refresh_slice_pod(key, at_ns)

    def _apply_service(self, event: str, obj: Mapping[str, object]) -> None:
        key = _object_key(obj)
        namespace, name = key
        now = self.clock()
        new = None
        if event != "DELETED":
            new = self._reader._service(self._where("Service", obj), dict(obj))
            self._reader.where = ""
        if new is None:
            self._services.pop(key, None)
            self._services_in.get(namespace, set()).discard(name)
        else:
            self._services[key] = new
            self._services_in.setdefault(namespace, set()).add(name)
        # Pods it starts or stops selecting: `_update_pod` moves their service and this
        # service's count of the workloads behind it.
        for pod_name in list(self._pods_in.get(namespace, ())):
            pod_key = (namespace, pod_name)
            pod = self._pods[pod_key]
            if (new is not None and _selects(new, pod)) != (name in self._selected_by.get(pod_key, ())):
                self._update_pod(pod_key, pod, now)
        self._refresh_service(key, now, ended=new is None)
        if new is None:
            self._behind.pop(key, None)
            self._open.pop(("service", namespace, name), None)

    def _refresh_service(self, key: ObjectKey, at_ns: int, ended: bool = False) -> None:
        service = self._services.get(key)
        desired = [] if service is None else service.claims(self._behind.get(key, Counter()), self.cluster)
        self._set_claims(("service", *key), [self._intern_claim(claim) for claim in desired], at_ns, ended)

    def _apply_endpointslice(self, event: str, obj: Mapping[str, object]) -> None:
        key = _object_key(obj)
        now = self.clock()
        old = self._slices.pop(key, {})
        new: dict[ObjectKey, _SlicePod] = {}
        if event != "DELETED":
            new = self._reader._endpoint_slices([(self._where("EndpointSlice", obj), dict(obj))])
            self._reader.where = ""
            self._slices[key] = new
        for pod_key in old.keys() - new.keys():
            slices = self._pod_slices.get(pod_key)
            if slices is not None:
                slices.discard(key)
                if not slices:
                    del self._pod_slices[pod_key]
        for pod_key in new:
            self._pod_slices.setdefault(pod_key, set()).add(key)
        for pod_key in old.keys() | new.keys():
            if old.get(pod_key) == new.get(pod_key):
                continue
            pod = self._pods.get(pod_key)
            if pod is not None:
                self._update_pod(pod_key, pod, now)
            else:
                self._refresh_slice_pod(pod_key, now)

    def _refresh_slice_pod(self, key: ObjectKey, at_ns: int) -> None:
        """Claims for a pod only EndpointSlices name (none once the pod itself is known)."""
        source: SourceKey = ("slicepod", *key)
        slices = self._pod_slices.get(key)
        if key in self._pods or not slices:
            if source in self._open:
                self._set_claims(source, [], at_ns, ended=key not in self._pods)
                del self._open[source]
            return
        merged: _SlicePod | None = None
        for slice_key in sorted(slices):
            listed = self._slices[slice_key][key]
            if merged is None:
                merged = _SlicePod(node=listed.node)
            merged.addresses.extend(listed.addresses)
            merged.services.extend(service for service in listed.services if service not in merged.services)
        claims = merged.claims(key[0], key[1], self.cluster) if merged is not None else []
        self._set_claims(source, [self._intern_claim(claim) for claim in claims], at_ns)

    def _apply_node(self, event: str, obj: Mapping[str, object]) -> None:
        _, name = _object_key(obj)
        now = self.clock()
        source: SourceKey = ("node", "", name)
        if event == "DELETED":
            self._nodes.discard(name)
            self._set_claims(source, [], now, ended=True)
            self._open.pop(source, None)
            return
        self._nodes.add(name)
        claims = self._reader._node_claims(self._where("Node", obj), dict(obj))
        self._set_claims(source, [self._intern_claim(claim) for claim in claims], now)

    def _apply_replicaset(self, event: str, obj: Mapping[str, object]) -> None:
        self._apply_owner("ReplicaSet", self._replica_set_owners, event, obj)

    def _apply_job(self, event: str, obj: Mapping[str, object]) -> None:
        self._apply_owner("Job", self._job_owners, event, obj)

    def _apply_owner(
        self, kind: str, owners: dict[ObjectKey, _Workload], event: str, obj: Mapping[str, object]
    ) -> None:
        """A ReplicaSet or Job: its own controller is the workload of the pods it controls."""
        key = _object_key(obj)
        before = owners.get(key)
        if event == "DELETED":
            owners.pop(key, None)  # its pods keep the workload they were resolved to
            return
        self._where(kind, obj)
        controller = self._reader._controller(self._reader.obj(obj, "metadata"))
        self._reader.where = ""
        if controller is None:
            owners.pop(key, None)
        else:
            owners[key] = controller
        if owners.get(key) == before:
            return
        namespace, name = key
        now = self.clock()
        reader = self._reader
        for pod_name in list(self._pods_in.get(namespace, ())):
            pod_key = (namespace, pod_name)
            if self._pod_owner.get(pod_key) != (kind, name):
                continue
            pod = self._pods[pod_key]
            metadata = {
                "namespace": namespace,
                "name": pod_name,
                "ownerReferences": [{"kind": kind, "name": name, "controller": True}],
            }
            workload = reader._workload(metadata, pod.labels, self._replica_set_owners, self._job_owners)
            if workload != pod.workload:
                self._update_pod(pod_key, replace(pod, workload=workload, services=[]), now)

    # --- claims -------------------------------------------------------------------------------------
    def _set_claims(self, source: SourceKey, desired: list[IpClaim], at_ns: int, ended: bool = False) -> None:
        """Make `source`'s open claims `desired`: claims no longer wanted end at `at_ns`, new ones
        start then (or at their own start, for a source seen for the first time). `ended`: the
        source itself is gone (a deletion is history even during the first lists)."""
        identity = self.identity
        known = source in self._open
        current = self._open.get(source, [])
        wanted = {claim.holder: claim for claim in desired}
        kept: list[IpClaim] = []
        for claim in current:
            target = wanted.pop(claim.holder, None)
            if target is None:
                self._end(claim, at_ns, ended)
            elif target.end_ns != claim.end_ns:
                moved = replace(claim, end_ns=target.end_ns)
                identity.replace_claim(claim, moved)
                kept.append(moved)
            else:
                kept.append(claim)
        for claim in wanted.values():
            if known and self.synced and claim.start_ns < at_ns:
                claim = replace(claim, start_ns=at_ns)
            identity.add_claim(claim)
            kept.append(claim)
        self._open[source] = kept

    def _end(self, claim: IpClaim, at_ns: int, gone: bool) -> None:
        if not self.synced and not gone:  # a change during the first lists: not history yet
            self.identity.remove_claim(claim)
            return
        end = at_ns if claim.end_ns is None else min(at_ns, claim.end_ns)
        ended = replace(claim, end_ns=max(claim.start_ns, end))
        self.identity.replace_claim(claim, ended)
        self._closed.append(ended)
        while len(self._closed) > self.max_closed_claims:
            self.identity.remove_claim(self._closed.popleft())
            self.forgotten += 1

    def _intern(self, identity: Identity) -> Identity:
        """One copy of the strings many identities share (namespaces, workloads, nodes...)."""
        return Identity(
            kind=identity.kind,
            name=identity.name,
            namespace=sys.intern(identity.namespace),
            pod=identity.pod,
            workload=sys.intern(identity.workload),
            workload_kind=sys.intern(identity.workload_kind),
            service=sys.intern(identity.service),
            node=sys.intern(identity.node),
            cluster=sys.intern(identity.cluster),
            mesh=sys.intern(identity.mesh),
        )

    def _intern_claim(self, claim: IpClaim) -> IpClaim:
        return replace(claim, identity=self._intern(claim.identity))


def _object_key(obj: Mapping[str, object]) -> ObjectKey:
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        raise ValueError("an object without metadata")
    namespace, name = metadata.get("namespace") or "", metadata.get("name")
    if not isinstance(name, str) or not name or not isinstance(namespace, str):
        raise ValueError("an object without metadata.name")
    return namespace, name
