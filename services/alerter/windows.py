"""Alert rules over behaviour: a rule's matching calls aggregated per group over a sliding window.

    - name: checkout-errors
      condition: 'call.protocol == "http"'       # the calls that count
      group_by: 'call.dst.workload'
      window: 5m                                 # sliding, in the calls' own time
      aggregate: 'error_ratio > 0.05'            # count, rate, error_ratio, pNN/avg/max(elapsed)
      min_calls: 20                              # no judgement on fewer calls in the window
      for: 1m                                    # holding that long before it fires

An aggregate is `<measure> <op> <threshold>` with op one of > >= < <=:

- `count`: calls in the window; `rate`: calls per second over the window (`rate > 100/s`, or
  `/m`);
- `error_ratio`: the share of them whose outcome is OUTCOME_ERROR or OUTCOME_DEADLINE_EXCEEDED
  (`0.05` or `5%`);
- `p50(elapsed)` ... `p99.9(elapsed)`, `avg(elapsed)`, `max(elapsed)`: the calls' elapsed_ns,
  the threshold a duration (`500ms`, `1.5s`, `250us`).

As Prometheus alerting does, a group's condition is pending while it holds, fires once it has
held for `for` (at once without), stays firing without repeating while it holds, and is resolved
(an alert with `resolved` set, the same rule, group and firing) when it stops holding: a call
of the group or the passing of time (`sweep`) shows the window no longer holds.

Windows are kept per second: each second's count, errors, elapsed sum and maximum, and elapsed
in a histogram of log-spaced bins (5% apart), so a window costs at most its seconds' worth of
slots whatever the traffic, and percentiles are the bin's upper bound (within 5% of the
nearest-rank value). Groups are capped (`max_groups`); a group beyond the cap is not tracked,
and counted (`overflow`). Time is the calls' own (request timestamps), so a replayed capture
alerts as the live traffic would have.

Here the groups are in process (one alerter). With `alerter.redis` they are in Redis, shared
by the replicas and judged by the same `judge` (trawl.alerter.window_store).
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from trawl.v1 import calls_pb2

SECOND_NS = 1_000_000_000
ERRORS = frozenset({calls_pb2.OUTCOME_ERROR, calls_pb2.OUTCOME_DEADLINE_EXCEEDED})
_BIN_BASE = 1.05
_LOG_BASE = math.log(_BIN_BASE)
_OPS = {
    ">": lambda value, threshold: value > threshold,
    ">=": lambda value, threshold: value >= threshold,
    "<": lambda value, threshold: value < threshold,
    "<=": lambda value, threshold: value <= threshold,
}
_AGGREGATE = re.compile(
    r"^\s*(?P<measure>count|rate|error_ratio|(?P<stat>p\d{1,2}(?:\.\d+)?|avg|max)\(\s*elapsed\s*\))"
    r"\s*(?P<op>>=|<=|>|<)\s*(?P<threshold>\S+?)\s*$"
)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m)$")
_DURATION_NS = {"ns": 1.0, "us": 1e3, "µs": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9}
_EXAMPLES = "'error_ratio > 0.05', 'rate > 100/s', 'count >= 50', 'p99(elapsed) > 500ms'"


@dataclass(frozen=True, slots=True)
class Aggregate:
    """A window's measure and the comparison that makes the rule hold."""

    measure: Literal["count", "rate", "error_ratio", "quantile", "avg", "max"]
    op: str
    threshold: float  # calls, calls/s, a ratio, or nanoseconds
    quantile: float = 0.0
    text: str = ""

    def value(self, window: WindowStats, window_s: float) -> float:
        if self.measure == "count":
            return float(window.count)
        if self.measure == "rate":
            return window.count / window_s
        if self.measure == "error_ratio":
            return window.errors / window.count if window.count else 0.0
        if self.measure == "avg":
            return window.elapsed_sum / window.count if window.count else 0.0
        if self.measure == "max":
            return float(window.elapsed_max)
        return window.quantile(self.quantile)

    def holds(self, value: float) -> bool:
        return bool(_OPS[self.op](value, self.threshold))


