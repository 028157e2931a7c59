"""The ring-block converter: the compiled `_ring.drain` and its pure-Python twin on ring
memory laid out exactly as the kernel writes TPACKET_V3 blocks, plus arbitrary bytes."""

from __future__ import annotations

import mmap
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import scaled
from trawl.collector import afpacket
from trawl.collector.afpacket import drain_blocks_py
from trawl.pcap import iter_records

compiled = pytest.importorskip("trawl.collector._ring", reason="the C extension is built by pip install -e .")

BLOCK = 4096
TP_STATUS_USER = 1
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
ETH_P_IP = 0x0800


def frame_bytes(
    data: bytes,
    *,
    sec: int = 1_700_000_000,
    nsec: int = 123_456_789,
    wire_len: int | None = None,
    status: int = 0,
    tci: int = 0,
    tpid: int = 0,
    ifindex: int = 7,
    hatype: int = 1,
    pkttype: int = 0,
    addr: bytes = b"\x02\x00\x00\x00\x00\x01",
    protocol: int = ETH_P_IP,
    next_offset: int = 0,
) -> bytes:
    """One tpacket3_hdr + sockaddr_ll + packet, as the kernel lays it out (data 16-aligned at tp_mac)."""
    mac = 80  # TPACKET_ALIGN(48 + 20) rounded so the data is 16-aligned
    header = struct.pack(
        "=IIIIIIHHIIHH8x",
        next_offset,
        sec,
        nsec,
        len(data),
        len(data) if wire_len is None else wire_len,
        status,
        mac,
        mac,
        0,
        tci,
        tpid,
        0,
    )
    sockaddr = struct.pack(
        "=HHiHBB8s", 17, struct.unpack("=H", struct.pack(">H", protocol))[0], ifindex, hatype, pkttype, len(addr), addr
    )
    return (header + sockaddr).ljust(mac, b"\0") + data


def block_bytes(frames: list[bytes], status: int = TP_STATUS_USER) -> bytes:
    first = 48
    body = b""
    offsets = []
    for frame in frames:
        offsets.append(len(body))
        body += frame
        body += b"\0" * (-len(body) % 16)
    # Patch each frame's tp_next_offset (relative to the frame) except the last.
    patched = bytearray(body)
    for index, start in enumerate(offsets[:-1]):
        struct.pack_into("=I", patched, start, offsets[index + 1] - start)
    desc = struct.pack("=IIIIII", 1, 0, status, len(frames), first, first + len(patched)).ljust(first, b"\0")
    return (desc + bytes(patched)).ljust(BLOCK, b"\0")


def ring_of(*blocks: bytes) -> mmap.mmap:
    ring = mmap.mmap(-1, BLOCK * len(blocks))
    ring.write(b"".join(blocks))
    return ring


def both(blocks: list[bytes], cooked: bool, start: int = 0, max_blocks: int = 64) -> tuple[bytes, int, int, int]:
    fast: tuple[bytes, int, int, int] = compiled.drain(ring_of(*blocks), BLOCK, len(blocks), start, max_blocks, cooked)
    slow = drain_blocks_py(ring_of(*blocks), BLOCK, len(blocks), start, max_blocks, cooked)
    assert fast == slow
    return fast


def ethernet_frame(payload: bytes = b"hello") -> bytes:
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + payload


def test_ethernet_records_carry_timestamps_lengths_and_bytes() -> None:
    frames = [frame_bytes(ethernet_frame(b"one")), frame_bytes(ethernet_frame(b"two!"), wire_len=1500, nsec=5)]
    records, packets, next_block, blocks = both([block_bytes(frames)], cooked=False)
    assert (packets, next_block, blocks) == (2, 0, 1)
    parsed = list(iter_records(records, nanosecond=True))
    assert [r.data for r in parsed] == [ethernet_frame(b"one"), ethernet_frame(b"two!")]
    assert parsed[0].ts_ns == 1_700_000_000_123_456_789
    assert parsed[1].ts_ns == 1_700_000_000_000_000_005
    assert parsed[1].orig_len == 1500


def test_cooked_records_get_an_sll2_header_from_sockaddr_ll() -> None:
    ip_packet = b"\x45" + b"\0" * 19
    frame = frame_bytes(ip_packet, ifindex=9, hatype=1, pkttype=4, addr=b"\xaa\xbb\xcc\xdd\xee\xff")
    records, _, _, _ = both([block_bytes([frame])], cooked=True)
    (record,) = iter_records(records, nanosecond=True)
    header = record.data[:20]
    protocol, reserved, ifindex, hatype, pkttype, halen = struct.unpack(">HHIHBB", header[:12])
    assert (protocol, reserved, ifindex, hatype, pkttype, halen) == (ETH_P_IP, 0, 9, 1, 4, 6)
    assert header[12:20] == b"\xaa\xbb\xcc\xdd\xee\xff\0\0"
    assert record.data[20:] == ip_packet
    assert record.orig_len == 20 + len(ip_packet)


