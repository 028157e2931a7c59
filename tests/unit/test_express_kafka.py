"""The compiled lane's Kafka part (_express_kafka.h) against the Python path (protocols/kafka.py):
the same packets must give the same calls (every field, ids included) and the same counters.

The conversations are Kafka as kafka-python writes it: every version of the 17 APIs Trawl reads,
built by kafka-python's own protocol classes with every field filled (the filler of
test_kafka_schemas), with request headers v1/v2 and response headers v0/v1 carrying tagged
fields, pipelined requests answered in any order, produce and fetch with record batches (plain
and compressed), over TCP segments cut at various sizes, in batches cut at random places, on the
Kafka port and elsewhere (found by content). Mixed in: what gives a flow back to Python mid-way
or must be made exactly as Python makes it: acks=0 produces (one way), SaslHandshake (raw tokens
may follow), unknown API keys and versions, a correlation id reused while pending, a response
nobody asked for, a body cut short, a frame beyond the body bound, impossible sizes, non-ASCII
topics, topic ids learnt from a Metadata response and used by a Fetch, a connection closed with
requests pending.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.record.memory_records import MemoryRecordsBuilder

from tests.conftest import FIXTURES, scaled
from tests.unit.dissector_builders import Conversation
from tests.unit.test_express_differential import Frames, assert_same, capture_frames
from tests.unit.test_kafka_schemas import CLASSES, TOPIC_ID, Filled, cases, fill
from trawl.dissector.protocols import kafka

# (api key, version) pairs kafka-python can build both ways.
PAIRS = sorted(
    {(api, version) for api, version, side in cases() if side == "request"}
    & {(api, version) for api, version, side in cases() if side == "response"}
)
TOPIC_ID_BYTES = TOPIC_ID.bytes


def body(api_key: int, version: int, side: str) -> bytes:
    cls = CLASSES[(api_key, side)][version]
    return bytes(cls(**fill(cls, cls.json["fields"], version, "", Filled())).encode(version=version))


def request_frame(api_key: int, version: int, correlation: int, payload: bytes, client_id: bytes = b"cli") -> bytes:
    header = struct.pack(">hhi", api_key, version, correlation)
    header_version = kafka.request_header_version(api_key, version)
    if header_version >= 1:
        header += struct.pack(">h", len(client_id)) + client_id
    if header_version == 2:
        header += b"\x00"  # no tagged field
    message = header + payload
    return struct.pack(">i", len(message)) + message


def response_frame(api_key: int, version: int, correlation: int, payload: bytes, tags: bytes = b"\x00") -> bytes:
    header = struct.pack(">i", correlation)
    if kafka.response_header_version(api_key, version) == 1:
        header += tags
    message = header + payload
    return struct.pack(">i", len(message)) + message


def batch(count: int, compression: int) -> bytes:
    builder = MemoryRecordsBuilder(magic=2, compression_type=compression, batch_size=1 << 16)
    for index in range(count):
        builder.append(timestamp=1_700_000_000_000 + index, key=b"k%d" % index, value=b"value %d" % index)
    builder.close()
    return bytes(builder.buffer())


def produce(version: int, acks: int, topic: str, records: bytes) -> bytes:
    cls = CLASSES[(0, "request")][version]
    topic_data = cls.TopicProduceData
    partition = topic_data.PartitionProduceData(index=1, records=records)
    named: dict[str, Any] = {"topic_id": TOPIC_ID} if version >= 13 else {"name": topic}
    return bytes(
        cls(
            transactional_id=None,
            acks=acks,
            timeout_ms=500,
            topic_data=[topic_data(partition_data=[partition], **named)],
        ).encode(version=version)
    )


def metadata_response_naming_the_topic_id(version: int, topic: str) -> bytes:
    """A Metadata response (v10+) that gives TOPIC_ID's name, as a broker answers."""
    cls = CLASSES[(3, "response")][version]
    topic_type = cls.MetadataResponseTopic
    return bytes(
        cls(
            throttle_time_ms=0,
            brokers=[],
            cluster_id="c",
            controller_id=1,
            topics=[topic_type(error_code=0, name=topic, topic_id=TOPIC_ID, is_internal=False, partitions=[])],
        ).encode(version=version)
    )


