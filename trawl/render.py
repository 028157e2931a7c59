"""How calls are shown to a person or a script: NDJSON (the public interface: protobuf's JSON
mapping with proto field names) or a readable table, row by row as calls arrive."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TextIO

from google.protobuf import json_format

from trawl.v1.calls_pb2 import ApiCall, Endpoint, Outcome

OUTCOME_WORDS = {
    Outcome.OUTCOME_UNSPECIFIED: "",
    Outcome.OUTCOME_OK: "ok",
    Outcome.OUTCOME_ERROR: "error",
    Outcome.OUTCOME_NO_RESPONSE: "no_response",
}


def call_to_json(call: ApiCall) -> str:
    return json.dumps(
        json_format.MessageToDict(call, preserving_proto_field_name=True), separators=(",", ":"), sort_keys=False
    )


def endpoint_label(endpoint: Endpoint) -> str:
    """`workload.namespace` when known, else `ip:port`."""
    if endpoint.workload:
        return f"{endpoint.workload}.{endpoint.namespace}" if endpoint.namespace else endpoint.workload
    if endpoint.name and endpoint.name != endpoint.ip:
        return endpoint.name
    host = f"[{endpoint.ip}]" if ":" in endpoint.ip else endpoint.ip
    return f"{host}:{endpoint.port}" if endpoint.port else host


class TableWriter:
    """Fixed-width rows; columns chosen for an SRE scanning an incident."""

    COLUMNS = (
        ("time", 15),
        ("proto", 8),
        ("source", 28),
        ("destination", 28),
        ("method", 8),
        ("path", 36),
        ("status", 9),
        ("ms", 9),
        ("outcome", 11),
    )

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.rows = 0

    def _line(self, cells: list[str]) -> str:
        parts = []
        for (_, width), cell in zip(self.COLUMNS, cells, strict=True):
            text = cell if len(cell) <= width else cell[: width - 1] + "…"
            parts.append(text.ljust(width))
        return " ".join(parts).rstrip()

    def header(self) -> None:
        self.out.write(self._line([name.upper() for name, _ in self.COLUMNS]) + "\n")

    def write(self, call: ApiCall) -> None:
        if self.rows == 0:
            self.header()
        self.rows += 1
        when = (
            datetime.fromtimestamp(call.request.ts / 1e9, tz=UTC).strftime("%H:%M:%S.%f")[:-3]
            if call.request.ts
            else ""
        )
        elapsed = f"{call.elapsed_ns / 1e6:.3f}" if call.elapsed_ns else ""
        self.out.write(
            self._line(
                [
                    when,
                    call.protocol,
                    endpoint_label(call.src),
                    endpoint_label(call.dst),
                    call.method,
                    call.path,
                    call.status,
                    elapsed,
                    OUTCOME_WORDS.get(call.outcome, ""),
                ]
            )
            + "\n"
        )
        self.out.flush()