def test_vlan_tag_moved_out_by_the_kernel_is_put_back() -> None:
    frame = frame_bytes(ethernet_frame(b"x"), status=TP_STATUS_VLAN_VALID, tci=0x2064)
    records, _, _, _ = both([block_bytes([frame])], cooked=False)
    (record,) = iter_records(records, nanosecond=True)
    assert record.data[12:16] == b"\x81\x00\x20\x64"
    assert record.data[16:18] == b"\x08\x00"
    qinq = frame_bytes(
        ethernet_frame(b"x"), status=TP_STATUS_VLAN_VALID | TP_STATUS_VLAN_TPID_VALID, tci=5, tpid=0x88A8
    )
    records, _, _, _ = both([block_bytes([qinq])], cooked=True)
    (record,) = iter_records(records, nanosecond=True)
    assert record.data[0:2] == b"\x88\xa8"  # SLL2 protocol is the tag type
    assert record.data[20:24] == b"\x00\x05\x08\x00"  # then TCI and the encapsulated protocol


def test_only_ready_blocks_are_taken_in_ring_order_and_given_back() -> None:
    one = block_bytes([frame_bytes(ethernet_frame(b"1"))])
    two = block_bytes([frame_bytes(ethernet_frame(b"2"))])
    kernel_owned = block_bytes([frame_bytes(ethernet_frame(b"3"))], status=0)
    ring = ring_of(two, kernel_owned, one)
    records, packets, next_block, blocks = compiled.drain(ring, BLOCK, 3, 2, 64, False)
    # From block 2: takes it, wraps to block 0, stops at block 1 (owned by the kernel).
    assert (packets, next_block, blocks) == (2, 1, 2)
    assert [r.data[-1:] for r in iter_records(records, nanosecond=True)] == [b"1", b"2"]
    assert struct.unpack_from("=I", ring, 8)[0] == 0
    assert struct.unpack_from("=I", ring, 2 * BLOCK + 8)[0] == 0
    assert compiled.drain(ring, BLOCK, 3, next_block, 64, False)[1:] == (0, 1, 0)


def test_max_blocks_bounds_one_call() -> None:
    blocks = [block_bytes([frame_bytes(ethernet_frame(bytes([i])))]) for i in range(4)]
    _, packets, next_block, taken = both(blocks, cooked=False, max_blocks=3)
    assert (packets, next_block, taken) == (3, 3, 3)


def test_a_frame_running_past_its_block_ends_the_walk() -> None:
    good = frame_bytes(ethernet_frame(b"ok"))
    block = bytearray(block_bytes([good, frame_bytes(ethernet_frame(b"bad"))]))
    second = 48 + len(good) + (-len(good) % 16)
    struct.pack_into("=I", block, second + 12, BLOCK * 4)  # tp_snaplen far past the block
    records, packets, _, blocks = both([bytes(block)], cooked=False)
    assert (packets, blocks) == (1, 1)
    assert [r.data for r in iter_records(records, nanosecond=True)] == [ethernet_frame(b"ok")]


def test_bad_geometry_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="geometry"):
        compiled.drain(ring_of(block_bytes([])), BLOCK, 2, 0, 1, False)


@settings(max_examples=scaled(150), deadline=None)
@given(
    st.lists(st.binary(max_size=700), min_size=1, max_size=3),
    st.booleans(),
    st.integers(min_value=0, max_value=2),
)
def test_arbitrary_ring_memory_converts_identically_and_safely(raw: list[bytes], cooked: bool, start: int) -> None:
    blocks = []
    for index, block in enumerate(raw):
        mutable = bytearray(block.ljust(BLOCK, b"\0"))
        # Mark most blocks ready so the walk really runs over the arbitrary frames.
        if index % 3 != 2:
            struct.pack_into("=I", mutable, 8, TP_STATUS_USER)
        if index % 2 == 0:  # a sane first-frame offset, so the arbitrary bytes are read as frames
            struct.pack_into("=I", mutable, 16, 48)
        blocks.append(bytes(mutable))
    start %= len(blocks)
    records, packets, next_block, taken = both(blocks, cooked, start=start)
    assert 0 <= next_block < len(blocks)
    assert len(list(iter_records(records, nanosecond=True))) == packets
    assert len(records) <= taken * BLOCK


@settings(max_examples=scaled(60), deadline=None)
@given(
    st.lists(
        st.tuples(
            st.binary(min_size=0, max_size=300), st.integers(0, 0xFFFF), st.sampled_from([0, TP_STATUS_VLAN_VALID])
        ),
        min_size=1,
        max_size=8,
    ),
    st.booleans(),
)
def test_well_formed_blocks_round_trip(packets: list[tuple[bytes, int, int]], cooked: bool) -> None:
    frames = [frame_bytes(data, status=status, tci=tci) for data, tci, status in packets]
    records, count, _, _ = both([block_bytes(frames)], cooked)
    assert count == len(packets)
    for record, (data, tci, status) in zip(iter_records(records, nanosecond=True), packets, strict=True):
        tagged = bool(status or tci)
        if cooked:
            assert record.data[20 + (4 if tagged else 0) :] == data
        elif tagged and len(data) >= 12:
            assert record.data == data[:12] + struct.pack(">HH", 0x8100, tci) + data[12:]
        else:
            assert record.data == data


def test_fallback_is_used_and_logged_when_the_extension_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(afpacket, "compiled_drain", None)
    monkeypatch.setattr(afpacket, "_warned_fallback", False)
    assert afpacket._drain_function() is drain_blocks_py
    assert afpacket._warned_fallback
