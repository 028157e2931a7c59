"""Recordings on demand and on schedule through the recorder service over a real nats-server:
PacketBatches published on the packet subject, `trawl record` asking over request/reply, the
sealed files read back packet for packet with dpkt and tshark, the look-back included."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path

import nats

from tests.conftest import needs_binary
from tests.unit.test_recorder_recordings import POD_A, SECOND, T0, batch_of, read_back, traffic, tshark_fields
from trawl.bus import Bus, control_subject, packets_subject
from trawl.recorder.config import RecorderSettings
from trawl.recorder.control import RECORD_SUBJECT
from trawl.recorder.main import serve
from trawl.service import ServiceContext
from trawl.v1 import control_pb2


async def start_recorder(
    nats_url: str, directory: Path, **options: object
) -> tuple[ServiceContext[RecorderSettings], asyncio.Task[None]]:
    settings = RecorderSettings.load(None, node="rec-1", directory=directory, nats={"servers": [nats_url]}, **options)
    bus = await Bus.connect(settings.nats, "test-recorder")
    ctx = ServiceContext(name="recorder", settings=settings, bus=bus)
    return ctx, asyncio.create_task(serve(ctx))


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def publish(client: nats.NATS, packets: list[tuple[int, bytes, bool]], first_sequence: int) -> int:
    sequence = first_sequence
    for index in range(0, len(packets), 5):
        batch = batch_of(packets[index : index + 5])
        batch.sequence = sequence
        await client.publish(packets_subject("node-a", 0), batch.SerializeToString())
        sequence += 1
    await client.flush()
    return sequence


async def run_cli(*argv: str) -> tuple[int, str, str]:
    """The `trawl` command in a process of its own, as a user runs it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "trawl.cli", *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def json_line(out: str) -> dict[str, object]:
    """The one recording the command printed as JSON."""
    [line] = [line for line in out.splitlines() if line.startswith('{"')]
    document: dict[str, object] = json.loads(line)
    return document


@needs_binary("tshark")
async def test_trawl_record_start_stop_get_with_the_lookback(nats_url: str, tmp_path: Path) -> None:
    client = await nats.connect(nats_url)
    ready = await client.subscribe(control_subject("ready", "recorder", "rec-1"))
    ctx, task = await start_recorder(nats_url, tmp_path / "rec")
    packets_written = lambda: ctx.metrics.snapshot().get("trawl_recorder_packets_total", 0)  # noqa: E731
    try:
        await ready.next_msg(timeout=10)
        before, after = traffic(0, 60), traffic(60, 20)
        sequence = await publish(client, before, 1)
        await until(lambda: packets_written() == 60, "the first 60 packets")
        code, out, err = await run_cli(
            *("record", "start", "--nats-url", nats_url, "--ip", POD_A[1], "--filter", "tcp port 80"),
            *("--duration", "10m", "--reason", "incident 7", "--json"),
        )
        assert (code, err) == (0, "")
        started = json_line(out)
        assert started["state"] == "recording"
        assert started["lookback_packets"] == "15"  # pod A's packets of seconds 29.x to 59.x
        assert started["expression"] == f"(ip host {POD_A[1]}) and (tcp port 80)"
        await publish(client, after, sequence)
        await until(lambda: packets_written() == 80, "the next 20 packets")
        code, out, _ = await run_cli("record", "list", "--nats-url", nats_url)
        assert code == 0
        assert f"{started['id']}  recording" in out
        assert "25 packets (15 from the look-back)  by cli" in out
        code, out, _ = await run_cli("record", "stop", started["id"], "--nats-url", nats_url, "--json")
        assert code == 0
        assert json_line(out)["state"] == "stopped"
        code, out, _ = await run_cli("record", "get", started["id"], "--nats-url", nats_url, "--json")
        files = json_line(out)["files"]
        assert isinstance(files, list)
        [path] = [Path(p) for p in files]
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
        await ctx.bus.close()
        await client.close()
    expected = [(ts, frame) for ts, frame, pod_a in before + after if pod_a and ts >= T0 + 29 * SECOND]
    assert len(expected) == 25
    assert read_back(path) == [(ts // 1000, frame) for ts, frame in expected]
    rows = tshark_fields(path, "frame.time_epoch", "ip.dst", "tcp.srcport")
    assert [(int(row[0].replace(".", "")), row[1], int(row[2])) for row in rows] == [
        (ts // 1000 * 1000, POD_A[1], 40000 + (ts - T0) // SECOND) for ts, _ in expected
    ]
    # The continuous files hold everything, as before.
    [continuous] = (tmp_path / "rec").glob("*.pcap")
    assert read_back(continuous) == [(ts // 1000, frame) for ts, frame, _ in before + after]


async def test_refusals_come_back_as_errors(nats_url: str, tmp_path: Path) -> None:
    client = await nats.connect(nats_url)
    ready = await client.subscribe(control_subject("ready", "recorder", "rec-1"))
    ctx, task = await start_recorder(nats_url, tmp_path / "rec")
    try:
        await ready.next_msg(timeout=10)
        code, _, err = await run_cli("record", "start", "--nats-url", nats_url, "--pods", "^api-")
        assert code == 2
        assert "set recorder.identity" in err
        code, _, err = await run_cli("record", "stop", "nope", "--nats-url", nats_url)
        assert (code, err.strip()) == (2, "trawl record: no recording 'nope'")
        reply = await client.request(RECORD_SUBJECT, b"\xff\xff", timeout=5)
        assert "not a RecordControl message" in control_pb2.RecordReply.FromString(reply.data).error
        code, out, _ = await run_cli("record", "list", "--nats-url", nats_url)
        assert (code, out) == (0, "no recordings\n")
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
        await ctx.bus.close()
        await client.close()


async def test_no_recorder_answers(nats_url: str) -> None:
    code, _, err = await run_cli("record", "list", "--nats-url", nats_url, "--timeout-s", "1")
    assert code == 2
    assert "no recorder answers on trawl.v1.control.record" in err


async def test_a_schedule_records_with_the_lookback_and_continuous_off(nats_url: str, tmp_path: Path) -> None:
    client = await nats.connect(nats_url)
    ready = await client.subscribe(control_subject("ready", "recorder", "rec-1"))
    schedule = {"cron": "* * * * * *", "duration_s": 1, "ips": [POD_A[1]], "reason": "every second"}
    # lookback_s: 3600 so that every packet published is still held when the schedule fires.
    ctx, task = await start_recorder(
        nats_url, tmp_path / "rec", continuous=False, lookback_s=3600, recordings_format="pcap", schedules=[schedule]
    )
    on_demand = tmp_path / "rec" / "on-demand"
    try:
        await ready.next_msg(timeout=10)
        await publish(client, traffic(0, 20), 1)
        await until(lambda: len(list(on_demand.glob("*.pcap"))) >= 1, "a scheduled recording", timeout_s=20)
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
        await ctx.bus.close()
        await client.close()
    assert list((tmp_path / "rec").glob("*.pcap")) == []  # continuous off: no rotating files
    started = ctx.metrics.counter("trawl_recorder_recordings_started_total", "")
    assert started.total() >= 1 and set(started.values) == {(("trigger", "schedule"),)}
    pod_a = [(ts // 1000, frame) for ts, frame, a in traffic(0, 20) if a]
    recorded = [read_back(path) for path in sorted(on_demand.glob("*.pcap"))]
    # Every scheduled recording that began after the packets came holds them all, from the look-back.
    assert pod_a in recorded
    assert all(packets in ([], pod_a) for packets in recorded)
