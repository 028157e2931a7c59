"""Live capture: rings -> per-shard batches -> bounded queues -> NATS.

Capture points:
- the host group: one fanout set of `shards` packet sockets, either on one Ethernet
  interface (LINKTYPE_ETHERNET records) or on the `any` device (LINKTYPE_LINUX_SLL2 records)
  narrowed by the kernel filter to the chosen interfaces: named ones, or the pod interfaces
  that the netlink watcher reports (the filter is re-attached as pods come and go, which needs
  no new socket and loses nothing on the interfaces already captured);
- one fanout set on `lo` inside each configured pod network namespace (SLL2 records); with
  `pod_loopback_as_pod`, its batches carry the node `<node>/<pod address>`
  (trawl.collector.loopback: the calls made of them are the pod's) in a sequence of their own
  per shard, with queues of their own.

Each shard's socket is drained a whole block at a time when the kernel hands one over; the
block's records go into that shard's `BlockBatcher` for the capture point, which cuts a
`PacketBatch` at a size, packet count or age. Batches wait in the shard's `ShardQueue`
(bounded: what does not fit is dropped and counted, never silently) until the publisher sends
them through the capture's `BatchSink` (sinks.py: a zero-copy publish connection of its
own, or nats-py where TLS is needed); while NATS is away (both reconnect by themselves)
nothing is published and the queue absorbs what it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from trawl.bus import control_subject
from trawl.collector.afpacket import FanoutSet, KernelCounters, PacketRing, has_ethernet_header
from trawl.collector.batching import FramedBatch
from trawl.collector.bpf_filter import FilterProgram, compile_filter, reject_all
from trawl.collector.capabilities import check_capabilities, required_capabilities
from trawl.collector.capture_settings import LiveCaptureSettings
from trawl.collector.loopback import loopback_node
from trawl.collector.pods import InterfaceEvent, PodInterfaceWatcher, netns_path, pod_address
from trawl.collector.scope import PodDirectory, Scope, plan
from trawl.collector.sinks import BatchSink, ClientSink, batch_sink
from trawl.errors import ConfigError
from trawl.logs import get_logger
from trawl.metrics import Registry
from trawl.service import ServiceContext
from trawl.v1 import control_pb2
from trawl.v1.packets_pb2 import KernelStats, PacketBatch

log = get_logger(__name__)

LOOPBACK_IFINDEX = 1  # lo is the first interface of every network namespace
PUBLISH_OVERHEAD = 4096  # room for the PacketBatch fields around the records within NATS max_payload


@dataclass
class ShardState:
    """What one shard shares across its capture points: the sequence and the loss counters."""

    shard: int
    sequence: int = 0
    dropped_batches: int = 0
    dropped_packets: int = 0
    packets_cut: int = 0  # packets in the batches cut so far (PacketBatch.packets_before of the next)
    kernel: KernelCounters = field(default_factory=KernelCounters)

    def next_sequence(self) -> int:
        self.sequence += 1
        return self.sequence


@dataclass
class BlockBatcher:
    """Collects drained ring blocks (already pcap records) into batches for one shard and one
    capture point; sans-IO, times come from the caller."""

    node: str
    state: ShardState
    interface: str
    source: str
    link_type: int
    snaplen: int
    max_bytes: int
    max_packets: int
    max_age_s: float
    _parts: list[bytes] = field(default_factory=list)
    _bytes: int = 0
    _packets: int = 0
    _opened: float = 0.0

    def add(self, records: bytes, packets: int, now: float) -> list[FramedBatch]:
        """Add one block's records; returns the batches this closed. A block never splits."""
        closed: list[FramedBatch] = []
        if not packets:
            return closed
        if self._parts and (self._bytes + len(records) > self.max_bytes or self._packets + packets > self.max_packets):
            closed.append(self.cut())
        if not self._parts:
            self._opened = now
        self._parts.append(records)
        self._bytes += len(records)
        self._packets += packets
        if self._bytes >= self.max_bytes or self._packets >= self.max_packets:
            closed.append(self.cut())
        return closed

    def due(self, now: float) -> bool:
        return bool(self._parts) and now - self._opened >= self.max_age_s

    @property
    def pending_packets(self) -> int:
        return self._packets

    def cut(self) -> FramedBatch:
        kernel = self.state.kernel
        header = PacketBatch(
            node=self.node,
            interface=self.interface,
            link_type=self.link_type,
            snaplen=self.snaplen,
            shard=self.state.shard,
            sequence=self.state.next_sequence(),
            kernel=KernelStats(packets=kernel.packets, drops=kernel.drops, freeze_count=kernel.freeze_count),
            packet_count=self._packets,
            nanosecond=True,
            source=self.source,
            dropped_batches=self.state.dropped_batches,
            packets_before=self.state.packets_cut,
        )
        self.state.packets_cut += self._packets
        batch = FramedBatch(header, self._parts)
        self._parts = []
        self._bytes = 0
        self._packets = 0
        return batch


