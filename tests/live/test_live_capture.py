"""Live capture end to end (root): pods in network namespaces on a bridge, real HTTP traffic,
the collector on the host side, then the dissector and the enricher over a real NATS, all
running their service code in this process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg

from tests.conftest import needs_root
from tests.live.netlab import NetLab, Pod
from trawl.bus import Bus, control_subject
from trawl.collector.capture_settings import LiveCaptureSettings
from trawl.collector.config import CollectorSettings
from trawl.collector.live import LiveCapture, open_live, run_live
from trawl.config import NatsSettings
from trawl.dissector import main as dissector_main
from trawl.dissector.config import DissectorSettings
from trawl.embedded import EmbeddedNats, free_port
from trawl.enricher import main as enricher_main
from trawl.enricher.config import EnricherSettings
from trawl.service import ServiceContext
from trawl.v1 import control_pb2
from trawl.v1.calls_pb2 import ApiCall
from trawl.v1.packets_pb2 import PacketBatch

pytestmark = [needs_root(), pytest.mark.root, pytest.mark.timeout(120)]

REQUESTS = 12
RING = {"block_size": 1 << 16, "block_count": 16, "retire_timeout_ms": 20}


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """A server of this module's own, so durable consumers and streams start empty."""
    with EmbeddedNats(state_dir=tmp_path_factory.mktemp("nats-live")) as server:
        yield server


@pytest.fixture
def lab() -> Iterator[NetLab]:
    with NetLab() as network:
        yield network


@dataclass
class Pipeline:
    """Collector -> dissector -> enricher, plus a subscriber collecting the enriched calls."""

    capture: LiveCapture
    collector: ServiceContext[CollectorSettings]
    calls: list[ApiCall] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    contexts: list[ServiceContext[Any]] = field(default_factory=list)

    async def wait_calls(self, count: int, timeout_s: float = 20.0, settle_s: float = 1.0) -> list[ApiCall]:
        """Wait for `count` calls, then a little longer to catch any extra one."""
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: len(self.http_calls()) >= count, timeout_s)
        await asyncio.sleep(settle_s)
        return self.http_calls()

    def http_calls(self) -> list[ApiCall]:
        return [call for call in self.calls if call.protocol == "http"]


async def connect(url: str, name: str) -> Bus:
    return await Bus.connect(NatsSettings(servers=[url]), name)


@contextlib.asynccontextmanager
async def pipeline(url: str, node: str, live: LiveCaptureSettings, snapshot: Path) -> AsyncIterator[Pipeline]:
    nats_settings = NatsSettings(servers=[url])
    collector_settings = CollectorSettings(node=node, nats=nats_settings)
    collector = ServiceContext("collector", collector_settings, await connect(url, f"{node}-collector"))
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
            node=node,
            nats=nats_settings,
            identity_snapshot=snapshot,
            durable=f"e-{node}",
            calls_filter_subject=f"trawl.v1.calls.{node}.>",
            fetch_timeout_s=0.2,
        ),
        await connect(url, f"{node}-enricher"),
    )
    watcher = await connect(url, f"{node}-watcher")
    capture = open_live(collector, live)
    result = Pipeline(capture, collector)

    async def on_enriched(msg: Msg) -> None:
        call = ApiCall.FromString(msg.data)
        if call.node == node:
            result.calls.append(call)

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
        # The services have flushed what they publish; a drain of the enricher's pull subscription
        # would only wait out its timeout.
        for ctx in result.contexts:
            await ctx.bus.nc.close()
        await watcher.nc.close()


def live_settings(**values: object) -> LiveCaptureSettings:
    return LiveCaptureSettings.model_validate({"ring": RING, "batch_max_age_ms": 50, **values})


def assert_no_loss(capture: LiveCapture) -> None:
    totals = capture.kernel_totals()
    assert totals.drops == 0
    assert sum(state.dropped_batches for state in capture.states) == 0


async def requests(lab: NetLab, client: Pod, server: Pod, count: int = REQUESTS) -> None:
    assert await asyncio.to_thread(lab.http_requests, client, server.ip, count) == count


