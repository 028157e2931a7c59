"""The collector's file replay over a real NATS server: whole batches of the file's records,
in sequence, then an end_of_input marker; a damaged file still sends what came before."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.conftest import FIXTURES
from trawl.bus import Bus
from trawl.collector.config import CollectorSettings
from trawl.collector.main import replay
from trawl.collector.replay import CaptureFile
from trawl.config import NatsSettings
from trawl.errors import InputError
from trawl.pcap import iter_records
from trawl.service import ServiceContext
from trawl.v1.packets_pb2 import PacketBatch

HTTP1 = FIXTURES / "http1.pcap"


async def replayed(nats_url: str, path: Path, **settings: object) -> tuple[list[PacketBatch], int | InputError]:
    collector = CollectorSettings.load(None, node="replay-node", nats=NatsSettings(servers=[nats_url]), **settings)
    bus = await Bus.connect(collector.nats, "collector-test")
    received: list[PacketBatch] = []
    done = asyncio.Event()

    async def on_batch(msg: object) -> None:
        batch = PacketBatch.FromString(msg.data)  # type: ignore[attr-defined]
        received.append(batch)
        if batch.end_of_input:
            done.set()

    await bus.subscribe("trawl.v1.packets.replay-node.>", on_batch)
    ctx = ServiceContext(name="collector", settings=collector, bus=bus)
    try:
        outcome: int | InputError = await replay(ctx, path)
    except InputError as exc:
        outcome = exc
    await asyncio.wait_for(done.wait(), 10)
    await bus.close()
    return received, outcome


async def test_replay_publishes_every_record_in_sequenced_batches(nats_url: str) -> None:
    batches, sent = await replayed(nats_url, HTTP1, batch_max_packets=7)
    packets = list(CaptureFile(HTTP1).packets())
    assert sent == len(packets)
    assert [b.sequence for b in batches] == list(range(1, len(batches) + 1))
    assert [b.end_of_input for b in batches] == [False] * (len(batches) - 1) + [True]
    assert batches[-1].packet_count == 0 and all(0 < b.packet_count <= 7 for b in batches[:-1])
    records = [r for b in batches for r in iter_records(b.records, b.nanosecond)]
    assert [(r.ts_ns, r.data) for r in records] == [(p.ts_ns, p.data) for p in packets]
    assert {(b.node, b.shard, b.link_type, b.source) for b in batches} == {("replay-node", 0, 1, f"file:{HTTP1}")}


async def test_paced_replay_keeps_the_capture_timing(nats_url: str) -> None:
    packets = list(CaptureFile(HTTP1).packets())
    span_s = (packets[-1].ts_ns - packets[0].ts_ns) / 1e9
    speed = span_s / 0.5  # the whole capture in half a second
    started = asyncio.get_running_loop().time()
    batches, sent = await replayed(nats_url, HTTP1, batch_max_packets=10, replay_speed=speed)
    assert sent == len(packets)
    assert asyncio.get_running_loop().time() - started >= 0.45
    assert sum(b.packet_count for b in batches) == len(packets)


async def test_a_truncated_file_sends_what_came_before_then_the_end(nats_url: str, tmp_path: Path) -> None:
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(HTTP1.read_bytes()[:-10])
    batches, outcome = await replayed(nats_url, cut, batch_max_packets=4)
    assert isinstance(outcome, InputError) and "byte offset" in str(outcome)
    assert sum(b.packet_count for b in batches) == len(list(CaptureFile(HTTP1).packets())) - 1
    assert batches[-1].end_of_input
