"""Every link type libpcap reads that the README lists, as generated captures: each gives the
calls its Ethernet twin gives (issue #8, item 4). The historical raw-IP values 12 and 14 are
read as LINKTYPE_RAW where the file is read, so the compiled lane takes them as it takes 101;
a link type Trawl cannot decode is one `LinkTypeError` naming it, when the file is opened."""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.dissector_builders import Conversation, batch, dissect, settings
from tests.unit.test_dissector_layers import loop_be, null_le, sll, sll2
from trawl.collector.replay import CaptureFile, LinkTypeError
from trawl.dissector.engine import Dissector
from trawl.dissector.layers import PacketDecoder
from trawl.errors import InputError
from trawl.pcap import (
    DECODED_LINK_TYPES,
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    MAGIC_NS,
    global_header,
    link_type_text,
    normalise_link_type,
    pack_record,
)

Frames = list[tuple[int, bytes]]


def conversation(version: int) -> Frames:
    """Two HTTP/1.1 exchanges on one connection, as Ethernet frames."""
    client, server = ("10.0.0.1", "10.0.0.2") if version == 4 else ("2001:db8::1", "2001:db8::2")
    talk = Conversation(client=client, server=server, server_port=8080).handshake()
    talk.client_sends(b"GET /items/1 HTTP/1.1\r\nHost: shop\r\n\r\n")
    talk.server_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    talk.client_sends(b"POST /items HTTP/1.1\r\nHost: shop\r\nContent-Length: 3\r\n\r\nabc")
    talk.server_sends(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    return talk.close().frames


def raw_ip(ip: bytes) -> bytes:
    return ip


# Each link type value with the way its frames wrap the IP packet (the Ethernet frame minus 14 bytes).
WRAPS: dict[int, Callable[[bytes], bytes]] = {
    LINKTYPE_NULL: null_le,
    LINKTYPE_LOOP: loop_be,
    LINKTYPE_LINUX_SLL: sll,
    LINKTYPE_LINUX_SLL2: sll2,
    LINKTYPE_RAW: raw_ip,
    12: raw_ip,
    14: raw_ip,
    LINKTYPE_IPV4: raw_ip,
    LINKTYPE_IPV6: raw_ip,
}


def wrapped(frames: Frames, link_type: int) -> Frames:
    if link_type == LINKTYPE_ETHERNET:
        return frames
    wrap = WRAPS[link_type]
    return [(ts, wrap(frame[14:])) for ts, frame in frames]


def write_pcap(path: Path, link_type: int, frames: Frames, big_endian: bool = False) -> Path:
    if big_endian:
        header = struct.pack(">IHHiIII", MAGIC_NS, 2, 4, 0, 0, 262144, link_type)
        body = b"".join(
            struct.pack(">IIII", ts // 1_000_000_000, ts % 1_000_000_000, len(frame), len(frame)) + frame
            for ts, frame in frames
        )
    else:
        header = global_header(link_type, nanosecond=True)
        body = b"".join(pack_record(ts, frame) for ts, frame in frames)
    path.write_bytes(header + body)
    return path


def write_pcapng(path: Path, interfaces: list[tuple[int, Frames]]) -> Path:
    """A little-endian pcapng file (microsecond timestamps): one interface block per entry, each
    followed by its packets."""
    blocks = [struct.pack("<IIIHHqI", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1, 28)]
    for number, (link_type, frames) in enumerate(interfaces):
        blocks.append(struct.pack("<IIHHII", 1, 20, link_type, 0, 262144, 20))
        for ts, frame in frames:
            ticks = ts // 1000
            pad = -len(frame) % 4
            length = 32 + len(frame) + pad
            head = struct.pack("<IIIIIII", 6, length, number, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), len(frame))
            blocks.append(head + frame + bytes(pad) + struct.pack("<I", length))
    path.write_bytes(b"".join(blocks))
    return path


def analysed(path: Path, **overrides: object) -> tuple[list[dict[str, Any]], set[int], Dissector]:
    """What `trawl analyze` does with the file, minus enrichment and printing: the calls (as
    their JSON mapping), the link types of the batches read, and the dissector."""
    engine = Dissector(settings(**overrides), "n1")
    calls = []
    link_types = set()
    for sequence, read in enumerate(CaptureFile(path).batches(8), start=1):
        link_types.add(read.link_type)
        calls += engine.feed(read.message(node="n1", shard=0, sequence=sequence, source="test"))
    calls += engine.finish()
    return [MessageToDict(call, preserving_proto_field_name=True) for call in calls], link_types, engine


@pytest.mark.parametrize(
    ("link_type", "version"),
    [
        (link_type, version)
        for link_type in sorted(DECODED_LINK_TYPES - {LINKTYPE_ETHERNET})
        for version in (4, 6)
        if (link_type, version) not in ((LINKTYPE_IPV4, 6), (LINKTYPE_IPV6, 4))  # IPV4/IPV6 carry one version
    ],
)
def test_every_link_type_gives_the_calls_of_its_ethernet_twin(tmp_path: Path, link_type: int, version: int) -> None:
    frames = conversation(version)
    ethernet_calls, _, _ = analysed(write_pcap(tmp_path / "ethernet.pcap", LINKTYPE_ETHERNET, frames))
    assert [(call["method"], call["path"], call["status"]) for call in ethernet_calls] == [
        ("GET", "/items/1", "200"),
        ("POST", "/items", "503"),
    ]
    calls, link_types, engine = analysed(write_pcap(tmp_path / "other.pcap", link_type, wrapped(frames, link_type)))
    assert calls == ethernet_calls
    assert link_types == {normalise_link_type(link_type)}
    # The compiled lane took the flow on this link type too (after normalisation for 12 and 14).
    assert engine.counters.get("express_flows_adopted") == 1


@pytest.mark.parametrize("link_type", [12, 14])
@pytest.mark.parametrize("express", [True, False])
def test_historical_raw_ip_values_in_every_file_format(tmp_path: Path, link_type: int, express: bool) -> None:
    frames = conversation(4)
    reference, _, _ = analysed(write_pcap(tmp_path / "ethernet.pcap", LINKTYPE_ETHERNET, frames), express=express)
    raw = wrapped(frames, link_type)
    for path in (
        write_pcap(tmp_path / "le.pcap", link_type, raw),
        write_pcap(tmp_path / "be.pcap", link_type, raw, big_endian=True),
        write_pcapng(tmp_path / "raw.pcapng", [(link_type, raw)]),
    ):
        calls, link_types, _ = analysed(path, express=express)
        assert link_types == {LINKTYPE_RAW}, path.name
        # pcapng keeps microseconds here (dpkt's writer): compare what does not depend on the clock.
        assert [(c["id"], c["method"], c["path"], c["status"]) for c in calls] == [
            (c["id"], c["method"], c["path"], c["status"]) for c in reference
        ]
        assert all(packet.link_type == LINKTYPE_RAW for packet in CaptureFile(path).packets())


@pytest.mark.parametrize("link_type", [12, 14])
def test_batches_with_a_historical_value_decode_without_the_reader(link_type: int) -> None:
    """A PacketBatch that says 12 or 14 (from a producer that did not normalise): the lane does
    not take the value and hands the frames to the Python path, which reads them as raw IP."""
    frames = conversation(4)
    assert dissect(wrapped(frames, link_type), link_type=link_type) == dissect(frames)
    assert [call.status for call in dissect(wrapped(frames, link_type), link_type=link_type)] == ["200", "503"]


def test_fcs_bits_of_the_header_are_not_the_link_type(tmp_path: Path) -> None:
    """libpcap's LT_FCS_LENGTH_PRESENT and FCS length bits (here: 4 bytes of FCS on each frame)."""
    frames = conversation(4)
    with_fcs = [(ts, frame + b"\xde\xad\xbe\xef") for ts, frame in frames]
    calls, link_types, _ = analysed(write_pcap(tmp_path / "fcs.pcap", 0x44000000 | LINKTYPE_ETHERNET, with_fcs))
    reference, _, _ = analysed(write_pcap(tmp_path / "plain.pcap", LINKTYPE_ETHERNET, frames))
    assert link_types == {LINKTYPE_ETHERNET} and calls == reference


@pytest.mark.parametrize(
    ("link_type", "text"), [(147, "147 (USER0)"), (105, "105 (IEEE802_11)"), (4000, "4000"), (9, "9 (PPP)")]
)
def test_a_link_type_trawl_cannot_decode_fails_when_the_file_is_opened(
    tmp_path: Path, link_type: int, text: str
) -> None:
    frames = wrapped(conversation(4), LINKTYPE_RAW)
    for path in (
        write_pcap(tmp_path / "le.pcap", link_type, frames),
        write_pcap(tmp_path / "be.pcap", link_type, frames, big_endian=True),
        write_pcapng(tmp_path / "one.pcapng", [(link_type, frames)]),
    ):
        with pytest.raises(LinkTypeError) as raised:
            CaptureFile(path)
        assert str(raised.value) == (
            f"{path}: link type {text} is not one Trawl decodes"
            " (it reads Ethernet, Linux cooked SLL and SLL2, raw IP, BSD loopback/null)"
        )
        assert raised.value.link_type == link_type and raised.value.exit_code == 2


def test_a_later_pcapng_interface_trawl_cannot_decode_ends_the_read_after_what_came_before(tmp_path: Path) -> None:
    frames = conversation(4)
    path = write_pcapng(tmp_path / "two.pcapng", [(LINKTYPE_ETHERNET, frames), (147, [(frames[0][0], b"x" * 40)])])
    capture = CaptureFile(path)  # the first packet is Ethernet: opening is fine
    read: list[int] = []
    with pytest.raises(LinkTypeError, match=r"link type 147 \(USER0\)"):
        read.extend(records.packet_count for records in capture.batches(4))
    assert sum(read) == len(frames)


def test_an_interface_without_packets_does_not_fail(tmp_path: Path) -> None:
    """A pcapng file may describe interfaces it has no packets of; only packets matter."""
    frames = conversation(4)
    path = write_pcapng(tmp_path / "idle.pcapng", [(LINKTYPE_ETHERNET, frames), (147, [])])
    assert sum(records.packet_count for records in CaptureFile(path).batches()) == len(frames)


def test_link_type_text_and_normalisation() -> None:
    assert link_type_text(LINKTYPE_LINUX_SLL2) == "276 (LINUX_SLL2)"
    assert link_type_text(LINKTYPE_ETHERNET) == "1 (EN10MB)"  # as tcpdump names it
    assert [normalise_link_type(value) for value in (12, 14, 101, 0x44000001, 228)] == [101, 101, 101, 1, 228]


@given(link_type=st.integers(0, 0xFFFFFFFF), body=st.binary(max_size=200))
def test_any_header_link_type_is_read_or_refused_in_one_error(link_type: int, body: bytes) -> None:
    """Whatever the header's link-type field says, opening and reading the file either works or
    raises InputError (a LinkTypeError when the value is one Trawl cannot decode)."""
    with tempfile.NamedTemporaryFile(suffix=".pcap") as handle:
        handle.write(global_header(0)[:20] + struct.pack("<I", link_type) + body)
        handle.flush()
        path = Path(handle.name)
        if normalise_link_type(link_type) not in DECODED_LINK_TYPES:
            with pytest.raises(LinkTypeError) as raised:
                CaptureFile(path)
            assert raised.value.link_type == normalise_link_type(link_type)
            return
        try:
            batches = list(CaptureFile(path).batches())
        except LinkTypeError:
            pytest.fail("a link type Trawl decodes was refused")
        except InputError:
            return  # damage in the records, reported after the link type passed
        assert all(b.link_type == normalise_link_type(link_type) for b in batches)


@given(link_type=st.sampled_from(sorted(DECODED_LINK_TYPES)), frame=st.binary(max_size=120))
def test_any_frame_of_any_link_type_decodes_or_is_counted(link_type: int, frame: bytes) -> None:
    decoder = PacketDecoder()
    packet = decoder.decode(link_type, frame, 0)
    assert packet is not None or sum(decoder.counters.values()) >= 1
    assert "unsupported_link_type" not in decoder.counters


def test_batches_of_an_unknown_link_type_are_counted_by_the_dissector() -> None:
    """Over the bus (no file to refuse), frames of a link type nobody decodes are counted."""
    engine = Dissector(settings(), "n1")
    frames = conversation(4)
    assert engine.feed(batch(frames, link_type=147)) == []
    assert engine.counters["unsupported_link_type"] == len(frames)
