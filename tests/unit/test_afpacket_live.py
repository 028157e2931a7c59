"""Live capture pieces: block batching, the bounded shard queue, capabilities, and (as root)
real rings on loopback with fanout, filters swapped at run time and kernel counters."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from tests.conftest import needs_binary, needs_root
from trawl.collector.afpacket import FanoutSet, PacketRing, RingGeometry
from trawl.collector.batching import FramedBatch
from trawl.collector.bpf_filter import compile_filter, reject_all
from trawl.collector.capabilities import (
    CAP_NET_RAW,
    CAP_SYS_ADMIN,
    check_capabilities,
    effective_capabilities,
    missing_capabilities,
    required_capabilities,
)
from trawl.collector.capture_settings import LiveCaptureSettings, RingSettings
from trawl.collector.live import (
    BlockBatcher,
    LiveCapture,
    ShardQueue,
    ShardState,
    keep_batch_buffers_in_heap,
    own_bus_exclusion,
)
from trawl.collector.scope import Scope
from trawl.errors import ConfigError
from trawl.metrics import Registry
from trawl.pcap import LINKTYPE_ETHERNET, iter_records, pack_record
from trawl.v1.packets_pb2 import PacketBatch

SMALL_RING = RingGeometry(block_size=1 << 16, block_count=4, frame_size=2048, retire_timeout_ms=10)


def records(count: int, size: int = 50) -> bytes:
    return b"".join(pack_record(1_000 + i, bytes(size)) for i in range(count))


def batcher(state: ShardState, **limits: float) -> BlockBatcher:
    return BlockBatcher(
        node="n1",
        state=state,
        interface="eth0",
        source="iface:eth0",
        link_type=LINKTYPE_ETHERNET,
        snaplen=65535,
        max_bytes=int(limits.get("max_bytes", 1000)),
        max_packets=int(limits.get("max_packets", 100)),
        max_age_s=limits.get("max_age_s", 0.1),
    )


def test_blocks_join_until_a_limit_and_never_split() -> None:
    state = ShardState(shard=3)
    b = batcher(state, max_bytes=1000)
    assert b.add(records(5), 5, now=0.0) == []  # 330 bytes
    assert b.add(records(5), 5, now=0.01) == []  # 660
    assert b.add(records(5), 5, now=0.02) == []  # 990: still under the limit
    (closed,) = b.add(records(5), 5, now=0.03)  # 1320 would not fit: the 15 go out, these 5 wait
    assert closed.packet_count == 15
    assert b.pending_packets == 5
    assert (closed.shard, closed.sequence, closed.nanosecond) == (3, 1, True)
    assert len(list(iter_records(closed.records, nanosecond=True))) == closed.packet_count


def test_a_block_that_would_overflow_closes_the_batch_first() -> None:
    state = ShardState(shard=0)
    b = batcher(state, max_bytes=700)
    b.add(records(6), 6, now=0.0)  # 396 bytes
    (closed,) = b.add(records(6), 6, now=0.0)  # 792 > 700: the first batch closes, the block starts the next
    assert closed.packet_count == 6
    assert b.pending_packets == 6
    assert b.cut().sequence == 2


def test_age_and_packet_limits() -> None:
    state = ShardState(shard=0)
    b = batcher(state, max_packets=10, max_age_s=0.5)
    b.add(records(3), 3, now=10.0)
    assert not b.due(10.4)
    assert b.due(10.5)
    (closed,) = b.add(records(7), 7, now=10.6)
    assert closed.packet_count == 10


def test_batches_carry_kernel_counters_and_the_shard_sequence_shared_by_capture_points() -> None:
    state = ShardState(shard=1)
    state.kernel.packets, state.kernel.drops = 42, 2
    host, loopback = batcher(state), batcher(state)
    first = host.add(records(1), 1, 0.0) or [host.cut()]
    second = loopback.add(records(1), 1, 0.0) or [loopback.cut()]
    assert (first[0].sequence, second[0].sequence) == (1, 2)
    assert (first[0].kernel.packets, first[0].kernel.drops) == (42, 2)


def test_full_queue_drops_the_newcomer_and_counts_it() -> None:
    state = ShardState(shard=0)
    queue = ShardQueue(state, max_batches=2)
    batches = [FramedBatch(PacketBatch(sequence=i, packet_count=10), [b""]) for i in range(1, 5)]
    assert [queue.put(b) for b in batches] == [True, True, False, False]
    assert (state.dropped_batches, state.dropped_packets) == (2, 20)
    taken = [queue.take(), queue.take(), queue.take()]
    assert [b.sequence if b else None for b in taken] == [1, 2, None]


def test_capabilities_from_proc_status(tmp_path: Path) -> None:
    status = "Name:\tpython\nCapEff:\t0000000000002000\n"
    assert effective_capabilities(status) == 1 << CAP_NET_RAW
    needed = required_capabilities(pod_loopback=True)
    assert missing_capabilities(1 << CAP_NET_RAW, needed) == ["CAP_SYS_ADMIN (enter pod network namespaces (setns))"]
    path = tmp_path / "status"
    path.write_text("CapEff:\t0000000000000000\n")
    with pytest.raises(ConfigError, match=r"missing capabilities: CAP_NET_RAW \(open AF_PACKET sockets\)"):
        check_capabilities(needed, path)
    path.write_text(f"CapEff:\t{(1 << CAP_NET_RAW) | (1 << CAP_SYS_ADMIN):016x}\n")
    check_capabilities(needed, path)


def test_block_size_must_fit_one_nats_message() -> None:
    settings = LiveCaptureSettings(interfaces=["lo"], ring=RingSettings(block_size=1 << 20), batch_max_bytes=2 << 20)

    async def publish(batch: FramedBatch) -> None:
        raise AssertionError("nothing is published")

    with pytest.raises(ConfigError, match="does not fit one NATS message"):
        LiveCapture(settings, "n1", Registry(), publish, lambda: True, max_payload=1 << 20)


def test_settings_reject_a_block_bigger_than_a_batch() -> None:
    with pytest.raises(ValueError, match=r"block_size .* must not exceed batch_max_bytes"):
        LiveCaptureSettings(interfaces=["lo"], ring=RingSettings(block_size=1 << 20), batch_max_bytes=1 << 19)


def ping(count: int, target: str = "127.0.0.1") -> None:
    subprocess.run(["ping", "-c", str(count), "-i", "0.002", "-W", "1", target], capture_output=True, check=False)


async def wait_drained(ring: PacketRing, expected: int, timeout_s: float = 3.0) -> bytes:
    chunks = []
    got = 0
    deadline = asyncio.get_running_loop().time() + timeout_s
    while got < expected and asyncio.get_running_loop().time() < deadline:
        drained = ring.drain()
        chunks.append(drained.records)
        got += drained.packets
        await asyncio.sleep(0.02)
    return b"".join(chunks)


@needs_root()
@needs_binary("ping")
async def test_ring_on_loopback_counts_and_filters() -> None:
    ring = PacketRing("lo", SMALL_RING, cooked=True)
    try:
        ring.set_filter(compile_filter("icmp and host 127.0.0.1", cooked=True, loopback_ifindex=1))
        ring.bind()
        ping(5)
        data = await wait_drained(ring, 10)
        packets = list(iter_records(data, nanosecond=True))
        assert len(packets) == 10  # 5 requests + 5 replies, each once (the sent copy on lo is dropped)
        assert all(p.data[20] >> 4 == 4 for p in packets)  # IPv4 right after the SLL2 header
        assert ring.read_statistics().packets == 10
        ring.set_filter(reject_all())
        ping(3)
        assert not (await wait_drained(ring, 1, timeout_s=0.3))
    finally:
        ring.close()


@needs_root()
@needs_binary("ping")
async def test_fanout_keeps_a_flow_on_one_shard() -> None:
    fanout = FanoutSet.open(
        "lo", 3, SMALL_RING, cooked=False, program=compile_filter("icmp", cooked=False, loopback_ifindex=1)
    )
    try:
        assert fanout.group_id is not None
        ping(6)
        await asyncio.sleep(0.2)
        counts = [ring.drain().packets for ring in fanout.rings]
        assert sorted(counts) == [0, 0, 12]
        assert all(ring.link_type == LINKTYPE_ETHERNET for ring in fanout.rings)
    finally:
        fanout.close()


@needs_root()
@needs_binary("ping")
async def test_live_capture_publishes_and_applies_a_new_scope_filter() -> None:
    published: list[PacketBatch] = []

    async def publish(batch: FramedBatch) -> None:
        published.append(PacketBatch.FromString(batch.encode()))

    settings = LiveCaptureSettings(
        interfaces=["lo"],
        shards=2,
        ring=RingSettings(block_size=1 << 16, block_count=4, retire_timeout_ms=10),
        filter="icmp",
    )
    metrics = Registry()
    capture = LiveCapture(settings, "n1", metrics, publish, lambda: True)
    capture.open()
    stopping = asyncio.Event()
    task = asyncio.create_task(capture.run(stopping))
    try:
        await asyncio.to_thread(ping, 4)
        await asyncio.sleep(0.3)
        with pytest.raises(ConfigError, match="bad filter"):
            capture.apply_scope(Scope(filter="icmp and"))
        assert capture.scope.filter == "icmp"  # the previous filter stays in force
        capture.apply_scope(Scope(filter="udp"))
        await asyncio.to_thread(ping, 4)
        await asyncio.sleep(0.3)
    finally:
        stopping.set()
        await task
        capture.close()
    assert sum(b.packet_count for b in published) == 8
    assert {b.link_type for b in published} == {LINKTYPE_ETHERNET}
    assert metrics.counter("trawl_collector_kernel_drops_total", "").total() == 0
    assert metrics.counter("trawl_collector_captured_packets_total", "").total() == 8


def test_batch_buffers_are_served_from_the_heap_on_glibc() -> None:
    """Debian (the supported platform) has glibc, whose mallopt takes all three settings."""
    assert keep_batch_buffers_in_heap()


def test_own_bus_traffic_is_excluded_from_every_filter() -> None:
    expression = own_bus_exclusion(["nats://127.0.0.1:4222", "tls://localhost:7422", "nats.invalid:5222"])
    assert expression.startswith("not (")
    assert "(tcp port 4222 and (host 127.0.0.1))" in expression
    assert "tcp port 7422 and (host 127.0.0.1" in expression
    assert "(tcp port 5222)" in expression  # unresolvable: the port on every host
    compile_filter(expression, cooked=False)  # libpcap accepts it
    settings = LiveCaptureSettings(interfaces=["lo"], filter="tcp")
    capture = LiveCapture(
        settings, "n1", Registry(), publish_nothing, lambda: True, bus_servers=["nats://127.0.0.1:4222"]
    )
    assert capture.exclude_bus == "not ((tcp port 4222 and (host 127.0.0.1)))"


async def publish_nothing(batch: FramedBatch) -> None:
    raise AssertionError("nothing is published in this test")


class ScriptedSink:
    """A BatchSink whose immediate hand-over is scripted: True (taken), False (busy) or an error."""

    def __init__(self, answers: list[bool | Exception]) -> None:
        self.answers = answers
        self.taken: list[int] = []
        self.published: list[int] = []

    async def start(self) -> None:
        return None

    def is_connected(self) -> bool:
        return True

    def try_publish(self, batch: FramedBatch) -> bool:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if answer:
            self.taken.append(batch.sequence)
        return answer

    async def publish(self, batch: FramedBatch) -> None:
        self.published.append(batch.sequence)

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_a_batch_the_sink_takes_at_once_skips_the_queue_and_order_is_kept() -> None:
    sink = ScriptedSink([True, False, ConnectionError("lost"), True])
    metrics = Registry()
    settings = LiveCaptureSettings(interfaces=["lo"])
    capture = LiveCapture(settings, "n1", metrics, sink.publish, sink.is_connected, sink=sink)
    state = capture.states[0]
    batches = [FramedBatch(PacketBatch(shard=0, sequence=i, packet_count=10), [b"r"]) for i in range(1, 6)]
    capture.enqueue(batches[0])  # taken at once
    capture.enqueue(batches[1])  # the sink is busy: queued
    capture.enqueue(batches[2])  # behind a queued batch: queued without asking the sink
    assert (sink.taken, len(capture.queues[0])) == ([1], 2)
    await capture.publish_queued()
    assert sink.published == [2, 3]
    capture.enqueue(batches[3])  # lost while sending: counted
    assert (state.dropped_batches, state.dropped_packets) == (1, 10)
    assert metrics.counter("trawl_collector_dropped_batches_total", "").total() == 1
    capture.enqueue(batches[4])
    assert sink.taken == [1, 5]
    assert batches[4].header.dropped_batches == 1  # the next batch tells the receiver
    assert metrics.counter("trawl_collector_published_batches_total", "").total() == 4