def parse_aggregate(text: str) -> Aggregate | str:
    """The aggregate written in `text`, or why it is not one (a sentence with examples)."""
    found = _AGGREGATE.match(text)
    if found is None:
        return f"aggregate {text!r} is not '<measure> <op> <threshold>', e.g. {_EXAMPLES}"
    measure, op, raw = found.group("measure"), found.group("op"), found.group("threshold")
    stat = found.group("stat")
    if stat is None:
        threshold = _number(raw, measure)
        if isinstance(threshold, str):
            return threshold
        if measure == "error_ratio" and not 0 <= threshold <= 1:
            return f"error_ratio threshold {raw!r} must be between 0 and 1 (or 0% and 100%)"
        return Aggregate(measure, op, threshold, text=text.strip())  # type: ignore[arg-type]
    duration = _DURATION.match(raw)
    if duration is None:
        return f"threshold {raw!r} of {measure} must be a duration such as 500ms, 1.5s or 250us"
    nanoseconds = float(duration.group(1)) * _DURATION_NS[duration.group(2)]
    if stat in ("avg", "max"):
        return Aggregate(stat, op, nanoseconds, text=text.strip())  # type: ignore[arg-type]
    quantile = float(stat[1:]) / 100
    if not 0 < quantile < 1:
        return f"{stat} is not a percentile between p0 and p100 (e.g. p50, p99, p99.9)"
    return Aggregate("quantile", op, nanoseconds, quantile, text=text.strip())


def _number(raw: str, measure: str) -> float | str:
    scale = 1.0
    if measure == "rate":
        if raw.endswith("/s"):
            raw = raw[:-2]
        elif raw.endswith("/m"):
            raw, scale = raw[:-2], 1 / 60
    elif measure == "error_ratio" and raw.endswith("%"):
        raw, scale = raw[:-1], 0.01
    try:
        value = float(raw) * scale
    except ValueError:
        unit = {"rate": " (calls per second: 100/s, or per minute: 600/m)", "error_ratio": " (0.05 or 5%)"}
        return f"threshold {raw!r} of {measure} is not a number{unit.get(measure, '')}"
    if not math.isfinite(value) or value < 0:
        return f"threshold {raw!r} of {measure} must be a finite number, not negative"
    return value


@dataclass(frozen=True, slots=True)
class WindowSpec:
    window_s: float
    aggregate: Aggregate
    min_calls: int = 1
    for_s: float = 0.0


def _bin(elapsed_ns: int) -> int:
    return 0 if elapsed_ns <= 1 else math.ceil(math.log(elapsed_ns) / _LOG_BASE)


def _bin_upper(index: int) -> float:
    return 0.0 if index <= 0 else _BIN_BASE**index


@dataclass(slots=True)
class Slot:
    second: int
    count: int = 0
    errors: int = 0
    elapsed_sum: int = 0
    elapsed_max: int = 0
    bins: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True)
