"""Identity shared through Redis (trawl.enricher.shared) between two enricher replicas, with a
real redis-server and the stand-in kube-apiserver (tests/kube_apiserver.py, its Leases
included): one replica is elected through the Lease, watches and publishes; the other reads;
the leader killed (its Lease left to expire), the other takes over; Redis away and back."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import needs_binary
from tests.kube_apiserver import KubeApiServer, pod
from trawl.enricher.config import EnricherSettings
from trawl.enricher.identity import IdentityMap
from trawl.enricher.shared import SharedIdentity
from trawl.metrics import Registry

pytestmark = [needs_binary("redis-server")]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


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
