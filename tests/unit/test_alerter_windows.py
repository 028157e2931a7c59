"""Windowed alert rules (trawl.alerter.windows): aggregates over a sliding window per group, with
min_calls and for:, firing once and resolving, bounded groups, and their configuration errors.
The alerter is driven with ApiCalls whose request timestamps are the clock (the calls' own time),
as a replayed capture drives it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import scaled
from trawl.alerter.logic import Alerter
from trawl.alerter.rules import parse_rules
from trawl.alerter.windows import SECOND_NS, Aggregate, GroupWindow, parse_aggregate
from trawl.errors import ConfigError
from trawl.metrics import Registry
from trawl.v1.alerts_pb2 import Alert
from trawl.v1.calls_pb2 import ApiCall, Outcome

T0 = 1_800_000_000 * SECOND_NS
ERROR_RATIO_RULE = """rules:
  - name: checkout-errors
    condition: 'call.protocol == "http"'
    group_by: 'call.dst.workload'
    window: 10s
    aggregate: 'error_ratio > 0.2'
    min_calls: 5
    severity: critical
    summary: '{call.dst.workload} answers {call.status}'
"""


def http(second: float, status: str = "200", workload: str = "checkout", elapsed_ms: float = 5.0) -> ApiCall:
    call = ApiCall(
        id=f"{workload}-{second}-{status}",
        protocol="http",
        status=status,
        elapsed_ns=int(elapsed_ms * 1_000_000),
        outcome=Outcome.OUTCOME_ERROR if status.startswith("5") else Outcome.OUTCOME_OK,
    )
    call.request.ts = T0 + int(second * SECOND_NS)
    call.dst.workload = workload
    return call


def alerter(text: str, **options: object) -> Alerter:
    return Alerter(parse_rules(text, "rules.yaml", {}), Registry(), clock=lambda: 0.0, **options)  # type: ignore[arg-type]


def run(target: Alerter, calls: list[ApiCall]) -> list[Alert]:
    alerts: list[Alert] = []
    for call in calls:
        alerts += target.evaluate(call)
    return alerts


def steady_then_burst_then_steady() -> list[ApiCall]:
    calls = [http(0.5 * index) for index in range(40)]  # 20 s of 200s, two a second
    calls += [http(20 + 0.25 * index, "503") for index in range(12)]  # 3 s of 503s, four a second
    calls += [http(23 + 0.5 * index) for index in range(60)]  # 30 s of 200s again
    return calls


def test_a_burst_of_errors_fires_once_and_resolves_after_it() -> None:
    alerts = run(alerter(ERROR_RATIO_RULE), steady_then_burst_then_steady())
    assert [alert.resolved for alert in alerts] == [False, True]
    fired, resolved = alerts
    assert fired.rule == resolved.rule == "checkout-errors"
    assert fired.group == resolved.group == "checkout"
    assert fired.fired_at == resolved.fired_at
    assert T0 + 20 * SECOND_NS < fired.fired_at < T0 + 23 * SECOND_NS
    assert fired.value > 0.2 and fired.window_calls >= 5
    assert fired.summary == "checkout answers 503"
    assert resolved.summary.startswith("resolved: ")
    assert resolved.resolved_at > fired.fired_at
    assert resolved.value <= 0.2
    assert fired.id != resolved.id
    # The same calls again (a redelivery after a restart): the same ids, which JetStream stores once.
    again = run(alerter(ERROR_RATIO_RULE), steady_then_burst_then_steady())
    assert [alert.id for alert in again] == [alert.id for alert in alerts]


def test_groups_are_judged_apart() -> None:
    calls = steady_then_burst_then_steady() + [http(60 + index, workload="payments") for index in range(10)]
    calls.sort(key=lambda call: call.request.ts)
    alerts = run(alerter(ERROR_RATIO_RULE), calls)
    assert {alert.group for alert in alerts} == {"checkout"}


def test_min_calls_keeps_a_thin_window_from_firing() -> None:
    calls = [http(0, "503"), http(1, "503"), http(2), http(30)]
    assert run(alerter(ERROR_RATIO_RULE), calls) == []


def test_for_waits_until_the_aggregate_has_held_that_long() -> None:
    rule = ERROR_RATIO_RULE + "    for: 5s\n"
    # Errors for 3 s, then so many answers that the ratio falls under 0.2 within 2 s: held, not for 5 s.
    short = [http(index * 0.25, "503") for index in range(12)] + [http(3 + index / 30) for index in range(300)]
    assert run(alerter(rule), short) == []
    long = [http(index * 0.25, "503") for index in range(40)] + [http(10 + index) for index in range(40)]
    alerts = run(alerter(rule), long)
    assert [alert.resolved for alert in alerts] == [False, True]
    assert alerts[0].fired_at - T0 >= 5 * SECOND_NS


def test_time_passing_resolves_a_group_that_went_quiet() -> None:
    target = alerter(ERROR_RATIO_RULE)
    alerts = run(target, [http(index * 0.25, "503") for index in range(8)])
    assert [alert.resolved for alert in alerts] == [False]
    assert target.sweep(T0 + 5 * SECOND_NS) == []  # still within the window
    resolved = target.sweep(T0 + 15 * SECOND_NS)
    assert [alert.resolved for alert in resolved] == [True]
    assert resolved[0].resolved_at == T0 + 15 * SECOND_NS
    assert target.sweep(T0 + 30 * SECOND_NS) == []
    assert target.windows.groups == {}  # a drained group is forgotten


def test_idle_sweep_follows_the_clock_from_the_newest_call() -> None:
    wall = [100.0]
    target = Alerter(parse_rules(ERROR_RATIO_RULE, "rules.yaml", {}), Registry(), clock=lambda: wall[0])
    assert [alert.resolved for alert in run(target, [http(index * 0.25, "503") for index in range(8)])] == [False]
    wall[0] += 3
    assert target.sweep_idle(wall[0]) == []
    wall[0] += 20
    assert [alert.resolved for alert in target.sweep_idle(wall[0])] == [True]


def test_latency_percentile_and_rate() -> None:
    rules = """rules:
  - name: slow
    condition: 'call.protocol == "http"'
    window: 30s
    aggregate: 'p99(elapsed) > 500ms'
  - name: busy
    condition: 'call.protocol == "http"'
    window: 10s
    aggregate: 'rate > 3/s'
