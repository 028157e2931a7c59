"""Replay reader and batching: exact records from pcap and pcapng, damage reported with its
offset after every whole record before it."""

from __future__ import annotations

import itertools
import struct
import subprocess
import tempfile
from decimal import Decimal
from pathlib import Path

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import FIXTURES, needs_binary, scaled
from trawl.collector import replay
from trawl.collector.batching import FramedBatch, ShardBatcher
from trawl.collector.replay import CaptureFile, RecordBatch
from trawl.errors import InputError
from trawl.pcap import LINKTYPE_ETHERNET, MAGIC_NS, global_header, iter_records, pack_record
from trawl.v1.packets_pb2 import PacketBatch

HTTP1 = FIXTURES / "http1.pcap"


def test_pcap_records_equal_dpkt() -> None:
    packets = list(CaptureFile(HTTP1).packets())
    with HTTP1.open("rb") as handle:
        expected = list(dpkt.pcap.Reader(handle))
    assert len(packets) == len(expected) > 10
    for packet, (ts, data) in zip(packets, expected, strict=True):
        assert packet.data == data
        assert packet.link_type == LINKTYPE_ETHERNET
        assert abs(packet.ts_ns / 1e9 - ts) < 1e-6


@needs_binary("tshark")
def test_pcapng_records_equal_tshark_and_dpkt(shared_pcaps: Path) -> None:
    """Bytes checked against dpkt; timestamps against tshark, since dpkt ignores the
    nanosecond if_tsresol of this file's second section."""
    path = shared_pcaps / "kafka" / "nDPI__kafka.pcapng"
    packets = list(CaptureFile(path).packets())
    with path.open("rb") as handle:
        expected = list(dpkt.pcapng.Reader(handle))
    assert len(packets) == len(expected) > 10
    assert [p.data for p in packets] == [data for _, data in expected]
    epochs = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-e", "frame.time_epoch"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert [p.ts_ns for p in packets] == [int(Decimal(epoch) * 1_000_000_000) for epoch in epochs]


def test_truncated_pcap_yields_whole_records_then_names_offset(tmp_path: Path) -> None:
    data = HTTP1.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[: len(data) - 10])
    whole = list(CaptureFile(HTTP1).packets())
    seen: list[replay.CapturedPacket] = []
    with pytest.raises(
        InputError, match=r"cut.pcap: truncated capture: record of \d+ bytes has only \d+ at byte offset"
    ):
        seen.extend(CaptureFile(cut).packets())
    assert len(seen) == len(whole) - 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello world, not a capture", "not a pcap or pcapng file"),
        (b"\xd4\xc3", "shorter than a file header"),
    ],
)
def test_not_a_capture(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.pcap"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        CaptureFile(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read capture"):
        CaptureFile(tmp_path / "absent.pcap")


@given(st.binary(max_size=2048))
@settings(max_examples=scaled(200), deadline=None)
def test_arbitrary_bytes_after_a_valid_header_never_crash(tail: bytes) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".pcap") as handle:
        for header in (HTTP1.read_bytes()[:24], b"\x0a\x0d\x0d\x0a"):
            handle.seek(0)
            handle.truncate()
            handle.write(header + tail)
            handle.flush()
            try:
                for _ in CaptureFile(Path(handle.name)).packets():
                    pass
            except InputError:
                pass


def test_batches_carry_every_record_in_order_with_sequences() -> None:
    packets = list(CaptureFile(HTTP1).packets())
    batcher = ShardBatcher(node="n1", shard=3, source="file:x", max_packets=7, nanosecond=False)
    batches = [b for p in packets for b in batcher.add(p.ts_ns, p.data, p.orig_len, p.link_type, p.snaplen, "")]
    batches.append(batcher.cut(end_of_input=True))
    assert [b.sequence for b in batches] == list(range(1, len(batches) + 1))
    assert all(b.packet_count == 7 for b in batches[:-1])
    assert batches[-1].end_of_input and not any(b.end_of_input for b in batches[:-1])
    records = [r for b in batches for r in iter_records(b.records, b.nanosecond)]
    assert [r.data for r in records] == [p.data for p in packets]
    assert [r.ts_ns for r in records] == [p.ts_ns for p in packets]
    assert {b.shard for b in batches} == {3}


def test_batch_cut_on_link_type_change() -> None:
    batcher = ShardBatcher(node="n1", shard=0, source="s")
    assert batcher.add(1, b"a", 1, 1, 65535, "") == []
    closed = batcher.add(2, b"b", 1, 276, 65535, "")
    assert len(closed) == 1 and closed[0].link_type == 1 and closed[0].packet_count == 1
    assert batcher.cut().link_type == 276


