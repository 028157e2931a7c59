"""Recordings on demand and on schedule: a scope, a duration, and the look-back before them.

Every packet the recorder reads is kept for a while in a `Lookback` per node: the packets of the
last `lookback_s` in the packets' own timestamps (a replayed capture's look-back is its own 30 s,
not the replay's), at most `lookback_bytes` per node, held as the batches came; packets pushed
out by the byte bound before their time are counted (`trawl_recorder_lookback_dropped_total`
with reason "bytes"), those that age out with reason "age".

A `Recording` is asked for with a RecordRequest. Its scope becomes one libpcap expression: the
addresses of the pods selected by namespace and name regex (from the identity snapshot, as the
collector's scope does), and the request's own IPs, ORed, then ANDed with the request's filter.
It is compiled by libpcap for each link type it meets and run on each packet with libpcap's
own `bpf_filter`, so the expression means exactly what it means to tcpdump. Packets of the
request's nodes (all nodes when none is named) that pass go to the recording's file: first
those of the look-back, then every later one until the duration ends, it is stopped, or the
input ends. Pods on the host network share the node's address and are not selectable (the
collector's scope says the same); pods are matched on their addresses at the time of the
request, so a pod started afterwards is not in the recording.

Files are written as `<id>.<format>.partial` and sealed like the continuous files: fsynced,
renamed, read-only, listed in `SHA256SUMS` of the on-demand directory. A PCAPNG recording is
one file whose section header carries a comment naming the trigger and the scope, with an
interface per (node, link type, timestamp resolution); a pcap recording is one file per link
type and resolution (pcap has one of each per file).

Restarts: `checkpoint()` describes the running recordings as far as their flushed files hold
them (id, request, scope, end time, counts, each file's size and the PCAPNG interfaces); the
recorder saves it with the stream position after each batch. `recover()` at start takes them
up again (files cut back to those sizes and reopened: the batches after the position are read
again and land once), seals any other partial file after its last whole record or block as
"interrupted", and lists the ended recordings again from the journal (`RECORDINGS`, one
describe() per line). A recording takes the batches the stream stored before its end time
(`feed`'s stored_ns), so one taken up after a restart gets the backlog up to its end.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import ipaddress
import os
import re
import secrets
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from dpkt import pcapng
from google.protobuf import json_format

from trawl.collector.bpf_filter import Instruction, _BpfInsn, _pcap
from trawl.collector.scope import PodDirectory, Scope
from trawl.errors import ConfigError, InputError
from trawl.logs import get_logger
from trawl.metrics import Registry
from trawl.pcap import GLOBAL_HEADER, RECORD_HEADER, global_header, iter_records, pack_record
from trawl.recorder.writer import DEFAULT_SNAPLEN, delete_oldest, publish_sealed
from trawl.v1 import control_pb2, packets_pb2

log = get_logger(__name__)

ON_DEMAND_DIRECTORY = "on-demand"
_NS_PER_S = 1_000_000_000
_TSRESOL_NS = b"\x09"  # if_tsresol: 10^-9 s
KEEP_DONE = 1000
# Ended recordings, one JSON document a line (Recording.describe()), so a restarted recorder
# still lists them; rewritten with the newest KEEP_DONE once it holds twice as many.
JOURNAL_NAME = "RECORDINGS"
# A recording whose end time has passed is sealed once a batch stored after that time arrives
# (feed), or once no batch has come for IDLE_S (expire): the batches stored before its end are in
# it even when the recorder reads behind (after a restart, its backlog). LATE_S bounds the wait
# for a recorder that never catches up.
IDLE_S = 2.0
LATE_S = 60.0
# What recordings name their sealed files; retention only ever touches files with this shape.
RECORDING_NAME = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}(?:-\d+)?\.pcap(?:ng)?$")
RECORDING_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")


@dataclass(frozen=True, slots=True)
class Packet:
    """One captured packet and where it came from."""

    node: str
    link_type: int
    nanosecond: bool
    snaplen: int
    ts_ns: int
    data: bytes
    orig_len: int

    @property
    def size(self) -> int:
        return RECORD_HEADER.size + len(self.data)


def packets_of(batch: packets_pb2.PacketBatch) -> list[Packet]:
    """The batch's packets; ValueError when a record runs past the end."""
    snaplen = batch.snaplen or DEFAULT_SNAPLEN
    return [
        Packet(batch.node, batch.link_type, batch.nanosecond, snaplen, record.ts_ns, record.data, record.orig_len)
        for record in iter_records(batch.records, batch.nanosecond)
    ]


