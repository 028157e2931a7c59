"""A pod's loopback tied to the pod, end to end (root): two network namespaces standing in for
pods, each with a server and a client on its own 127.0.0.1 (the app and a sidecar), captured
by the collector entering each namespace (real AF_PACKET on each `lo`) with
`pod_loopback_as_pod`, dissected and enriched by the services over a real NATS server.
Every call must come out named as the pod whose loopback carried it, with the collector's node,
though both pods' flows have the same addresses and port."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from tests.conftest import needs_root
from tests.live.netlab import NetLab
from tests.live.test_live_capture import REQUESTS, Pipeline, assert_no_loss, connect, live_settings
from trawl.collector.capture_settings import LiveCaptureSettings
from trawl.collector.config import CollectorSettings
from trawl.collector.live import open_live, run_live
from trawl.collector.loopback import loopback_node
from trawl.collector.pods import pod_address
from trawl.config import NatsSettings
from trawl.dissector import main as dissector_main
from trawl.dissector.config import DissectorSettings
from trawl.embedded import EmbeddedNats
from trawl.enricher import main as enricher_main
from trawl.enricher.config import EnricherSettings
from trawl.service import ServiceContext
from trawl.v1.calls_pb2 import ApiCall

pytestmark = [needs_root(), pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(state_dir=tmp_path_factory.mktemp("nats-loopback")) as server:
        yield server


@pytest.fixture
def lab() -> Iterator[NetLab]:
    with NetLab(subnet="10.213.9") as network:
        yield network


@contextlib.asynccontextmanager
async def pipeline(url: str, node: str, live: LiveCaptureSettings, snapshot: Path) -> AsyncIterator[Pipeline]:
    """Collector -> dissector -> enricher as test_live_capture's, the enricher reading every
    call subject: a pod loopback's calls travel on trawl.v1.calls.<node>_<address>.<shard>."""
    nats_settings = NatsSettings(servers=[url])
    collector = ServiceContext(
        "collector", CollectorSettings(node=node, nats=nats_settings), await connect(url, f"{node}-collector")
    )
    dissector = ServiceContext(
        "dissector",
        DissectorSettings(
            node=node,
            nats=nats_settings,
            shard_assignment="all",
            subject=f"trawl.v1.packets.{node}.>",
            queue_group=f"d-{node}",
            batch_age_ms=50,
        ),
        await connect(url, f"{node}-dissector"),
    )
    enricher = ServiceContext(
        "enricher",
        EnricherSettings(
            node=node, nats=nats_settings, identity_snapshot=snapshot, durable=f"e-{node}", fetch_timeout_s=0.2
        ),
        await connect(url, f"{node}-enricher"),
    )
    watcher = await connect(url, f"{node}-watcher")
    capture = open_live(collector, live)
    result = Pipeline(capture, collector)

    async def on_enriched(msg: Msg) -> None:
        result.calls.append(ApiCall.FromString(msg.data))

    await watcher.subscribe("trawl.v1.enriched.>", on_enriched)
    result.tasks = [
        asyncio.create_task(dissector_main.serve(dissector)),
        asyncio.create_task(enricher_main.serve(enricher)),
        asyncio.create_task(run_live(collector, capture)),
    ]
    result.contexts = [dissector, enricher, collector]
    try:
        await asyncio.sleep(0.5)  # consumers bound, sockets open
        yield result
    finally:
        for ctx in reversed(result.contexts):
            ctx.stopping.set()
        await asyncio.wait_for(asyncio.gather(*result.tasks, return_exceptions=True), 30)
        for ctx in result.contexts:
            await ctx.bus.nc.close()
        await watcher.nc.close()


async def test_each_pods_loopback_calls_are_named_as_that_pod(lab: NetLab, nats: EmbeddedNats, tmp_path: Path) -> None:
    pods = [lab.add_pod("checkout", "shop", 2), lab.add_pod("payments", "bank", 3)]
    for pod in pods:
        await asyncio.to_thread(lab.http_server, pod, 8081, "127.0.0.1")
    snapshot = lab.snapshot(tmp_path / "pods.json")
    node = f"n{lab.tag}p"
    live = live_settings(pod_loopback=[pod.netns for pod in pods], pod_loopback_as_pod=True)
    async with pipeline(nats.url, node, live, snapshot) as run:
        assert {batcher.node for point in run.capture.points for batcher in point.batchers} == {
            loopback_node(node, pod.ip) for pod in pods
        }
        for pod in pods:
            assert await asyncio.to_thread(lab.http_requests, pod, "127.0.0.1", REQUESTS, 8081) == REQUESTS
        calls = await run.wait_calls(2 * REQUESTS)
    assert len(calls) == 2 * REQUESTS
    assert {call.node for call in calls} == {node}
    assert {(call.src.ip, call.dst.ip, call.dst.port) for call in calls} == {("127.0.0.1", "127.0.0.1", 8081)}
    named = sorted((call.src.pod, call.src.namespace, call.dst.pod, call.dst.namespace) for call in calls)
    expected = [(pod.name, pod.namespace, pod.name, pod.namespace) for pod in pods for _ in range(REQUESTS)]
    assert named == sorted(expected)
    # Each loopback is a sequence of its own: nothing counted lost between them.
    assert_no_loss(run.capture)
    assert all(state.sequence == 0 for state in run.capture.states[: live.shards])  # no host point


async def test_the_pods_own_address_is_read_inside_its_namespace(lab: NetLab) -> None:
    pod = lab.add_pod("web", "shop", 4)
    assert await asyncio.to_thread(pod_address, Path("/run/netns") / pod.netns) == pod.ip
    await asyncio.to_thread(lab.exec, pod.netns, "ip", "addr", "add", "fd00:213::4/64", "dev", "eth0", "nodad")
    assert await asyncio.to_thread(pod_address, Path("/run/netns") / pod.netns) == pod.ip  # IPv4 first
    await asyncio.to_thread(lab.exec, pod.netns, "ip", "addr", "del", f"{pod.ip}/24", "dev", "eth0")
    assert await asyncio.to_thread(pod_address, Path("/run/netns") / pod.netns) == "fd00:213::4"
    await asyncio.to_thread(lab.exec, pod.netns, "ip", "addr", "del", "fd00:213::4/64", "dev", "eth0")
    assert await asyncio.to_thread(pod_address, Path("/run/netns") / pod.netns) == ""  # only lo's and link-local
