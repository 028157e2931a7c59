"""Recordings across a restart: the checkpoint of running recordings, their files cut back to it
and written on by a second Recordings (as a restarted recorder does), the journal of ended
ones, files left without a checkpoint sealed as interrupted, and the end by stored time."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.conftest import needs_binary
from tests.unit.test_recorder_recordings import batch_of, make_recordings, read_back, traffic, tshark_fields
from trawl.errors import ConfigError
from trawl.recorder.config import ScheduleSettings
from trawl.recorder.control import derived_id, merge, subject_covers_node
from trawl.recorder.main import Schedule, answer
from trawl.recorder.recordings import JOURNAL_NAME, Recording
from trawl.v1 import control_pb2


def kill(recording: Recording) -> None:
    """What SIGKILL leaves: the writes made so far, the files closed by the kernel."""
    for output in recording._outputs.values():
        output.handle.flush()
        output.handle.close()


@needs_binary("tshark")
@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_a_running_recording_goes_on_from_the_checkpoint_every_packet_once(tmp_path: Path, fmt: str) -> None:
    packets = traffic(0, 40)
    first, _ = make_recordings(tmp_path, fmt=fmt)
    first.feed(batch_of(packets[:10]))  # the look-back
    recording = first.start(control_pb2.RecordRequest(requested_by="cli", duration_s=600), now=100.0)
    first.feed(batch_of(packets[10:20], node="node-b"))
    checkpoint = first.checkpoint()  # the recorder saves it with the position of the batch above
    # Killed after writing the next batch but before its checkpoint, in the middle of a block.
    first.feed(batch_of(packets[20:25]))
    kill(recording)
    [partial] = (tmp_path / "on-demand").glob("*.partial")
    with open(partial, "ab") as handle:
        handle.write(b"\x06\x00\x00\x00\x40\x00")
    left = partial.stat().st_size
    [output] = checkpoint[0]["outputs"]

    second, metrics = make_recordings(tmp_path, fmt=fmt)
    assert second.recover(checkpoint, now=200.0) == []
    [resumed] = second.active.values()
    assert (resumed.id, resumed.packets, resumed.lookback_packets) == (recording.id, 20, 10)
    assert resumed.resumed_at == 200.0 and resumed.ends_at == recording.ends_at
    # The stream hands the batches after the checkpoint again: each lands once.
    second.feed(batch_of(packets[20:25]))
    second.feed(batch_of(packets[25:40], node="node-b"))
    stopped = second.stop(recording.id)
    assert stopped.state == "stopped" and stopped.packets == 40
    [sealed] = stopped.files
    assert read_back(sealed) == [(ts // 1000, frame) for ts, frame, _ in packets]
    assert len(tshark_fields(sealed, "frame.number")) == 40
    assert metrics.counter("trawl_recorder_recovered_bytes_cut_total", "").total() == left - output["size"] > 6
    manifest = (tmp_path / "on-demand" / "SHA256SUMS").read_text()
    assert manifest == f"{hashlib.sha256(sealed.read_bytes()).hexdigest()}  {sealed.name}\n"
    if fmt == "pcapng":  # one interface per node, kept across the restart
        names = [row[0] for row in tshark_fields(sealed, "frame.interface_name")]
        assert names == ["node-a"] * 10 + ["node-b"] * 10 + ["node-a"] * 5 + ["node-b"] * 15


def test_bytes_cut_back_to_the_checkpoint_are_counted(tmp_path: Path) -> None:
    first, _ = make_recordings(tmp_path, fmt="pcap")
    recording = first.start(control_pb2.RecordRequest(duration_s=600), now=0.0)
    first.feed(batch_of(traffic(0, 3)))
    checkpoint = first.checkpoint()
    [output] = recording._outputs.values()
    at_checkpoint = output.size
    first.feed(batch_of(traffic(3, 2)))
    kill(recording)
    grown = output.partial.stat().st_size
    second, metrics = make_recordings(tmp_path, fmt="pcap")
    second.recover(checkpoint, now=1.0)
    assert output.partial.stat().st_size == at_checkpoint < grown
    assert metrics.counter("trawl_recorder_recovered_bytes_cut_total", "").total() == grown - at_checkpoint


def test_ended_recordings_are_listed_after_a_restart(tmp_path: Path) -> None:
    first, _ = make_recordings(tmp_path)
    first.feed(batch_of(traffic(0, 4)))
    done = first.start(control_pb2.RecordRequest(requested_by="cli", duration_s=5), now=0.0)
    first.stop(done.id)
    second, _ = make_recordings(tmp_path)
    second.recover([], now=10.0)
    [listed] = second.all()
    described = listed.describe()
    assert (described.id, described.state, described.packets) == (done.id, "stopped", 4)
    assert list(described.files) == [str(p) for p in done.files]
    assert second.get(done.id) is listed
    with pytest.raises(ConfigError, match="exists already"):
        second.start(control_pb2.RecordRequest(duration_s=5), now=0.0, recording_id=done.id)
    # A journal line cut short by a crash is passed over.
    with open(tmp_path / "on-demand" / JOURNAL_NAME, "a") as handle:
        handle.write('{"id": "2026')
    third, _ = make_recordings(tmp_path)
    third.recover([], now=10.0)
    assert [r.id for r in third.all()] == [done.id]


@needs_binary("tshark")
def test_a_file_without_a_checkpoint_is_sealed_as_interrupted_and_listed(tmp_path: Path) -> None:
    first, _ = make_recordings(tmp_path)
    recording = first.start(control_pb2.RecordRequest(duration_s=600), now=0.0)
    first.feed(batch_of(traffic(0, 6)))
    kill(recording)
    second, _ = make_recordings(tmp_path)
    [sealed] = second.recover(None, now=5.0)
    [listed] = second.all()
    described = listed.describe()
    assert (described.id, described.state, list(described.files)) == (recording.id, "interrupted", [str(sealed)])
    assert len(tshark_fields(sealed, "frame.number")) == 6
    third, _ = make_recordings(tmp_path)  # journaled: listed after another restart too
    third.recover([], now=6.0)
    assert [(r.id, r.describe().state) for r in third.all()] == [(recording.id, "interrupted")]


def test_a_recording_takes_the_batches_stored_before_its_end(tmp_path: Path) -> None:
    recordings, _ = make_recordings(tmp_path, fmt="pcap")
    recording = recordings.start(control_pb2.RecordRequest(duration_s=10), now=100.0)
    end_ns = recording.ends_at_ns
    recordings.feed(batch_of(traffic(0, 2)), stored_ns=end_ns - 1)
    assert recording.state == "recording"
    # Past its end but the reader still behind (a restart's backlog): not sealed before its deadline.
    assert recordings.expire(111.0, caught_up=False) == []
    recordings.feed(batch_of(traffic(2, 2)), stored_ns=end_ns)  # stored at its end: not in it
    assert recording.state == "sealed" and recording.packets == 2
    [sealed] = recording.files
    assert len(read_back(sealed)) == 2


def test_expire_waits_for_the_reader_to_catch_up_until_the_deadline(tmp_path: Path) -> None:
    recordings, _ = make_recordings(tmp_path)
    recording = recordings.start(control_pb2.RecordRequest(duration_s=10), now=0.0)
    assert recordings.expire(9.9) == []
    assert recordings.expire(10.0, caught_up=False) == []
    assert recordings.expire(recording.deadline(), caught_up=False) == [recording]


@pytest.mark.parametrize(
    ("subject", "node", "covered"),
    [
        ("trawl.v1.packets.>", "node-a", True),
        ("trawl.v1.packets.node-a.>", "node-a", True),
        ("trawl.v1.packets.node-a.>", "node-b", False),
        ("trawl.v1.packets.node-a.0", "node-a", True),
        ("trawl.v1.packets.*.0", "node-b", True),
        ("trawl.v1.packets.node.a.>", "node.a", False),  # a dotted name is one token, node_a
        ("trawl.v1.packets.node_a.>", "node.a", True),
        ("trawl.v1.calls.>", "node-a", False),
        (">", "node-a", True),
    ],
)
def test_which_nodes_a_recorder_reads(subject: str, node: str, covered: bool) -> None:
    assert subject_covers_node(subject, node) is covered


def test_the_same_request_gets_the_same_id_on_every_recorder() -> None:
    assert derived_id("_INBOX.abc.1", 0.0) == derived_id("_INBOX.abc.1", 0.4)
    assert derived_id("_INBOX.abc.1", 0.0) != derived_id("_INBOX.abc.2", 0.0)


def test_merge_lists_every_part_and_errs_only_when_none_answered() -> None:
    part_a = control_pb2.Recording(id="r", recorder="node-a", started_at_ns=5)
    part_b = control_pb2.Recording(id="r", recorder="node-b", started_at_ns=5)
    merged = merge(
        [
            control_pb2.RecordReply(recording_id="r", recordings=[part_b]),
            control_pb2.RecordReply(error="no recording 'r'"),
            control_pb2.RecordReply(recording_id="r", recordings=[part_a]),
        ]
    )
    assert (merged.error, merged.recording_id, [r.recorder for r in merged.recordings]) == (
        "",
        "r",
        ["node-a", "node-b"],
    )
    assert merge([control_pb2.RecordReply(error="no recording 'x'")] * 2).error == "no recording 'x'"


def test_a_recording_whose_file_is_gone_is_listed_as_failed_after_a_restart(tmp_path: Path) -> None:
    first, _ = make_recordings(tmp_path)
    recording = first.start(control_pb2.RecordRequest(duration_s=600), now=0.0)
    first.feed(batch_of(traffic(0, 4)))
    checkpoint = first.checkpoint()
    kill(recording)
    for partial in (tmp_path / "on-demand").glob("*.partial"):
        partial.unlink()
    second, metrics = make_recordings(tmp_path)
    assert second.recover(checkpoint, now=1.0) == []
    assert second.active == {}
    [listed] = second.all()
    described = listed.describe()
    assert (described.id, described.state) == (recording.id, "failed")
    assert described.error.startswith("could not go on after a restart:")
    assert metrics.counter("trawl_recorder_recording_errors_total", "").total() == 1
    third, _ = make_recordings(tmp_path)  # journaled: still listed after another restart
    third.recover([], now=2.0)
    assert [r.describe().state for r in third.all()] == ["failed"]


def test_recorders_with_the_same_schedule_give_its_recording_one_id() -> None:
    settings = ScheduleSettings(cron="*/5 * * * *", duration_s=60, nodes=["node-a"])
    first, second = Schedule(settings, 0.0), Schedule(settings, 100.0)
    assert first.due(301.0) and second.due(302.5)
    assert first.recording_id() == second.recording_id() == "19700101T000500Z-" + first.recording_id()[-8:]
    other = Schedule(ScheduleSettings(cron="*/5 * * * *", duration_s=60, nodes=["node-b"]), 0.0)
    assert other.due(301.0) and other.recording_id() != first.recording_id()
    assert first.due(601.0) and first.recording_id().startswith("19700101T001000Z-")


def test_a_start_for_nodes_this_recorder_does_not_read_gets_no_reply(tmp_path: Path) -> None:
    recordings, _ = make_recordings(tmp_path)
    start = control_pb2.RecordControl(start=control_pb2.RecordRequest(nodes=["node-b"], duration_s=5))

    def reads_node_a(node: str) -> bool:
        return node == "node-a"

    assert answer(recordings, start.SerializeToString(), 0.0, covers=reads_node_a) is None
    assert recordings.active == {}
    start.start.nodes.append("node-a")
    chosen = "20260101T000000Z-0badcafe"
    reply = answer(recordings, start.SerializeToString(), 0.0, covers=reads_node_a, recording_id=chosen)
    assert reply is not None and reply.recording_id == chosen
    listed = answer(recordings, control_pb2.RecordControl(list=True).SerializeToString(), 0.0, covers=reads_node_a)
    assert listed is not None and [r.id for r in listed.recordings] == [chosen]
    bad = answer(recordings, start.SerializeToString(), 0.0, covers=reads_node_a, recording_id="../../etc")
    assert bad is not None and "recording id '../../etc'" in bad.error