def batch_extent(batch: packets_pb2.PacketBatch) -> tuple[int, int]:
    """(packets, newest timestamp in ns) of a batch, walking only the record headers; ValueError
    when a record runs past the end."""
    payload = batch.records
    scale = 1 if batch.nanosecond else 1000
    unpack = RECORD_HEADER.unpack_from
    header = RECORD_HEADER.size
    offset = 0
    end = len(payload)
    count = 0
    newest = 0
    while offset < end:
        if offset + header > end:
            raise ValueError(f"truncated pcap record header at offset {offset}")
        seconds, fraction, incl_len, _ = unpack(payload, offset)
        offset += header + incl_len
        if offset > end:
            raise ValueError(f"pcap record claims {incl_len} bytes past the end of the batch")
        newest = max(newest, seconds * _NS_PER_S + fraction * scale)
        count += 1
    return count, newest


@dataclass(slots=True)
class _HeldBatch:
    batch: packets_pb2.PacketBatch
    packets: int
    newest_ns: int


class Lookback:
    """The last `seconds` of packets per node (in packet time), at most `max_bytes` per node.

    Batches are held whole, as they came (splitting every packet out costs more than all the
    rest of the recorder): a batch leaves once its newest packet is older than the window
    (its packets counted as reason "age") or to keep the node under `max_bytes` (reason "bytes");
    a recording takes, from the batches held, the packets inside the window."""

    def __init__(self, seconds: float, max_bytes: int, metrics: Registry) -> None:
        self.window_ns = int(seconds * _NS_PER_S)
        self.max_bytes = max_bytes
        self._held: dict[str, deque[_HeldBatch]] = {}
        self._bytes: dict[str, int] = {}
        self._newest: dict[str, int] = {}
        self._dropped = metrics.counter(
            "trawl_recorder_lookback_dropped_total", "Packets that left the look-back: aged out, or for its byte bound"
        )
        self._held_bytes = metrics.gauge(
            "trawl_recorder_lookback_bytes", "Bytes of packet records held in the look-back"
        )

    @property
    def enabled(self) -> bool:
        return self.window_ns > 0 and self.max_bytes > 0

    def add(self, batch: packets_pb2.PacketBatch) -> None:
        """Hold a batch, letting go of those past the window or the bound; ValueError when its
        records are malformed (it is not held)."""
        if not self.enabled:
            return
        packets, newest_ns = batch_extent(batch)
        if not packets:
            return
        node = batch.node
        held = self._held.setdefault(node, deque())
        held.append(_HeldBatch(batch, packets, newest_ns))
        newest = self._newest[node] = max(self._newest.get(node, 0), newest_ns)
        size = self._bytes.get(node, 0) + len(batch.records)
        oldest_kept = newest - self.window_ns
        aged = 0
        while held and held[0].newest_ns < oldest_kept:
            gone = held.popleft()
            size -= len(gone.batch.records)
            aged += gone.packets
        pushed = 0
        while size > self.max_bytes and held:
            gone = held.popleft()
            size -= len(gone.batch.records)
            pushed += gone.packets
        if aged:
            self._dropped.inc(aged, node=node, reason="age")
        if pushed:
            self._dropped.inc(pushed, node=node, reason="bytes")
        self._bytes[node] = size
        self._held_bytes.set(sum(self._bytes.values()))

    def packets(self, nodes: frozenset[str]) -> list[Packet]:
        """The packets inside the window for these nodes (all nodes when empty), oldest first."""
        chosen: list[Packet] = []
        for node, held in self._held.items():
            if nodes and node not in nodes:
                continue
            oldest_kept = self._newest[node] - self.window_ns
            for entry in held:
                chosen.extend(packet for packet in packets_of(entry.batch) if packet.ts_ns >= oldest_kept)
        chosen.sort(key=lambda packet: packet.ts_ns)  # stable: equal times keep their order
        return chosen


