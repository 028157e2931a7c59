"""IP fragment reassembly under floods: bounded work and memory per fragment, everything it
refuses counted (issue #8, item 3).

The floods are generated captures fed through the whole dissector (`Dissector.feed`, compiled
lane included); the bounds are asserted on the reassembler's table and counters, never on time
(bench/fragments.py measures the per-packet cost against ordinary packets and tshark).
"""

from __future__ import annotations

import asyncio
import random
import struct
import uuid
from collections.abc import Iterable, Iterator

import dpkt
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.dissector_builders import T0, _addr, batch, ethernet, settings, udp_datagram
from trawl.bus import Bus, control_subject, packets_subject
from trawl.config import NatsSettings
from trawl.dissector.config import DissectorSettings
from trawl.dissector.engine import Dissector
from trawl.dissector.layers import FragmentReassembler, PacketDecoder
from trawl.dissector.main import serve
from trawl.pcap import LINKTYPE_ETHERNET, LINKTYPE_RAW
from trawl.service import ServiceContext
from trawl.v1.packets_pb2 import PacketBatch

FLOOD = 100_000
BATCH = 1000
SERVER = _addr("192.0.2.200")
V6_SERVER = _addr("2001:db8::200")


def v4_fragment(src: bytes, ident: int, offset: int, more: bool, payload: bytes, proto: int = 17) -> bytes:
    """One IPv4 fragment (checksummed by dpkt) carrying `payload` at byte `offset`."""
    ip = dpkt.ip.IP(src=src, dst=SERVER, p=proto, id=ident, ttl=64, data=payload)
    ip._flags_offset = (offset // 8) | (dpkt.ip.IP_MF if more else 0)
    ip.len = 20 + len(payload)
    return bytes(ip)


def v6_fragment(src: bytes, ident: int, offset: int, more: bool, payload: bytes) -> bytes:
    """One IPv6 packet with a fragment header (next header UDP)."""
    body = struct.pack("!BBHI", 17, 0, offset | int(more), ident) + payload
    return bytes(dpkt.ip6.IP6(src=src, dst=V6_SERVER, nxt=44, hlim=64, plen=len(body), data=body))


def flood_sources(count: int) -> Iterator[tuple[bytes, int]]:
    """`count` distinct (source address, identification) pairs: the IPv4 id is 16 bits."""
    for number in range(count):
        yield bytes((10, 1, number >> 16, 0)), number & 0xFFFF


def batches(frames: Iterable[bytes], start_ns: int = T0) -> Iterator[PacketBatch]:
    """Ethernet frames, 1 µs apart, in PacketBatches of BATCH records."""
    chunk: list[tuple[int, bytes]] = []
    sequence = 0
    for number, frame in enumerate(frames):
        chunk.append((start_ns + number * 1000, ethernet(frame)))
        if len(chunk) == BATCH:
            sequence += 1
            yield batch(chunk, LINKTYPE_ETHERNET, sequence=sequence)
            chunk = []
    if chunk:
        yield batch(chunk, LINKTYPE_ETHERNET, sequence=sequence + 1)


def assert_consistent(reassembler: FragmentReassembler) -> None:
    """The table's own bookkeeping: within its bounds, pieces disjoint and sorted, bytes summed."""
    assert len(reassembler.pending) <= reassembler.max_datagrams
    assert reassembler.buffered <= reassembler.max_bytes
    held = 0
    for datagram in reassembler.pending.values():
        assert len(datagram.starts) == len(datagram.chunks) <= reassembler.max_pieces
        end = 0
        for start, chunk in zip(datagram.starts, datagram.chunks, strict=True):
            assert start >= end and chunk
            end = start + len(chunk)
        assert datagram.size == sum(len(chunk) for chunk in datagram.chunks)
        assert datagram.total < 0 or end <= datagram.total
        held += datagram.size
    assert reassembler.buffered == held


def test_a_flood_of_first_fragments_keeps_the_table_at_its_limit() -> None:
    """100,000 first fragments of distinct datagrams that never complete (the issue's flood,
    ~33 s before): each one past the limit evicts exactly one datagram, the oldest, so the work
    per fragment is one insertion and one eviction; a datagram that completes after the flood
    is reassembled."""
    engine = Dissector(settings(), "n1")
    reassembler = engine.decoder.fragments
    limit = engine.settings.max_ip_fragments
    piece = udp_datagram(40000, 9, b"f" * 32)  # the first 40 bytes of a longer datagram
    frames = (v4_fragment(src, ident, 0, True, piece) for src, ident in flood_sources(FLOOD))
    for packets in batches(frames):
        assert engine.feed(packets) == []
        assert_consistent(reassembler)
    counters = engine.counters
    assert counters["ip_fragments"] == FLOOD
    assert counters["ip_fragments_evicted"] == FLOOD - limit
    assert len(reassembler.pending) == limit and reassembler.buffered == limit * len(piece)
    # The survivors are the newest: the oldest went first.
    survivors = list(reassembler.pending)
    assert survivors[0][:3] == (bytes((10, 1, (FLOOD - limit) >> 16, 0)), SERVER, (FLOOD - limit) & 0xFFFF)
    assert survivors[-1][2] == (FLOOD - 1) & 0xFFFF
    # Ordinary fragmented traffic still gets through.
    whole = udp_datagram(40001, 9, bytes(range(200)))
    late = [
        v4_fragment(_addr("10.9.9.9"), 7, 0, True, whole[:104]),
        v4_fragment(_addr("10.9.9.9"), 7, 104, False, whole[104:]),
    ]
    for packets in batches(late, start_ns=T0 + FLOOD * 1000):
        engine.feed(packets)
    assert engine.counters["ip_reassembled"] == 1
    assert engine.counters["ip_fragments_evicted"] == FLOOD - limit + 1


def test_a_flood_of_ipv6_first_fragments_is_bounded_the_same_way() -> None:
    decoder = PacketDecoder(max_fragments=1000)
    piece = udp_datagram(40000, 9, b"six" * 16)
    for number in range(20_000):
        src = _addr(f"2001:db8::{number >> 16:x}:{number & 0xFFFF:x}")
        assert decoder.decode(LINKTYPE_RAW, v6_fragment(src, number, 0, True, piece), T0 + number) is None
        assert len(decoder.fragments.pending) <= 1000
    assert decoder.counters["ip_fragments_evicted"] == 19_000
    assert decoder.fragments.buffered == 1000 * len(piece)
    assert_consistent(decoder.fragments)


def test_one_datagram_fed_20000_pieces_that_never_complete() -> None:
    """The issue's second flood: one datagram, its last piece first, then 20,000 pieces that
    leave a hole forever: zero-length pieces, duplicates and overlaps. The empty and duplicate
    ones are refused and counted and hold nothing; an overlap keeps only its new bytes; the
    datagram never holds more than its distinct bytes."""
    engine = Dissector(settings(), "n1")
    reassembler = engine.decoder.fragments
    src = _addr("10.2.0.1")
    frames = [v4_fragment(src, 4242, 65512, False, b"L" * 16)]
    for number in range(20_000):
        slot = 16 * ((number // 3) % 100)  # 100 places, 16 bytes apart, covering [0, 1600) at most
        kind = number % 3
        if kind == 0:
            frames.append(v4_fragment(src, 4242, slot, True, b""))
        elif kind == 1:
            frames.append(v4_fragment(src, 4242, slot, True, b"a" * 8))
        else:
            frames.append(v4_fragment(src, 4242, slot, True, b"a" * 16))
    for packets in batches(frames):
        assert engine.feed(packets) == []
        assert_consistent(reassembler)
    counters = engine.counters
    assert counters["ip_fragments"] == 20_001
    assert counters["ip_fragments_empty"] == 6667
    assert counters["ip_fragments_overlapping"] == 100  # the first 16-byte piece at each place
    assert counters["ip_fragments_duplicate"] == (6667 - 100) + (6666 - 100)
    assert "ip_fragments_dropped_limit" not in counters and "ip_reassembled" not in counters
    (datagram,) = reassembler.pending.values()
    assert len(datagram.chunks) == 1 + 100 + 100 and datagram.total == 65528
    assert reassembler.buffered == datagram.size == 16 + 100 * 16


def test_a_datagram_needing_more_pieces_than_the_limit_is_dropped_and_counted() -> None:
    """20,000 distinct 8-byte pieces of one datagram, never the last: at `max_pieces` (256) held,
    the next piece drops the datagram (counted), and the one after starts it again."""
    decoder = PacketDecoder()
    src = _addr("10.2.0.2")
    for number in range(20_000):
        frame = v4_fragment(src, 77, 8 * (number % 8000), True, b"p" * 8)
        assert decoder.decode(LINKTYPE_RAW, frame, T0 + number) is None
        assert_consistent(decoder.fragments)
    assert decoder.counters["ip_fragments_too_many_pieces"] == 20_000 // 257
    assert decoder.counters["ip_fragments_dropped_limit"] == 20_000 // 257
    (datagram,) = decoder.fragments.pending.values()
    assert len(datagram.chunks) == 20_000 % 257


def test_the_byte_budget_evicts_the_oldest_datagrams() -> None:
    decoder = PacketDecoder(max_fragment_bytes=1000)
    for ident in range(10):
        decoder.decode(LINKTYPE_RAW, v4_fragment(_addr("10.3.0.1"), ident, 0, True, b"b" * 400), T0)
        assert decoder.fragments.buffered <= 1000
    assert [key[2] for key in decoder.fragments.pending] == [8, 9]
    assert decoder.counters["ip_fragments_evicted"] == 8
    # A datagram that alone would pass the budget goes (counted); the others stay.
    decoder.decode(LINKTYPE_RAW, v4_fragment(_addr("10.3.0.1"), 9, 400, True, b"b" * 800), T0)
    assert [key[2] for key in decoder.fragments.pending] == [8] and decoder.fragments.buffered == 400
    assert decoder.counters["ip_fragments_too_large"] == 1
    # A first piece bigger than the whole budget is refused without evicting anyone.
    decoder.decode(LINKTYPE_RAW, v4_fragment(_addr("10.3.0.1"), 10, 0, True, b"b" * 1200), T0)
    assert [key[2] for key in decoder.fragments.pending] == [8]
    assert decoder.counters["ip_fragments_dropped_limit"] == 2 and decoder.counters["ip_fragments_evicted"] == 8


def test_stale_datagrams_making_room_count_as_timed_out() -> None:
    decoder = PacketDecoder(max_fragments=2, fragment_timeout_ns=1000)
    for ident, ts in ((1, 0), (2, 5000), (3, 5500)):
        decoder.decode(LINKTYPE_RAW, v4_fragment(_addr("10.3.0.2"), ident, 0, True, b"t" * 8), ts)
    assert decoder.counters["ip_fragments_timed_out"] == 1 and "ip_fragments_evicted" not in decoder.counters
    decoder.decode(LINKTYPE_RAW, v4_fragment(_addr("10.3.0.2"), 4, 0, True, b"t" * 8), 5600)
    assert decoder.counters["ip_fragments_evicted"] == 1
    assert [key[2] for key in decoder.fragments.pending] == [3, 4]


def test_a_contradicting_end_is_refused_and_the_first_end_stands() -> None:
    decoder = PacketDecoder()
    src = _addr("10.3.0.3")
    whole = udp_datagram(1, 2, b"e" * 40)  # 48 bytes
    assert decoder.decode(LINKTYPE_RAW, v4_fragment(src, 5, 24, False, whole[24:]), 0) is None
    assert decoder.decode(LINKTYPE_RAW, v4_fragment(src, 5, 16, False, b"x" * 8), 0) is None  # a second end
    assert decoder.decode(LINKTYPE_RAW, v4_fragment(src, 5, 40, True, b"x" * 16), 0) is None  # past the end
    assert decoder.counters["ip_fragments_inconsistent"] == 2
    # A last piece that ends before bytes already held.
    assert decoder.decode(LINKTYPE_RAW, v4_fragment(src, 6, 64, True, b"y" * 8), 0) is None
    assert decoder.decode(LINKTYPE_RAW, v4_fragment(src, 6, 16, False, b"y" * 8), 0) is None
    assert decoder.counters["ip_fragments_inconsistent"] == 3
    packet = decoder.decode(LINKTYPE_RAW, v4_fragment(src, 5, 0, True, whole[:24]), 0)
    assert packet is not None and packet.payload == whole


def test_a_piece_spanning_holes_fills_each_of_them() -> None:
    """Held: [8,16) and [32,40); a piece [0,48) brings [0,8), [16,32) and [40,48) only, and the
    bytes held first stay (first copy wins, as tshark reassembles). (A last piece at offset 0 is
    no fragment on the wire, hence the reassembler itself here.)"""
    counters: dict[str, int] = {}
    reassembler = FragmentReassembler(10, 1 << 20, 10**9, counters)
    key = (b"s", b"d", 8, 17)
    assert reassembler.add(key, 8, True, b"1" * 8, 0) is None
    assert reassembler.add(key, 32, True, b"2" * 8, 0) is None
    whole = reassembler.add(key, 0, False, b"z" * 48, 0)
    assert whole == b"z" * 8 + b"1" * 8 + b"z" * 16 + b"2" * 8 + b"z" * 8
    assert counters["ip_fragments_overlapping"] == 1 and not reassembler.pending


@given(
    payload=st.binary(min_size=1, max_size=600),
    cuts=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 200)), min_size=1, max_size=40),
    order=st.randoms(use_true_random=False),
    max_pieces=st.integers(1, 64),
    max_bytes=st.integers(0, 1200),
)
def test_any_pieces_in_any_order_reassemble_the_datagram_or_are_counted(
    payload: bytes, cuts: list[tuple[int, int]], order: random.Random, max_pieces: int, max_bytes: int
) -> None:
    """Pieces of one true datagram, any offsets, lengths (zero included), overlaps and order:
    the bookkeeping stays within bounds after every piece, and once every byte and the end have
    arrived without a refusal the result is the datagram, byte for byte."""
    total = len(payload)
    pieces = [(min(start, total), min(start + length, total)) for start, length in cuts]
    pieces.append((max(0, total - 1), total))  # the last piece, somewhere in the order
    order.shuffle(pieces)
    counters: dict[str, int] = {}
    reassembler = FragmentReassembler(4, max_bytes, 10**9, counters, max_pieces=max_pieces)
    result = None
    for start, stop in pieces:
        result = reassembler.add((b"s", b"d", 1, 17), start, stop < total, payload[start:stop], 0)
        assert_consistent(reassembler)
        if result is not None:
            assert result == payload
            assert not reassembler.pending and reassembler.buffered == 0
            break
    refused = sum(counters.get(name, 0) for name in ("ip_fragments_dropped_limit", "ip_fragments_inconsistent"))
    covered: set[int] = set()
    for start, stop in pieces:
        covered.update(range(start, stop))
    if result is None and refused == 0 and max_bytes >= total and max_pieces >= len(pieces):
        # Nothing was refused for a bound and every piece was whole: a hole remains.
        assert len(covered) < total
    assert counters["ip_fragments"] >= 1


