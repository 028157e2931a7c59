"""The stand-in kube-apiserver (tests/kube_apiserver.py) as the real `kubernetes` client sees it:
lists, watches with bookmarks, 410 Gone, a cut connection, optimistic concurrency, 403."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tests.kube_apiserver import KubeApiServer, pod


@pytest.fixture
def api() -> Iterator[KubeApiServer]:
    with KubeApiServer([pod("a", "10.0.0.1")]) as server:
        yield server


@pytest.fixture
def core(api: KubeApiServer, tmp_path: Path) -> client.CoreV1Api:
    return client.CoreV1Api(config.new_client_from_config(str(api.write_kubeconfig(tmp_path / "kubeconfig"))))


def test_list_carries_the_resource_version_and_the_objects(api: KubeApiServer, core: client.CoreV1Api) -> None:
    listed = core.list_pod_for_all_namespaces()
    assert listed.metadata.resource_version == str(api.resource_version)
    assert [(item.metadata.name, item.status.pod_ip) for item in listed.items] == [("a", "10.0.0.1")]
    assert core.list_namespaced_pod("other").items == []


def test_watch_streams_changes_and_bookmarks_then_410(api: KubeApiServer, core: client.CoreV1Api) -> None:
    start = core.list_pod_for_all_namespaces().metadata.resource_version

    def cluster_life() -> None:
        api.wait_for_watches(1)
        api.create(pod("b", "10.0.0.2"))
        api.modify(pod("b", "10.0.0.3"))
        api.delete("Pod", "default", "b")
        api.bookmark()

    driver = threading.Thread(target=cluster_life)
    driver.start()
    seen = []
    stream = watch.Watch().stream(
        core.list_pod_for_all_namespaces, resource_version=start, allow_watch_bookmarks=True, timeout_seconds=10
    )
    for event in stream:
        if event["type"] == "BOOKMARK":
            seen.append(("BOOKMARK", event["raw_object"]["metadata"]["resourceVersion"]))
            break
        seen.append((event["type"], event["object"].status.pod_ip))
    driver.join()
    assert seen == [
        ("ADDED", "10.0.0.2"),
        ("MODIFIED", "10.0.0.3"),
        ("DELETED", "10.0.0.3"),
        ("BOOKMARK", str(api.resource_version)),
    ]
    api.compact()
    with pytest.raises(ApiException) as gone:
        for _ in watch.Watch().stream(core.list_pod_for_all_namespaces, resource_version=start, timeout_seconds=5):
            pass
    assert gone.value.status == 410
    with pytest.raises(ApiException) as exact:
        core.list_pod_for_all_namespaces(resource_version=start, resource_version_match="Exact")
    assert exact.value.status == 410


def test_a_cut_watch_ends_the_clients_stream(api: KubeApiServer, core: client.CoreV1Api) -> None:
    start = core.list_pod_for_all_namespaces().metadata.resource_version
    breaker = threading.Thread(target=lambda: (api.wait_for_watches(1), api.break_watches()))
    breaker.start()
    response = core.list_pod_for_all_namespaces(
        watch=True, resource_version=start, timeout_seconds=10, _preload_content=False
    )
    with pytest.raises(Exception):  # noqa: B017 - urllib3's protocol error, whichever it names
        for _ in response.stream():
            pass
    breaker.join()
    assert api.wait_for_no_watch() == 0


def test_leases_replace_with_optimistic_concurrency(api: KubeApiServer, tmp_path: Path) -> None:
    leases = client.CoordinationV1Api(config.new_client_from_config(str(api.write_kubeconfig(tmp_path / "kc"))))
    body = {"metadata": {"name": "enricher"}, "spec": {"holderIdentity": "one", "leaseDurationSeconds": 15}}
    created = leases.create_namespaced_lease("trawl", body)
    with pytest.raises(ApiException) as exists:
        leases.create_namespaced_lease("trawl", body)
    assert exists.value.status == 409
    created.spec.holder_identity = "two"
    replaced = leases.replace_namespaced_lease("enricher", "trawl", created)
    assert replaced.spec.holder_identity == "two"
    created.spec.holder_identity = "three"  # still the first resourceVersion: someone else won
    with pytest.raises(ApiException) as conflict:
        leases.replace_namespaced_lease("enricher", "trawl", created)
    assert conflict.value.status == 409
    assert leases.read_namespaced_lease("enricher", "trawl").spec.holder_identity == "two"


def test_denied_and_garbage_answers(api: KubeApiServer, core: client.CoreV1Api) -> None:
    api.deny("nodes")
    with pytest.raises(ApiException) as denied:
        core.list_node()
    assert denied.value.status == 403
    assert 'cannot list resource "nodes"' in json.loads(denied.value.body)["message"]
    api.garbage("pods")
    response = core.list_pod_for_all_namespaces(_preload_content=False)
    assert not response.data.startswith(b"{")
