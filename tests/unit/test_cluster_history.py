"""ClusterHistory: watch events -> time-aware claims (the logic, without an API server; the
watch against the stand-in is tests/integration/test_k8s_watch.py)."""

from __future__ import annotations

from typing import Any

from tests.kube_apiserver import pod
from trawl.enricher.cluster import ClusterHistory
from trawl.enricher.identity import IdentityMap, mesh_of

SECOND = 1_000_000_000
T0 = 1_780_000_000 * SECOND  # 2026-05-28


def at(seconds: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(T0 / SECOND + seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now

    def to(self, seconds: int) -> None:
        self.now = T0 + seconds * SECOND


def service(name: str, ip: str, selector: dict[str, str], created: int = 0) -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "creationTimestamp": at(created)},
        "spec": {"clusterIP": ip, "selector": selector},
    }


def history() -> tuple[ClusterHistory, Clock]:
    clock = Clock()
    found = ClusterHistory(cluster="c1", clock=clock)
    found.mark_synced()
    return found, clock


def test_a_reused_ip_maps_to_whoever_held_it_at_the_time() -> None:
    cluster, clock = history()
    clock.to(100)
    cluster.apply("Pod", "ADDED", pod("web-1", "10.1.0.5", owner=("StatefulSet", "web"), created=at(10)))
    clock.to(200)
    cluster.apply("Pod", "DELETED", pod("web-1", "10.1.0.5", owner=("StatefulSet", "web"), created=at(10)))
    clock.to(300)
    cluster.apply("Pod", "ADDED", pod("db-0", "10.1.0.5", owner=("StatefulSet", "db"), created=at(250)))
    identity = cluster.identity
    assert identity.lookup("10.1.0.5", T0 + 5 * SECOND) is None
    first = identity.lookup("10.1.0.5", T0 + 150 * SECOND)
    assert first is not None and (first.pod, first.workload, first.workload_kind) == ("web-1", "web", "StatefulSet")
    assert identity.lookup("10.1.0.5", T0 + 220 * SECOND) is None
    second = identity.lookup("10.1.0.5", T0 + 260 * SECOND)
    assert second is not None and second.pod == "db-0"
    assert identity.lookup("10.1.0.5").pod == "db-0"  # type: ignore[union-attr]  # "now"


def test_a_rescheduled_pod_with_the_same_name_is_a_new_claim() -> None:
    cluster, clock = history()
    first = pod("web-0", "10.1.0.7", owner=("StatefulSet", "web"), created=at(0))
    first["metadata"]["uid"] = "one"
    cluster.apply("Pod", "ADDED", first)
    clock.to(50)
    second = pod("web-0", "10.1.0.9", owner=("StatefulSet", "web"), created=at(50))
    second["metadata"]["uid"] = "two"
    cluster.apply("Pod", "ADDED", second)  # the DELETED was missed: the uid tells
    assert cluster.identity.lookup("10.1.0.7", T0 + 10 * SECOND).pod == "web-0"  # type: ignore[union-attr]
    assert cluster.identity.lookup("10.1.0.7", T0 + 60 * SECOND) is None
    assert cluster.identity.lookup("10.1.0.9", T0 + 60 * SECOND).pod == "web-0"  # type: ignore[union-attr]


def test_a_service_starting_to_select_a_pod_changes_its_identity_from_then_on() -> None:
    cluster, clock = history()
    labels = {"app": "api"}
    cluster.apply(
        "Pod", "ADDED", pod("api-x", "10.1.0.2", labels=labels, owner=("ReplicaSet", "api-6d4f"), created=at(0))
    )
    cluster.apply(
        "ReplicaSet",
        "ADDED",
        {
            "kind": "ReplicaSet",
            "metadata": {
                "name": "api-6d4f",
                "namespace": "default",
                "ownerReferences": [{"kind": "Deployment", "name": "api", "controller": True}],
            },
        },
    )
    clock.to(100)
    cluster.apply("Service", "ADDED", service("api", "10.96.0.10", labels, created=100))
    before = cluster.identity.lookup("10.1.0.2", T0 + 50 * SECOND)
    after = cluster.identity.lookup("10.1.0.2", T0 + 150 * SECOND)
    assert before is not None and (before.workload, before.workload_kind, before.service) == ("api", "Deployment", "")
    assert after is not None and (after.workload, after.service) == ("api", "api")
    virtual = cluster.identity.lookup("10.96.0.10", T0 + 150 * SECOND)
    assert virtual is not None and (virtual.kind, virtual.workload, virtual.service) == ("service", "api", "api")
    clock.to(200)
    cluster.apply("Service", "DELETED", service("api", "10.96.0.10", labels))
    assert cluster.identity.lookup("10.96.0.10", T0 + 250 * SECOND) is None
    assert cluster.identity.lookup("10.1.0.2", T0 + 250 * SECOND).service == ""  # type: ignore[union-attr]


