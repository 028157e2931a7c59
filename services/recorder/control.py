"""`trawl record start/list/stop/get`: RecordControl requests to the recorder over NATS.

Request/reply on NATS rather than the gRPC API the design names: every trawl process already
holds a NATS connection and nothing else (no port of its own for the recorder to open, route
and secure), NATS finds a recorder wherever it runs, the alerter asks the same way it publishes,
and a queue group gives one answer from one of several recorders without a load balancer.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from google.protobuf import json_format
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from trawl.bus import Bus, control_subject
from trawl.config import NatsSettings
from trawl.errors import UserError
from trawl.v1 import control_pb2

RECORD_SUBJECT = control_subject("record")


async def ask(settings: NatsSettings, control: control_pb2.RecordControl, timeout_s: float) -> control_pb2.RecordReply:
    """One request, one reply; UserError when no recorder answers."""
    bus = await Bus.connect(settings, "trawl-record")
    try:
        message = await bus.nc.request(RECORD_SUBJECT, control.SerializeToString(), timeout=timeout_s)
    except NoRespondersError:
        raise UserError(f"no recorder answers on {RECORD_SUBJECT} (is one running with control: true?)") from None
    except NatsTimeout:
        raise UserError(f"no answer on {RECORD_SUBJECT} within {timeout_s:g} s") from None
    finally:
        await bus.close()
    return control_pb2.RecordReply.FromString(message.data)


def _time(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ns else "-"


def render(reply: control_pb2.RecordReply, as_json: bool) -> str:
    """The reply as a table (or JSON, one recording per line)."""
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
        )
        pods = f" (pods: {', '.join(r.selected_pods)})" if r.selected_pods else ""
        lines.append(f"  scope: {r.expression or 'everything'}{pods}")
        for path in r.files:
            lines.append(f"  file: {path}")
        if r.error:
            lines.append(f"  error: {r.error}")
    return "\n".join(lines) + "\n" if lines else "no recordings\n"
