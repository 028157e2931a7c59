"""The pcap writer: files read back by tshark and dpkt equal to the input, sealing, rotation, retention."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import dpkt
import pytest

from tests.conftest import needs_binary
from trawl.metrics import Registry
from trawl.pcap import MAGIC_NS, MAGIC_US, pack_record
from trawl.recorder.writer import MANIFEST_NAME, PcapWriter, count_records
from trawl.v1 import packets_pb2

HTTP1 = "http1/zeek__pipelined-requests.pcap"
SLL = "sll/PcapPlusPlus__sll.pcap"


@dataclass
class RawRecord:
    seconds: int
    micros: int
    orig_len: int
    data: bytes

    @property
    def ts_ns(self) -> int:
        return self.seconds * 1_000_000_000 + self.micros * 1000


def read_pcap(path: Path) -> tuple[int, int, list[RawRecord]]:
    """(link type, snaplen, records) of a little-endian microsecond pcap, read with struct."""
    raw = path.read_bytes()
    magic, _, _, _, _, snaplen, link_type = struct.unpack_from("<IHHiIII", raw)
    assert magic == MAGIC_US
    records = []
    offset = 24
    while offset < len(raw):
        seconds, micros, incl, orig = struct.unpack_from("<IIII", raw, offset)
        records.append(RawRecord(seconds, micros, orig, raw[offset + 16 : offset + 16 + incl]))
        offset += 16 + incl
    return link_type, snaplen, records


def batches_of(
    records: list[RawRecord], link_type: int, node: str = "node-a", per_batch: int = 7, snaplen: int = 65535
) -> list[packets_pb2.PacketBatch]:
    batches: list[packets_pb2.PacketBatch] = []
    for index in range(0, len(records), per_batch):
        chunk = records[index : index + per_batch]
        payload = b"".join(pack_record(r.ts_ns, r.data, r.orig_len, nanosecond=False) for r in chunk)
        batches.append(
            packets_pb2.PacketBatch(
                node=node,
                link_type=link_type,
                snaplen=snaplen,
                sequence=len(batches) + 1,
                packet_count=len(chunk),
                records=payload,
            )
        )
    return batches


def make_writer(directory: Path, **kwargs: object) -> PcapWriter:
    options: dict[str, object] = {"rotate_bytes": 1 << 30, "rotate_seconds": 3600.0}
    options.update(kwargs)
    return PcapWriter(directory, **options)  # type: ignore[arg-type]


def tshark(path: Path, *args: str) -> str:
    return subprocess.run(
        ["tshark", "-n", "-r", str(path), *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def dpkt_packets(path: Path) -> list[tuple[float, bytes]]:
    with open(path, "rb") as handle:
        return [(ts, bytes(buf)) for ts, buf in dpkt.pcap.Reader(handle)]


@needs_binary("tshark")
@pytest.mark.parametrize("sample", [HTTP1, SLL])
def test_file_reads_back_identical_to_the_input(tmp_path: Path, shared_pcaps: Path, sample: str) -> None:
    source = shared_pcaps / sample
    link_type, snaplen, records = read_pcap(source)
    writer = make_writer(tmp_path / "rec")
    for batch in batches_of(records, link_type, snaplen=snaplen):
        assert writer.write(batch) == []
    [sealed] = writer.seal_all()

    # The records section is the input's, byte for byte; the header has the batch's link type and snaplen.
    assert sealed.read_bytes()[24:] == source.read_bytes()[24:]
    assert struct.unpack_from("<IHHiIII", sealed.read_bytes()) == (MAGIC_US, 2, 4, 0, 0, snaplen, link_type)
    fields = ("-T", "fields", "-e", "frame.len", "-e", "frame.cap_len", "-e", "frame.time_epoch")
    ours = tshark(sealed, *fields)
    assert ours == tshark(source, *fields)
    assert len(ours.splitlines()) == len(records)
    assert tshark(sealed, "-x") == tshark(source, "-x")
    assert dpkt_packets(sealed) == dpkt_packets(source)
    assert writer.packets_written == len(records)


def test_sealed_file_is_renamed_read_only_and_in_the_manifest(tmp_path: Path, shared_pcaps: Path) -> None:
    link_type, _, records = read_pcap(shared_pcaps / HTTP1)
    registry = Registry()
    writer = make_writer(tmp_path, metrics=registry)
    writer.write(batches_of(records, link_type)[0])
    [partial] = writer.open_files
    assert partial.name.endswith(".pcap.partial")
    assert partial.name.startswith("node-a-")
    assert list(tmp_path.glob("*.pcap")) == []

    [sealed] = writer.seal_all()
    assert not partial.exists()
    assert sealed.name == partial.name.removesuffix(".partial")
    assert stat.S_IMODE(sealed.stat().st_mode) == 0o444
    manifest = (tmp_path / MANIFEST_NAME).read_text()
    assert manifest == f"{hashlib.sha256(sealed.read_bytes()).hexdigest()}  {sealed.name}\n"
    check = subprocess.run(["sha256sum", "-c", MANIFEST_NAME], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert registry.counter("trawl_recorder_files_sealed_total", "").total() == 1
    assert registry.counter("trawl_recorder_packets_total", "").total() == 7


def test_each_link_type_and_resolution_gets_its_own_file(tmp_path: Path, shared_pcaps: Path) -> None:
    eth_type, _, eth = read_pcap(shared_pcaps / HTTP1)
    sll_type, _, sll = read_pcap(shared_pcaps / SLL)
    writer = make_writer(tmp_path)
    writer.write(batches_of(eth, eth_type)[0])
    writer.write(batches_of(sll, sll_type)[0])
    nanos = batches_of(eth, eth_type)[1]
    nanos.nanosecond = True
    nanos.records = b"".join(pack_record(r.ts_ns + 123, r.data, r.orig_len) for r in eth[7:14])
    writer.write(nanos)
    writer.write(batches_of(eth, eth_type)[2])
    sealed = writer.seal_all()
    assert len(sealed) == 3
    headers = {struct.unpack_from("<IHHiIII", path.read_bytes()) for path in sealed}
    assert {(h[0], h[6]) for h in headers} == {(MAGIC_US, 1), (MAGIC_US, 113), (MAGIC_NS, 1)}
    nano_file = next(p for p in sealed if p.read_bytes()[:4] == struct.pack("<I", MAGIC_NS))
    with open(nano_file, "rb") as handle:
        reader = dpkt.pcap.Reader(handle)
        assert [bytes(buf) for _, buf in reader] == [r.data for r in eth[7:14]]


def test_rotation_by_size_keeps_every_record_in_order(tmp_path: Path, shared_pcaps: Path) -> None:
    source = shared_pcaps / HTTP1
    link_type, _, records = read_pcap(source)
    writer = make_writer(tmp_path, rotate_bytes=8192)
    rotated: list[Path] = []
    for batch in batches_of(records, link_type, per_batch=3):
        rotated.extend(writer.write(batch))
    rotated.extend(writer.seal_all())
    assert len(rotated) > 3
    assert sorted(rotated) == rotated  # names carry an increasing sequence number
    assert sum(len(p.read_bytes()) - 24 for p in rotated) == len(source.read_bytes()) - 24
    assert b"".join(p.read_bytes()[24:] for p in rotated) == source.read_bytes()[24:]
    largest_batch = max(len(b.records) for b in batches_of(records, link_type, per_batch=3))
    assert all(p.stat().st_size <= max(8192, 24 + largest_batch) for p in rotated)
    lines = (tmp_path / MANIFEST_NAME).read_text().splitlines()
    assert [line.split("  ")[1] for line in lines] == [p.name for p in rotated]


def test_rotation_by_age(tmp_path: Path, shared_pcaps: Path) -> None:
    link_type, _, records = read_pcap(shared_pcaps / HTTP1)
    now = [1_000_000.0]
    writer = make_writer(tmp_path, rotate_seconds=10.0, clock=lambda: now[0])
    batches = batches_of(records, link_type)
    writer.write(batches[0])
    now[0] += 9.0
    assert writer.rotate_due() == []
    now[0] += 1.0
    [first] = writer.rotate_due()
    assert "-19700112T134640Z-" in first.name  # the UTC time the file was started
    writer.write(batches[1])
    now[0] += 30.0
    [second] = writer.write(batches[2])  # an expired file is sealed before more is appended
    assert second != first
    assert len(writer.open_files) == 1


def test_retention_by_total_size_deletes_oldest_sealed_files(tmp_path: Path, shared_pcaps: Path) -> None:
    link_type, _, records = read_pcap(shared_pcaps / HTTP1)
    writer = make_writer(tmp_path, rotate_bytes=4096, max_total_bytes=20_000)
    sealed: list[Path] = []
    for batch in batches_of(records, link_type, per_batch=2):
        sealed.extend(writer.write(batch))
    remaining = sorted(tmp_path.glob("*.pcap"))
    assert remaining
    assert sealed[0] not in remaining
    assert remaining == sealed[len(sealed) - len(remaining) :]  # the newest survive
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("*.pcap*"))
    assert on_disk <= 20_000
    assert len(writer.open_files) == 1
    assert writer.open_files[0].exists()
    names = [line.split("  ")[1] for line in (tmp_path / MANIFEST_NAME).read_text().splitlines()]
    assert names == [p.name for p in remaining]
    check = subprocess.run(["sha256sum", "-c", MANIFEST_NAME], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_retention_by_age_never_touches_partial_or_foreign_files(tmp_path: Path, shared_pcaps: Path) -> None:
    link_type, _, records = read_pcap(shared_pcaps / HTTP1)
    registry = Registry()
    writer = make_writer(tmp_path, max_age_s=3600.0, metrics=registry)
    batches = batches_of(records, link_type)
    writer.write(batches[0])
    [old] = writer.seal_all()
    writer.write(batches[1])
    [fresh] = writer.seal_all()
    writer.write(batches[2])
    [partial] = writer.open_files
    foreign = tmp_path / "notes.pcap"
    foreign.write_bytes(b"kept")
    long_ago = writer.clock() - 7200
    for path in (old, partial, foreign):
        os.utime(path, (long_ago, long_ago))
    assert writer.apply_retention() == [old]
    assert not old.exists()
    assert fresh.exists()
    assert partial.exists()
    assert foreign.exists()
    assert registry.counter("trawl_recorder_files_deleted_total", "").total() == 1


def test_malformed_batch_is_counted_and_not_written(tmp_path: Path) -> None:
    registry = Registry()
    writer = make_writer(tmp_path, metrics=registry)
    good = pack_record(1_000_000_000, b"\x00" * 60, nanosecond=False)
    truncated = packets_pb2.PacketBatch(node="n", link_type=1, records=good + good[:30])
    assert writer.write(truncated) == []
    assert writer.open_files == []
    assert registry.counter("trawl_recorder_bad_batches_total", "").total() == 1
    assert writer.write(packets_pb2.PacketBatch(node="n", link_type=1)) == []
    assert writer.open_files == []
    with pytest.raises(ValueError, match="truncated"):
        count_records(good + b"\x01\x02")


def test_larger_snaplen_starts_a_new_file(tmp_path: Path, shared_pcaps: Path) -> None:
    link_type, _, records = read_pcap(shared_pcaps / HTTP1)
    writer = make_writer(tmp_path)
    writer.write(batches_of(records, link_type, snaplen=1500)[0])
    [first] = writer.write(batches_of(records, link_type, snaplen=65535)[1])
    assert struct.unpack_from("<IHHiIII", first.read_bytes())[5] == 1500


@needs_binary("tshark")
def test_partial_file_left_by_a_crash_is_cut_and_sealed(tmp_path: Path, shared_pcaps: Path) -> None:
    link_type, _, records = read_pcap(shared_pcaps / HTTP1)
    crashed = make_writer(tmp_path)
    batch = batches_of(records, link_type)[0]
    crashed.write(batch)
    [partial] = crashed.open_files
    crashed._open[next(iter(crashed._open))].handle.flush()
    with open(partial, "ab") as handle:
        handle.write(pack_record(5, b"\xff" * 100)[:50])  # a record cut mid-way
    stray = tmp_path / "other.pcap.partial"
    stray.write_bytes(b"not a pcap")

    recovered = make_writer(tmp_path)
    [sealed] = recovered.recover()
    assert not partial.exists()
    assert sealed.read_bytes()[24:] == batch.records
    assert len(tshark(sealed).splitlines()) == 7
    assert stray.exists()  # not ours to touch
    check = subprocess.run(["sha256sum", "-c", MANIFEST_NAME], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