def test_endpoint_slices_name_pods_the_watch_does_not_hold() -> None:
    cluster, clock = history()
    endpoint_slice = {
        "kind": "EndpointSlice",
        "metadata": {"name": "db-abc", "namespace": "default", "labels": {"kubernetes.io/service-name": "db"}},
        "endpoints": [{"addresses": ["10.1.0.30"], "nodeName": "n2", "targetRef": {"kind": "Pod", "name": "db-0"}}],
    }
    cluster.apply("EndpointSlice", "ADDED", endpoint_slice)
    found = cluster.identity.lookup("10.1.0.30")
    assert found is not None and (found.pod, found.service, found.node) == ("db-0", "db", "n2")
    clock.to(10)
    cluster.apply("Pod", "ADDED", pod("db-0", "10.1.0.30", owner=("StatefulSet", "db"), created=at(0)))
    found = cluster.identity.lookup("10.1.0.30", T0 + 20 * SECOND)
    assert found is not None and (found.workload, found.service) == ("db", "db")


def test_service_name_follows_the_opentelemetry_order_and_meshes_are_recognised() -> None:
    cluster, _ = history()
    owner = ("StatefulSet", "top")
    cluster.apply(
        "Pod",
        "ADDED",
        pod(
            "a",
            "10.2.0.1",
            owner=owner,
            env={"OTEL_SERVICE_NAME": "from-env"},
            annotations={"resource.opentelemetry.io/service.name": "from-annotation"},
            labels={"app.kubernetes.io/name": "from-label"},
        ),
    )
    cluster.apply(
        "Pod",
        "ADDED",
        pod(
            "b",
            "10.2.0.2",
            owner=owner,
            annotations={"resource.opentelemetry.io/service.name": "from-annotation"},
            labels={"app.kubernetes.io/name": "from-label"},
            containers=("app", "istio-proxy"),
        ),
    )
    cluster.apply(
        "Pod",
        "ADDED",
        pod(
            "c",
            "10.2.0.3",
            owner=owner,
            labels={"app.kubernetes.io/name": "from-label"},
            annotations={"linkerd.io/proxy-version": "stable-2.14"},
        ),
    )
    cluster.apply("Pod", "ADDED", pod("d", "10.2.0.4", owner=owner))
    names = [
        (found.name, found.workload, found.mesh)
        for ip in ("10.2.0.1", "10.2.0.2", "10.2.0.3", "10.2.0.4")
        if (found := cluster.identity.lookup(ip)) is not None
    ]
    assert names == [
        ("from-env", "top", ""),
        ("from-annotation", "top", "istio"),
        ("from-label", "top", "linkerd"),
        ("top", "top", ""),
    ]
    assert mesh_of([("app", "shop:1"), ("proxy", "docker.io/envoyproxy/envoy:v1.30")], {}) == "envoy"
    assert mesh_of([("app", "shop:1")], {"sidecar.istio.io/status": '{"initContainers":["istio-init"]}'}) == "istio"
    assert mesh_of([("app", "shop:1")], {}) == ""


def test_a_relist_ends_what_was_deleted_while_the_watch_was_away() -> None:
    cluster, clock = history()
    cluster.apply("Pod", "ADDED", pod("a", "10.3.0.1", created=at(0)))
    cluster.apply("Pod", "ADDED", pod("b", "10.3.0.2", created=at(0)))
    clock.to(100)
    faults = cluster.replace_all(
        "Pod",
        [
            pod("b", "10.3.0.2", created=at(0)),
            {"kind": "Pod", "metadata": {"name": "bad", "namespace": "default"}, "spec": {"containers": "nope"}},
        ],
    )
    assert len(faults) == 1 and "containers" in faults[0]
    assert cluster.identity.lookup("10.3.0.1", T0 + 50 * SECOND).pod == "a"  # type: ignore[union-attr]
    assert cluster.identity.lookup("10.3.0.1", T0 + 150 * SECOND) is None
    assert cluster.identity.lookup("10.3.0.2", T0 + 150 * SECOND).pod == "b"  # type: ignore[union-attr]


def test_ended_claims_are_bounded_and_the_history_dumps_and_loads_back() -> None:
    cluster, clock = history()
    cluster.max_closed_claims = 5
    for index in range(12):
        clock.to(index * 10)
        cluster.apply("Pod", "ADDED", pod(f"p{index}", "10.4.0.1", created=at(index * 10)))
        clock.to(index * 10 + 5)
        cluster.apply("Pod", "DELETED", pod(f"p{index}", "10.4.0.1", created=at(index * 10)))
    assert cluster.forgotten == 7 and cluster.counts()["closed_claims"] == 5
    assert cluster.identity.lookup("10.4.0.1", T0 + 21 * SECOND) is None  # forgotten
    assert cluster.identity.lookup("10.4.0.1", T0 + 111 * SECOND).pod == "p11"  # type: ignore[union-attr]
    loaded = IdentityMap.from_document(cluster.identity.to_document(), cluster="c1")
    for moment in range(0, 130, 3):
        ts = T0 + moment * SECOND
        assert loaded.lookup("10.4.0.1", ts) == cluster.identity.lookup("10.4.0.1", ts), moment


