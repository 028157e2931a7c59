"""The record, influxdb, elasticsearch and s3 actions in a rules file: what they load as, and
every fault named with the file, the line and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from trawl.alerter.action_types import ElasticsearchAction, InfluxAction, RecordAction, S3Action
from trawl.alerter.rules import load_rules, parse_rules
from trawl.errors import ConfigError
from trawl.s3 import Credentials

ENV = {
    "INFLUX_USER": "writer",
    "INFLUX_PASSWORD": "pw",
    "INFLUX_TOKEN": "tok",
    "ES_KEY": "ZW5jb2RlZA==",
    "S3_KEY": "AKIA",
    "S3_SECRET": "shh",
}


def one_rule(actions: str, environ: dict[str, str] | None = None) -> list[object]:
    text = "rules:\n  - name: r1\n    condition: 'true'\n    actions:\n" + actions
    [rule] = parse_rules(text, "rules.yaml", ENV if environ is None else environ)
    return list(rule.actions)


def test_every_action_kind_loads_from_one_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "rules:\n"
        "  - name: errors\n"
        "    condition: 'call.status == \"503\"'\n"
        "    actions:\n"
        "      - record: {scope: pods, filter: 'tcp port 80', duration: 2m, format: pcapng, timeout: 2s}\n"
        "      - record:\n"
        "      - influxdb: {url: 'http://influx:8086', db: trawl, retention_policy: week, measurement: alerts,\n"
        "                   user_env: INFLUX_USER, password_env: INFLUX_PASSWORD}\n"
        "      - influxdb: {url: 'http://influx2:8086/', bucket: b, org: o, token_env: INFLUX_TOKEN}\n"
        "      - elasticsearch: {url: 'https://es:9200', index: alerts-x, include_call: true,\n"
        "                        call_index: calls-x, api_key_env: ES_KEY}\n"
        "      - s3: {bucket: alert-evidence, prefix: alerts/, endpoint_url: 'http://minio:9000',\n"
        "             region: eu-west-3, access_key_env: S3_KEY, secret_key_env: S3_SECRET,\n"
        "             object_lock: {mode: governance, days: 30}}\n"
    )
    [rule] = load_rules(path, ENV)
    record, default_record, influx1, influx2, elastic, s3 = rule.actions
    assert record == RecordAction(scope="pods", filter="tcp port 80", duration_s=120, format="pcapng", timeout_s=2.0)
    assert default_record == RecordAction()
    assert default_record.scope == "flow"
    assert default_record.duration_s == 600
    assert influx1 == InfluxAction(
        url="http://influx:8086",
        measurement="alerts",
        db="trawl",
        retention_policy="week",
        user="writer",
        password="pw",
    )
    assert influx2 == InfluxAction(url="http://influx2:8086/", bucket="b", org="o", token="tok")
    assert elastic == ElasticsearchAction(
        url="https://es:9200", index="alerts-x", include_call=True, call_index="calls-x", api_key="ZW5jb2RlZA=="
    )
    assert s3 == S3Action(
        bucket="alert-evidence",
        prefix="alerts/",
        endpoint_url="http://minio:9000",
        region="eu-west-3",
        credentials=Credentials("AKIA", "shh"),
        lock_mode="GOVERNANCE",
        lock_days=30,
    )
    # What logs and dead letters show of each target: no secret.
    shown = " ".join(repr(action) + action.where for action in rule.actions)
    for secret in ("pw", "tok", "ZW5jb2RlZA==", "shh"):
        assert f"'{secret}'" not in shown
    assert [action.where for action in rule.actions] == [
        "recorder",
        "recorder",
        "http://influx:8086",
        "http://influx2:8086",
        "https://es:9200",
        "http://minio:9000/alert-evidence",
    ]


def test_a_windowed_rules_recording_begins_before_its_window_and_for() -> None:
    text = (
        "rules:\n  - name: r1\n    condition: 'true'\n    window: 5m\n    aggregate: 'error_ratio > 0.1'\n"
        "    for: 1m\n    actions:\n      - record: {lookback: 45s}\n      - s3: {bucket: evidence}\n"
    )
    [rule] = parse_rules(text, "rules.yaml", {})
    record, s3 = rule.actions
    assert record == RecordAction(lookback_s=45, window_s=360)
    assert s3 == S3Action(bucket="evidence")


def test_s3_without_named_credentials_leaves_them_to_boto3() -> None:
    [s3] = one_rule("      - s3: {bucket: evidence}\n")
    assert s3 == S3Action(bucket="evidence")


@pytest.mark.parametrize(
    ("action", "line", "expected"),
    [
        ("      - recrod: {}\n", 5, "unknown action 'recrod'; known actions: webhook, record, influxdb"),
        ("      - record: {scope: cluster}\n", 5, "record scope 'cluster' is not one of flow, pods, workloads"),
        ("      - record: {duration: 10 minutes}\n", 5, "record duration '10 minutes' is not a duration"),
        ("      - record: {duration: 2d}\n", 5, "is not a duration from 1s to 1d"),
        ("      - record: {duration: 0s}\n", 5, "is not a duration from 1s to 1d"),
        ("      - record: {filter: 'tcp prot 80'}\n", 5, "record filter 'tcp prot 80' is not a tcpdump filter"),
        ("      - record: {format: pcapx}\n", 5, "record format 'pcapx' is not 'pcap' or 'pcapng'"),
        ("      - record: {lookback: 2d}\n", 5, "record lookback '2d' is not a duration from 0s to 1d"),
        ("      - record: {timeout: forever}\n", 5, "record timeout 'forever' is not a duration"),
        ("      - record: {lookbak: 30s}\n", 5, "unknown record key 'lookbak'; known keys: scope, filter"),
        ("      - record: [pods]\n", 5, "record needs a mapping, e.g. {scope: pods, duration: 2m}"),
        ("      - influxdb: {url: 'http://i:8086'}\n", 5, "exactly one of 'db' (InfluxDB 1.x"),
        ("      - influxdb: {url: 'http://i:8086', db: a, bucket: b}\n", 5, "exactly one of 'db'"),
        ("      - influxdb: {url: 'http://i:8086', bucket: b}\n", 5, "bucket needs org too"),
        ("      - influxdb: {url: 'http://i:8086', db: a, org: o}\n", 5, "org goes with bucket"),
        ("      - influxdb: {url: 'tcp://i:8086', db: a}\n", 5, "influxdb url 'tcp://i:8086' must start with http"),
        ("      - influxdb: {db: a}\n", 5, "influxdb needs exactly one of 'url' or 'url_env'"),
        ("      - influxdb: {url_env: NO_SUCH_URL, db: a}\n", 5, "environment variable NO_SUCH_URL is not set"),
        ("      - influxdb: {url: 'http://i', db: a, user_env: INFLUX_USER}\n", 5, "user_env and password_env go"),
        (
            "      - influxdb: {url: 'http://i', db: a, token_env: INFLUX_TOKEN, user_env: INFLUX_USER}\n",
            5,
            "give token_env or user_env/password_env, not both",
        ),
        ("      - influxdb: {url: 'http://i', db: a, token_env: NO_TOKEN}\n", 5, "NO_TOKEN is not set"),
        ("      - influxdb: {url: 'http://i', db: a, measurement: _internal}\n", 5, "measurement '_internal' must"),
        ("      - influxdb: {url: 'http://i', db: a, database: b}\n", 5, "unknown influxdb key 'database'"),
        ("      - elasticsearch: {url: 'http://e', index: Alerts}\n", 5, "index 'Alerts' is not an index name"),
        ("      - elasticsearch: {url: 'http://e', index: _alerts}\n", 5, "is not an index name"),
        ("      - elasticsearch: {url: 'http://e', include_call: maybe}\n", 5, "include_call must be true or false"),
        ("      - elasticsearch: {url: 'http://e', call_index: c}\n", 5, "call_index needs include_call: true"),
        ("      - elasticsearch: {url: 'http://e', api_key_env: NO_KEY}\n", 5, "NO_KEY is not set"),
        ("      - elasticsearch: {url: 'http://e:0'}\n", 5, "has port 0"),
        ("      - s3: {prefix: x/}\n", 5, "s3 needs a bucket"),
        ("      - s3: {bucket: Evidence}\n", 5, "s3 bucket 'Evidence' is not a bucket name"),
        ("      - s3: {bucket: ev, region: Europe}\n", 5, "s3 bucket 'ev' is not a bucket name"),
        ("      - s3: {bucket: evidence, region: Europe}\n", 5, "s3 region 'Europe' is not a region name"),
        ("      - s3: {bucket: evidence, endpoint_url: 'minio:9000'}\n", 5, "must start with http"),
        ("      - s3: {bucket: evidence, prefix: /alerts}\n", 5, "must not start with '/'"),
        ("      - s3: {bucket: evidence, access_key_env: S3_KEY}\n", 5, "access_key_env and secret_key_env together"),
        (
            "      - s3: {bucket: evidence, access_key_env: NO_A, secret_key_env: NO_B}\n",
            5,
            "environment variable NO_A and NO_B are not set",
        ),
        ("      - s3: {bucket: evidence, object_lock: {mode: governance}}\n", 5, "needs mode and days"),
        ("      - s3: {bucket: evidence, object_lock: {mode: legal, days: 3}}\n", 5, "mode 'LEGAL' is not one of"),
        ("      - s3: {bucket: evidence, object_lock: {mode: compliance, days: 0}}\n", 5, "whole number of days"),
        ("      - s3: {bucket: evidence, object_lock: {mode: compliance, days: 1, years: 1}}\n", 5, "'years'"),
    ],
)
def test_each_action_fault_names_its_line(action: str, line: int, expected: str) -> None:
    text = "rules:\n  - name: r1\n    condition: 'true'\n    actions:\n" + action
    with pytest.raises(ConfigError) as caught:
        parse_rules(text, "rules.yaml", ENV)
    message = str(caught.value)
    assert caught.value.line == line, message
    assert expected in message, message
    assert message.startswith(f"rules.yaml:{line}: rule 'r1': "), message


def test_a_fault_on_a_later_line_of_a_block_mapping_names_that_line() -> None:
    text = (
        "rules:\n  - name: r1\n    condition: 'true'\n    actions:\n"
        "      - influxdb:\n"
        "          url: 'http://influx:8086'\n"
        "          db: trawl\n"
        "          password_env: INFLUX_PASSWORD\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_rules(text, "rules.yaml", ENV)
    assert caught.value.line == 8
    assert "user_env and password_env go together" in str(caught.value)
