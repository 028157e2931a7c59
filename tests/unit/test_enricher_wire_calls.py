"""The enricher's byte readers (trawl.enricher.wire_calls) against protobuf's own parser."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trawl.bus import enriched_subject
from trawl.enricher.wire_calls import EnrichedSubjects, WireError, call_id, split_call_batch
from trawl.v1.calls_pb2 import ApiCall, CallBatch, Endpoint, Header, Message

text = st.text(max_size=40)
endpoints = st.builds(Endpoint, ip=text, port=st.integers(0, 65535), namespace=text, workload=text, pod=text)
calls = st.builds(
    ApiCall,
    id=st.text(max_size=200),
    protocol=st.sampled_from(["http", "dns", "grpc", "", "a.b c"]),
    node=text,
    src=endpoints,
    dst=endpoints,
    request=st.builds(
        Message, ts=st.integers(0, 2**63), headers=st.lists(st.builds(Header, name=text, value=text), max_size=3)
    ),
    path=text,
    shard=st.integers(0, 2**32 - 1),
)
batches = st.builds(
    CallBatch,
    node=text,
    shard=st.integers(0, 2**32 - 1),
    sequence=st.integers(0, 2**64 - 1),
    calls=st.lists(calls, max_size=5),
    end_of_input=st.booleans(),
    lost_packet_batches=st.integers(0, 2**64 - 1),
)


@settings(max_examples=300, deadline=None)
@given(batches)
def test_split_call_batch_reads_what_protobuf_reads(batch: CallBatch) -> None:
    parts = split_call_batch(batch.SerializeToString())
    assert (parts.node, parts.shard, parts.sequence) == (batch.node, batch.shard, batch.sequence)
    assert (parts.end_of_input, parts.lost_packet_batches) == (batch.end_of_input, batch.lost_packet_batches)
    assert [ApiCall.FromString(call) for call in parts.calls] == list(batch.calls)
    subjects = EnrichedSubjects()
    for call, encoded in zip(batch.calls, parts.calls, strict=True):
        assert call_id(encoded) == call.id
        expected = enriched_subject(call.protocol or "_", call.dst.namespace or "_", call.dst.workload or "_")
        assert subjects(encoded) == expected
        assert subjects(encoded) == expected  # remembered


def test_repeated_fields_and_damaged_calls() -> None:
    call = ApiCall(id="first", protocol="http", dst=Endpoint(namespace="a", workload="b"))
    later = ApiCall(id="second", dst=Endpoint(workload="c"))
    encoded = ApiCall(protocol="dns").SerializeToString() + call.SerializeToString() + later.SerializeToString()
    assert call_id(encoded) == ApiCall.FromString(encoded).id == "second"
    # protobuf would merge the two dst messages (namespace a, workload c); no serializer Trawl
    # runs writes a field twice or out of order, so the subject's walk stops at the first dst.
    assert EnrichedSubjects()(encoded) == enriched_subject("http", "a", "b")
    assert EnrichedSubjects()(b"\x12\x05ht") == enriched_subject("_", "_", "_")  # cut short: still a subject


@pytest.mark.parametrize(
    "damaged",
    [b"\x22\x05ab", b"\x22", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x07", b"\x00\x01"],
)
def test_a_damaged_batch_is_a_wire_error(damaged: bytes) -> None:
    with pytest.raises((WireError, IndexError)):
        split_call_batch(damaged)
