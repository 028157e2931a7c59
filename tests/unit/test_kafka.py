"""The Kafka parser on conversations built with kafka-python's encoders (pairing, acks=0,
flexible headers, unknown versions, SASL redaction, bounds, gaps, snapshot/restore, probe) and on
the recorded fixtures (tests/fixtures/kafka, the real kafka-python client and the stand-in
broker of tests/kafka_broker.py)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from kafka.protocol.consumer import FetchRequest, FetchResponse, HeartbeatRequest, HeartbeatResponse
from kafka.protocol.metadata import ApiVersionsRequest, ApiVersionsResponse, MetadataRequest
from kafka.protocol.producer import ProduceRequest, ProduceResponse
from kafka.protocol.sasl import (
    SaslAuthenticateRequest,
    SaslAuthenticateResponse,
    SaslHandshakeRequest,
    SaslHandshakeResponse,
)
from kafka.record.memory_records import MemoryRecordsBuilder

from tests.conftest import FIXTURES
from tests.unit.dissector_builders import dissect_capture
from trawl.dissector.protocols import kafka
from trawl.dissector.protocols.base import Direction, FlowInfo, NotAtBoundary, ParserLimits, ProtocolError
from trawl.dissector.protocols.registry import tcp_specs
from trawl.v1.calls_pb2 import ApiCall, Outcome

C2S, S2C = Direction.CLIENT_TO_SERVER, Direction.SERVER_TO_CLIENT
FLOW = FlowInfo("tcp", "10.0.0.1", 40000, "10.0.0.2", 9092, node="n1")
KAFKA = FIXTURES / "kafka"
PASSWORD = b"hunter2-kafka"


def records(count: int, compression: int = 0) -> bytes:
    builder = MemoryRecordsBuilder(magic=2, compression_type=compression, batch_size=1 << 16)
    for index in range(count):
        builder.append(timestamp=None, key=b"k%d" % index, value=b"v" * 20)
    builder.close()
    return bytes(builder.buffer())


def framed(message: Any, correlation_id: int, client_id: str = "cli") -> bytes:
    if message.is_request():
        message.with_header(correlation_id=correlation_id, client_id=client_id)
    else:
        message.with_header(correlation_id=correlation_id)
    return bytes(message.encode(header=True, framed=True))


def produce(version: int, acks: int, topic: str = "orders", batch: bytes | None = None) -> Any:
    request = ProduceRequest[version]
    partition = request.TopicProduceData.PartitionProduceData(index=2, records=batch or records(3))
    return request(
        transactional_id=None,
        acks=acks,
        timeout_ms=1000,
        topic_data=[request.TopicProduceData(name=topic, partition_data=[partition])],
    )


def produce_response(version: int, error: int = 0, topic: str = "orders") -> Any:
    response = ProduceResponse[version]
    partition = response.TopicProduceResponse.PartitionProduceResponse(index=2, error_code=error, base_offset=0)
    return response(responses=[response.TopicProduceResponse(name=topic, partition_responses=[partition])])


def heartbeat(version: int) -> Any:
    return HeartbeatRequest[version](group_id="billing", generation_id=1, member_id="m-1")


def heartbeat_response(version: int, error: int = 0) -> Any:
    return HeartbeatResponse[version](throttle_time_ms=0, error_code=error)


def parser(**limits: Any) -> kafka.KafkaParser:
    return kafka.KafkaParser(FLOW, ParserLimits(**limits))


def converse(chunks: list[tuple[Direction, bytes]], **limits: Any) -> tuple[list[ApiCall], kafka.KafkaParser]:
    state = parser(**limits)
    calls: list[ApiCall] = []
    for ts, (direction, data) in enumerate(chunks, start=1):
        calls += state.feed(direction, data, ts * 1000)
    return calls + state.finish(10**9), state


def test_request_and_response_pair_with_topics_partitions_records_and_status() -> None:
    calls, state = converse([(C2S, framed(produce(7, acks=1), 5)), (S2C, framed(produce_response(7, error=3), 5))])
    (call,) = calls
    assert (call.protocol, call.method, call.path, call.status) == (
        "kafka",
        "Produce",
        "orders",
        "UNKNOWN_TOPIC_OR_PARTITION",
    )
    assert call.outcome == Outcome.OUTCOME_ERROR
    detail = call.kafka
    assert (detail.api_key, detail.api_version, detail.correlation_id, detail.client_id) == (0, 7, 5, "cli")
    assert list(detail.topics) == ["orders"] and list(detail.partitions) == [2]
    assert (detail.error_code, detail.error_name, detail.acks) == (3, "UNKNOWN_TOPIC_OR_PARTITION", 1)
    assert (detail.record_count, detail.record_bytes, detail.compression) == (3, len(records(3)), "none")
    assert call.elapsed_ns == 1000 and call.request.size == len(framed(produce(7, acks=1), 5))
    assert state.counts == {}


def test_pipelined_requests_pair_by_correlation_id_whatever_the_order() -> None:
    requests = framed(heartbeat(3), 1) + framed(produce(8, acks=-1), 2) + framed(heartbeat(3), 3)
    responses = [
        framed(produce_response(8), 2),
        framed(heartbeat_response(3, error=27), 3),
        framed(heartbeat_response(3), 1),
    ]
    calls, _ = converse([(C2S, requests)] + [(S2C, response) for response in responses])
    assert [(call.kafka.correlation_id, call.method, call.status) for call in calls] == [
        (2, "Produce", "NONE"),
        (3, "Heartbeat", "REBALANCE_IN_PROGRESS"),
        (1, "Heartbeat", "NONE"),
    ]
    assert calls[2].path == "billing" and calls[2].kafka.group_id == "billing"


def test_acks_zero_is_a_one_way_message_reported_at_once() -> None:
    state = parser()
    (call,) = state.feed(C2S, framed(produce(9, acks=0), 7), 1000)
    assert call.method == "Produce" and list(call.notes) == ["one-way"]
    assert call.outcome == Outcome.OUTCOME_OK and not call.HasField("response") and call.status == ""
    assert call.kafka.acks == 0 and call.kafka.one_way and call.kafka.record_count == 3
    # Nothing waits for it: no timeout, and the next exchange pairs as usual.
    assert state.expire(10**15) == [] and state.snapshot().ordinal == 1
    state.feed(C2S, framed(heartbeat(4), 8), 2000)
    (next_call,) = state.feed(S2C, framed(heartbeat_response(4), 8), 3000)
    assert next_call.method == "Heartbeat" and next_call.status == "NONE"


def test_flexible_headers_with_tagged_fields_are_skipped() -> None:
    # Request header v2 and response header v1 carry tagged fields (KIP-482); the parser skips
    # them whatever they hold, as a broker skips unknown tags.
    request = framed(produce(9, acks=1), 11)
    tags = b"\x02\x00\x03abc\x05\x01z"  # two tagged fields: tag 0 (3 bytes), tag 5 (1 byte)
    header_end = 4 + 8 + 2 + len(b"cli")
    assert request[header_end] == 0  # kafka-python wrote an empty tag section
    request = request[:header_end] + tags + request[header_end + 1 :]
    request = struct.pack(">i", len(request) - 4) + request[4:]
    response = framed(produce_response(9), 11)
    response = response[:8] + tags + response[9:]
    response = struct.pack(">i", len(response) - 4) + response[4:]
    (call,) = converse([(C2S, request), (S2C, response)])[0]
    assert (call.path, call.status, call.kafka.record_count) == ("orders", "NONE", 3)
    assert "body-not-decoded" not in call.notes
    assert (kafka.request_header_version(0, 9), kafka.response_header_version(0, 9)) == (2, 1)
    assert (kafka.request_header_version(0, 8), kafka.response_header_version(0, 8)) == (1, 0)


def test_api_versions_responses_always_use_response_header_v0() -> None:
    request = framed(ApiVersionsRequest[3](client_software_name="trawl", client_software_version="1"), 1)
    item = ApiVersionsResponse[3].ApiVersion(api_key=0, min_version=0, max_version=9)
    message = ApiVersionsResponse[3](error_code=0, api_keys=[item], throttle_time_ms=0)
    body = bytes(message.encode(version=3))
    response = framed(message, 1)
    assert response[8:] == body  # no tag byte after the correlation id
    (call,) = converse([(C2S, request), (S2C, response)])[0]
    assert (call.method, call.status, call.kafka.api_version) == ("ApiVersions", "NONE", 3)
    assert "body-not-decoded" not in call.notes
    assert kafka.response_header_version(18, 3) == 0 and kafka.request_header_version(18, 3) == 2
    assert kafka.request_header_version(7, 0) == 0  # ControlledShutdown v0: no client id


def test_unknown_versions_and_api_keys_are_paired_and_named_with_a_note() -> None:
    newest = kafka.APIS[0][1]
    future = bytearray(framed(produce(9, acks=1), 21))
    struct.pack_into(">h", future, 6, newest + 1)  # a Produce version newer than the table
    unknown = struct.pack(">hhih", 99, 0, 22, 3) + b"cli" + b"\x00opaque"
    unknown = struct.pack(">i", len(unknown)) + unknown
    calls, state = converse(
        [
            (C2S, bytes(future) + unknown),
            (S2C, framed(produce_response(9), 21)),
            (S2C, struct.pack(">ii", 8, 22) + b"\x00\x00\x00\x00"),
        ]
    )
    assert [(call.method, call.kafka.api_version, list(call.notes), call.status) for call in calls] == [
        ("Produce", newest + 1, ["unknown-version"], ""),
        ("ApiKey99", 0, ["unknown-api-key"], ""),
    ]
    assert all(call.outcome == Outcome.OUTCOME_OK and call.HasField("response") for call in calls)
    assert state.counts == {}


def sasl_login(password: bytes) -> list[tuple[Direction, bytes]]:
    token = b"\x00trawl-user\x00" + password
    failed = SaslAuthenticateResponse[2](
        error_code=58, error_message="bad password", auth_bytes=b"", session_lifetime_ms=0
    )
    return [
        (C2S, framed(SaslHandshakeRequest[1](mechanism="PLAIN"), 1)),
        (S2C, framed(SaslHandshakeResponse[1](error_code=0, mechanisms=["PLAIN"]), 1)),
        (C2S, framed(SaslAuthenticateRequest[2](auth_bytes=token), 2)),
        (S2C, framed(failed, 2)),
    ]


def test_sasl_plain_credentials_never_reach_a_call() -> None:
    calls, _ = converse(sasl_login(PASSWORD))
    assert [(call.method, call.status) for call in calls] == [
        ("SaslHandshake", "NONE"),
        ("SaslAuthenticate", "SASL_AUTHENTICATION_FAILED"),
    ]
    assert calls[0].kafka.sasl_mechanism == "PLAIN"
    for call in calls:
        wire = call.SerializeToString()
        assert PASSWORD not in wire and b"trawl-user" not in wire


def test_raw_sasl_tokens_after_a_v0_handshake_are_skipped_and_counted() -> None:
    # SaslHandshake v0: the SASL tokens that follow are size-prefixed but not Kafka requests.
    token = b"\x00trawl-user\x00" + PASSWORD
    calls, state = converse(
        [
            (C2S, framed(SaslHandshakeRequest[0](mechanism="PLAIN"), 1)),
            (S2C, framed(SaslHandshakeResponse[0](error_code=0, mechanisms=["PLAIN"]), 1)),
            (C2S, struct.pack(">i", len(token)) + token),
            (S2C, struct.pack(">i", 0)),
            (C2S, framed(heartbeat(1), 2)),
            (S2C, framed(heartbeat_response(1), 2)),
        ]
    )
    assert [call.method for call in calls] == ["SaslHandshake", "Heartbeat"]
    assert state.counts == {"kafka_sasl_tokens": 2}
    assert all(PASSWORD not in call.SerializeToString() for call in calls)


def test_pending_requests_are_bounded_and_the_oldest_reported() -> None:
    requests = b"".join(framed(heartbeat(2), index) for index in range(1, 5))
    calls, state = converse([(C2S, requests), (S2C, framed(heartbeat_response(2), 4))], max_pending_requests=2)
    assert [(call.kafka.correlation_id, list(call.notes), call.outcome) for call in calls] == [
        (1, ["pending-limit"], Outcome.OUTCOME_NO_RESPONSE),
        (2, ["pending-limit"], Outcome.OUTCOME_NO_RESPONSE),
        (4, [], Outcome.OUTCOME_OK),
        (3, [], Outcome.OUTCOME_NO_RESPONSE),
    ]
    assert state.counts == {"kafka_pending_limit": 2}


def test_a_frame_beyond_the_bound_keeps_its_head_and_skips_the_rest() -> None:
    big = framed(produce(9, acks=1, batch=records(40)), 31)
    assert len(big) > 1024
    chunks = [(C2S, big[index : index + 100]) for index in range(0, len(big), 100)]
    chunks += [
        (S2C, framed(produce_response(9), 31)),
        (C2S, framed(heartbeat(4), 32)),
        (S2C, framed(heartbeat_response(4), 32)),
    ]
    calls, state = converse(chunks, max_body_bytes=512)
    produce_call, heartbeat_call = calls
    assert (produce_call.method, produce_call.path, produce_call.status) == ("Produce", "orders", "NONE")
    assert "truncated" in produce_call.notes and produce_call.request.size == len(big)
    assert heartbeat_call.status == "NONE"
    assert state.counts == {"kafka_frames_truncated": 1}


def test_malformed_frames_are_counted_and_skipped_and_impossible_sizes_raise() -> None:
    calls, state = converse(
        [
            (C2S, struct.pack(">i", 3) + b"abc" + framed(heartbeat(0), 1)),
            (S2C, struct.pack(">i", 2) + b"zz" + framed(heartbeat_response(0), 9) + framed(heartbeat_response(0), 1)),
        ]
    )
    assert [call.method for call in calls] == ["Heartbeat"]
    assert state.counts == {"kafka_malformed_frames": 2, "kafka_unmatched_responses": 1}
    with pytest.raises(ProtocolError):
        parser().feed(C2S, struct.pack(">i", -5) + b"x" * 8, 1)
    with pytest.raises(ProtocolError):
        parser().feed(S2C, struct.pack(">i", kafka.MAX_FRAME_SIZE + 1), 1)


def test_a_body_that_does_not_match_its_layout_keeps_the_header_facts() -> None:
    request = framed(produce(9, acks=1), 41)
    cut = request[:-30]
    cut = struct.pack(">i", len(cut) - 4) + cut[4:]
    calls, _ = converse([(C2S, cut), (S2C, framed(produce_response(9), 41))])
    (call,) = calls
    assert (call.method, call.kafka.correlation_id, call.status) == ("Produce", 41, "NONE")
    assert "body-not-decoded" in call.notes


def test_gap_resynchronises_at_the_next_frame() -> None:
    state = parser()
    state.feed(C2S, framed(heartbeat(4), 1), 1)
    response = framed(heartbeat_response(4), 1)
    assert state.gap(S2C, 10, 2) == []
    assert state.feed(S2C, response[10:], 3) == []  # the rest of a frame whose start was lost
    state.feed(C2S, framed(heartbeat(4), 2), 4)
    (call,) = state.feed(S2C, framed(heartbeat_response(4), 2), 5)
    assert call.kafka.correlation_id == 2
    (lost,) = state.finish(6)
    assert lost.kafka.correlation_id == 1 and "capture-gap" in lost.notes


def test_snapshot_and_restore_continue_as_the_original_would() -> None:
    metadata = MetadataRequest[12](topics=[MetadataRequest[12].MetadataRequestTopic(name="orders")])
    first = [(C2S, framed(metadata, 1))]
    rest = [(C2S, framed(heartbeat(4), 2)), (S2C, framed(heartbeat_response(4), 2))]
    original = parser()
    original.feed(*first[0], 1)
    with pytest.raises(NotAtBoundary):
        original.snapshot()
    original.finish(2)
    original = parser()
    original.feed(C2S, framed(heartbeat(4), 1), 1)
    original.feed(S2C, framed(heartbeat_response(4), 1), 2)
    state = original.snapshot()
    assert state == kafka.KafkaState(ordinal=1)
    restored = parser()
    restored.restore(state)
    calls_a = [call for ts, (d, data) in enumerate(rest, 3) for call in original.feed(d, data, ts)]
    calls_b = [call for ts, (d, data) in enumerate(rest, 3) for call in restored.feed(d, data, ts)]
    assert [call.SerializeToString() for call in calls_a] == [call.SerializeToString() for call in calls_b]
    half = parser()
    half.feed(C2S, framed(heartbeat(4), 1)[:5], 1)
    with pytest.raises(NotAtBoundary):
        half.snapshot()


def test_fetch_by_topic_id_is_named_from_a_metadata_response_seen_before() -> None:
    topic_id = "6f1c0d2e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
    state = parser()
    state.restore(kafka.KafkaState(ordinal=0, topic_names=((topic_id, "orders"),)))
    request = FetchRequest[13]
    wanted = request.FetchTopic(
        topic_id=topic_id, partitions=[request.FetchTopic.FetchPartition(partition=1, fetch_offset=0)]
    )
    state.feed(C2S, framed(request(max_wait_ms=1, min_bytes=1, topics=[wanted]), 3), 1)
    response = FetchResponse[13]
    partition = response.FetchableTopicResponse.PartitionData(partition_index=1, error_code=0, records=records(2))
    body = response(
        error_code=0, responses=[response.FetchableTopicResponse(topic_id=topic_id, partitions=[partition])]
    )
    (call,) = state.feed(S2C, framed(body, 3), 2)
    assert (call.method, call.path, call.kafka.record_count) == ("Fetch", "orders", 2)


def test_probe_is_content_first_with_the_port_as_a_hint() -> None:
    request = framed(heartbeat(4), 7)
    other_port = FlowInfo("tcp", "10.0.0.1", 40000, "10.0.0.2", 31000)
    assert kafka.probe(request[:14], b"", FLOW) == 3
    assert kafka.probe(request[:14], b"", other_port) == 2
    assert kafka.probe(request[:14], framed(heartbeat_response(4), 7)[:8], other_port) == 3
    assert kafka.probe(b"GET / HTTP/1.1\r\n", b"", FLOW) == 0
    assert kafka.probe(b"", b"", FLOW) == 1 and kafka.probe(b"", b"", other_port) == 0
    # A capture that began mid-connection, with only the broker's frames so far.
    assert kafka.probe(b"", framed(heartbeat_response(4), 7) * 2, FLOW) == 3
    assert kafka.SPEC in tcp_specs()


# -- the recorded fixtures ----------------------------------------------------------------------


def kafka_calls(name: str) -> tuple[list[ApiCall], dict[str, int]]:
    calls, engine = dissect_capture(KAFKA / f"{name}.pcap")
    return [call for call in calls if call.protocol == "kafka"], engine.counters


def test_flexible_fixture_every_api_of_producers_consumer_group_and_admin() -> None:
    calls, counters = kafka_calls("kafka_flexible")
    methods = {call.method for call in calls}
    assert methods >= {
        "ApiVersions",
        "Metadata",
        "Produce",
        "InitProducerId",
        "FindCoordinator",
        "JoinGroup",
        "SyncGroup",
        "Heartbeat",
        "OffsetFetch",
        "ListOffsets",
        "Fetch",
        "OffsetCommit",
        "LeaveGroup",
        "CreateTopics",
        "DeleteTopics",
    }
    produces = [call for call in calls if call.method == "Produce"]
    assert sorted((call.kafka.acks, list(call.notes)) for call in produces) == [(-1, []), (0, ["one-way"]), (1, [])]
    assert {call.kafka.api_version for call in produces} == {9}
    fetched = sum(call.kafka.record_count for call in calls if call.method == "Fetch")
    assert fetched == 6 and sum(call.kafka.record_count for call in produces) == 6
    errors = {(call.method, call.status) for call in calls if call.outcome == Outcome.OUTCOME_ERROR}
    assert errors == {
        ("JoinGroup", "MEMBER_ID_REQUIRED"),
        ("Metadata", "TOPIC_AUTHORIZATION_FAILED"),
        ("CreateTopics", "TOPIC_ALREADY_EXISTS"),
    }
    assert not any(call.outcome == Outcome.OUTCOME_NO_RESPONSE for call in calls)
    assert not any(note in call.notes for call in calls for note in ("body-not-decoded", "unknown-version"))
    assert counters["tcp_flows_kafka"] == counters["tcp_flows"]
    assert not any(name.startswith("kafka_") for name in counters)


def test_legacy_fixture_non_flexible_versions_and_gzip_batches() -> None:
    calls, counters = kafka_calls("kafka_legacy")
    assert not any(name.startswith("kafka_") for name in counters)
    versions = {(call.method, call.kafka.api_version) for call in calls}
    assert {("Produce", 5), ("Fetch", 6), ("Metadata", 5), ("JoinGroup", 2), ("OffsetCommit", 3)} <= versions
    assert all(not kafka.flexible(call.kafka.api_key, call.kafka.api_version) for call in calls)
    (gzip,) = [call for call in calls if call.method == "Produce" and call.kafka.acks == 1]
    assert (gzip.kafka.compression, gzip.kafka.record_count) == ("gzip", 3)
    (fetch,) = [call for call in calls if call.method == "Fetch"]
    assert (fetch.kafka.compression, fetch.kafka.record_count) == ("gzip,none", 4)
    assert all(call.status == "NONE" for call in calls if call.HasField("response"))


def test_sasl_fixture_publishes_no_credential() -> None:
    calls, _ = kafka_calls("kafka_sasl")
    logins = [(call.method, call.status) for call in calls if call.method.startswith("Sasl")]
    assert logins.count(("SaslAuthenticate", "SASL_AUTHENTICATION_FAILED")) == 1
    assert logins.count(("SaslAuthenticate", "NONE")) >= 1
    raw = Path(KAFKA / "kafka_sasl.pcap").read_bytes()
    assert b"s3cret-kafka-password" in raw and b"wrong-password" in raw  # on the wire, as sent
    for call in calls:
        wire = call.SerializeToString()
        assert b"s3cret-kafka-password" not in wire and b"wrong-password" not in wire
