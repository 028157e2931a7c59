"""The influxdb action against a real InfluxDB: Debian's `influxdb` (1.6), started once per
session on free ports with its own config and directories, authentication on.

Points are read back with InfluxDB's /query API: tags, fields and times as written, escapes
undone by InfluxDB's own parser; a refused login, an unknown database and a server that is not
there end in the dead letter, the first two at once (final answers), the last after its retries.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import pytest

from tests.action_sender import RecordingSender
from tests.influx_server import ADMIN, WRITER, Influx
from trawl.alerter.action_types import InfluxAction
from trawl.alerter.config import ActionSettings
from trawl.embedded import free_port
from trawl.v1 import alerts_pb2, calls_pb2

pytestmark = pytest.mark.skipif(shutil.which("influxd") is None, reason="needs influxd (make system-deps installs it)")


class Sender(RecordingSender):
    def __init__(self) -> None:
        super().__init__(ActionSettings(retries=2, backoff_s=0.25, timeout_s=5))


def firing(alert_id: str, **fields: Any) -> alerts_pb2.Alert:
    base: dict[str, Any] = {
        "id": alert_id,
        "rule": "error-ratio",
        "severity": alerts_pb2.SEVERITY_CRITICAL,
        "summary": 'error ratio 0.25 "checkout" \\ payments',
        "fired_at": 1_700_000_000_123_456_789,
        "group": "checkout -> payments,eu=1",
        "labels": {"team": "pay ments", "rule": "shadowed"},
        "value": 0.25,
        "window_calls": 120,
        "call": calls_pb2.ApiCall(id="c1", status="503"),
    }
    base.update(fields)
    return alerts_pb2.Alert(**base)


async def test_points_for_a_firing_and_its_resolve_read_back(influx: Influx) -> None:
    action = InfluxAction(url=influx.url, db="trawl", measurement="alerts, escaped", user=WRITER[0], password=WRITER[1])
    sender = Sender()
    assert await sender.deliver(firing("a1"), action)
    resolve = firing("a1r", resolved=True, resolved_at=1_700_000_300_000_000_001, value=0.01, window_calls=80)
    assert await sender.deliver(resolve, action)
    assert sender.dead == []
    assert sender.metrics.counter("trawl_alerter_influxdb_points_total", "").get(rule="error-ratio") == 2

    rows = influx.rows('SELECT * FROM "alerts, escaped" ORDER BY time', "trawl")
    assert [row["time"] for row in rows] == [1_700_000_000_123_456_789, 1_700_000_300_000_000_001]
    first, second = rows
    assert first["rule"] == "error-ratio"
    assert first["severity"] == "critical"
    assert first["group"] == "checkout -> payments,eu=1"
    assert first["team"] == "pay ments"
    assert first["label_rule"] == "shadowed"
    assert first["state"] == "firing"
    assert first["summary"] == 'error ratio 0.25 "checkout" \\ payments'
    assert first["alert_id"] == "a1"
    assert first["value"] == 0.25
    assert first["window_calls"] == 120
    assert (second["state"], second["alert_id"], second["value"], second["window_calls"]) == (
        "resolved",
        "a1r",
        0.01,
        80,
    )
    # Tags are tags (GROUP BY works on them), not fields.
    [tags] = influx.query('SHOW TAG KEYS FROM "alerts, escaped"', "trawl")["results"]
    keys = {value[0] for value in tags["series"][0]["values"]}
    assert keys == {"group", "label_rule", "rule", "severity", "state", "team"}


async def test_a_retention_policy_and_backslashes_in_tags(influx: Influx) -> None:
    action = InfluxAction(url=influx.url, db="trawl", retention_policy="week", user=WRITER[0], password=WRITER[1])
    labels = {"path": "a\\,b", "share": "\\\\host\\dir"}
    # Now: a 7-day policy drops older points (a partial write, HTTP 400).
    alert = firing("b1", group="C:\\", labels=labels, fired_at=time.time_ns())
    assert await Sender().deliver(alert, action)
    # (Other modules write to the same session server: this test's point is found by its id.)
    [row] = influx.rows("""SELECT * FROM "week"."trawl_alerts" WHERE "alert_id" = 'b1'""", "trawl")
    # InfluxDB 1.x cannot read a backslash that ends a tag or escapes a comma: written as '/'.
    assert (row["group"], row["path"], row["alert_id"]) == ("C:/", "a/,b", "b1")
    assert row["share"] == "\\\\host\\dir"  # the others are kept
    assert influx.rows("""SELECT * FROM "autogen"."trawl_alerts" WHERE "alert_id" = 'b1'""", "trawl") == []


@pytest.mark.parametrize(
    ("action_fields", "expected"),
    [
        ({"db": "trawl", "user": WRITER[0], "password": "wrong"}, "HTTP 401: authorization failed"),
        ({"db": "nosuchdb", "user": ADMIN[0], "password": ADMIN[1]}, 'HTTP 404: database not found: "nosuchdb"'),
    ],
)
async def test_a_final_refusal_is_dead_lettered_without_retries(
    influx: Influx, action_fields: dict[str, Any], expected: str
) -> None:
    sender = Sender()
    assert not await sender.deliver(firing("c1"), InfluxAction(url=influx.url, **action_fields))
    [failure] = sender.dead
    assert failure.reason == expected
    assert failure.attempts == 1
    assert sender.sleeps == []
    assert (
        sender.metrics.counter("trawl_alerter_actions_failed_total", "").get(rule="error-ratio", action="influxdb") == 1
    )


async def test_a_server_that_is_not_there_is_retried_then_dead_lettered() -> None:
    sender = Sender()
    action = InfluxAction(url=f"http://127.0.0.1:{free_port()}", db="trawl")
    assert not await sender.deliver(firing("d1"), action)
    [failure] = sender.dead
    assert failure.attempts == 3
    assert "ClientConnectorError" in failure.reason
    assert sender.sleeps == [0.25, 0.5]
    assert (
        sender.metrics.counter("trawl_alerter_action_retries_total", "").get(rule="error-ratio", action="influxdb") == 2
    )
    assert sender.metrics.counter("trawl_alerter_dead_letters_total", "").get(rule="error-ratio") == 1