class WindowStats:
    count: int = 0
    errors: int = 0
    elapsed_sum: int = 0
    elapsed_max: int = 0
    bins: dict[int, int] = field(default_factory=dict)

    def quantile(self, q: float) -> float:
        """The nearest-rank quantile's bin upper bound (0 for an empty window)."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self.bins):
            seen += self.bins[index]
            if seen >= rank:
                return min(_bin_upper(index), float(self.elapsed_max))
        return float(self.elapsed_max)


class GroupWindow:
    """One group's calls over the last `window_s` seconds, a slot per second, and their totals.

    The totals (count, errors, elapsed sum, bins) follow each call added and each slot leaving, so
    judging a group after each call costs no walk over its slots and their bins (a 5 m window is
    300 slots: summing them per call made a windowed rule cost some 50 us a call); the maximum is
    looked for again only when a slot leaves."""

    __slots__ = ("bins", "count", "elapsed_max", "elapsed_sum", "errors", "slots", "window_s")

    def __init__(self, window_s: float, slots: Iterable[Slot] = ()) -> None:
        self.window_s = window_s
        self.slots: deque[Slot] = deque(slots)
        self.count = self.errors = self.elapsed_sum = self.elapsed_max = 0
        self.bins: dict[int, int] = {}
        for slot in self.slots:
            self.count += slot.count
            self.errors += slot.errors
            self.elapsed_sum += slot.elapsed_sum
            self.elapsed_max = max(self.elapsed_max, slot.elapsed_max)
            for index, count in slot.bins.items():
                self.bins[index] = self.bins.get(index, 0) + count

    def add(self, ts_ns: int, elapsed_ns: int, error: bool) -> None:
        second = ts_ns // SECOND_NS
        slot = self.slots[-1] if self.slots else None
        if slot is None or second > slot.second:
            slot = Slot(second)
            self.slots.append(slot)
        elif second < slot.second:
            # A call older than the newest second (calls come nearly in order): its own slot.
            position = len(self.slots)
            while position > 0 and self.slots[position - 1].second > second:
                position -= 1
            if position > 0 and self.slots[position - 1].second == second:
                slot = self.slots[position - 1]
            else:
                slot = Slot(second)
                self.slots.insert(position, slot)
        slot.count += 1
        slot.errors += error
        slot.elapsed_sum += elapsed_ns
        slot.elapsed_max = max(slot.elapsed_max, elapsed_ns)
        index = _bin(elapsed_ns)
        slot.bins[index] = slot.bins.get(index, 0) + 1
        self.count += 1
        self.errors += error
        self.elapsed_sum += elapsed_ns
        self.elapsed_max = max(self.elapsed_max, elapsed_ns)
        self.bins[index] = self.bins.get(index, 0) + 1

    def stats(self, now_ns: int) -> WindowStats:
        """The calls of the window ending at `now_ns` (older slots are dropped). Its bins are the
        window's own: read them before the next call is added."""
        oldest = (now_ns - int(self.window_s * SECOND_NS)) // SECOND_NS
        dropped = False
        while self.slots and self.slots[0].second <= oldest:
            slot = self.slots.popleft()
            dropped = True
            self.count -= slot.count
            self.errors -= slot.errors
            self.elapsed_sum -= slot.elapsed_sum
            for index, count in slot.bins.items():
                left = self.bins[index] - count
                if left:
                    self.bins[index] = left
                else:
                    del self.bins[index]
        if dropped:
            self.elapsed_max = max((slot.elapsed_max for slot in self.slots), default=0)
        return WindowStats(self.count, self.errors, self.elapsed_sum, self.elapsed_max, self.bins)


@dataclass(slots=True)
class GroupState:
    window: GroupWindow
    pending_since_ns: int | None = None
    firing_since_ns: int | None = None
    last_ns: int = 0
    value: float = 0.0
    calls: int = 0


class WindowStoreError(Exception):
    """Redis (windows shared between replicas) refused or is away: the batch's windows were not
    judged, and its calls are to come back."""


@dataclass(frozen=True, slots=True)
class Observation:
    """A windowed rule's matching call, as a group's window takes it."""

    rule: str
    spec: WindowSpec
    group: str
    ts_ns: int
    elapsed_ns: int
    outcome: int
    sequence: int = 0  # the call's stream sequence (0: unknown), by which a redelivery is told apart


@dataclass(frozen=True, slots=True)
class Transition:
    """A group that started firing (`resolved` False) or stopped (True)."""

    rule: str
    group: str
    firing_since_ns: int
    value: float
    calls: int
    resolved: bool
    at_ns: int  # when the window showed it


