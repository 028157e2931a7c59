"""Rule expressions compiled to Python functions of the ApiCall (trawl.alerter.compiled) against
cel-python running them on the call's CEL map (the reference): the alerter with compiled rules and
guards must raise exactly the alerts, and count exactly the errors and suppressions, of the
alerter with neither, on hypothesis-made rules and calls. The rules mix what is compiled (fields
of every scalar kind, literals, comparisons, `in`, `&&`, `||`, `!`, `?:`, `+`, has(), int(),
string(), size(), string methods) with what is cel-python's alone (macros, doubles, escapes) and
with what only a call's values send back to cel-python (values of two types compared, int() of a
text, an enum number without a name), and with errors (a protocol detail that is not set) on
either side of `&&` and `||`."""

from __future__ import annotations

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import scaled
from trawl.alerter.compiled import CelError, Fallback, compile_expression
from trawl.alerter.logic import Alerter
from trawl.alerter.rules import parse_rules
from trawl.metrics import Registry
from trawl.v1.calls_pb2 import ApiCall, Outcome

STRINGS = ['"http"', '"grpc"', "'dns'", '"503"', '"200"', '"GET"', '"/api"', '""', '"1.1"', '"OUTCOME_ERROR"']
INTS = ["0", "1", "500", "-3", "1000000"]
FIELDS = {
    "string": ["call.protocol", "call.status", "call.method", "call.path", "call.dst.workload", "call.http.version"],
    "int": ["call.elapsed_ns", "call.shard", "call.src.port", "call.request.size", "call.grpc.status_code"],
    "enum": ["call.outcome"],
}


@st.composite
def value(draw: st.DrawFn, depth: int = 0) -> str:
    kind = draw(st.integers(0, 10 if depth < 2 else 4))
    if kind == 0:
        return draw(st.sampled_from(FIELDS["string"]))
    if kind == 1:
        return draw(st.sampled_from(FIELDS["int"] + FIELDS["enum"]))
    if kind == 2:
        return draw(st.sampled_from(STRINGS))
    if kind == 3:
        return draw(st.sampled_from(INTS))
    if kind == 4:
        return draw(st.sampled_from(["true", "false", "1.5", "2u", '"a\\x41"', "b'x'"]))
    if kind == 5:
        return f"int({draw(value(depth + 1))})"
    if kind == 6:
        return f"size({draw(value(depth + 1))})"
    if kind == 7:
        return f"string({draw(value(depth + 1))})"
    if kind == 8:
        return f"{draw(value(depth + 1))} + {draw(value(depth + 1))}"
    if kind == 9:
        return f"({draw(condition(depth + 1))} ? {draw(value(depth + 1))} : {draw(value(depth + 1))})"
    return f"({draw(value(depth + 1))})"


@st.composite
def condition(draw: st.DrawFn, depth: int = 0) -> str:
    kind = draw(st.integers(0, 9 if depth < 2 else 3))
    if kind in (0, 1):
        operator = draw(st.sampled_from(["==", "!=", "<", "<=", ">", ">="]))
        return f"{draw(value(depth + 1))} {operator} {draw(value(depth + 1))}"
    if kind == 2:
        items = draw(st.lists(st.sampled_from(STRINGS + INTS), max_size=3))
        return f"{draw(value(depth + 1))} in [{', '.join(items)}]"
    if kind == 3:
        return draw(st.sampled_from(["has(call.http)", "has(call.grpc)", "has(call.status)", "has(call.http.version)"]))
    if kind == 4:
        return f"{draw(condition(depth + 1))} && {draw(condition(depth + 1))}"
    if kind == 5:
        return f"({draw(condition(depth + 1))} || {draw(condition(depth + 1))})"
    if kind == 6:
        return f"!({draw(condition(depth + 1))})"
    if kind == 7:
        method = draw(st.sampled_from(["startsWith", "endsWith", "contains", "matches"]))
        return f"({draw(value(depth + 1))}).{method}({draw(value(depth + 1))})"
    if kind == 8:
        return 'call.request.headers.exists(h, h.name == "host")'
    return draw(st.sampled_from(["true", "false"]))


