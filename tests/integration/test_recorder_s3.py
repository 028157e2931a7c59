"""Sealed files shipped to S3 by the recorder service over a real nats-server.

The S3 peer is moto's server (`moto[server]`, ThreadedMotoServer): no S3 can be installed here,
and moto speaks S3's own HTTP protocol to the real boto3 client (signatures, checksums, Object
Lock headers, versioning), so the recorder's code runs exactly as against AWS. Where moto falls
short it is said where checked: it does not verify a PutObject body against the checksum sent
(AWS does), so the recorder's HEAD check and `verify_download` are what catch a bad body here,
and GetObjectRetention fails on it, so retention is read from HEAD (the same headers).

Checked: the continuous file and a recording, each with its `.sha256` line, land in a bucket with
Object Lock enabled, under retention (mode and date) and refused deletion, with the SHA-256 the
file was sealed with, read back byte for byte; the local copies are deleted and dropped from
SHA256SUMS only after that, and listed in UPLOADED. With S3 down, uploads fail, are counted and
tried again in the background while recording goes on; files sealed but not shipped are found
again by the next recorder, and all of them are shipped once S3 is back.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

from tests.integration.test_recorder_recordings import start_recorder, until
from tests.s3_server import locked_bucket, s3
from tests.unit.test_recorder_recordings import POD_A, batch_of, traffic
from trawl.bus import control_subject, packets_subject
from trawl.metrics import Registry
from trawl.pcap import global_header
from trawl.recorder.config import S3Settings
from trawl.recorder.control import RECORD_SUBJECT
from trawl.recorder.upload import Shipper
from trawl.v1 import control_pb2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def publish_batches(client: nats.NATS, packets: list[tuple[int, bytes, bool]], first: int, end: bool) -> int:
    sequence = first
    batches = [batch_of(packets[i : i + 5]) for i in range(0, len(packets), 5)]
    for batch in batches:
        batch.sequence = sequence
        sequence += 1
    batches[-1].end_of_input = end
    for batch in batches:
        await client.publish(packets_subject("node-a", 0), batch.SerializeToString())
    await client.flush()
    return sequence


def write_sealed(directory: Path, paths: list[Path]) -> None:
    """Files as the recorder seals them: their content and a SHA256SUMS line each."""
    with open(directory / "SHA256SUMS", "w") as handle:
        for path in paths:
            path.write_bytes(b"sealed " + path.name.encode())
            handle.write(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")


def exists(path: str) -> bool:
    return Path(path).exists()


def counter(ctx: Any, name: str) -> float:
    return float(ctx.metrics.counter(name, "").total())


async def test_sealed_files_land_under_object_lock_verified_then_leave_the_disk(
    nats_url: str, s3_url: str, tmp_path: Path
) -> None:
    bucket = "trawl-locked"
    locked_bucket(s3_url, bucket)
    settings = {
        "endpoint_url": s3_url,
        "bucket": bucket,
        "prefix": "evidence/",
        "object_lock": {"mode": "GOVERNANCE", "days": 7},
        "delete_local_after_upload": True,
        "verify_download": True,
    }
    client = await nats.connect(nats_url)
    ready = await client.subscribe(control_subject("ready", "recorder", "rec-1"))
    drained = await client.subscribe(control_subject("drained", "recorder", "rec-1"))
    ctx, task = await start_recorder(nats_url, tmp_path / "rec", s3=settings)
    try:
        await ready.next_msg(timeout=10)
        sequence = await publish_batches(client, traffic(0, 20), 1, end=False)
        await until(lambda: counter(ctx, "trawl_recorder_packets_total") == 20, "20 packets")
        start = control_pb2.RecordControl(start=control_pb2.RecordRequest(ips=[POD_A[1]], duration_s=600))
        started = control_pb2.RecordReply.FromString(
            (await client.request(RECORD_SUBJECT, start.SerializeToString(), timeout=5)).data
        )
        await publish_batches(client, traffic(20, 10), sequence, end=True)
        [continuous] = control_pb2.Drained.FromString((await drained.next_msg(timeout=10)).data).files
        stop = control_pb2.RecordControl(stop=started.recording_id)
        stopped = control_pb2.RecordReply.FromString(
            (await client.request(RECORD_SUBJECT, stop.SerializeToString(), timeout=5)).data
        )
        [recording] = stopped.recordings[0].files
        await until(lambda: counter(ctx, "trawl_recorder_s3_uploaded_total") == 2, "both uploads")
        # A file open when the recorder stops is sealed then, and shipped before it exits.
        await publish_batches(client, traffic(30, 5), sequence + 2, end=False)
        await until(lambda: counter(ctx, "trawl_recorder_packets_total") == 35, "5 more packets")
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 15)
        await ctx.bus.close()
        await client.close()
    assert counter(ctx, "trawl_recorder_s3_uploaded_total") == 3
    assert counter(ctx, "trawl_recorder_s3_upload_failures_total") == 0
    assert list((tmp_path / "rec").glob("*.pcap")) == []
    # The recording is sealed "sealed" at the end of input; the stop finds it done.
    records = b"".join(batch_of(traffic(0, 30)[i : i + 5]).records for i in range(0, 30, 5))
    expected = {Path(continuous): global_header(1, 65535, False) + records}
    directory = tmp_path / "rec"
    service = s3(s3_url)
    asked_until = datetime.now(UTC) + timedelta(days=7)
    for path in [Path(continuous), Path(recording)]:
        key = "evidence/rec-1/" + path.relative_to(directory).as_posix()
        head = service.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        body = service.get_object(Bucket=bucket, Key=key)["Body"].read()
        sha256 = hashlib.sha256(body).hexdigest()
        assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(body).digest()).decode()
        assert head["ObjectLockMode"] == "GOVERNANCE"
        assert abs(head["ObjectLockRetainUntilDate"] - asked_until) < timedelta(minutes=5)
        if path in expected:
            assert body == expected[path]
        line = service.get_object(Bucket=bucket, Key=key + ".sha256")["Body"].read().decode()
        assert line == f"{sha256}  {path.name}\n"
        with pytest.raises(ClientError, match="AccessDenied"):  # under retention: not deletable
            service.delete_object(Bucket=bucket, Key=key, VersionId=head["VersionId"])
        # Here: gone, out of SHA256SUMS, in UPLOADED.
        assert not path.exists()
        assert path.name not in (path.parent / "SHA256SUMS").read_text()
        uploaded = (path.parent / "UPLOADED").read_text()
        assert f"{sha256}  {path.name}  s3://{bucket}/{key}  {head['VersionId']}\n" in uploaded
    assert counter(ctx, "trawl_recorder_s3_deleted_local_total") == 3


async def test_s3_down_at_start_then_back_every_file_shipped(nats_url: str, aws_env: None, tmp_path: Path) -> None:
    port = free_port()
    bucket = "trawl-comes-back"
    settings = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "bucket": bucket,
        "object_lock": {"mode": "COMPLIANCE", "days": 1},
        "delete_local_after_upload": True,
        "retry_initial_s": 0.2,
        "retry_max_s": 1.0,
    }
    directory = tmp_path / "rec"
    client = await nats.connect(nats_url)
    drained = await client.subscribe(control_subject("drained", "recorder", "rec-1"))
    ready = await client.subscribe(control_subject("ready", "recorder", "rec-1"))
    server: ThreadedMotoServer | None = None
    try:
        # A first recorder seals a file; S3 is not there: the upload fails, is counted, and the
        # file stays. It stops before S3 comes back.
        ctx, task = await start_recorder(nats_url, directory, s3=settings)
        await ready.next_msg(timeout=10)
        sequence = await publish_batches(client, traffic(0, 10), 1, end=True)
        [first] = control_pb2.Drained.FromString((await drained.next_msg(timeout=10)).data).files
        await until(lambda: counter(ctx, "trawl_recorder_s3_upload_failures_total") >= 2, "failed uploads retried")
        assert counter(ctx, "trawl_recorder_s3_uploaded_total") == 0 and exists(first)
        ctx.stopping.set()
        await asyncio.wait_for(task, 15)
        await ctx.bus.close()
        # The next recorder finds the file not shipped, and seals another, while S3 is still down.
        ctx, task = await start_recorder(nats_url, directory, s3=settings)
        await ready.next_msg(timeout=10)
        await publish_batches(client, traffic(10, 10), sequence, end=True)
        [second] = control_pb2.Drained.FromString((await drained.next_msg(timeout=10)).data).files
        await until(lambda: counter(ctx, "trawl_recorder_s3_upload_failures_total") >= 2, "failed uploads")
        assert {exists(first), exists(second)} == {True}
        # S3 comes back: the retries ship both, without a restart.
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        locked_bucket(f"http://127.0.0.1:{port}", bucket)
        await until(lambda: counter(ctx, "trawl_recorder_s3_uploaded_total") == 2, "both files shipped", 30)
        ctx.stopping.set()
        await asyncio.wait_for(task, 15)
        await ctx.bus.close()
        service = s3(f"http://127.0.0.1:{port}")
        keys = sorted(o["Key"] for o in service.list_objects_v2(Bucket=bucket)["Contents"])
        names = sorted([Path(first).name, Path(second).name])
        assert keys == sorted([f"rec-1/{n}" for n in names] + [f"rec-1/{n}.sha256" for n in names])
        for name in names:
            head = service.head_object(Bucket=bucket, Key=f"rec-1/{name}")
            assert head["ObjectLockMode"] == "COMPLIANCE"
        assert not exists(first) and not exists(second)
        assert (directory / "SHA256SUMS").read_text() == ""
    finally:
        if server is not None:
            server.stop()
        await client.close()


async def test_a_file_changed_since_sealed_or_gone_is_never_shipped_and_counted(s3_url: str, tmp_path: Path) -> None:
    locked_bucket(s3_url, "trawl-refused")
    metrics = Registry()
    settings = S3Settings(endpoint_url=s3_url, bucket="trawl-refused")
    shipper = Shipper(settings, "rec-1", tmp_path, metrics)
    good, changed, gone = (tmp_path / f"{name}.pcap" for name in ("good", "changed", "gone"))
    shipped_before = tmp_path / "shipped-before.pcap"
    write_sealed(tmp_path, [shipped_before, good, changed, gone])
    (tmp_path / "UPLOADED").write_text("x  shipped-before.pcap  s3://trawl-refused/rec-1/shipped-before.pcap  -\n")
    assert shipper.scan([tmp_path]) == [good, changed, gone]  # not the one UPLOADED lists
    changed.write_bytes(b"altered after sealing")
    gone.unlink()
    stopping = asyncio.Event()
    running = asyncio.create_task(shipper.run(stopping))
    not_uploaded = metrics.counter("trawl_recorder_s3_not_uploaded_total", "")
    uploaded = metrics.counter("trawl_recorder_s3_uploaded_total", "")
    await until(lambda: not_uploaded.total() == 2 and uploaded.total() == 1, "all three settled")
    stopping.set()
    await asyncio.wait_for(running, 10)
    assert set(not_uploaded.values) == {(("reason", "local_checksum"),), (("reason", "deleted"),)}
    assert shipper.pending == []
    keys = sorted(o["Key"] for o in s3(s3_url).list_objects_v2(Bucket="trawl-refused")["Contents"])
    assert keys == ["rec-1/good.pcap", "rec-1/good.pcap.sha256"]
    assert changed.exists()  # kept, for whoever looks into why it changed
