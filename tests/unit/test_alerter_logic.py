"""Rule evaluation on ApiCall protos: matches, CEL value types, cooldown per group, errors counted."""

from __future__ import annotations

from pathlib import Path

import pytest
from celpy import celtypes

from trawl.alerter.logic import Alerter, alert_id, call_to_cel
from trawl.alerter.rules import load_rules, parse_rules
from trawl.metrics import Registry
from trawl.v1 import alerts_pb2, calls_pb2

SECOND = 1_000_000_000
T0 = 1_700_000_000 * SECOND


def http_call(
    call_id: str, status: str = "200", ts: int = T0, src: str = "checkout", dst: str = "payments", elapsed: int = 1000
) -> calls_pb2.ApiCall:
    return calls_pb2.ApiCall(
        id=call_id,
        protocol="http",
        method="GET",
        path="/pay",
        status=status,
        elapsed_ns=elapsed,
        outcome=calls_pb2.OUTCOME_OK,
        src=calls_pb2.Endpoint(ip="10.0.0.1", workload=src),
        dst=calls_pb2.Endpoint(ip="10.0.0.2", port=8080, workload=dst, namespace="shop"),
        request=calls_pb2.Message(ts=ts, headers=[calls_pb2.Header(name="host", value="pay.shop")], body=b"{}"),
        response=calls_pb2.Message(ts=ts + elapsed),
        http=calls_pb2.HttpDetail(version="1.1"),
    )


def rules_from(text: str) -> Alerter:
    return Alerter(parse_rules(text, "rules.yaml", {}), Registry(), clock=lambda: 1_800_000_000.0)


def test_cel_view_of_a_call_has_native_types() -> None:
    view = call_to_cel(http_call("c1", elapsed=600_000_000))
    assert view["elapsed_ns"] == celtypes.IntType(600_000_000)
    assert isinstance(view["elapsed_ns"], celtypes.IntType)
    assert view["dst"]["port"] == celtypes.IntType(8080)
    assert view["outcome"] == celtypes.StringType("OUTCOME_OK")
    assert view["request"]["body"] == celtypes.BytesType(b"{}")
    assert view["request"]["headers"][0]["name"] == "host"
    assert view["http"]["version"] == "1.1"
    assert "grpc" not in view  # only the detail that is set
    assert view["src"]["pod"] == ""  # everything else present with its default
    huge = call_to_cel(calls_pb2.ApiCall(elapsed_ns=(1 << 64) - 1))
    assert huge["elapsed_ns"] == celtypes.UintType((1 << 64) - 1)


def test_fixture_rules_on_calls(fixtures: Path) -> None:
    registry = Registry()
    alerter = Alerter(load_rules(fixtures / "rules.yaml", environ={}), registry, clock=lambda: 1_800_000_000.0)
    assert alerter.evaluate(http_call("ok")) == []
    [alert] = alerter.evaluate(http_call("boom", status="503"))
    assert alert.rule == "server-errors"
    assert alert.severity == alerts_pb2.SEVERITY_CRITICAL
    assert alert.summary == "HTTP 503 from payments (GET /pay)"
    assert alert.group == "checkout -> payments"
    assert dict(alert.labels) == {"team": "payments"}
    assert alert.call.id == "boom"
    assert alert.fired_at == 1_800_000_000 * SECOND
    assert alert.id == alert_id("server-errors", "checkout -> payments", "boom")
    [slow] = alerter.evaluate(http_call("slow", elapsed=900_000_000))
    assert slow.rule == "slow-calls"
    assert slow.summary == "GET /pay took 900000000 ns"
    lone = http_call("lone")
    lone.outcome = calls_pb2.OUTCOME_NO_RESPONSE
    assert [a.rule for a in alerter.evaluate(lone)] == ["no-response"]
    assert registry.counter("trawl_alerter_calls_total", "").total() == 4
    assert registry.counter("trawl_alerter_alerts_total", "").get(rule="server-errors") == 1


def test_cooldown_is_per_rule_and_group_in_call_time() -> None:
    alerter = rules_from(
        "rules:\n  - name: errors\n    condition: 'int(call.status) >= 500'\n"
        "    group_by: 'call.dst.workload'\n    cooldown: 60s\n"
    )
    fired = [alerter.evaluate(http_call("a", "500", T0))]
    fired.append(alerter.evaluate(http_call("b", "500", T0 + 30 * SECOND)))  # same group, within cooldown
    fired.append(alerter.evaluate(http_call("c", "500", T0 + 31 * SECOND, dst="ledger")))  # another group
    fired.append(alerter.evaluate(http_call("d", "502", T0 + 61 * SECOND)))  # cooldown over
    assert [[a.call.id for a in alerts] for alerts in fired] == [["a"], [], ["c"], ["d"]]
    assert [a.group for alerts in fired for a in alerts] == ["payments", "ledger", "payments"]
    assert alerter._suppressed.get(rule="errors") == 1


def test_without_cooldown_every_match_fires_and_ids_are_stable() -> None:
    alerter = rules_from("rules:\n  - name: any\n    condition: 'call.protocol == \"http\"'\n")
    first = alerter.evaluate(http_call("x"))
    again = alerter.evaluate(http_call("x"))
    other = alerter.evaluate(http_call("y"))
    assert first[0].id == again[0].id != other[0].id
    assert first[0].group == ""


def test_forget_undoes_a_cooldown() -> None:
    alerter = rules_from("rules:\n  - name: any\n    condition: 'true'\n    cooldown: 1h\n")
    [alert] = alerter.evaluate(http_call("x"))
    assert alerter.evaluate(http_call("y")) == []
    alerter.forget(alert)
    assert len(alerter.evaluate(http_call("z"))) == 1


def test_evaluation_errors_are_counted_per_rule_and_logged_once(capsys: pytest.CaptureFixture[str]) -> None:
    alerter = rules_from(
        "rules:\n"
        "  - name: needs-int\n    condition: 'int(call.status) >= 500'\n"
        "  - name: needs-http\n    condition: 'call.http.version == \"1.0\"'\n"
        "  - name: not-bool\n    condition: 'call.status'\n"
        "  - name: bad-group\n    condition: 'true'\n    group_by: 'call.src.port / 0'\n"
    )
    dns = calls_pb2.ApiCall(id="q", protocol="dns", status="NXDOMAIN", dns=calls_pb2.DnsDetail(rcode="NXDOMAIN"))
    for _ in range(3):
        alerts = alerter.evaluate(dns)
        assert [(a.rule, a.group) for a in alerts] == [("bad-group", "")]
    errors = alerter._errors
    assert errors.get(rule="needs-int") == 3
    assert errors.get(rule="needs-http") == 3
    assert errors.get(rule="not-bool") == 3
    assert errors.get(rule="bad-group") == 3
    logged = capsys.readouterr()
    assert (logged.out + logged.err).count("alert_rule_error") == 4


def test_group_memory_is_bounded() -> None:
    alerter = Alerter(
        parse_rules("rules:\n  - name: r\n    condition: 'true'\n    group_by: 'call.id'\n    cooldown: 1h\n", "r"),
        max_groups=10,
    )
    for index in range(50):
        assert len(alerter.evaluate(http_call(f"c{index}"))) == 1
    assert len(alerter._last_fired) == 10
