"""The dissector service: packet batches from NATS in, `CallBatch`es on JetStream out.

- takes `PacketBatch`es of the shards it owns (`shard_assignment: lease`, the default: one
  reader per shard, shards leased and rebalanced between replicas by
  `trawl.dissector.shards.ShardManager`), or of `settings.subject` (`shard_assignment: all`, a
  single replica, as `trawl up` runs it);
- reads them from the in-memory stream TRAWL_PACKETS through a durable consumer per shard and
  commits a checkpoint every `batch_age_ms` (calls published and acked, then the checkpoint,
  then the consumer's ack): a replica that restarts or takes a shard over replays the window
  before the checkpoint to rebuild flow state, publishes the calls of every batch after it, and
  counts in batches and packets what aged out of the window unread (`trawl_bus_gaps_total`,
  `trawl_bus_lost_packets_total`, the log line `packet_batches_lost`, and each CallBatch's
  `lost_packet_batches`): see `trawl.dissector.resume`;
- gives a shard up (rebalance, SIGTERM) after a commit, dropping its flows without emitting them:
  the next owner rebuilds them and emits their calls whole, never split in two;
- carries calls in `CallBatch`es of up to `calls_per_batch` calls or `batch_age_ms` old on
  `trawl.v1.calls.<node>.<shard>` (stream TRAWL_CALLS, async acks, Nats-Msg-Id
  "<node>/<shard>/<sequence>"); the sequence of each (node, shard) increases by one per batch
  from the time in microseconds the service started publishing it (or took the shard over),
  so neither a restarted dissector nor the next owner of a shard reuses an id still inside
  the stream's duplicate window (its batches would be dropped as duplicates);
- keeps calls serialized from the dissector to the bus (`Dissector.feed_encoded`: the compiled
  lane's calls are never Python objects here): they are grouped per (node, shard) by
  `trawl._calljson.route_calls` and framed into a CallBatch by hand (`frame_call_batch`, the
  bytes `CallBatch.SerializeToString` writes); `trawl_dissector_calls_total{protocol}` moves by
  the dissector's own per-protocol counters;
- runs the dissector's timeouts while no packets arrive;
- takes TLS plaintext (`TlsChunkBatch`es of the collectors' eBPF uprobes, core NATS on
  `trawl.v1.tls.<node>`) in "all" mode, or in "lease" mode on the replica that owns shard 0
  (a node's chunks must all reach one replica); their calls go out as shard 0's, and batches
  missing from a collector's sequence are counted (`trawl_dissector_tls_batches_lost_total`);
- on a batch marked end_of_input: ends every flow ("all") or the flows of that node/shard
  ("lease"), publishes what remains and a CallBatch with end_of_input for that node/shard,
  waits for the acks and announces `drained`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from nats.errors import Error as NatsError
from nats.js.api import PubAck

from trawl.bus import PREFIX, STREAM_CALLS, Bus, calls_subject, consumer_token, raise_if_cancelled
from trawl.dissector.config import DissectorSettings
from trawl.dissector.engine import SECOND_NS, Dissector
from trawl.dissector.resume import Checkpoint, CheckpointStore, warmup_start
from trawl.dissector.shards import ShardManager, group_token
from trawl.logs import get_logger
from trawl.metrics import Registry
from trawl.packet_stream import LossCounter, PacketReader
from trawl.service import ServiceContext, main_for
from trawl.v1.calls_pb2 import ApiCall
from trawl.v1.packets_pb2 import PacketBatch, TlsChunkBatch

try:
    from trawl._calljson import route_calls
except ImportError:  # not compiled: each call is parsed for its node and shard
    route_calls = None  # type: ignore[assignment]

log = get_logger(__name__)

# Field numbers of CallBatch (proto/trawl/v1/calls.proto), as tags.
_NODE_TAG = b"\x0a"  # 1, length-delimited
_SHARD_TAG = b"\x10"  # 2, varint
_SEQUENCE_TAG = b"\x18"  # 3, varint
_CALL_TAG = b"\x22"  # 4, length-delimited
_END_OF_INPUT = b"\x28\x01"  # 5 = true
_LOST_TAG = b"\x30"  # 6, varint


def _varint(value: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def frame_call_batch(
    node: str, shard: int, sequence: int, calls: list[bytes], end_of_input: bool = False, lost_packet_batches: int = 0
) -> bytes:
    """`CallBatch(node=..., calls=[ApiCall.FromString(c) for c in calls], ...).SerializeToString()`
    without parsing a call: fields in number order, defaults left out, each call as field 4."""
    parts: list[bytes] = []
    if node:
        encoded = node.encode()
        parts += (_NODE_TAG, _varint(len(encoded)), encoded)
    if shard:
        parts += (_SHARD_TAG, _varint(shard))
    if sequence:
        parts += (_SEQUENCE_TAG, _varint(sequence))
    for call in calls:
        parts += (_CALL_TAG, _varint(len(call)), call)
    if end_of_input:
        parts.append(_END_OF_INPUT)
    if lost_packet_batches:
        parts += (_LOST_TAG, _varint(lost_packet_batches))
    return b"".join(parts)


def _route_by_parsing(calls: list[bytes]) -> list[tuple[str, int, list[bytes]]]:
    runs: list[tuple[str, int, list[bytes]]] = []
    for encoded in calls:
        call = ApiCall.FromString(encoded)
        if runs and runs[-1][0] == call.node and runs[-1][1] == call.shard:
            runs[-1][2].append(encoded)
        else:
            runs.append((call.node, call.shard, [encoded]))
    return runs


class CallPublisher:
    """Groups serialized calls per (node, shard) into CallBatches and publishes them durably."""

    def __init__(self, bus: Bus, settings: DissectorSettings, metrics: Registry) -> None:
        self.bus = bus
        self.max_calls = settings.calls_per_batch
        self.max_age_s = settings.batch_age_ms / 1000
        self.pending: dict[tuple[str, int], list[bytes]] = {}
        self.opened: dict[tuple[str, int], float] = {}
        self.sequences: dict[tuple[str, int], int] = {}
        self.lost: dict[tuple[str, int], int] = {}
        self.emitted = 0
        # Sent and not yet acked by the stream: (subject, CallBatch, Nats-Msg-Id, ack future).
        self.in_flight: list[tuple[str, bytes, str, asyncio.Future[PubAck]]] = []
        self.batches = metrics.counter("trawl_dissector_call_batches_total", "CallBatches published")
        self.resent = metrics.counter(
            "trawl_dissector_call_batches_resent_total", "CallBatches sent again because the stream did not ack them"
        )

    async def add(self, calls: list[bytes]) -> None:
        """Serialized ApiCalls, as `Dissector.feed_encoded` returns them."""
        if not calls:
            return
        now = time.monotonic()
        runs = route_calls(calls) if route_calls is not None else _route_by_parsing(calls)
        for node, shard, members in runs:
            key = (node, shard)
            group = self.pending.get(key)
            if group is None:
                group = self.pending[key] = []
                self.opened[key] = now
            group += members
            if len(group) >= self.max_calls:
                # Batches of exactly max_calls, as when calls came one at a time; the rest waits.
                full = len(group) - len(group) % self.max_calls
                del self.pending[key]
                del self.opened[key]
                if full < len(group):
                    self.pending[key] = group[full:]
                    self.opened[key] = now
                for start in range(0, full, self.max_calls):
                    await self._send(key, group[start : start + self.max_calls])

    async def flush_old(self) -> None:
        now = time.monotonic()
        for key in [key for key, opened in self.opened.items() if now - opened >= self.max_age_s]:
            await self._publish(key)

    async def flush_all(self) -> None:
        for key in list(self.pending):
            await self._publish(key)

    def restart_shard(self, shard: int) -> None:
        """This replica (re)takes `shard`: its CallBatch sequences start again from the clock."""
        for key in [key for key in self.sequences if key[1] == shard]:
            del self.sequences[key]

    async def end_of_input(self, node: str, shard: int) -> None:
        await self._publish((node, shard), end_of_input=True)

    async def _publish(self, key: tuple[str, int], end_of_input: bool = False) -> None:
        calls = self.pending.pop(key, [])
        self.opened.pop(key, None)
        if calls or end_of_input:
            await self._send(key, calls, end_of_input)

    async def _send(self, key: tuple[str, int], calls: list[bytes], end_of_input: bool = False) -> None:
        node, shard = key
        # A key's first batch is numbered by the clock: above anything a previous process, or the
        # previous owner of the shard, can have published (fewer than one batch per microsecond).
        sequence = self.sequences.get(key, time.time_ns() // 1000 - 1) + 1
        self.sequences[key] = sequence
        batch = frame_call_batch(node, shard, sequence, calls, end_of_input, self.lost.get(key, 0))
        subject, msg_id = calls_subject(node, shard), f"{node}/{shard}/{sequence}"
        self.in_flight.append((subject, batch, msg_id, await self.bus.publish_durable_async(subject, batch, msg_id)))
        self.emitted += len(calls)
        self.batches.inc()

    async def confirm(self, timeout_s: float = 5.0) -> bool:
        """Wait (at most `timeout_s`) for TRAWL_CALLS to ack every CallBatch sent; send again the
        ones it did not (an ack lost with a NATS server that died never comes: nats-py's future
        would wait for ever). True when all are stored; the rest stay in flight, to be confirmed
        or sent again by the next call (the stream stores a re-sent batch once: same Nats-Msg-Id)."""
        pending, self.in_flight = self.in_flight, []
        futures = [future for *_, future in pending]
        if futures:
            await asyncio.wait(futures, timeout=timeout_s)
        for subject, batch, msg_id, future in pending:
            if future.done() and not future.cancelled() and future.exception() is None:
                continue
            if not future.done():
                future.cancel()  # frees nats-py's slot for it
            self.resent.inc()
            try:
                again = await self.bus.publish_durable_async(subject, batch, msg_id)
            except Exception as exc:  # the bus is away: try at the next confirm
                raise_if_cancelled()
                log.info("call_batch_not_sent", msg_id=msg_id, error=str(exc) or type(exc).__name__)
                again = asyncio.get_running_loop().create_future()
                again.cancel()
            self.in_flight.append((subject, batch, msg_id, again))
        return not self.in_flight


END_OF_INPUT_CONFIRMS = 24  # of up to 5 s each
SUSPENDED_GRACE_TTLS = 4  # a lost shard's flows are kept this many lease TTLs for a quick re-take
TLS_SUBJECTS = f"{PREFIX}.tls.*"  # every collector's trawl.v1.tls.<node>
ALL = -1  # the reader key of "all" mode (one reader of `subject`); shards are 0..shards-1


@dataclass
class _Suspended:
    position: Checkpoint
    last_saved: bytes
    losses: LossCounter
    since: float


class DissectorService:
    """The bus side of one dissector replica: one `PacketReader` per shard it owns (or one of
    `subject` in "all" mode), each resuming from its checkpoint (`trawl.dissector.resume`)."""

    def __init__(self, ctx: ServiceContext[DissectorSettings]) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.leasing = ctx.settings.shard_assignment == "lease"
        self.dissector = Dissector(ctx.settings, ctx.settings.node, ctx.metrics)
        self.publisher = CallPublisher(ctx.bus, ctx.settings, ctx.metrics)
        self.checkpoints = CheckpointStore(ctx.bus.js, ctx.settings.checkpoint_bucket)
        self.lock = asyncio.Lock()
        self.last_packet_wall = time.monotonic()
        # "lease": the shards this replica owns. Per reader key (a shard, or ALL): the reader, the
        # stream sequence up to which batches only rebuild state (the predecessor published their
        # calls), where the reader stands (saved at the next commit), and the loss counter.
        self.owned: set[int] = set()
        self.readers: dict[int, PacketReader] = {}
        self.floors: dict[int, int] = {}
        self.positions: dict[int, Checkpoint] = {}
        self.saved: dict[int, int] = {}
        self.last_saved: dict[int, bytes] = {}  # the checkpoint as this replica last saved (or found) it
        self.losses: dict[int, LossCounter] = {}
        # Shards whose lease was lost while the bus was away: their flows are kept for a while,
        # and if this replica takes the shard again before anyone else committed, it goes on in
        # place (a NATS restart then loses nothing); otherwise they are dropped.
        self.suspended: dict[int, _Suspended] = {}
        self.gaps = ctx.metrics.counter("trawl_bus_gaps_total", "Packet batches lost on the bus, by node and shard")
        self.lost_packets = ctx.metrics.counter(
            "trawl_bus_lost_packets_total", "Packets in the batches lost on the bus, by node and shard"
        )
        self.warmup_batches = ctx.metrics.counter(
            "trawl_dissector_warmup_batches_total",
            "Batches fed only to rebuild flow state after a restart or takeover (their calls were published)",
        )
        self.commit_failures = ctx.metrics.counter(
            "trawl_dissector_checkpoint_failures_total", "Checkpoints not written because the bus failed"
        )
        self.bad_batches = ctx.metrics.counter("trawl_dissector_bad_batches_total", "Messages that were not batches")
        self.handovers = ctx.metrics.counter(
            "trawl_dissector_shard_handovers_total", "Shards this replica took over (with fresh flow state), by shard"
        )
        self.releases = ctx.metrics.counter(
            "trawl_dissector_shard_releases_total", "Shards this replica gave up or lost, by shard and reason"
        )
        ctx.metrics.counter("trawl_parse_errors_total", "Flows skipped because a parser failed")
        self.calls = ctx.metrics.counter("trawl_dissector_calls_total", "Calls published, by protocol")
        self.calls_counted: dict[str, int] = {}  # the dissector's calls_<protocol> counters, as last counted
        self.tls_subscription: Any = None
        self.tls_sequences: dict[str, int] = {}  # node -> last TlsChunkBatch sequence
        self.tls_gaps = ctx.metrics.counter(
            "trawl_dissector_tls_batches_lost_total", "TLS chunk batches missing from a collector's sequence, by node"
        )
        self.tls_collector_lost = ctx.metrics.gauge(
            "trawl_dissector_tls_collector_lost_chunks", "TLS chunks a collector lost before publishing, by node"
        )

    async def publish(self, calls: list[bytes]) -> None:
        """Hand calls the dissector just returned to the publisher, and count them by protocol."""
        if not calls:
            return
        await self.publisher.add(calls)
        counted = self.calls_counted
        for name, value in self.dissector.counters.items():
            if name.startswith("calls_") and value != counted.get(name, 0):
                self.calls.inc(value - counted.get(name, 0), protocol=name[6:])
                counted[name] = value

    def discard(self, calls: list[bytes]) -> None:
        """Calls derived again from batches whose calls were published before: not published,
        and not counted again."""
        del calls
        for name, value in self.dissector.counters.items():
            if name.startswith("calls_"):
                self.calls_counted[name] = value

    async def follow_tls(self, on: bool) -> None:
        """Take (or stop taking) the collectors' TLS chunk batches."""
        if on and self.tls_subscription is None:
            self.tls_subscription = await self.ctx.bus.nc.subscribe(TLS_SUBJECTS, cb=self.on_tls_batch)
            log.info("tls_chunks_followed", subject=TLS_SUBJECTS)
        elif not on and self.tls_subscription is not None:
            subscription, self.tls_subscription = self.tls_subscription, None
            try:
                await subscription.unsubscribe()
            except (NatsError, OSError) as exc:
                log.warning("tls_unsubscribe_failed", error=str(exc) or type(exc).__name__)

    async def on_tls_batch(self, msg: Any) -> None:
        batch = TlsChunkBatch()
        try:
            batch.ParseFromString(msg.data)
        except DecodeError:
            self.bad_batches.inc()
            log.warning("bad_tls_batch", subject=msg.subject, size=len(msg.data))
            return
        async with self.lock:
            if self.tls_subscription is None:
                return  # stopped following while this batch waited for the lock
            node = batch.node or self.settings.node
            last = self.tls_sequences.get(node, 0)
            if last and batch.sequence > last + 1:
                missing = batch.sequence - last - 1
                self.tls_gaps.inc(missing, node=node)
                log.warning("tls_batches_lost", node=node, lost_batches=missing, after_sequence=last)
            self.tls_sequences[node] = batch.sequence  # lower: the collector restarted, its sequence too
            self.tls_collector_lost.set(batch.lost_chunks, node=node)
            self.last_packet_wall = time.monotonic()
            await self.publish(self.dissector.feed_tls_encoded(batch))

    def checkpoint_key(self, key: int) -> str:
        group = group_token(self.settings.queue_group)
        return f"{group}.shard.{key}" if key != ALL else f"{group}.all.{consumer_token(self.settings.subject)}"

    def durable(self, key: int) -> str:
        group = consumer_token(self.settings.queue_group)
        return f"{group}-shard-{key}" if key != ALL else f"{group}-all-{consumer_token(self.settings.subject)}"

    async def open_reader(self, key: int, subject: str, sequences: dict[str, int]) -> None:
        """Start reading `subject` from the key's checkpoint (or, with none, from the start of
        the window, counting from the `sequences` a releasing owner left in the lease)."""
        checkpoint = await self.checkpoints.load(self.checkpoint_key(key))
        self.floors[key] = checkpoint.stream_seq if checkpoint else 0
        self.saved[key] = self.floors[key]
        self.last_saved[key] = checkpoint.encode() if checkpoint else b""
        self.positions[key] = Checkpoint(**vars(checkpoint)) if checkpoint else Checkpoint(sequences=dict(sequences))
        self.losses[key] = LossCounter(dict(self.positions[key].sequences), dict(self.positions[key].packets))

        reader = self._reader(key, subject)
        await reader.start(
            start_time=warmup_start(checkpoint, self.settings.resume_warmup_s),
            stream_id=checkpoint.stream if checkpoint else "",
        )
        log.info(
            "packets_resumed",
            subject=subject,
            consumer=self.durable(key),
            checkpoint=self.floors[key],
            warmup_s=self.settings.resume_warmup_s if checkpoint else 0,
            sequences=self.positions[key].sequences,
        )

    def _reader(self, key: int, subject: str) -> PacketReader:
        async def handle(data: bytes, stream_seq: int, stored_ns: int) -> None:
            await self.on_stored_batch(key, data, stream_seq, stored_ns)

        reader = PacketReader(
            self.ctx.bus.js,
            self.durable(key),
            subject,
            handle,
            ensure_stream=lambda: self.ctx.bus.ensure_packet_stream(self.settings.packet_retention),
            fetch_batch=self.settings.fetch_batch,
        )
        self.readers[key] = reader
        return reader

    async def resume_in_place(self, key: int, subject: str, suspended: _Suspended) -> None:
        """Take a shard again with the flows kept since its lease was lost: read on after the
        last batch fed (from the start of the stream if a restarted server made it anew)."""
        position = suspended.position
        self.positions[key], self.losses[key] = position, suspended.losses
        self.floors[key], self.saved[key], self.last_saved[key] = 0, 0, suspended.last_saved
        reader = self._reader(key, subject)
        await reader.start(
            start_seq=position.stream_seq + 1 if position.stream_seq else None, stream_id=position.stream
        )
        log.info("packets_resumed_in_place", subject=subject, consumer=self.durable(key), after=position.stream_seq)

    async def acquire(self, shard: int, sequences: dict[str, int]) -> None:
        """This replica owns `shard` now: read it from its checkpoint."""
        async with self.lock:
            self.publisher.restart_shard(shard)
            self.owned.add(shard)
            self.handovers.inc(shard=str(shard))
        if shard == 0:
            await self.follow_tls(True)
        subject = self.settings.shard_subject.format(shard=shard)
        suspended = self.suspended.pop(shard, None)
        if suspended is not None:
            checkpoint = await self.checkpoints.load(self.checkpoint_key(shard))
            if (checkpoint.encode() if checkpoint else b"") == suspended.last_saved:
                await self.resume_in_place(shard, subject, suspended)
                return
            async with self.lock:  # another replica went on meanwhile: its checkpoint rules
                self.discard(self.dissector.finish_encoded(shard=shard))
        await self.open_reader(shard, subject, sequences)

    async def release(self, shard: int, reason: str) -> dict[str, int]:
        """`shard` goes to another replica: stop reading it, commit (unless the lease was lost:
        the new owner may be ahead), and drop its flows without emitting them (the next owner
        rebuilds them from the warm-up and emits their calls whole); returns the last batch
        sequence processed per collector node on that shard."""
        reader = self.readers.pop(shard, None)
        if reader is not None:
            await reader.stop()
        if shard == 0:
            await self.follow_tls(False)
        async with self.lock:
            if shard == 0:
                # The next owner of shard 0 takes the chunks from now on; these flows are not
                # finished here as half-calls.
                self.discard(self.dissector.finish_tls_encoded())
            self.owned.discard(shard)
            self.releases.inc(shard=str(shard), reason=reason)
            if reason != "lost" and reader is not None:
                await self._commit({shard: reader})
            position = self.positions.pop(shard, Checkpoint())
            losses = self.losses.pop(shard, LossCounter())
            last_saved = self.last_saved.pop(shard, b"")
            self.floors.pop(shard, None)
            self.saved.pop(shard, None)
            if reason == "lost":
                self.suspended[shard] = _Suspended(position, last_saved, losses, time.monotonic())
                log.info("shard_suspended", shard=shard, after=position.stream_seq)
            else:
                self.discard(self.dissector.finish_encoded(shard=shard))
            return dict(position.sequences)

    async def on_stored_batch(self, key: int, data: bytes, stream_seq: int, stored_ns: int) -> None:
        batch = PacketBatch()
        try:
            batch.ParseFromString(data)
        except DecodeError:
            self.bad_batches.inc()
            log.warning("bad_packet_batch", consumer=self.durable(key), stream_seq=stream_seq, size=len(data))
            return
        async with self.lock:
            if key not in self.readers:
                return  # released while this batch waited for the lock
            self.last_packet_wall = time.monotonic()
            reader = self.readers[key]
            position = self.positions[key]
            if position.stream != reader.stream_id:
                # The first batch read (or the first since the NATS server restarted): a floor
                # counted in another incarnation of the stream does not apply to this one.
                if position.stream:
                    self.floors[key] = self.saved[key] = 0
                position.stream = reader.stream_id
            if stream_seq <= self.floors.get(key, 0):
                self.warmup_batches.inc()
                self.discard(self.dissector.feed_encoded(batch))
                return
            node = batch.node or self.settings.node
            lost_batches, lost_packets = self.losses[key].observe(
                node, batch.sequence, batch.packets_before, batch.packet_count
            )
            if lost_batches:
                shard_key = (node, batch.shard)
                self.gaps.inc(lost_batches, node=node, shard=str(batch.shard))
                self.lost_packets.inc(lost_packets, node=node, shard=str(batch.shard))
                self.publisher.lost[shard_key] = self.publisher.lost.get(shard_key, 0) + lost_batches
                log.warning(
                    "packet_batches_lost",
                    node=node,
                    shard=batch.shard,
                    lost_batches=lost_batches,
                    lost_packets=lost_packets,
                    after_sequence=batch.sequence - lost_batches - 1,
                )
            position.stream_seq, position.stored_ns = stream_seq, stored_ns
            position.sequences[node] = batch.sequence
            position.packets[node] = batch.packets_before + batch.packet_count
            await self.publish(self.dissector.feed_encoded(batch))
            if batch.end_of_input:
                await self.publish(self._end_of_input(node, batch.shard))
                await self.publisher.flush_all()
                await self.publisher.end_of_input(node, batch.shard)
                for _ in range(END_OF_INPUT_CONFIRMS):  # drained means stored: wait out a bus restart
                    if await self.publisher.confirm() or self.ctx.stopping.is_set():
                        break
                await self._commit(self.readers)
                self._export_counters()
                log.info("end_of_input", node=node, shard=batch.shard, calls=self.publisher.emitted)
                await self.ctx.drained(emitted=self.publisher.emitted)

    def _end_of_input(self, node: str, shard: int) -> list[bytes]:
        """The flows that end with the input of (node, shard)."""
        if not self.leasing:
            return self.dissector.finish_encoded()
        if self.owned >= set(range(self.settings.shards)):
            return self.dissector.finish_encoded(node=node)  # this replica has all of the node's shards
        return self.dissector.finish_encoded(node=node, shard=shard)

    async def _commit(self, readers: dict[int, PacketReader]) -> None:
        """Publish every call derived so far and wait for its acks, then save each reader's
        checkpoint and ack its batches: a checkpoint never covers a call not yet stored."""
        try:
            await self.publisher.flush_all()
            if not await self.publisher.confirm():
                self.commit_failures.inc()
                log.warning("checkpoint_deferred", unacked_call_batches=len(self.publisher.in_flight))
                return
            for key, reader in list(readers.items()):
                position = self.positions.get(key)
                if position is None or position.stream_seq <= self.saved.get(key, 0):
                    continue
                await self.checkpoints.save(self.checkpoint_key(key), position)
                self.saved[key] = position.stream_seq
                self.last_saved[key] = position.encode()
                await reader.ack()
        except (NatsError, OSError) as exc:
            raise_if_cancelled()
            # The calls stay pending or are re-derived by the next owner: nothing is lost.
            self.commit_failures.inc()
            log.warning("checkpoint_failed", error=str(exc) or type(exc).__name__)

    async def tick(self) -> None:
        """Commit; run timeouts while packets do not come."""
        async with self.lock:
            await self._commit(self.readers)
            grace_s = SUSPENDED_GRACE_TTLS * self.settings.shard_lease_ttl_s
            for shard, suspended in list(self.suspended.items()):
                if time.monotonic() - suspended.since >= grace_s:
                    del self.suspended[shard]
                    self.discard(self.dissector.finish_encoded(shard=shard))
                    log.info("shard_suspension_ended", shard=shard)
            dissector = self.dissector
            if dissector.clock_ns:
                idle_s = time.monotonic() - self.last_packet_wall
                if idle_s >= self.settings.expire_interval_s:
                    # Packet time stands still while nothing arrives: advance it by the wall clock.
                    await self.publish(dissector.expire_encoded(dissector.clock_ns + int(idle_s * SECOND_NS)))
            self._export_counters()

    def _export_counters(self) -> None:
        metrics = self.ctx.metrics
        for name, value in self.dissector.counters.items():
            metrics.gauge(f"trawl_dissector_{name}", f"Dissector counter {name}").set(value)

    def abandon(self) -> None:
        """Cancelled: the readers stop where they are; nothing is committed."""
        for reader in self.readers.values():
            if reader.task is not None:
                reader.task.cancel()

    async def stop(self) -> None:
        """SIGTERM: stop reading, commit what was read. Flows in progress are not ended: the next
        process rebuilds them from the warm-up and emits their calls whole."""
        for reader in self.readers.values():
            await reader.stop()
        await self.follow_tls(False)
        async with self.lock:
            await self._commit(self.readers)
            self.readers.clear()


