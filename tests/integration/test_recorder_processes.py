"""Recorders as the processes a container runs (`python -m trawl recorder --config FILE`) over a
fresh real nats-server, asked with the real `trawl record` command:

- a recorder killed with SIGKILL in the middle of a recording goes on with it when started
  again, until its end time: the sealed file holds every packet of the scope once, the look-back,
  those published while it was down and those after (dpkt and tshark agree), and `sha256sum -c`
  checks it;
- two recorders, each reading one node's packets, are one recorder to the asker: a start
  without nodes is recorded by both under one id (also when asked with a plain NATS request, as
  the alerter asks), one naming a node only by that node's recorder, and list, get and stop
  gather both parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats

from tests.conftest import ROOT, needs_binary
from tests.integration.test_recorder_recordings import run_cli, until
from tests.unit.test_recorder_recordings import POD_A, batch_of, read_back, traffic, tshark_fields
from trawl.bus import control_subject, packets_subject
from trawl.recorder.control import RECORD_SUBJECT
from trawl.v1 import control_pb2


class Recorder:
    """One recorder process and its directory; started again at will."""

    def __init__(self, directory: Path, nats_url: str, node: str, **settings: Any) -> None:
        self.directory = directory
        self.node = node
        self.recordings = directory / "recordings"
        self.config = directory / "trawl.yaml"
        document = {
            "node": node,
            "log_format": "json",
            "nats": {"servers": [nats_url]},
            "recorder": {"directory": str(self.recordings), "lookback_s": 3600, **settings},
        }
        directory.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps(document))  # JSON is YAML
        self.process: subprocess.Popen[bytes] | None = None
        self.lives = 0

    def start(self) -> None:
        self.lives += 1
        log = (self.directory / f"recorder-{self.lives}.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trawl", "recorder", "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ),
        )  # fmt: skip

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def events(self, event: str) -> list[dict[str, Any]]:
        found = []
        for life in range(1, self.lives + 1):
            for line in (self.directory / f"recorder-{life}.log").read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("event") == event:
                        found.append(record)
        return found

    def checkpoint(self) -> dict[str, Any]:
        """The mark of the recorder's last checkpoint ({} before the first)."""
        try:
            mark: dict[str, Any] = json.loads((self.recordings / "CHECKPOINT").read_text())["mark"]
        except (FileNotFoundError, ValueError):
            return {}
        return mark


@contextlib.asynccontextmanager
async def started(nats_url: str, *recorders: Recorder) -> AsyncIterator[nats.NATS]:
    """The recorders started and ready; a client of the test's own; all stopped at the end."""
    client = await nats.connect(nats_url)
    ready = await client.subscribe(control_subject("ready", "recorder") + ".*")
    await client.flush()  # subscribed before any recorder can say it is ready
    try:
        for recorder in recorders:
            recorder.start()
        for _ in recorders:
            await ready.next_msg(timeout=30)
        yield client
    finally:
        for recorder in recorders:
            recorder.stop()
        await client.close()


async def wait_ready(client: nats.NATS, recorder: Recorder) -> None:
    ready = await client.subscribe(control_subject("ready", "recorder", recorder.node))
    await client.flush()
    recorder.start()
    await ready.next_msg(timeout=30)
    await ready.unsubscribe()


async def publish(
    client: nats.NATS, node: str, packets: list[tuple[int, bytes, bool]], first_sequence: int, per_batch: int = 5
) -> int:
    """Batches of `per_batch` packets from `node`; returns the next batch sequence."""
    sequence = first_sequence
    for index in range(0, len(packets), per_batch):
        batch = batch_of(packets[index : index + per_batch], node=node)
        batch.sequence = sequence
        batch.packets_before = (sequence - 1) * per_batch
        await client.publish(packets_subject(node, 0), batch.SerializeToString())
        sequence += 1
    await client.flush()
    return sequence


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


async def record(nats_url: str, *argv: str) -> list[dict[str, Any]]:
    code, out, err = await run_cli("record", *argv, "--nats-url", nats_url, "--json")
    assert (code, err) == (0, ""), err
    return json_lines(out)


def at_sequence(recorder: Recorder, node: str, sequence: int) -> Callable[[], bool]:
    """Whether the recorder has checkpointed `node`'s batch `sequence` (shard 0)."""
    return lambda: recorder.checkpoint().get("sequences", {}).get(f"{node}/0") == sequence


