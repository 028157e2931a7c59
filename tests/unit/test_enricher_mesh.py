"""Service mesh calls in the enricher: a `tls` call between two pods of one mesh noted as the
mesh's mutual TLS, and calls captured on a pod's loopback (node `<node>/<pod address>`, see
trawl.collector.loopback) named as that pod, on the object path (IdentityMap.enrich_calls) and
on the compiled splicer's (Enricher.enrich_encoded), which must give the same bytes."""

from __future__ import annotations

from typing import Any

from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trawl import _calljson
from trawl.collector.loopback import is_loopback, loopback_node, split_node
from trawl.enricher.config import EnricherSettings
from trawl.enricher.identity import MESH_MTLS, IdentityMap
from trawl.enricher.logic import Enricher
from trawl.render import calls_to_json_lines
from trawl.v1.calls_pb2 import ApiCall

CREATED = "2026-01-01T00:00:00Z"
T0 = 1_767_225_600_000_000_000  # CREATED in nanoseconds
LATER = T0 + 3_600 * 1_000_000_000
REUSED_AT = T0 + 1_800 * 1_000_000_000  # checkout-2 ends and legacy takes its address


def _pod(name: str, ip: str, sidecar: tuple[str, str] | None, **metadata: Any) -> dict[str, Any]:
    containers: list[dict[str, Any]] = [{"name": "app", "image": "shop/app:1", "ports": [{"containerPort": 8080}]}]
    if sidecar is not None:
        containers.append({"name": sidecar[0], "image": sidecar[1]})
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "creationTimestamp": CREATED, **metadata},
        "spec": {"nodeName": "node-1", "containers": containers},
        "status": {"podIP": ip, "phase": "Running"},
    }


ISTIO = ("istio-proxy", "docker.io/istio/proxyv2:1.22.0")
LINKERD = ("linkerd-proxy", "cr.l5d.io/linkerd/proxy:stable-2.14.10")
KUMA = ("kuma-sidecar", "docker.io/kumahq/kuma-dp:2.7.0")
PODS = {
    "frontend": ("10.244.1.10", ISTIO),
    "checkout": ("10.244.1.11", ISTIO),
    "payments": ("10.244.1.12", LINKERD),
    "plain": ("10.244.1.13", None),
    "kuma-a": ("10.244.1.15", KUMA),
    "kuma-b": ("10.244.1.16", KUMA),
}
DOCUMENT = {
    "apiVersion": "v1",
    "kind": "List",
    "items": [
        *(_pod(name, ip, sidecar) for name, (ip, sidecar) in PODS.items()),
        _pod("checkout-2", "10.244.1.14", ISTIO, deletionTimestamp="2026-01-01T00:30:00Z"),
        _pod("legacy", "10.244.1.14", None, creationTimestamp="2026-01-01T00:30:00Z"),
        {
            "kind": "Service",
            "metadata": {"name": "checkout", "namespace": "shop", "creationTimestamp": CREATED},
            "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "none"}},
        },
    ],
}
IDENTITY = IdentityMap.from_document(DOCUMENT)
IP = {name: ip for name, (ip, _) in PODS.items()}


def _call(protocol: str, src: str, dst: str, node: str = "node-1", **fields: Any) -> ApiCall:
    call = ApiCall(protocol=protocol, node=node, **fields)
    call.src.ip, call.src.port = src, 40_000
    call.dst.ip, call.dst.port = dst, 8080
    call.request.ts = LATER
    return call


def _enricher(identity: IdentityMap = IDENTITY) -> Enricher:
    return Enricher(EnricherSettings(), identity)


