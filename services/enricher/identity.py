"""Who owned an IP address at a given time, in Kubernetes terms.

The map is built from a snapshot: the JSON that `kubectl get pods,services,nodes -A -o json`
prints (a v1 `List`); EndpointSlices, ReplicaSets, Deployments, StatefulSets, DaemonSets, Jobs
and CronJobs are used when the snapshot has them. Every IP claim has a validity interval
(pod creation to deletion or container end; service and node creation onwards), because pod
IPs are reused: a call at time T is matched to whoever held the address at T.

Resolution when several claims are valid for one address at one time (hostNetwork pods share
their node's IP; tests put several pods on 127.0.0.1):
1. a pod declaring the call's port as a containerPort/hostPort wins;
2. otherwise a node address names the node (host traffic is the node's);
3. otherwise an ordinary pod, preferring one that declares no ports at all (the caller side of
   loopback setups), then the most recently started;
4. then a hostNetwork pod (its node is not in the snapshot), then a service address.

Lookups are on every call's two endpoints, so an address's claims are compiled once, on its
first lookup, into `_Owners`: the winner for every interval between claim boundaries (the
valid set is constant between them) and for every port a claim declares. A lookup is then a
dict get, a bisect and a dict get. `describe_address` hands the same compiled answer, as
serialized Endpoint fields, to the enricher's splicer, which keeps it. A map built from a
snapshot never changes; a live one (trawl.enricher.cluster, fed by the API server's watch)
replaces an address's claims and drops its compiled answer, moves `generation` on and logs the
address, and the enricher makes a new splicer as soon as an address it described has changed
(`changed_since`; see Enricher.enrich_encoded).

`service.name` (the identity's `name`) follows OpenTelemetry's Kubernetes conventions: the
container's OTEL_SERVICE_NAME, the pod annotation resource.opentelemetry.io/service.name, the
label app.kubernetes.io/name, then the workload's name. `mesh` names the service mesh whose
sidecar or injector annotation the pod carries (Istio, Linkerd, Consul, Kuma, other Envoy).

Service mesh: a `tls` call between two different pods of one mesh is noted MESH_MTLS
("mesh-mtls" in the call's notes: `mesh_mtls`); a call captured on a pod's loopback (its
node `<node>/<pod address>`, trawl.collector.loopback) gets its node back, and its endpoints at
loopback addresses (the app and its sidecar) are named as the pod that held that address then.

An address no claim names is named after the DNS question whose A/AAAA answer gave it
(`note_dns`, fed with the `dns` calls the enricher sees: a batch's answers name the calls of
later batches), for calls from that answer's time on; bounded to MAX_DNS_NAMES addresses.

A snapshot may also hold `claims`: the claims themselves, with nanosecond `from`/`to`, as
`to_document` writes them (`trawl identity dump` from a live cluster, history included).

A pod's workload follows its controlling ownerReference: ReplicaSet -> Deployment (through the
ReplicaSet item when present, else by removing the pod's exact `pod-template-hash` suffix),
Job -> CronJob (through the Job item, else by the CronJob naming convention
`<cronjob>-<scheduled minute since the epoch>`), StatefulSet, DaemonSet and any other kind
as is; a pod without owner is its own workload (kind Pod).
"""

from __future__ import annotations

import json
import re
import threading
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Literal

from trawl.collector.loopback import SEPARATOR, is_loopback, split_node
from trawl.errors import InputError
from trawl.v1.calls_pb2 import ApiCall, Endpoint

ClaimKind = Literal["pod", "service", "node"]

# What the enricher's compiled splicer (trawl/_calljson.c, Splicer) keeps per address: an
# endpoint's serialized identity fields 3.. (to append to its ip and port), whether it counts
# as a known source and a known destination, and its mesh when it is a pod of one in
# MUTUAL_TLS_MESHES (UTF-8, b"" otherwise: see `mesh_mtls`); the winners of one interval (for any port, and per declared
# port); then the whole address (`describe_address`).
SpliceEntry = tuple[bytes, bool, bool, bytes]
SpliceWinners = tuple[SpliceEntry, tuple[tuple[int, SpliceEntry], ...]]
AddressPlan = tuple[tuple[int, ...], tuple[SpliceWinners, ...], SpliceWinners]

USED_KINDS = ("Pod", "Service", "Node", "EndpointSlice", "ReplicaSet", "Job")
IGNORED_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "CronJob", "ReplicationController", "Endpoints")
KNOWN_KINDS = USED_KINDS + IGNORED_KINDS

# CronJob controllers name their Jobs "<cronjob>-<scheduled time in minutes since the epoch>";
# 8 digits spans the years 1989-2160, which keeps ordinary "-1", "-42" suffixes out.
_CRONJOB_JOB_NAME = re.compile(r"^(?P<cronjob>.+)-(?P<minute>\d{8,9})$")
_SNAPSHOT_HINT = "expected the output of `kubectl get pods,services,nodes -A -o json`"


