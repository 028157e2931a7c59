"""The enricher's watch (trawl.enricher.k8s_watch) against the stand-in kube-apiserver
(tests/kube_apiserver.py) through the real `kubernetes` client and a kubeconfig file: pods
created, deleted and rescheduled on reused IPs, services and EndpointSlices changing, the watch
cut and resumed, 410 forcing a relist, and an API server that is down, garbled or denying."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.kube_apiserver import KubeApiServer, pod
from trawl.enricher.cluster import ClusterHistory
from trawl.enricher.identity import Identity
from trawl.enricher.k8s_watch import KubeWatcher, kube_api_client
from trawl.metrics import Registry

SECOND = 1_000_000_000


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / SECOND, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def service(name: str, ip: str, selector: dict[str, str]) -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"clusterIP": ip, "selector": selector},
    }


def endpoint_slice(name: str, service_name: str, pods: dict[str, str]) -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [ip], "targetRef": {"kind": "Pod", "name": pod_name, "namespace": "shop"}}
            for pod_name, ip in pods.items()
        ],
    }


SEED = [
    {
        "kind": "Node",
        "metadata": {"name": "node-a"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.10"}]},
    },
    {
        "kind": "ReplicaSet",
        "metadata": {
            "name": "cart-7f9c",
            "namespace": "shop",
            "ownerReferences": [{"kind": "Deployment", "name": "cart", "controller": True}],
        },
    },
    {
        "kind": "Job",
        "metadata": {
            "name": "report-29000000",
            "namespace": "shop",
            "ownerReferences": [{"kind": "CronJob", "name": "report", "controller": True}],
        },
    },
    pod("cart-7f9c-a", "10.8.0.11", namespace="shop", labels={"app": "cart"}, owner=("ReplicaSet", "cart-7f9c")),
    pod("report-29000000-x", "10.8.0.12", namespace="shop", owner=("Job", "report-29000000")),
    service("cart", "10.96.0.20", {"app": "cart"}),
]


@pytest.fixture
def api() -> Iterator[KubeApiServer]:
    with KubeApiServer(SEED) as server:
        yield server


@pytest.fixture
def watcher(api: KubeApiServer, tmp_path: Path) -> Iterator[KubeWatcher]:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    running = KubeWatcher(
        ClusterHistory(cluster="stand-in"), kube_api_client(kubeconfig), Registry(), backoff_max_s=0.5
    ).start()
    assert running.wait_synced(15)
    api.wait_for_watches(6)
    yield running
    running.stop()


def now_identity(watcher: KubeWatcher, ip: str) -> Identity | None:
    """Who holds `ip` at this moment (time 0 would mean the last known holder, ended or not)."""
    return watcher.history.identity.lookup(ip, time.time_ns())


def test_the_first_list_resolves_the_owner_chain_services_and_nodes(watcher: KubeWatcher) -> None:
    cart = now_identity(watcher, "10.8.0.11")
    assert cart is not None and (cart.workload, cart.workload_kind, cart.service, cart.cluster) == (
        "cart",
        "Deployment",
        "cart",
        "stand-in",
    )
    report = now_identity(watcher, "10.8.0.12")
    assert report is not None and (report.workload, report.workload_kind) == ("report", "CronJob")
    virtual = now_identity(watcher, "10.96.0.20")
    assert virtual is not None and (virtual.kind, virtual.workload) == ("service", "cart")
    node = now_identity(watcher, "192.168.50.10")
    assert node is not None and node.node == "node-a"
    assert "current" in watcher.status_line()


def test_pods_deleted_and_rescheduled_on_a_reused_ip(api: KubeApiServer, watcher: KubeWatcher) -> None:
    identity = watcher.history.identity
    first = pod("web-0", "10.8.0.40", namespace="shop", owner=("StatefulSet", "web"))
    api.create(first)
    wait_for(lambda: now_identity(watcher, "10.8.0.40") is not None, "web-0")
    during_first = time.time_ns()
    time.sleep(0.01)
    api.delete("Pod", "shop", "web-0")
    wait_for(lambda: now_identity(watcher, "10.8.0.40") is None, "web-0 deleted")
    between = time.time_ns()
    time.sleep(1.1)  # creationTimestamp counts whole seconds: the next pod's starts after `between`
    api.create(pod("db-0", "10.8.0.40", namespace="shop", owner=("StatefulSet", "db"), created=iso(time.time_ns())))
    wait_for(lambda: now_identity(watcher, "10.8.0.40") is not None, "db-0 on the reused IP")
    assert identity.lookup("10.8.0.40", during_first).workload == "web"  # type: ignore[union-attr]
    assert identity.lookup("10.8.0.40", time.time_ns()).workload == "db"  # type: ignore[union-attr]
    assert identity.lookup("10.8.0.40", between) is None
    api.create(pod("web-0", "10.8.0.41", namespace="shop", owner=("StatefulSet", "web")))  # rescheduled, new IP
    wait_for(lambda: now_identity(watcher, "10.8.0.41") is not None, "web-0 again")
    assert identity.lookup("10.8.0.41", time.time_ns()).pod == "web-0"  # type: ignore[union-attr]


def test_services_and_endpoint_slices_changing(api: KubeApiServer, watcher: KubeWatcher) -> None:
    api.create(endpoint_slice("pay-1", "pay", {"pay-0": "10.8.0.50"}))
    wait_for(lambda: now_identity(watcher, "10.8.0.50") is not None, "the sliced pod")
    assert (now_identity(watcher, "10.8.0.50").pod, now_identity(watcher, "10.8.0.50").service) == (  # type: ignore[union-attr]
        "pay-0",
        "pay",
    )
    api.modify(service("cart", "10.96.0.21", {"app": "cart"}))  # the ClusterIP changed
    wait_for(lambda: now_identity(watcher, "10.96.0.21") is not None, "the new ClusterIP")
    assert now_identity(watcher, "10.96.0.20") is None
    api.delete("EndpointSlice", "shop", "pay-1")
    wait_for(lambda: now_identity(watcher, "10.8.0.50") is None, "the slice gone")


def test_a_cut_watch_resumes_and_410_forces_a_relist(api: KubeApiServer, watcher: KubeWatcher) -> None:
    lists_before = sum(1 for method, path in api.requests if method == "GET" and "watch" not in path)
    assert api.break_watches() == 6
    api.create(pod("after-cut", "10.8.0.60", namespace="shop"))
    wait_for(lambda: now_identity(watcher, "10.8.0.60") is not None, "an event after the cut")
    lists_after_cut = sum(1 for method, path in api.requests if method == "GET" and "watch" not in path)
    assert lists_after_cut == lists_before  # resumed from its resourceVersion, no relist
    api.wait_for_watches(6)
    api.compact()
    api.delete("Pod", "shop", "after-cut")  # while the watches are told to go away
    api.expire_watches()
    wait_for(lambda: watcher.states["Pod"].relists >= 1, "a relist of pods")
    wait_for(lambda: now_identity(watcher, "10.8.0.60") is None, "the deletion seen through the relist")


def test_denied_garbled_and_down_keep_what_is_known(api: KubeApiServer, watcher: KubeWatcher) -> None:
    registry_up = watcher._up
    api.deny("pods")
    api.break_watches()
    wait_for(lambda: watcher.states["Pod"].failing == "forbidden", "the 403 noticed")
    assert "grant get, list and watch on pods" in watcher.status_line()
    assert registry_up.get(resource="pods") == 0
    assert now_identity(watcher, "10.8.0.11") is not None  # still enriching from what is known
    api.deny("pods", False)
    api.garbage("services")
    api.break_watches()
    wait_for(lambda: watcher.states["Service"].failing == "garbage", "the garbage noticed")
    wait_for(lambda: not watcher.states["Pod"].failing, "pods recovered")
    assert registry_up.get(resource="pods") == 1
    api.garbage("services", False)
    api.stop()
    wait_for(lambda: watcher.states["Node"].failing == "unreachable", "the API server gone")
    assert now_identity(watcher, "192.168.50.10") is not None
    api.start()  # back on the same port
    wait_for(lambda: not watcher.degraded, "every resource recovered")
    errors = watcher._errors
    assert errors.get(resource="pods", reason="forbidden") >= 1
    assert errors.get(resource="nodes", reason="unreachable") >= 1


def test_a_slow_api_server_is_named_slow_and_caught_up_with(api: KubeApiServer, tmp_path: Path) -> None:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    api.delay(1.0)
    slow = KubeWatcher(
        ClusterHistory(), kube_api_client(kubeconfig), Registry(), request_timeout_s=0.3, backoff_max_s=0.5
    ).start()
    try:
        wait_for(lambda: slow.states["Pod"].failing == "slow", "the timeout noticed")
        assert "did not answer in 0.3 s" in slow.status_line()
        assert not slow.synced
        api.delay(0)
        assert slow.wait_synced(15)
        wait_for(lambda: not slow.degraded, "every resource current")
        assert now_identity(slow, "10.8.0.11") is not None
    finally:
        slow.stop()


def test_an_error_event_is_reported_with_its_status_and_the_watch_resumes(
    api: KubeApiServer, watcher: KubeWatcher
) -> None:
    assert api.fail_watches(500, "InternalError", "etcdserver: request timed out") == 6
    wait_for(lambda: watcher.states["Pod"].failing == "http 500", "the ERROR event noticed")
    assert "etcdserver: request timed out" in watcher.status_line()
    api.create(pod("after-error", "10.8.0.70", namespace="shop"))
    wait_for(lambda: now_identity(watcher, "10.8.0.70") is not None, "the watch resumed")
    wait_for(lambda: not watcher.degraded, "every resource current")