def test_tls_between_two_pods_of_one_mesh_is_noted_mutual_tls() -> None:
    meshed = IDENTITY.enrich(_call("tls", IP["frontend"], IP["checkout"]))
    assert list(meshed.notes) == [MESH_MTLS]
    assert (meshed.src.mesh, meshed.dst.mesh) == ("istio", "istio")
    # Not the mesh's mTLS: plaintext on the pod network, another mesh, a pod outside any mesh,
    # a service address, one pod talking to itself, a mesh whose mTLS is a setting (Kuma's).
    for call in (
        _call("http", IP["frontend"], IP["checkout"]),
        _call("tls", IP["frontend"], IP["payments"]),
        _call("tls", IP["plain"], IP["checkout"]),
        _call("tls", IP["frontend"], "10.96.0.20"),
        _call("tls", IP["checkout"], IP["checkout"]),
        _call("tls", IP["kuma-a"], IP["kuma-b"]),
    ):
        assert list(IDENTITY.enrich(call).notes) == [], call
    # Once only, after the dissector's own notes.
    noted = _call("tls", IP["checkout"], IP["frontend"], notes=["gap"])
    IDENTITY.enrich(IDENTITY.enrich(noted))
    assert list(noted.notes) == ["gap", MESH_MTLS]


def test_the_mark_follows_who_held_the_address_at_the_calls_time() -> None:
    before = _call("tls", IP["frontend"], "10.244.1.14")
    before.request.ts = T0 + 60 * 1_000_000_000
    after = _call("tls", IP["frontend"], "10.244.1.14")
    assert (IDENTITY.enrich(before).dst.pod, list(before.notes)) == ("checkout-2", [MESH_MTLS])
    assert (IDENTITY.enrich(after).dst.pod, list(after.notes)) == ("legacy", [])


def test_loopback_calls_are_the_pods_and_get_their_node_back() -> None:
    outbound = _call("http", "127.0.0.1", "127.0.0.1", node=loopback_node("node-1", IP["checkout"]))
    inbound = _call("http", "127.0.0.6", IP["checkout"], node=loopback_node("node-1", IP["checkout"]))
    for call in IDENTITY.enrich(outbound), IDENTITY.enrich(inbound):
        assert call.node == "node-1"
        assert (call.src.pod, call.dst.pod, call.dst.mesh) == ("checkout", "checkout", "istio")
    assert (outbound.src.ip, outbound.dst.ip, inbound.src.ip) == ("127.0.0.1", "127.0.0.1", "127.0.0.6")
    # An address no claim names: the loopback ends are named after it, and counted unknown.
    unknown = _call("http", "::1", "::1", node=loopback_node("node-1", "192.0.2.9"))
    assert IDENTITY.enrich_calls([unknown]) == (1, 1)
    assert (unknown.node, unknown.src.name, unknown.dst.name, unknown.src.ip) == ("node-1", *["192.0.2.9"] * 2, "::1")
    # TLS between an app and its sidecar stays inside the pod: not the mesh's mTLS.
    inside = _call("tls", "127.0.0.1", IP["frontend"], node=loopback_node("node-1", IP["frontend"]))
    assert list(IDENTITY.enrich(inside).notes) == []


def test_loopback_calls_without_any_identity() -> None:
    call = _call("http", "127.0.0.1", "127.0.0.1", node=loopback_node("node-1", IP["checkout"]))
    assert IdentityMap.empty().enrich_calls([call]) == (1, 1)
    assert (call.node, call.src.name, call.dst.name) == ("node-1", IP["checkout"], IP["checkout"])


def test_the_carrier_round_trips() -> None:
    assert split_node(loopback_node("node-1", "fd00::5")) == ("node-1", "fd00::5")
    assert split_node("node-1") == ("node-1", "")
    assert [is_loopback(ip) for ip in ("127.0.0.6", "::1", "10.0.0.1", "::", "1270::1")] == [
        True,
        True,
        False,
        False,
        False,
    ]