class ShardQueue:
    """Batches of one shard waiting for the bus; bounded, and a full queue drops the newcomer."""

    def __init__(self, state: ShardState, max_batches: int) -> None:
        self.state = state
        self.max_batches = max_batches
        self._batches: deque[FramedBatch] = deque()

    def put(self, batch: FramedBatch) -> bool:
        if len(self._batches) >= self.max_batches:
            self.state.dropped_batches += 1
            self.state.dropped_packets += batch.packet_count
            return False
        self._batches.append(batch)
        return True

    def take(self) -> FramedBatch | None:
        return self._batches.popleft() if self._batches else None

    def __len__(self) -> int:
        return len(self._batches)


@dataclass
class CapturePoint:
    """One fanout set and its per-shard batchers."""

    name: str
    fanout: FanoutSet
    batchers: list[BlockBatcher]
    cooked: bool
    loopback_ifindex: int | None
    # Interface selection on the `any` device (None: every interface).
    ifindexes: set[int] | None = None
    # Whether the scope's address filter applies (not inside a pod's own loopback).
    scoped: bool = True
    # Where its batches of each shard wait (the host's shared queues, or a pod loopback's own).
    queues: list[ShardQueue] = field(default_factory=list)


class LiveCapture:
    """Owns the sockets, batchers and queues; `run()` captures until `stopping` is set."""

    def __init__(
        self,
        settings: LiveCaptureSettings,
        node: str,
        metrics: Registry,
        publish: Callable[[FramedBatch], Awaitable[None]],
        connected: Callable[[], bool],
        max_payload: int = 1 << 20,
        bus_servers: Sequence[str] = (),
        sink: BatchSink | None = None,
    ) -> None:
        if not settings.interfaces and not settings.pod_loopback:
            raise ConfigError("live capture needs interfaces (a name, 'any' or 'pods') or pod_loopback namespaces")
        self.settings = settings
        self.node = node
        self.publish = publish
        self.connected = connected
        # What `run_live` starts and closes around the capture (its publish/connected are the two
        # above); a batch it can take at once skips the queue and the publisher task.
        self.sink = sink
        self.try_publish = sink.try_publish if sink is not None else None
        # Never capture the collector's own publishing: on a shared interface (lo, any) every
        # batch sent would be captured again, and again, until the queues overflow.
        self.exclude_bus = own_bus_exclusion(bus_servers)
        self.max_batch_bytes = min(settings.batch_max_bytes, max_payload - PUBLISH_OVERHEAD)
        if settings.ring.block_size > self.max_batch_bytes:
            raise ConfigError(
                f"ring.block_size {settings.ring.block_size} does not fit one NATS message "
                f"(max_payload {max_payload}): lower it to at most {self.max_batch_bytes}"
            )
        self.states = [ShardState(shard) for shard in range(settings.shards)]
        self.queues = [ShardQueue(state, settings.queue_max_batches) for state in self.states]
        self.points: list[CapturePoint] = []
        self.scope = Scope(
            namespaces=tuple(settings.scope.namespaces),
            exclude_namespaces=tuple(settings.scope.exclude_namespaces),
            pod_regexes=tuple(settings.scope.pod_regexes),
            filter=settings.filter,
        )
        self.snapshot_path = settings.scope.identity_snapshot
        self.snapshot_mtime = 0.0
        self.directory = self._read_directory()
        self.watcher: PodInterfaceWatcher | None = None
        self.pod_ifindexes: set[int] = set()
        self.named_ifindexes: set[int] = set()
        self._wakeup = asyncio.Event()
        self._metrics(metrics)

    def _metrics(self, metrics: Registry) -> None:
        self.m_packets = metrics.counter("trawl_collector_captured_packets_total", "Packets taken from the rings")
        self.m_kernel_packets = metrics.counter(
            "trawl_collector_kernel_packets_total", "Packets the kernel passed the filter (PACKET_STATISTICS)"
        )
        self.m_kernel_drops = metrics.counter(
            "trawl_collector_kernel_drops_total", "Packets the kernel dropped because the ring was full"
        )
        self.m_kernel_freeze = metrics.counter(
            "trawl_collector_kernel_freeze_total", "Times the kernel froze a ring queue (PACKET_STATISTICS)"
        )
        self.m_dropped_batches = metrics.counter(
            "trawl_collector_dropped_batches_total", "Batches dropped because the per-shard queue was full"
        )
        self.m_dropped_packets = metrics.counter(
            "trawl_collector_dropped_packets_total", "Packets in batches dropped because the queue was full"
        )
        self.m_published = metrics.counter("trawl_collector_published_batches_total", "Batches published live")
        self.m_queue = metrics.gauge("trawl_collector_queue_batches", "Batches waiting for the bus")

    # -- opening ---------------------------------------------------------------------------------

    def _read_directory(self) -> PodDirectory:
        if self.snapshot_path is None:
            if self.scope.selects or self.scope.exclude_namespaces:
                raise ConfigError("a scope of namespaces or pods needs scope.identity_snapshot (the pods' IPs)")
            return PodDirectory(())
        directory = PodDirectory.from_snapshot(self.snapshot_path)
        with contextlib.suppress(OSError):
            self.snapshot_mtime = self.snapshot_path.stat().st_mtime
        return directory

    def open(self) -> None:
        """Open every socket with its filter attached before it receives anything."""
        try:
            if self.settings.interfaces:
                self._open_host_point(self.settings.interfaces)
            for namespace in self.settings.pod_loopback:
                path = netns_path(namespace)
                node = None
                if self.settings.pod_loopback_as_pod:
                    address = pod_address(path)
                    if not address:  # captured all the same, its calls named by their addresses only
                        log.warning("pod_loopback_without_address", netns=namespace)
                    node = loopback_node(self.node, address)
                self._open_point(
                    f"netns:{namespace}:lo",
                    "lo",
                    path,
                    cooked=True,
                    loopback=LOOPBACK_IFINDEX,
                    scoped=False,
                    node=node,
                )
        except BaseException:
            self.close()
            raise

    def _open_host_point(self, interfaces: list[str]) -> None:
        # One Ethernet interface: a raw socket on it. Anything else: the `any` device, narrowed by ifindex.
        if len(interfaces) == 1 and interfaces[0] not in ("any", "pods") and has_ethernet_header(interfaces[0]):
            name = interfaces[0]
            loopback = LOOPBACK_IFINDEX if _ifindex(name) == LOOPBACK_IFINDEX else None
            self._open_point(f"iface:{name}", name, None, cooked=False, loopback=loopback)
            return
        ifindexes: set[int] | None = None
        if "any" not in interfaces:
            self.named_ifindexes = {_ifindex(name) for name in interfaces if name != "pods"}
            ifindexes = set(self.named_ifindexes)
            if "pods" in interfaces:
                self.watcher = PodInterfaceWatcher(self.settings.pod_interface_patterns)
        label = "any" if ifindexes is None else ",".join(interfaces)
        self._open_point(f"iface:{label}", "any", None, cooked=True, loopback=LOOPBACK_IFINDEX, ifindexes=ifindexes)

    def _open_point(
        self,
        name: str,
        device: str,
        netns: Path | None,
        *,
        cooked: bool,
        loopback: int | None,
        ifindexes: set[int] | None = None,
        scoped: bool = True,
        node: str | None = None,
    ) -> None:
        """`node`: the node its batches carry, when not the collector's (a pod's loopback): a
        (node, shard) has one sequence, so such a point has states and queues of its own."""
        point_program = self._program(self.scope, self.directory, cooked, loopback, ifindexes, scoped)
        fanout = FanoutSet.open(
            device,
            self.settings.shards,
            self.settings.ring.geometry(),
            cooked=cooked,
            program=point_program,
            netns=netns,
        )
        link_type = fanout.rings[0].link_type
        queues = self.queues
        if node is not None:
            queues = [ShardQueue(ShardState(shard), self.settings.queue_max_batches) for shard in range(len(queues))]
            self.queues.extend(queues)
            self.states.extend(queue.state for queue in queues)
        batchers = [
            BlockBatcher(
                node=node if node is not None else self.node,
                state=queue.state,
                interface=name.split(":", 1)[1],
                source=name,
                link_type=link_type,
                snaplen=self.settings.snaplen,
                max_bytes=self.max_batch_bytes,
                max_packets=self.settings.batch_max_packets,
                max_age_s=self.settings.batch_max_age_ms / 1000,
            )
            for queue in queues
        ]
        self.points.append(CapturePoint(name, fanout, batchers, cooked, loopback, ifindexes, scoped, queues))
        log.info(
            "capture_opened", point=name, shards=len(fanout.rings), link_type=link_type, filter=point_program.expression
        )

    def _program(
        self,
        scope: Scope,
        directory: PodDirectory,
        cooked: bool,
        loopback: int | None,
        ifindexes: set[int] | None,
        scoped: bool,
    ) -> FilterProgram:
        parts: list[str] = []
        if ifindexes is not None:
            if not ifindexes:
                return reject_all("no interface selected yet")
            parts.append(" or ".join(f"ifindex {index}" for index in sorted(ifindexes)))
        if scoped:
            scope_plan = plan(scope, directory)
            if scope_plan.captures_nothing:
                return reject_all()
            if scope_plan.expression:
                parts.append(scope_plan.expression)
        elif scope.filter.strip():
            parts.append(scope.filter.strip())
        if self.exclude_bus:
            if scope.filter.strip():
                # A mistake in the user's expression is reported in their words, not in the
                # combined program's.
                compile_filter(scope.filter.strip(), cooked=cooked, snaplen=self.settings.snaplen)
            parts.append(self.exclude_bus)
        expression = parts[0] if len(parts) == 1 else " and ".join(f"({part})" for part in parts)
        return compile_filter(expression, cooked=cooked, snaplen=self.settings.snaplen, loopback_ifindex=loopback)

    # -- filters at run time ---------------------------------------------------------------------

    def apply_scope(self, scope: Scope, directory: PodDirectory | None = None) -> None:
        """Compile the new scope for every capture point, then attach all; on any compile error
        (ConfigError with libpcap's message) nothing changes."""
        directory = directory or self.directory
        programs = [
            self._program(scope, directory, point.cooked, point.loopback_ifindex, point.ifindexes, point.scoped)
            for point in self.points
        ]
        for point, program in zip(self.points, programs, strict=True):
            point.fanout.set_filter(program)
        self.scope = scope
        self.directory = directory
        log.info(
            "scope_applied",
            namespaces=list(scope.namespaces),
            exclude_namespaces=list(scope.exclude_namespaces),
            pod_regexes=list(scope.pod_regexes),
            filter=scope.filter,
        )

    def on_interface_event(self, event: InterfaceEvent) -> None:
        """A pod interface appeared or went: widen or narrow the host point's interface set."""
        if event.kind == "added":
            self.pod_ifindexes.add(event.ifindex)
        else:
            self.pod_ifindexes.discard(event.ifindex)
        for point in self.points:
            if point.ifindexes is None or point.name.startswith("netns:"):
                continue
            point.ifindexes = self.named_ifindexes | self.pod_ifindexes
            program = self._program(self.scope, self.directory, True, point.loopback_ifindex, point.ifindexes, True)
            point.fanout.set_filter(program)
        log.info("pod_interface", change=event.kind, interface=event.name, ifindex=event.ifindex)

    def reload_directory_if_changed(self) -> None:
        if self.snapshot_path is None:
            return
        try:
            mtime = self.snapshot_path.stat().st_mtime
        except OSError:
            return
        if mtime == self.snapshot_mtime:
            return
        try:
            directory = PodDirectory.from_snapshot(self.snapshot_path)
            self.snapshot_mtime = mtime
            self.apply_scope(self.scope, directory)
        except ConfigError as exc:
            log.error("identity_snapshot_reload_failed", error=str(exc))

    # -- the data path ---------------------------------------------------------------------------

    def drain_ring(self, point: CapturePoint, shard: int, now: float) -> int:
        """Take every ready block of one ring into its batcher; returns the packets taken."""
        ring: PacketRing = point.fanout.rings[shard]
        batcher = point.batchers[shard]
        taken = 0
        for _ in range(ring.geometry.block_count):
            drained = ring.drain(max_blocks=1)
            if not drained.blocks:
                break
            if not taken:
                # The batches cut below carry the kernel counters as of now.
                self.read_statistics(shard)
            taken += drained.packets
            for batch in batcher.add(drained.records, drained.packets, now):
                self.enqueue(batch, point.queues[shard])
        if taken:
            self.m_packets.inc(taken, shard=str(shard))
        return taken

    def enqueue(self, batch: FramedBatch, queue: ShardQueue | None = None) -> None:
        """Hand a cut batch on: straight to the sink when it can take it now, else to its queue
        (`queue`, by default the host's queue of its shard)."""
        shard = batch.shard
        queue = queue if queue is not None else self.queues[shard]
        if self.try_publish is not None and not len(queue):
            # Nothing of this shard waits: send now, from the capture callback. Saves a task
            # switch per batch, which at ~1,000 batches/s was a tenth of the collector's CPU.
            batch.header.dropped_batches = queue.state.dropped_batches
            try:
                if self.try_publish(batch):
                    self.m_published.inc(shard=str(shard))
                    return
            except Exception as exc:  # a lost publish is counted, the capture goes on
                self._count_lost(queue, batch, exc)
                return
        if not queue.put(batch):
            self.m_dropped_batches.inc(shard=str(shard))
            self.m_dropped_packets.inc(batch.packet_count, shard=str(shard))
        self._wakeup.set()

    def _count_lost(self, queue: ShardQueue, batch: FramedBatch, exc: Exception) -> None:
        queue.state.dropped_batches += 1
        queue.state.dropped_packets += batch.packet_count
        self.m_dropped_batches.inc(shard=str(queue.state.shard))
        self.m_dropped_packets.inc(batch.packet_count, shard=str(queue.state.shard))
        log.warning("publish_failed", shard=queue.state.shard, error=str(exc))

    def cut_due(self, now: float, force: bool = False) -> None:
        for point in self.points:
            for shard, batcher in enumerate(point.batchers):
                if batcher.pending_packets and (force or batcher.due(now)):
                    self.read_statistics(shard)
                    self.enqueue(batcher.cut(), point.queues[shard])

    def read_statistics(self, shard: int | None = None) -> None:
        """Fold PACKET_STATISTICS of every ring (or one shard's rings) into the totals of the
        states their batches carry, and of each shard for the metrics."""
        for index in range(self.settings.shards) if shard is None else (shard,):
            kernels: dict[int, tuple[ShardState, KernelCounters]] = {}
            total = KernelCounters()
            for point in self.points:
                ring = point.fanout.rings[index]
                ring.read_statistics()
                state = point.queues[index].state
                kernels.setdefault(id(state), (state, KernelCounters()))[1].add(ring.counters)
                total.add(ring.counters)
            for state, counters in kernels.values():
                state.kernel = counters
            label = str(index)
            self.m_kernel_packets.set(total.packets, shard=label)
            self.m_kernel_drops.set(total.drops, shard=label)
            self.m_kernel_freeze.set(total.freeze_count, shard=label)

    def kernel_totals(self) -> KernelCounters:
        total = KernelCounters()
        for state in self.states:
            total.add(state.kernel)
        return total

    async def publish_queued(self) -> None:
        """Publish what waits, shard by shard, while NATS is connected."""
        while True:
            progressed = False
            for queue in self.queues:
                if not self.connected():
                    return
                batch = queue.take()
                if batch is None:
                    continue
                progressed = True
                batch.header.dropped_batches = queue.state.dropped_batches
                try:
                    await self.publish(batch)
                except Exception as exc:  # a lost publish is counted, the capture goes on
                    self._count_lost(queue, batch, exc)
                    return
                self.m_published.inc(shard=str(queue.state.shard))
            if not progressed:
                return

    async def run(self, stopping: asyncio.Event) -> None:
        """Capture and publish until `stopping`; then cut and publish what is left (bounded wait)."""
        loop = asyncio.get_running_loop()
        for point in self.points:
            for shard, ring in enumerate(point.fanout.rings):
                loop.add_reader(ring.fileno(), self._on_readable, point, shard)
        watch = asyncio.create_task(self._watch_pods()) if self.watcher is not None else None
        publisher = asyncio.create_task(self._publisher(stopping))
        tick = min(self.settings.batch_max_age_ms / 2000, self.settings.stats_interval_s)
        next_stats = 0.0
        try:
            while not stopping.is_set():
                now = time.monotonic()
                for point in self.points:
                    for shard in range(len(point.fanout.rings)):
                        self.drain_ring(point, shard, now)
                if now >= next_stats:
                    self.read_statistics()
                    self.reload_directory_if_changed()
                    next_stats = now + self.settings.stats_interval_s
                self.cut_due(now)
                self._update_queue_gauge()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), tick)
        finally:
            for point in self.points:
                for ring in point.fanout.rings:
                    loop.remove_reader(ring.fileno())
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
            now = time.monotonic()
            for point in self.points:
                for shard in range(len(point.fanout.rings)):
                    self.drain_ring(point, shard, now)
            self.read_statistics()
            self.cut_due(now, force=True)
            self._wakeup.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(publisher, 10)
            publisher.cancel()

    def _on_readable(self, point: CapturePoint, shard: int) -> None:
        if self.drain_ring(point, shard, time.monotonic()):
            return
        # Readable with nothing to take: an error, such as the interface having gone away.
        ring = point.fanout.rings[shard]
        error = ring.pending_error()
        if error:
            asyncio.get_running_loop().remove_reader(ring.fileno())
            log.error("capture_socket_failed", point=point.name, shard=shard, error=os.strerror(error))

    async def _publisher(self, stopping: asyncio.Event) -> None:
        while True:
            await self.publish_queued()
            if stopping.is_set() and (all(len(queue) == 0 for queue in self.queues) or not self.connected()):
                return
            self._wakeup.clear()
            if self.connected():
                # Wake on new batches (or the end); no timer per batch, it costs more than the wait.
                await self._wakeup.wait()
            else:
                # Poll while disconnected, so a reconnect resumes publishing.
                await asyncio.sleep(0.2)

    async def _watch_pods(self) -> None:
        assert self.watcher is not None
        try:
            async for event in self.watcher.events():
                try:
                    self.on_interface_event(event)
                except ConfigError as exc:
                    log.error("pod_interface_filter_failed", interface=event.name, error=str(exc))
        except Exception as exc:  # netlink errors of any kind
            # Capture goes on with the interfaces already known; new pods are not followed any more.
            log.error("pod_watch_failed", error=str(exc))
        finally:
            self.watcher.close()

    def _update_queue_gauge(self) -> None:
        waiting: dict[int, int] = {}
        for queue in self.queues:
            waiting[queue.state.shard] = waiting.get(queue.state.shard, 0) + len(queue)
        for shard, batches in waiting.items():
            self.m_queue.set(batches, shard=str(shard))

    def close(self) -> None:
        for point in self.points:
            point.fanout.close()
        self.points = []