@given(
    st.lists(st.binary(max_size=3000), max_size=6),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.integers(min_value=0, max_value=2**32 - 1),
)
@settings(max_examples=scaled(200), deadline=None)
def test_framed_batch_encodes_exactly_like_protobuf(parts: list[bytes], sequence: int, count: int) -> None:
    header = PacketBatch(node="n1", interface="eth0", link_type=1, shard=2, sequence=sequence, packet_count=count)
    header.kernel.drops = 3
    framed = FramedBatch(header, parts)
    whole = PacketBatch()
    whole.CopyFrom(header)
    whole.records = b"".join(parts)
    assert PacketBatch.FromString(framed.encode()) == whole
    assert framed.message() == whole
    assert framed.records == whole.records


# -- whole batches (CaptureFile.batches) --------------------------------------------------------


def batched_packets(batches: list[RecordBatch]) -> list[tuple[int, bytes, int]]:
    return [(r.ts_ns, r.data, r.orig_len) for b in batches for r in iter_records(b.records, b.nanosecond)]


def read_all(
    path: Path, max_packets: int = 4096, max_bytes: int = 1 << 20
) -> tuple[list[RecordBatch], InputError | None]:
    batches: list[RecordBatch] = []
    try:
        batches.extend(CaptureFile(path).batches(max_packets, max_bytes))
    except InputError as exc:
        return batches, exc
    return batches, None


def as_tuples(packets: list[replay.CapturedPacket]) -> list[tuple[int, bytes, int]]:
    return [(p.ts_ns, p.data, p.orig_len) for p in packets]


def test_the_record_walker_is_built() -> None:
    """`pip install -e .` compiles trawl.collector._pcapfile; the Python walker is only a fallback."""
    assert replay.walk_records is not replay.walk_records_python, (
        "trawl.collector._pcapfile is not compiled: run `pip install -e .`"
    )


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.pcap")), ids=lambda path: path.name)
def test_batches_hold_the_packets_exactly(path: Path) -> None:
    packets = list(CaptureFile(path).packets())
    batches, damage = read_all(path, max_packets=7)
    assert damage is None
    assert batched_packets(batches) == as_tuples(packets)
    assert all(b.packet_count == 7 for b in batches[:-1]) and 0 < batches[-1].packet_count <= 7
    for batch in batches:
        records = list(iter_records(batch.records, batch.nanosecond))
        assert (batch.first_ts_ns, batch.last_ts_ns) == (records[0].ts_ns, records[-1].ts_ns)
        assert batch.link_type == packets[0].link_type and batch.snaplen == packets[0].snaplen


def test_a_batch_closes_once_it_reaches_max_bytes_as_the_batcher_does() -> None:
    packets = list(CaptureFile(HTTP1).packets())
    batches, _ = read_all(HTTP1, max_packets=10_000, max_bytes=600)
    batcher = ShardBatcher(node="n", shard=0, source="s", max_packets=10_000, max_bytes=600, nanosecond=False)
    expected = [b for p in packets for b in batcher.add(p.ts_ns, p.data, p.orig_len, p.link_type, p.snaplen, "")]
    expected.append(batcher.cut())
    assert [b.records for b in batches] == [b.records for b in expected]
    assert [b.packet_count for b in batches] == [b.packet_count for b in expected]


def test_batches_are_the_file_bytes_untouched() -> None:
    data = HTTP1.read_bytes()
    batches, _ = read_all(HTTP1, max_packets=5)
    assert b"".join(b.records for b in batches) == data[24:]
    assert not batches[0].nanosecond


def test_batch_message_is_a_packet_batch() -> None:
    batch = next(CaptureFile(HTTP1).batches(3))
    message = batch.message(node="n1", shard=2, sequence=9, source="file:x")
    assert (message.node, message.shard, message.sequence, message.source) == ("n1", 2, 9, "file:x")
    assert (message.packet_count, message.records, message.link_type) == (3, batch.records, LINKTYPE_ETHERNET)
    assert not message.end_of_input and not message.nanosecond


