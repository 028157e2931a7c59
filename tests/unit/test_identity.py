"""The identity map: kubectl snapshots -> time-aware IP owners."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trawl.enricher.identity import ClaimKind, Identity, IdentityMap, IpClaim
from trawl.errors import InputError
from trawl.v1.calls_pb2 import ApiCall

SNAPSHOT = Path(__file__).resolve().parent.parent / "fixtures" / "identity_snapshot.json"


def ns(text: str) -> int:
    moment = datetime.fromisoformat(text)
    return int(moment.timestamp()) * 1_000_000_000


def pod(
    name: str,
    ip: str,
    *,
    namespace: str = "default",
    owner: tuple[str, str] | None = None,
    labels: dict[str, str] | None = None,
    created: str = "2026-01-01T00:00:00Z",
    ports: tuple[int, ...] = (),
    host_network: bool = False,
    node: str = "node-1",
    **status: Any,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "creationTimestamp": created}
    if labels:
        metadata["labels"] = labels
    if owner:
        metadata["ownerReferences"] = [{"kind": owner[0], "name": owner[1], "controller": True, "apiVersion": "v1"}]
    container: dict[str, Any] = {"name": "main", "image": "busybox"}
    if ports:
        container["ports"] = [{"containerPort": port, "protocol": "TCP"} for port in ports]
    spec: dict[str, Any] = {"containers": [container], "nodeName": node}
    if host_network:
        spec["hostNetwork"] = True
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": spec,
        "status": {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running", **status},
    }


def snapshot(*items: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": list(items), "metadata": {"resourceVersion": ""}}


@pytest.fixture(scope="module")
def fixture_map() -> IdentityMap:
    return IdentityMap.from_snapshot(SNAPSHOT, cluster="prod")


def test_deployment_pod_resolves_through_the_pod_template_hash(fixture_map: IdentityMap) -> None:
    found = fixture_map.lookup("10.244.1.12", ns("2026-11-26T10:00:00Z"))
    assert found == Identity(
        kind="pod",
        name="checkout",
        namespace="shop",
        pod="checkout-7d9f8b6c5d-x2k4q",
        workload="checkout",
        workload_kind="Deployment",
        service="checkout",
        node="node-a",
        cluster="prod",
    )


def test_statefulset_daemonset_and_bare_pods(fixture_map: IdentityMap) -> None:
    at = ns("2026-11-26T10:00:00Z")
    redis = fixture_map.lookup("10.244.2.9", at, 6379)
    assert redis is not None
    assert (redis.workload, redis.workload_kind, redis.service) == ("redis", "StatefulSet", "redis")
    exporter = fixture_map.lookup("10.0.1.10", at, 9100)
    assert exporter is not None
    assert (exporter.workload, exporter.workload_kind, exporter.namespace) == (
        "node-exporter",
        "DaemonSet",
        "monitoring",
    )
    bare = fixture_map.lookup("10.244.2.40", at)
    assert bare is not None
    assert (bare.workload, bare.workload_kind, bare.pod) == ("debug-shell", "Pod", "debug-shell")


def test_host_ip_is_the_node_unless_the_port_is_a_host_network_pods(fixture_map: IdentityMap) -> None:
    at = ns("2026-11-26T10:00:00Z")
    for port in (0, 22, 41234):
        node = fixture_map.lookup("10.0.1.10", at, port)
        assert node is not None
        assert (node.kind, node.name, node.node) == ("node", "node-a", "node-a"), port
    external = fixture_map.lookup("203.0.113.10", at)
    assert external is not None
    assert external.name == "node-a"


def test_ip_reuse_picks_the_owner_at_the_time(fixture_map: IdentityMap) -> None:
    # 10.244.1.30: a CronJob's pod until its container finished at 09:00:41, a frontend pod from 09:05:12.
    job_time = fixture_map.lookup("10.244.1.30", ns("2026-11-26T09:00:20Z"))
    assert job_time is not None
    assert (job_time.workload, job_time.workload_kind) == ("report", "CronJob")
    assert fixture_map.lookup("10.244.1.30", ns("2026-11-26T09:03:00Z")) is None
    later = fixture_map.lookup("10.244.1.30", ns("2026-11-26T09:06:00Z"))
    assert later is not None
    assert (later.workload, later.workload_kind) == ("frontend", "Deployment")
    # Before any owner existed the address was nobody's we know.
    assert fixture_map.lookup("10.244.1.30", ns("2026-11-01T00:00:00Z")) is None
    # With no time, the current owner.
    now = fixture_map.lookup("10.244.1.30")
    assert now is not None
    assert now.workload == "frontend"


def test_cluster_ip_names_the_service_and_its_single_workload(fixture_map: IdentityMap) -> None:
    at = ns("2026-11-26T10:00:00Z")
    dns = fixture_map.lookup("10.96.0.10", at, 53)
    assert dns == Identity(
        kind="service",
        name="coredns",
        namespace="kube-system",
        workload="coredns",
        workload_kind="Deployment",
        service="kube-dns",
        cluster="prod",
    )
    api = fixture_map.lookup("10.96.0.1", at, 443)
    assert api is not None
    assert (api.name, api.service, api.workload, api.namespace) == ("kubernetes", "kubernetes", "", "default")
    assert fixture_map.lookup("None", at) is None  # the headless service has no address


def test_a_service_selecting_two_workloads_is_named_by_the_service() -> None:
    identity = IdentityMap.from_document(
        snapshot(
            pod("a-1", "10.1.0.1", labels={"tier": "web"}),
            pod("b-1", "10.1.0.2", labels={"tier": "web"}),
            {
                "kind": "Service",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.50", "selector": {"tier": "web"}},
            },
        )
    )
    found = identity.lookup("10.96.0.50")
    assert found is not None
    assert (found.name, found.service, found.workload) == ("web", "web", "")
    member = identity.lookup("10.1.0.2")
    assert member is not None
    assert (member.workload, member.service) == ("b-1", "web")


def test_replicaset_and_job_items_give_the_owner_chain() -> None:
    identity = IdentityMap.from_document(
        snapshot(
            # No pod-template-hash label: only the ReplicaSet item can name the Deployment.
            pod("api-x1", "10.2.0.1", owner=("ReplicaSet", "api-legacy")),
            {
                "kind": "ReplicaSet",
                "metadata": {
                    "name": "api-legacy",
                    "namespace": "default",
                    "ownerReferences": [{"kind": "Deployment", "name": "api", "controller": True}],
                },
            },
            pod("nightly-1-abc", "10.2.0.2", owner=("Job", "nightly-1")),
            {
                "kind": "Job",
                "metadata": {
                    "name": "nightly-1",
                    "namespace": "default",
                    "ownerReferences": [{"kind": "CronJob", "name": "nightly", "controller": True}],
                },
            },
            pod("oneoff-xyz", "10.2.0.3", owner=("Job", "oneoff")),
            pod("lonely-rs-abc", "10.2.0.4", owner=("ReplicaSet", "lonely-rs"), labels={"pod-template-hash": "zzz"}),
            {"kind": "Deployment", "metadata": {"name": "api", "namespace": "default"}},
        )
    )
    expected = {
        "10.2.0.1": ("api", "Deployment"),
        "10.2.0.2": ("nightly", "CronJob"),
        "10.2.0.3": ("oneoff", "Job"),
        "10.2.0.4": ("lonely-rs", "ReplicaSet"),
    }
    for ip, (workload, kind) in expected.items():
        found = identity.lookup(ip)
        assert found is not None
        assert (found.workload, found.workload_kind) == (workload, kind), ip


def test_deleted_pod_and_endpointslice_only_pod() -> None:
    identity = IdentityMap.from_document(
        snapshot(
            pod("old", "10.3.0.1", created="2026-01-01T00:00:00Z", labels={"app": "x"}),
            {
                "kind": "EndpointSlice",
                "metadata": {"name": "x-abcde", "namespace": "default", "labels": {"kubernetes.io/service-name": "x"}},
                "endpoints": [
                    {"addresses": ["10.3.0.9"], "nodeName": "node-2", "targetRef": {"kind": "Pod", "name": "x-9"}},
                    {"addresses": ["10.3.0.1"], "targetRef": {"kind": "Pod", "name": "old", "namespace": "default"}},
                ],
            },
        )
    )
    sliced = identity.lookup("10.3.0.9")
    assert sliced == Identity(kind="pod", name="x-9", namespace="default", pod="x-9", service="x", node="node-2")
    known = identity.lookup("10.3.0.1")
    assert known is not None
    assert known.service == "x"

    deleted = pod("gone", "10.3.0.5")
    deleted["metadata"]["deletionTimestamp"] = "2026-02-01T00:00:00Z"
    identity = IdentityMap.from_document(snapshot(deleted))
    assert identity.lookup("10.3.0.5", ns("2026-01-15T00:00:00Z")) is not None
    assert identity.lookup("10.3.0.5", ns("2026-02-01T00:00:01Z")) is None


def test_loopback_snapshot_separates_server_and_client_by_port() -> None:
    identity = IdentityMap.from_document(
        snapshot(
            pod("server-0", "127.0.0.1", owner=("StatefulSet", "server"), ports=(8080,)),
            pod(
                "client-6f7d9-abcde",
                "127.0.0.1",
                owner=("ReplicaSet", "client-6f7d9"),
                labels={"pod-template-hash": "6f7d9"},
            ),
        )
    )
    call = ApiCall(id="c1", protocol="http")
    call.src.ip, call.src.port = "127.0.0.1", 51234
    call.dst.ip, call.dst.port = "127.0.0.1", 8080
    call.request.ts = ns("2026-06-01T00:00:00Z")
    identity.enrich(call)
    assert (call.src.workload, call.src.workload_kind, call.src.pod) == ("client", "Deployment", "client-6f7d9-abcde")
    assert (call.dst.workload, call.dst.workload_kind, call.dst.name) == ("server", "StatefulSet", "server")


def test_enrich_names_unknown_peers_by_ip(fixture_map: IdentityMap) -> None:
    call = ApiCall(id="c2", protocol="http")
    call.src.ip, call.src.port = "192.0.2.77", 40000
    call.dst.ip, call.dst.port = "10.96.12.34", 80
    call.request.ts = ns("2026-11-26T10:00:00Z")
    fixture_map.enrich(call)
    assert (call.src.name, call.src.namespace, call.src.workload) == ("192.0.2.77", "", "")
    assert (call.dst.name, call.dst.service, call.dst.namespace, call.dst.cluster) == (
        "checkout",
        "checkout",
        "shop",
        "prod",
    )


def test_dual_stack_pod_addresses() -> None:
    dual = pod("dual", "10.4.0.1")
    dual["status"]["podIPs"] = [{"ip": "10.4.0.1"}, {"ip": "fd00::4:1"}]
    identity = IdentityMap.from_document(snapshot(dual))
    assert identity.lookup("fd00::4:1") == identity.lookup("10.4.0.1")
    assert identity.addresses == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG not json", "not JSON"),
        (b'[{"kind": "Pod"}]', "the top level is an array"),
        (b'{"kind": "Pod", "metadata": {"name": "x"}}', "top level kind is 'Pod', not 'List'"),
        (b'{"kind": "List"}', "has no 'items'"),
        (b'{"kind": "List", "items": [{"kind": "ConfigMap", "metadata": {"name": "c"}}]}', "kind 'ConfigMap'"),
        (b'{"kind": "List", "items": [{"kind": "Pod", "metadata": {}}]}', "Pod without metadata.name"),
        (
            b'{"kind": "List", "items": [{"kind": "Pod", "metadata": {"name": "p", "namespace": "n"},'
            b' "status": {"podIP": 7}}]}',
            "items[0] (Pod n/p): podIP: expected a string, got int",
        ),
        (
            b'{"kind": "List", "items": [{"kind": "Node", "metadata": {"name": "n",'
            b' "creationTimestamp": "yesterday"}}]}',
            "creationTimestamp: expected an RFC 3339 time",
        ),
    ],
)
def test_bad_snapshots_name_the_file_and_the_fault(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "snap.json"
    path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        IdentityMap.from_snapshot(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_missing_snapshot_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read identity snapshot"):
        IdentityMap.from_snapshot(tmp_path / "absent.json")


_json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
_json = st.recursive(
    _json_leaf,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)
_keys = st.sampled_from(
    [
        "kind",
        "metadata",
        "name",
        "namespace",
        "spec",
        "status",
        "podIP",
        "podIPs",
        "ip",
        "ownerReferences",
        "controller",
        "labels",
        "selector",
        "clusterIP",
        "clusterIPs",
        "addresses",
        "address",
        "type",
        "containers",
        "ports",
        "containerPort",
        "hostNetwork",
        "creationTimestamp",
        "deletionTimestamp",
        "phase",
        "endpoints",
        "targetRef",
        "items",
        "containerStatuses",
        "state",
        "terminated",
        "finishedAt",
        "nodeName",
    ]
)
_values = st.sampled_from(
    [
        "Pod",
        "Service",
        "Node",
        "List",
        "ReplicaSet",
        "Job",
        "EndpointSlice",
        "10.0.0.1",
        "None",
        "Succeeded",
        "2026-01-01T00:00:00Z",
        "2026-13-01",
        "InternalIP",
        True,
        0,
        70000,
        "x-1",
    ]
)
_k8s_like = st.recursive(
    _values | _json_leaf,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=6),
    max_leaves=60,
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=_json | _k8s_like | st.builds(lambda items: {"kind": "List", "items": items}, st.lists(_k8s_like)))
def test_fuzz_snapshot_loader(document: object) -> None:
    """Any JSON document: a map or an InputError, never another exception."""
    try:
        identity = IdentityMap.from_document(document, source="fuzz.json")
    except InputError as exc:
        message = str(exc)
    else:
        identity.lookup("10.0.0.1", 1)
        message = "fuzz.json: loaded"
    assert message.startswith("fuzz.json: ")


def test_fuzz_corpus_round_trips_through_a_file(tmp_path: Path) -> None:
    """The file path (not just the document path) reports JSON errors as InputError too."""
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError):
        IdentityMap.from_snapshot(path)
    path.write_text(json.dumps(snapshot(pod("p", "10.9.9.9"))))
    assert IdentityMap.from_snapshot(path).lookup("10.9.9.9") is not None


def test_times_are_utc_nanoseconds() -> None:
    created = "2026-03-04T05:06:07.250Z"
    identity = IdentityMap.from_document(snapshot(pod("p", "10.5.0.1", created=created)))
    start = int(datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC).timestamp()) * 1_000_000_000 + 250_000_000
    assert identity.lookup("10.5.0.1", start) is not None
    assert identity.lookup("10.5.0.1", start - 1) is None


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_mutated_fixture(data: st.DataObject) -> None:
    """The realistic snapshot with one field anywhere replaced by arbitrary JSON: a map or an InputError."""
    document = json.loads(SNAPSHOT.read_text())
    node: Any = document
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, dict | list) and child and data.draw(st.booleans()):
            node = child
            continue
        node[key] = data.draw(_json)
        break
    try:
        IdentityMap.from_document(document, source="mutated.json").lookup("10.244.1.12", 1)
    except InputError as exc:
        assert str(exc).startswith("mutated.json: ")  # noqa: PT017 - either outcome is valid; only its form is checked


# -- the compiled lookup ------------------------------------------------------------------------


def reference_lookup(claims: list[IpClaim], ip: str, ts_ns: int, port: int) -> Identity | None:
    """The resolution rules written out directly (filter the valid claims, take the best rank)."""
    mine = [claim for claim in claims if claim.ip == ip]
    if not mine:
        return None
    if ts_ns:
        valid = [claim for claim in mine if claim.valid_at(ts_ns)]
    else:
        valid = [claim for claim in mine if claim.end_ns is None] or mine
    return max(valid, key=lambda claim: claim.rank(port)).identity if valid else None


MOMENTS = st.sampled_from([0, 5, 10, 20, 30])


@st.composite
def claims_strategy(draw: st.DrawFn) -> IpClaim:
    kind: ClaimKind = draw(st.sampled_from(["pod", "service", "node"]))
    start = draw(MOMENTS)
    end = draw(st.none() | st.integers(start + 1, 35))
    name = f"{kind}-{draw(st.integers(0, 999))}"
    identity = Identity(
        kind=kind, name=name, workload=name if kind == "pod" else "", node="n" if kind == "node" else ""
    )
    return IpClaim(
        draw(st.sampled_from(["10.0.0.1", "10.0.0.2"])),
        identity,
        start,
        end,
        frozenset(draw(st.lists(st.sampled_from([53, 80, 8080]), max_size=2))),
        draw(st.booleans()),
    )


@settings(deadline=None)
@given(
    st.lists(claims_strategy(), max_size=6),
    st.lists(st.tuples(st.integers(0, 40), st.sampled_from([0, 53, 80, 443])), max_size=12),
)
def test_compiled_lookup_answers_as_the_rules_do(claims: list[IpClaim], queries: list[tuple[int, int]]) -> None:
    identity = IdentityMap(claims)
    for ts_ns, port in queries:
        for ip in ("10.0.0.1", "10.0.0.2", "10.9.9.9"):
            assert identity.lookup(ip, ts_ns, port) is reference_lookup(claims, ip, ts_ns, port)


def endpoint_call(src: tuple[str, int], dst: tuple[str, int], ts_ns: int) -> ApiCall:
    call = ApiCall(id="c", protocol="http")
    call.src.ip, call.src.port = src
    call.dst.ip, call.dst.port = dst
    call.request.ts = ts_ns
    return call


def test_enrich_calls_fills_like_enrich_and_counts_unknown_peers(fixture_map: IdentityMap) -> None:
    when = ns("2026-11-26T10:00:00Z")
    peers = [("10.244.1.12", 40000), ("10.96.12.34", 80), ("192.0.2.77", 1234), ("172.18.0.2", 10250)]
    pairs = [(src, dst) for src in peers for dst in peers]
    one_by_one = [fixture_map.enrich(endpoint_call(src, dst, when)) for src, dst in pairs]
    batch = [endpoint_call(src, dst, when) for src, dst in pairs]
    unknown_sources, unknown_destinations = fixture_map.enrich_calls(batch)
    assert batch == one_by_one
    assert unknown_sources == sum(1 for call in batch if not call.src.workload and not call.src.node)
    assert unknown_destinations == sum(
        1 for call in batch if not call.dst.workload and not call.dst.node and not call.dst.service
    )
    assert 0 < unknown_sources < len(batch) and 0 < unknown_destinations < len(batch)


def test_enrich_calls_without_a_snapshot_names_peers_by_address() -> None:
    calls = [endpoint_call(("10.0.0.1", 1), ("10.0.0.2", 2), 5), endpoint_call(("fd00::1", 3), ("10.0.0.3", 4), 0)]
    assert IdentityMap.empty().enrich_calls(calls) == (2, 2)
    assert [(c.src.name, c.dst.name) for c in calls] == [("10.0.0.1", "10.0.0.2"), ("fd00::1", "10.0.0.3")]
    assert not calls[0].src.workload and not calls[0].dst.namespace
