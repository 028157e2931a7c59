"""Windowed rules' groups kept in Redis, so that alerter replicas share them.

With `alerter.redis` set, replicas consuming the same durable (each call goes to one of them)
judge one window per (rule, group), so a group fires once and resolves once whichever replica
saw which calls, and a replica killed or restarted forgets nothing. Without it the windows are
in-process (trawl.alerter.windows.Windows), which stays the default.

How, and why so:

- A group's state is the in-process one (GroupState: a slot per second with count, errors,
  elapsed sum and maximum, and elapsed in log bins 5% apart; pending and firing times), stored
  whole as one JSON value per group. Percentiles come from those bins, as in process: bounded by
  the bins (a few hundred at most) whatever the traffic, where a sample set would need its size
  bounded by dropping samples and would then differ from the in-process answer.
- It is judged by the same code as in process (windows.judge), on the state read from Redis,
  in an optimistic transaction: WATCH the groups a batch touches, read them (one MGET), observe
  the batch's calls in order and judge after each as the in-process window does, then MULTI:
  write them back, with the firing and resolution the judging decided. When another replica
  changed one of those groups meanwhile, EXEC fails, nothing is written, and the batch is read
  and judged again. So a transition is decided on the state every replica agrees on, and only
  the replica whose EXEC succeeded emits it: exactly one alert per firing and one resolution.
  A Lua script would have done it in one step too, but the judging would then be written
  twice (Python and Lua) and the in-process semantics kept equal by hand; here it is one code.
- Round trips: three per fetched batch (WATCH, MGET with ZCARD, MULTI/EXEC), not per call.
- A sorted set (`<prefix>:due`) holds every group by the calls' time at which it is next due
  (windows.due_ns: its oldest second leaving the window, or its `for` elapsing), so a sweep
  reads only the groups that may change, and its size is the group count (capped at
  max_groups, beyond which calls are not tracked and counted, as in process; across replicas
  the cap may be passed by the groups of batches judged at the same moment).
- Each state expires (TTL) a while after its last write: `2 x (window + for) + 60 s` of wall
  time, far after its window has drained, so a group nobody sweeps any more (every replica
  gone) does not stay forever.
- An alert decided in Redis must not be lost when its replica dies before NATS stores it: the
  same MULTI puts it (serialized) in an outbox (`<prefix>:outbox`, claimed until now +
  claim_s in `<prefix>:outbox:due`); once stored, the replica removes it (`announced`). Any
  replica's sweep takes the entries whose claim has run out and announces them again, with
  their ids, which JetStream stores once.
- A per-call rule's `cooldown` is shared too (`claim_cooldowns`): the replica that fires a
  (rule, group) holds `<prefix>:cd:<member>` with the call time it fired at and the alert's id,
  and another replica's alert for that group within the cooldown (in the calls' time, as in
  process) is suppressed. Compared and set in one step by a short Lua script: there is no
  judging to keep equal to Python's here, and one step a claim keeps it to one round trip a
  batch. The same alert made again (its batch nak'd and judged again) holds the claim it made.
- A call redelivered after its batch was judged (its replica was killed before the ack, or NATS
  refused an alert and the batch was nak'd) must not be counted twice: the same MULTI sets a
  bit per stream sequence judged (`<prefix>:seen:<stream>:<chunk>`, 8 KiB per 65,536 calls,
  kept an hour), and a batch's calls whose bit is set are left out of the windows.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import Any, cast

import redis

from trawl.alerter.config import WindowRedisSettings
from trawl.alerter.windows import (
    ERRORS,
    GroupState,
    GroupWindow,
    Observation,
    Slot,
    Transition,
    WindowSpec,
    WindowStoreError,
    drained,
    due_ns,
    judge,
)
from trawl.logs import get_logger
from trawl.v1 import alerts_pb2

log = get_logger(__name__)

MAX_ATTEMPTS = 50  # optimistic transactions of one batch before it is given up (and nak'd)
SWEEP_MAX = 1_000  # due groups judged per sweep; the rest on the next one
OUTBOX_MAX = 100
# Calls judged, by stream sequence: a bit each, this many a key (8 KiB), kept an hour after their
# last write (a redelivery comes after the ack wait, 30 s, or a replica's restart).
SEEN_CHUNK = 65_536
SEEN_TTL_S = 3600
# A per-call rule's cooldown claim. KEYS[1]: the (rule, group)'s claim; ARGV: the alert id, the
# call's time (ns), the cooldown (ns), how long Redis keeps the claim (ms, wall time). Answers
# {1 granted / 0 held by another alert, the call time the holder fired at}. Lua's numbers are
# doubles: call times compare to within 256 ns, and the time given back is the stored text.
_CLAIM_COOLDOWN = """
local held = redis.call('GET', KEYS[1])
if held then
  local at, id = string.match(held, '^(%d+) (.*)$')
  if id == ARGV[1] then return {1, at} end
  if at and tonumber(ARGV[2]) - tonumber(at) < tonumber(ARGV[3]) then return {0, at} end
