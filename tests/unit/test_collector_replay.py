"""Replay reader and batching: exact records from pcap and pcapng, damage reported with its
offset after every whole record before it."""

from __future__ import annotations

import subprocess
from decimal import Decimal
from pathlib import Path

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import FIXTURES, needs_binary
from trawl.collector.batching import FramedBatch, ShardBatcher
from trawl.collector.replay import CaptureFile
from trawl.errors import InputError
from trawl.pcap import LINKTYPE_ETHERNET, iter_records
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
    seen = []
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
@settings(max_examples=200, deadline=None)
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
@settings(max_examples=200, deadline=None)
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