class Windows:
    """Every windowed rule's groups: observe calls, judge, report the transitions."""

    def __init__(self, max_groups: int = 10_000) -> None:
        self.max_groups = max_groups
        self.groups: dict[tuple[str, str], GroupState] = {}
        self.overflow = 0  # calls of groups not tracked (beyond max_groups)

    def observe(
        self, rule: str, spec: WindowSpec, group: str, ts_ns: int, elapsed_ns: int, outcome: int
    ) -> Transition | None:
        key = (rule, group)
        state = self.groups.get(key)
        if state is None:
            if len(self.groups) >= self.max_groups and not self._make_room(ts_ns):
                self.overflow += 1
                return None
            state = self.groups[key] = GroupState(GroupWindow(spec.window_s))
        state.window.add(ts_ns, elapsed_ns, outcome in ERRORS)
        return judge(rule, spec, group, state, max(ts_ns, state.last_ns))

    def sweep(self, specs: dict[str, WindowSpec], now_ns: int) -> list[Transition]:
        """Judge the groups due at `now_ns` (calls' time): windows drain as time passes, so a firing
        group with no new calls resolves here; groups with nothing left are forgotten. A group
        that is not due (`due_ns`) would judge as it did last, so it is not looked at."""
        transitions = []
        for key, state in list(self.groups.items()):
            spec = specs.get(key[0])
            if spec is None:
                del self.groups[key]
                continue
            if due_ns(spec, state) > now_ns:
                continue
            transition = judge(key[0], spec, key[1], state, max(now_ns, state.last_ns))
            if transition is not None:
                transitions.append(transition)
            if drained(state):
                del self.groups[key]
        return transitions

    def _make_room(self, now_ns: int) -> bool:
        """Forget one group whose window is empty and that is not firing, if any."""
        for key, state in self.groups.items():
            if state.firing_since_ns is None and not state.window.stats(now_ns).count:
                del self.groups[key]
                return True
        return False


def drained(state: GroupState) -> bool:
    """Nothing in the window and not firing: the group can be forgotten."""
    return not state.window.slots and state.firing_since_ns is None


def due_ns(spec: WindowSpec, state: GroupState) -> int:
    """The earliest calls' time at which judging the group may give another answer with no new
    call: its oldest second leaving the window, or its pending condition reaching `for`. A
    group with neither (nothing in the window) is due at once: resolved if firing, else forgotten."""
    due = None
    if state.window.slots:
        # stats() drops a slot once second <= (now - window) // 1s, that is now >= second*1s + window.
        due = state.window.slots[0].second * SECOND_NS + int(spec.window_s * SECOND_NS)
    if state.pending_since_ns is not None:
        pending = state.pending_since_ns + int(spec.for_s * SECOND_NS)
        due = pending if due is None else min(due, pending)
    return state.last_ns if due is None else due


def judge(rule: str, spec: WindowSpec, group: str, state: GroupState, now_ns: int) -> Transition | None:
    """The group's window at `now_ns`: pending, firing (a Transition), held, or resolved (a Transition)."""
    state.last_ns = now_ns
    stats = state.window.stats(now_ns)
    state.calls = stats.count
    holds = stats.count >= spec.min_calls and spec.aggregate.holds(value := spec.aggregate.value(stats, spec.window_s))
    if holds:
        state.value = value
        if state.firing_since_ns is not None:
            return None
        if state.pending_since_ns is None:
            state.pending_since_ns = now_ns
        if now_ns - state.pending_since_ns >= spec.for_s * SECOND_NS:
            state.firing_since_ns = now_ns
            state.pending_since_ns = None
            return Transition(rule, group, now_ns, state.value, stats.count, False, now_ns)
        return None
    state.pending_since_ns = None
    if state.firing_since_ns is None:
        return None
    since = state.firing_since_ns
    state.firing_since_ns = None
    value = spec.aggregate.value(stats, spec.window_s)
    return Transition(rule, group, since, value, stats.count, True, now_ns)