TOPICS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=20)


@st.composite
def exchange(draw: st.DrawFn, correlation: int) -> tuple[bytes, bytes | None, str]:
    """One request and its response (None: none comes), and what kind it is."""
    kind = draw(
        st.sampled_from(
            ["schema"] * 6
            + ["produce"] * 3
            + ["acks0", "sasl", "unknown_key", "unknown_version", "metadata_ids"]
            + ["short_body", "non_ascii", "huge", "bad_size", "orphan_response", "reuse"]
        )
    )
    if kind == "schema":
        api_key, version = draw(st.sampled_from(PAIRS))
        return (
            request_frame(api_key, version, correlation, body(api_key, version, "request")),
            response_frame(api_key, version, correlation, body(api_key, version, "response")),
            kind,
        )
    if kind in ("produce", "acks0", "non_ascii", "huge"):
        version = draw(st.integers(3, 13))
        topic = draw(TOPICS) if kind != "non_ascii" else "caf\u00e9-orders"
        size = 70_000 if kind == "huge" else draw(st.integers(1, 5))
        records = batch(size, draw(st.sampled_from([0, 0, 1])))  # none or gzip (no lz4 library here)
        acks = 0 if kind == "acks0" else draw(st.sampled_from([1, -1]))
        request = request_frame(0, version, correlation, produce(version, acks, topic, records))
        if acks == 0:
            return request, None, kind
        return request, response_frame(0, version, correlation, body(0, version, "response")), kind
    if kind == "sasl":
        version = draw(st.integers(0, 1))
        return (
            request_frame(17, version, correlation, body(17, version, "request")),
            response_frame(17, version, correlation, body(17, version, "response")),
            kind,
        )
    if kind == "unknown_key":
        return (
            request_frame(200, 0, correlation, b"\x01\x02\x03"),
            response_frame(200, 0, correlation, b"\x00\x00"),
            kind,
        )
    if kind == "unknown_version":
        return request_frame(1, 40, correlation, b"\x00" * 8), response_frame(1, 40, correlation, b"\x00" * 6), kind
    if kind == "metadata_ids":
        version = draw(st.integers(10, 12))
        topic = draw(TOPICS)
        metadata = request_frame(3, version, correlation, body(3, version, "request"))
        answer = response_frame(3, version, correlation, metadata_response_naming_the_topic_id(version, topic))
        return metadata, answer, kind
    if kind == "short_body":
        full = body(12, 2, "request")
        return (
            request_frame(12, 2, correlation, full[: len(full) // 2]),
            response_frame(12, 2, correlation, body(12, 2, "response")),
            kind,
        )
    if kind == "bad_size":
        return struct.pack(">i", -5) + b"\x00" * 8, None, kind
    if kind == "orphan_response":
        return b"", response_frame(12, 2, correlation + 5000, body(12, 2, "response")), kind
    # reuse: a request whose correlation id is that of one already pending (the previous one)
    return request_frame(12, 3, max(correlation - 1, 0), body(12, 3, "request")), None, kind


@st.composite
def kafka_traffic(draw: st.DrawFn) -> Frames:
    frames: Frames = []
    for index in range(draw(st.integers(1, 3))):
        port = draw(st.sampled_from([9092, 9092, 39601]))
        talk = Conversation(
            client=f"10.7.0.{index + 1}", server="10.8.0.1", client_port=44000 + index, server_port=port
        )
        talk.now += index * 5_000
        talk.handshake()
        segment = draw(st.sampled_from([5, 40, 300, 1400]))
        correlation = draw(st.integers(0, 3))
        first = True
        for _ in range(draw(st.integers(1, 6))):
            requests: list[bytes] = []
            answers: list[bytes] = []
            for _ in range(draw(st.integers(1, 4))):
                if first:
                    # The first request is an ordinary one whole in the first segment: detection's
                    # first chunk (a cut one is covered by the committed captures).
                    api_key, version = draw(st.sampled_from(PAIRS))
                    request = request_frame(api_key, version, correlation, body(api_key, version, "request"))
                    answer: bytes | None = response_frame(
                        api_key, version, correlation, body(api_key, version, "response")
                    )
                else:
                    request, answer, _kind = draw(exchange(correlation))
                first = False
                correlation += 1
                requests.append(request)
                if answer is not None:
                    answers.append(answer)
            if draw(st.booleans()):
                answers.reverse()  # brokers answer in order; the parser pairs by id whatever the order
            payload = b"".join(requests)
            if payload:
                talk.client_sends(payload, max(segment, len(requests[0])) if len(talk.frames) == 3 else segment)
            if answers and (draw(st.booleans()) or len(talk.frames) > 60):
                talk.server_sends(b"".join(answers), segment)
        if draw(st.booleans()):
            talk.close()
        frames += talk.frames
    frames.sort(key=lambda frame: frame[0])
    return frames


@given(traffic=kafka_traffic(), data=st.data())
@settings(
    max_examples=scaled(60), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
def test_generated_kafka_traffic_gives_the_same_calls(traffic: Frames, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(traffic)), max_size=6))
    assert_same(traffic, cuts=cuts)


def test_every_api_version_kafka_python_writes_is_made_by_the_lane() -> None:
    """Each of the 17 APIs, every version both sides of which kafka-python builds, on one
    connection: every call made in C (none given back before the end of input), identical to
    Python's."""
    talk = Conversation(client="10.7.1.1", server="10.8.0.1", client_port=44100, server_port=9092)
    talk.handshake()
    for correlation, (api_key, version) in enumerate(PAIRS):
        if api_key == kafka.SASL_HANDSHAKE:
            continue
        talk.client_sends(request_frame(api_key, version, correlation, body(api_key, version, "request")))
        talk.server_sends(response_frame(api_key, version, correlation, body(api_key, version, "response")))
    dissector = assert_same(talk.frames, cuts=range(17, len(talk.frames), 17))
    counters: dict[str, Any] = dissector.lane.counters  # type: ignore[union-attr]
    expected = sum(1 for api_key, _ in PAIRS if api_key != kafka.SASL_HANDSHAKE)
    assert expected > 130  # 145 with kafka-python 3.0.12
    assert counters["calls_kafka"] == expected
    assert counters["express_demotions"] == counters["express_demotions_finish"] == 1


def test_topic_ids_learnt_from_metadata_name_a_later_fetch_in_both_paths() -> None:
    """A Fetch v13 by topic id after the Metadata response that named the id, with a demotion
    (a SaslHandshake) in between: the handover carries the names learnt (KafkaState.topic_names)."""
    talk = Conversation(client="10.7.1.2", server="10.8.0.1", client_port=44101, server_port=9092)
    talk.handshake()
    talk.client_sends(request_frame(3, 12, 1, body(3, 12, "request")))
    talk.server_sends(response_frame(3, 12, 1, metadata_response_naming_the_topic_id(12, "payments")))
    talk.client_sends(request_frame(1, 13, 2, body(1, 13, "request")))
    talk.server_sends(response_frame(1, 13, 2, body(1, 13, "response")))
    talk.client_sends(request_frame(17, 1, 3, body(17, 1, "request")))
    talk.server_sends(response_frame(17, 1, 3, body(17, 1, "response")))
    talk.client_sends(request_frame(1, 13, 4, body(1, 13, "request")))
    talk.server_sends(response_frame(1, 13, 4, body(1, 13, "response")))
    dissector = assert_same(talk.frames)
    counters: dict[str, Any] = dissector.lane.counters  # type: ignore[union-attr]
    assert counters["calls_kafka"] == 2
    assert counters["express_demotions_kafka"] == 1


def test_recorded_kafka_python_captures_are_made_by_the_lane() -> None:
    """The committed recordings of the real kafka-python client (on ports other than 9092, so
    found by content): every call but those of the SASL connections made in C."""
    made = 0
    for name in ("kafka_flexible", "kafka_legacy"):
        frames, link_type = capture_frames(FIXTURES / "kafka" / f"{name}.pcap")
        dissector = assert_same(frames, cuts=range(5, len(frames), 9), link_type=link_type)
        counters: dict[str, Any] = dissector.lane.counters  # type: ignore[union-attr]
        demotions = {key for key, value in counters.items() if key.startswith("express_demotions_") and value}
        assert demotions <= {"express_demotions_finish"}
        made += counters["calls_kafka"]
    assert made == 69