@dataclass(frozen=True, slots=True)
class Identity:
    """What an address is, in the Endpoint's terms. `name` is the OpenTelemetry `service.name`
    (see `service_name`); `mesh` the service mesh whose sidecar the pod runs (see `mesh_of`)."""

    kind: ClaimKind
    name: str
    namespace: str = ""
    pod: str = ""
    workload: str = ""
    workload_kind: str = ""
    service: str = ""
    node: str = ""
    cluster: str = ""
    mesh: str = ""
    # What the enricher counts as a known peer on each side (see Enricher.enrich).
    known_as_source: bool = field(init=False, repr=False, compare=False)
    known_as_destination: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "known_as_source", bool(self.workload or self.node))
        object.__setattr__(self, "known_as_destination", bool(self.workload or self.node or self.service))

    def fill(self, endpoint: Endpoint) -> None:
        endpoint.name = self.name
        endpoint.namespace = self.namespace
        endpoint.pod = self.pod
        endpoint.workload = self.workload
        endpoint.workload_kind = self.workload_kind
        endpoint.service = self.service
        endpoint.node = self.node
        endpoint.cluster = self.cluster
        endpoint.mesh = self.mesh


@dataclass(frozen=True, slots=True)
class IpClaim:
    """One identity holding one address from `start_ns` (0 = since ever) to `end_ns` (None = still)."""

    ip: str
    identity: Identity
    start_ns: int = 0
    end_ns: int | None = None
    ports: frozenset[int] = frozenset()
    host_network: bool = False

    @property
    def holder(self) -> tuple[str, Identity, frozenset[int], bool]:
        """What the claim says apart from its times: two claims with one holder are one assignment."""
        return self.ip, self.identity, self.ports, self.host_network

    def valid_at(self, ts_ns: int) -> bool:
        return self.start_ns <= ts_ns and (self.end_ns is None or ts_ns < self.end_ns)

    def rank(self, port: int) -> tuple[int, int, int, int]:
        """Bigger wins; see the module docstring for the order."""
        port_match = int(self.identity.kind == "pod" and port != 0 and port in self.ports)
        if self.identity.kind == "node":
            kind_rank = 3
        elif self.identity.kind == "pod":
            kind_rank = 1 if self.host_network else 2
        else:
            kind_rank = 0
        portless = int(self.identity.kind == "pod" and not self.ports)
        return (port_match, kind_rank, portless, self.start_ns)


# The winner among one set of valid claims: (for any other port, by declared port), or None when none is valid.
_Winners = tuple[Identity, dict[int, Identity]] | None


def _winners(claims: Sequence[IpClaim]) -> _Winners:
    """Who `max(claims, key=rank(port))` picks, for every port that can change the answer."""
    if not claims:
        return None
    default = max(claims, key=lambda claim: claim.rank(0)).identity
    by_port: dict[int, Identity] = {}
    for port in sorted({port for claim in claims for port in claim.ports if port}):
        winner = max(claims, key=lambda claim: claim.rank(port)).identity
        if winner is not default:
            by_port[port] = winner
    return default, by_port


class _Owners:
    """One address's claims, compiled: the winners of every interval between claim boundaries
    (`segments[k]` holds times in [bounds[k-1], bounds[k])), and of the claims still open (time 0)."""

    __slots__ = ("bounds", "now", "segments")

    def __init__(self, claims: Sequence[IpClaim]) -> None:
        self.bounds = sorted({claim.start_ns for claim in claims} | {c.end_ns for c in claims if c.end_ns is not None})
        moments = [self.bounds[0] - 1, *self.bounds]  # one moment inside each interval
        self.segments = [_winners([claim for claim in claims if claim.valid_at(moment)]) for moment in moments]
        self.now = _winners([claim for claim in claims if claim.end_ns is None] or claims)

    def at(self, ts_ns: int, port: int) -> Identity | None:
        winners = self.segments[bisect_right(self.bounds, ts_ns)] if ts_ns else self.now
        if winners is None:
            return None
        default, by_port = winners
        return by_port.get(port, default) if by_port else default


