"""Alert rules: a YAML file of CEL conditions over enriched calls, compiled and checked at load.

    rules:
      - name: server-errors                 # [A-Za-z0-9][A-Za-z0-9_-]*, unique; the alert subject token
        condition: 'call.protocol == "http" && int(call.status) >= 500'
        severity: critical                  # info | warning (default) | critical
        summary: 'HTTP {call.status} from {call.dst.workload}'
        group_by: 'call.src.workload + " -> " + call.dst.workload'   # optional CEL string expression
        cooldown: 60s                       # optional: at most one alert per rule and group per 60 s
        labels: {team: payments}            # optional, copied into every alert
        actions:
          - webhook: {url: "https://hooks.example/alerts", secret_env: HOOK_SECRET, format: json}
          - webhook: {url_env: SLACK_WEBHOOK_URL, format: slack}

A rule with `window` and `aggregate` judges the calls its condition matches per group over a
sliding window instead of one call at a time (trawl.alerter.windows documents both, `min_calls`
and `for`): it fires once when the aggregate holds and is resolved when it stops.

`condition` is a CEL expression (cel-python) over one variable, `call`: the enriched ApiCall
as a map with the keys of its protobuf JSON mapping with proto field names (`call.dst.namespace`,
`call.request.headers`, `call.http.version`), but CEL-native values: integers are `int`
(`call.elapsed_ns > 500000000`), bytes are `bytes`, enums are their names
(`call.outcome == "OUTCOME_ERROR"`). Every field is present with its default value, except the
protocol detail, of which only the one that is set exists (`has(call.http)`). The condition must
give a bool; `call.<field>` references are checked against ApiCall when the file is loaded.

`summary` is a plain template, not CEL: `{call.<field>...}` placeholders name a scalar field
(checked at load), `{{` and `}}` are literal braces. Default: `{call.method} {call.path} -> {call.status}`.

`cooldown` takes a duration (`500ms`, `60s`, `5m`, `1h30m`, `1d`, or a number of seconds) and
is measured in the calls' own time (their request timestamps), so a replayed capture alerts as
the live traffic would have. Webhook URLs and secrets can come from the environment
(`url_env`, `secret_env`), so a rules file holds no credentials.

Actions besides `webhook` (each retried with backoff, counted, and dead-lettered when it fails
for good, as the webhook is; trawl.alerter.actions):

    actions:
      - record: {scope: pods, filter: "tcp port 80", duration: 2m, lookback: 30s}   # the call's ends
      - influxdb: {url: "http://influx:8086", db: trawl, measurement: trawl_alerts, user_env: INFLUX_USER,
                   password_env: INFLUX_PASSWORD}                     # or bucket + org + token_env (2.x)
      - elasticsearch: {url: "https://es:9200", index: trawl-alerts, include_call: true,
                        call_index: trawl-calls, api_key_env: ES_API_KEY}
      - s3: {bucket: alert-evidence, prefix: alerts/, endpoint_url: "http://minio:9000", region: us-east-1,
             access_key_env: S3_KEY, secret_key_env: S3_SECRET, object_lock: {mode: GOVERNANCE, days: 30}}

`record` scopes: `flow` (default: the two IPs), `pods`, `workloads` (all pods of the two
workloads) or `namespaces`; the last three need the recorder's identity snapshot, and an end
without a pod is recorded by its IP. The recording begins `lookback` (30 s) before the alert's
call, or before the window and `for` of a windowed rule, as far as the recorder's look-back holds.
Credentials always come from environment variables (`*_env`), checked when the file is loaded.

Every problem is a ConfigError naming the file, the line of the rule or key at fault, and what
is wrong.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import celpy
import lark
import yaml
from celpy.celparser import CELParseError
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from trawl.alerter.action_types import (
    RECORD_SCOPES,
    Action,
    ElasticsearchAction,
    InfluxAction,
    RecordAction,
    RecordScope,
    S3Action,
    WebhookAction,
)
from trawl.alerter.cel_parser import load_cel_parser
from trawl.alerter.compiled import Evaluator, compile_expression
from trawl.alerter.guards import Guard, guard_of
from trawl.alerter.windows import WindowSpec, parse_aggregate
from trawl.errors import ConfigError
from trawl.s3 import LOCK_MODES, Credentials, LockMode, credentials_from_env
from trawl.v1 import alerts_pb2, calls_pb2

__all__ = ["Action", "ElasticsearchAction", "InfluxAction", "RecordAction", "Rule", "S3Action", "WebhookAction"]

SEVERITIES = {
    "info": alerts_pb2.SEVERITY_INFO,
    "warning": alerts_pb2.SEVERITY_WARNING,
    "critical": alerts_pb2.SEVERITY_CRITICAL,
}
RULE_KEYS = (
    "name",
    "condition",
    "severity",
    "summary",
    "group_by",
    "cooldown",
    "labels",
    "actions",
    "window",
    "aggregate",
    "min_calls",
    "for",
)
WEBHOOK_KEYS = ("url", "url_env", "secret_env", "format")
RECORD_KEYS = ("scope", "filter", "duration", "lookback", "format", "timeout")
INFLUX_KEYS = (
    "url",
    "url_env",
    "db",
    "retention_policy",
    "bucket",
    "org",
    "measurement",
    "token_env",
    "user_env",
    "password_env",
)
ELASTIC_KEYS = ("url", "url_env", "index", "include_call", "call_index", "api_key_env", "user_env", "password_env")
S3_KEYS = (
    "bucket",
    "prefix",
    "endpoint_url",
    "region",
    "access_key_env",
    "secret_key_env",
    "session_token_env",
    "object_lock",
)
OBJECT_LOCK_KEYS = ("mode", "days")
ACTIONS = ("webhook", "record", "influxdb", "elasticsearch", "s3")
# Elasticsearch's own rule for index names: lowercase, none of \ / * ? " < > | , # space, not starting with - _ +.
_INDEX_NAME = re.compile(r'^(?![-_+])[^A-Z\\/*?"<>|,# :]{1,255}$')
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION = re.compile(r"^[a-z]{2}(?:-[a-z]+)+-\d+$")
_MEASUREMENT = re.compile(r"^[^\x00-\x1f]{1,255}$")
_LINKTYPE_ETHERNET = 1
DEFAULT_SUMMARY = "{call.method} {call.path} -> {call.status}"
RULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
# Names a condition may use besides `call` and its macro variables: CEL's type identifiers.
_CEL_TYPE_NAMES = frozenset(
    {"bool", "bytes", "double", "duration", "int", "list", "map", "null_type", "string", "timestamp", "uint", "type"}
)
_CEL_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
_NULL_TAG = "tag:yaml.org,2002:null"


@dataclass(frozen=True)
class Template:
    """`summary`: literal text and `{call.a.b}` fields, resolved on the ApiCall proto."""

    text: str
    parts: tuple[str | tuple[tuple[str, ...], FieldDescriptor], ...]

    def render(self, call: calls_pb2.ApiCall) -> str:
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            path, leaf = part
            value: Any = call
            for name in path:
                value = getattr(value, name)
            out.append(_scalar_text(value, leaf))
        return "".join(out)


@dataclass(frozen=True)
class Rule:
    name: str
    condition: str
    program: celpy.Runner = field(repr=False)
    severity: alerts_pb2.Severity.ValueType
    summary: Template
    cooldown_s: float = 0.0
    group_by: celpy.Runner | None = field(default=None, repr=False)
    labels: dict[str, str] = field(default_factory=dict)
    actions: tuple[Action, ...] = ()
    line: int = 0
    # What the condition requires of call.protocol / call.outcome, checked before any CEL runs.
    guard: Guard | None = field(default=None, repr=False)
    # A windowed rule (window + aggregate): judged per group over its window (trawl.alerter.windows).
    window: WindowSpec | None = None
    # The condition and group_by as Python functions of the ApiCall (trawl.alerter.compiled), where they can be.
    compiled_condition: Evaluator | None = field(default=None, repr=False)
    compiled_group_by: Evaluator | None = field(default=None, repr=False)


def load_rules(path: Path, environ: dict[str, str] | None = None) -> list[Rule]:
    """Read and compile a rules file; ConfigError naming file, line and fault."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read rules file: {exc.strerror or exc}", path=path) from None
    except UnicodeDecodeError:
        raise ConfigError("rules file is not UTF-8 text", path=path) from None
    return parse_rules(text, path, environ)