def test_records_across_read_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads of a few bytes cut records and headers everywhere; batches come out the same."""
    expected = batched_packets(read_all(HTTP1)[0])
    for read_size in (1, 7, 16, 100, 333):
        monkeypatch.setattr(replay, "READ_SIZE", read_size)
        for max_bytes in (1, 50, 1000):
            batches, damage = read_all(HTTP1, max_packets=3, max_bytes=max_bytes)
            assert damage is None
            assert batched_packets(batches) == expected


def test_a_record_bigger_than_a_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay, "READ_SIZE", 64)
    path = tmp_path / "big.pcap"
    frames = [bytes([n]) * size for n, size in enumerate((10, 5000, 3, 70_000, 1))]
    path.write_bytes(
        global_header(LINKTYPE_ETHERNET)
        + b"".join(pack_record(n * 1000, f, nanosecond=False) for n, f in enumerate(frames))
    )
    batches, damage = read_all(path, max_packets=2, max_bytes=1 << 20)
    assert damage is None
    assert [data for _, data, _ in batched_packets(batches)] == frames


LAST_RECORD = len(list(CaptureFile(HTTP1).packets())[-1].data) + 16


@pytest.mark.parametrize("cut", [1, 5, 10, 15, 16, 17, 60, LAST_RECORD - 5, LAST_RECORD - 16, LAST_RECORD + 3])
def test_truncated_file_batches_every_whole_record_then_names_the_offset(tmp_path: Path, cut: int) -> None:
    data = HTTP1.read_bytes()
    path = tmp_path / "cut.pcap"
    path.write_bytes(data[: len(data) - cut])
    reference: list[replay.CapturedPacket] = []
    with pytest.raises(InputError) as expected:
        reference.extend(CaptureFile(path).packets())
    batches, damage = read_all(path, max_packets=4)
    assert damage is not None and str(damage) == str(expected.value)
    assert "cut.pcap" in str(damage) and "byte offset" in str(damage)
    assert batched_packets(batches) == as_tuples(reference)


def test_a_record_claiming_too_many_bytes(tmp_path: Path) -> None:
    data = HTTP1.read_bytes()
    first = 24 + 16 + struct.unpack_from("<I", data, 24 + 8)[0]
    damaged = bytearray(data)
    damaged[first + 8 : first + 12] = struct.pack("<I", replay.MAX_RECORD + 1)
    path = tmp_path / "corrupt.pcap"
    path.write_bytes(bytes(damaged))
    batches, damage = read_all(path)
    assert damage is not None and f"record at byte offset {first} claims" in str(damage)
    assert len(batched_packets(batches)) == 1


def test_big_endian_pcap_is_converted(tmp_path: Path) -> None:
    frames = [b"\x01" * 60, b"\x02" * 61, b"\x03" * 62]
    header = struct.pack(">IHHiIII", MAGIC_NS, 2, 4, 0, 0, 65535, LINKTYPE_ETHERNET)
    body = b"".join(struct.pack(">IIII", 1_700_000_000, 5 + n, len(f), len(f) + 4) + f for n, f in enumerate(frames))
    path = tmp_path / "be.pcap"
    path.write_bytes(header + body)
    batches, damage = read_all(path, max_packets=2)
    assert damage is None and [b.packet_count for b in batches] == [2, 1]
    assert batched_packets(batches) == [(1_700_000_000_000_000_005 + n, f, len(f) + 4) for n, f in enumerate(frames)]
    assert all(b.nanosecond and b.link_type == LINKTYPE_ETHERNET for b in batches)


@needs_binary("tshark")
def test_pcapng_batches_split_at_interface_changes(shared_pcaps: Path) -> None:
    path = shared_pcaps / "kafka" / "nDPI__kafka.pcapng"
    packets = list(CaptureFile(path).packets())
    batches, damage = read_all(path)
    assert damage is None
    assert batched_packets(batches) == as_tuples(packets)
    assert all(b.nanosecond for b in batches)
    changes = sum(1 for a, b in itertools.pairwise(packets) if (a.link_type, a.interface) != (b.link_type, b.interface))
    assert len(batches) == changes + 1


def test_pcapng_block_too_short_for_its_fields(tmp_path: Path) -> None:
    section = struct.pack("<IIIHHq", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1) + struct.pack("<I", 28)
    interface = struct.pack("<II", 1, 12) + struct.pack("<I", 12)  # an interface block with no body
    path = tmp_path / "short.pcapng"
    path.write_bytes(section + interface)
    with pytest.raises(InputError, match="corrupt pcapng block at byte offset 28"):
        list(CaptureFile(path).packets())
    assert isinstance(read_all(path)[1], InputError)


@given(st.binary(max_size=400), st.integers(0, 420), st.integers(1, 6), st.integers(1, 300))
@settings(deadline=None)
def test_compiled_walker_matches_python(buffer: bytes, start: int, max_packets: int, max_bytes: int) -> None:
    start = min(start, len(buffer))
    assert replay.walk_records(buffer, start, max_packets, max_bytes) == replay.walk_records_python(
        buffer, start, max_packets, max_bytes
    )


def test_walker_rejects_a_start_outside_the_buffer() -> None:
    with pytest.raises(ValueError, match="outside"):
        replay.walk_records(b"abc", 4, 1, 1)


@given(st.binary(max_size=1500), st.sampled_from([b"", b"\x00" * 16]))
@settings(max_examples=scaled(200), deadline=None)
def test_batches_of_arbitrary_bytes_match_the_packet_reader(tail: bytes, prefix: bytes) -> None:
    """Whatever follows a valid header: the same packets, then the same error, as `packets()`."""
    with tempfile.NamedTemporaryFile(suffix=".pcap") as handle:
        handle.write(HTTP1.read_bytes()[:24] + prefix + tail)
        handle.flush()
        path = Path(handle.name)
        reference: list[replay.CapturedPacket] = []
        expected: InputError | None = None
        try:
            reference.extend(CaptureFile(path).packets())
        except InputError as exc:
            expected = exc
        batches, damage = read_all(path, max_packets=3, max_bytes=200)
        assert batched_packets(batches) == as_tuples(reference)
        assert str(damage) == str(expected)
