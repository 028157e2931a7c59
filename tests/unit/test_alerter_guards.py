"""Rule guards (trawl.alerter.guards): what a condition requires of `call.protocol` and
`call.outcome`, read from its CEL tree, lets the alerter skip a rule a call cannot match. The
alerter with guards must raise exactly the alerts, and count exactly the errors and
suppressions, of the alerter without them (every rule run on every call by cel-python, the
reference), on hypothesis-made rule sets and calls: guards of every shape the module reads, mixed
with terms it does not read and with terms that fail (`int()` of a text status) on either side
of the `&&`.
"""

from __future__ import annotations

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import scaled
from trawl.alerter.guards import Guard, guard_of
from trawl.alerter.logic import Alerter
from trawl.alerter.rules import parse_rules
from trawl.metrics import Registry
from trawl.v1.calls_pb2 import ApiCall, Outcome

PROTOCOLS = ["http", "grpc", "dns", "tcp", "tls", "kafka", "redis", "amqp", ""]
OUTCOMES = list(Outcome.DESCRIPTOR.values_by_name)


def test_guards_read_from_the_top_conjunction_only() -> None:
    assert guard_of('call.protocol == "http" && int(call.status) >= 500') == Guard(frozenset({"http"}))
    assert guard_of('"dns" == call.protocol && call.outcome == "OUTCOME_ERROR"') == Guard(
        frozenset({"dns"}), frozenset({"OUTCOME_ERROR"})
    )
    assert guard_of("call.protocol in ['tcp', 'tls'] && call.protocol != 'tls'") == Guard(frozenset({"tcp", "tls"}))
    assert guard_of('call.protocol == "http" && call.protocol == "grpc"') == Guard(frozenset())
    # Not guards: a disjunction, a ternary, another field, an escaped or raw literal, a macro variable.
    assert guard_of('call.protocol == "a" || call.protocol == "b"') is None
    assert guard_of('has(call.http) ? call.protocol == "x" : false') is None
    assert guard_of("call.elapsed_ns > 5 && call.method == 'GET'") is None
    assert guard_of('call.protocol == "h\\x74tp"') is None
    assert guard_of("call.protocol == r'http'") is None
    assert guard_of('[call].exists(c, c.protocol == "http")') is None


def test_an_outcome_the_enum_does_not_name_is_left_to_the_condition() -> None:
    guard = Guard(outcomes=frozenset({"OUTCOME_ERROR"}))
    assert not guard.admits(ApiCall(outcome=Outcome.OUTCOME_OK))
    assert guard.admits(ApiCall(outcome=Outcome.OUTCOME_ERROR))
    unnamed = ApiCall()
    unnamed.outcome = 42  # type: ignore[assignment]  # an open enum keeps numbers it does not name
    assert guard.admits(unnamed)


def literal(draw: st.DrawFn, values: list[str]) -> str:
    quote = draw(st.sampled_from(['"', "'"]))
    return f"{quote}{draw(st.sampled_from(values))}{quote}"


@st.composite
def term(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 7))
    if kind == 0:
        return f"call.protocol == {literal(draw, PROTOCOLS)}"
    if kind == 1:
        return f"{literal(draw, PROTOCOLS)} == call.protocol"
    if kind == 2:
        items = draw(st.lists(st.sampled_from(PROTOCOLS), max_size=3))
        return "call.protocol in [" + ", ".join(f'"{item}"' for item in items) + "]"
    if kind == 3:
        return f"call.outcome == {literal(draw, OUTCOMES)}"
    if kind == 4:
        return "int(call.status) >= 500"  # an error on a text status: CEL's && decides
    if kind == 5:
        return "call.elapsed_ns > 1000"
    if kind == 6:
        return f"(call.protocol == {literal(draw, PROTOCOLS)} || call.method == 'GET')"
    return "has(call.http)"


@st.composite
def rule_set(draw: st.DrawFn) -> str:
    rules: list[dict[str, str]] = []
    for index in range(draw(st.integers(1, 5))):
        rule = {"name": f"rule-{index}", "condition": " && ".join(draw(st.lists(term(), min_size=1, max_size=4)))}
        if draw(st.booleans()):
            rule["group_by"] = "call.dst.workload"
        if draw(st.booleans()):
            rule["cooldown"] = "1s"
        rules.append(rule)
    return yaml.safe_dump({"rules": rules})


@st.composite
def call(draw: st.DrawFn) -> ApiCall:
    made = ApiCall(
        id=draw(st.text(alphabet="0123456789abcdef", min_size=4, max_size=8)),
        protocol=draw(st.sampled_from(PROTOCOLS)),
        method=draw(st.sampled_from(["GET", "POST", "Produce", ""])),
        status=draw(st.sampled_from(["200", "503", "NONE", "ok", ""])),
        elapsed_ns=draw(st.integers(0, 5000)),
    )
    made.outcome = draw(st.sampled_from([*Outcome.values(), 42]))  # type: ignore[assignment]
    made.request.ts = draw(st.integers(1, 10)) * 400_000_000
    made.dst.workload = draw(st.sampled_from(["api", "db"]))
    if draw(st.booleans()):
        made.http.version = "1.1"
    return made


@given(rules=rule_set(), calls=st.lists(call(), min_size=1, max_size=12))
@settings(max_examples=scaled(80), deadline=None)
def test_guards_change_no_alert_and_no_count(rules: str, calls: list[ApiCall]) -> None:
    guarded_metrics, reference_metrics = Registry(), Registry()
    guarded = Alerter(parse_rules(rules, "rules.yaml", {}), guarded_metrics, clock=lambda: 1.0)
    reference = Alerter(parse_rules(rules, "rules.yaml", {}), reference_metrics, clock=lambda: 1.0, guards=False)
    for item in calls:
        assert guarded.evaluate(item) == reference.evaluate(item)
    assert guarded_metrics.render() == reference_metrics.render()