def test_changes_are_logged_for_compiled_readers() -> None:
    cluster, _ = history()
    start = cluster.identity.generation
    cluster.apply("Pod", "ADDED", pod("a", "10.5.0.1", created=at(0)))
    assert cluster.identity.changed_since(start) == {"10.5.0.1"}
    assert cluster.identity.changed_since(cluster.identity.generation) == set()


def test_the_compiled_splicer_sees_a_live_map_change() -> None:
    from trawl.enricher.config import EnricherSettings
    from trawl.enricher.logic import Enricher
    from trawl.v1.calls_pb2 import ApiCall

    cluster, _ = history()
    enricher = Enricher(EnricherSettings(), cluster.identity)

    def spliced(src: str, dst: str) -> ApiCall:
        made = ApiCall(id="x", protocol="http")
        made.src.ip, made.src.port = src, 40000
        made.dst.ip, made.dst.port = dst, 80
        made.request.ts = T0 + 500 * SECOND
        return ApiCall.FromString(enricher.enrich_encoded([made.SerializeToString()])[0])

    cluster.apply("Pod", "ADDED", pod("client", "10.6.0.1", owner=("DaemonSet", "agent"), created=at(0)))
    first = spliced("10.6.0.1", "10.6.0.2")
    assert (first.src.workload, first.dst.name, first.dst.workload) == ("agent", "10.6.0.2", "")
    cluster.apply("Pod", "ADDED", pod("server", "10.6.0.2", owner=("StatefulSet", "db"), created=at(0)))
    second = spliced("10.6.0.1", "10.6.0.2")  # 10.6.0.2 was described as unknown: a new splicer
    assert (second.src.workload, second.dst.workload, second.dst.workload_kind) == ("agent", "db", "StatefulSet")
    kept = enricher._splicer
    cluster.apply("Pod", "ADDED", pod("other", "10.6.0.3", created=at(0)))
    spliced("10.6.0.1", "10.6.0.2")
    assert enricher._splicer is kept  # an address it never described changed: the cache stays


def test_a_seeded_history_is_reconciled_with_the_first_lists() -> None:
    clock = Clock()
    seeded = ClusterHistory(cluster="c1", clock=clock)
    seeded.apply("Pod", "ADDED", pod("kept", "10.7.0.1", created=at(0)))
    seeded.apply("Pod", "ADDED", pod("gone", "10.7.0.2", created=at(0)))
    seeded.mark_synced()
    clock.to(100)
    history = ClusterHistory(IdentityMap.from_document(seeded.identity.to_document(), cluster="c1"), "c1", clock)
    history.replace_all("Pod", [pod("kept", "10.7.0.1", created=at(50))])  # the list says it started later
    clock.to(200)
    history.mark_synced()
    kept = history.identity.claims_of("10.7.0.1")
    assert [(claim.identity.pod, claim.start_ns, claim.end_ns) for claim in kept] == [("kept", T0, None)]
    gone = history.identity.claims_of("10.7.0.2")
    assert [(claim.identity.pod, claim.end_ns) for claim in gone] == [("gone", T0 + 200 * SECOND)]


def test_dns_answers_name_addresses_no_claim_names_from_then_on() -> None:
    from trawl.enricher.config import EnricherSettings
    from trawl.enricher.logic import Enricher
    from trawl.v1.calls_pb2 import ApiCall

    answered = T0 + 100 * SECOND
    question = ApiCall(id="d" * 24, protocol="dns", method="A", path="api.example.com")
    question.src.ip, question.dst.ip = "10.9.0.1", "10.96.0.10"
    question.request.ts, question.response.ts = answered - 1000, answered
    for data in ("203.0.113.7", "10.9.0.1"):  # the second is a pod's: its claim names it, not DNS
        question.dns.answers.add(name="edge.cdn.example.net", type="A", data=data)
    question.dns.answers.add(name="api.example.com", type="CNAME", data="edge.cdn.example.net")

    def later(at_ns: int) -> ApiCall:
        made = ApiCall(id=f"{at_ns:024x}", protocol="http")
        made.src.ip, made.dst.ip, made.dst.port = "10.9.0.1", "203.0.113.7", 443
        made.request.ts = at_ns
        return made

    for encoded in (False, True):  # the object path (the service) and the splicer's (analyze --json)
        cluster, _ = history()
        cluster.apply("Pod", "ADDED", pod("client", "10.9.0.1", owner=("DaemonSet", "agent"), created=at(0)))
        enricher = Enricher(EnricherSettings(), cluster.identity)
        calls = [later(answered + SECOND), later(answered - SECOND)]
        if encoded:
            enricher.enrich_encoded([question.SerializeToString()])
            enriched = [
                ApiCall.FromString(data) for data in enricher.enrich_encoded([c.SerializeToString() for c in calls])
            ]
        else:
            enricher.enrich_calls([question])
            enriched = enricher.enrich_calls(calls)
        assert enriched[0].dst.name == "api.example.com", encoded
        assert enriched[1].dst.name == "203.0.113.7", encoded  # before the answer
        assert enriched[0].src.workload == "agent" and enriched[0].src.name == "agent", encoded