async def test_fragment_counters_reach_metrics(nats_url: str) -> None:
    """The reassembler's counters are the dissector's: the service exports them on /metrics as
    trawl_dissector_<name>, like every other dissector counter."""
    node = f"node-{uuid.uuid4().hex[:8]}"
    dissector_settings = DissectorSettings.load(
        None,
        node="dissector-frag",
        nats=NatsSettings(servers=[nats_url]),
        shard_assignment="all",
        subject=f"trawl.v1.packets.{node}.>",
        max_ip_fragments=3,
    )
    bus = await Bus.connect(dissector_settings.nats, "dissector-frag")
    ctx = ServiceContext(name="dissector", settings=dissector_settings, bus=bus)
    client = await Bus.connect(dissector_settings.nats, "test-client")
    ready, drained = asyncio.Event(), asyncio.Event()

    async def on_ready(msg: object) -> None:
        ready.set()

    async def on_drained(msg: object) -> None:
        drained.set()

    await client.subscribe(control_subject("ready", "dissector", "dissector-frag"), on_ready)
    await client.subscribe(control_subject("drained", "dissector", "dissector-frag"), on_drained)
    task = asyncio.create_task(serve(ctx))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        src = _addr("10.4.0.1")
        frames = [v4_fragment(src, ident, 0, True, b"m" * 8) for ident in range(10)]
        frames += [v4_fragment(src, 9, 8, True, b""), v4_fragment(src, 9, 0, True, b"m" * 8)]
        (flood,) = batches(frames)
        flood.node, flood.sequence = node, 1
        end = PacketBatch(node=node, sequence=2, link_type=LINKTYPE_ETHERNET, end_of_input=True)
        for message in (flood, end):
            await client.publish(packets_subject(node, 0), message.SerializeToString())
        await asyncio.wait_for(drained.wait(), 20)
        lines = dict(
            line.rsplit(" ", 1) for line in ctx.metrics.render().splitlines() if line.startswith("trawl_dissector_ip_")
        )
        assert lines["trawl_dissector_ip_fragments"] == "12"
        assert lines["trawl_dissector_ip_fragments_evicted"] == "7"
        assert lines["trawl_dissector_ip_fragments_empty"] == "1"
        assert lines["trawl_dissector_ip_fragments_duplicate"] == "1"
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
        await client.close()