class IdentityMap:
    """Time-aware IP -> Identity lookups.

    A map built from a snapshot never changes. A live one (trawl.enricher.cluster.ClusterHistory
    feeds it from the API server's watch) changes through `add_claim`, `replace_claim` and
    `remove_claim`, from other threads than the lookups': an address's claim list is replaced,
    never edited in place, and its compiled `_Owners` dropped after, so a lookup sees the old
    or the new claims, never half of a change. Each change moves `generation` on and notes the
    address, so a holder of compiled answers (the enricher's splicer) asks `changed_since` which
    addresses it must forget."""

    # How many changed addresses are remembered for `changed_since`; a reader further behind
    # than this is told "everything may have changed" (None).
    CHANGE_LOG = 65_536
    # Addresses named from DNS answers (`note_dns`); past it the longest-named is forgotten.
    MAX_DNS_NAMES = 100_000

    def __init__(self, claims: Iterable[IpClaim] = (), cluster: str = "") -> None:
        self.cluster = cluster
        self._claims: dict[str, list[IpClaim]] = {}
        for claim in claims:
            self._claims.setdefault(claim.ip, []).append(claim)
        self._owners: dict[str, _Owners] = {}  # compiled on an address's first lookup
        self._dns_names: dict[str, tuple[int, str]] = {}  # address -> (named since, name)
        self.generation = 0
        self._changes: deque[tuple[int, str]] = deque(maxlen=self.CHANGE_LOG)
        self._changes_lock = threading.Lock()

    @classmethod
    def empty(cls, cluster: str = "") -> IdentityMap:
        return cls((), cluster)

    @classmethod
    def from_snapshot(cls, path: Path, cluster: str = "") -> IdentityMap:
        """Load a kubectl JSON snapshot; InputError naming the file and the fault when it is not one."""
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read identity snapshot: {exc.strerror}", path=path) from None
        try:
            document = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise InputError(f"not JSON ({exc}); {_SNAPSHOT_HINT}", path=path) from None
        return cls.from_document(document, source=path, cluster=cluster)

    @classmethod
    def from_document(cls, document: object, source: Path | str = "<snapshot>", cluster: str = "") -> IdentityMap:
        """Build from an already parsed snapshot document (a dict shaped like `kubectl ... -o json`)."""
        return cls(_SnapshotReader(source, cluster).claims(document), cluster)

    def __len__(self) -> int:
        return sum(len(claims) for claims in self._claims.values())

    def claims(self) -> Iterator[IpClaim]:
        """Every claim, address by address (a copy of each address's list is walked)."""
        for claims in list(self._claims.values()):
            yield from claims

    def claims_of(self, ip: str) -> tuple[IpClaim, ...]:
        return tuple(self._claims.get(ip, ()))

    # --- changes (a live map) ------------------------------------------------------------------------
    def add_claim(self, claim: IpClaim) -> None:
        self._set_address(claim.ip, [*self._claims.get(claim.ip, ()), claim])

    def replace_claim(self, old: IpClaim, new: IpClaim) -> None:
        """`new` in the place of `old` (same address: a claim's end or start moved)."""
        claims = self._claims.get(old.ip, [])
        self._set_address(old.ip, [new if claim is old else claim for claim in claims])

    def set_claims(self, ip: str, claims: Sequence[IpClaim]) -> None:
        """Everything known about `ip` replaced (what a replica reading another's history does)."""
        self._set_address(ip, list(claims))

    def remove_claim(self, claim: IpClaim) -> None:
        self._set_address(claim.ip, [kept for kept in self._claims.get(claim.ip, ()) if kept is not claim])

    def _set_address(self, ip: str, claims: list[IpClaim]) -> None:
        if claims:
            self._claims[ip] = claims
        else:
            self._claims.pop(ip, None)
        self._owners.pop(ip, None)  # after the new list is in place: see `lookup`
        self._changed(ip)

    def _changed(self, ip: str) -> None:
        with self._changes_lock:
            self.generation += 1
            self._changes.append((self.generation, ip))

    def note_dns(self, call: ApiCall) -> int:
        """Name addresses from a `dns` call's A and AAAA answers: the question's name (what the
        client asked for, before any CNAME), for calls from the response's time on, to an
        address no claim names. Returns how many addresses got a new name."""
        if call.protocol != "dns" or not call.HasField("dns"):
            return 0
        since = call.response.ts or call.request.ts
        named = 0
        for answer in call.dns.answers:
            if answer.type not in ("A", "AAAA") or not answer.data:
                continue
            name = call.path or answer.name
            known = self._dns_names.get(answer.data)
            if known is not None and known[1] == name and known[0] <= since:
                continue
            if known is None and len(self._dns_names) >= self.MAX_DNS_NAMES:
                self._dns_names.pop(next(iter(self._dns_names)))
            self._dns_names[answer.data] = (since, name)
            self._changed(answer.data)
            named += 1
        return named

    def dns_name(self, ip: str, ts_ns: int) -> str:
        """The DNS name seen for `ip` by `ts_ns` (0 = now), else ""."""
        known = self._dns_names.get(ip)
        if known is None or (ts_ns and ts_ns < known[0]):
            return ""
        return known[1]

    def changed_since(self, generation: int) -> set[str] | None:
        """The addresses whose claims changed after `generation`; None when that is further back
        than the change log reaches (treat every address as changed)."""
        with self._changes_lock:
            if generation >= self.generation:
                return set()
            if not self._changes or self._changes[0][0] > generation + 1:
                return None
            changed = set()
            for moment, ip in reversed(self._changes):
                if moment <= generation:
                    break
                changed.add(ip)
            return changed

    def to_document(self) -> dict[str, object]:
        """The map as a snapshot `from_document` reads back to the same answers: a List with no
        items and every claim (open and closed) under `claims` (what `trawl identity dump` writes)."""
        return {
            "apiVersion": "v1",
            "kind": "List",
            "items": [],
            "claims": [_claim_document(claim) for claim in self.claims()],
        }

    @property
    def addresses(self) -> int:
        return len(self._claims)

    def lookup(self, ip: str, ts_ns: int = 0, port: int = 0) -> Identity | None:
        """Who held `ip` at `ts_ns` (0 = now: the claims still open), seen on `port` (0 = unknown)."""
        owners = self._owners.get(ip)
        if owners is None:
            owners = self._compile(ip)
            if owners is None:
                return None
        return owners.at(ts_ns, port)

    def _compile(self, ip: str) -> _Owners | None:
        claims = self._claims.get(ip)
        if not claims:
            return None
        owners = self._owners[ip] = _Owners(claims)
        if self._claims.get(ip) is not claims:  # changed while compiling: the writer's drop may have come first
            self._owners.pop(ip, None)
        return owners

    def describe_address(self, ip: str) -> AddressPlan:
        """Everything `lookup(ip, ts_ns, port)` can answer, for any time and port, as the fields
        `enrich_calls` would set: (claim boundaries, the winners of each interval between them
        (one more than boundaries: bisect_right picks it), the winners "now" (time 0))."""
        unknown: SpliceWinners = ((Endpoint(name=ip).SerializeToString(), False, False, b""), ())
        owners = self._owners.get(ip) or self._compile(ip)
        if owners is None:
            known = self._dns_names.get(ip)
            if known is None:
                return (), (unknown,), unknown
            named: SpliceWinners = ((Endpoint(name=known[1]).SerializeToString(), False, False, b""), ())
            return (known[0],), (unknown, named), named
        entries: dict[Identity, SpliceEntry] = {}

        def entry(identity: Identity) -> SpliceEntry:
            known = entries.get(identity)
            if known is None:
                endpoint = Endpoint()
                identity.fill(endpoint)
                known = entries[identity] = (
                    endpoint.SerializeToString(),
                    identity.known_as_source,
                    identity.known_as_destination,
                    identity.mesh.encode() if identity.kind == "pod" and identity.mesh in MUTUAL_TLS_MESHES else b"",
                )
            return known

        def winners(found: _Winners) -> SpliceWinners:
            if found is None:
                return unknown
            default, by_port = found
            return entry(default), tuple((port, entry(identity)) for port, identity in by_port.items())

        return tuple(owners.bounds), tuple(winners(found) for found in owners.segments), winners(owners.now)

    def enrich_endpoint(self, endpoint: Endpoint, ts_ns: int, address: str = "") -> Identity | None:
        """Fill `endpoint` as the owner of `address` (its own ip when "") at `ts_ns`."""
        address = address or endpoint.ip
        identity = self.lookup(address, ts_ns, endpoint.port)
        if identity is None:
            endpoint.name = self.dns_name(address, ts_ns) or address
            return None
        identity.fill(endpoint)
        return identity

    def enrich(self, call: ApiCall) -> ApiCall:
        """Fill both endpoints' identity fields (in place) at the request's time; unknown peers are named by IP."""
        self.enrich_calls((call,))
        return call

    def enrich_calls(self, calls: Iterable[ApiCall]) -> tuple[int, int]:
        """`enrich` every call; returns how many sources and destinations are unknown peers (no
        identity, or one naming no workload or node, nor service for a destination).

        A call captured on a pod's loopback (its node `<node>/<pod address>`, see
        trawl.collector.loopback) gets its node back, and its loopback endpoints are named as
        the pod at that address. A `tls` call between two pods of one service mesh is the
        mutual TLS of their sidecars: noted MESH_MTLS (see `mesh_mtls`)."""
        unknown_sources = unknown_destinations = 0
        if not self._claims and not self._dns_names:  # no identity: every peer is named by its address
            for call in calls:
                source, destination = call.src, call.dst
                if SEPARATOR in call.node:
                    self._enrich_loopback(call)
                else:
                    source.name = source.ip
                    destination.name = destination.ip
                unknown_sources += 1
            return unknown_sources, unknown_sources
        lookup, dns_name = self.lookup, self.dns_name
        for call in calls:
            if SEPARATOR in call.node:
                sources, destinations = self._enrich_loopback(call)
                unknown_sources += sources
                unknown_destinations += destinations
                continue
            ts_ns = call.request.ts
            source, destination = call.src, call.dst
            source_identity = lookup(source.ip, ts_ns, source.port)
            if source_identity is None:
                source.name = dns_name(source.ip, ts_ns) or source.ip
                unknown_sources += 1
            else:
                source_identity.fill(source)
                unknown_sources += not source_identity.known_as_source
            destination_identity = lookup(destination.ip, ts_ns, destination.port)
            if destination_identity is None:
                destination.name = dns_name(destination.ip, ts_ns) or destination.ip
                unknown_destinations += 1
            else:
                destination_identity.fill(destination)
                unknown_destinations += not destination_identity.known_as_destination
                if source_identity is not None and destination_identity.mesh and call.protocol == "tls":
                    mark_mesh_mtls(call, source_identity, destination_identity)
        return unknown_sources, unknown_destinations

    def _enrich_loopback(self, call: ApiCall) -> tuple[int, int]:
        """A call whose node names the pod whose loopback it was captured on (see `enrich_calls`)."""
        node, pod_address = split_node(call.node)
        call.node = node
        ts_ns = call.request.ts
        source, destination = call.src, call.dst
        source_tied = bool(pod_address) and is_loopback(source.ip)
        destination_tied = bool(pod_address) and is_loopback(destination.ip)
        source_identity = self.enrich_endpoint(source, ts_ns, pod_address if source_tied else "")
        destination_identity = self.enrich_endpoint(destination, ts_ns, pod_address if destination_tied else "")
        if not (source_tied or destination_tied) and call.protocol == "tls":
            mark_mesh_mtls(call, source_identity, destination_identity)
        return (
            source_identity is None or not source_identity.known_as_source,
            destination_identity is None or not destination_identity.known_as_destination,
        )


