"""Arbitrary rules documents: the loader returns rules or raises ConfigError, never anything else."""

from __future__ import annotations

import celpy
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import scaled
from trawl.alerter.logic import Alerter
from trawl.alerter.rules import RULE_KEYS, WEBHOOK_KEYS, parse_rules
from trawl.errors import ConfigError
from trawl.v1 import calls_pb2

# cel-python raises the recursion limit when its first Environment is built; doing it at import
# keeps hypothesis from warning that a test changed it.
celpy.Environment()

ENVIRON = {"HOOK_SECRET": "s3cret", "HOOK_URL": "https://hooks.example/x"}
CEL_PIECES = [
    "call",
    "call.status",
    "call.dst.workload",
    "call.elapsed_ns",
    "call.request.headers",
    "call.http.version",
    "call.nope",
    "int(",
    ")",
    "(",
    "==",
    "&&",
    "||",
    ">=",
    "!",
    '"500"',
    "500",
    "1/0",
    "true",
    "size(",
    ".exists(h, h.name == 'x')",
    "has(",
    "[",
    "]",
    "?",
    ":",
    "'",
    "\\",
    "b'x'",
    "99999999999999999999999",
    "1e999",
    "{",
    "}",
    "-",
    ".",
]
VALID_CEL = [
    'call.protocol == "http" && int(call.status) >= 500',
    "call.elapsed_ns > 1000",
    'call.request.headers.exists(h, h.name == "host")',
    "has(call.http) && call.http.version == '1.1'",
    "int(call.status) / 0 == 1",
    "call.status",
    'call.src.workload + " -> " + call.dst.workload',
    "true",
]
cel_text = st.one_of(
    st.sampled_from(VALID_CEL), st.lists(st.sampled_from(CEL_PIECES), min_size=1, max_size=8).map(" ".join)
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20), cel_text)
webhook = st.dictionaries(
    st.one_of(st.sampled_from(WEBHOOK_KEYS), st.text(max_size=5)),
    st.one_of(
        scalars,
        st.sampled_from(["http://127.0.0.1:1/x", "https://h/", "ftp://x", "HOOK_SECRET", "HOOK_URL", "slack", "json"]),
    ),
    max_size=4,
)
action = st.one_of(
    st.dictionaries(st.sampled_from(["webhook", "email", "nats"]), st.one_of(webhook, scalars), max_size=2), scalars
)
any_value = st.one_of(
    scalars,
    cel_text,
    st.sampled_from(["60s", "5m", "1h30m", "-1s", "x", "critical", "{call.status}", "{call.nope}", "{", "{{}}"]),
    st.lists(action, max_size=3),
    st.dictionaries(st.text(max_size=4), scalars, max_size=3),
)
# Mostly well-formed rules (a name and a CEL condition) with random optional keys, so most
# examples get past the document shape into CEL compilation, templates, durations and actions.
rule = st.one_of(
    st.fixed_dictionaries(
        {"name": st.sampled_from(["r1", "r2", "bad name", "_x"]), "condition": cel_text},
        optional={
            "severity": st.sampled_from(["info", "warning", "critical", "fatal"]),
            "summary": st.one_of(st.sampled_from(["{call.status}", "{call.nope}", "{", "{{}}", "{call.dst}"]), scalars),
            "group_by": cel_text,
            "cooldown": st.one_of(st.sampled_from(["60s", "5m", "1h30m", "-1s", "1e999s", "x"]), scalars),
            "labels": st.one_of(st.dictionaries(st.text(max_size=4), scalars, max_size=3), scalars),
            "actions": st.one_of(st.lists(action, max_size=3), scalars),
        },
    ),
    st.dictionaries(st.one_of(st.sampled_from(RULE_KEYS), st.text(max_size=6)), any_value, max_size=8),
)
documents = st.fixed_dictionaries({"rules": st.lists(rule, min_size=1, max_size=4)})
odd_documents = st.one_of(
    st.dictionaries(st.sampled_from(["rules", "other"]), st.one_of(st.lists(rule, max_size=4), scalars), max_size=2),
    st.lists(rule, max_size=2),
    scalars,
)


def load(text: str) -> None:
    try:
        rules = parse_rules(text, "fuzz.yaml", ENVIRON)
    except ConfigError as exc:
        message = str(exc)
    else:
        message = ""
    if message:
        # One line that names the file.
        assert message.startswith("fuzz.yaml")
        assert "\n" not in message
        return
    # Whatever loads also evaluates without raising.
    alerter = Alerter(rules)
    alerter.evaluate(calls_pb2.ApiCall(id="c", protocol="http", status="503"))
    alerter.evaluate(calls_pb2.ApiCall())


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_structured_documents(document: object) -> None:
    load(yaml.safe_dump(document, allow_unicode=True))


@settings(max_examples=scaled(100), deadline=None)
@given(odd_documents)
def test_odd_document_shapes(document: object) -> None:
    load(yaml.safe_dump(document, allow_unicode=True))


@settings(deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text(text: str) -> None:
    load(text)


@settings(deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "rules:",
                "\n",
                "  - ",
                "name: r",
                "condition: ",
                "&a ",
                "*a",
                "[",
                "{",
                "'",
                ":",
                "!!binary ",
                "? ",
                "- ",
                "webhook:",
                "url: ",
                "cooldown: 5s",
                "<<: ",
                "&b ",
                "*b",
            ]
        ),
        max_size=30,
    )
)
def test_yaml_fragments(pieces: list[str]) -> None:
    load("".join(pieces))