def _ifindex(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise ConfigError(f"no interface named {name!r} (see `ip link`)") from None


def own_bus_exclusion(servers: Sequence[str]) -> str:
    """A filter expression matching none of the traffic to or from these NATS server URLs
    (each resolved to its addresses; an unresolvable name excludes its port on every host)."""
    terms: list[str] = []
    for server in servers:
        url = urlsplit(server if "://" in server else f"nats://{server}")
        port = url.port or 4222
        host = url.hostname or ""
        try:
            addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)})
        except (OSError, UnicodeError):
            addresses = []
        hosts = " or ".join(f"host {address}" for address in addresses)
        terms.append(f"(tcp port {port} and ({hosts}))" if hosts else f"(tcp port {port})")
    return f"not ({' or '.join(dict.fromkeys(terms))})" if terms else ""


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3


def keep_batch_buffers_in_heap() -> bool:
    """Serve the megabyte-sized batch buffers from the heap instead of fresh mmaps.

    glibc maps every allocation above its threshold (128 KiB, adapting up to 32 MiB) with a
    new mmap and unmaps it on free, so each batch buffer and each of its copies on the way to
    NATS cost a page fault per 4 KiB. Measured with bench/capture.py on 1500-byte frames: 0.98
    µs of collector CPU per packet before, 0.67-0.77 after. Freed memory above the heap's top
    is returned to the kernel past 128 MiB, which bounds what this keeps. Returns False where
    the C library is not glibc (nothing changes there)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(
        mallopt(param, value) == 1
        for param, value in ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 128 << 20), (M_TOP_PAD, 32 << 20))
    )


def open_live(ctx: ServiceContext[Any], settings: LiveCaptureSettings) -> LiveCapture:
    """Check capabilities and open every socket (filters attached) for the collector service."""
    check_capabilities(required_capabilities(pod_loopback=bool(settings.pod_loopback)))
    if not keep_batch_buffers_in_heap():
        log.info("mallopt_unavailable")
    bus = ctx.bus
    node = ctx.settings.node
    sink = batch_sink(ctx.settings.nats, f"trawl-{ctx.name}-{node}-packets", bus, node, ctx.settings.packet_retention)
    capture = LiveCapture(
        settings,
        node,
        ctx.metrics,
        sink.publish,
        sink.is_connected,
        max_payload=bus.nc.max_payload or 1 << 20,
        bus_servers=ctx.settings.nats.servers,
        sink=sink,
    )
    capture.open()
    return capture


async def run_live(ctx: ServiceContext[Any], capture: LiveCapture) -> None:
    """Serve scope updates on trawl.v1.control.scope and capture until ctx.stopping; closes the capture."""
    bus = ctx.bus
    sink = capture.sink or ClientSink(bus, ctx.settings.node)

    async def on_scope(msg: Msg) -> None:
        error = ""
        try:
            capture.apply_scope(Scope.from_update(control_pb2.ScopeUpdate.FromString(msg.data)))
        except DecodeError:
            error = "not a ScopeUpdate message"
        except ConfigError as exc:
            error = str(exc)
        if error:
            log.error("scope_update_rejected", error=error)
        if msg.reply:
            await bus.nc.publish(msg.reply, error.encode() or b"ok")

    try:
        await sink.start()
        await bus.subscribe(control_subject("scope"), on_scope)
        # Everything allocated so far lives as long as the service: out of the collector's way.
        # Without this, each young-generation pass that reaches the old generations walks every
        # module and protobuf descriptor: ~10% of the CPU at ~1,000 batches/s (perf, 1500-byte frames).
        gc.collect()
        gc.freeze()
        await ctx.ready()
        await capture.run(ctx.stopping)
        await sink.flush()
    finally:
        capture.close()
        await sink.close()
        totals = capture.kernel_totals()
        log.info(
            "capture_stopped",
            kernel_packets=totals.packets,
            kernel_drops=totals.drops,
            dropped_batches=sum(state.dropped_batches for state in capture.states),
            dropped_packets=sum(state.dropped_packets for state in capture.states),
        )


async def serve_live(ctx: ServiceContext[Any], settings: LiveCaptureSettings) -> None:
    """The collector's live mode: open, then capture and publish until ctx.stopping."""
    await run_live(ctx, open_live(ctx, settings))
