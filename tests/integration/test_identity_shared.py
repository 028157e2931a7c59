"""Identity shared through Redis (trawl.enricher.shared) between two enricher replicas, with a
real redis-server and the stand-in kube-apiserver (tests/kube_apiserver.py, its Leases
included): one replica is elected through the Lease, watches and publishes; the other reads;
the leader killed (its Lease left to expire), the other takes over; Redis away and back."""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import needs_binary
from tests.fixtures.tcpdump_capture import free_port
from tests.kube_apiserver import KubeApiServer, pod
from trawl.enricher.config import EnricherSettings
from trawl.enricher.identity import IdentityMap
from trawl.enricher.shared import SharedIdentity
from trawl.metrics import Registry

pytestmark = [needs_binary("redis-server")]


class RedisServer:
    """Debian's redis-server on a loopback port, no persistence; stop() and start() again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.folder = tempfile.mkdtemp(prefix="trawl-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", self.folder],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: redis.Redis(port=self.port, socket_connect_timeout=0.2).ping(), "redis-server", errors=True)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 20.0, errors: bool = False) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except Exception:
            if not errors:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def api() -> Iterator[KubeApiServer]:
    with KubeApiServer([pod("first", "10.20.0.1", namespace="shop", owner=("StatefulSet", "first"))]) as server:
        yield server


def replica(name: str, redis_server: RedisServer, kubeconfig: Path) -> SharedIdentity:
    settings = EnricherSettings(
        cluster="c1",
        kube_watch=True,
        kubeconfig=kubeconfig,
        kube_backoff_max_s=0.5,
        identity_redis_url=f"redis://127.0.0.1:{redis_server.port}/0",
        lease_namespace="trawl",
        lease_holder=name,
        lease_duration_s=2,
        lease_renew_s=0.2,
    )
    return SharedIdentity(settings, IdentityMap.empty("c1"), Registry()).start()


def holder(shared: SharedIdentity, ip: str) -> str:
    found = shared.identity.lookup(ip, time.time_ns())
    return found.workload if found is not None else ""


def test_two_replicas_agree_and_survive_the_leader_and_redis(
    api: KubeApiServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    one = replica("one", redis_server, kubeconfig)
    wait_for(lambda: one.election is not None and one.election.is_leader, "the first replica to lead")
    two = replica("two", redis_server, kubeconfig)
    try:
        wait_for(lambda: holder(two, "10.20.0.1") == "first", "the reader to see the leader's history")
        assert two.election is not None and not two.election.is_leader
        assert two.watcher is None  # one watch on the API server, not two
        watches = api.open_watches()

        api.create(pod("second", "10.20.0.2", namespace="shop", owner=("StatefulSet", "second")))
        wait_for(lambda: holder(two, "10.20.0.2") == "second", "a new pod through Redis")
        api.delete("Pod", "shop", "second")
        wait_for(lambda: holder(two, "10.20.0.2") == "", "its deletion through Redis")
        assert len(two.identity.claims_of("10.20.0.2")) == 1  # kept as history, ended

        # Redis away: the reader keeps its last view, says so, and catches up when Redis is back (empty).
        redis_server.stop()
        assert two.reader is not None
        wait_for(lambda: two.reader is not None and two.reader.state.failing, "the reader to notice")
        assert holder(two, "10.20.0.1") == "first"
        assert "failing" in two.status_line()
        api.create(pod("third", "10.20.0.3", namespace="shop", owner=("StatefulSet", "third")))
        wait_for(lambda: holder(one, "10.20.0.3") == "third", "the leader's own watch")
        redis_server.start()
        wait_for(lambda: holder(two, "10.20.0.3") == "third", "the reader to catch up after Redis came back")

        # The leader killed: its Lease expires, the other replica takes over, from the shared history.
        one.stop(release=False)
        wait_for(lambda: two.election is not None and two.election.is_leader, "the takeover", timeout_s=15)
        assert api.open_watches() >= watches  # the new leader watches
        api.create(pod("fourth", "10.20.0.4", namespace="shop", owner=("StatefulSet", "fourth")))
        wait_for(lambda: holder(two, "10.20.0.4") == "fourth", "the new leader's watch")
        assert holder(two, "10.20.0.1") == "first"
        lease = api.get("Lease", "trawl", "trawl-enricher")
        assert lease["spec"]["holderIdentity"] == "two" and lease["spec"]["leaseTransitions"] >= 1
        shared = redis.Redis(port=redis_server.port)
        wait_for(lambda: shared.hexists("trawl:identity:c1:claims", "10.20.0.4"), "the new leader to publish")
        assert shared.hexists("trawl:identity:c1:claims", "10.20.0.1")
    finally:
        one.stop()
        two.stop()


def test_churn_of_a_thousand_pods_across_two_replicas_with_the_leader_killed(
    api: KubeApiServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """1,000 pods created and deleted over 50 reused IPs (pod i holds 10.21.0.<i % 50> for
    [T + 10 i s, T + 10 i s + 9 s)), the leader killed half-way; then calls at the middle of
    every pod's life, enriched by the surviving replica and by a fresh one reading Redis,
    each name the pod that had the address then."""
    from trawl.enricher.logic import Enricher
    from trawl.v1.calls_pb2 import ApiCall

    start_ns = 1_700_000_000 * 1_000_000_000
    second = 1_000_000_000

    def window(index: int) -> tuple[str, int, int]:
        begin = start_ns + index * 10 * second
        return f"10.21.0.{index % 50}", begin, begin + 9 * second

    def live_and_die(indexes: range) -> None:
        for index in indexes:
            ip, begin, end = window(index)
            made = pod(f"churn-{index}", ip, namespace="churn", owner=("StatefulSet", f"set-{index % 7}"),
                       created=iso_ns(begin))  # fmt: skip
            api.create(made)
            made["metadata"]["deletionTimestamp"] = iso_ns(end)
            api.modify(made)
            api.delete("Pod", "churn", f"churn-{index}")

    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    one = replica("one", redis_server, kubeconfig)
    wait_for(lambda: one.election is not None and one.election.is_leader, "a leader")
    two = replica("two", redis_server, kubeconfig)
    three: SharedIdentity | None = None
    try:
        wait_for(lambda: two.reader is not None and two.reader.loads >= 1, "the reader's first read")
        wait_for(lambda: one.watcher is not None and one.watcher.synced, "the leader's first lists")
        live_and_die(range(500))
        wait_for(lambda: len(two.identity.claims_of("10.21.0.49")) == 10, "the first half through Redis")
        one.stop(release=False)  # killed: its Lease left to expire
        wait_for(lambda: two.watcher is not None and two.watcher.synced, "the takeover", timeout_s=15)
        live_and_die(range(500, 1000))
        wait_for(lambda: len(two.identity.claims_of("10.21.0.49")) == 20, "the second half")
        three = replica("three", redis_server, kubeconfig)
        wait_for(lambda: len(three.identity.claims_of("10.21.0.49")) == 20, "a fresh reader")
        calls = []
        for index in range(1000):
            ip, begin, _ = window(index)
            call = ApiCall(id=f"c{index}", protocol="http")
            call.src.ip, call.src.port = "192.0.2.1", 40000
            call.dst.ip, call.dst.port = ip, 8080
            call.request.ts = begin + 5 * second
            calls.append(call.SerializeToString())
        for survivor in (two, three):
            enriched = Enricher(EnricherSettings(), survivor.identity).enrich_encoded(calls)
            pods = [ApiCall.FromString(data).dst.pod for data in enriched]
            assert pods == [f"churn-{index}" for index in range(1000)]
    finally:
        for shared in (one, two, three):
            if shared is not None:
                shared.stop()


def iso_ns(ns: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ns / 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
