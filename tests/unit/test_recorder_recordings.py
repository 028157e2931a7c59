"""Recordings on demand: look-back, scope (libpcap's compiler and bpf_filter), PCAPNG and pcap
files read back with dpkt and tshark, packet for packet."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import needs_binary
from trawl.errors import ConfigError
from trawl.metrics import Registry
from trawl.pcap import iter_records, pack_record
from trawl.recorder.main import answer
from trawl.recorder.recordings import Lookback, Recordings, describe
from trawl.v1 import control_pb2, packets_pb2

T0 = 1_700_000_000 * 1_000_000_000
SECOND = 1_000_000_000
POD_A = ("10.1.0.2", "10.1.0.9")  # (client, pod A)
OTHER = ("10.2.0.3", "10.2.0.4")


def tcp_frame(src: str, dst: str, sport: int, payload: bytes) -> bytes:
    """An Ethernet/IPv4/TCP frame built with dpkt."""
    segment = dpkt.tcp.TCP(sport=sport, dport=80, flags=dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH, data=payload)
    packet = dpkt.ip.IP(
        src=bytes(int(p) for p in src.split(".")),
        dst=bytes(int(p) for p in dst.split(".")),
        p=dpkt.ip.IP_PROTO_TCP,
        data=segment,
    )
    packet.len = len(bytes(packet))
    return bytes(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=dpkt.ethernet.ETH_TYPE_IP, data=packet))


def traffic(start_s: int, count: int) -> list[tuple[int, bytes, bool]]:
    """One packet a second from start_s, alternating pod A's flow and another; (ts_ns, frame, is_pod_a)."""
    out = []
    for second in range(start_s, start_s + count):
        pod_a = second % 2 == 0
        src, dst = POD_A if pod_a else OTHER
        out.append((T0 + second * SECOND + 1234567, tcp_frame(src, dst, 40000 + second, b"x%d" % second), pod_a))
    return out


def batch_of(
    packets: list[tuple[int, bytes, bool]], node: str = "node-a", nanosecond: bool = False
) -> packets_pb2.PacketBatch:
    payload = b"".join(pack_record(ts, frame, nanosecond=nanosecond) for ts, frame, _ in packets)
    return packets_pb2.PacketBatch(
        node=node, link_type=1, snaplen=65535, packet_count=len(packets), records=payload, nanosecond=nanosecond
    )


def make_recordings(
    tmp_path: Path, *, seconds: float = 30, max_bytes: int = 1 << 20, fmt: str = "pcapng", identity: Path | None = None
) -> tuple[Recordings, Registry]:
    metrics = Registry()
    recordings = Recordings(
        tmp_path / "on-demand",
        file_format=fmt,
        lookback=Lookback(seconds, max_bytes, metrics),
        identity=identity,
        max_active=4,
        metrics=metrics,
    )
    return recordings, metrics


def read_back(path: Path) -> list[tuple[int, bytes]]:
    """(ts in µs, frame) of every packet, as dpkt reads the file (pcap or pcapng)."""
    with open(path, "rb") as handle:
        reader = dpkt.pcapng.Reader(handle) if path.suffix == ".pcapng" else dpkt.pcap.Reader(handle)
        return [(round(ts * 1e6), bytes(frame)) for ts, frame in reader]


def tshark_fields(path: Path, *fields: str) -> list[list[str]]:
    args = ["tshark", "-n", "-r", str(path), "-T", "fields"]
    for name in fields:
        args += ["-e", name]
    output = subprocess.run(args, check=True, capture_output=True, text=True, timeout=60).stdout
    return [line.split("\t") for line in output.splitlines()]