async def test_calls_through_a_host_side_veth_arrive_exactly_once(
    lab: NetLab, nats: EmbeddedNats, tmp_path: Path
) -> None:
    server = lab.add_pod("web", "shop", 2)
    client = lab.add_pod("cli", "tools", 3)
    await asyncio.to_thread(lab.http_server, server)
    snapshot = lab.snapshot(tmp_path / "pods.json")
    live = live_settings(interfaces=[server.host_if], shards=2, filter="tcp port 8080")
    async with pipeline(nats.url, f"n{lab.tag}a", live, snapshot) as run:
        await requests(lab, client, server)
        calls = await run.wait_calls(REQUESTS)
        assert len(calls) == REQUESTS
        assert sorted(call.path for call in calls) == sorted(f"/?n={i}" for i in range(REQUESTS))
        assert {(call.method, call.status) for call in calls} == {("GET", "200")}
        assert {call.dst.namespace for call in calls} == {"shop"}
        assert {call.src.namespace for call in calls} == {"tools"}
        await asyncio.sleep(0.2)
    assert_no_loss(run.capture)
    assert run.capture.kernel_totals().packets > REQUESTS * 6  # handshake, request, response, teardown


async def test_scope_selects_a_namespace_and_changes_at_run_time(
    lab: NetLab, nats: EmbeddedNats, tmp_path: Path
) -> None:
    shop = lab.add_pod("shop", "shop", 2)
    blog = lab.add_pod("blog", "blog", 3)
    client = lab.add_pod("cli", "tools", 4)
    await asyncio.to_thread(lab.http_server, shop)
    await asyncio.to_thread(lab.http_server, blog)
    snapshot = lab.snapshot(tmp_path / "pods.json")
    # On the client's veth: traffic to both servers passes there.
    live = live_settings(
        interfaces=[client.host_if], scope={"namespaces": ["shop"], "identity_snapshot": str(snapshot)}
    )
    node = f"n{lab.tag}b"
    async with pipeline(nats.url, node, live, snapshot) as run:
        await requests(lab, client, shop)
        await requests(lab, client, blog)
        calls = await run.wait_calls(REQUESTS)
        assert len(calls) == REQUESTS
        assert {call.dst.namespace for call in calls} == {"shop"}

        control = await connect(nats.url, f"{node}-control")
        try:
            bad = control_pb2.ScopeUpdate(namespaces=["blog"], filter="tcp port")
            reply = await control.nc.request(control_subject("scope"), bad.SerializeToString(), timeout=5)
            assert b"syntax error" in reply.data  # libpcap's message; the shop scope stays
            good = control_pb2.ScopeUpdate(namespaces=["blog"])
            reply = await control.nc.request(control_subject("scope"), good.SerializeToString(), timeout=5)
            assert reply.data == b"ok"
        finally:
            await control.close()
        await requests(lab, client, shop)
        await requests(lab, client, blog)
        calls = await run.wait_calls(2 * REQUESTS)
        assert len(calls) == 2 * REQUESTS
        assert [call.dst.namespace for call in calls[REQUESTS:]] == ["blog"] * REQUESTS
    assert_no_loss(run.capture)


async def test_pods_mode_picks_up_a_pod_created_while_running(lab: NetLab, nats: EmbeddedNats, tmp_path: Path) -> None:
    server = lab.add_pod("web", "shop", 2)
    await asyncio.to_thread(lab.http_server, server)
    # Only the pods created from now on match the pattern (the server's veth is named otherwise),
    # so each packet is seen once.
    pattern = f"{lab.host_prefix}new*"
    live = live_settings(interfaces=["pods"], pod_interface_patterns=[pattern], shards=2)
    snapshot = lab.snapshot(tmp_path / "pods.json")
    async with pipeline(nats.url, f"n{lab.tag}c", live, snapshot) as run:
        assert run.capture.pod_ifindexes == set()
        lab_client = await asyncio.to_thread(lab.add_pod, "cli", "tools", 3, f"{lab.host_prefix}new")
        await wait_until(lambda: bool(run.capture.pod_ifindexes))
        assert len(run.capture.pod_ifindexes) == 1
        await requests(lab, lab_client, server)
        calls = await run.wait_calls(REQUESTS)
        assert len(calls) == REQUESTS
    assert_no_loss(run.capture)


