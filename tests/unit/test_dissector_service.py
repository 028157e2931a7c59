"""The dissector service over a real nats-server: PacketBatches in, CallBatches on JetStream out,
bus gaps counted, end of input carried through and announced."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from tests.unit.dissector_builders import batch, read_capture
from trawl.bus import STREAM_CALLS, Bus, calls_subject, control_subject, packets_subject
from trawl.config import NatsSettings
from trawl.dissector.config import DissectorSettings
from trawl.dissector.main import serve
from trawl.service import ServiceContext
from trawl.v1.calls_pb2 import CallBatch
from trawl.v1.control_pb2 import Drained

CAPTURE = FIXTURES / "http1.pcap"


async def _run_service(nats_url: str, node: str, **overrides: object) -> tuple[ServiceContext[DissectorSettings], Bus]:
    settings = DissectorSettings.load(None, node="dissector-test", nats=NatsSettings(servers=[nats_url]), **overrides)
    bus = await Bus.connect(settings.nats, "dissector-test")
    return ServiceContext(name="dissector", settings=settings, bus=bus), bus


async def _start(ctx: ServiceContext[DissectorSettings], client: Bus) -> asyncio.Task[None]:
    """Run serve() and return once it announced itself ready."""
    ready = asyncio.Event()

    async def on_ready(msg: object) -> None:
        ready.set()

    await client.subscribe(control_subject("ready", "dissector", ctx.settings.node), on_ready)
    task = asyncio.create_task(serve(ctx))
    await asyncio.wait_for(ready.wait(), 10)
    return task


async def test_packet_batches_become_call_batches(nats_url: str) -> None:
    node = f"node-{uuid.uuid4().hex[:8]}"
    ctx, bus = await _run_service(
        nats_url, node, calls_per_batch=4, shard_assignment="all", subject=f"trawl.v1.packets.{node}.>"
    )
    client = await Bus.connect(ctx.settings.nats, "test-client")
    drained: asyncio.Queue[Drained] = asyncio.Queue()

    async def on_drained(msg: object) -> None:
        message = Drained()
        message.ParseFromString(msg.data)  # type: ignore[attr-defined]
        await drained.put(message)

    await client.subscribe(control_subject("drained", "dissector", ctx.settings.node), on_drained)
    task = await _start(ctx, client)
    try:
        link_type, frames = read_capture(Path(CAPTURE))
        first = batch(frames, link_type, node=node, shard=3, sequence=1)
        # Sequence 2 never comes: the service must count it as lost.
        last = batch([], link_type, node=node, shard=3, sequence=3, end_of_input=True)
        for packet_batch in (first, last):
            await client.publish(packets_subject(node, 3), packet_batch.SerializeToString())
        announcement = await asyncio.wait_for(drained.get(), 20)
        assert announcement.emitted == 6

        subscription = await client.js.subscribe(calls_subject(node, 3), stream=STREAM_CALLS, ordered_consumer=True)
        batches: list[CallBatch] = []
        while not batches or not batches[-1].end_of_input:
            msg = await subscription.next_msg(timeout=10)
            call_batch = CallBatch()
            call_batch.ParseFromString(msg.data)
            batches.append(call_batch)
            assert msg.headers is not None
            assert msg.headers["Nats-Msg-Id"] == f"{node}/3/{call_batch.sequence}"
        calls = [call for call_batch in batches for call in call_batch.calls]
        start = batches[0].sequence
        assert [call_batch.sequence for call_batch in batches] == list(range(start, start + len(batches)))
        assert start > 1_600_000_000_000_000  # starts at the service's start time (microseconds)
        assert all(len(call_batch.calls) <= 4 for call_batch in batches)
        assert [(call.method, call.status) for call in calls] == [
            ("GET", "200"),
            ("POST", "201"),
            ("GET", "404"),
            ("GET", "500"),
            ("GET", "200"),
            ("GET", "200"),
        ]
        assert all(call.node == node and call.shard == 3 for call in calls)
        assert batches[-1].lost_packet_batches == 1
        assert "token=[REDACTED]" in calls[-1].path
        assert ctx.metrics.counter("trawl_bus_gaps_total", "").get(node=node, shard="3") == 1
        # Counted by protocol from the dissector's own counters (the calls stay serialized).
        assert ctx.metrics.counter("trawl_dissector_calls_total", "").get(protocol="http") == 6
        assert sorted(len(call_batch.calls) for call_batch in batches) == [0, 2, 4]
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
        await bus.close()
        await client.close()


async def test_calls_are_published_by_age_and_timeouts_run_while_idle(nats_url: str) -> None:
    from tests.unit.dissector_builders import Conversation

    node = f"node-{uuid.uuid4().hex[:8]}"
    ctx, bus = await _run_service(
        nats_url,
        node,
        shard_assignment="all",
        subject=f"trawl.v1.packets.{node}.>",
        batch_age_ms=50,
        expire_interval_s=0.05,
        request_timeout_s=0.2,
    )
    client = await Bus.connect(ctx.settings.nats, "test-client")
    task = await _start(ctx, client)
    try:
        conversation = Conversation().handshake().client_sends(b"GET /never-answered HTTP/1.1\r\n\r\n")
        await client.publish(packets_subject(node, 0), batch(conversation.frames, node=node).SerializeToString())
        subscription = await client.js.subscribe(calls_subject(node, 0), stream=STREAM_CALLS, ordered_consumer=True)
        msg = await subscription.next_msg(timeout=10)
        call_batch = CallBatch()
        call_batch.ParseFromString(msg.data)
        (call,) = call_batch.calls
        assert call.path == "/never-answered" and "timeout" in call.notes
        assert not call_batch.end_of_input
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
        await bus.close()
        await client.close()


def test_shard_assignment_is_lease_unless_set_to_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """A subject alone does not switch a replica to "all": replicas that leased shards and also
    took a whole subject would split flows between them."""
    subject = "trawl.v1.packets.node-a.>"
    assert DissectorSettings.load(None, node="n", subject=subject).shard_assignment == "lease"
    monkeypatch.setenv("TRAWL_DISSECTOR_SUBJECT", subject)
    assert DissectorSettings.load(None, node="n").shard_assignment == "lease"
    monkeypatch.setenv("TRAWL_DISSECTOR_SHARD_ASSIGNMENT", "all")
    settings = DissectorSettings.load(None, node="n")
    assert (settings.shard_assignment, settings.subject) == ("all", subject)