def test_the_splicer_marks_and_ties_without_falling_back_to_objects() -> None:
    calls = [
        _call("tls", IP["frontend"], IP["checkout"], shard=3, notes=["gap"]),
        _call("http", "127.0.0.1", "127.0.0.1", node=loopback_node("node-1", IP["checkout"])),
        _call("http", "127.0.0.1", "127.0.0.1", node=loopback_node("", IP["plain"])),
    ]
    calls[0].http2.stream_id = 1  # a field numbered above the notes: the note goes before it
    encoded = [call.SerializeToString() for call in calls]
    enriched, _, _, protocols, odd = _calljson.Splicer(IDENTITY.describe_address).enrich(encoded)
    assert odd == [] and protocols == {b"tls": 1, b"http": 2}
    IDENTITY.enrich_calls(calls)
    assert enriched == [call.SerializeToString() for call in calls]
    assert list(calls[0].notes) == ["gap", MESH_MTLS] and calls[2].node == "" and calls[2].src.pod == "plain"


ADDRESSES = [*IP.values(), "10.244.1.14", "10.96.0.20", "127.0.0.1", "127.0.0.6", "::1", "192.0.2.9", ""]
NODES = [
    "",
    "node-1",
    *(loopback_node("node-1", ip) for ip in (*IP.values(), "10.244.1.14", "192.0.2.9", "")),
    loopback_node("", IP["checkout"]),
    "node-1/10.244.1.11/x",
]


@st.composite
def calls(draw: st.DrawFn) -> ApiCall:
    call = ApiCall(
        protocol=draw(st.sampled_from(["tls", "http", "tl", ""])),
        node=draw(st.sampled_from(NODES)),
        shard=draw(st.integers(0, 3)),
    )
    for side in (call.src, call.dst):
        side.ip = draw(st.sampled_from(ADDRESSES))
        side.port = draw(st.sampled_from([0, 8080, 40_000]))
    if draw(st.booleans()):
        call.request.ts = draw(st.sampled_from([T0 - 1, T0, REUSED_AT - 1, REUSED_AT, LATER]))
    call.notes.extend(draw(st.lists(st.sampled_from(["gap", MESH_MTLS]), max_size=2)))
    if draw(st.booleans()):
        call.http2.stream_id = draw(st.integers(1, 9))
    return call


def _counts(enricher: Enricher) -> dict[str, dict[Any, float]]:
    names = ("trawl_enricher_calls_total", "trawl_enricher_unknown_peers_total")
    return {name: dict(enricher.metrics.counter(name, "").values) for name in names}


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(calls(), max_size=10), with_identity=st.booleans())
def test_enrich_encoded_is_enrich_calls_serialized_for_mesh_and_loopback_calls(
    batch: list[ApiCall], with_identity: bool
) -> None:
    identity = IDENTITY if with_identity else IdentityMap.empty()
    spliced, objects = _enricher(identity), _enricher(identity)
    encoded = [call.SerializeToString() for call in batch]
    objects.enrich_calls(batch)
    enriched = spliced.enrich_encoded(encoded)
    assert enriched == [call.SerializeToString() for call in batch]
    assert _counts(spliced) == _counts(objects)
    assert calls_to_json_lines(enriched) == calls_to_json_lines(batch)


def _damaged(encoded: bytes) -> st.SearchStrategy[bytes]:
    """`encoded` with up to three bytes changed, cut anywhere."""
    flips = st.lists(st.tuples(st.integers(0, max(len(encoded) - 1, 0)), st.integers(0, 255)), max_size=3)
    return st.tuples(flips, st.integers(0, len(encoded))).map(
        lambda change: bytes(dict(change[0]).get(index, value) for index, value in enumerate(encoded))[: change[1]]
    )


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_damaged_mesh_and_loopback_calls_are_spliced_as_a_parser_reads_them_or_left_alone(data: st.DataObject) -> None:
    encoded = data.draw(calls()).SerializeToString()
    damaged = data.draw(_damaged(encoded))
    enriched, _, _, _, odd = _calljson.Splicer(IDENTITY.describe_address).enrich([damaged])
    if odd:
        assert enriched == [damaged]
        return
    try:
        expected = ApiCall.FromString(damaged)
    except DecodeError:
        return  # not an ApiCall: nothing to compare with (the object path would fail on it)
    IDENTITY.enrich(expected)
    assert ApiCall.FromString(enriched[0]) == expected