async def test_pod_loopback_is_captured_by_entering_the_namespace(
    lab: NetLab, nats: EmbeddedNats, tmp_path: Path
) -> None:
    pod = lab.add_pod("mesh", "shop", 2)
    await asyncio.to_thread(lab.http_server, pod, 8081, "127.0.0.1")
    live = live_settings(pod_loopback=[pod.netns])
    snapshot = lab.snapshot(tmp_path / "pods.json")
    async with pipeline(nats.url, f"n{lab.tag}d", live, snapshot) as run:
        assert await asyncio.to_thread(lab.http_requests, pod, "127.0.0.1", REQUESTS, 8081) == REQUESTS
        calls = await run.wait_calls(REQUESTS)
        assert len(calls) == REQUESTS
        assert {call.dst.ip for call in calls} == {"127.0.0.1"}
    assert_no_loss(run.capture)


async def test_nats_restart_loses_only_what_the_drop_counters_say(lab: NetLab, tmp_path: Path) -> None:
    server = lab.add_pod("web", "shop", 2)
    client = lab.add_pod("cli", "tools", 3)
    node = f"n{lab.tag}e"
    port = free_port()
    state = tmp_path / "nats"
    nats = EmbeddedNats(state_dir=state, port=port).start()
    reader: Bus | None = None
    try:
        reader = await connect(nats.url, f"{node}-reader")
        # A stream keeps every batch the server accepted, across the restart (file storage).
        await reader.js.add_stream(name=f"LIVE_{lab.tag}", subjects=[f"trawl.v1.packets.{node}.>"])
        live = live_settings(interfaces=[client.host_if], filter="icmp", queue_max_batches=3)
        collector = ServiceContext(
            "collector",
            CollectorSettings(node=node, nats=NatsSettings(servers=[nats.url])),
            await connect(nats.url, f"{node}-collector"),
        )
        capture = open_live(collector, live)
        task = asyncio.create_task(run_live(collector, capture))
        ping = ["ping", "-c", "40", "-i", "0.005", "-W", "1", server.ip]
        await asyncio.to_thread(lab.exec, client.netns, *ping)
        await asyncio.sleep(0.3)  # the last batch is cut (50 ms) and published
        await wait_stored(reader, f"LIVE_{lab.tag}", sum(state.sequence for state in capture.states))
        nats.stop()
        # The batches go through the collector's own publish connection (capture.connected).
        await wait_until(lambda: not collector.bus.nc.is_connected and not capture.connected())
        # While NATS is away: more batches than the queue holds (one per 50 ms over ~1.5 s).
        slow_ping = ["ping", "-c", "60", "-i", "0.025", "-W", "1", server.ip]
        await asyncio.to_thread(lab.exec, client.netns, *slow_ping)
        assert sum(state.dropped_batches for state in capture.states) > 0
        nats = EmbeddedNats(state_dir=state, port=port).start()
        await wait_until(lambda: collector.bus.nc.is_connected and capture.connected(), timeout_s=15)
        await asyncio.to_thread(lab.exec, client.netns, *ping)
        await asyncio.sleep(0.5)
        collector.stopping.set()
        await asyncio.wait_for(task, 20)
        await collector.bus.close()

        await wait_until(lambda: reader is not None and reader.nc.is_connected, timeout_s=15)
        received = await stream_batches(reader, f"LIVE_{lab.tag}", f"trawl.v1.packets.{node}.>")
        received_packets = sum(batch.packet_count for batch in received)
        kernel = capture.kernel_totals()
        dropped_packets = sum(state.dropped_packets for state in capture.states)
        dropped_batches = sum(state.dropped_batches for state in capture.states)
        assert kernel.drops == 0
        assert received_packets + dropped_packets == kernel.packets
        assert received_packets >= 80  # everything before the outage
        sequences = sorted(batch.sequence for batch in received)
        assert sequences[-1] - len(sequences) == dropped_batches  # the gaps are exactly the dropped batches
        assert max(batch.dropped_batches for batch in received) == dropped_batches
    finally:
        if reader is not None:
            await reader.close()
        nats.stop()


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def wait_stored(bus: Bus, stream: str, count: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (await bus.js.stream_info(stream)).state.messages < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"stream {stream} did not reach {count} messages")
        await asyncio.sleep(0.05)


async def stream_batches(bus: Bus, stream: str, subject: str) -> list[PacketBatch]:
    info = await bus.js.stream_info(stream)
    batches = []
    for sequence in range(info.state.first_seq, info.state.last_seq + 1):
        message = await bus.js.get_msg(stream, sequence)
        if (message.subject or "").startswith(subject[:-1]) and message.data is not None:
            batches.append(PacketBatch.FromString(message.data))
    return batches
