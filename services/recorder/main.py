"""The recorder service: every PacketBatch on the packet subject goes into rotating pcap files.

Each recorder reads the in-memory stream TRAWL_PACKETS through a durable consumer of its own
(`consumer`, "recorder-<node>" by default): every recorder records everything. The writer
checkpoints after every batch (the stream sequence and each batch sequence in `CHECKPOINT` in
the recordings directory, beside the sizes of the open files), so a recorder killed at any
point cuts its partial files back to the checkpoint when it starts again, seals them, and
resumes with the batch after it: every packet is recorded once. Batches that aged out of the
stream's window meanwhile are counted from the batch sequences, in batches and packets
(`trawl_recorder_lost_batches_total`, `trawl_recorder_lost_packets_total`, log line
`packet_batches_lost`). On a batch marked end_of_input (a replayed file is done) it seals its
files and announces `trawl.v1.control.drained.recorder.<node>` with the files sealed since the
previous announcement; on SIGTERM it stops reading and seals. With `continuous: false` the
rotating files are not written (the batches are still read, counted and checkpointed).

Recordings on demand (see recordings.py): the recorder answers RecordControl requests on
`trawl.v1.control.record` with a RecordReply: start a recording of a scope for a duration, with
the look-back in it; list; stop; get. Every recorder hears every request and answers for its
own part, the nodes it reads (control.py says how the asker gathers the parts). Schedules in the
config start recordings at the times their cron expressions name. A recording still running when
the input ends (end_of_input) or the recorder stops (SIGTERM) is sealed then.

A recorder killed mid-recording (SIGKILL, OOM, a node lost) goes on with the recording when it
starts again, rather than sealing it as interrupted: the running recordings (id, request, scope,
end time, counts, and the size of each of their files) are saved in the same CHECKPOINT as the
stream position, after each batch is in their files, so at start their files are cut back to
that checkpoint, reopened, and written from the batches read again after it, until their end
time (a recording takes the batches the stream stored before its end). A recording an alert
asked for keeps its length and holds every packet once, where sealing at the restart would
lose the rest of an incident. Files left partial without a checkpoint naming them are cut to
their last whole packet and sealed as "interrupted". Ended recordings are journaled
(on-demand/RECORDINGS), so `trawl record list` shows them after a restart too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from croniter import croniter
from google.protobuf.message import DecodeError

from trawl.bus import consumer_token
from trawl.errors import ConfigError
from trawl.logs import get_logger
from trawl.packet_stream import LossCounter, PacketReader
from trawl.recorder.config import RecorderSettings, ScheduleSettings
from trawl.recorder.control import RECORD_SUBJECT, RECORDING_ID_HEADER, derived_id, subject_covers_node
from trawl.recorder.recordings import ON_DEMAND_DIRECTORY, Ended, Lookback, Recording, Recordings
from trawl.recorder.upload import Shipper
from trawl.recorder.writer import PcapWriter
from trawl.service import ServiceContext, main_for
from trawl.v1 import control_pb2, packets_pb2

log = get_logger(__name__)

RETENTION_INTERVAL_S = 60.0
SHIP_STOP_TIMEOUT_S = 10.0


class Schedule:
    """When a configured schedule next starts its recording."""

    def __init__(self, settings: ScheduleSettings, now: float) -> None:
        self.settings = settings
        self._cron = croniter(settings.cron, now)
        self.next_at: float = self._cron.get_next(float)
        self.fired_at = 0.0
        # Recorders with the same schedule give the same start the same id (each its own part).
        self._tag = hashlib.sha256(settings.model_dump_json().encode()).hexdigest()[:8]

    def due(self, now: float) -> bool:
        if now < self.next_at:
            return False
        # A recorder that was busy past several start times starts one recording, not a burst.
        while self.next_at <= now:
            self.fired_at = self.next_at
            self.next_at = self._cron.get_next(float)
        return True

    def recording_id(self) -> str:
        """The id of the recording started at the last time due() said."""
        return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.fired_at)) + "-" + self._tag

    def request(self) -> control_pb2.RecordRequest:
        s = self.settings
        return control_pb2.RecordRequest(
            requested_by=f"schedule:{s.cron}",
            reason=s.reason,
            nodes=s.nodes,
            namespaces=s.namespaces,
            pods=s.pods,
            ips=s.ips,
            filter=s.filter,
            duration_s=max(1, round(s.duration_s)),
        )


def answer(
    recordings: Recordings,
    data: bytes,
    now: float,
    *,
    covers: Callable[[str], bool] | None = None,
    recording_id: str = "",
) -> control_pb2.RecordReply | None:
    """The reply to one RecordControl request; a refused one says why in `error`. None (no
    reply) to a start naming only nodes this recorder does not read (`covers`): another
    recorder records them, and answers (see control.py)."""
    try:
        control = control_pb2.RecordControl.FromString(data)
    except DecodeError as exc:
        return control_pb2.RecordReply(error=f"not a RecordControl message: {exc}")
    action = control.WhichOneof("action")
    try:
        found: list[Recording | Ended]
        if action == "start":
            if covers is not None and control.start.nodes and not any(covers(n) for n in control.start.nodes):
                return None
            found = [recordings.start(control.start, now, recording_id)]
        elif action == "stop":
            found = [recordings.stop(control.stop)]
        elif action == "get":
            found = [recordings.get(control.get)]
        elif action == "list":
            found = recordings.all()
        else:
            return control_pb2.RecordReply(error="the request names no action (start, list, stop or get)")
    except ConfigError as exc:
        return control_pb2.RecordReply(error=str(exc))
    return control_pb2.RecordReply(
        recording_id=found[0].id if action != "list" else "",
        recordings=[recording.describe() for recording in found],
    )


def open_directory(directory: Path) -> None:
    """Create the recordings directory, or fail at start naming it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"recorder.directory {directory}: cannot create it ({exc.strerror}); set it to a writable folder"
        ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"recorder.directory {directory}: not writable; set it to a writable folder")


