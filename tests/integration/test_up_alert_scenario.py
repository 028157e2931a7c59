"""The alerting and recording scenario end to end, as a user runs it: `trawl up --pcap` of a
minute of real HTTP traffic between two workloads (`checkout` -> `payments`) with a burst of
503s in the middle (tests/fixtures/make_alert_burst.py recorded it), with real peers for every
action: a webhook server, Debian's InfluxDB (influxd, started once per session) and moto's S3
server (the real S3 protocol; no S3 can be installed here) under Object Lock.

One windowed rule (error ratio over 10 s per pair of workloads) must fire once for the burst,
not once per 503, and be resolved after it; its `record` action starts a recording that begins
30 s before the window in which it fired (so it holds the 30 s before the first 503) and the
burst, checked packet for packet against the input with dpkt and tshark, and call for call
with `trawl analyze`; the webhook gets the
firing and the resolve, InfluxDB a point for each, and the recorder ships the sealed recording
to S3 with its checksum, where it is read back."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import dpkt
import pytest

from tests.conftest import FIXTURES, needs_binary
from tests.influx_server import ADMIN, Influx
from tests.integration.test_up import processes_mentioning, webhook  # noqa: F401 - the fixture
from tests.s3_server import locked_bucket, s3
from tests.webhook_server import WebhookServer

BURST = FIXTURES / "alert_burst.pcap"
IDENTITY = FIXTURES / "http1_identity.json"
SECOND = 1_000_000_000


def input_packets(path: Path) -> list[tuple[int, bytes]]:
    """(ts in µs, frame) of every packet of a pcap, as dpkt reads it."""
    with path.open("rb") as handle:
        return [(round(ts * 1e6), bytes(frame)) for ts, frame in dpkt.pcap.Reader(handle)]


def tshark_rows(path: Path) -> list[str]:
    return subprocess.run(
        ["tshark", "-n", "-r", str(path), "-T", "fields", "-e", "frame.time_epoch", "-e", "frame.len",
         "-e", "tcp.seq_raw", "-e", "http.response.code"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip


@needs_binary("tshark")
@needs_binary("influxd")
def test_a_burst_of_5xx_fires_once_resolves_records_and_ships(
    tmp_path: Path,
    webhook: WebhookServer,  # noqa: F811
    influx: Influx,
    s3_url: str,
) -> None:
    bucket = "trawl-scenario"
    locked_bucket(s3_url, bucket)
    influx.query("CREATE DATABASE scenario", post=True)  # its own: the server is the session's
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - name: payments-errors\n"
        '    condition: \'call.protocol == "http" && call.dst.workload == "payments"\'\n'
        "    group_by: 'call.src.workload + \" -> \" + call.dst.workload'\n"
        "    window: 10s\n"
        "    aggregate: 'error_ratio > 0.5'\n"
        "    min_calls: 5\n"
        "    severity: critical\n"
        "    summary: 'errors from {call.dst.workload}'\n"
        "    actions:\n"
        f"      - webhook: {{url: '{webhook.url}/hook', format: json}}\n"
        f"      - influxdb: {{url: '{influx.url}', db: scenario, user_env: SCENARIO_INFLUX_USER, "
        "password_env: SCENARIO_INFLUX_PASSWORD}\n"
        "      - record: {scope: flow, duration: 30s, lookback: 30s, format: pcap}\n"
    )
    config = tmp_path / "trawl.yaml"
    config.write_text(
        "recorder:\n"
        "  lookback_s: 90\n"  # a whole minute of capture; the record action says where to begin
        "  s3:\n"
        f"    endpoint_url: '{s3_url}'\n"
        f"    bucket: {bucket}\n"
        "    prefix: 'recordings/'\n"
        "    object_lock: {mode: GOVERNANCE, days: 1}\n"
    )
    state = tmp_path / "state"
    records = tmp_path / "recordings"
    result = subprocess.run(
        [sys.executable, "-m", "trawl", "up", "--pcap", str(BURST), "--identity", str(IDENTITY),
         "--rules", str(rules), "--record-dir", str(records), "--config", str(config), "--json",
         "--state-dir", str(state)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "SCENARIO_INFLUX_USER": ADMIN[0], "SCENARIO_INFLUX_PASSWORD": ADMIN[1]},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert processes_mentioning(str(state)) == [], "trawl up left processes behind"

    calls = [json.loads(line) for line in result.stdout.splitlines()]
    statuses = [call["status"] for call in calls]
    assert len(calls) == 144 and statuses.count("503") == 30
    first_503 = min(int(call["request"]["ts"]) for call in calls if call["status"] == "503")
    last_503 = max(int(call["response"]["end_ts"]) for call in calls if call["status"] == "503")

    # The webhook: one firing for the burst (not one per 503), then its resolve.
    bodies = webhook.json_bodies()
    assert [bool(body.get("resolved")) for body in bodies] == [False, True], bodies
    firing, resolve = bodies
    assert firing["rule"] == resolve["rule"] == "payments-errors"
    assert firing["group"] == "checkout -> payments"
    fired_at = int(firing["fired_at"])  # in the calls' own time: when the window first held
    assert first_503 <= fired_at <= last_503

    # InfluxDB: a point for the firing and one for the resolve, read back with its query API.
    points = influx.rows("SELECT * FROM trawl_alerts WHERE \"rule\" = 'payments-errors'", "scenario")
    assert sorted(point["state"] for point in points) == ["firing", "resolved"]
    assert {point["group"] for point in points} == {"checkout -> payments"}

    # The recording the alert started: from its look-back (30 s) before the window (10 s) in which
    # the rule fired, to the end of the input: the input's packets exactly, so the 30 s before
    # the first 503 and the burst are in it.
    on_demand = records / "on-demand"
    [recording] = sorted(on_demand.glob("*.pcap"))
    recorded = input_packets(recording)
    begins_us = (fired_at - 40 * SECOND) // 1000
    expected = [(ts, frame) for ts, frame in input_packets(BURST) if ts >= begins_us]
    assert recorded == expected
    assert recorded[0][0] <= (first_503 - 30 * SECOND) // 1000 and recorded[-1][0] >= last_503 // 1000
    with_burst = [row for row in tshark_rows(recording) if row.endswith("503")]
    assert len(with_burst) == 30
    assert tshark_rows(recording) == tshark_rows(BURST)[len(input_packets(BURST)) - len(expected) :]

    # trawl analyze reads the recording as the calls of that stretch of the input: every call
    # that began in it (the one under way when the recording began is cut), the whole burst.
    analyzed = subprocess.run(
        [sys.executable, "-m", "trawl", "analyze", str(recording), "--identity", str(IDENTITY), "--json"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    seen = {(c["path"], c["status"], c["request"]["ts"]) for c in map(json.loads, analyzed)}
    begun = {
        (c["path"], c["status"], c["request"]["ts"]) for c in calls if int(c["request"]["ts"]) >= recorded[0][0] * 1000
    }
    assert seen == begun and sum(1 for _, status, _ in seen if status == "503") == 30

    # S3: the sealed recording shipped under Object Lock, its checksum the file's own.
    client = s3(s3_url)
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    [key] = [key for key in keys if key.endswith(recording.name)]
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(recording.read_bytes()).hexdigest()
    head = client.head_object(Bucket=bucket, Key=key)
    assert head["ObjectLockMode"] == "GOVERNANCE"


pytestmark = pytest.mark.usefixtures("aws_env")