end
redis.call('SET', KEYS[1], ARGV[2] .. ' ' .. ARGV[1], 'PX', ARGV[4])
return {1, ARGV[2]}
"""


# Renders a transition as the alert that announces it (the outbox keeps it serialized).
Render = Callable[[Transition], alerts_pb2.Alert]


def encode_state(state: GroupState) -> bytes:
    slots = [
        [slot.second, slot.count, slot.errors, slot.elapsed_sum, slot.elapsed_max, [*chain(*slot.bins.items())]]
        for slot in state.window.slots
    ]
    document = [state.pending_since_ns, state.firing_since_ns, state.last_ns, state.value, state.calls, slots]
    return json.dumps(document, separators=(",", ":")).encode()


def decode_state(blob: bytes, window_s: float) -> GroupState:
    pending, firing, last_ns, value, calls, slots = json.loads(blob)
    window = GroupWindow(
        window_s,
        (
            Slot(second, count, errors, elapsed_sum, elapsed_max, dict(zip(bins[::2], bins[1::2], strict=True)))
            for second, count, errors, elapsed_sum, elapsed_max, bins in slots
        ),
    )
    return GroupState(window, pending, firing, last_ns, value, calls)


# The newest call time any replica judged, and the wall-clock time it was judged at, raised only:
# ns of equal length compare as strings do (exactly, where Lua's numbers would round them).
_CLOCK_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current then
  local ns = string.match(current, '^(%d+)')
  if #ns > #ARGV[1] or (#ns == #ARGV[1] and ns >= ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2], 'EX', ARGV[3])
return 1
"""
CLOCK_TTL_S = 86_400

_MARK_SCRIPT = """
for offset in string.gmatch(ARGV[1], '%d+') do redis.call('SETBIT', KEYS[1], offset, 1) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
"""


