"""Rule evaluation without a bus: an enriched ApiCall in, the alerts it raises out.

Cooldown and dedup are per (rule, group), in process; the group is the rule's `group_by`
value ("" without one). Cooldown is measured in the calls' own time so a replayed capture
alerts as the live traffic did. An alert's id is derived from (rule, group, call id): a
redelivered call produces the same id, which JetStream's Nats-Msg-Id dedup stores once.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import celpy
from celpy import celtypes
from celpy.evaluation import CELEvalError
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from trawl.alerter.compiled import CelError, Evaluator, Fallback
from trawl.alerter.guards import OUTCOME_NAMES, admits_outcome
from trawl.alerter.rules import Rule
from trawl.alerter.windows import SECOND_NS, Observation, Transition, Windows, WindowStoreError
from trawl.logs import get_logger
from trawl.metrics import Registry
from trawl.v1 import alerts_pb2, calls_pb2

if TYPE_CHECKING:  # redis is imported only when windows are shared
    from trawl.alerter.window_store import SharedWindows

log = get_logger(__name__)

# A rule a call's protocol leaves: the outcomes its guard allows (None: any), its compiled condition.
_Candidate = tuple[Rule, frozenset[str] | None, Evaluator | None]

_INT64_MAX = (1 << 63) - 1
_INT_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def call_to_cel(call: calls_pb2.ApiCall) -> celtypes.MapType:
    """The `call` a condition sees: proto field names as keys, CEL-native values (see rules.py)."""
    return _message(call)


_Converter = Callable[[Any], Any]
# Per message type: (CEL key, field name, in a oneof, value converter), built once per type.
_PLANS: dict[str, list[tuple[celtypes.StringType, str, bool, _Converter]]] = {}


def _message(message: Message) -> celtypes.MapType:
    descriptor = message.DESCRIPTOR
    plan = _PLANS.get(descriptor.full_name)
    if plan is None:
        fields = cast("list[FieldDescriptor]", descriptor.fields)
        plan = [(celtypes.StringType(fd.name), fd.name, fd.containing_oneof is not None, _field(fd)) for fd in fields]
        _PLANS[descriptor.full_name] = plan
    out: dict[Any, Any] = {}
    for key, name, in_oneof, convert in plan:
        if in_oneof and not message.HasField(name):
            continue
        out[key] = convert(getattr(message, name))
    return celtypes.MapType(out)


def _field(fd: FieldDescriptor) -> _Converter:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        key = _item(fd.message_type.fields_by_name["key"])
        value = _item(fd.message_type.fields_by_name["value"])
        return lambda entries: celtypes.MapType({key(k): value(v) for k, v in entries.items()})
    item = _item(fd)
    if fd.is_repeated:
        return lambda items: celtypes.ListType([item(x) for x in items])
    return item


def _item(fd: FieldDescriptor) -> _Converter:
    if fd.message_type is not None:
        return _message
    if fd.enum_type is not None:
        names = {member.number: celtypes.StringType(member.name) for member in fd.enum_type.values}
        return lambda number: names.get(number) or celtypes.StringType(str(number))
    if fd.type in _INT_TYPES:
        return _int
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return celtypes.BoolType
    if fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return celtypes.DoubleType
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return celtypes.BytesType
    return celtypes.StringType


def _int(value: int) -> celtypes.IntType | celtypes.UintType:
    # CEL's int is 64-bit signed: a uint64 beyond it stays a (CEL) uint rather than failing.
    return celtypes.IntType(value) if value <= _INT64_MAX else celtypes.UintType(value)


def alert_id(rule: str, group: str, call_id: str) -> str:
    return hashlib.sha256(f"{rule}\0{group}\0{call_id}".encode()).hexdigest()[:32]


def call_time_ns(call: calls_pb2.ApiCall, clock: Callable[[], float]) -> int:
    return int(call.request.ts or call.response.ts or clock() * 1_000_000_000)


class Alerter:
    """Evaluates every rule on each call; remembers when each (rule, group) last fired."""

    def __init__(
        self,
        rules: list[Rule],
        metrics: Registry | None = None,
        *,
        clock: Callable[[], float] = time.time,
        max_groups: int = 100_000,
        guards: bool = True,
        compiled: bool = True,
        window_store: SharedWindows | None = None,
    ) -> None:
        self.rules = rules
        # Rules' guards (trawl.alerter.guards) skip a rule a call cannot match, and the call's
        # CEL map is only made for a rule that may; off, every rule runs (the reference).
        self.guards = guards
        # Conditions and group_by compiled to Python functions of the call (trawl.alerter.compiled) where
        # they can be; off, cel-python runs every one (the reference).
        self.compiled = compiled
        self.clock = clock
        self.max_groups = max_groups
        self._last_fired: dict[tuple[str, str], int] = {}
        self._logged_errors: set[str] = set()
        metrics = metrics or Registry()
        self._calls = metrics.counter("trawl_alerter_calls_total", "Enriched calls evaluated")
        self._alerts = metrics.counter("trawl_alerter_alerts_total", "Alerts raised, per rule")
        self._suppressed = metrics.counter("trawl_alerter_suppressed_total", "Matches suppressed by cooldown, per rule")
        self._errors = metrics.counter(
            "trawl_alerter_rule_errors_total", "Rule evaluations that failed (missing field, type error), per rule"
        )
        # Windowed rules (trawl.alerter.windows): their groups, judged as calls come and as time passes.
        self.windows = Windows(max_groups)
        # Shared through Redis (trawl.alerter.window_store): the windowed rules' observations of a
        # batch wait here until `flush` judges them in one transaction; None: in-process.
        self.shared = window_store
        self._by_protocol: dict[str, list[_Candidate]] = {}
        self._observations: list[Observation] = []
        # Per-call alerts waiting for their shared cooldown's claim: (alert, call time ns, cooldown s).
        self._claims: list[tuple[alerts_pb2.Alert, int, float]] = []
        self._window_specs = {rule.name: rule.window for rule in rules if rule.window is not None}
        self._rules_by_name = {rule.name: rule for rule in rules}
        self._last_calls: dict[tuple[str, str], calls_pb2.ApiCall] = {}  # the last call of each windowed group
        self._swept_ns = 0
        self._latest = (0, 0.0)  # the newest call time seen, and the wall-clock time it came
        self._resolved = metrics.counter("trawl_alerter_resolved_total", "Windowed alerts resolved, per rule")
        self._window_groups = metrics.gauge("trawl_alerter_window_groups", "Groups of windowed rules tracked")
        self._window_overflow = metrics.counter(
            "trawl_alerter_window_overflow_total", "Calls of windowed rules' groups beyond max_groups, not tracked"
        )
        self._reannounced = metrics.counter(
            "trawl_alerter_window_reannounced_total",
            "Windowed alerts decided in Redis that their replica did not store in time, announced again here",
        )
        self._conflicts = metrics.counter(
            "trawl_alerter_window_conflicts_total", "Redis window transactions judged again (another replica wrote)"
        )

    def evaluate(self, call: calls_pb2.ApiCall, sequence: int = 0) -> list[alerts_pb2.Alert]:
        """The alerts `call` raises. `sequence`, its stream sequence, lets windows shared through
        Redis leave out a call redelivered after its batch was judged (0: unknown)."""
        self._calls.inc()
        if not self.rules:
            return []
        # The hot path (every call, every rule its protocol leaves): no CEL map, no call time and
        # no guard object until a rule needs them; a microsecond a call in `trawl up`.
        activation: _Activation | None = None
        now_ns = 0
        outcome: str | None = None
        alerts: list[alerts_pb2.Alert] = []
        for rule, outcomes, fast in self._rules_for(call.protocol):
            if outcomes is not None:
                if outcome is None:
                    outcome = OUTCOME_NAMES.get(call.outcome, "")
                if not admits_outcome(outcomes, outcome):
                    continue
            matched: object = None
            if fast is not None:
                try:
                    matched = fast(call)
                except Fallback:
                    pass  # cel-python's to judge, below
                except CelError:
                    self._error(rule, call, "condition", _NO_SUCH_KEY)
                    continue
                if matched is False:
                    continue
            if activation is None:
                activation = _Activation(call)
            if matched is not True and not self._condition_cel(rule, activation, call):
                continue
            if not now_ns:
                now_ns = call_time_ns(call, self.clock)
            group = self._group(rule, activation, call)
            if rule.window is not None:
                alerts += self._observe(rule, group, call, now_ns, sequence)
                continue
            key = (rule.name, group)
            last = self._last_fired.get(key)
            if last is not None and rule.cooldown_s > 0 and now_ns - last < rule.cooldown_s * 1e9:
                self._suppressed.inc(rule=rule.name)
                continue
            self._remember(key, now_ns)
            alert = alerts_pb2.Alert(
                id=alert_id(rule.name, group, call.id),
                rule=rule.name,
                severity=rule.severity,
                summary=rule.summary.render(call),
                fired_at=int(self.clock() * 1_000_000_000),
                group=group,
                labels=rule.labels,
                call=call,
            )
            if self.shared is not None and rule.cooldown_s > 0:
                # Replicas share the cooldown: claimed in Redis with the batch (`flush`).
                self._claims.append((alert, now_ns, rule.cooldown_s))
                continue
            self._alerts.inc(rule=rule.name)
            alerts.append(alert)
        if self._window_specs:
            if not now_ns:
                now_ns = call_time_ns(call, self.clock)
            self._latest = (max(self._latest[0], now_ns), self.clock())
            if self.shared is None and now_ns - self._swept_ns >= SECOND_NS:
                alerts += self.sweep(now_ns)
        return alerts

    def _rules_for(self, protocol: str) -> list[_Candidate]:
        """The rules a call of `protocol` may match, in their order, each with the outcomes its
        guard allows (None: any) and its compiled condition: a call of one protocol is not checked
        against the guards of every other protocol's rules (a dict lookup, where ten guard checks
        cost a microsecond or two a call). With guards off, every rule, unguarded."""
        candidates = self._by_protocol.get(protocol)
        if candidates is None:
            candidates = [
                (
                    rule,
                    rule.guard.outcomes if self.guards and rule.guard is not None else None,
                    rule.compiled_condition if self.compiled else None,
                )
                for rule in self.rules
                if not self.guards
                or rule.guard is None
                or rule.guard.protocols is None
                or protocol in rule.guard.protocols
            ]
            if len(self._by_protocol) < 256:  # protocols are the dissectors' few names; bounded anyway
                self._by_protocol[protocol] = candidates
        return candidates

    def flush(self) -> list[alerts_pb2.Alert]:
        """With windows in Redis: judge the windowed observations `evaluate` kept since the last
        flush (one transaction), and sweep when the calls' time has moved on a second; the alerts
        this replica is to announce. In-process, `evaluate` judged them already: nothing.
        Raises WindowStoreError when Redis is away (the observations are dropped: the batch's
        calls are to come back)."""
        if self.shared is None:
            return []
        observations, self._observations = self._observations, []
        alerts = self._claimed()
        overflow, conflicts = self.shared.overflow, self.shared.conflicts
        try:
            decided = self.shared.observe_batch(observations, self._render)
        except WindowStoreError:
            for alert in alerts:  # claimed, but the batch comes back: made again (and claimed: same id)
                self.forget(alert)
            raise
        finally:
            self._conflicts.inc(self.shared.conflicts - conflicts)
        self._window_overflow.inc(self.shared.overflow - overflow)
        alerts += [self._counted(transition, alert) for transition, alert in decided]
        newest = self._latest[0]
        if newest and newest - self._swept_ns >= SECOND_NS:
            # The batch's own alerts are decided (and in the outbox): a sweep Redis refuses now is
            # done on a later batch, without sending these calls back.
            with contextlib.suppress(WindowStoreError):
                alerts += self.sweep(newest)
        self._window_groups.set(self.shared.groups)
        return alerts

    def _claimed(self) -> list[alerts_pb2.Alert]:
        """The per-call alerts whose cooldown this replica claimed in Redis (the others are
        suppressed, and this replica's cooldown for the group starts when the holder's did)."""
        claims, self._claims = self._claims, []
        if not claims or self.shared is None:
            return []
        try:
            answers = self.shared.claim_cooldowns(
                [(alert.rule, alert.group, alert.id, at_ns, cooldown_s) for alert, at_ns, cooldown_s in claims]
            )
        except WindowStoreError:
            for alert, _, _ in claims:  # the batch comes back: its alerts are made again then
                self.forget(alert)
            raise
        granted = []
        for (alert, _, _), (claimed, held_ns) in zip(claims, answers, strict=True):
            if claimed:
                self._alerts.inc(rule=alert.rule)
                granted.append(alert)
            else:
                self._suppressed.inc(rule=alert.rule)
                self._last_fired[(alert.rule, alert.group)] = held_ns
        return granted

    def announced(self, alerts: list[alerts_pb2.Alert]) -> None:
        """These alerts are stored (in NATS): with windows in Redis, out of its outbox."""
        if self.shared is not None:
            self.shared.announced(alert.id for alert in alerts if alert.window_calls or alert.resolved)

    def _observe(
        self, rule: Rule, group: str, call: calls_pb2.ApiCall, now_ns: int, sequence: int = 0
    ) -> list[alerts_pb2.Alert]:
        assert rule.window is not None
        if self.shared is not None:
            observation = Observation(rule.name, rule.window, group, now_ns, call.elapsed_ns, call.outcome, sequence)
            self._observations.append(observation)
            key = (rule.name, group)
            self._last_calls.pop(key, None)  # the newest last: the oldest is the first forgotten
            self._last_calls[key] = call
            if len(self._last_calls) > self.max_groups:
                del self._last_calls[next(iter(self._last_calls))]
            return []
        overflow = self.windows.overflow
        transition = self.windows.observe(rule.name, rule.window, group, now_ns, call.elapsed_ns, call.outcome)
        if self.windows.overflow > overflow:
            self._window_overflow.inc()
            return []
        self._last_calls[(rule.name, group)] = call
        self._window_groups.set(len(self.windows.groups))
        return [] if transition is None else [self._window_alert(transition)]

    def sweep(self, now_ns: int) -> list[alerts_pb2.Alert]:
        """Judge every windowed group at `now_ns` (the calls' time): the resolutions of groups
        whose window drained with no new call, and firings that waited for their `for`."""
        self._swept_ns = now_ns
        if self.shared is not None:
            decided = self.shared.sweep(self._window_specs, now_ns, self._render)
            alerts = [self._counted(transition, alert) for transition, alert in decided]
            again = self.shared.unannounced()
            self._reannounced.inc(len(again))
            return alerts + again
        alerts = [self._window_alert(transition) for transition in self.windows.sweep(self._window_specs, now_ns)]
        for key in [key for key in self._last_calls if key not in self.windows.groups]:
            del self._last_calls[key]
        self._window_groups.set(len(self.windows.groups))
        return alerts

    def sweep_idle(self, wall_s: float) -> list[alerts_pb2.Alert]:
        """`sweep` while no call comes: the calls' time taken to have gone on as the clock has
        since the newest call (a live capture's calls are stamped with the clock)."""
        newest_ns, seen_at = self._latest
        if self.shared is not None and self._window_specs:
            # The replicas' newest call, which may be newer than this one's (or this one, just
            # restarted, has seen none): groups resolve and the outbox is read all the same.
            newest_ns, seen_at = max((newest_ns, seen_at), self.shared.newest())
        if not self._window_specs or not newest_ns:
            return []
        return self.sweep(newest_ns + int((wall_s - seen_at) * SECOND_NS))

    def _window_alert(self, transition: Transition) -> alerts_pb2.Alert:
        return self._counted(transition, self._render(transition))

    def _counted(self, transition: Transition, alert: alerts_pb2.Alert) -> alerts_pb2.Alert:
        if transition.resolved:
            self._resolved.inc(rule=transition.rule)
        else:
            self._alerts.inc(rule=transition.rule)
        return alert

    def _render(self, transition: Transition) -> alerts_pb2.Alert:
        rule = self._rules_by_name[transition.rule]
        call = self._last_calls.get((transition.rule, transition.group))
        summary = rule.summary.render(call) if call is not None else ""
        firing = f"{transition.firing_since_ns}"
        if transition.resolved:
            firing += "/resolved"
            summary = f"resolved: {summary}"
        alert = alerts_pb2.Alert(
            id=alert_id(rule.name, transition.group, firing),
            rule=rule.name,
            severity=rule.severity,
            summary=summary,
            fired_at=transition.firing_since_ns,
            group=transition.group,
            labels=rule.labels,
            value=transition.value,
            window_calls=transition.calls,
            resolved=transition.resolved,
        )
        if transition.resolved:
            alert.resolved_at = transition.at_ns
        if call is not None:
            alert.call.CopyFrom(call)
        return alert

    def forget(self, alert: alerts_pb2.Alert) -> None:
        """Undo the cooldown an alert started, when it could not be published (it will be retried);
        for a windowed rule, undo the firing or the resolution, so that it is reported again."""
        self._last_fired.pop((alert.rule, alert.group), None)
        if self.shared is not None:
            return  # a windowed alert stays in Redis's outbox until stored: announced again after claim_s
        state = self.windows.groups.get((alert.rule, alert.group))
        if state is not None and (alert.window_calls or alert.resolved):
            state.firing_since_ns = alert.fired_at if alert.resolved else None

    def _condition_cel(self, rule: Rule, activation: _Activation, call: calls_pb2.ApiCall) -> bool:
        """The condition as cel-python judges it (what the compiled form left to it)."""
        result = self._run(rule, rule.program, activation.get(), call, "condition")
        if result is None:
            return False
        if not isinstance(result, bool | celtypes.BoolType):
            self._error(rule, call, "condition", f"gave a {type(result).__name__}, not a bool")
            return False
        return bool(result)

    def _group(self, rule: Rule, activation: _Activation, call: calls_pb2.ApiCall) -> str:
        if rule.group_by is None:
            return ""
        fast = rule.compiled_group_by if self.compiled else None
        if fast is not None:
            try:
                value = fast(call)
            except Fallback:
                pass
            except CelError:
                self._error(rule, call, "group_by", _NO_SUCH_KEY)
                return ""
            else:
                if not isinstance(value, bool):
                    return str(value)
        result = self._run(rule, rule.group_by, activation.get(), call, "group_by")
        return "" if result is None else str(result)

    def _run(
        self, rule: Rule, program: celpy.Runner, activation: dict[str, Any], call: calls_pb2.ApiCall, what: str
    ) -> Any:
        try:
            result: object = program.evaluate(activation)
        except Exception as exc:
            self._error(rule, call, what, _describe(exc))
            return None
        if isinstance(result, CELEvalError):
            self._error(rule, call, what, _describe(result))
            return None
        return result

    def _error(self, rule: Rule, call: calls_pb2.ApiCall, what: str, reason: str) -> None:
        self._errors.inc(rule=rule.name)
        if rule.name not in self._logged_errors:
            self._logged_errors.add(rule.name)
            log.warning("alert_rule_error", rule=rule.name, part=what, call_id=call.id, error=reason, logged="once")

    def _remember(self, key: tuple[str, str], now_ns: int) -> None:
        self._last_fired.pop(key, None)
        self._last_fired[key] = now_ns
        if len(self._last_fired) > self.max_groups:
            # Oldest firings first (insertion order): their cooldown is the most likely to be over.
            for stale in list(self._last_fired)[: len(self._last_fired) - self.max_groups]:
                del self._last_fired[stale]


_NO_SUCH_KEY = "no such key: a protocol detail the call does not have (use has() first)"


class _Activation:
    """The call as cel-python reads it, made the first time a rule needs it."""

    __slots__ = ("call", "value")

    def __init__(self, call: calls_pb2.ApiCall) -> None:
        self.call = call
        self.value: dict[str, Any] | None = None

    def get(self) -> dict[str, Any]:
        if self.value is None:
            self.value = {"call": call_to_cel(self.call)}
        return self.value


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CELEvalError) and exc.args:
        return str(exc.args[0])[:200]
    return f"{type(exc).__name__}: {exc}"[:200]