# The note of a `tls` call between two pods of one service mesh (see `mesh_mtls`).
MESH_MTLS = "mesh-mtls"
# The meshes whose sidecars always speak mutual TLS to each other (Istio's automatic mTLS,
# Linkerd's, Consul Connect's). Kuma's is a setting of the mesh, off unless enabled, and an
# Envoy of unknown configuration may do anything: TLS between such pods may be the apps' own.
MUTUAL_TLS_MESHES = frozenset({"istio", "linkerd", "consul"})


def mesh_mtls(source: Identity | None, destination: Identity | None) -> bool:
    """Whether a `tls` call from `source` to `destination` is the mutual TLS of a mesh: two
    different pods whose sidecars belong to one of MUTUAL_TLS_MESHES (they authenticate each
    other with certificates the mesh issues). What was captured in plaintext between two such
    pods on the pod network was not encrypted by the mesh, whatever its policy says, and is not
    marked; neither is anything inside one pod (its loopback)."""
    return (
        source is not None
        and destination is not None
        and source.kind == "pod"
        and destination.kind == "pod"
        and source.mesh in MUTUAL_TLS_MESHES
        and source.mesh == destination.mesh
        and source != destination
    )


def mark_mesh_mtls(call: ApiCall, source: Identity | None, destination: Identity | None) -> None:
    if mesh_mtls(source, destination) and MESH_MTLS not in call.notes:
        call.notes.append(MESH_MTLS)