def parse_rules(text: str, path: Path | str, environ: dict[str, str] | None = None) -> list[Rule]:
    """Compile the rules in `text`; `path` names the file in errors; `environ` defaults to os.environ."""
    env = dict(os.environ if environ is None else environ)
    load_cel_parser()
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"not valid YAML: {problem}", path=path, line=mark.line + 1 if mark else None) from None
    except RecursionError:
        raise ConfigError("not valid YAML: nested too deeply", path=path) from None
    if document is None:
        return []
    if not isinstance(document, yaml.MappingNode):
        raise ConfigError("a rules file is a mapping with one key, 'rules'", path=path, line=_line(document))
    rules_node: yaml.Node | None = None
    for key_node, value_node in document.value:
        key = _key(key_node)
        if key != "rules":
            raise ConfigError(
                f"unknown key {key!r}; a rules file has one key, 'rules'", path=path, line=_line(key_node)
            )
        if rules_node is not None:
            raise ConfigError("'rules' is given twice", path=path, line=_line(key_node))
        rules_node = value_node
    if rules_node is None or _is_null(rules_node):
        return []
    if not isinstance(rules_node, yaml.SequenceNode):
        raise ConfigError("'rules' must be a list of rules", path=path, line=_line(rules_node))
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for index, rule_node in enumerate(rules_node.value, start=1):
        rule = _RuleParser(path, rule_node, index, env).parse()
        if rule.name in seen:
            raise ConfigError(
                f"rule {rule.name!r} is defined twice (first on line {seen[rule.name]}); rule names must be unique",
                path=path,
                line=rule.line,
            )
        seen[rule.name] = rule.line
        rules.append(rule)
    return rules