class PacketFilter:
    """A libpcap expression, compiled per link type and run on packets by libpcap's bpf_filter."""

    def __init__(self, expression: str) -> None:
        self.expression = expression
        self._programs: dict[tuple[int, int], ctypes.Array[_BpfInsn] | None] = {}
        lib = _pcap().lib
        lib.bpf_filter.restype = ctypes.c_uint
        lib.bpf_filter.argtypes = [ctypes.POINTER(_BpfInsn), ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint]
        self._run = lib.bpf_filter

    def check(self, link_types: tuple[int, ...]) -> None:
        """Compile now for these link types: ConfigError with libpcap's message when it cannot."""
        for link_type in link_types:
            self._program(link_type, DEFAULT_SNAPLEN)

    def _program(self, link_type: int, snaplen: int) -> ctypes.Array[_BpfInsn] | None:
        key = (link_type, snaplen)
        if key not in self._programs:
            instructions: list[Instruction] = _pcap().compile(self.expression, link_type, snaplen)
            self._programs[key] = (_BpfInsn * len(instructions))(*(_BpfInsn(*insn) for insn in instructions))
        return self._programs[key]

    def accepts(self, packet: Packet) -> bool:
        if not self.expression:
            return True
        program = self._program(packet.link_type, packet.snaplen)
        data = packet.data
        return bool(self._run(program, data, packet.orig_len, len(data)))


def _host_terms(ips: list[str]) -> str:
    terms = []
    for text in sorted(set(ips)):
        kind = "ip6" if ipaddress.ip_address(text).version == 6 else "ip"
        terms.append(f"{kind} host {text}")
    return " or ".join(terms)


def scope_expression(request: control_pb2.RecordRequest, identity: Path | None) -> tuple[str, list[str]]:
    """(libpcap expression, selected pods "ns/name") of a request; ConfigError saying why not."""
    for text in request.ips:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ConfigError(f"ips: {text!r} is not an IP address") from None
    addresses = list(request.ips)
    selected: list[str] = []
    if request.namespaces or request.pods:
        if identity is None:
            raise ConfigError(
                "a scope by namespace or pod needs the pods' addresses: set recorder.identity to a "
                "`kubectl get pods -A -o json` snapshot, or give the addresses as ips instead"
            )
        else:
            scope = Scope(namespaces=tuple(request.namespaces), pod_regexes=tuple(request.pods))
            try:
                directory = PodDirectory.from_snapshot(identity)
            except InputError as exc:
                raise ConfigError(f"recorder.identity: {exc}") from None
            for pod in directory.pods:
                if pod.host_network or not pod.ips or not scope.includes(pod):
                    continue
                selected.append(f"{pod.namespace}/{pod.name}")
                addresses.extend(pod.ips)
            if not addresses:
                raise ConfigError(f"the scope selects no pod with an address of its own in {identity}")
    parts = [f"({part})" for part in (_host_terms(addresses), request.filter.strip()) if part]
    expression = parts[0][1:-1] if len(parts) == 1 else " and ".join(parts)
    return expression, selected


def describe(request: control_pb2.RecordRequest, expression: str) -> str:
    """The comment a PCAPNG recording carries: trigger and scope."""
    scope = []
    for label, values in (
        ("nodes", request.nodes),
        ("namespaces", request.namespaces),
        ("pods", request.pods),
        ("ips", request.ips),
    ):
        if values:
            scope.append(f"{label}={','.join(values)}")
    if request.filter:
        scope.append(f"filter={request.filter!r}")
    trigger = request.requested_by or "unnamed"
    if request.reason:
        trigger += f" ({request.reason})"
    return (
        f"trawl recording; trigger: {trigger}; scope: {' '.join(scope) or 'everything'}; "
        f"expression: {expression or '<none>'}; duration: {request.duration_s}s"
    )


@dataclass
class _Output:
    partial: Path
    final: Path
    handle: BinaryIO
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    size: int = 0

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        self.digest.update(data)
        self.size += len(data)