@dataclass
class _Workload:
    kind: str
    name: str


@dataclass
class _PodRecord:
    name: str
    namespace: str
    labels: dict[str, str]
    workload: _Workload
    node: str
    ips: list[str]
    ports: frozenset[int]
    host_network: bool
    start_ns: int
    end_ns: int | None
    services: list[str] = field(default_factory=list)
    service_name: str = ""  # OpenTelemetry's service.name from the pod's own spec; "" = the workload's name
    mesh: str = ""
    uid: str = ""

    def identity(self, services: Iterable[str], cluster: str) -> Identity:
        """The pod's identity when `services` select it (the first by name is the one named)."""
        return Identity(
            kind="pod",
            name=self.service_name or self.workload.name,
            namespace=self.namespace,
            pod=self.name,
            workload=self.workload.name,
            workload_kind=self.workload.kind,
            service=min(services, default=""),
            node=self.node,
            cluster=cluster,
            mesh=self.mesh,
        )

    def claims(self, identity: Identity) -> list[IpClaim]:
        return [IpClaim(ip, identity, self.start_ns, self.end_ns, self.ports, self.host_network) for ip in self.ips]


# The OpenTelemetry Kubernetes conventions for service.name, in their order: the container's
# OTEL_SERVICE_NAME, this annotation, this label, then the top owner's (the workload's) name.
SERVICE_NAME_ENV = "OTEL_SERVICE_NAME"
SERVICE_NAME_ANNOTATION = "resource.opentelemetry.io/service.name"
SERVICE_NAME_LABEL = "app.kubernetes.io/name"

# Sidecar containers by mesh: recognised by container name or image, or by the injector's annotation.
_MESH_CONTAINERS = {
    "istio-proxy": "istio",
    "linkerd-proxy": "linkerd",
    "consul-dataplane": "consul",
    "consul-connect-envoy-sidecar": "consul",
    "kuma-sidecar": "kuma",
    "envoy": "envoy",
    "envoy-sidecar": "envoy",
}
_MESH_IMAGES = (
    ("istio/proxyv2", "istio"),
    ("linkerd/proxy", "linkerd"),
    ("consul-dataplane", "consul"),
    ("kuma-dp", "kuma"),
    ("aws-appmesh-envoy", "envoy"),
    ("envoyproxy/envoy", "envoy"),
)
_MESH_ANNOTATIONS = (
    ("sidecar.istio.io/status", "istio"),
    ("ambient.istio.io/redirection", "istio"),
    ("linkerd.io/proxy-version", "linkerd"),
    ("consul.hashicorp.com/connect-inject-status", "consul"),
    ("kuma.io/sidecar-injected", "kuma"),
)


def mesh_of(containers: Iterable[tuple[str, str]], annotations: Mapping[str, str]) -> str:
    """The service mesh a pod is in, from its (container name, image) pairs (init containers
    included: native sidecars are init containers) and annotations; "" when none."""
    pairs = list(containers)
    for name, _ in pairs:
        if name in _MESH_CONTAINERS:
            return _MESH_CONTAINERS[name]
    for _, image in pairs:
        for fragment, mesh in _MESH_IMAGES:
            if fragment in image:
                return mesh
    for annotation, mesh in _MESH_ANNOTATIONS:
        if annotations.get(annotation, "") not in ("", "disabled", "false"):
            return mesh
    return ""


@dataclass
class _ServiceRecord:
    name: str
    namespace: str
    selector: dict[str, str]
    ips: list[str]
    start_ns: int
    end_ns: int | None

    def claims(self, workloads: Iterable[tuple[str, str]], cluster: str) -> list[IpClaim]:
        """The service's addresses; named after the workload behind it when exactly one is."""
        identity = Identity(
            kind="service", name=self.name, namespace=self.namespace, service=self.name, cluster=cluster
        )
        behind = set(workloads)
        if len(behind) == 1:
            kind, name = next(iter(behind))
            identity = replace(identity, name=name, workload=name, workload_kind=kind)
        return [IpClaim(ip, identity, self.start_ns, self.end_ns) for ip in self.ips]