@st.composite
def rule_set(draw: st.DrawFn) -> str:
    rules: list[dict[str, str]] = []
    for index in range(draw(st.integers(1, 4))):
        rule = {"name": f"rule-{index}", "condition": draw(condition())}
        if draw(st.booleans()):
            rule["group_by"] = draw(value())
        if draw(st.booleans()):
            rule["cooldown"] = "1s"
        rules.append(rule)
    return yaml.safe_dump({"rules": rules})


@st.composite
def call(draw: st.DrawFn) -> ApiCall:
    made = ApiCall(
        id=draw(st.text(alphabet="0123456789abcdef", min_size=4, max_size=8)),
        protocol=draw(st.sampled_from(["http", "grpc", "dns", ""])),
        method=draw(st.sampled_from(["GET", "POST", ""])),
        path=draw(st.sampled_from(["/api/orders", "/", "", "caf\u00e9"])),
        status=draw(st.sampled_from(["200", "503", " 7", "5.0", "-1", "NONE", "", "99999999999999999999"])),
        elapsed_ns=draw(st.sampled_from([0, 1, 500, 10**9, 2**63 + 5])),
        shard=draw(st.integers(0, 3)),
    )
    made.outcome = draw(st.sampled_from([*Outcome.values(), 42]))  # type: ignore[assignment]
    made.request.ts = draw(st.integers(1, 10)) * 400_000_000
    made.request.size = draw(st.integers(0, 2000))
    made.src.port = draw(st.integers(0, 65535))
    made.dst.workload = draw(st.sampled_from(["api", "db", ""]))
    detail = draw(st.sampled_from(["http", "grpc", None]))
    if detail == "http":
        made.http.version = draw(st.sampled_from(["1.1", ""]))
    elif detail == "grpc":
        made.grpc.status_code = draw(st.integers(0, 16))
    return made


@given(rules=rule_set(), calls=st.lists(call(), min_size=1, max_size=8))
@settings(max_examples=scaled(150), deadline=None)
def test_compiled_rules_raise_and_count_exactly_what_cel_python_does(rules: str, calls: list[ApiCall]) -> None:
    fast_metrics, reference_metrics = Registry(), Registry()
    fast = Alerter(parse_rules(rules, "rules.yaml", {}), fast_metrics, clock=lambda: 1.0)
    reference = Alerter(
        parse_rules(rules, "rules.yaml", {}), reference_metrics, clock=lambda: 1.0, guards=False, compiled=False
    )
    for item in calls:
        assert fast.evaluate(item) == reference.evaluate(item)
    assert fast_metrics.render() == reference_metrics.render()


def test_what_is_compiled_and_what_is_left_to_cel_python() -> None:
    for text in (
        'call.protocol == "http" && int(call.status) >= 500',
        'call.src.workload + " -> " + call.dst.workload',
        'call.outcome == "OUTCOME_NO_RESPONSE" && has(call.http)',
        "call.method in ['GET', 'HEAD'] || !(call.path.startsWith('/health'))",
        "call.elapsed_ns > 500000000 ? size(call.path) > 3 : false",
    ):
        assert compile_expression(text) is not None, text
    for text in (
        'call.request.headers.exists(h, h.name == "host")',  # a macro
        "call.path.matches('^/api')",  # RE2 is cel-python's
        "call.elapsed_ns > 1.5",  # a double
        'call.path == "a\\x41"',  # an escape
        "call.request == call.response",  # messages as values
        "call.elapsed_ns * 2 > 10",  # arithmetic beyond +
    ):
        assert compile_expression(text) is None, text


def test_values_cel_python_must_judge_are_sent_back_to_it() -> None:
    status = compile_expression("int(call.status) > 2")
    assert status is not None
    assert status(ApiCall(status="503")) is True
    for odd in (" 7", "5.0", "99999999999999999999"):
        try:
            status(ApiCall(status=odd))
        except Fallback:
            continue
        raise AssertionError(f"int({odd!r}) was judged by the compiled form")
    mixed = compile_expression("call.shard == call.protocol")
    assert mixed is not None
    try:
        mixed(ApiCall(protocol="http"))
    except Fallback:
        pass
    else:
        raise AssertionError("an int compared with a string was judged by the compiled form")
    absent = compile_expression('call.http.version == "1.1"')
    assert absent is not None
    try:
        absent(ApiCall(protocol="dns"))
    except CelError:
        pass
    else:
        raise AssertionError("a detail that is not set read as a value")
