"""Dissector replicas sharing the collector's shards over a real nats-server: one owner per
shard, a fair split, every call out exactly once, failover when a replica dies, a share for a
replica that joins, and the shards handed over when a replica stops."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import dpkt

from tests.conftest import FIXTURES
from tests.unit.dissector_builders import batch, read_capture
from trawl.bus import STREAM_CALLS, Bus, control_subject, packets_subject
from trawl.config import NatsSettings
from trawl.dissector.config import DissectorSettings
from trawl.dissector.main import serve
from trawl.dissector.shards import ShardManager
from trawl.service import ServiceContext
from trawl.v1.calls_pb2 import CallBatch

CAPTURE = FIXTURES / "http1.pcap"
SHARDS = 4
TTL_S = 1.5
SERVER_PORT = 8080
COLLECTOR_NODE = "node-a"
CALLS_PER_COPY = 6  # the capture holds six HTTP calls on two connections


@dataclass
class Replica:
    ctx: ServiceContext[DissectorSettings]
    task: asyncio.Task[None]

    @property
    def id(self) -> str:
        return self.ctx.settings.replica_id

    def owned(self) -> float:
        return self.ctx.metrics.gauge("trawl_dissector_shards_owned", "").get()

    def calls(self) -> float:
        return self.ctx.metrics.counter("trawl_dissector_calls_total", "").total()

    async def crash(self) -> None:
        """Die without a word: no release, no drain."""
        self.task.cancel()
        done, _ = await asyncio.wait({self.task}, timeout=10)
        assert done, "the replica did not end when cancelled"
        assert self.task.cancelled()
        await self.ctx.bus.nc.close()

    async def stop(self) -> None:
        self.ctx.stopping.set()
        await asyncio.wait_for(self.task, 15)
        await self.ctx.bus.close()


@dataclass
class Cluster:
    url: str
    client: Bus
    replicas: dict[str, Replica] = field(default_factory=dict)
    sequences: Counter[int] = field(default_factory=Counter)
    calls: Counter[tuple[int, int, str, str]] = field(default_factory=Counter)
    round_ports: dict[int, set[int]] = field(default_factory=dict)
    call_batch_sequences: dict[tuple[str, int], int] = field(default_factory=dict)
    ttl_s: float = TTL_S

    async def start(self, replica_id: str) -> Replica:
        settings = DissectorSettings.load(
            None,
            node=f"dissector-{replica_id}",
            nats=NatsSettings(servers=[self.url]),
            replica_id=replica_id,
            shards=SHARDS,
            shard_lease_ttl_s=self.ttl_s,
            batch_age_ms=50,
        )
        assert settings.shard_assignment == "lease"
        bus = await Bus.connect(settings.nats, f"dissector-{replica_id}")
        ctx = ServiceContext(name="dissector", settings=settings, bus=bus)
        ready = asyncio.Event()

        async def on_ready(msg: object) -> None:
            ready.set()

        subscription = await self.client.subscribe(control_subject("ready", "dissector", settings.node), on_ready)
        await self.client.nc.flush()
        task = asyncio.create_task(serve(ctx))
        await asyncio.wait_for(ready.wait(), 10)
        await subscription.unsubscribe()
        replica = self.replicas[replica_id] = Replica(ctx, task)
        return replica

    async def owners(self) -> dict[int, str]:
        kv = await self.client.js.key_value("TRAWL_DISSECTOR_SHARDS")
        owners: dict[int, str] = {}
        for shard in range(SHARDS):
            try:
                entry = await kv.get(f"dissector.shard.{shard}")
            except Exception:  # not there (expired, deleted)
                continue
            owners[shard] = (entry.value or b"").decode()
        return owners

    async def settled(self, live: list[str], timeout_s: float) -> dict[int, str]:
        """Wait until every shard is owned by one of `live`, split fairly, each replica agreeing."""
        deadline = time.monotonic() + timeout_s
        while True:
            owners = await self.owners()
            counts = [sum(1 for owner in owners.values() if owner == replica) for replica in live]
            agreed = all(self.replicas[replica].owned() == count for replica, count in zip(live, counts, strict=True))
            complete = sorted(owners) == list(range(SHARDS)) and set(owners.values()) <= set(live)
            if complete and max(counts) - min(counts) <= 1 and agreed:
                return owners
            if time.monotonic() > deadline:
                raise AssertionError(f"not settled after {timeout_s}s: owners {owners}, replicas {live}")
            await asyncio.sleep(0.05)

    async def send_traffic(
        self, round_: int, link_type: int, frames: list[tuple[int, bytes]], skip_sequence: bool = False
    ) -> None:
        """A copy of the capture on every shard, each on its own client ports (one batch per
        shard, its sequence one more than the last, or two more with `skip_sequence`)."""
        for shard in range(SHARDS):
            offset = 1000 * (round_ * SHARDS + shard + 1)
            copy = [(ts + round_ * 1_000_000_000, shift_client_port(frame, offset)) for ts, frame in frames]
            self.round_ports.setdefault(round_, set()).update(client_ports(copy))
            self.sequences[shard] += 2 if skip_sequence else 1
            packet_batch = batch(copy, link_type, node=COLLECTOR_NODE, shard=shard, sequence=self.sequences[shard])
            await self.client.publish(packets_subject(COLLECTOR_NODE, shard), packet_batch.SerializeToString())
        await self.client.nc.flush()

    async def collect(self, expected: int, timeout_s: float = 10) -> None:
        subscription = self.subscription
        deadline = time.monotonic() + timeout_s
        while sum(self.calls.values()) < expected:
            msg = await subscription.next_msg(timeout=max(0.1, deadline - time.monotonic()))
            call_batch = CallBatch.FromString(msg.data)
            # Across handovers too, a (node, shard)'s CallBatch sequence only grows: no id is reused.
            key = (call_batch.node, call_batch.shard)
            assert call_batch.sequence > self.call_batch_sequences.get(key, 0)
            self.call_batch_sequences[key] = call_batch.sequence
            for call in call_batch.calls:
                if call.protocol == "http":
                    self.calls[(call.shard, call.src.port, call.method, call.path)] += 1

    async def open_calls(self) -> None:
        self.subscription = await self.client.js.subscribe(
            "trawl.v1.calls.>", stream=STREAM_CALLS, ordered_consumer=True
        )

    def round_calls(self, round_: int) -> Counter[tuple[int, int, str, str]]:
        ports = self.round_ports[round_]
        return Counter({key: count for key, count in self.calls.items() if key[1] in ports})


def shift_client_port(frame: bytes, offset: int) -> bytes:
    """The same frame on another client port (a distinct flow, the same HTTP)."""
    ethernet = dpkt.ethernet.Ethernet(frame)
    ip = ethernet.data
    tcp = ip.data
    if tcp.sport == SERVER_PORT:
        tcp.dport += offset
    else:
        tcp.sport += offset
    tcp.sum = 0
    ip.sum = 0
    return bytes(ethernet)


def client_ports(frames: list[tuple[int, bytes]]) -> set[int]:
    ports = set()
    for _, frame in frames:
        tcp = dpkt.ethernet.Ethernet(frame).data.data
        ports.add(tcp.dport if tcp.sport == SERVER_PORT else tcp.sport)
    return ports


def per_shard_exactly_once(calls: Counter[tuple[int, int, str, str]]) -> None:
    assert set(calls.values()) == {1}, f"calls seen more than once: {[k for k, v in calls.items() if v > 1]}"
    per_shard = Counter(shard for shard, _, _, _ in calls)
    assert per_shard == dict.fromkeys(range(SHARDS), CALLS_PER_COPY)


async def test_replicas_share_shards_take_over_and_rebalance(nats_url: str) -> None:
    link_type, frames = read_capture(Path(CAPTURE))
    client = await Bus.connect(NatsSettings(servers=[nats_url]), "test-client")
    await client.ensure_stream(STREAM_CALLS, DissectorSettings.load(None).streams)
    cluster = Cluster(nats_url, client)
    await cluster.open_calls()
    try:
        # Two replicas: two shards each, every call out exactly once, by the owner of its shard.
        first = await cluster.start("r1")
        second = await cluster.start("r2")
        owners = await cluster.settled(["r1", "r2"], timeout_s=4 * TTL_S)
        await cluster.send_traffic(0, link_type, frames)
        await cluster.collect(SHARDS * CALLS_PER_COPY)
        per_shard_exactly_once(cluster.round_calls(0))
        for replica in (first, second):
            owned = sum(1 for owner in owners.values() if owner == replica.id)
            assert owned == 2
            assert replica.calls() >= owned * CALLS_PER_COPY

        # A third replica joins and takes a fair share (2/1/1) from the others.
        third = await cluster.start("r3")
        owners = await cluster.settled(["r1", "r2", "r3"], timeout_s=4 * TTL_S)
        assert sorted(Counter(owners.values()).values()) == [1, 1, 2]
        assert third.ctx.metrics.counter("trawl_dissector_shard_handovers_total", "").total() >= 1
        released = sum(
            replica.ctx.metrics.counter("trawl_dissector_shard_releases_total", "").get(
                shard=str(shard), reason="rebalance"
            )
            for replica in (first, second)
            for shard in range(SHARDS)
        )
        assert released >= 1
        await cluster.send_traffic(1, link_type, frames)
        await cluster.collect(2 * SHARDS * CALLS_PER_COPY)
        per_shard_exactly_once(cluster.round_calls(1))

        # The replica with two shards dies: its shards move to the others within about two TTLs.
        (victim_id,) = [replica for replica, count in Counter(owners.values()).items() if count == 2]
        survivors = sorted(set(cluster.replicas) - {victim_id})
        died = time.monotonic()
        await cluster.replicas[victim_id].crash()
        # The leases expire one TTL after their last renewal; a survivor's next round (TTL/3)
        # claims them: about 1.3 TTL here (2.0 s), checked against 2 TTLs plus slack for a busy machine.
        owners = await cluster.settled(survivors, timeout_s=2 * TTL_S + 1)
        assert time.monotonic() - died < 2 * TTL_S + 1
        assert set(owners.values()) == set(survivors)
        await cluster.send_traffic(2, link_type, frames)
        await cluster.collect(3 * SHARDS * CALLS_PER_COPY)
        per_shard_exactly_once(cluster.round_calls(2))
        assert sum(cluster.calls.values()) == 3 * SHARDS * CALLS_PER_COPY
        for survivor in survivors:
            await cluster.replicas.pop(survivor).stop()
    finally:
        for replica in cluster.replicas.values():
            replica.task.cancel()
            await asyncio.wait({replica.task}, timeout=10)
            await replica.ctx.bus.nc.close()
        await client.close()


async def test_a_stopping_replica_hands_its_shards_over_at_once_and_the_gap_is_counted(nats_url: str) -> None:
    link_type, frames = read_capture(Path(CAPTURE))
    client = await Bus.connect(NatsSettings(servers=[nats_url]), "test-client")
    await client.ensure_stream(STREAM_CALLS, DissectorSettings.load(None).streams)
    # A long TTL (a round every 2 s): a handover that waited for a round would show.
    cluster = Cluster(nats_url, client, ttl_s=6.0)
    await cluster.open_calls()
    try:
        # r1 alone takes every shard, then gives two to r2, which leaves again.
        staying = await cluster.start("r1")
        await cluster.settled(["r1"], timeout_s=1)
        await cluster.send_traffic(0, link_type, frames)
        await cluster.collect(SHARDS * CALLS_PER_COPY)
        leaving = await cluster.start("r2")
        owners = await cluster.settled(["r1", "r2"], timeout_s=1)
        await cluster.send_traffic(1, link_type, frames)
        await cluster.collect(2 * SHARDS * CALLS_PER_COPY)
        per_shard_exactly_once(cluster.round_calls(1))
        cluster.replicas.pop("r2")
        stopped = time.monotonic()
        await leaving.stop()
        # Released, not expired: the watch on the bucket wakes r1 at once, not at its next round.
        await cluster.settled(["r1"], timeout_s=1)
        assert time.monotonic() - stopped < 0.5
        assert leaving.ctx.metrics.counter("trawl_dissector_shard_releases_total", "").total() == 2
        # The batch after the handover is one sequence too far on every shard: r1 counts the one
        # lost on the shards it took over from where r2 stopped, and on its own from its own.
        await cluster.send_traffic(2, link_type, frames, skip_sequence=True)
        await cluster.collect(3 * SHARDS * CALLS_PER_COPY)
        per_shard_exactly_once(cluster.round_calls(2))
        gaps = staying.ctx.metrics.counter("trawl_bus_gaps_total", "")
        assert {shard: gaps.get(node=COLLECTOR_NODE, shard=str(shard)) for shard in range(SHARDS)} == dict.fromkeys(
            range(SHARDS), 1
        )
        assert set(owners.values()) == {"r1", "r2"}
    finally:
        for replica in cluster.replicas.values():
            replica.ctx.stopping.set()
            await asyncio.wait_for(replica.task, 15)
            await replica.ctx.bus.close()
        await client.close()


async def test_a_replica_with_a_longer_ttl_renews_at_the_pace_of_the_existing_bucket(nats_url: str) -> None:
    bus = await Bus.connect(NatsSettings(servers=[nats_url]), "test-client")
    taken: list[int] = []

    async def on_acquire(shard: int, sequences: dict[str, int]) -> None:
        taken.append(shard)

    async def on_release(shard: int, reason: str) -> dict[str, int]:
        return {}

    try:
        first = ShardManager(bus.js, "a", 2, 1.5, on_acquire, on_release)
        await first.start()
        later = ShardManager(bus.js, "b", 2, 6.0, on_acquire, on_release)
        await later.start()
        assert (first.ttl_s, later.ttl_s, later.interval_s) == (1.5, 1.5, 0.5)
        assert taken == [0, 1]  # a took both before b came; b waits for a's release
    finally:
        await bus.close()
