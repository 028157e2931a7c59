"""Property tests of the Kafka parser: garbage, random frames and mutated real messages give calls
or ProtocolError and nothing else, with pending requests and buffers bounded; a conversation built
by kafka-python's encoders cut anywhere gives the same calls and counts; every request frame that
reads as one becomes exactly one call; `restore(snapshot())` at any exchange boundary continues
exactly as the uninterrupted parser (base.Snapshotting), and no state is given mid-exchange."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.protocol.consumer import FetchRequest, FetchResponse, HeartbeatRequest, HeartbeatResponse
from kafka.protocol.metadata import MetadataRequest, MetadataResponse
from kafka.protocol.producer import ProduceRequest, ProduceResponse
from kafka.protocol.sasl import SaslAuthenticateRequest, SaslAuthenticateResponse
from kafka.record.memory_records import MemoryRecordsBuilder

from tests.conftest import scaled
from trawl.dissector.protocols.base import Direction, FlowInfo, NotAtBoundary, ParserLimits, ProtocolError
from trawl.dissector.protocols.kafka import KafkaParser
from trawl.v1.calls_pb2 import ApiCall

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT
FLOW = FlowInfo("tcp", "10.0.0.1", 40000, "10.0.0.2", 9092)
LIMITS = ParserLimits(max_body_bytes=400, max_pending_requests=4)
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
T0 = 1_700_000_000_000_000_000


def _framed(message: object, correlation_id: int) -> bytes:
    if message.is_request():  # type: ignore[attr-defined]
        message.with_header(correlation_id=correlation_id, client_id="fuzz")  # type: ignore[attr-defined]
    else:
        message.with_header(correlation_id=correlation_id)  # type: ignore[attr-defined]
    return bytes(message.encode(header=True, framed=True))  # type: ignore[attr-defined]


def _records(count: int) -> bytes:
    builder = MemoryRecordsBuilder(magic=2, compression_type=0, batch_size=1 << 16)
    for index in range(count):
        builder.append(timestamp=None, key=b"k", value=b"value %d" % index)
    builder.close()
    return bytes(builder.buffer())


def _conversation() -> list[tuple[Direction, bytes]]:
    """Produce (acks 1 and 0), Metadata, Fetch, Heartbeat, SaslAuthenticate, in several versions,
    one request pipelined ahead and one response too big for LIMITS."""
    chunks: list[tuple[Direction, bytes]] = []
    for version in (3, 9):
        produce = ProduceRequest[version]
        partition = produce.TopicProduceData.PartitionProduceData(index=1, records=_records(3))
        for acks, correlation_id in ((1, 10 + version), (0, 20 + version)):
            request = produce(
                acks=acks, timeout_ms=5, topic_data=[produce.TopicProduceData(name="t", partition_data=[partition])]
            )
            chunks.append((C2S, _framed(request, correlation_id)))
        answer = ProduceResponse[version]
        part = answer.TopicProduceResponse.PartitionProduceResponse(index=1, error_code=6)
        chunks.append(
            (
                S2C,
                _framed(
                    answer(responses=[answer.TopicProduceResponse(name="t", partition_responses=[part])]), 10 + version
                ),
            )
        )
    for version in (1, 12):
        chunks.append(
            (
                C2S,
                _framed(
                    MetadataRequest[version](topics=[MetadataRequest[version].MetadataRequestTopic(name="t")]),
                    30 + version,
                ),
            )
        )
        chunks.append(
            (
                C2S,
                _framed(HeartbeatRequest[min(version, 4)](group_id="g", generation_id=1, member_id="m"), 40 + version),
            )
        )
        topic = MetadataResponse[version].MetadataResponseTopic(error_code=0, name="t", partitions=[])
        chunks.append((S2C, _framed(MetadataResponse[version](brokers=[], topics=[topic]), 30 + version)))
        chunks.append((S2C, _framed(HeartbeatResponse[min(version, 4)](error_code=27), 40 + version)))
    fetch = FetchRequest[12]
    wanted = fetch.FetchTopic(topic="t", partitions=[fetch.FetchTopic.FetchPartition(partition=1, fetch_offset=0)])
    chunks.append((C2S, _framed(fetch(max_wait_ms=1, min_bytes=1, topics=[wanted]), 50)))
    answer = FetchResponse[12]
    data = answer.FetchableTopicResponse.PartitionData(partition_index=1, error_code=0, records=_records(30))
    chunks.append(
        (
            S2C,
            _framed(answer(error_code=0, responses=[answer.FetchableTopicResponse(topic="t", partitions=[data])]), 50),
        )
    )
    chunks.append((C2S, _framed(SaslAuthenticateRequest[2](auth_bytes=b"\x00u\x00secret"), 60)))
    chunks.append((S2C, _framed(SaslAuthenticateResponse[2](error_code=58, error_message="no"), 60)))
    return chunks  # fmt: skip


CONVERSATION = _conversation()
FRAMES = [data for _direction, data in CONVERSATION]


def _drive(steps: list[tuple[Direction, bytes]], gaps: list[int]) -> tuple[list[ApiCall], KafkaParser]:
    parser = KafkaParser(FLOW, LIMITS)
    calls: list[ApiCall] = []
    try:
        for index, (direction, data) in enumerate(steps):
            calls += parser.feed(direction, data, T0 + index)
            if index < len(gaps) and gaps[index]:
                calls += parser.gap(direction, gaps[index], T0 + index)
            _check_bounds(parser)
        calls += parser.expire(T0 + 10**12)
    except ProtocolError:
        pass
    calls += parser.finish(T0 + 10**12)
    for call in calls:
        assert call.protocol == "kafka" and call.method
        assert b"secret" not in call.SerializeToString()
    return calls, parser


def _check_bounds(parser: KafkaParser) -> None:
    assert len(parser._pending) <= LIMITS.max_pending_requests
    for side in parser._sides:
        assert len(side.buffer) <= LIMITS.max_body_bytes + 4


def _mutate(frame: bytes, position: int, value: int) -> bytes:
    mutated = bytearray(frame)
    mutated[position % len(mutated)] = value
    return bytes(mutated)


frames = st.one_of(
    st.sampled_from(FRAMES),
    st.builds(_mutate, st.sampled_from(FRAMES), st.integers(4, 400), st.integers(0, 255)),
    st.builds(lambda body: struct.pack(">i", len(body)) + body, st.binary(max_size=60)),
    st.builds(
        lambda key, version, correlation, body: struct.pack(">ihhih", 10 + len(body), key, version, correlation, -1)
        + body,
        st.integers(-2, 100), st.integers(-1, 20), st.integers(-2, 70), st.binary(max_size=50),
    ),
)  # fmt: skip


@settings(FUZZ, max_examples=scaled(200))
@given(st.lists(st.tuples(st.sampled_from([C2S, S2C]), st.binary(max_size=200)), max_size=10))
def test_garbage_gives_calls_or_protocol_error(steps: list[tuple[Direction, bytes]]) -> None:
    _drive(steps, [])


@settings(FUZZ, max_examples=scaled(400))
@given(
    st.lists(st.tuples(st.sampled_from([C2S, S2C]), st.lists(frames, max_size=5).map(b"".join)), max_size=12),
    st.lists(st.integers(min_value=0, max_value=60), max_size=12),
)
def test_random_and_mutated_frames_give_calls_or_protocol_error(
    steps: list[tuple[Direction, bytes]], gaps: list[int]
) -> None:
    _drive(steps, gaps)


def _feed_pieces(pieces: list[tuple[Direction, bytes]]) -> tuple[list[bytes], dict[str, int]]:
    parser = KafkaParser(FLOW, LIMITS)
    calls: list[ApiCall] = []
    for direction, data in pieces:
        calls += parser.feed(direction, data, T0)
    calls += parser.finish(T0)
    return [call.SerializeToString() for call in calls], parser.counts


WHOLE = _feed_pieces(CONVERSATION)


@settings(FUZZ, max_examples=scaled(200))
@given(st.lists(st.integers(min_value=0, max_value=2000), max_size=40))
def test_chunking_does_not_change_the_calls(cuts: list[int]) -> None:
    pieces: list[tuple[Direction, bytes]] = []
    for direction, data in CONVERSATION:
        points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
        pieces += [(direction, data[start:end]) for start, end in itertools.pairwise(points) if end > start]
    assert _feed_pieces(pieces) == WHOLE


def test_the_conversation_gives_its_calls() -> None:
    calls = [ApiCall.FromString(data) for data in WHOLE[0]]
    requests = sum(1 for direction, _data in CONVERSATION if direction is C2S)
    assert len(calls) == requests == 10
    assert WHOLE[1] == {"kafka_frames_truncated": 1}  # the Fetch response, beyond max_body_bytes
    assert sorted(call.status for call in calls if call.method == "Produce") == [
        "",
        "",
        "NOT_LEADER_OR_FOLLOWER",
        "NOT_LEADER_OR_FOLLOWER",
    ]


@settings(FUZZ, max_examples=scaled(200))
@given(st.lists(st.sampled_from(FRAMES), max_size=12), st.lists(st.integers(min_value=0, max_value=300), max_size=12))
def test_every_request_frame_becomes_one_call(picked: list[bytes], cuts: list[int]) -> None:
    requests = [frame for frame in picked if any(frame is data for direction, data in CONVERSATION if direction is C2S)]
    pieces = []
    stream = b"".join(requests)
    points = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    pieces = [(C2S, stream[start:end]) for start, end in itertools.pairwise(points) if end > start]
    parser = KafkaParser(FLOW, ParserLimits(max_body_bytes=400, max_pending_requests=64))
    calls: list[ApiCall] = []
    for direction, data in pieces:
        calls += parser.feed(direction, data, T0)
    calls += parser.finish(T0)
    assert len(calls) == len(requests)
    reused = len(requests) - len({frame for frame in requests})
    assert sum("correlation-id-reused" in call.notes for call in calls) <= reused


def _exchanges() -> list[list[tuple[Direction, bytes]]]:
    """Exchanges that leave nothing pending: a request and its response, or a one-way produce."""
    found: list[list[tuple[Direction, bytes]]] = []
    answers = {data[4:8]: data for direction, data in CONVERSATION if direction is S2C}
    for direction, data in CONVERSATION:
        if direction is not C2S:
            continue
        answer = answers.get(data[8:12])
        found.append([(C2S, data)] if answer is None else [(C2S, data), (S2C, answer)])
    return found


EXCHANGES = _exchanges()


@settings(FUZZ, max_examples=scaled(200))
@given(st.lists(st.integers(0, len(EXCHANGES) - 1), min_size=1, max_size=10), st.data())
def test_restore_at_an_exchange_boundary_continues_as_the_original(picked: list[int], data: st.DataObject) -> None:
    steps = [EXCHANGES[index] for index in picked]
    cut = data.draw(st.integers(0, len(steps)))
    original = KafkaParser(FLOW, LIMITS)
    before = [
        call
        for exchange in steps[:cut]
        for direction, chunk in exchange
        for call in original.feed(direction, chunk, T0)
    ]
    state = original.snapshot()
    restored = KafkaParser(FLOW, LIMITS)
    restored.restore(state)
    rest = [(direction, chunk) for exchange in steps[cut:] for direction, chunk in exchange]
    calls_a = [
        call.SerializeToString() for direction, chunk in rest for call in original.feed(direction, chunk, T0 + 1)
    ]
    calls_b = [
        call.SerializeToString() for direction, chunk in rest for call in restored.feed(direction, chunk, T0 + 1)
    ]
    assert calls_a == calls_b
    assert len(before) + len(calls_a) == len(steps)
    if rest:
        # In the middle of an exchange (a frame half read, or a request pending) there is no state.
        half = KafkaParser(FLOW, LIMITS)
        direction, chunk = rest[0]
        half.feed(direction, chunk[: data.draw(st.integers(1, len(chunk)))], T0)
        if half._pending or any(side.buffer or side.skip for side in half._sides):
            with pytest.raises(NotAtBoundary):
                half.snapshot()
