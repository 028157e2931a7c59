"""`trawl up --pcap FILE --kubeconfig FILE` as a user runs it, the kubeconfig pointing at the
stand-in kube-apiserver (tests/kube_apiserver.py): the enricher lists and watches it with the
real `kubernetes` client and the calls name workloads, not IPs, for the addresses it knows.
Also `trawl identity dump` from it, read back by `trawl analyze --identity`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from tests.kube_apiserver import KubeApiServer, pod

SAMPLE = FIXTURES / "sample.pcap"
LONG_AGO = "2020-01-01T00:00:00Z"
CLIENT_IP, SERVER_IP = "192.0.2.10", "198.51.100.20"


@pytest.fixture
def api() -> Iterator[KubeApiServer]:
    seed = [
        {"kind": "ReplicaSet", "metadata": {"name": "frontend-5c7d8", "namespace": "web",
         "ownerReferences": [{"kind": "Deployment", "name": "frontend", "controller": True}]}},
        pod("frontend-5c7d8-q2x7z", CLIENT_IP, namespace="web", owner=("ReplicaSet", "frontend-5c7d8"),
            created=LONG_AGO, labels={"app": "frontend"}),
        pod("catalog-0", SERVER_IP, namespace="web", owner=("StatefulSet", "catalog"), created=LONG_AGO,
            labels={"app": "catalog"}, env={"OTEL_SERVICE_NAME": "catalog-api"}, containers=("app", "istio-proxy")),
        {"kind": "Service", "metadata": {"name": "catalog", "namespace": "web", "creationTimestamp": LONG_AGO},
         "spec": {"clusterIP": "10.96.7.7", "selector": {"app": "catalog"}}},
    ]  # fmt: skip
    with KubeApiServer(seed) as server:
        yield server


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trawl", *args], capture_output=True, text=True, timeout=180)


def test_up_with_a_kubeconfig_shows_workloads(api: KubeApiServer, tmp_path: Path) -> None:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    result = run("up", "--pcap", str(SAMPLE), "--kubeconfig", str(kubeconfig), "--json",
                 "--state-dir", str(tmp_path / "state"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    calls = [json.loads(line) for line in result.stdout.splitlines()]
    known = [call for call in calls if call["src"]["ip"] == CLIENT_IP and call["dst"]["ip"] == SERVER_IP]
    assert len(known) >= 5, f"{len(calls)} calls, {len(known)} between the seeded pods"
    for call in known:
        assert (call["src"]["workload"], call["src"]["workload_kind"], call["src"]["name"]) == (
            "frontend", "Deployment", "frontend")  # fmt: skip
        dst = call["dst"]
        assert (dst["workload"], dst["workload_kind"], dst["name"], dst["service"], dst["mesh"]) == (
            "catalog", "StatefulSet", "catalog-api", "catalog", "istio")  # fmt: skip
    watched = {path.split("?")[0] for method, path in api.requests if method == "GET" and "watch=" in path}
    assert {"/api/v1/pods", "/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices"} <= watched


def test_identity_dump_reads_back_in_analyze(api: KubeApiServer, tmp_path: Path) -> None:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    snapshot = tmp_path / "snapshot.json"
    dumped = run("identity", "dump", "--kubeconfig", str(kubeconfig), "--cluster", "stand-in", "-o", str(snapshot))
    assert dumped.returncode == 0, dumped.stderr
    claims = json.loads(snapshot.read_text())["claims"]
    assert {(claim["ip"], claim.get("workload")) for claim in claims} >= {
        (CLIENT_IP, "frontend"),
        (SERVER_IP, "catalog"),
    }
    analyzed = run("analyze", str(SAMPLE), "--identity", str(snapshot), "--json")
    assert analyzed.returncode == 0, analyzed.stderr
    calls = [json.loads(line) for line in analyzed.stdout.splitlines()]
    known = [call for call in calls if call["src"]["ip"] == CLIENT_IP and call["dst"]["ip"] == SERVER_IP]
    assert known and all(
        call["dst"]["name"] == "catalog-api" and call["dst"]["cluster"] == "stand-in" for call in known
    )


def test_identity_dump_says_why_it_cannot_list(api: KubeApiServer, tmp_path: Path) -> None:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    api.deny("pods")
    dumped = run("identity", "dump", "--kubeconfig", str(kubeconfig), "--timeout-s", "3")
    assert dumped.returncode == 2
    assert "pods: forbidden" in dumped.stderr and "grant get, list and watch on pods" in dumped.stderr


def test_up_watches_the_kubeconfig_variable_like_kubectl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from trawl.up import UpOptions, suite_config

    monkeypatch.delenv("KUBECONFIG", raising=False)
    assert "kube_watch" not in suite_config(UpOptions(), "nats://127.0.0.1:4222").get("enricher", {})
    given = suite_config(UpOptions(kubeconfig=tmp_path / "kc"), "nats://127.0.0.1:4222")["enricher"]
    assert given == {"kube_watch": True, "kubeconfig": str((tmp_path / "kc").resolve())}
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "from-env"))
    assert suite_config(UpOptions(), "nats://127.0.0.1:4222")["enricher"] == {"kube_watch": True}