class _SnapshotReader:
    """Validates and reads the snapshot document; every fault becomes an InputError naming the file and item."""

    def __init__(self, source: Path | str, cluster: str) -> None:
        self.source = source
        self.cluster = cluster
        self.where = ""

    def fail(self, message: str) -> InputError:
        prefix = f"{self.where}: " if self.where else ""
        return InputError(f"{prefix}{message}", path=self.source)

    # Typed accessors: each either returns the expected type or raises an InputError naming the field.
    def obj(self, parent: Mapping[str, object], key: str) -> dict[str, object]:
        value = parent.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(f"{key}: expected an object, got {type(value).__name__}")
        return value

    def text(self, parent: Mapping[str, object], key: str) -> str:
        value = parent.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self.fail(f"{key}: expected a string, got {type(value).__name__}")
        return value

    def array(self, parent: Mapping[str, object], key: str) -> list[object]:
        value = parent.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(f"{key}: expected an array, got {type(value).__name__}")
        return value

    def objects(self, parent: Mapping[str, object], key: str) -> list[dict[str, object]]:
        values = self.array(parent, key)
        for index, value in enumerate(values):
            if not isinstance(value, dict):
                raise self.fail(f"{key}[{index}]: expected an object, got {type(value).__name__}")
        return values  # type: ignore[return-value]  # every element checked just above

    def strings(self, parent: Mapping[str, object], key: str) -> list[str]:
        values = self.array(parent, key)
        for index, value in enumerate(values):
            if not isinstance(value, str):
                raise self.fail(f"{key}[{index}]: expected a string, got {type(value).__name__}")
        return values  # type: ignore[return-value]  # every element checked just above

    def string_map(self, parent: Mapping[str, object], key: str) -> dict[str, str]:
        values = self.obj(parent, key)
        for name, value in values.items():
            if not isinstance(value, str):
                raise self.fail(f"{key}.{name}: expected a string, got {type(value).__name__}")
        return values  # type: ignore[return-value]  # every value checked just above

    def port(self, parent: Mapping[str, object], key: str) -> int | None:
        value = parent.get(key)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
            raise self.fail(f"{key}: expected a port number, got {value!r}")
        return value

    def timestamp(self, parent: Mapping[str, object], key: str) -> int | None:
        value = self.text(parent, key)
        if not value:
            return None
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise self.fail(f"{key}: expected an RFC 3339 time like 2024-05-01T10:00:00Z, got {value!r}") from None
        if moment.tzinfo is None:
            raise self.fail(f"{key}: the time {value!r} has no time zone (kubectl writes UTC with a Z)")
        return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1_000

    # The document.
    def claims(self, document: object) -> list[IpClaim]:
        if not isinstance(document, dict):
            raise self.fail(f"the top level is {_json_type(document)}, not an object; {_SNAPSHOT_HINT}")
        kind = document.get("kind")
        if not isinstance(kind, str) or not kind.endswith("List"):
            raise self.fail(f"the top level kind is {kind!r}, not 'List'; {_SNAPSHOT_HINT}")
        if "items" not in document:
            raise self.fail(f"the List has no 'items'; {_SNAPSHOT_HINT}")
        items = self.objects(document, "items")
        by_kind: dict[str, list[tuple[str, dict[str, object]]]] = {kind: [] for kind in KNOWN_KINDS}
        for index, item in enumerate(items):
            item_kind = item.get("kind")
            self.where = f"items[{index}]"
            if not isinstance(item_kind, str) or item_kind not in KNOWN_KINDS:
                raise self.fail(f"kind {item_kind!r} is not one of {', '.join(KNOWN_KINDS)}")
            metadata = self.obj(item, "metadata")
            name = self.text(metadata, "name")
            if not name:
                raise self.fail(f"{item_kind} without metadata.name")
            namespace = self.text(metadata, "namespace")
            self.where = f"items[{index}] ({item_kind} {namespace + '/' if namespace else ''}{name})"
            by_kind[item_kind].append((self.where, item))

        replica_set_owners = self._owners(by_kind["ReplicaSet"])
        job_owners = self._owners(by_kind["Job"])
        pods = [self._pod(where, item, replica_set_owners, job_owners) for where, item in by_kind["Pod"]]
        services = [self._service(where, item) for where, item in by_kind["Service"]]
        slice_pods = self._endpoint_slices(by_kind["EndpointSlice"])
        self.where = ""

        claims: list[IpClaim] = []
        claims.extend(self._recorded_claims(document))
        claims.extend(self._pod_claims(pods, services, slice_pods))
        claims.extend(self._service_claims(services, pods))
        for where, item in by_kind["Node"]:
            claims.extend(self._node_claims(where, item))
        return claims

    def _owners(self, items: list[tuple[str, dict[str, object]]]) -> dict[tuple[str, str], _Workload]:
        """(namespace, name) of a ReplicaSet or Job -> its controlling owner."""
        owners: dict[tuple[str, str], _Workload] = {}
        for where, item in items:
            self.where = where
            metadata = self.obj(item, "metadata")
            owner = self._controller(metadata)
            if owner is not None:
                owners[(self.text(metadata, "namespace"), self.text(metadata, "name"))] = owner
        return owners

    def _controller(self, metadata: Mapping[str, object]) -> _Workload | None:
        references = self.objects(metadata, "ownerReferences")
        for reference in references:
            if reference.get("controller") is True:
                return _Workload(self.text(reference, "kind"), self.text(reference, "name"))
        if references:
            return _Workload(self.text(references[0], "kind"), self.text(references[0], "name"))
        return None

    def _workload(
        self,
        metadata: Mapping[str, object],
        labels: Mapping[str, str],
        replica_set_owners: Mapping[tuple[str, str], _Workload],
        job_owners: Mapping[tuple[str, str], _Workload],
    ) -> _Workload:
        namespace = self.text(metadata, "namespace")
        owner = self._controller(metadata)
        if owner is None or not owner.kind or not owner.name:
            return _Workload("Pod", self.text(metadata, "name"))
        if owner.kind == "ReplicaSet":
            known = replica_set_owners.get((namespace, owner.name))
            if known is not None:
                return known
            template_hash = labels.get("pod-template-hash", "")
            if template_hash and owner.name.endswith(f"-{template_hash}"):
                return _Workload("Deployment", owner.name[: -len(template_hash) - 1])
        if owner.kind == "Job":
            known = job_owners.get((namespace, owner.name))
            if known is not None:
                return known
            match = _CRONJOB_JOB_NAME.match(owner.name)
            if match is not None:
                return _Workload("CronJob", match["cronjob"])
        return owner

    def _pod(
        self,
        where: str,
        item: dict[str, object],
        replica_set_owners: Mapping[tuple[str, str], _Workload],
        job_owners: Mapping[tuple[str, str], _Workload],
    ) -> _PodRecord:
        self.where = where
        metadata, spec, status = self.obj(item, "metadata"), self.obj(item, "spec"), self.obj(item, "status")
        labels = self.string_map(metadata, "labels")
        ips = [self.text(entry, "ip") for entry in self.objects(status, "podIPs")]
        pod_ip = self.text(status, "podIP")
        if pod_ip and pod_ip not in ips:
            ips.insert(0, pod_ip)
        ports: set[int] = set()
        for containers in ("initContainers", "containers"):
            for container in self.objects(spec, containers):
                for port_spec in self.objects(container, "ports"):
                    for key in ("containerPort", "hostPort"):
                        port = self.port(port_spec, key)
                        if port is not None:
                            ports.add(port)
        host_network = spec.get("hostNetwork") is True
        annotations = self.string_map(metadata, "annotations")
        container_specs = [
            (self.text(container, "name"), self.text(container, "image"), container)
            for key in ("containers", "initContainers")
            for container in self.objects(spec, key)
        ]
        service_name = ""
        for name, _, container in container_specs:  # the app's containers, not a mesh's sidecar
            if name in _MESH_CONTAINERS:
                continue
            for variable in self.objects(container, "env"):
                if self.text(variable, "name") == SERVICE_NAME_ENV and self.text(variable, "value"):
                    service_name = self.text(variable, "value")
                    break
            if service_name:
                break
        service_name = (
            service_name or annotations.get(SERVICE_NAME_ANNOTATION, "") or labels.get(SERVICE_NAME_LABEL, "")
        )
        created = self.timestamp(metadata, "creationTimestamp")
        started = self.timestamp(status, "startTime")
        start_ns = created if created is not None else (started or 0)
        end_ns = self.timestamp(metadata, "deletionTimestamp")
        if self.text(status, "phase") in ("Succeeded", "Failed"):
            # A finished pod's IP goes back to the pool when its containers end, long before deletion.
            finished = [
                self.timestamp(self.obj(self.obj(container_status, "state"), "terminated"), "finishedAt")
                for container_status in self.objects(status, "containerStatuses")
            ]
            ends = [moment for moment in finished if moment is not None]
            if ends:
                end_ns = max(ends) if end_ns is None else min(end_ns, max(ends))
        return _PodRecord(
            name=self.text(metadata, "name"),
            namespace=self.text(metadata, "namespace"),
            labels=labels,
            workload=self._workload(metadata, labels, replica_set_owners, job_owners),
            node=self.text(spec, "nodeName"),
            ips=[ip for ip in ips if ip],
            ports=frozenset(ports),
            host_network=host_network,
            start_ns=start_ns,
            end_ns=end_ns,
            service_name=service_name,
            mesh=mesh_of(((name, image) for name, image, _ in container_specs), annotations),
            uid=self.text(metadata, "uid"),
        )

    def _service(self, where: str, item: dict[str, object]) -> _ServiceRecord:
        self.where = where
        metadata, spec, status = self.obj(item, "metadata"), self.obj(item, "spec"), self.obj(item, "status")
        ips = self.strings(spec, "clusterIPs")
        cluster_ip = self.text(spec, "clusterIP")
        if cluster_ip and cluster_ip not in ips:
            ips.insert(0, cluster_ip)
        ips.extend(self.strings(spec, "externalIPs"))
        for ingress in self.objects(self.obj(status, "loadBalancer"), "ingress"):
            ips.append(self.text(ingress, "ip"))
        return _ServiceRecord(
            name=self.text(metadata, "name"),
            namespace=self.text(metadata, "namespace"),
            selector=self.string_map(spec, "selector"),
            # "None" marks a headless service: no virtual IP, the pods' own IPs answer.
            ips=[ip for ip in dict.fromkeys(ips) if ip and ip != "None"],
            start_ns=self.timestamp(metadata, "creationTimestamp") or 0,
            end_ns=self.timestamp(metadata, "deletionTimestamp"),
        )

    def _endpoint_slices(self, items: list[tuple[str, dict[str, object]]]) -> dict[tuple[str, str], _SlicePod]:
        """(namespace, pod) -> the service and addresses an EndpointSlice lists for that pod."""
        found: dict[tuple[str, str], _SlicePod] = {}
        for where, item in items:
            self.where = where
            metadata = self.obj(item, "metadata")
            namespace = self.text(metadata, "namespace")
            service = self.string_map(metadata, "labels").get("kubernetes.io/service-name", "")
            for endpoint in self.objects(item, "endpoints"):
                target = self.obj(endpoint, "targetRef")
                if self.text(target, "kind") != "Pod" or not self.text(target, "name"):
                    continue
                pod_namespace = self.text(target, "namespace") or namespace
                key = (pod_namespace, self.text(target, "name"))
                record = found.setdefault(key, _SlicePod(node=self.text(endpoint, "nodeName")))
                record.addresses.extend(self.strings(endpoint, "addresses"))
                if service and service not in record.services:
                    record.services.append(service)
        return found

    def _pod_claims(
        self,
        pods: list[_PodRecord],
        services: list[_ServiceRecord],
        slice_pods: dict[tuple[str, str], _SlicePod],
    ) -> Iterable[IpClaim]:
        for pod in pods:
            for service in services:
                if _selects(service, pod):
                    pod.services.append(service.name)
            sliced = slice_pods.pop((pod.namespace, pod.name), None)
            if sliced is not None:
                pod.services.extend(name for name in sliced.services if name not in pod.services)
            yield from pod.claims(pod.identity(pod.services, self.cluster))
        # Pods an EndpointSlice lists but the snapshot does not hold: known by name and service only.
        for (namespace, name), sliced in sorted(slice_pods.items()):
            yield from sliced.claims(namespace, name, self.cluster)

    def _service_claims(self, services: list[_ServiceRecord], pods: list[_PodRecord]) -> Iterable[IpClaim]:
        for service in services:
            workloads = {(pod.workload.kind, pod.workload.name) for pod in pods if _selects(service, pod)}
            yield from service.claims(workloads, self.cluster)

    def _node_claims(self, where: str, item: dict[str, object]) -> list[IpClaim]:
        self.where = where
        metadata, status = self.obj(item, "metadata"), self.obj(item, "status")
        name = self.text(metadata, "name")
        identity = Identity(kind="node", name=name, node=name, cluster=self.cluster)
        start_ns = self.timestamp(metadata, "creationTimestamp") or 0
        end_ns = self.timestamp(metadata, "deletionTimestamp")
        claims = [
            IpClaim(self.text(address, "address"), identity, start_ns, end_ns)
            for address in self.objects(status, "addresses")
            if self.text(address, "type") in ("InternalIP", "ExternalIP") and self.text(address, "address")
        ]
        self.where = ""
        return claims

    def _recorded_claims(self, document: Mapping[str, object]) -> list[IpClaim]:
        """The `claims` of a snapshot `IdentityMap.to_document` wrote (a live map's history)."""
        claims = []
        for index, entry in enumerate(self.objects(document, "claims")):
            self.where = f"claims[{index}]"
            kind = self.text(entry, "kind")
            if kind not in ("pod", "service", "node"):
                raise self.fail(f"kind: expected pod, service or node, got {kind!r}")
            start, end = entry.get("from", 0), entry.get("to")
            if not isinstance(start, int) or not (end is None or isinstance(end, int)):
                raise self.fail("from/to: expected nanoseconds since the epoch (to may be null)")
            ports = [self.port({"port": port}, "port") for port in self.array(entry, "ports")]
            identity = Identity(
                kind=kind,  # type: ignore[arg-type]  # checked just above
                cluster=self.cluster or self.text(entry, "cluster"),
                **{name: self.text(entry, name) for name in _IDENTITY_TEXT},
            )
            claims.append(
                IpClaim(
                    self.text(entry, "ip"),
                    identity,
                    start,
                    end,
                    frozenset(port for port in ports if port is not None),
                    entry.get("hostNetwork") is True,
                )
            )
        self.where = ""
        return claims


