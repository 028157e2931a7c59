"""`trawl tls status`: is TLS decryption working, for which processes, and if not, why.

Each collector with `tls.mode` auto or on answers a request on `trawl.v1.control.tls.status`
with its report (`TlsCapture.status`: BPF loaded or the reason it is not, every process that
maps a TLS library with its library, version, hooked or not and why, chunks published and
lost); the command asks once and prints every answer that comes within the timeout. With
`--local` it asks no collector and says what this machine offers: whether eBPF uprobes can be
loaded here (or why not) and which processes map a TLS library.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from trawl.bus import Bus
from trawl.collector.tls_targets import comm, pod_name, pod_uid, scan
from trawl.collector.tls_uprobes import STATUS_SUBJECT, availability
from trawl.config import NatsSettings


async def ask_collectors(settings: NatsSettings, timeout_s: float) -> list[dict[str, Any]]:
    """Every collector's report that arrives within `timeout_s`, by node."""
    bus = await Bus.connect(settings, "trawl-tls-status")
    reports: list[dict[str, Any]] = []
    try:
        inbox = bus.nc.new_inbox()
        received = asyncio.Event()

        async def collect(msg: Any) -> None:
            try:
                reports.append(json.loads(msg.data))
            except ValueError:
                return
            received.set()

        subscription = await bus.nc.subscribe(inbox, cb=collect)
        await bus.nc.publish(STATUS_SUBJECT, b"", reply=inbox)
        await bus.nc.flush()
        await asyncio.sleep(timeout_s)
        await subscription.unsubscribe()
    finally:
        await bus.close()
    return sorted(reports, key=lambda report: str(report.get("node", "")))


def local_report() -> dict[str, Any]:
    """What this machine offers, without a collector: hooked is unknown."""
    reason = availability()
    rows = []
    for library in scan(exclude=frozenset({os.getpid()})).values():
        for pid in sorted(library.pids):
            rows.append(
                {
                    "pid": pid,
                    "comm": comm(Path("/proc"), pid),
                    "pod_uid": pod_uid(Path("/proc"), pid),
                    "pod": pod_name(Path("/proc"), pid),
                    "library": library.library,
                    "version": library.version,
                    "abi": library.go.abi if library.go is not None else "",
                    "path": library.path,
                    "hooked": None,
                    "reason": "no collector asked (--local)",
                }
            )
    return {"node": "(this machine)", "bpf": "usable" if reason is None else reason, "processes": rows}


def render(reports: list[dict[str, Any]]) -> str:
    """A table per node, under a line saying whether BPF is loaded there and what was lost."""
    if not reports:
        return "no collector answered: is one running with collector.tls.mode auto or on, on this NATS?\n"
    out: list[str] = []
    for report in reports:
        lost = report.get("lost") or {}
        lost_text = ", ".join(f"{name} {value}" for name, value in sorted(lost.items()) if value) or "none"
        header = f"node {report.get('node', '?')}: BPF {report.get('bpf', '?')}"
        if "chunks_published" in report:
            header += f"; chunks published {report['chunks_published']}, lost {lost_text}"
        out.append(header)
        rows = report.get("processes") or []
        if not rows:
            out.append("  no process maps a TLS library")
            continue
        table = [("PID", "COMM", "POD", "POD UID", "LIBRARY", "HOOKED", "WHY NOT", "PATH")]
        for row in rows:
            hooked = {True: "yes", False: "no", None: "?"}[row.get("hooked")]
            library = f"{row.get('library', '')} {row.get('version', '')}".strip()
            if row.get("abi"):  # Go: which calling convention was read (and hooked)
                library += f" ({row['abi']} ABI)"
            table.append(
                (
                    str(row.get("pid")),
                    row.get("comm", ""),
                    row.get("pod") or "-",
                    row.get("pod_uid") or "-",
                    library,
                    hooked,
                    row.get("reason") or "-",
                    row.get("path", ""),
                )
            )
        widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
        for line in table:
            cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
            out.append("  " + "  ".join([*cells, line[-1]]))
    return "\n".join(out) + "\n"


def status(nats: NatsSettings | None, timeout_s: float, as_json: bool, local: bool) -> tuple[str, int]:
    """The text to print and the exit code (1 when nothing is hooked anywhere, or no answer)."""
    reports = [local_report()] if local or nats is None else asyncio.run(ask_collectors(nats, timeout_s))
    text = json.dumps(reports, indent=1) + "\n" if as_json else render(reports)
    hooked = any(row.get("hooked") for report in reports for row in report.get("processes") or [])
    return text, 0 if hooked or (local and reports[0]["bpf"] == "usable") else 1