async def serve(ctx: ServiceContext[RecorderSettings]) -> None:
    settings = ctx.settings
    directory = settings.directory.resolve()  # Drained lists absolute paths
    open_directory(directory)
    writer = PcapWriter(
        directory,
        rotate_bytes=settings.rotate_bytes,
        rotate_seconds=settings.rotate_seconds,
        max_age_s=settings.retention.max_age_s,
        max_total_bytes=settings.retention.max_total_bytes,
        metrics=ctx.metrics,
    )
    writer.recover()
    announced = len(writer.sealed)
    mark = writer.mark or {}
    gaps = LossCounter(dict(mark.get("sequences", {})), dict(mark.get("packets", {})))
    lost = ctx.metrics.counter("trawl_recorder_lost_batches_total", "Packet batches missing from a shard's sequence")
    lost_packets = ctx.metrics.counter(
        "trawl_recorder_lost_packets_total", "Packets in the batches missing from a shard's sequence"
    )
    undecodable = ctx.metrics.counter("trawl_recorder_undecodable_total", "Messages that were not a PacketBatch")
    bad_batches = ctx.metrics.counter("trawl_recorder_bad_batches_total", "Batches not written: malformed records")
    recordings = Recordings(
        directory / ON_DEMAND_DIRECTORY,
        file_format=settings.recordings_format,
        lookback=Lookback(settings.lookback_s, settings.lookback_bytes, ctx.metrics),
        identity=settings.identity,
        max_active=settings.max_recordings,
        metrics=ctx.metrics,
        max_age_s=settings.retention.max_age_s,
        max_total_bytes=settings.retention.max_total_bytes,
        recorder=settings.node,
    )
    # Recordings running when the previous process stopped without sealing them (SIGKILL, a
    # crash) go on from the checkpoint: their files are cut back to it, and the batches after it
    # are read again below; see Recordings.recover.
    recordings.recover(list(mark.get("recordings", [])), time.time())
    shipper: Shipper | None = None
    if settings.s3 is not None:
        # After recovery: what it sealed, and what a previous run sealed but did not ship, is
        # found by the scan; from here on each file is queued as it is sealed.
        shipper = Shipper(settings.s3, settings.node, directory, ctx.metrics)
        shipper.scan([directory, directory / ON_DEMAND_DIRECTORY])
        writer.on_sealed.append(shipper.add)
        recordings.on_sealed.append(shipper.add)
    schedules = [Schedule(schedule, time.time()) for schedule in settings.schedules]

    async def on_batch(data: bytes, stream_seq: int, stored_ns: int) -> None:
        nonlocal announced
        try:
            batch = packets_pb2.PacketBatch.FromString(data)
        except DecodeError as exc:
            undecodable.inc()
            log.warning("recorder_undecodable", stream_seq=stream_seq, error=str(exc))
            return
        try:
            source = f"{batch.node}/{batch.shard}"
            missing, missing_packets = gaps.observe(source, batch.sequence, batch.packets_before, batch.packet_count)
            if missing:
                lost.inc(missing, node=batch.node, shard=str(batch.shard))
                lost_packets.inc(missing_packets, node=batch.node, shard=str(batch.shard))
                log.warning(
                    "packet_batches_lost",
                    node=batch.node,
                    shard=batch.shard,
                    lost_batches=missing,
                    lost_packets=missing_packets,
                    after_sequence=batch.sequence - missing - 1,
                )
            position = {
                "stream_seq": stream_seq,
                "stream": reader.stream_id,
                "sequences": gaps.sequences,
                "packets": gaps.packets,
            }
            # The recordings first: the checkpoint below covers the batch in their files too.
            try:
                recordings.feed(batch, stored_ns)
            except ValueError as exc:
                if not settings.continuous:  # otherwise the writer counts it
                    bad_batches.inc(node=batch.node)
                    log.warning("recorder_bad_batch", node=batch.node, sequence=batch.sequence, error=str(exc))
            if recordings.active or recordings.changed:
                recordings.changed = False
                position["recordings"] = recordings.checkpoint()
            if settings.continuous:
                writer.write(batch, mark=position)
            else:
                writer.checkpoint(position)
            if batch.end_of_input:
                recordings.stop_all("sealed")
                writer.seal_all()
                files = [str(path) for path in writer.sealed[announced:]]
                announced = len(writer.sealed)
                await ctx.drained(emitted=writer.packets_written, files=files)
        except Exception:  # one bad batch must not stop the recording
            log.exception("recorder_batch_failed", stream_seq=stream_seq)

    await ctx.bus.ensure_packet_stream(settings.packet_retention)
    reader = PacketReader(
        ctx.bus.js,
        settings.consumer or f"recorder-{consumer_token(settings.node)}",
        settings.subject,
        on_batch,
        ensure_stream=lambda: ctx.bus.ensure_packet_stream(settings.packet_retention),
    )
    resume_after = int(mark.get("stream_seq", 0))
    await reader.start(start_seq=resume_after + 1 if resume_after else None, stream_id=str(mark.get("stream", "")))
    log.info("recorder_resumed", consumer=reader.durable, after=resume_after, sequences=gaps.sequences)

    def save() -> None:
        """Checkpoint the recordings started or ended since the last batch (with the writer's
        last mark: the files are where that mark says)."""
        if recordings.changed:
            recordings.changed = False
            writer.checkpoint({**(writer.mark or {}), "recordings": recordings.checkpoint()})

    def covers(node: str) -> bool:
        return subject_covers_node(settings.subject, node)

    async def on_control(msg: Any) -> None:
        headers = msg.headers or {}
        recording_id = headers.get(RECORDING_ID_HEADER) or (derived_id(msg.reply, time.time()) if msg.reply else "")
        try:
            reply = answer(recordings, msg.data, time.time(), covers=covers, recording_id=recording_id)
            save()
        except Exception as exc:  # the asker gets an answer, the recorder goes on
            log.exception("record_control_failed")
            reply = control_pb2.RecordReply(error=f"the recorder failed: {exc}")
        if msg.reply and reply is not None:
            await ctx.bus.nc.publish(msg.reply, reply.SerializeToString())

    # No queue group: every recorder hears every request and answers for its own part.
    control = await ctx.bus.nc.subscribe(RECORD_SUBJECT, cb=on_control) if settings.control else None
    ship_stop = asyncio.Event()
    shipping = asyncio.create_task(shipper.run(ship_stop), name="s3-upload") if shipper else None
    await ctx.ready()
    tick = min(1.0, settings.rotate_seconds)
    since_retention = 0.0
    while not ctx.stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.stopping.wait(), timeout=tick)
        now = time.time()
        for schedule in schedules:
            if schedule.due(now):
                with contextlib.suppress(ConfigError):  # refused: logged and counted by start()
                    recordings.start(schedule.request(), now, schedule.recording_id())
        recordings.expire(now, recordings.caught_up(now))
        save()
        writer.rotate_due()
        writer.sync()
        await reader.ack()
        since_retention += tick
        if since_retention >= RETENTION_INTERVAL_S:
            since_retention = 0.0
            writer.apply_retention()
            recordings.apply_retention(time.time())
    # Stop reading (the batch in hand is written and checkpointed), then seal: a stopped
    # recorder leaves only sealed files, and the next one resumes after the checkpoint.
    if control is not None:
        await control.unsubscribe()
    await reader.stop()
    recordings.stop_all()
    save()
    writer.seal_all()
    writer.sync()
    await reader.ack()
    if shipping is not None and shipper is not None:
        # The files just sealed are shipped, for at most SHIP_STOP_TIMEOUT_S (those whose upload
        # failed before are not waited for); what is left stays queued for the next start.
        ship_stop.set()
        done, _ = await asyncio.wait({shipping}, timeout=SHIP_STOP_TIMEOUT_S)
        if not done:
            shipping.cancel()
        log.info("s3_upload_stopped", pending=len(shipper.pending))


def main(config_file: Path | None) -> int:
    return main_for("recorder", RecorderSettings, serve, config_file)