"""
    calls = [http(index * 0.5, elapsed_ms=20) for index in range(20)]  # 2 calls/s, fast
    calls += [http(10 + index * 0.1, elapsed_ms=800) for index in range(60)]  # 10 calls/s, slow
    alerts = run(alerter(rules), calls)
    firing = {alert.rule: alert for alert in alerts if not alert.resolved}
    assert set(firing) == {"slow", "busy"}
    assert firing["slow"].value == pytest.approx(800e6, rel=0.05)
    assert firing["busy"].value > 3


def test_windowed_groups_are_capped_and_the_overflow_counted() -> None:
    rules = ERROR_RATIO_RULE.replace("min_calls: 5", "min_calls: 1")
    metrics = Registry()
    target = Alerter(parse_rules(rules, "rules.yaml", {}), metrics, clock=lambda: 0.0, max_groups=2)
    calls = [http(1, "503", workload=name) for name in ("a", "b", "c", "d")]
    alerts = run(target, calls)
    assert sorted(alert.group for alert in alerts) == ["a", "b"]
    assert metrics.snapshot()["trawl_alerter_window_overflow_total"] == 2


def test_a_firing_that_could_not_be_stored_is_raised_again_by_the_redelivered_call() -> None:
    target = alerter(ERROR_RATIO_RULE)
    calls = [http(index * 0.25, "503") for index in range(5)]
    alerts = run(target, calls)
    assert len(alerts) == 1
    assert target.evaluate(calls[-1]) == []  # firing: not again
    target.forget(alerts[0])
    again = target.evaluate(calls[-1])
    assert [(alert.id, alert.resolved) for alert in again] == [(alerts[0].id, False)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("error_ratio > 0.05", Aggregate("error_ratio", ">", 0.05, text="error_ratio > 0.05")),
        ("error_ratio>=5%", Aggregate("error_ratio", ">=", 0.05, text="error_ratio>=5%")),
        ("rate > 100/s", Aggregate("rate", ">", 100.0, text="rate > 100/s")),
        ("rate < 600/m", Aggregate("rate", "<", 10.0, text="rate < 600/m")),
        ("count >= 50", Aggregate("count", ">=", 50.0, text="count >= 50")),
        ("p99(elapsed) > 500ms", Aggregate("quantile", ">", 5e8, 0.99, text="p99(elapsed) > 500ms")),
        ("p99.9( elapsed ) > 1.5s", Aggregate("quantile", ">", 1.5e9, 0.999, text="p99.9( elapsed ) > 1.5s")),
        ("avg(elapsed) <= 250us", Aggregate("avg", "<=", 250e3, text="avg(elapsed) <= 250us")),
    ],
)
def test_aggregates_parse(text: str, expected: Aggregate) -> None:
    found = parse_aggregate(text)
    assert isinstance(found, Aggregate)
    assert found.measure == expected.measure and found.op == expected.op
    assert found.quantile == pytest.approx(expected.quantile)
    assert found.threshold == pytest.approx(expected.threshold)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("errors > 3", "is not '<measure> <op> <threshold>'"),
        ("error_ratio > 2", "between 0 and 1"),
        ("rate > fast", "is not a number"),
        ("p99(elapsed) > 500", "must be a duration"),
        ("p0(elapsed) > 1s", "not a percentile"),
        ("count > -1", "not negative"),
    ],
)
def test_bad_aggregates_say_why(text: str, says: str) -> None:
    found = parse_aggregate(text)
    assert isinstance(found, str) and says in found


@pytest.mark.parametrize(
    ("extra", "line", "says"),
    [
        ({"window": "5m"}, 4, "window needs aggregate too"),
        ({"aggregate": "count > 1"}, 4, "aggregate needs window too"),
        ({"window": "soon", "aggregate": "count > 1"}, 4, "is not a duration from 1s to 1d"),
        ({"window": "0.5s", "aggregate": "count > 1"}, 4, "from 1s to 1d"),
        ({"window": "5m", "aggregate": "count > x"}, 5, "is not a number"),
        ({"window": "5m", "aggregate": "count > 1", "min_calls": 0}, 6, "at least 1"),
        ({"window": "5m", "aggregate": "count > 1", "for": "a while"}, 6, "is not a duration"),
        ({"min_calls": 3}, 4, "needs a window and an aggregate"),
        ({"window": "5m", "aggregate": "count > 1", "cooldown": "1m"}, 6, "cooldown is for per-call rules"),
    ],
)
def test_window_configuration_errors_name_the_line_and_the_fix(extra: dict[str, object], line: int, says: str) -> None:
    rule: dict[str, object] = {"name": "r", "condition": "true", **extra}
    text = yaml.safe_dump({"rules": [rule]}, sort_keys=False)
    with pytest.raises(ConfigError) as raised:
        parse_rules(text, Path("rules.yaml"), {})
    assert says in str(raised.value)
    assert f"rules.yaml:{line}" in str(raised.value)


def test_window_stats_quantile_is_within_five_percent_of_nearest_rank() -> None:
    samples = [1_000 * (index + 1) ** 2 for index in range(200)]
    window = GroupWindow(60)
    for index, elapsed in enumerate(samples):
        window.add(T0 + index * 10_000_000, elapsed, False)
    stats = window.stats(T0 + 3 * SECOND_NS)
    for q in (0.5, 0.9, 0.99):
        exact = sorted(samples)[max(1, math.ceil(q * len(samples))) - 1]
        assert exact <= stats.quantile(q) <= exact * 1.05


@st.composite
def traffic(draw: st.DrawFn) -> list[ApiCall]:
    calls = []
    second = 0.0
    for _ in range(draw(st.integers(1, 120))):
        second += draw(st.sampled_from([0.0, 0.1, 0.5, 1.0, 3.0, 12.0]))
        status = draw(st.sampled_from(["200", "200", "503"]))
        calls.append(http(second, status, workload=draw(st.sampled_from(["a", "b"]))))
    return calls


@given(calls=traffic())
@settings(max_examples=scaled(60), deadline=None)
def test_firings_and_resolutions_alternate_and_firings_hold_over_the_exact_window(calls: list[ApiCall]) -> None:
    """Per group: fire, resolve, fire... each resolution of the firing before it; at each firing
    the error ratio of the calls in the window (every second whose slot is still in it, counted
    exactly from the calls themselves) is over the threshold with at least min_calls calls."""
    target = alerter(ERROR_RATIO_RULE)
    by_group: dict[str, list[tuple[Alert, int]]] = {}
    for index, call in enumerate(calls):
        for alert in target.evaluate(call):
            by_group.setdefault(alert.group, []).append((alert, index))
    for group, sequence in by_group.items():
        assert [alert.resolved for alert, _ in sequence] == [index % 2 == 1 for index in range(len(sequence))]
        for (fired, _), (resolved, _) in zip(sequence[::2], sequence[1::2], strict=False):
            assert fired.fired_at == resolved.fired_at
        for fired, at in sequence[::2]:
            oldest = (fired.fired_at - 10 * SECOND_NS) // SECOND_NS
            inside = [
                call for call in calls[: at + 1] if call.dst.workload == group and oldest < call.request.ts // SECOND_NS
            ]
            errors = sum(call.outcome == Outcome.OUTCOME_ERROR for call in inside)
            assert len(inside) == fired.window_calls >= 5
            assert errors / len(inside) == pytest.approx(fired.value) and fired.value > 0.2


@given(
    steps=st.lists(
        st.tuples(
            st.integers(0, 3_000),  # how far the calls' time moves on (ms)
            st.integers(0, 4_000),  # how late this call is (ms)
            st.integers(0, 2_000_000_000),
            st.booleans(),
            st.booleans(),  # judge the window after it
        ),
        max_size=150,
    )
)
@settings(max_examples=scaled(200), deadline=None)
def test_window_totals_follow_the_slots(steps: list[tuple[int, int, int, bool, bool]]) -> None:
    """The totals GroupWindow keeps as calls come and slots leave are the sums over its slots."""
    window = GroupWindow(5)
    now = T0
    for advance_ms, late_ms, elapsed, error, judge in steps:
        now += advance_ms * 1_000_000
        window.add(now - late_ms * 1_000_000, elapsed, error)
        if judge:
            stats = window.stats(now)
            slots = list(window.slots)
            assert stats.count == sum(slot.count for slot in slots)
            assert stats.errors == sum(slot.errors for slot in slots)
            assert stats.elapsed_sum == sum(slot.elapsed_sum for slot in slots)
            assert stats.elapsed_max == max((slot.elapsed_max for slot in slots), default=0)
            bins: dict[int, int] = {}
            for slot in slots:
                for index, count in slot.bins.items():
                    bins[index] = bins.get(index, 0) + count
            assert stats.bins == bins
            assert GroupWindow(5, slots).bins == bins  # as a window read back from Redis counts them