@dataclass
class _SlicePod:
    node: str
    addresses: list[str] = field(default_factory=list)
    services: list[str] = field(default_factory=list)

    def claims(self, namespace: str, name: str, cluster: str) -> list[IpClaim]:
        """A pod known only from EndpointSlices: by name, service and node."""
        identity = Identity(
            kind="pod",
            name=name,
            namespace=namespace,
            pod=name,
            service=min(self.services, default=""),
            node=self.node,
            cluster=cluster,
        )
        return [IpClaim(ip, identity) for ip in dict.fromkeys(self.addresses)]


_IDENTITY_TEXT = ("name", "namespace", "pod", "workload", "workload_kind", "service", "node", "mesh")


def claims_to_json(claims: Iterable[IpClaim]) -> bytes:
    """Claims as the JSON array a snapshot's `claims` holds (what replicas share through Redis)."""
    return json.dumps([_claim_document(claim) for claim in claims], separators=(",", ":")).encode()


def claims_from_json(data: bytes | str, source: str, cluster: str = "") -> list[IpClaim]:
    """`claims_to_json` read back; InputError naming `source` when it is not that."""
    try:
        entries = json.loads(data)
    except ValueError as exc:
        raise InputError(f"not JSON ({exc})", path=source) from None
    return _SnapshotReader(source, cluster)._recorded_claims({"claims": entries})


def _claim_document(claim: IpClaim) -> dict[str, object]:
    identity = claim.identity
    document: dict[str, object] = {"ip": claim.ip, "kind": identity.kind}
    document.update({name: getattr(identity, name) for name in _IDENTITY_TEXT if getattr(identity, name)})
    if identity.cluster:
        document["cluster"] = identity.cluster
    document["from"] = claim.start_ns
    document["to"] = claim.end_ns
    if claim.ports:
        document["ports"] = sorted(claim.ports)
    if claim.host_network:
        document["hostNetwork"] = True
    return document


def _selects(service: _ServiceRecord, pod: _PodRecord) -> bool:
    """A service with a selector picks the pods of its namespace whose labels include every selector pair."""
    if not service.selector or service.namespace != pod.namespace:
        return False
    return all(pod.labels.get(key) == value for key, value in service.selector.items())


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "an object"
