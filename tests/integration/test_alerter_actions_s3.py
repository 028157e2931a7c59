"""The s3 action against moto's S3 server (`moto[server]`, ThreadedMotoServer), the real-protocol
stand-in: no S3 can be installed here, and moto answers boto3 with S3's own HTTP protocol
(signatures, checksums, Object Lock headers, versions), so trawl.s3 runs as against AWS.

Checked: the alert's JSON lands under <prefix><rule>/<day>/<id>.json with its SHA-256, content
type, metadata and, in a bucket with Object Lock, the retention asked (its deletion refused);
credentials come from the environment variables the rules file names; a bucket that does not
exist is final, an endpoint that is not there is retried, both end counted and dead-lettered.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from botocore.exceptions import ClientError
from google.protobuf.json_format import MessageToDict

from tests.action_sender import RecordingSender
from trawl.alerter.action_types import S3Action
from trawl.alerter.config import ActionSettings
from trawl.alerter.rules import parse_rules
from trawl.embedded import free_port
from trawl.s3 import Credentials, s3_client
from trawl.v1 import alerts_pb2, calls_pb2

KEYS = Credentials("moto-key", "moto-secret")


def client(url: str) -> Any:
    return s3_client(SimpleNamespace(endpoint_url=url, region="us-east-1"), KEYS)


class Sender(RecordingSender):
    def __init__(self) -> None:
        super().__init__(ActionSettings(retries=1, backoff_s=0.5, timeout_s=2))


def make_alert(alert_id: str = "5a1e") -> alerts_pb2.Alert:
    return alerts_pb2.Alert(
        id=alert_id,
        rule="errors",
        severity=alerts_pb2.SEVERITY_CRITICAL,
        summary="HTTP 503 from payments",
        fired_at=1_700_000_000_123_456_789,
        call=calls_pb2.ApiCall(id="c-503", protocol="http", status="503"),
    )


async def test_evidence_under_object_lock(moto_url: str) -> None:
    s3 = client(moto_url)
    s3.create_bucket(Bucket="evidence-locked", ObjectLockEnabledForBucket=True)
    action = S3Action(
        bucket="evidence-locked",
        prefix="alerts/",
        endpoint_url=moto_url,
        region="us-east-1",
        credentials=KEYS,
        lock_mode="GOVERNANCE",
        lock_days=30,
    )
    sender = Sender()
    before = datetime.now(UTC)
    assert await sender.deliver(make_alert(), action)
    assert sender.dead == []
    key = "alerts/errors/2023/11/14/5a1e.json"
    head = s3.head_object(Bucket="evidence-locked", Key=key, ChecksumMode="ENABLED")
    body = s3.get_object(Bucket="evidence-locked", Key=key)["Body"].read()
    assert json.loads(body) == MessageToDict(make_alert(), preserving_proto_field_name=True)
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(body).digest()).decode()
    assert head["ContentType"] == "application/json"
    assert head["Metadata"] == {"rule": "errors", "alert-id": "5a1e", "state": "firing"}
    assert head["ObjectLockMode"] == "GOVERNANCE"
    assert before + timedelta(days=30) - timedelta(minutes=1) <= head["ObjectLockRetainUntilDate"]
    assert head["ObjectLockRetainUntilDate"] <= datetime.now(UTC) + timedelta(days=30)
    with pytest.raises(ClientError, match="AccessDenied"):
        s3.delete_object(Bucket="evidence-locked", Key=key, VersionId=head["VersionId"])
    assert sender.metrics.counter("trawl_alerter_s3_objects_total", "").get(rule="errors") == 1


async def test_credentials_from_the_variables_the_rules_file_names(moto_url: str) -> None:
    client(moto_url).create_bucket(Bucket="evidence-plain")
    text = (
        "rules:\n  - name: errors\n    condition: 'true'\n    actions:\n"
        f"      - s3: {{bucket: evidence-plain, endpoint_url: '{moto_url}', region: us-east-1,\n"
        "             access_key_env: EVIDENCE_KEY, secret_key_env: EVIDENCE_SECRET}\n"
    )
    [rule] = parse_rules(text, "rules.yaml", {"EVIDENCE_KEY": "k", "EVIDENCE_SECRET": "s"})
    [action] = rule.actions
    assert isinstance(action, S3Action)
    assert action.credentials == Credentials("k", "s")
    resolve = make_alert("5a1f")
    resolve.resolved = True
    assert await Sender().deliver(resolve, action)
    head = client(moto_url).head_object(Bucket="evidence-plain", Key="errors/2023/11/14/5a1f.json")
    assert head["Metadata"]["state"] == "resolved"
    assert "ObjectLockMode" not in head


async def test_a_bucket_that_does_not_exist_is_final(moto_url: str) -> None:
    sender = Sender()
    action = S3Action(bucket="no-such-bucket", endpoint_url=moto_url, region="us-east-1", credentials=KEYS)
    assert not await sender.deliver(make_alert(), action)
    [failure] = sender.dead
    assert failure.reason.startswith("S3 NoSuchBucket (HTTP 404)")
    assert failure.attempts == 1
    assert sender.metrics.counter("trawl_alerter_actions_failed_total", "").get(rule="errors", action="s3") == 1


async def test_a_lock_asked_of_a_bucket_without_object_lock_is_final(moto_url: str) -> None:
    client(moto_url).create_bucket(Bucket="evidence-unlocked")
    sender = Sender()
    action = S3Action(
        bucket="evidence-unlocked",
        endpoint_url=moto_url,
        region="us-east-1",
        credentials=KEYS,
        lock_mode="COMPLIANCE",
        lock_days=1,
    )
    assert not await sender.deliver(make_alert(), action)
    [failure] = sender.dead
    assert failure.attempts == 1, failure.reason
    assert "S3 InvalidRequest (HTTP 400)" in failure.reason


async def test_an_endpoint_that_is_not_there_is_retried_then_dead_lettered() -> None:
    sender = Sender()
    action = S3Action(bucket="evidence", endpoint_url=f"http://127.0.0.1:{free_port()}", credentials=KEYS)
    assert not await sender.deliver(make_alert(), action)
    [failure] = sender.dead
    assert failure.attempts == 2
    assert "EndpointConnectionError" in failure.reason
    assert sender.sleeps == [0.5]
    assert sender.metrics.counter("trawl_alerter_dead_letters_total", "").get(rule="errors") == 1