@needs_binary("tshark")
@needs_binary("sha256sum")
async def test_a_recorder_killed_mid_recording_goes_on_with_it_after_a_restart(nats_url: str, tmp_path: Path) -> None:
    """PCAPNG here; pcap files are taken up the same way (tests/unit/test_recorder_resume.py)."""
    recorder = Recorder(tmp_path / "rec", nats_url, "rec-1", recordings_format="pcapng")
    on_demand = recorder.recordings / "on-demand"
    async with started(nats_url, recorder) as client:
        sequence = await publish(client, "node-a", traffic(0, 20), 1)
        await until(at_sequence(recorder, "node-a", 4), "the look-back's 20 packets")
        [started_part] = await record(nats_url, "start", "--ip", POD_A[1], "--duration", "30s")
        recording_id = started_part["id"]
        assert (started_part["lookback_packets"], started_part["recorder"]) == ("10", "rec-1")
        sequence = await publish(client, "node-a", traffic(20, 20), sequence)
        await until(at_sequence(recorder, "node-a", 8), "the next 20 packets")
        [running] = recorder.checkpoint()["recordings"]
        assert (running["id"], running["packets"]) == (recording_id, 20)
        [partial] = on_demand.glob("*.partial")
        recorder.kill()
        # Published while no recorder runs: the stream keeps them, and the recording gets them.
        sequence = await publish(client, "node-a", traffic(40, 20), sequence)
        await wait_ready(client, recorder)
        [listed] = await record(nats_url, "list")
        assert (listed["id"], listed["state"]) == (recording_id, "recording")
        # These must be stored before the recording's end to be in it: 30 s leave a restart (a
        # few seconds) ample room; were it slower, say so rather than fail on the packets.
        assert time.time_ns() < int(started_part["ends_at_ns"]) - 5 * 1_000_000_000, "the restart took > 25 s"
        sequence = await publish(client, "node-a", traffic(60, 20), sequence)

        async def state() -> str:
            [part] = await record(nats_url, "get", recording_id)
            return str(part["state"])

        for _ in range(60):
            if await state() != "recording":
                break
            await asyncio.sleep(0.5)
        [done] = await record(nats_url, "get", recording_id)
    assert [event["recording"] for event in recorder.events("recording_resumed")] == [recording_id]
    assert not recorder.events("packet_batches_lost")
    assert (done["state"], done["packets"], done["lookback_packets"]) == ("sealed", "40", "10")
    [path] = [Path(p) for p in done["files"]]
    assert path.name == partial.name.removesuffix(".partial") and not partial.exists()
    expected = [(ts // 1000, frame) for ts, frame, pod_a in traffic(0, 80) if pod_a]
    assert read_back(path) == expected
    assert len(tshark_fields(path, "frame.number")) == len(expected)
    check = await asyncio.create_subprocess_exec(
        "sha256sum", "-c", "SHA256SUMS", cwd=on_demand, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await check.communicate()
    assert check.returncode == 0 and f"{path.name}: OK" in out.decode()
    # The continuous files hold every packet once across the kill, as before.
    continuous = sorted(recorder.recordings.glob("*.pcap"))
    assert [packet for file in continuous for packet in read_back(file)] == [
        (ts // 1000, frame) for ts, frame, _ in traffic(0, 80)
    ]


@needs_binary("tshark")
async def test_two_recorders_on_two_nodes_answer_as_one(nats_url: str, tmp_path: Path) -> None:
    recorders = [
        Recorder(tmp_path / node, nats_url, node, subject=f"trawl.v1.packets.{node}.>", continuous=False)
        for node in ("node-a", "node-b")
    ]
    a, b = recorders
    async with started(nats_url, *recorders) as client:
        sequences = {node: await publish(client, node, traffic(0, 10), 1) for node in ("node-a", "node-b")}
        await until(at_sequence(a, "node-a", 2), "node-a's look-back")
        await until(at_sequence(b, "node-b", 2), "node-b's look-back")
        both = await record(nats_url, "start", "--ip", POD_A[1], "--duration", "10m", "--recorders", "2")
        assert sorted((p["recorder"], p["lookback_packets"]) for p in both) == [("node-a", "5"), ("node-b", "5")]
        [both_id] = {p["id"] for p in both}
        # A start naming node-b: only node-b's recorder records it (and answers).
        [only_b] = await record(nats_url, "start", "--node", "node-b", "--duration", "10m")
        assert only_b["recorder"] == "node-b"
        # The alerter's plain request takes the first reply; both recorders record, under one id.
        start = control_pb2.RecordControl(start=control_pb2.RecordRequest(requested_by="alerter:r", duration_s=600))
        reply = control_pb2.RecordReply.FromString(
            (await client.request(RECORD_SUBJECT, start.SerializeToString())).data
        )
        assert reply.error == "" and len(reply.recordings) == 1
        listed = await record(nats_url, "list", "--recorders", "2")
        assert sorted((p["id"], p["recorder"]) for p in listed) == sorted(
            [
                (both_id, "node-a"),
                (both_id, "node-b"),
                (only_b["id"], "node-b"),
                (reply.recording_id, "node-a"),
                (reply.recording_id, "node-b"),
            ]
        )
        for node in ("node-a", "node-b"):
            sequences[node] = await publish(client, node, traffic(10, 10), sequences[node])
        await until(at_sequence(a, "node-a", 4), "node-a's next packets")
        await until(at_sequence(b, "node-b", 4), "node-b's next packets")
        stopped = await record(nats_url, "stop", both_id, "--recorders", "2")
        [got_b] = await record(nats_url, "get", only_b["id"], "--recorders", "2")  # node-a: "no recording", left out
        code, text, _ = await run_cli("record", "list", "--nats-url", nats_url, "--recorders", "2")
    assert code == 0 and "  on node-a\n" in text and "  on node-b\n" in text
    assert (got_b["id"], got_b["recorder"], got_b["state"]) == (only_b["id"], "node-b", "recording")
    assert sorted((p["recorder"], p["state"], p["packets"]) for p in stopped) == [
        ("node-a", "stopped", "10"),
        ("node-b", "stopped", "10"),
    ]
    expected = [(ts // 1000, frame) for ts, frame, pod_a in traffic(0, 20) if pod_a]
    for part in stopped:
        [path] = [Path(p) for p in part["files"]]
        assert path.parent == tmp_path / part["recorder"] / "recordings" / "on-demand"
        assert read_back(path) == expected
        if path.suffix == ".pcapng":
            assert {row[0] for row in tshark_fields(path, "frame.interface_name")} == {part["recorder"]}