class _RuleParser:
    def __init__(self, path: Path | str, node: yaml.Node, index: int, environ: dict[str, str]) -> None:
        self.path = path
        self.node = node
        self.environ = environ
        self.label = f"rule #{index}"
        self.flattened: set[int] = set()

    def fail(self, message: str, node: yaml.Node) -> ConfigError:
        return ConfigError(f"{self.label}: {message}", path=self.path, line=_line(node))

    def parse(self) -> Rule:
        if not isinstance(self.node, yaml.MappingNode):
            raise self.fail("a rule is a mapping with name, condition, severity, summary, actions...", self.node)
        for key_node, value_node in self.node.value:
            if (
                _key(key_node) == "name"
                and isinstance(value_node, yaml.ScalarNode)
                and RULE_NAME.match(value_node.value)
            ):
                self.label = f"rule {value_node.value!r}"
                break
        self.flatten(self.node)
        entries = self.entries(self.node, RULE_KEYS, "rule")
        if "name" not in entries:
            raise self.fail("has no 'name'", self.node)
        name_key, name_node = entries["name"]
        name = self.text(name_node, "name")
        if not RULE_NAME.match(name):
            raise self.fail(
                f"name {name!r} must be 1-64 letters, digits, '-' or '_', starting with a letter or digit", name_key
            )
        self.label = f"rule {name!r}"
        if "condition" not in entries:
            raise self.fail("has no 'condition' (a CEL expression over `call`)", self.node)
        condition_key, condition_node = entries["condition"]
        condition = self.text(condition_node, "condition")
        program = self.compile(condition, "condition", condition_key)
        severity = alerts_pb2.SEVERITY_WARNING
        if "severity" in entries:
            severity_key, severity_node = entries["severity"]
            word = self.text(severity_node, "severity").lower()
            if word not in SEVERITIES:
                raise self.fail(f"severity {word!r} is not one of {', '.join(SEVERITIES)}", severity_key)
            severity = SEVERITIES[word]
        summary = parse_template(DEFAULT_SUMMARY, lambda message: self.fail(message, self.node))
        if "summary" in entries:
            summary_key, summary_node = entries["summary"]
            text = self.text(summary_node, "summary")
            summary = parse_template(text, lambda message: self.fail(f"summary: {message}", summary_key))
        group_by = None
        group_text = ""
        if "group_by" in entries:
            group_key, group_node = entries["group_by"]
            group_text = self.text(group_node, "group_by")
            group_by = self.compile(group_text, "group_by", group_key)
        cooldown = 0.0
        if "cooldown" in entries:
            cooldown_key, cooldown_node = entries["cooldown"]
            raw = self.scalar(cooldown_node, "cooldown")
            parsed = parse_duration(raw)
            if parsed is None:
                raise self.fail(f"cooldown {raw!r} is not a duration such as 30s, 5m, 1h30m or 500ms", cooldown_key)
            cooldown = parsed
        labels: dict[str, str] = {}
        if "labels" in entries:
            labels_key, labels_node = entries["labels"]
            if _is_null(labels_node):
                labels_node = yaml.MappingNode("tag:yaml.org,2002:map", [])
            if not isinstance(labels_node, yaml.MappingNode):
                raise self.fail("labels must be a mapping of names to values", labels_key)
            for key_node, value_node in labels_node.value:
                labels[_key(key_node)] = self.scalar(value_node, "a label value")
        actions: list[Action] = []
        if "actions" in entries:
            actions_key, actions_node = entries["actions"]
            if not _is_null(actions_node):
                if not isinstance(actions_node, yaml.SequenceNode):
                    raise self.fail("actions must be a list, e.g. - webhook: {url: https://...}", actions_key)
                actions = [self.action(item) for item in actions_node.value]
                # Record actions first: the others wait for the recording's id (trawl.alerter.actions).
                actions.sort(key=lambda action: not isinstance(action, RecordAction))
        window = self.window(entries, cooldown)
        if window is not None:
            # A windowed rule fires after its window (and `for`) showed the behaviour: its
            # recordings begin before that, where the behaviour began.
            actions = [
                replace(action, window_s=window.window_s + window.for_s) if isinstance(action, RecordAction) else action
                for action in actions
            ]
        return Rule(
            name=name,
            condition=condition,
            program=program,
            severity=severity,
            summary=summary,
            cooldown_s=cooldown,
            group_by=group_by,
            labels=labels,
            actions=tuple(actions),
            line=_line(self.node),
            guard=guard_of(condition),
            compiled_condition=compile_expression(condition),
            compiled_group_by=compile_expression(group_text) if group_text else None,
            window=window,
        )

    def window(self, entries: dict[str, tuple[yaml.Node, yaml.Node]], cooldown: float) -> WindowSpec | None:
        """window, aggregate, min_calls and for: all or none of the first two, the others with them."""
        if "window" not in entries and "aggregate" not in entries:
            for key in ("min_calls", "for"):
                if key in entries:
                    raise self.fail(f"{key} needs a window and an aggregate (e.g. window: 5m)", entries[key][0])
            return None
        for present, missing, example in (
            ("window", "aggregate", "aggregate: 'error_ratio > 0.05'"),
            ("aggregate", "window", "window: 5m"),
        ):
            if present in entries and missing not in entries:
                raise self.fail(f"{present} needs {missing} too, e.g. {example}", entries[present][0])
        if cooldown:
            raise self.fail(
                "cooldown is for per-call rules: a windowed rule fires once and resolves (use for: to wait)",
                entries["cooldown"][0],
            )
        window_key, window_node = entries["window"]
        raw = self.scalar(window_node, "window")
        window_s = parse_duration(raw)
        if window_s is None or not 1 <= window_s <= 86400:
            raise self.fail(f"window {raw!r} is not a duration from 1s to 1d, such as 30s, 5m or 1h", window_key)
        aggregate_key, aggregate_node = entries["aggregate"]
        aggregate = parse_aggregate(self.scalar(aggregate_node, "aggregate"))
        if isinstance(aggregate, str):
            raise self.fail(aggregate, aggregate_key)
        min_calls = 1
        if "min_calls" in entries:
            min_key, min_node = entries["min_calls"]
            raw = self.scalar(min_node, "min_calls")
            if not raw.isdigit() or int(raw) < 1:
                raise self.fail(f"min_calls {raw!r} must be a whole number of calls, at least 1", min_key)
            min_calls = int(raw)
        for_s = 0.0
        if "for" in entries:
            for_key, for_node = entries["for"]
            raw = self.scalar(for_node, "for")
            parsed = parse_duration(raw)
            if parsed is None:
                raise self.fail(f"for {raw!r} is not a duration such as 30s, 5m or 1h30m", for_key)
            for_s = parsed
        return WindowSpec(window_s, aggregate, min_calls, for_s)

    def action(self, node: yaml.Node) -> Action:
        if not isinstance(node, yaml.MappingNode) or len(node.value) != 1:
            raise self.fail(f"an action is a mapping with one key, one of: {', '.join(ACTIONS)}", node)
        kind_node, spec_node = node.value[0]
        kind = _key(kind_node)
        if kind not in ACTIONS:
            raise self.fail(f"unknown action {kind!r}; known actions: {', '.join(ACTIONS)}", kind_node)
        if kind == "record" and _is_null(spec_node):
            spec_node = yaml.MappingNode("tag:yaml.org,2002:map", [], kind_node.start_mark)
        if not isinstance(spec_node, yaml.MappingNode):
            raise self.fail(f"{kind} needs a mapping, e.g. {_ACTION_EXAMPLES[kind]}", kind_node)
        if kind == "record":
            return self.record_action(kind_node, spec_node)
        if kind == "influxdb":
            return self.influx_action(kind_node, spec_node)
        if kind == "elasticsearch":
            return self.elastic_action(kind_node, spec_node)
        if kind == "s3":
            return self.s3_action(kind_node, spec_node)
        return self.webhook_action(kind_node, spec_node)

    def webhook_action(self, kind_node: yaml.Node, spec_node: yaml.MappingNode) -> WebhookAction:
        entries = self.entries(spec_node, WEBHOOK_KEYS, "webhook")
        url = self.url(entries, kind_node, "webhook")
        secret = None
        if "secret_env" in entries:
            secret = self.from_env(entries["secret_env"][1], "secret_env").encode()
        fmt: Literal["json", "slack"] = "json"
        if "format" in entries:
            format_key, format_node = entries["format"]
            word = self.text(format_node, "format")
            if word not in ("json", "slack"):
                raise self.fail(f"webhook format {word!r} is not 'json' or 'slack'", format_key)
            fmt = "slack" if word == "slack" else "json"
        return WebhookAction(url=url, format=fmt, secret=secret)

    def record_action(self, kind_node: yaml.Node, spec_node: yaml.MappingNode) -> RecordAction:
        entries = self.entries(spec_node, RECORD_KEYS, "record")
        scope: RecordScope = "flow"
        if "scope" in entries:
            scope_key, scope_node = entries["scope"]
            word = self.text(scope_node, "scope")
            if word not in RECORD_SCOPES:
                raise self.fail(f"record scope {word!r} is not one of {', '.join(RECORD_SCOPES)}", scope_key)
            scope = RECORD_SCOPES[RECORD_SCOPES.index(word)]
        expression = ""
        if "filter" in entries:
            filter_key, filter_node = entries["filter"]
            expression = self.text(filter_node, "filter")
            problem = _filter_problem(expression)
            if problem:
                raise self.fail(f"record filter {expression!r} is not a tcpdump filter: {problem}", filter_key)
        duration_s = 600
        if "duration" in entries:
            duration_key, duration_node = entries["duration"]
            raw = self.scalar(duration_node, "duration")
            seconds = parse_duration(raw)
            if seconds is None or not 1 <= seconds <= 86400:
                raise self.fail(
                    f"record duration {raw!r} is not a duration from 1s to 1d, such as 90s or 10m", duration_key
                )
            duration_s = max(1, round(seconds))
        fmt = ""
        if "format" in entries:
            format_key, format_node = entries["format"]
            fmt = self.text(format_node, "format")
            if fmt not in ("pcap", "pcapng"):
                raise self.fail(f"record format {fmt!r} is not 'pcap' or 'pcapng'", format_key)
        timeout_s = 5.0
        if "timeout" in entries:
            timeout_key, timeout_node = entries["timeout"]
            raw = self.scalar(timeout_node, "timeout")
            parsed = parse_duration(raw)
            if parsed is None or not 0 < parsed <= 300:
                raise self.fail(f"record timeout {raw!r} is not a duration above 0 up to 5m, such as 5s", timeout_key)
            timeout_s = parsed
        lookback_s = 30.0
        if "lookback" in entries:
            lookback_key, lookback_node = entries["lookback"]
            raw = self.scalar(lookback_node, "lookback")
            parsed = parse_duration(raw)
            if parsed is None or parsed > 86400:
                raise self.fail(
                    f"record lookback {raw!r} is not a duration from 0s to 1d, such as 30s or 2m", lookback_key
                )
            lookback_s = parsed
        return RecordAction(
            scope=scope,
            filter=expression,
            duration_s=duration_s,
            format=fmt,
            timeout_s=timeout_s,
            lookback_s=lookback_s,
        )

    def influx_action(self, kind_node: yaml.Node, spec_node: yaml.MappingNode) -> InfluxAction:
        entries = self.entries(spec_node, INFLUX_KEYS, "influxdb")
        url = self.url(entries, kind_node, "influxdb")
        if ("db" in entries) == ("bucket" in entries):
            raise self.fail(
                "influxdb needs exactly one of 'db' (InfluxDB 1.x: /write?db=...) or 'bucket' (2.x, with org)",
                kind_node,
            )
        names = {
            key: self.text(entries[key][1], key)
            for key in ("db", "retention_policy", "bucket", "org")
            if key in entries
        }
        if "bucket" in entries and "org" not in entries:
            raise self.fail(
                "influxdb bucket needs org too (InfluxDB 2.x writes to an org's bucket)", entries["bucket"][0]
            )
        if "org" in entries and "db" in entries:
            raise self.fail("influxdb org goes with bucket (2.x); with db (1.x) leave it out", entries["org"][0])
        if "retention_policy" in entries and "bucket" in entries:
            raise self.fail(
                "influxdb retention_policy goes with db (1.x); a 2.x bucket has its own", entries["retention_policy"][0]
            )
        measurement = "trawl_alerts"
        if "measurement" in entries:
            measurement_key, measurement_node = entries["measurement"]
            measurement = self.text(measurement_node, "measurement")
            if not _MEASUREMENT.match(measurement) or measurement.startswith("_"):
                raise self.fail(
                    f"influxdb measurement {measurement!r} must be 1-255 printable characters, not starting with '_'",
                    measurement_key,
                )
        token, user, password = self.credentials(entries, "token_env", "influxdb")
        return InfluxAction(
            url=url,
            measurement=measurement,
            db=names.get("db", ""),
            retention_policy=names.get("retention_policy", ""),
            bucket=names.get("bucket", ""),
            org=names.get("org", ""),
            token=token,
            user=user,
            password=password,
        )

    def elastic_action(self, kind_node: yaml.Node, spec_node: yaml.MappingNode) -> ElasticsearchAction:
        entries = self.entries(spec_node, ELASTIC_KEYS, "elasticsearch")
        url = self.url(entries, kind_node, "elasticsearch")
        indices = {"index": "trawl-alerts", "call_index": "trawl-calls"}
        for key in indices:
            if key in entries:
                index_key, index_node = entries[key]
                name = self.text(index_node, key)
                if not _INDEX_NAME.match(name) or name in (".", ".."):
                    raise self.fail(
                        f"elasticsearch {key} {name!r} is not an index name: lowercase, no spaces or "
                        '\\ / * ? " < > | , # :, not starting with - _ +',
                        index_key,
                    )
                indices[key] = name
        include_call = False
        if "include_call" in entries:
            include_call = self.boolean(entries["include_call"][1], "include_call")
        if "call_index" in entries and not include_call:
            raise self.fail("elasticsearch call_index needs include_call: true", entries["call_index"][0])
        api_key, user, password = self.credentials(entries, "api_key_env", "elasticsearch")
        return ElasticsearchAction(
            url=url,
            index=indices["index"],
            include_call=include_call,
            call_index=indices["call_index"],
            api_key=api_key,
            user=user,
            password=password,
        )

    def s3_action(self, kind_node: yaml.Node, spec_node: yaml.MappingNode) -> S3Action:
        entries = self.entries(spec_node, S3_KEYS, "s3")
        if "bucket" not in entries:
            raise self.fail("s3 needs a bucket, e.g. {bucket: alert-evidence}", kind_node)
        bucket_key, bucket_node = entries["bucket"]
        bucket = self.text(bucket_node, "bucket")
        if not _BUCKET_NAME.match(bucket) or ".." in bucket:
            raise self.fail(
                f"s3 bucket {bucket!r} is not a bucket name: 3-63 lowercase letters, digits, '.' or '-', "
                "starting and ending with a letter or digit",
                bucket_key,
            )
        prefix = ""
        if "prefix" in entries:
            prefix_key, prefix_node = entries["prefix"]
            prefix = self.scalar(prefix_node, "prefix").strip()
            if prefix.startswith("/") or len(prefix) > 512:
                raise self.fail(
                    f"s3 prefix {prefix!r} must not start with '/' (keys have no leading slash)", prefix_key
                )
        endpoint_url = None
        if "endpoint_url" in entries:
            endpoint_key, endpoint_node = entries["endpoint_url"]
            endpoint_url = self.text(endpoint_node, "endpoint_url")
            problem = url_problem(endpoint_url)
            if problem:
                raise self.fail(f"s3 endpoint_url {_shown_url(endpoint_url)!r} {problem}", endpoint_key)
        region = None
        if "region" in entries:
            region_key, region_node = entries["region"]
            region = self.text(region_node, "region")
            if not _REGION.match(region):
                raise self.fail(f"s3 region {region!r} is not a region name such as us-east-1 or eu-west-3", region_key)
        credentials: Credentials | None = None
        named = [key for key in ("access_key_env", "secret_key_env", "session_token_env") if key in entries]
        if named:
            if "access_key_env" not in entries or "secret_key_env" not in entries:
                raise self.fail(
                    "s3 needs access_key_env and secret_key_env together (or neither: boto3 then finds "
                    "credentials itself, in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or a role)",
                    entries[named[0]][0],
                )
            env_names = {key: self.env_name(entries[key][1], key) for key in named}
            found = credentials_from_env(
                env_names["access_key_env"],
                env_names["secret_key_env"],
                env_names.get("session_token_env"),
                self.environ,
            )
            if isinstance(found, str):
                raise self.fail(f"s3 credentials: {found}", entries[named[0]][0])
            credentials = found
        lock_mode: LockMode | None = None
        lock_days = 0
        if "object_lock" in entries:
            lock_key, lock_node = entries["object_lock"]
            if not isinstance(lock_node, yaml.MappingNode):
                raise self.fail("s3 object_lock needs a mapping: {mode: GOVERNANCE, days: 30}", lock_key)
            lock = self.entries(lock_node, OBJECT_LOCK_KEYS, "object_lock")
            if "mode" not in lock or "days" not in lock:
                raise self.fail("s3 object_lock needs mode and days, e.g. {mode: GOVERNANCE, days: 30}", lock_key)
            mode_key, mode_node = lock["mode"]
            word = self.text(mode_node, "mode").upper()
            if word not in LOCK_MODES:
                raise self.fail(f"s3 object_lock mode {word!r} is not one of {', '.join(LOCK_MODES)}", mode_key)
            lock_mode = LOCK_MODES[LOCK_MODES.index(word)]
            days_key, days_node = lock["days"]
            raw = self.scalar(days_node, "days")
            if not raw.isdigit() or not 1 <= int(raw) <= 36500:
                raise self.fail(f"s3 object_lock days {raw!r} must be a whole number of days from 1 to 36500", days_key)
            lock_days = int(raw)
        return S3Action(
            bucket=bucket,
            prefix=prefix,
            endpoint_url=endpoint_url,
            region=region,
            credentials=credentials,
            lock_mode=lock_mode,
            lock_days=lock_days,
        )

    def url(self, entries: dict[str, tuple[yaml.Node, yaml.Node]], kind_node: yaml.Node, kind: str) -> str:
        """`url` or `url_env` (exactly one), an http(s) URL."""
        if ("url" in entries) == ("url_env" in entries):
            raise self.fail(f"{kind} needs exactly one of 'url' or 'url_env'", kind_node)
        if "url" in entries:
            url_key, url_node = entries["url"]
            url = self.text(url_node, "url")
        else:
            url_key, url_node = entries["url_env"]
            url = self.from_env(url_node, "url_env")
        problem = url_problem(url)
        if problem:
            raise self.fail(f"{kind} url {_shown_url(url)!r} {problem}", url_key)
        return url

    def credentials(
        self, entries: dict[str, tuple[yaml.Node, yaml.Node]], token_key: str, kind: str
    ) -> tuple[str | None, str | None, str | None]:
        """(token, user, password) from their `*_env` keys: a token, or a user with a password, or none."""
        if "user_env" in entries and token_key in entries:
            raise self.fail(f"{kind}: give {token_key} or user_env/password_env, not both", entries[token_key][0])
        if ("user_env" in entries) != ("password_env" in entries):
            present = "user_env" if "user_env" in entries else "password_env"
            raise self.fail(f"{kind}: user_env and password_env go together", entries[present][0])
        token = self.from_env(entries[token_key][1], token_key) if token_key in entries else None
        user = self.from_env(entries["user_env"][1], "user_env") if "user_env" in entries else None
        password = self.from_env(entries["password_env"][1], "password_env") if "password_env" in entries else None
        return token, user, password

    def boolean(self, node: yaml.Node, what: str) -> bool:
        word = self.scalar(node, what).strip().lower()
        if word in ("true", "yes", "on"):
            return True
        if word in ("false", "no", "off"):
            return False
        raise self.fail(f"{what} must be true or false, not {word!r}", node)

    def env_name(self, node: yaml.Node, what: str) -> str:
        name = self.text(node, what)
        if not ENV_NAME.match(name):
            raise self.fail(f"{what} {name!r} is not an environment variable name", node)
        return name

    def from_env(self, node: yaml.Node, what: str) -> str:
        name = self.env_name(node, what)
        value = self.environ.get(name, "")
        if not value:
            raise self.fail(f"{what}: environment variable {name} is not set", node)
        return value

    def entries(
        self, node: yaml.MappingNode, known: tuple[str, ...], what: str
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        self.flatten(node)
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = _key(key_node)
            if key not in known:
                raise self.fail(f"unknown {what} key {key!r}; known keys: {', '.join(known)}", key_node)
            out[key] = (key_node, value_node)
        return out

    def flatten(self, node: yaml.MappingNode) -> None:
        """Refuse a key written twice, then resolve YAML merge keys (`<<: *defaults`) in place.

        Merged keys come first and the mapping's own keys after them, so its own win.
        """
        if id(node) in self.flattened:
            return
        written: set[str] = set()
        for key_node, _ in node.value:
            key = _key(key_node)
            if key in written and key != "<<":
                raise self.fail(f"key {key!r} is given twice", key_node)
            written.add(key)
        try:
            yaml.SafeLoader("").flatten_mapping(node)
        except yaml.YAMLError as exc:
            raise self.fail(f"bad merge key: {getattr(exc, 'problem', None) or exc}", node) from None
        self.flattened.add(id(node))

    def scalar(self, node: yaml.Node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag == _NULL_TAG:
            raise self.fail(f"{what} must be a single value", node)
        return str(node.value)

    def text(self, node: yaml.Node, what: str) -> str:
        value = self.scalar(node, what).strip()
        if not value:
            raise self.fail(f"{what} is empty", node)
        return value

    def compile(self, text: str, what: str, node: yaml.Node) -> celpy.Runner:
        # The interpreted runner: the compiled one depends on which tree class cel-python's
        # process-wide parser singleton was first built with, which another user may have chosen.
        environment = celpy.Environment()
        try:
            tree = environment.compile(text)
        except CELParseError as exc:
            raise self.fail(f"{what} is not valid CEL: {_parse_error(text, exc)}", node) from None
        except RecursionError:
            raise self.fail(f"{what} is not valid CEL: nested too deeply", node) from None
        except Exception as exc:
            raise self.fail(f"{what} is not valid CEL: {_first_line(exc)}", node) from None
        problem = reference_problem(tree)
        if problem:
            raise self.fail(f"{what}: {problem}", node)
        try:
            return environment.program(tree)
        except Exception as exc:
            raise self.fail(f"{what} is not valid CEL: {_first_line(exc)}", node) from None


def parse_template(text: str, fail: Callable[[str], ConfigError]) -> Template:
    parts: list[str | tuple[tuple[str, ...], FieldDescriptor]] = []
    position = 0
    for match in _PLACEHOLDER.finditer(text):
        parts.append(text[position : match.start()])
        position = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            parts.append(token[0])
            continue
        if token in ("{", "}"):
            raise fail(f"unbalanced {token!r} at character {match.start() + 1}; write {token * 2} for a literal brace")
        inner = (match.group(1) or "").strip()
        segments = inner.split(".")
        if len(segments) < 2 or segments[0] != "call":
            raise fail(f"placeholder {{{inner}}} must name a call field, e.g. {{call.status}}")
        leaf = _resolve_scalar(segments[1:], fail)
        parts.append((tuple(segments[1:]), leaf))
    parts.append(text[position:])
    return Template(text, tuple(part for part in parts if part != ""))


def parse_duration(text: str) -> float | None:
    """Seconds in `500ms`, `60s`, `5m`, `1h30m`, `1d` or a plain number of seconds; None if not a duration."""
    compact = text.strip().replace(" ", "")
    try:
        seconds = float(compact)
    except ValueError:
        if not compact or _DURATION_PART.sub("", compact):
            return None
        seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(compact))
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


_ACTION_EXAMPLES = {
    "webhook": "{url: https://..., format: json}",
    "record": "{scope: pods, duration: 2m}",
    "influxdb": "{url: http://influx:8086, db: trawl}",
    "elasticsearch": "{url: https://es:9200, index: trawl-alerts}",
    "s3": "{bucket: alert-evidence, prefix: alerts/}",
}


def _filter_problem(expression: str) -> str | None:
    """libpcap's own complaint about a tcpdump filter, compiled as the recorder will (None: fine)."""
    from trawl.collector.bpf_filter import _pcap  # libpcap through ctypes: loaded only when a rule records

    try:
        _pcap().compile(expression, _LINKTYPE_ETHERNET, 262144)
    except ConfigError as exc:
        return str(exc).removeprefix(f"bad filter {expression!r}: ")
    return None


def url_problem(url: str) -> str | None:
    """Why `url` cannot be POSTed to, or None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if not parts.hostname:
        return "has no host"
    if port == 0:
        return "has port 0"
    return None


def reference_problem(tree: lark.Tree[Any]) -> str | None:
    """Names a condition uses that cannot exist: an unknown variable or an ApiCall field it lacks."""
    macro_variables: set[str] = set()
    for node in tree.iter_subtrees():
        if node.data == "member_dot_arg" and len(node.children) >= 3:
            method, arguments = node.children[1], node.children[2]
            if str(method) in _CEL_MACROS and isinstance(arguments, lark.Tree) and arguments.children:
                variable = _bare_ident(arguments.children[0])
                if variable:
                    macro_variables.add(variable)
    for node in tree.iter_subtrees():
        if node.data == "primary" and node.children and _is_tree(node.children[0], "ident"):
            name = str(node.children[0].children[0])
            if name != "call" and name not in macro_variables and name not in _CEL_TYPE_NAMES:
                return f"unknown name {name!r}; the call is `call` (e.g. call.status)"
        if node.data == "member_dot":
            path = _dotted_path(node)
            if path and path[0] == "call":
                problem = _field_path_problem(path)
                if problem:
                    return problem
    return None


def _field_path_problem(path: list[str]) -> str | None:
    descriptor: Descriptor = calls_pb2.ApiCall.DESCRIPTOR
    walked = "call"
    for name in path[1:]:
        found = descriptor.fields_by_name.get(name)
        if found is None:
            known = ", ".join(sorted(descriptor.fields_by_name))
            return f"{walked} has no field {name!r}; its fields are: {known}"
        walked += f".{name}"
        if found.is_repeated or found.message_type is None:
            # Lists, maps and scalars end what can be checked; a scalar followed by `.x` cannot work.
            if found.message_type is None and not found.is_repeated and name != path[-1]:
                return f"{walked} is a {_type_name(found)}, it has no fields"
            return None
        descriptor = found.message_type
    return None


def _resolve_scalar(names: list[str], fail: Callable[[str], ConfigError]) -> FieldDescriptor:
    descriptor: Descriptor = calls_pb2.ApiCall.DESCRIPTOR
    walked = "call"
    for position, name in enumerate(names):
        found = descriptor.fields_by_name.get(name)
        if found is None:
            raise fail(
                f"{walked} has no field {name!r}; its fields are: {', '.join(sorted(descriptor.fields_by_name))}"
            )
        walked += f".{name}"
        last = position == len(names) - 1
        if found.message_type is not None and not (found.is_repeated and found.message_type.GetOptions().map_entry):
            if found.is_repeated or last:
                raise fail(f"{{{walked}}} is not a single value; name one of its fields")
            descriptor = found.message_type
            continue
        if found.message_type is not None or not last:
            raise fail(f"{{{walked}}} is not a single value")
        return found
    raise fail(f"{{{walked}}} names no field")


def _scalar_text(value: Any, leaf: FieldDescriptor) -> str:
    if leaf.is_repeated:
        return ", ".join(_scalar_text_one(item, leaf) for item in value)
    return _scalar_text_one(value, leaf)


def _scalar_text_one(value: Any, leaf: FieldDescriptor) -> str:
    if leaf.enum_type is not None:
        member = leaf.enum_type.values_by_number.get(int(value))
        return member.name if member is not None else str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _type_name(found: FieldDescriptor) -> str:
    if found.enum_type is not None:
        return "enum name (string)"
    if found.type == FieldDescriptor.TYPE_STRING:
        return "string"
    if found.type == FieldDescriptor.TYPE_BYTES:
        return "bytes value"
    if found.type == FieldDescriptor.TYPE_BOOL:
        return "bool"
    if found.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return "double"
    return "int"


def _is_tree(node: object, data: str) -> bool:
    return isinstance(node, lark.Tree) and node.data == data


def _bare_ident(node: object) -> str | None:
    """The name if this expression is a lone identifier (descending CEL's single-child wrappers)."""
    while isinstance(node, lark.Tree):
        if node.data == "ident":
            return str(node.children[0])
        if len(node.children) != 1:
            return None
        node = node.children[0]
    return None


def _dotted_path(node: lark.Tree[Any]) -> list[str] | None:
    """`a.b.c` for a member_dot chain that starts at an identifier, else None."""
    names: list[str] = []
    current: object = node
    while True:
        if _is_tree(current, "member_dot"):
            assert isinstance(current, lark.Tree)
            inner, attribute = current.children[0], current.children[1]
            names.append(str(attribute))
            current = inner
        elif _is_tree(current, "member"):
            assert isinstance(current, lark.Tree)
            if len(current.children) != 1:
                return None
            current = current.children[0]
        elif _is_tree(current, "primary"):
            assert isinstance(current, lark.Tree)
            head = current.children[0] if current.children else None
            if not _is_tree(head, "ident"):
                return None
            assert isinstance(head, lark.Tree)
            names.append(str(head.children[0]))
            return names[::-1]
        else:
            return None


def _parse_error(text: str, exc: CELParseError) -> str:
    line = exc.line or 1
    column = exc.column or 1
    lines = text.splitlines() or [text]
    source = lines[min(line, len(lines)) - 1]
    where = f"line {line} column {column}" if len(lines) > 1 else f"column {column}"
    return f"syntax error at {where} of {source.strip()!r}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _shown_url(url: str) -> str:
    return url if len(url) <= 80 else url[:77] + "..."


def _key(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return str(node.value)
    return f"<{type(node).__name__.removesuffix('Node').lower()}>"


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1
