"""Property tests of the link/IP decoders and TCP reassembly: arbitrary frames never raise, and a
conversation's segments in any order, duplicated or re-cut, give the same calls."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import scaled
from tests.unit.dissector_builders import Conversation, batch, ethernet, ip_packet, tcp_segment
from tests.unit.dissector_builders import settings as dissector_settings
from trawl.dissector.engine import Dissector
from trawl.dissector.layers import PacketDecoder
from trawl.pcap import (
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    pack_record,
)
from trawl.v1.packets_pb2 import PacketBatch

FUZZ = settings(max_examples=scaled(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
LINK_TYPES = [LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, LINKTYPE_NULL, LINKTYPE_LOOP, LINKTYPE_RAW]


@FUZZ
@given(st.sampled_from(LINK_TYPES), st.binary(max_size=200))
def test_decoder_never_raises(link_type: int, frame: bytes) -> None:
    PacketDecoder().decode(link_type, frame, 0)


def _mutated_frames() -> st.SearchStrategy[bytes]:
    """Real headers with random damage: more interesting than uniform noise."""
    base = ethernet(
        ip_packet("10.0.0.1", "10.0.0.2", 6, tcp_segment("10.0.0.1", "10.0.0.2", 1, 80, 5, 0, "PA", b"GET /"))
    )
    return st.tuples(st.integers(0, len(base) - 1), st.binary(min_size=1, max_size=8), st.integers(0, len(base))).map(
        lambda cut: (base[: cut[0]] + cut[1] + base[cut[0] + len(cut[1]) :])[: max(cut[2], 14)]
    )


@FUZZ
@given(
    st.lists(
        st.sampled_from(LINK_TYPES).flatmap(lambda lt: st.tuples(st.just(lt), st.binary(max_size=120))), max_size=20
    )
)
def test_engine_never_raises_on_arbitrary_frames(frames: list[tuple[int, bytes]]) -> None:
    engine = Dissector(dissector_settings(), "n1")
    for index, (link_type, frame) in enumerate(frames):
        engine.feed(batch([(index, frame)], link_type))
    engine.finish()


@FUZZ
@given(st.lists(_mutated_frames(), max_size=20))
def test_engine_never_raises_on_damaged_tcp(frames: list[bytes]) -> None:
    engine = Dissector(dissector_settings(), "n1")
    engine.feed(batch([(index, frame) for index, frame in enumerate(frames)]))
    engine.finish()
    assert engine.counters["tcp_buffered_bytes"] == 0


@FUZZ
@given(st.binary(max_size=100))
def test_truncated_batches_are_counted(records: bytes) -> None:
    engine = Dissector(dissector_settings(), "n1")
    engine.feed(PacketBatch(node="n1", link_type=1, records=pack_record(1, b"\x00" * 20) + records))


REQUESTS = b"".join(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in range(3))
BODIES = [bytes([65 + i]) * (300 * (i + 1)) for i in range(3)]
RESPONSES = b"".join(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body) for body in BODIES)


def _reference() -> list[tuple[str, str, str, bytes]]:
    conversation = Conversation().handshake().client_sends(REQUESTS).server_sends(RESPONSES).close()
    return _calls(conversation.frames)


def _calls(frames: list[tuple[int, bytes]]) -> list[tuple[str, str, str, bytes]]:
    engine = Dissector(dissector_settings(), "n1")
    calls = engine.feed(batch(frames)) + engine.finish()
    assert engine.counters["tcp_buffered_bytes"] == 0
    return [(c.method, c.path, c.status, c.response.body) for c in calls if c.protocol == "http"]


@FUZZ
@given(
    # Shrinks towards few big segments (401 - n), yet reaches 1-byte ones.
    st.lists(st.integers(min_value=0, max_value=399).map(lambda n: 400 - n), min_size=1, max_size=30),
    st.randoms(use_true_random=False),
    st.lists(st.integers(min_value=0, max_value=200), max_size=5),
)
def test_reordered_duplicated_recut_segments_give_the_same_calls(
    cuts: list[int], shuffler: object, duplicates: list[int]
) -> None:
    conversation = Conversation().handshake().client_sends(REQUESTS)
    start = conversation.server_next
    segments = []
    offset = 0
    index = 0
    while offset < len(RESPONSES):
        size = cuts[index % len(cuts)]
        segments.append((start + offset, RESPONSES[offset : offset + size]))
        offset += size
        index += 1
    # Retransmissions that re-cut the stream differently (same bytes, other boundaries).
    for dup in duplicates:
        low = dup * 7 % len(RESPONSES)
        segments.append((start + low, RESPONSES[low : low + 500]))
    shuffler.shuffle(segments)  # type: ignore[attr-defined]
    for seq, data in segments:
        conversation.raw(False, seq, conversation.client_next, "PA", data)
    conversation.server_next = start + len(RESPONSES)
    conversation.close()
    assert _calls(conversation.frames) == _reference()