def _by_chunk(sequences: Iterable[int]) -> dict[int, list[int]]:
    """Sequences by the key of their bit (their chunk), as sorted offsets in it."""
    chunks: dict[int, list[int]] = {}
    for sequence in sorted(sequences):
        chunks.setdefault(sequence // SEEN_CHUNK, []).append(sequence % SEEN_CHUNK)
    return chunks


def _member(rule: str, group: str) -> str:
    return json.dumps([rule, group], ensure_ascii=False, separators=(",", ":"))


class SharedWindows:
    """Windowed rules' groups in Redis, judged as trawl.alerter.windows.Windows judges them."""

    def __init__(
        self,
        client: redis.Redis,
        key_prefix: str = "trawl:alerter",
        max_groups: int = 100_000,
        claim_s: float = 15.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.prefix = key_prefix
        self.max_groups = max_groups
        self.claim_s = claim_s
        self.clock = clock
        self.due_key = f"{key_prefix}:due"
        self.outbox_key = f"{key_prefix}:outbox"
        self.outbox_due_key = f"{key_prefix}:outbox:due"
        self.clock_key = f"{key_prefix}:clock"
        self.overflow = 0  # calls of groups not tracked (beyond max_groups)
        self.conflicts = 0  # transactions tried again because another replica wrote a group meanwhile
        self.groups = 0  # the group count Redis gave last
        # Which incarnation of TRAWL_ENRICHED the stream sequences are of (its creation time): a
        # stream made again numbers from 1, and its sequences must not read as judged already.
        self.stream_id = ""
        self._claim = client.register_script(_CLAIM_COOLDOWN)

    def _key(self, member: str) -> str:
        return f"{self.prefix}:g:{member}"

    def claim_cooldowns(self, claims: Sequence[tuple[str, str, str, int, float]]) -> list[tuple[bool, int]]:
        """Each (rule, group, alert id, call time ns, cooldown s): (granted, the call time of the
        alert holding the group's cooldown), in one round trip. WindowStoreError when Redis is away."""
        if not claims:
            return []
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for rule, group, alert_id, at_ns, cooldown_s in claims:
                    # Kept in Redis a while beyond the cooldown (wall time; judged in call time).
                    keep_ms = int(max(2 * cooldown_s, cooldown_s + 60) * 1000)
                    self._claim(
                        keys=[f"{self.prefix}:cd:{_member(rule, group)}"],
                        args=[alert_id, at_ns, int(cooldown_s * 1e9), keep_ms],
                        client=pipe,
                    )
                answers = cast("list[list[Any]]", pipe.execute())
        except redis.RedisError as exc:
            raise WindowStoreError(f"redis: {exc}") from exc
        return [(bool(granted), int(at)) for granted, at in answers]

    def observe_batch(
        self, observations: list[Observation], render: Render
    ) -> list[tuple[Transition, alerts_pb2.Alert]]:
        """Add a batch's calls to their groups and judge after each one, in order, as
        Windows.observe does call by call; the transitions this replica is to announce."""
        if not observations:
            return []
        names: dict[tuple[str, str], str] = {}  # one JSON member a group, not one a call
        for o in observations:
            if (o.rule, o.group) not in names:
                names[(o.rule, o.group)] = _member(o.rule, o.group)
        members = list(names.values())
        specs = {names[(o.rule, o.group)]: o.spec for o in observations}

        sequences = sorted({o.sequence for o in observations if o.sequence})

        def compute(states: dict[str, GroupState | None], count: int, seen: set[int]) -> tuple[list[Transition], int]:
            transitions: list[Transition] = []
            created = overflow = 0
            for o in observations:
                if o.sequence in seen:
                    continue  # a redelivered call whose batch another life of this consumer judged
                member = names[(o.rule, o.group)]
                state = states[member]
                if state is None:
                    if count + created >= self.max_groups:
                        overflow += 1
                        continue
                    state = states[member] = GroupState(GroupWindow(o.spec.window_s))
                    created += 1
                state.window.add(o.ts_ns, o.elapsed_ns, o.outcome in ERRORS)
                transition = judge(o.rule, o.spec, o.group, state, max(o.ts_ns, state.last_ns))
                if transition is not None:
                    transitions.append(transition)
            return transitions, overflow

        newest = max(o.ts_ns for o in observations)
        transitions, overflow = self._transact(members, specs, compute, render, sequences, newest)
        self.overflow += overflow
        return transitions

    def sweep(
        self, specs: dict[str, WindowSpec], now_ns: int, render: Render
    ) -> list[tuple[Transition, alerts_pb2.Alert]]:
        """Judge the groups due at `now_ns` (calls' time), as Windows.sweep does."""
        try:
            due = self.client.zrangebyscore(self.due_key, "-inf", now_ns, start=0, num=SWEEP_MAX)
        except redis.RedisError as exc:
            raise WindowStoreError(f"redis: {exc}") from exc
        members = [bytes(member).decode() for member in cast("list[bytes]", due)]
        if not members:
            return []
        known = {member: specs.get(json.loads(member)[0]) for member in members}
        live = [member for member, spec in known.items() if spec is not None]
        gone = [member for member, spec in known.items() if spec is None]  # rules no longer configured: forgotten

        def compute(states: dict[str, GroupState | None], count: int, seen: set[int]) -> tuple[list[Transition], int]:
            transitions: list[Transition] = []
            for member in live:
                state = states[member]
                if state is None:
                    continue  # expired: forgotten below
                rule, group = json.loads(member)
                spec = known[member]
                assert spec is not None
                transition = judge(rule, spec, group, state, max(now_ns, state.last_ns))
                if transition is not None:
                    transitions.append(transition)
            return transitions, 0

        transitions, _ = self._transact(live + gone, {m: s for m, s in known.items() if s}, compute, render)
        return transitions

    def _transact(
        self,
        members: list[str],
        specs: dict[str, WindowSpec],
        compute: Callable[[dict[str, GroupState | None], int, set[int]], tuple[list[Transition], int]],
        render: Render,
        sequences: Sequence[int] = (),
        newest_ns: int = 0,
    ) -> tuple[list[tuple[Transition, alerts_pb2.Alert]], int]:
        keys = [self._key(member) for member in members]
        for attempt in range(MAX_ATTEMPTS):
            try:
                with self.client.pipeline(transaction=True) as pipe:
                    pipe.watch(*keys)  # type: ignore[no-untyped-call]
                    blobs = cast("list[bytes | None]", pipe.mget(keys))
                    count = int(pipe.zcard(self.due_key))
                    states: dict[str, GroupState | None] = {}
                    for member, blob in zip(members, blobs, strict=True):
                        spec = specs.get(member)
                        states[member] = decode_state(blob, spec.window_s) if blob and spec else None
                    seen = self._seen(pipe, sequences)
                    transitions, overflow = compute(states, count, seen)
                    announced = [(transition, render(transition)) for transition in transitions]
                    pipe.multi()
                    self._write(pipe, states, specs)
                    self._mark(pipe, [sequence for sequence in sequences if sequence not in seen])
                    if newest_ns:
                        pipe.eval(_CLOCK_SCRIPT, 1, self.clock_key, str(newest_ns), repr(self.clock()), CLOCK_TTL_S)
                    if announced:
                        claim = self.clock() + self.claim_s
                        pipe.hset(self.outbox_key, mapping={a.id: a.SerializeToString() for _, a in announced})
                        pipe.zadd(self.outbox_due_key, {a.id: claim for _, a in announced})
                    pipe.zcard(self.due_key)
                    replies = pipe.execute()
                    self.groups = int(replies[-1])
                    return announced, overflow
            except redis.WatchError:
                self.conflicts += 1
                time.sleep(random.uniform(0, 0.001 * min(attempt + 1, 10)))  # jitter, so that conflicting replicas part
            except redis.RedisError as exc:
                raise WindowStoreError(f"redis: {exc}") from exc
        raise WindowStoreError(f"{MAX_ATTEMPTS} conflicting transactions in a row on {len(keys)} groups")

    def _seen_key(self, chunk: int) -> str:
        return f"{self.prefix}:seen:{self.stream_id}:{chunk}"

    def _seen(self, pipe: Any, sequences: Sequence[int]) -> set[int]:
        """Of these stream sequences, those whose calls are in the windows already (read at once,
        before MULTI): a bit per sequence, SEEN_CHUNK sequences a key; the bytes that cover a
        chunk's sequences in one GETRANGE (a batch's sequences are nearly consecutive)."""
        seen: set[int] = set()
        for chunk, offsets in _by_chunk(sequences).items():
            first = offsets[0] // 8
            data = bytes(pipe.getrange(self._seen_key(chunk), first, offsets[-1] // 8))
            for offset in offsets:
                byte = offset // 8 - first
                # SETBIT's order: bit 0 of a key is the most significant bit of its first byte.
                if byte < len(data) and data[byte] & (0x80 >> (offset % 8)):
                    seen.add(chunk * SEEN_CHUNK + offset)
        return seen

    def _mark(self, pipe: Any, sequences: list[int]) -> None:
        """Mark these sequences judged, in the transaction that writes their calls' groups: a
        script setting each bit (bit by bit: another replica's calls share the bytes), with the
        offsets in one argument rather than four arguments a bit."""
        for chunk, offsets in _by_chunk(sequences).items():
            pipe.eval(_MARK_SCRIPT, 1, self._seen_key(chunk), ",".join(map(str, offsets)), SEEN_TTL_S)

    def _write(
        self,
        pipe: Any,
        states: dict[str, GroupState | None],
        specs: dict[str, WindowSpec],
    ) -> None:
        for member, state in states.items():
            spec = specs.get(member)
            if state is None or spec is None or drained(state):
                pipe.delete(self._key(member))
                pipe.zrem(self.due_key, member)
                continue
            ttl = int(2 * (spec.window_s + spec.for_s)) + 60
            pipe.set(self._key(member), encode_state(state), ex=ttl)
            pipe.zadd(self.due_key, {member: due_ns(spec, state)})

    def newest(self) -> tuple[int, float]:
        """The newest call time any replica judged, and the wall-clock time then ((0, 0.0): none):
        how a replica that has seen no call yet (just restarted) sweeps while none comes."""
        try:
            value = self.client.get(self.clock_key)
        except redis.RedisError as exc:
            raise WindowStoreError(f"redis: {exc}") from exc
        if not value:
            return 0, 0.0
        ns, wall = bytes(cast("bytes", value)).split()
        return int(ns), float(wall)

    def unannounced(self) -> list[alerts_pb2.Alert]:
        """Alerts decided in Redis whose announcing replica has not said they are stored within
        claim_s (it died, or NATS refused them): claimed again, to be announced here."""
        now = self.clock()
        try:
            due = self.client.zrangebyscore(self.outbox_due_key, "-inf", now, start=0, num=OUTBOX_MAX)
            ids = cast("list[bytes]", due)
            if not ids:
                return []
            blobs = cast("list[bytes | None]", self.client.hmget(self.outbox_key, ids))
            self.client.zadd(self.outbox_due_key, {alert_id: now + self.claim_s for alert_id in ids}, xx=True)
        except redis.RedisError as exc:
            raise WindowStoreError(f"redis: {exc}") from exc
        return [alerts_pb2.Alert.FromString(blob) for blob in blobs if blob]

    def announced(self, ids: Iterable[str]) -> None:
        """These alerts are stored: out of the outbox."""
        ids = list(ids)
        if not ids:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hdel(self.outbox_key, *ids)
                pipe.zrem(self.outbox_due_key, *ids)
                pipe.execute()
        except redis.RedisError as exc:
            # Left in the outbox: announced again after claim_s, stored once (same ids).
            log.warning("alerter_window_outbox_failed", error=str(exc), alerts=len(ids))


def shared_windows(settings: WindowRedisSettings | None, max_groups: int = 100_000) -> SharedWindows | None:
    """The Redis-shared windows `alerter.redis` asks for, or None (in-process windows)."""
    if settings is None:
        return None
    client = redis.Redis.from_url(
        settings.url, socket_timeout=settings.timeout_s, socket_connect_timeout=settings.timeout_s
    )
    return SharedWindows(client, settings.key_prefix, max_groups, settings.claim_s)
