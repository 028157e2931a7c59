"""Shard ownership for dissector replicas: each collector shard is owned by one replica at a time.

Why not a queue group: the collector hashes flows onto shards (PACKET_FANOUT_HASH), so every
packet of a TCP flow, both directions, is published on `trawl.v1.packets.<node>.<k>`. A NATS
queue group hands consecutive batches of one subject to different members at random, and TCP
reassembly breaks as soon as there are two replicas. Replicas hold leases on whole shards
instead and subscribe to the shards they own, with no queue group.

The leases live in a JetStream KV bucket (`TRAWL_DISSECTOR_SHARDS`) whose max age is the lease
TTL, so whatever is not rewritten within a TTL disappears by itself (`<group>` is the
replicas' `queue_group`, so separate groups of dissectors can share one NATS):

- `<group>.members.<replica>`: a heartbeat, put every TTL/3;
- `<group>.shard.<k>`: the lease on shard k, value = the owner's replica id; a free shard is taken
  with `create` (the server lets exactly one writer win), renewed with `update(last=revision)`
  every TTL/3; an owner that gives the shard up overwrites it with a free marker holding the
  last batch sequence it processed per collector node, from which the next owner (taking it
  with `update(last=revision)`) counts the batches the handover lost.

Every TTL/3 `ShardManager.tick` heartbeats, reads the bucket, renews its own leases (a lease
that cannot be renewed is dropped at once: someone else holds it, or its TTL ran out while the
bus was away), then acts on `plan`: the pure part, testable without a bus. The plan gives each
live member a target (shards / members, the remainder to the members that already hold most,
so rebalancing moves as few shards as possible), releases what is above target only while
other members are short and no free shard can fill them, claims free shards up to target, and
claims any shard that stayed free for a whole round whatever the target (a shard released to
a member that died meanwhile must not wait for that member's heartbeat to expire).

A watch on the bucket starts a round at once when a shard is released or a replica joins, so
a planned handover (rebalance, orderly stop) leaves a shard without owner for milliseconds. A
shard whose owner dies is free once its lease expires: after one TTL, plus up to one round
until a survivor claims it. Batches published on a shard while it has no owner are lost (core
NATS keeps nothing): counted after a planned handover, not after a death (the dead owner left
no sequence). The new owner starts with fresh flow state for that shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from trawl.bus import raise_if_cancelled
from trawl.logs import get_logger
from trawl.metrics import Registry

log = get_logger(__name__)

MEMBERS = "members"
SHARD = "shard"
_NOT_IN_KEY = re.compile(r"[^-_=a-zA-Z0-9]")


def group_token(group: str) -> str:
    """A group name as one KV key token."""
    return _NOT_IN_KEY.sub("_", group) or "_"


def targets(shards: int, members: Iterable[str], owners: dict[int, str]) -> dict[str, int]:
    """How many shards each live member should own: `shards // members`, and one more for the
    `shards % members` members that own most now (ties by id), so a rebalance moves few shards."""
    counts = dict.fromkeys(members, 0)
    if not counts:
        return {}
    for owner in owners.values():
        if owner in counts:
            counts[owner] += 1
    base, extra = divmod(shards, len(counts))
    order = sorted(counts, key=lambda member: (-counts[member], member))
    return {member: base + (1 if rank < extra else 0) for rank, member in enumerate(order)}


@dataclass(frozen=True)
class Plan:
    release: list[int] = field(default_factory=list)
    claim: list[int] = field(default_factory=list)


def plan(
    me: str,
    shards: int,
    members: Iterable[str],
    owners: dict[int, str],
    free_before: frozenset[int] = frozenset(),
) -> Plan:
    """What replica `me` should do given the live `members` and the current lease `owners`
    (shard -> replica); `free_before` are the shards that were free at the previous round."""
    live = set(members) | {me}
    owners = {shard: owner for shard, owner in owners.items() if 0 <= shard < shards}
    target = targets(shards, live, owners)
    counts = dict.fromkeys(live, 0)
    for owner in owners.values():
        if owner in counts:
            counts[owner] += 1
    mine = sorted(shard for shard, owner in owners.items() if owner == me)
    free = [shard for shard in range(shards) if shard not in owners]
    short = sum(max(0, target[member] - counts[member]) for member in live if member != me)
    excess = len(mine) - target[me]
    release: list[int] = []
    if excess > 0 and short > len(free):
        release = sorted(mine[::-1][: min(excess, short - len(free))])
    room = target[me] - len(mine)
    claim = free[: max(0, room)]
    claim += [shard for shard in free if shard in free_before and shard not in claim]
    return Plan(release=release, claim=claim)


# on_acquire(shard, sequences): `sequences` are the last batch sequence per collector node the
# previous owner processed (empty when it died), so the new owner counts what the handover lost.
Acquire = Callable[[int, dict[str, int]], Awaitable[None]]
# on_release(shard, reason) -> the last batch sequence per collector node processed on that shard.
Release = Callable[[int, str], Awaitable[dict[str, int]]]


def released_value(replica: str, sequences: dict[str, int]) -> bytes:
    """The lease value an owner leaves when it gives a shard up: free, with where it stopped."""
    return json.dumps({"released_by": replica, "sequences": sequences}, sort_keys=True).encode()


def parse_lease(value: bytes) -> tuple[str | None, dict[str, int]]:
    """(owner, None when free) and the sequences a releasing owner left."""
    if not value.startswith(b"{"):
        return value.decode(errors="replace"), {}
    try:
        document = json.loads(value)
        sequences = {str(node): int(sequence) for node, sequence in dict(document.get("sequences", {})).items()}
    except (ValueError, TypeError, AttributeError, RecursionError):
        sequences = {}
    return None, sequences


class ShardManager:
    """One replica's side of the leases: heartbeats, renewals, claims and releases on the bus.

    `on_acquire(shard, sequences)` is awaited once this replica holds the lease (subscribe
    there); `on_release(shard, reason)` before a lease it gives up is marked free, or once a
    lease is lost (unsubscribe, end that shard's flows). `reason` is "rebalance", "lost" or
    "stopping". Besides the rounds, a watch on the bucket starts a round at once when a shard
    is released or a replica joins, so a handover takes milliseconds, not a round.
    """

    def __init__(
        self,
        js: JetStreamContext,
        replica_id: str,
        shards: int,
        ttl_s: float,
        on_acquire: Acquire,
        on_release: Release,
        bucket: str = "TRAWL_DISSECTOR_SHARDS",
        group: str = "dissector",
        metrics: Registry | None = None,
    ) -> None:
        self.js = js
        self.group = group_token(group)
        self.replica_id = replica_id
        self.shards = shards
        self.ttl_s = ttl_s
        self.interval_s = ttl_s / 3
        self.on_acquire = on_acquire
        self.on_release = on_release
        self.bucket = bucket
        self.kv: KeyValue | None = None
        # shard -> (revision of our last write, monotonic time it was written)
        self.owned: dict[int, tuple[int, float]] = {}
        self.free_before: frozenset[int] = frozenset()
        self.members: set[str] = set()
        self.wake = asyncio.Event()
        self.metrics = metrics or Registry()
        self.m_owned = self.metrics.gauge("trawl_dissector_shards_owned", "Shards this replica owns")
        self.m_lease_errors = self.metrics.counter(
            "trawl_dissector_shard_lease_errors_total", "Rounds of shard leasing that failed on the bus"
        )

    async def start(self) -> None:
        """Open (or create) the bucket and run a first round, so the replica owns its shards
        before it says it is ready."""
        try:
            self.kv = await self.js.create_key_value(bucket=self.bucket, ttl=self.ttl_s, history=1)
        except BadRequestError as exc:
            # The bucket exists with another TTL: share it, and renew at its pace, or our leases
            # would expire between renewals.
            self.kv = await self.js.key_value(self.bucket)
            info = await self.js.stream_info(f"KV_{self.bucket}")
            bucket_ttl = info.config.max_age or self.ttl_s
            log.warning(
                "shard_bucket_ttl_differs",
                bucket=self.bucket,
                bucket_ttl_s=bucket_ttl,
                ttl_s=self.ttl_s,
                error=exc.description,
            )
            self.ttl_s = min(self.ttl_s, bucket_ttl)
            self.interval_s = self.ttl_s / 3
        await self.tick()

    async def run(self, stopping: asyncio.Event) -> None:
        """A round every TTL/3 (or when the watch says so) until `stopping` is set; a failed
        round is counted and retried."""
        watching = asyncio.create_task(self._watch())
        stop = asyncio.create_task(stopping.wait())
        try:
            while not stopping.is_set():
                woken = asyncio.create_task(self.wake.wait())
                await asyncio.wait({stop, woken}, timeout=self.interval_s, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if stopping.is_set():
                    break
                self.wake.clear()
                try:
                    await self.tick()
                except (NatsError, OSError) as exc:
                    raise_if_cancelled()
                    self.m_lease_errors.inc()
                    log.warning("shard_round_failed", error=str(exc) or type(exc).__name__)
        finally:
            stop.cancel()
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching

    async def _watch(self) -> None:
        """Wake a round when a shard is released or deleted, or a replica we do not know joins."""
        try:
            watcher = await self._kv().watch(f"{self.group}.>")
        except (NatsError, OSError) as exc:
            log.warning("shard_watch_failed", error=str(exc) or type(exc).__name__)
            return
        members_prefix, shard_prefix = f"{self.group}.{MEMBERS}.", f"{self.group}.{SHARD}."
        try:
            async for entry in watcher:
                if entry is None:
                    continue  # the end of the initial values
                key = entry.key or ""
                deleted = entry.operation is not None
                if key.startswith(shard_prefix):
                    released = deleted or parse_lease(entry.value or b"")[0] is None
                else:
                    released = False
                joined = not deleted and key.removeprefix(members_prefix) not in self.members
                if released or (key.startswith(members_prefix) and joined):
                    self.wake.set()
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def tick(self) -> None:
        kv = self._kv()
        await kv.put(self.member_key(self.replica_id), b"")
        entries = await self._read()
        await self._renew()
        members_prefix, shard_prefix = f"{self.group}.{MEMBERS}.", f"{self.group}.{SHARD}."
        members = {key.removeprefix(members_prefix) for key in entries if key.startswith(members_prefix)}
        self.members = members | {self.replica_id}
        owners: dict[int, str] = {}
        free_leases: dict[int, tuple[int, dict[str, int]]] = {}
        revisions: dict[int, int] = {}
        for key, (value, revision) in entries.items():
            index = key.removeprefix(shard_prefix)
            if key.startswith(shard_prefix) and index.isdigit():
                owner, sequences = parse_lease(value)
                if owner is None:
                    free_leases[int(index)] = (revision, sequences)
                else:
                    owners[int(index)] = owner
                    revisions[int(index)] = revision
        # Our own leases are what we hold, whatever the (older) read said; a lease in our name
        # that we do not hold is a previous process with our id: adopt it.
        adopt = [shard for shard, owner in owners.items() if owner == self.replica_id and shard not in self.owned]
        for shard in adopt:
            del owners[shard]
        for shard in self.owned:
            owners[shard] = self.replica_id
        decided = plan(self.replica_id, self.shards, members, owners, self.free_before)
        self.free_before = frozenset(shard for shard in range(self.shards) if shard not in owners)
        for shard in decided.release:
            await self.release(shard, "rebalance")
        for shard in adopt:
            if shard < self.shards:
                await self._take(shard, last=revisions[shard], sequences={})
        for shard in decided.claim:
            if shard not in self.owned:
                last, sequences = free_leases.get(shard, (None, {}))
                await self._take(shard, last=last, sequences=sequences)
        self.m_owned.set(len(self.owned))

    async def release(self, shard: int, reason: str) -> None:
        """Give a shard up: stop taking it, then free the lease for the next owner."""
        held = self.owned.pop(shard, None)
        if held is None:
            return
        sequences = await self.on_release(shard, reason)
        log.info("shard_released", shard=shard, replica=self.replica_id, reason=reason)
        try:
            await self._kv().update(self.shard_key(shard), released_value(self.replica_id, sequences), last=held[0])
        except (NatsError, OSError) as exc:
            # Someone holds it already, or the bus is away: the lease expires by itself.
            log.info("shard_release_not_written", shard=shard, error=str(exc) or type(exc).__name__)
        self.m_owned.set(len(self.owned))

    async def close(self) -> None:
        """Orderly stop: release every shard (the others take them at their next round) and leave."""
        for shard in sorted(self.owned):
            await self.release(shard, "stopping")
        try:
            await self._kv().delete(self.member_key(self.replica_id))
        except (NatsError, OSError) as exc:
            log.info("shard_member_not_removed", error=str(exc) or type(exc).__name__)

    def shard_key(self, shard: int) -> str:
        return f"{self.group}.{SHARD}.{shard}"

    def member_key(self, replica: str) -> str:
        return f"{self.group}.{MEMBERS}.{replica}"

    def _kv(self) -> KeyValue:
        if self.kv is None:
            raise RuntimeError("ShardManager.start() was not awaited")
        return self.kv

    async def _read(self) -> dict[str, tuple[bytes, int]]:
        """Every live key of the bucket with its value and revision (expired keys are gone)."""
        watcher = await self._kv().watch(f"{self.group}.>", ignore_deletes=True)
        entries: dict[str, tuple[bytes, int]] = {}
        try:
            while True:
                entry = await watcher.updates(timeout=max(2.0, self.interval_s))  # type: ignore[no-untyped-call]
                if entry is None:
                    break
                entries[entry.key] = (entry.value or b"", entry.revision or 0)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return entries

    async def _renew(self) -> None:
        now = time.monotonic()
        for shard, (revision, written) in list(self.owned.items()):
            try:
                new_revision = await self._kv().update(self.shard_key(shard), self.replica_id.encode(), last=revision)
            except KeyWrongLastSequenceError:
                # The lease expired and another replica took it: it owns the shard now.
                await self._lose(shard)
                continue
            except (NatsError, OSError) as exc:
                # Stop before the lease can expire under us (two missed renewals), so a shard is
                # never processed by two replicas for long.
                if now - written >= 2 * self.interval_s:
                    await self._lose(shard)
                log.warning("shard_renew_failed", shard=shard, error=str(exc) or type(exc).__name__)
                continue
            self.owned[shard] = (new_revision, now)

    async def _lose(self, shard: int) -> None:
        if self.owned.pop(shard, None) is not None:
            log.warning("shard_lease_lost", shard=shard, replica=self.replica_id)
            await self.on_release(shard, "lost")

    async def _take(self, shard: int, last: int | None, sequences: dict[str, int]) -> None:
        """Take a lease: `create` when the key is gone, `update(last)` of a released or adopted one."""
        kv = self._kv()
        value = self.replica_id.encode()
        try:
            if last is None:
                revision = await kv.create(self.shard_key(shard), value)
            else:
                revision = await kv.update(self.shard_key(shard), value, last=last)
        except KeyWrongLastSequenceError:
            return  # another replica was quicker
        self.owned[shard] = (revision, time.monotonic())
        log.info("shard_acquired", shard=shard, replica=self.replica_id)
        await self.on_acquire(shard, sequences)