async def serve(ctx: ServiceContext[DissectorSettings]) -> None:
    settings = ctx.settings
    await ctx.bus.ensure_stream(STREAM_CALLS, settings.streams)
    await ctx.bus.ensure_packet_stream(settings.packet_retention)
    service = DissectorService(ctx)
    await service.checkpoints.open()
    manager: ShardManager | None = None
    leasing: asyncio.Task[None] | None = None
    if settings.shard_assignment == "all":
        await service.open_reader(ALL, settings.subject, {})
        await service.follow_tls(True)
    else:
        manager = ShardManager(
            ctx.bus.js,
            settings.replica_id,
            settings.shards,
            settings.shard_lease_ttl_s,
            service.acquire,
            service.release,
            bucket=settings.shard_bucket,
            group=settings.queue_group,
            metrics=ctx.metrics,
        )
        await manager.start()
        leasing = asyncio.create_task(manager.run(ctx.stopping))
        log.info("dissector_leasing", replica=settings.replica_id, shards=settings.shards, owned=sorted(service.owned))
    try:
        await ctx.ready()
        period = min(settings.batch_age_ms / 1000, settings.expire_interval_s)
        while not ctx.stopping.is_set():
            raise_if_cancelled()
            try:
                await asyncio.wait_for(ctx.stopping.wait(), timeout=period)
            except TimeoutError:
                await service.tick()
        if manager is not None and leasing is not None:
            await leasing
            await manager.close()
        await service.stop()
    finally:
        # Cancelled (not stopped): the leases are left to expire and nothing is committed, as if
        # the process had died; the reading tasks end with it.
        if leasing is not None and not leasing.done():
            leasing.cancel()
        service.abandon()


def main(config_file: Path | None) -> int:
    return main_for("dissector", DissectorSettings, serve, config_file)
