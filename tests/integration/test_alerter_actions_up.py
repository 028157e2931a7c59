"""`trawl up --pcap` with a rule whose actions record, write to InfluxDB and call a webhook: the
whole suite as separate processes, the real recorder answering the alerter, the real InfluxDB
(Debian's, from the influxdb tests' session fixture) and moto's S3 server. Checked: the recording
the alert started holds its flow from the capture's start (the look-back before the alert),
packet for packet against the input and as tshark reads it; the point, the webhook's alert and
the evidence object (under Object Lock) name that recording."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dpkt
import pytest

from tests.conftest import FIXTURES, needs_binary
from tests.influx_server import WRITER, Influx
from tests.integration.test_alerter_actions_s3 import client
from tests.webhook_server import WebhookServer

pytestmark = pytest.mark.skipif(shutil.which("influxd") is None, reason="needs influxd (make system-deps)")

HTTP1 = FIXTURES / "http1.pcap"
IDENTITY = FIXTURES / "http1_identity.json"


@needs_binary("tshark")
def test_up_pcap_alert_records_its_flow_writes_a_point_and_uploads_evidence(
    tmp_path: Path,
    influx: Influx,
    moto_url: str,
) -> None:
    influx.query("CREATE DATABASE up_actions", post=True)
    influx.query(f"GRANT WRITE ON up_actions TO {WRITER[0]}", post=True)
    client(moto_url).create_bucket(Bucket="up-evidence", ObjectLockEnabledForBucket=True)
    webhook = WebhookServer()
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - name: server-errors\n"
        "    condition: 'call.protocol == \"http\" && int(call.status) >= 500'\n"
        "    severity: critical\n"
        "    labels: {team: payments}\n"
        "    actions:\n"
        "      - webhook: {url: '" + webhook.url + "/hook'}\n"
        "      - influxdb: {url: '" + influx.url + "', db: up_actions, user_env: UP_INFLUX_USER,\n"
        "                   password_env: UP_INFLUX_PASSWORD}\n"
        "      - record: {scope: flow, filter: 'tcp', duration: 10m, lookback: 30s}\n"
        "      - s3: {bucket: up-evidence, prefix: alerts/, endpoint_url: '" + moto_url + "', region: us-east-1,\n"
        "             access_key_env: UP_S3_KEY, secret_key_env: UP_S3_SECRET,\n"
        "             object_lock: {mode: COMPLIANCE, days: 1}}\n"
    )
    state, records = tmp_path / "state", tmp_path / "recordings"
    env = dict(os.environ, UP_INFLUX_USER=WRITER[0], UP_INFLUX_PASSWORD=WRITER[1], UP_S3_KEY="k", UP_S3_SECRET="s")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "trawl", "up", "--pcap", str(HTTP1), "--identity", str(IDENTITY),
             "--rules", str(rules), "--record-dir", str(records), "--json", "--state-dir", str(state)],
            capture_output=True, text=True, timeout=180, env=env,
        )  # fmt: skip
        bodies = webhook.json_bodies()
    finally:
        webhook.close()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr

    # The webhook's alert names the recording its record action started.
    [alert] = bodies
    assert alert["call"]["path"] == "/api/fail"
    recording_id = alert["labels"]["recording_id"]
    assert alert["labels"]["team"] == "payments"

    # The recording: the alert's flow (127.0.0.2 <-> 127.0.0.3, the whole capture) from its first
    # packet, 30 s of look-back being more than the capture lasts, through the alert's call.
    [recording] = sorted((records / "on-demand").glob(f"{recording_id}*.pcapng"))
    with HTTP1.open("rb") as original, recording.open("rb") as recorded:
        expected = [(ts, bytes(frame)) for ts, frame in dpkt.pcap.Reader(original)]
        got = [(ts, bytes(frame)) for ts, frame in dpkt.pcapng.Reader(recorded)]
    assert got == expected
    fields = ["-T", "fields", "-e", "frame.time_epoch", "-e", "ip.src", "-e", "ip.dst", "-e", "frame.len"]
    assert (
        subprocess.run(["tshark", "-r", str(recording), *fields], capture_output=True, text=True, check=True).stdout
        == subprocess.run(["tshark", "-r", str(HTTP1), *fields], capture_output=True, text=True, check=True).stdout
    )

    # InfluxDB holds the alert's point, with the recording and the rule's labels as tags.
    [point] = influx.rows("SELECT * FROM trawl_alerts", "up_actions")
    assert (point["rule"], point["severity"], point["state"], point["team"]) == (
        "server-errors",
        "critical",
        "firing",
        "payments",
    )
    assert point["recording_id"] == recording_id
    assert point["alert_id"] == alert["id"]
    assert point["time"] == int(alert["fired_at"])

    # The S3 stand-in holds the alert as evidence, under retention, naming the recording too.
    [listed] = client(moto_url).list_objects_v2(Bucket="up-evidence")["Contents"]
    assert listed["Key"].startswith("alerts/server-errors/") and listed["Key"].endswith(f"/{alert['id']}.json")
    stored = client(moto_url).get_object(Bucket="up-evidence", Key=listed["Key"])
    assert stored["ObjectLockMode"] == "COMPLIANCE"
    assert json.loads(stored["Body"].read()) == alert
