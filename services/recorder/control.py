"""`trawl record start/list/stop/get`: RecordControl requests to the recorders over NATS.

Request/reply on NATS rather than the gRPC API the design names: every trawl process already
holds a NATS connection and nothing else (no port of its own for the recorder to open, route
and secure), NATS finds the recorders wherever they run, and the alerter asks the same way it
publishes.

Several recorders (one per node, each reading its node's packets with `subject:
trawl.v1.packets.<node>.>`) are one recorder to the asker, by scatter-gather:

- Every recorder subscribes to `trawl.v1.control.record` with no queue group, so each hears
  every request, and answers for its own part: a recorder only has the packets of the nodes its
  subject reads, so no single recorder could record a scope spanning nodes.
- start: each recorder reading at least one of the request's nodes (every recorder when the
  request names none) starts its part and replies with it; the others stay silent, so whoever
  takes only the first reply (the alerter's plain request) gets a recording that runs. The
  parts share one id: the asker's `Trawl-Recording-Id` header (ask() sets one), else one derived
  from the request's reply subject, which every recorder sees the same (and its own clock for the
  time in it). Scheduled recordings take their id from the schedule and its start time.
- list: every recorder replies with its recordings; get/stop: the recorders holding that id
  reply with their part, the others with "no recording".
- The asker (ask_all) gathers replies on an inbox of its own until `expect` recorders have
  answered, or (not knowing how many there are) until none has come for `stall_s` after the last
  one (the "stall" strategy of NATS request-many), at most `timeout_s`; merge() lists each
  recording's parts, one per recorder (Recording.recorder names it), and reports an error only
  when no recorder could do what was asked.

The simpler queue group (one recorder takes each request) is right only for a single recorder:
with two, a request for a node lands on a recorder that never sees its packets, and get/stop
reach a recorder that does not hold the recording.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from datetime import UTC, datetime

from google.protobuf import json_format

from trawl.bus import Bus, control_subject, packets_subject
from trawl.config import NatsSettings
from trawl.errors import UserError
from trawl.v1 import control_pb2

RECORD_SUBJECT = control_subject("record")
# The recording id the asker chose for every recorder's part of one start.
RECORDING_ID_HEADER = "Trawl-Recording-Id"
DEFAULT_STALL_S = 0.5


def derived_id(reply_subject: str, now: float) -> str:
    """The id every recorder gives the same start request without an id header: its reply
    subject (the same for all) hashed, after the start time."""
    return (
        time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + hashlib.sha256(reply_subject.encode()).hexdigest()[:8]
    )


def subject_covers_node(filter_subject: str, node: str) -> bool:
    """Whether a recorder reading `filter_subject` gets (some of) the packets of `node`."""
    wanted = packets_subject(node, "*").split(".")
    tokens = filter_subject.split(".")
    for index, token in enumerate(tokens):
        if token == ">":
            return index < len(wanted)
        if index >= len(wanted):
            return False
        if token != "*" and wanted[index] != "*" and token != wanted[index]:
            return False
    return len(tokens) == len(wanted)


async def ask_all(
    settings: NatsSettings,
    control: control_pb2.RecordControl,
    timeout_s: float,
    *,
    stall_s: float = DEFAULT_STALL_S,
    expect: int = 0,
) -> list[control_pb2.RecordReply]:
    """Every recorder's reply to one request (see the module's docstring for when it stops
    waiting); UserError when none answers."""
    headers = {}
    if control.WhichOneof("action") == "start":
        headers[RECORDING_ID_HEADER] = new_request_id()
    bus = await Bus.connect(settings, "trawl-record")
    replies: list[control_pb2.RecordReply] = []
    try:
        inbox = bus.nc.new_inbox()
        subscription = await bus.nc.subscribe(inbox)
        await bus.nc.publish(RECORD_SUBJECT, control.SerializeToString(), reply=inbox, headers=headers)
        deadline = time.monotonic() + timeout_s
        while not expect or len(replies) < expect:
            left = deadline - time.monotonic()
            wait = left if not replies else min(left, stall_s)
            if wait <= 0:
                break
            try:
                message = await subscription.next_msg(timeout=wait)
            except TimeoutError:
                break
            if message.headers and message.headers.get("Status") == "503":
                raise UserError(f"no recorder answers on {RECORD_SUBJECT} (is one running with control: true?)")
            replies.append(control_pb2.RecordReply.FromString(message.data))
    finally:
        await bus.close()
    if not replies:
        if control.WhichOneof("action") == "start" and control.start.nodes:
            raise UserError(
                f"no recorder reads the packets of {', '.join(control.start.nodes)} (each answers for the "
                "nodes its recorder.subject reads): check --node against the collectors' node names"
            )
        raise UserError(f"no answer on {RECORD_SUBJECT} within {timeout_s:g} s")
    return replies


def new_request_id() -> str:
    """A recording id as the recorders make them (recordings.new_id): start time, 8 hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


def merge(replies: list[control_pb2.RecordReply]) -> control_pb2.RecordReply:
    """One reply out of the recorders' replies: every part they hold, ordered by start time, id
    and recorder; the first error when none did what was asked."""
    done = [reply for reply in replies if not reply.error]
    if not done:
        return control_pb2.RecordReply(error=replies[0].error)
    merged = control_pb2.RecordReply(recording_id=next((r.recording_id for r in done if r.recording_id), ""))
    parts = [recording for reply in done for recording in reply.recordings]
    merged.recordings.extend(sorted(parts, key=lambda r: (r.started_at_ns, r.id, r.recorder)))
    return merged


async def ask(
    settings: NatsSettings,
    control: control_pb2.RecordControl,
    timeout_s: float,
    *,
    stall_s: float = DEFAULT_STALL_S,
    expect: int = 0,
) -> control_pb2.RecordReply:
    """The recorders' replies to one request, merged; UserError when none answers."""
    return merge(await ask_all(settings, control, timeout_s, stall_s=stall_s, expect=expect))


def _time(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ns else "-"


def render(reply: control_pb2.RecordReply, as_json: bool) -> str:
    """The reply as a table (or JSON, one recording part per line)."""
    if as_json:
        return "".join(
            json.dumps(json_format.MessageToDict(r, preserving_proto_field_name=True), sort_keys=True) + "\n"
            for r in reply.recordings
        )
    lines = []
    for r in reply.recordings:
        lines.append(
            f"{r.id}  {r.state:<9}  {_time(r.started_at_ns)} .. {_time(r.ends_at_ns)}  "
            f"{r.packets} packets ({r.lookback_packets} from the look-back)  by {r.request.requested_by or '-'}"
            + (f"  on {r.recorder}" if r.recorder else "")
        )
        pods = f" (pods: {', '.join(r.selected_pods)})" if r.selected_pods else ""
        lines.append(f"  scope: {r.expression or 'everything'}{pods}")
        for path in r.files:
            lines.append(f"  file: {path}")
        if r.error:
            lines.append(f"  error: {r.error}")
    return "\n".join(lines) + "\n" if lines else "no recordings\n"