def test_since_leaves_out_the_older_part_of_the_lookback(tmp_path: Path) -> None:
    """A request's since_ns (an alert's: a while before the calls that fired it) starts the
    recording there in the packets' own time, whatever the look-back holds before it."""
    recordings, _ = make_recordings(tmp_path, fmt="pcap")
    before = traffic(0, 60)  # the look-back keeps 29.x..59.x
    recordings.feed(batch_of(before))
    since = T0 + 45 * SECOND
    request = control_pb2.RecordRequest(requested_by="alerter:x", ips=[POD_A[1]], duration_s=60, since_ns=since)
    recording = recordings.start(request, now=1000.0)
    stopped = recordings.stop(recording.id)
    expected = [(ts // 1000, frame) for ts, frame, pod_a in before if pod_a and ts >= since]
    assert recording.lookback_packets == len(expected) > 0
    [path] = stopped.files
    assert read_back(path) == expected
    # Older than the look-back reaches: the whole look-back, no more.
    whole = recordings.start(control_pb2.RecordRequest(ips=[POD_A[1]], duration_s=60, since_ns=T0), now=1001.0)
    assert whole.lookback_packets == 15


@needs_binary("tshark")
@pytest.mark.parametrize("nanosecond", [False, True])
def test_lookback_and_scope_in_a_pcapng_recording(tmp_path: Path, nanosecond: bool) -> None:
    recordings, metrics = make_recordings(tmp_path)
    before = traffic(0, 60)  # seconds 0..59; the look-back keeps 29.x..59.x
    for index in range(0, len(before), 7):
        recordings.feed(batch_of(before[index : index + 7], nanosecond=nanosecond))
    request = control_pb2.RecordRequest(
        requested_by="cli", reason="test", ips=[POD_A[1]], filter="tcp port 80", duration_s=60
    )
    recording = recordings.start(request, now=1000.0)
    after = traffic(60, 20)
    recordings.feed(batch_of(after, nanosecond=nanosecond))
    recordings.feed(batch_of(traffic(80, 4), node="node-b", nanosecond=nanosecond))  # another node: in scope too
    stopped = recordings.stop(recording.id)
    assert stopped.state == "stopped"
    [path] = stopped.files
    expected_lookback = [(ts, frame) for ts, frame, pod_a in before if pod_a and ts >= T0 + 29 * SECOND]
    expected = expected_lookback + [(ts, f) for ts, f, a in after if a] + [(ts, f) for ts, f, a in traffic(80, 4) if a]
    assert recording.lookback_packets == len(expected_lookback) == 15
    assert recording.packets == len(expected)
    # dpkt gives float seconds: microseconds as stored, or nanoseconds rounded to microseconds.
    in_us = [((ts + 500) // 1000 if nanosecond else ts // 1000, frame) for ts, frame in expected]
    assert read_back(path) == in_us
    # tshark reads it: the same frames in the same order, with their full timestamps.
    rows = tshark_fields(path, "frame.time_epoch", "ip.dst", "frame.interface_name")
    assert [row[1] for row in rows] == [POD_A[1]] * len(expected)
    scale = 1 if nanosecond else 1000
    # tshark prints nine decimals: nanoseconds, of which a microsecond file has the first six.
    assert [int(row[0].replace(".", "")) for row in rows] == [ts // scale * scale for ts, _ in expected]
    assert {row[2] for row in rows} == {"node-a", "node-b"}
    # The section's comment names the trigger and the scope.
    info = subprocess.run(["capinfos", str(path)], check=True, capture_output=True, text=True).stdout
    assert "trigger: cli (test)" in info
    assert f"ips={POD_A[1]}" in info
    assert "filter='tcp port 80'" in info
    # Sealed: read-only and in SHA256SUMS.
    assert not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    manifest = (path.parent / "SHA256SUMS").read_text()
    assert f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n" == manifest
    # node-a's look-back now holds seconds 49.x to 79.x: seconds 0 to 48 aged out, none for bytes.
    dropped = metrics.counter("trawl_recorder_lookback_dropped_total", "")
    assert dropped.values == {(("node", "node-a"), ("reason", "age")): 49}


def test_lookback_byte_bound_drops_are_counted(tmp_path: Path) -> None:
    recordings, metrics = make_recordings(tmp_path, seconds=3600, max_bytes=10 * 100)
    packets = traffic(0, 40)
    for index in range(0, 40, 2):
        recordings.feed(batch_of(packets[index : index + 2]))
    held = recordings.lookback.packets(frozenset())
    # Whole batches of two leave, oldest first, until the rest fits in 1000 bytes.
    assert 2 <= len(held) < 40 and len(held) % 2 == 0
    assert sum(p.size for p in held) <= 1000 < sum(p.size for p in held) + 2 * held[0].size
    assert [p.data for p in held] == [frame for _, frame, _ in packets[-len(held) :]]
    dropped = metrics.counter("trawl_recorder_lookback_dropped_total", "")
    assert dropped.values == {(("node", "node-a"), ("reason", "bytes")): 40 - len(held)}
    assert metrics.snapshot()["trawl_recorder_lookback_bytes"] == sum(p.size for p in held)


def test_pcap_format_writes_records_untouched_and_one_file_per_link_type(tmp_path: Path) -> None:
    recordings, _ = make_recordings(tmp_path, fmt="pcap")
    packets = traffic(0, 6)
    recording = recordings.start(control_pb2.RecordRequest(requested_by="alerter:r", duration_s=5), now=0.0)
    first = batch_of(packets)
    recordings.feed(first)
    raw = packets_pb2.PacketBatch(  # LINKTYPE_RAW: the IP packet without its Ethernet header
        node="node-a", link_type=101, snaplen=65535, records=pack_record(T0, packets[0][1][14:], nanosecond=False)
    )
    recordings.feed(raw)
    assert recordings.expire(4.9) == []
    assert recordings.expire(5.0) == [recording]
    assert recording.state == "sealed"
    ethernet, raw_file = recording.files
    assert ethernet.name == f"{recording.id}.pcap" and raw_file.name == f"{recording.id}-2.pcap"
    assert ethernet.read_bytes()[24:] == first.records
    assert raw_file.read_bytes()[24:] == raw.records
    with open(raw_file, "rb") as handle:
        assert dpkt.pcap.Reader(handle).datalink() == 101


def write_identity(path: Path) -> Path:
    items = [
        {"kind": "Pod", "metadata": {"name": "api-7f9", "namespace": "shop"}, "status": {"podIP": POD_A[1]}},
        {"kind": "Pod", "metadata": {"name": "db-0", "namespace": "shop"}, "status": {"podIP": OTHER[1]}},
        {
            "kind": "Pod",
            "metadata": {"name": "api-host", "namespace": "shop"},
            "spec": {"hostNetwork": True},
            "status": {"podIP": "192.168.1.1"},
        },
    ]
    path.write_text(json.dumps({"items": items}))
    return path


def test_scope_by_pod_regex_uses_the_identity_snapshot(tmp_path: Path) -> None:
    recordings, _ = make_recordings(tmp_path, identity=write_identity(tmp_path / "pods.json"))
    recordings.feed(batch_of(traffic(0, 10)))
    recording = recordings.start(control_pb2.RecordRequest(namespaces=["shop"], pods=["^api-"], duration_s=10), now=0.0)
    assert recording.selected_pods == ["shop/api-7f9"]
    assert recording.filter.expression == f"ip host {POD_A[1]}"
    recordings.stop(recording.id)
    assert [frame for _, frame in read_back(recording.files[0])] == [f for _, f, a in traffic(0, 10) if a]


@pytest.mark.parametrize(
    ("request_fields", "identity", "message"),
    [
        ({"pods": ["api"]}, False, "set recorder.identity"),
        ({"pods": ["^nothing$"]}, True, "selects no pod"),
        ({"filter": "tcp port"}, False, "bad filter 'tcp port'"),
        ({"ips": ["10.0.0.300"]}, False, "not an IP address"),
        ({"format": "erf"}, False, "use pcap or pcapng"),
        ({"duration_s": 0}, False, "more than 0"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(
    tmp_path: Path, request_fields: dict[str, object], identity: bool, message: str
) -> None:
    recordings, metrics = make_recordings(tmp_path, identity=write_identity(tmp_path / "p.json") if identity else None)
    fields: dict[str, object] = {"duration_s": 10, **request_fields}
    with pytest.raises(ConfigError, match=message):
        recordings.start(control_pb2.RecordRequest(**fields), now=0.0)  # type: ignore[arg-type]
    assert recordings.active == {}
    assert metrics.counter("trawl_recorder_recordings_refused_total", "").total() == 1


def test_too_many_recordings_are_refused(tmp_path: Path) -> None:
    recordings, _ = make_recordings(tmp_path)
    for _ in range(4):
        recordings.start(control_pb2.RecordRequest(duration_s=10), now=0.0)
    with pytest.raises(ConfigError, match="4 recordings are running"):
        recordings.start(control_pb2.RecordRequest(duration_s=10), now=0.0)


def test_describe_names_trigger_and_scope() -> None:
    request = control_pb2.RecordRequest(
        requested_by="alerter:errors", reason="5xx burst", namespaces=["shop"], pods=["^api-"], duration_s=60
    )
    text = describe(request, "ip host 10.1.0.9")
    assert text.startswith("trawl recording; trigger: alerter:errors (5xx burst); scope: namespaces=shop pods=^api-;")
    assert "expression: ip host 10.1.0.9; duration: 60s" in text


@given(data=st.binary(max_size=200))
def test_any_bytes_on_the_control_subject_get_a_reply(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        recordings, _ = make_recordings(Path(directory))
        reply = answer(recordings, data, now=0.0)
        if reply.error:
            assert not reply.recordings and not reply.recording_id
            assert recordings.active == {}
            return
        # Not refused: the bytes parsed as a RecordControl, and the reply fits its action.
        action = control_pb2.RecordControl.FromString(data).WhichOneof("action")
        if action == "list":
            assert reply.recording_id == ""
        else:
            assert action == "start"  # stop and get of an id never started are refused
            [recording] = reply.recordings
            assert recording.id == reply.recording_id and recording.id in recordings.active


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@given(
    namespaces=st.lists(_text, max_size=2),
    pods=st.lists(_text, max_size=2),
    ips=st.lists(st.one_of(st.ip_addresses().map(str), _text), max_size=2),
    expression=st.one_of(_text, st.sampled_from(["tcp", "port 80", "ip host 10.1.0.9", "tcp and", "udp or ("])),
    file_format=st.sampled_from(["", "pcap", "pcapng", "x"]),
)
def test_any_request_is_recorded_or_refused_with_a_reason(
    namespaces: list[str], pods: list[str], ips: list[str], expression: str, file_format: str
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        identity = write_identity(Path(directory) / "pods.json")
        recordings, _ = make_recordings(Path(directory), identity=identity)
        recordings.feed(batch_of(traffic(0, 4)))
        request = control_pb2.RecordRequest(
            namespaces=namespaces, pods=pods, ips=ips, filter=expression, format=file_format, duration_s=5
        )
        try:
            recording = recordings.start(request, now=0.0)
        except ConfigError as exc:
            reason = str(exc)
            recording = None
        if recording is None:
            assert reason and recordings.active == {}
            return
        recordings.feed(batch_of(traffic(4, 4)))
        recordings.stop(recording.id)
        assert recording.state == "stopped"
        for path in recording.files:
            assert len(read_back(path)) <= recording.packets
        assert sum(len(read_back(path)) for path in recording.files) == recording.packets


@needs_binary("tshark")
def test_pcapng_holds_an_interface_per_node_and_link_type(tmp_path: Path) -> None:
    recordings, _ = make_recordings(tmp_path)
    packets = traffic(0, 4)
    recordings.feed(batch_of(packets[:2], node="node-a"))
    recordings.feed(batch_of(packets[2:], node="node-b"))  # not in the recording's nodes
    recording = recordings.start(control_pb2.RecordRequest(requested_by="cli", nodes=["node-a"], duration_s=5), now=0.0)
    raw = packets_pb2.PacketBatch(  # LINKTYPE_RAW, nanosecond: a second interface
        node="node-a",
        link_type=101,
        snaplen=65535,
        nanosecond=True,
        records=pack_record(T0 + 5 * SECOND + 7, packets[0][1][14:], nanosecond=True),
    )
    recordings.feed(raw)
    recordings.feed(batch_of(packets[2:], node="node-b"))
    recordings.expire(5.0)
    [path] = recording.files
    assert recording.lookback_packets == 2 and recording.packets == 3
    rows = tshark_fields(path, "frame.interface_id", "frame.interface_name", "frame.time_epoch", "ip.src")
    assert rows == [
        ["0", "node-a", "1700000000.001234000", POD_A[0]],  # microseconds on the Ethernet interface
        ["0", "node-a", "1700000001.001234000", OTHER[0]],
        ["1", "node-a", "1700000005.000000007", POD_A[0]],
    ]
    info = subprocess.run(["capinfos", str(path)], check=True, capture_output=True, text=True).stdout
    assert "File encapsulation:  Per packet" in info
    assert "Number of interfaces in file: 2" in info
    assert "Encapsulation = Ethernet (1 - ether)" in info
    assert "Encapsulation = Raw IP (7 - rawip)" in info
    assert "Time precision = nanoseconds (9)" in info


def test_retention_deletes_old_recordings_and_their_checksums(tmp_path: Path) -> None:
    metrics = Registry()
    recordings = Recordings(
        tmp_path / "on-demand",
        file_format="pcapng",
        lookback=Lookback(30, 1 << 20, metrics),
        identity=None,
        max_active=4,
        metrics=metrics,
        max_age_s=3600,
    )
    recordings.feed(batch_of(traffic(0, 4)))
    old, new = (recordings.start(control_pb2.RecordRequest(duration_s=5), now=0.0) for _ in range(2))
    recordings.stop(old.id)
    recordings.stop(new.id)
    [old_file], [new_file] = old.files, new.files
    (tmp_path / "on-demand" / "notes.txt").write_text("not a recording")
    now = time.time()
    os.utime(old_file, (now - 7200, now - 7200))
    assert recordings.apply_retention(now) == [old_file]
    assert not old_file.exists() and new_file.exists() and (tmp_path / "on-demand" / "notes.txt").exists()
    manifest = (tmp_path / "on-demand" / "SHA256SUMS").read_text()
    assert manifest == f"{hashlib.sha256(new_file.read_bytes()).hexdigest()}  {new_file.name}\n"
    assert metrics.counter("trawl_recorder_files_deleted_total", "").total() == 1


@given(records=st.binary(max_size=300), nanosecond=st.booleans())
def test_any_records_are_held_whole_or_refused_with_value_error(records: bytes, nanosecond: bool) -> None:
    with tempfile.TemporaryDirectory() as directory:
        recordings, _ = make_recordings(Path(directory), seconds=1e10)  # wider than any 32-bit time
        recording = recordings.start(control_pb2.RecordRequest(duration_s=5), now=0.0)
        batch = packets_pb2.PacketBatch(node="n", link_type=1, snaplen=65535, records=records, nanosecond=nanosecond)
        try:
            expected = list(iter_records(records, nanosecond))
        except ValueError:
            with pytest.raises(ValueError, match=r"past the end|truncated"):
                recordings.feed(batch)
            assert recordings.lookback.packets(frozenset()) == [] and recording.packets == 0
            return
        recordings.feed(batch)
        held = recordings.lookback.packets(frozenset())
        assert sorted((p.ts_ns, p.data, p.orig_len) for p in held) == sorted(expected)
        assert recording.packets == len(expected)


@needs_binary("tshark")
@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_a_recording_left_partial_is_cut_to_whole_blocks_and_sealed(tmp_path: Path, fmt: str) -> None:
    first, _ = make_recordings(tmp_path, fmt=fmt)
    recording = first.start(control_pb2.RecordRequest(duration_s=60), now=0.0)
    packets = traffic(0, 6)
    first.feed(batch_of(packets))
    [partial] = (tmp_path / "on-demand").glob("*.partial")
    for output in recording._outputs.values():  # what a killed process leaves: its writes, files closed
        output.handle.close()
    whole = partial.stat().st_size
    with open(partial, "ab") as handle:  # and the start of a block it did not finish
        handle.write(b"\x06\x00\x00\x00\x40\x00\x00\x00\x00\x00" if fmt == "pcapng" else b"\x01\x02\x03\x04\x05")
    second, metrics = make_recordings(tmp_path, fmt=fmt)
    [sealed] = second.recover()
    assert sealed.name == partial.name.removesuffix(".partial") and not partial.exists()
    assert sealed.stat().st_size == whole
    assert read_back(sealed) == [(ts // 1000, frame) for ts, frame, _ in packets]
    assert len(tshark_fields(sealed, "frame.number")) == 6
    assert metrics.counter("trawl_recorder_recovered_bytes_cut_total", "").total() == (10 if fmt == "pcapng" else 5)
    manifest = (tmp_path / "on-demand" / "SHA256SUMS").read_text()
    assert manifest == f"{hashlib.sha256(sealed.read_bytes()).hexdigest()}  {sealed.name}\n"