class Recording:
    """One recording's file(s): packets in, sealed files out."""

    def __init__(
        self,
        recording_id: str,
        request: control_pb2.RecordRequest,
        expression: str,
        selected_pods: list[str],
        directory: Path,
        file_format: str,
        now: float,
        recorder: str = "",
    ) -> None:
        self.id = recording_id
        self.recorder = recorder
        self.request = request
        self.filter = PacketFilter(expression)
        self.selected_pods = selected_pods
        self.directory = directory
        self.format = file_format
        self.nodes = frozenset(request.nodes)
        self.started_at = now
        self.ends_at = now + request.duration_s
        # Set when a restarted recorder took the recording up again (its wait for the backlog
        # is measured from then).
        self.resumed_at: float | None = None
        self.state = "recording"
        self.error = ""
        self.packets = 0
        self.lookback_packets = 0
        self.files: list[Path] = []
        self._outputs: dict[tuple[int, bool], _Output] = {}
        self._interfaces: dict[tuple[str, int, bool], int] = {}
        self._unfiltered_link_types: set[int] = set()

    def offer(self, packet: Packet) -> bool:
        """Write the packet when it is in scope; True when written."""
        if self.nodes and packet.node not in self.nodes:
            return False
        if packet.link_type in self._unfiltered_link_types:
            return False
        try:
            if not self.filter.accepts(packet):
                return False
        except ConfigError as exc:
            # A link type libpcap cannot compile this filter for: those packets are left out,
            # and the recording says so.
            self._unfiltered_link_types.add(packet.link_type)
            self.error = f"link type {packet.link_type} left out: {exc}"
            log.warning("recording_link_type_skipped", recording=self.id, link_type=packet.link_type, error=str(exc))
            return False
        if self.format == "pcapng":
            self._write_pcapng(packet)
        else:
            self._write_pcap(packet)
        self.packets += 1
        return True

    def _open(self, suffix: str) -> _Output:
        final = self.directory / f"{self.id}{suffix}"
        partial = final.with_name(final.name + ".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        return _Output(partial, final, os.fdopen(fd, "wb"))

    def _write_pcap(self, packet: Packet) -> None:
        key = (packet.link_type, packet.nanosecond)
        output = self._outputs.get(key)
        if output is None:
            suffix = ".pcap" if not self._outputs else f"-{len(self._outputs) + 1}.pcap"
            output = self._open(suffix)
            output.write(global_header(packet.link_type, packet.snaplen, packet.nanosecond))
            self._outputs[key] = output
        output.write(pack_record(packet.ts_ns, packet.data, packet.orig_len, packet.nanosecond))

    def _write_pcapng(self, packet: Packet) -> None:
        output = self._outputs.get((0, False))
        if output is None:
            output = self._open(".pcapng")
            comment = describe(self.request, self.filter.expression)
            shb = pcapng.SectionHeaderBlockLE(
                opts=[
                    pcapng.PcapngOptionLE(code=pcapng.PCAPNG_OPT_COMMENT, text=comment),
                    pcapng.PcapngOptionLE(code=pcapng.PCAPNG_OPT_SHB_USERAPPL, data=b"trawl recorder"),
                    pcapng.PcapngOptionLE(code=pcapng.PCAPNG_OPT_ENDOFOPT),
                ]
            )
            output.write(bytes(shb))
            self._outputs[(0, False)] = output
        key = (packet.node, packet.link_type, packet.nanosecond)
        interface = self._interfaces.get(key)
        if interface is None:
            interface = len(self._interfaces)
            options = [pcapng.PcapngOptionLE(code=pcapng.PCAPNG_OPT_IF_NAME, data=packet.node.encode())]
            if packet.nanosecond:
                options.append(pcapng.PcapngOptionLE(code=pcapng.PCAPNG_OPT_IF_TSRESOL, data=_TSRESOL_NS))
            options.append(pcapng.PcapngOptionLE(code=pcapng.PCAPNG_OPT_ENDOFOPT))
            idb = pcapng.InterfaceDescriptionBlockLE(linktype=packet.link_type, snaplen=packet.snaplen, opts=options)
            output.write(bytes(idb))
            self._interfaces[key] = interface
        # Timestamps in the interface's resolution: nanoseconds or the default microseconds.
        ticks = packet.ts_ns if packet.nanosecond else packet.ts_ns // 1000
        data = packet.data
        epb = pcapng.EnhancedPacketBlockLE(
            iface_id=interface,
            ts_high=ticks >> 32,
            ts_low=ticks & 0xFFFFFFFF,
            caplen=len(data),
            pkt_len=packet.orig_len,
            pkt_data=data,
        )
        output.write(bytes(epb))

    @property
    def ends_at_ns(self) -> int:
        return int(self.ends_at * _NS_PER_S)

    def deadline(self) -> float:
        """When the recording is sealed even if the recorder has not caught up with its end."""
        return max(self.ends_at, self.resumed_at or 0.0) + LATE_S

    def checkpoint(self) -> dict[str, Any]:
        """Flush the files and describe the recording as far as they hold it: what a restarted
        recorder needs to go on writing it (see Recordings.recover)."""
        outputs = []
        for key, output in self._outputs.items():
            output.handle.flush()
            outputs.append(
                {"key": list(key), "partial": output.partial.name, "final": output.final.name, "size": output.size}
            )
        return {
            "id": self.id,
            "request": base64.b64encode(self.request.SerializeToString()).decode(),
            "expression": self.filter.expression,
            "selected_pods": self.selected_pods,
            "format": self.format,
            "started_at": self.started_at,
            "ends_at": self.ends_at,
            "packets": self.packets,
            "lookback_packets": self.lookback_packets,
            "error": self.error,
            "outputs": outputs,
            "interfaces": [[*key, index] for key, index in self._interfaces.items()],
            "unfiltered": sorted(self._unfiltered_link_types),
        }

    @classmethod
    def restore(cls, document: dict[str, Any], directory: Path, recorder: str) -> tuple[Recording, int]:
        """The recording a checkpoint describes, its files cut back to the checkpoint's sizes and
        open for appending; (recording, bytes cut). OSError when a file cannot be reopened,
        ValueError (or KeyError, TypeError) when the document is not one of ours."""
        request = control_pb2.RecordRequest.FromString(base64.b64decode(document["request"]))
        recording = cls(
            str(document["id"]),
            request,
            str(document["expression"]),
            [str(p) for p in document["selected_pods"]],
            directory,
            str(document["format"]),
            float(document["started_at"]),
            recorder,
        )
        if not RECORDING_NAME.match(recording.id + ".pcap"):
            raise ValueError(f"not a recording id: {recording.id!r}")
        recording.ends_at = float(document["ends_at"])
        recording.packets = int(document["packets"])
        recording.lookback_packets = int(document["lookback_packets"])
        recording.error = str(document["error"])
        recording._unfiltered_link_types = {int(t) for t in document["unfiltered"]}
        recording._interfaces = {(str(n), int(t), bool(ns)): int(i) for n, t, ns, i in document["interfaces"]}
        cut = 0
        for entry in document["outputs"]:
            link_type, nanosecond = entry["key"]
            partial = directory / Path(str(entry["partial"])).name
            final = directory / Path(str(entry["final"])).name
            size = int(entry["size"])
            with open(partial, "r+b") as handle:
                data = handle.read()
                # The checkpoint's size is what the stream position covers; a file shorter than
                # that (a host crash before the data reached the disk) keeps its whole blocks.
                good = size if len(data) >= size else _complete_prefix(data, pcapng_file=final.suffix == ".pcapng")
                handle.truncate(good)
                os.fsync(handle.fileno())
            cut += len(data) - good
            output = _Output(partial, final, open(partial, "ab"))  # noqa: SIM115 - held open until sealed
            output.digest.update(data[:good])
            output.size = good
            recording._outputs[(int(link_type), bool(nanosecond))] = output
        return recording, cut

    def seal(self, state: str) -> list[Path]:
        """Close, fsync and seal the files (read-only, in SHA256SUMS); the recording is done."""
        manifest = self.directory / "SHA256SUMS"
        for output in self._outputs.values():
            output.handle.flush()
            os.fsync(output.handle.fileno())
            output.handle.close()
            self.files.append(publish_sealed(output.partial, output.final, output.digest.hexdigest(), manifest))
        self._outputs.clear()
        self.state = state
        files = [str(path) for path in self.files]
        log.info("recording_done", recording=self.id, state=state, packets=self.packets, files=files)
        return self.files

    def describe(self) -> control_pb2.Recording:
        return control_pb2.Recording(
            id=self.id,
            state=self.state,
            request=self.request,
            expression=self.filter.expression,
            selected_pods=self.selected_pods,
            started_at_ns=int(self.started_at * _NS_PER_S),
            ends_at_ns=int(self.ends_at * _NS_PER_S),
            packets=self.packets,
            lookback_packets=self.lookback_packets,
            files=[str(path) for path in self.files],
            error=self.error,
            recorder=self.recorder,
        )


class Recordings:
    """The recordings of one recorder: started from requests, fed every packet, ended by time."""

    def __init__(
        self,
        directory: Path,
        *,
        file_format: str,
        lookback: Lookback,
        identity: Path | None,
        max_active: int,
        metrics: Registry,
        max_age_s: float | None = None,
        max_total_bytes: int | None = None,
        recorder: str = "",
    ) -> None:
        self.directory = directory
        self.recorder = recorder
        self.journal = directory / JOURNAL_NAME
        self._journal_lines = 0
        # Wall-clock time of the last batch fed (expire waits for the backlog to be read).
        self.last_batch_at = time.time()
        # Called with each recording sealed (the S3 shipper takes its files).
        self.on_sealed: list[Any] = []
        self.max_age_s = max_age_s
        self.max_total_bytes = max_total_bytes
        self.format = file_format
        self.lookback = lookback
        self.identity = identity
        self.max_active = max_active
        self.active: dict[str, Recording] = {}
        # Set when a recording starts or ends: the recorder saves its checkpoint then.
        self.changed = False
        self.done: dict[str, Recording | Ended] = {}
        self._started = metrics.counter("trawl_recorder_recordings_started_total", "Recordings started, by trigger")
        self._refused = metrics.counter("trawl_recorder_recordings_refused_total", "Recording requests refused")
        self._packets = metrics.counter("trawl_recorder_recording_packets_total", "Packets written to recordings")
        self._failed = metrics.counter("trawl_recorder_recording_errors_total", "Recordings ended by a file error")
        self._deleted = metrics.counter("trawl_recorder_files_deleted_total", "Sealed files deleted by retention")
        self._cut = metrics.counter(
            "trawl_recorder_recovered_bytes_cut_total", "Bytes of incomplete records cut from recordings left partial"
        )
        self._errors = metrics.counter("trawl_recorder_write_errors_total", "File system errors while recording")

    def start(self, request: control_pb2.RecordRequest, now: float, recording_id: str = "") -> Recording:
        """Start a recording with the look-back in it; ConfigError (the reason) when refused.
        `recording_id` (valid_id) names it, as the requester chose it for every recorder."""
        try:
            if request.duration_s <= 0:
                raise ConfigError("duration_s must be more than 0")
            if len(self.active) >= self.max_active:
                raise ConfigError(f"{self.max_active} recordings are running (recorder.max_recordings)")
            file_format = request.format or self.format
            if file_format not in ("pcap", "pcapng"):
                raise ConfigError(f"format {file_format!r}: use pcap or pcapng")
            expression, selected = scope_expression(request, self.identity)
            if not recording_id:
                recording_id = new_id(now)
            elif not valid_id(recording_id):
                raise ConfigError(f"recording id {recording_id!r}: give one like {new_id(now)!r}")
            if recording_id in self.active or recording_id in self.done:
                raise ConfigError(f"a recording {recording_id!r} exists already")
            self.directory.mkdir(parents=True, exist_ok=True)
            recording = Recording(
                recording_id, request, expression, selected, self.directory, file_format, now, self.recorder
            )
            # Compile now for the usual link types, so a bad filter is refused in the reply.
            recording.filter.check((1, 276) if expression else ())
        except ConfigError as exc:
            self._refused.inc()
            log.warning("recording_refused", requested_by=request.requested_by, error=str(exc))
            raise
        try:
            since_ns = request.since_ns
            for packet in self.lookback.packets(recording.nodes):
                if packet.ts_ns >= since_ns and recording.offer(packet):
                    recording.lookback_packets += 1
        except OSError as exc:
            self._fail(recording, exc)
            return recording
        self._packets.inc(recording.lookback_packets)
        self.active[recording.id] = recording
        self.changed = True
        self._started.inc(trigger=request.requested_by.partition(":")[0] or "unnamed")
        log.info(
            "recording_started",
            recording=recording.id,
            requested_by=request.requested_by,
            expression=expression,
            duration_s=request.duration_s,
            lookback_packets=recording.lookback_packets,
        )
        return recording

    def feed(self, batch: packets_pb2.PacketBatch, stored_ns: int = 0) -> None:
        """Hold the batch's packets in the look-back and hand them to the running recordings.
        `stored_ns`: when the stream stored the batch; a recording takes the batches stored
        before its end time, and the first one stored after it seals it. ValueError when its
        records are malformed (nothing of it is kept)."""
        self.last_batch_at = time.time()
        self.lookback.add(batch)
        if not self.active:
            return
        if stored_ns:
            for recording in [r for r in self.active.values() if stored_ns >= r.ends_at_ns]:
                self._end(recording, "sealed")
        packets = packets_of(batch)
        for recording in list(self.active.values()):
            written = 0
            try:
                for packet in packets:
                    written += recording.offer(packet)
            except OSError as exc:
                self._fail(recording, exc)
            self._packets.inc(written)

    def caught_up(self, now: float) -> bool:
        """No batch has come for IDLE_S: the reader has read what the stream holds."""
        return now - self.last_batch_at >= IDLE_S

    def expire(self, now: float, caught_up: bool = True) -> list[Recording]:
        """Seal the recordings whose duration has passed, once the reader has `caught_up` (the
        batches stored before their end have been read; see caught_up()), or at their deadline."""
        ended = [r for r in self.active.values() if now >= r.ends_at and (caught_up or now >= r.deadline())]
        for recording in ended:
            self._end(recording, "sealed")
        return ended

    def stop(self, recording_id: str) -> Recording | Ended:
        recording = self.active.get(recording_id)
        if recording is None:
            if recording_id in self.done:
                return self.done[recording_id]
            raise ConfigError(f"no recording {recording_id!r}")
        self._end(recording, "stopped")
        return recording

    def stop_all(self, state: str = "stopped") -> None:
        for recording in list(self.active.values()):
            self._end(recording, state)

    def get(self, recording_id: str) -> Recording | Ended:
        recording = self.active.get(recording_id) or self.done.get(recording_id)
        if recording is None:
            raise ConfigError(f"no recording {recording_id!r}")
        return recording

    def all(self) -> list[Recording | Ended]:
        return sorted([*self.done.values(), *self.active.values()], key=lambda r: (r.started_at, r.id))

    def checkpoint(self) -> list[dict[str, Any]]:
        """The running recordings as far as their (flushed) files hold them, for the recorder's
        checkpoint: saved with the stream position their files have reached."""
        return [recording.checkpoint() for recording in self.active.values()]

    def recover(self, running: list[dict[str, Any]] | None = None, now: float | None = None) -> list[Path]:
        """After a restart: list the ended recordings again (the journal); go on with the
        recordings the last checkpoint names as running (`running`: their files cut back to the
        checkpoint's sizes, reopened, written until their end time from the batches read after
        that checkpoint); seal as "interrupted" any other file a killed recorder left partial,
        cut after its last complete record (pcap) or block (PCAPNG). Bytes cut are counted.
        Returns the files sealed."""
        sealed: list[Path] = []
        if not self.directory.is_dir():
            return sealed
        self._read_journal()
        now = time.time() if now is None else now
        for document in running or []:
            if str(document.get("id")) in self.done:
                continue  # sealed (and journaled) after that checkpoint was taken
            try:
                recording, cut = Recording.restore(document, self.directory, self.recorder)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self._errors.inc()
                self._failed.inc()
                log.error("recording_resume_failed", recording=document.get("id"), error=str(exc))
                # Listed all the same, as failed, saying why.
                failed = Ended(
                    control_pb2.Recording(
                        id=str(document.get("id", "")),
                        state="failed",
                        error=f"could not go on after a restart: {exc}",
                        recorder=self.recorder,
                    )
                )
                self._remember(failed)
                self._journal(failed)
                continue
            if cut:
                self._cut.inc(cut)
            recording.resumed_at = now
            self.active[recording.id] = recording
            log.warning(
                "recording_resumed",
                recording=recording.id,
                packets=recording.packets,
                ends_at=recording.ends_at,
                dropped_bytes=cut,
            )
        mine = {output.partial for r in self.active.values() for output in r._outputs.values()}
        for partial in sorted(self.directory.glob("*.partial")):
            final = partial.with_name(partial.name.removesuffix(".partial"))
            if partial in mine or not RECORDING_NAME.match(final.name):
                continue
            try:
                data = partial.read_bytes()
                good = _complete_prefix(data, pcapng_file=final.suffix == ".pcapng")
                with open(partial, "r+b") as handle:
                    handle.truncate(good)
                    os.fsync(handle.fileno())
                digest = hashlib.sha256(data[:good]).hexdigest()
                sealed.append(publish_sealed(partial, final, digest, self.directory / "SHA256SUMS"))
            except OSError as exc:
                self._errors.inc()
                log.error("recording_recover_failed", file=str(partial), error=str(exc))
                continue
            if good < len(data):
                self._cut.inc(len(data) - good)
            log.warning("recording_recovered", file=str(final), bytes=good, dropped_bytes=len(data) - good)
            self._interrupted(final, now)
        for path in sealed:
            for callback in self.on_sealed:
                callback(path)
        return sealed

    def _interrupted(self, final: Path, now: float) -> None:
        """List a file sealed at recovery without a description (state "interrupted")."""
        recording_id = final.name.split(".")[0]
        base_id = recording_id if valid_id(recording_id) else recording_id.rsplit("-", 1)[0]
        recording = self.done.get(base_id)
        if not isinstance(recording, Recording) or recording.state != "interrupted":
            recording = Recording(
                base_id, control_pb2.RecordRequest(), "", [], self.directory, final.suffix[1:], now, self.recorder
            )
            recording.state = "interrupted"
            recording.ends_at = now
            recording.error = "the recorder stopped without a checkpoint of this recording: sealed as it was"
        recording.files.append(final)
        self._remember(recording)
        self._journal(recording)  # a line per file: the last, with all of them, is what is read

    def _read_journal(self) -> None:
        try:
            lines = self.journal.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        self._journal_lines = len(lines)
        for line in lines[-KEEP_DONE:]:
            try:
                described = json_format.Parse(line, control_pb2.Recording())
            except json_format.ParseError:
                continue  # the last line of a journal cut short by a crash
            recording = Ended(described)
            self.done[recording.id] = recording

    def _journal(self, recording: Recording | Ended) -> None:
        """Append an ended recording to the journal (rewritten when it grows past 2 * KEEP_DONE)."""
        line = json_format.MessageToJson(recording.describe(), indent=None, preserving_proto_field_name=True) + "\n"
        try:
            self._journal_lines += 1
            if self._journal_lines > 2 * KEEP_DONE:
                staging = self.journal.with_name(JOURNAL_NAME + ".tmp")
                kept = [
                    json_format.MessageToJson(r.describe(), indent=None, preserving_proto_field_name=True) + "\n"
                    for r in self.done.values()
                ]
                staging.write_text("".join(kept), encoding="utf-8")
                os.replace(staging, self.journal)
                self._journal_lines = len(kept)
            else:
                with open(self.journal, "a", encoding="utf-8") as handle:
                    handle.write(line)
        except OSError as exc:
            self._errors.inc()
            log.error("recording_journal_failed", recording=recording.id, error=str(exc))

    def apply_retention(self, now: float) -> list[Path]:
        """Delete sealed recordings, oldest first, past the retention's age or total size (the
        recorder's `retention` applies to this directory on its own)."""
        if (self.max_age_s is None and self.max_total_bytes is None) or not self.directory.is_dir():
            return []
        deleted, errors = delete_oldest(
            self.directory,
            RECORDING_NAME,
            max_age_s=self.max_age_s,
            max_total_bytes=self.max_total_bytes,
            now=now,
        )
        if errors:
            self._errors.inc(errors)
        if deleted:
            self._deleted.inc(len(deleted))
        return deleted

    def _end(self, recording: Recording, state: str) -> None:
        del self.active[recording.id]
        self.changed = True
        try:
            recording.seal(state)
        except OSError as exc:
            self._fail(recording, exc)
            return
        self._remember(recording)
        self._journal(recording)
        for path in recording.files:
            for callback in self.on_sealed:
                callback(path)
        self.apply_retention(time.time())

    def _remember(self, recording: Recording | Ended) -> None:
        # Ended recordings are listed until KEEP_DONE newer ones have ended (their files stay).
        self.done[recording.id] = recording
        while len(self.done) > KEEP_DONE:
            del self.done[next(iter(self.done))]

    def _fail(self, recording: Recording, exc: OSError) -> None:
        self._failed.inc()
        self.active.pop(recording.id, None)
        self.changed = True
        recording.state = "failed"
        recording.error = str(exc)
        self._remember(recording)
        self._journal(recording)
        log.error("recording_failed", recording=recording.id, error=str(exc))


class Ended:
    """A recording ended before this recorder started, as its journal line describes it."""

    def __init__(self, described: control_pb2.Recording) -> None:
        self._described = described
        self.id = described.id
        self.state = described.state
        self.started_at = described.started_at_ns / _NS_PER_S
        self.files = [Path(p) for p in described.files]

    def describe(self) -> control_pb2.Recording:
        return self._described


def new_id(now: float) -> str:
    """A recording id: its start time and 8 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + secrets.token_hex(4)


def valid_id(text: str) -> bool:
    return RECORDING_ID.match(text) is not None


def _complete_prefix(data: bytes, *, pcapng_file: bool) -> int:
    """How many leading bytes of a file cut short are whole: its header and complete records
    (pcap) or complete blocks (PCAPNG, little-endian as the recorder writes it)."""
    if pcapng_file:
        good = 0
        while good + 12 <= len(data):
            (length,) = struct.unpack_from("<I", data, good + 4)
            if length < 12 or length % 4 or good + length > len(data):
                break
            good += length
        return good
    good = GLOBAL_HEADER.size if len(data) >= GLOBAL_HEADER.size else 0
    while good and good + RECORD_HEADER.size <= len(data):
        incl_len = RECORD_HEADER.unpack_from(data, good)[2]
        if good + RECORD_HEADER.size + incl_len > len(data):
            break
        good += RECORD_HEADER.size + incl_len
    return good
