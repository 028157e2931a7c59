"""Loading alert rules: compiled at load, every fault reported with the file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from trawl.alerter.rules import load_rules, parse_duration, parse_rules
from trawl.errors import ConfigError
from trawl.v1 import alerts_pb2, calls_pb2


def test_the_fixture_loads(fixtures: Path) -> None:
    rules = load_rules(fixtures / "rules.yaml", environ={})
    assert [r.name for r in rules] == ["server-errors", "slow-calls", "no-response"]
    errors = rules[0]
    assert errors.severity == alerts_pb2.SEVERITY_CRITICAL
    assert errors.cooldown_s == 60.0
    assert errors.labels == {"team": "payments"}
    assert errors.line == 4
    [hook] = errors.actions
    assert hook.url == "http://127.0.0.1:9/alerts"
    assert hook.format == "json"
    assert hook.secret is None
    assert rules[1].severity == alerts_pb2.SEVERITY_WARNING
    assert rules[2].severity == alerts_pb2.SEVERITY_INFO
    assert rules[2].summary.text == "{call.method} {call.path} -> {call.status}"


def test_summary_template_renders_fields_enums_and_braces() -> None:
    [rule] = parse_rules(
        "rules:\n  - name: r\n    condition: 'true'\n"
        "    summary: '{{x}} {call.status} {call.dst.workload} {call.outcome} {call.notes} {call.elapsed_ns}'\n",
        "r.yaml",
    )
    call = calls_pb2.ApiCall(
        status="503",
        dst=calls_pb2.Endpoint(workload="payments"),
        outcome=calls_pb2.OUTCOME_ERROR,
        notes=["gap", "retransmission"],
        elapsed_ns=12,
    )
    assert rule.summary.render(call) == "{x} 503 payments OUTCOME_ERROR gap, retransmission 12"


def test_secrets_and_urls_come_from_the_environment() -> None:
    text = (
        "rules:\n  - name: r\n    condition: 'true'\n    actions:\n"
        "      - webhook: {url_env: HOOK_URL, secret_env: HOOK_SECRET, format: slack}\n"
    )
    [rule] = parse_rules(text, "r.yaml", {"HOOK_URL": "https://hooks.example/T0/B0/xyz", "HOOK_SECRET": "s3cret"})
    [hook] = rule.actions
    assert hook.url == "https://hooks.example/T0/B0/xyz"
    assert hook.secret == b"s3cret"
    assert hook.format == "slack"
    assert hook.where == "https://hooks.example"  # what logs show: no token-bearing path
    assert "s3cret" not in repr(hook)


def test_cel_syntax_error_names_file_line_and_rule(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "rules:\n"
        "  - name: fine\n"
        "    condition: 'call.protocol == \"dns\"'\n"
        "\n"
        "  - name: server-errors\n"
        "    severity: critical\n"
        "    condition: 'call.protocol == \"http\" && int(call.status) >='\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_rules(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:7: rule 'server-errors': condition is not valid CEL: syntax error at column")
    assert "\n" not in message
    assert caught.value.line == 7


@pytest.mark.parametrize(
    ("body", "line", "expected"),
    [
        ("    actions:\n      - email: {to: ops@example.com}\n", 5, "unknown action 'email'; known actions: webhook"),
        ("    cooldown: 5 minutes\n", 4, "cooldown '5 minutes' is not a duration"),
        ("    cooldown: -5s\n", 4, "is not a duration"),
        ("    sevrity: critical\n", 4, "unknown rule key 'sevrity'; known keys: name, condition"),
        ("    severity: fatal\n", 4, "severity 'fatal' is not one of info, warning, critical"),
        ("    actions:\n      - webhook: {url: 'ftp://x/y'}\n", 5, "must start with http:// or https://"),
        ("    actions:\n      - webhook: {url: 'http:///path'}\n", 5, "has no host"),
        ("    actions:\n      - webhook: {url: 'http://h:99999/'}\n", 5, "is not a URL"),
        (
            "    actions:\n      - webhook: {url: 'http://h/', format: xml}\n",
            5,
            "format 'xml' is not 'json' or 'slack'",
        ),
        ("    actions:\n      - webhook: {url: 'http://h/', secret_env: UNSET_X}\n", 5, "UNSET_X is not set"),
        ("    actions:\n      - webhook: {url: 'http://h/', sign: yes}\n", 5, "unknown webhook key 'sign'"),
        ("    actions:\n      - webhook: {format: json}\n", 5, "exactly one of 'url' or 'url_env'"),
        ("    actions: {webhook: {url: 'http://h/'}}\n", 4, "actions must be a list"),
        ("    summary: 'HTTP {call.stauts}'\n", 4, "call has no field 'stauts'"),
        ("    summary: 'HTTP {status}'\n", 4, "placeholder {status} must name a call field"),
        ("    summary: 'HTTP {call.status'\n", 4, "unbalanced '{'"),
        ("    summary: '{call.request.headers}'\n", 4, "is not a single value"),
        ("    group_by: 'call.src.workload +'\n", 4, "group_by is not valid CEL"),
        ("    labels: [a, b]\n", 4, "labels must be a mapping"),
        ("    name: again\n", 4, "key 'name' is given twice"),
    ],
)
def test_each_fault_names_its_line(body: str, line: int, expected: str) -> None:
    text = "rules:\n  - name: r1\n    condition: 'true'\n" + body
    with pytest.raises(ConfigError) as caught:
        parse_rules(text, "rules.yaml", {})
    assert caught.value.line == line, str(caught.value)
    assert expected in str(caught.value)
    assert str(caught.value).startswith(f"rules.yaml:{line}: rule 'r1': ")


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("call.stauts == '500'", "call has no field 'stauts'"),
        ("call.dst.namspace == 'x'", "call.dst has no field 'namspace'"),
        ("call.status.code == 1", "call.status is a string, it has no fields"),
        ("has(call.http.verison)", "call.http has no field 'verison'"),
        ("status == '500'", "unknown name 'status'"),
    ],
)
def test_condition_references_are_checked_against_apicall(condition: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_rules(f'rules:\n  - name: r\n    condition: "{condition}"\n', "rules.yaml", {})


def test_valid_conditions_using_macros_maps_and_types() -> None:
    conditions = [
        'call.request.headers.exists(h, h.name == "host" && h.value.startsWith("api"))',
        'call.amqp.properties.content_type == "json"',
        "type(call.elapsed_ns) == int && call.elapsed_ns > 5",
        'call.notes.all(n, n != "gap")',
        'call.request.body.size() > 0 || call.request.body == b""',
    ]
    text = "rules:\n" + "".join(f"  - name: r{i}\n    condition: '{c}'\n" for i, c in enumerate(conditions))
    assert len(parse_rules(text, "rules.yaml", {})) == len(conditions)


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ("rules: [\n", 2, "not valid YAML"),
        ("- name: r\n", 1, "a rules file is a mapping with one key, 'rules'"),
        ("alerts: []\n", 1, "unknown key 'alerts'"),
        ("rules: {name: r}\n", 1, "'rules' must be a list"),
        ("rules:\n  - just text\n", 2, "a rule is a mapping"),
        ("rules:\n  - condition: 'true'\n", 2, "has no 'name'"),
        ("rules:\n  - name: r\n", 2, "has no 'condition'"),
        ("rules:\n  - name: 'bad name'\n    condition: 'true'\n", 2, "name 'bad name' must be"),
        ("rules:\n  - name: _dead\n    condition: 'true'\n", 2, "name '_dead' must be"),
        ("rules:\n  - name: r\n    condition: ''\n", 3, "condition is empty"),
        ("rules:\n  - name: r\n    condition: [a]\n", 3, "condition must be a single value"),
        ("rules:\n  - {name: r, condition: 'true'}\n  - {name: r, condition: 'false'}\n", 3, "defined twice"),
    ],
)
def test_document_shape_faults(text: str, line: int, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_rules(text, "rules.yaml", {})
    assert caught.value.line == line, str(caught.value)
    assert expected in str(caught.value)


def test_empty_documents_have_no_rules() -> None:
    assert parse_rules("", "r.yaml") == []
    assert parse_rules("rules:\n", "r.yaml") == []
    assert parse_rules("rules: []\n", "r.yaml") == []


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read rules file"):
        load_rules(tmp_path / "missing.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00rules")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_rules(binary)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60s", 60.0), ("500ms", 0.5), ("5m", 300.0), ("1h30m", 5400.0), ("1d", 86400.0), ("90", 90.0), ("2.5s", 2.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "5x", "-1s", "1h-5m", "nan", "inf", "5 minutes", "m5"])
def test_bad_durations(text: str) -> None:
    assert parse_duration(text) is None


def test_anchors_and_merge_keys_share_settings() -> None:
    text = """\
rules:
  - &base
    name: first
    condition: 'true'
    severity: critical
    actions: &hooks
      - webhook: {url: 'http://127.0.0.1:9/a'}
  - <<: *base
    name: second
  - name: third
    condition: 'false'
    actions: *hooks
"""
    first, second, third = parse_rules(text, "rules.yaml", {})
    assert (second.name, second.severity, second.actions) == ("second", first.severity, first.actions)
    assert third.actions == first.actions


def test_bad_merge_key_is_reported() -> None:
    with pytest.raises(ConfigError, match=r"rules\.yaml:2: rule 'r': bad merge key"):
        parse_rules("rules:\n  - <<: [1, 2]\n    name: r\n    condition: 'true'\n", "rules.yaml", {})
    with pytest.raises(ConfigError, match=r"rules\.yaml:2: 'rules' is given twice"):
        parse_rules("rules: []\nrules: []\n", "rules.yaml", {})
