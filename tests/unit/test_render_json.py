"""`call_to_json` is protobuf's JSON mapping (proto field names), byte for byte: checked against
json_format on the calls of every fixture capture and on generated calls of every shape, for
both encoders (the compiled one, trawl/_calljson.c, and the Python one it falls back to)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import FIXTURES, scaled
from tests.unit.dissector_builders import dissect_capture
from trawl import render
from trawl.render import call_to_json
from trawl.v1.calls_pb2 import ApiCall, Outcome

ENCODERS: dict[str, Callable[[ApiCall], str]] = {"default": call_to_json, "python": render._message_json}
encoders = pytest.mark.parametrize("encode", list(ENCODERS.values()), ids=list(ENCODERS))


def reference(call: ApiCall) -> str:
    return json.dumps(json_format.MessageToDict(call, preserving_proto_field_name=True), separators=(",", ":"))


def fixture_calls() -> list[ApiCall]:
    return [call for path in sorted(FIXTURES.rglob("*.pcap")) for call in dissect_capture(path)[0]]


@encoders
def test_fixture_calls_encode_as_json_format_does(encode: Callable[[ApiCall], str]) -> None:
    calls = fixture_calls()
    assert len(calls) > 50  # the fixtures hold HTTP, DNS, TLS, ICMP and TCP calls
    for call in calls:
        assert encode(call) == reference(call), call.id


def test_the_compiled_encoder_takes_every_fixture_call_and_leaves_maps_to_python() -> None:
    assert render._NATIVE is not None
    for call in fixture_calls():
        # AMQP calls carry AmqpDetail.properties, a map: those go to the Python encoder (below).
        has_map = call.HasField("amqp") and bool(call.amqp.properties)
        assert (render._NATIVE.encode(call.SerializeToString()) is None) == has_map, call.id
    call = ApiCall(id="a")
    call.amqp.properties["k"] = "v"  # map order is the Python encoder's business
    assert render._NATIVE.encode(call.SerializeToString()) is None
    assert call_to_json(call) == reference(call)


@encoders
def test_defaults_are_omitted_and_types_mapped(encode: Callable[[ApiCall], str]) -> None:
    call = ApiCall(id="a", elapsed_ns=2**63 + 5, outcome=Outcome.OUTCOME_NO_RESPONSE, shard=7)
    call.request.body = b"\x00\xffsecret?"
    call.request.headers.add(name="X", value="")
    call.src.SetInParent()
    call.outcome = 9  # type: ignore[assignment]  # an open enum keeps values it has no name for
    call.notes.extend(["caf\u00e9 \U0001f600", 'quote " backslash \\ tab \t nul \x00 del \x7f'])
    call.kafka.partitions.extend([-1, 0, 2**31 - 1])
    encoded = json.loads(encode(call))
    assert encoded == {
        "id": "a",
        "src": {},
        "request": {"headers": [{"name": "X"}], "body": "AP9zZWNyZXQ/"},
        "elapsed_ns": str(2**63 + 5),
        "outcome": 9,
        "kafka": {"partitions": [-1, 0, 2**31 - 1]},
        "notes": ["caf\u00e9 \U0001f600", 'quote " backslash \\ tab \t nul \x00 del \x7f'],
        "shard": 7,
    }
    assert encode(call) == reference(call)


_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_STRING: st.text(max_size=12),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=12),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_ENUM: st.integers(0, 6),  # 4..6 are unknown to Outcome
}


@st.composite
def filled(draw: st.DrawFn, message: Message, depth: int = 0) -> Message:
    """Set a random subset of the message's fields (every type ApiCall uses, maps and oneofs)."""
    for field in message.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        value = getattr(message, field.name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            assert field.message_type is not None
            if field.message_type.GetOptions().map_entry:
                value.update(draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3)))
            elif field.is_repeated:
                for _ in range(draw(st.integers(0, 3))):
                    draw(filled(value.add(), depth + 1))
            elif depth < 3:
                value.SetInParent()
                draw(filled(value, depth + 1))
        elif field.is_repeated:
            value.extend(draw(st.lists(_SCALARS[field.type], max_size=3)))
        else:
            setattr(message, field.name, draw(_SCALARS[field.type]))
    return message


@encoders
@settings(deadline=None)
@given(st.builds(ApiCall).flatmap(filled))
def test_generated_calls_encode_as_json_format_does(encode: Callable[[ApiCall], str], call: ApiCall) -> None:
    assert encode(call) == reference(call)


def check_native(serialized: bytes) -> None:
    """Any bytes: the compiled encoder answers None or the text json_format gives for them."""
    assert render._NATIVE is not None
    text = render._NATIVE.encode(serialized)
    if text is not None:
        assert text == reference(ApiCall.FromString(serialized))


@settings(deadline=None)
@given(st.binary(max_size=200))
def test_compiled_encoder_on_arbitrary_bytes(serialized: bytes) -> None:
    check_native(serialized)


@settings(deadline=None)
@given(st.builds(ApiCall).flatmap(filled), st.data())
def test_compiled_encoder_on_damaged_calls(call: ApiCall, data: st.DataObject) -> None:
    damaged = bytearray(call.SerializeToString())
    for _ in range(data.draw(st.integers(0, 3)) if damaged else 0):
        damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    check_native(bytes(damaged[: data.draw(st.integers(0, len(damaged)))]))


def test_the_compiled_encoder_is_built() -> None:
    """`pip install -e .` (make setup) compiles trawl._calljson; the Python encoder is only a
    fallback, so a missing build is a failure here, not a skipped test."""
    assert render._NATIVE is not None, "trawl._calljson is not compiled: run `pip install -e .`"


def reference_lines(calls: list[ApiCall]) -> bytes:
    return "".join(reference(call) + "\n" for call in calls).encode("ascii")


def test_lines_of_fixture_calls_and_of_calls_the_compiled_encoder_leaves_to_python() -> None:
    calls = fixture_calls()
    with_map = ApiCall(id="m")
    with_map.amqp.properties["k"] = "v"  # the Python encoder's, inside the same batch
    odd_enums = [ApiCall(id="big", outcome=100), ApiCall(id="negative", outcome=-3)]  # type: ignore[arg-type]
    batch = [calls[0], with_map, *odd_enums, *calls[1:]]
    assert render.calls_to_json_lines(batch) == reference_lines(batch)
    assert render.calls_to_json_lines([]) == b""


@settings(max_examples=scaled(150), deadline=None)
@given(st.lists(st.builds(ApiCall).flatmap(filled), max_size=5))
def test_lines_of_generated_calls(calls: list[ApiCall]) -> None:
    assert render.calls_to_json_lines(calls) == reference_lines(calls)


def test_lines_without_the_compiled_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fixture_calls()[:20]
    monkeypatch.setattr(render, "_NATIVE", None)
    assert render.calls_to_json_lines(calls) == reference_lines(calls)


def test_lines_pass_on_a_failing_fallback() -> None:
    assert render._NATIVE is not None
    with_map = ApiCall(id="m")
    with_map.amqp.properties["k"] = "v"

    def broken(call: Message) -> str:
        raise RuntimeError("fallback broke")

    with pytest.raises(RuntimeError, match="fallback broke"):
        render._NATIVE.encode_lines([ApiCall(id="a"), with_map], broken)
    with pytest.raises(TypeError):
        render._NATIVE.encode_lines([ApiCall(id="a"), with_map], lambda call: b"not text")  # type: ignore[arg-type,return-value]


def test_writer_reuses_its_buffer_and_writes_only_each_batch(tmp_path: Path) -> None:
    calls = fixture_calls()
    with_map = ApiCall(id="m")
    with_map.amqp.properties["k"] = "v"
    batches = [calls[:40], [], [with_map, *calls[40:45]], calls[45:46], calls]
    target = tmp_path / "out.ndjson"
    with target.open("wb") as handle:
        writer = render.JsonLinesWriter(handle)
        for batch in batches:
            writer.write(batch)
    assert target.read_bytes() == b"".join(reference_lines(batch) for batch in batches)


def test_encode_lines_into_grows_a_small_buffer_and_refuses_an_exported_one() -> None:
    assert render._NATIVE is not None
    calls = fixture_calls()[:30]
    buffer = bytearray(b"x" * 10)
    size = render._NATIVE.encode_lines_into(calls, render._message_json, buffer)
    assert bytes(buffer[:size]) == reference_lines(calls) and len(buffer) >= size
    # A view pins the buffer: growing it would move the memory under the view.
    with memoryview(buffer), pytest.raises(BufferError):
        render._NATIVE.encode_lines_into(calls * 50, render._message_json, buffer)
    with pytest.raises(TypeError):
        render._NATIVE.encode_lines_into(calls, render._message_json, b"bytes")  # type: ignore[arg-type]


def test_the_table_info_column_shows_stream_grpc_and_graphql_details() -> None:
    from trawl.render import info_text

    call = ApiCall(protocol="grpc", method="POST", path="/trawl.fixtures.Orders/GetOrder", status="4")
    call.http2.stream_id = 7
    call.http2.reset_error = "CANCEL"
    call.http2.reset_by = "client"
    call.grpc.request_messages = 1
    call.grpc.request_message_bytes = 12
    call.grpc.response_message_bytes = 20480
    call.grpc.request_encoding = "gzip"
    call.grpc.timeout_ns = 201_000_000
    call.grpc.status_message = "Deadline Exceeded"
    call.notes.append("gap")
    assert info_text(call) == (
        "stream 7; RST_STREAM CANCEL by client; msgs 1/0 12B/20KiB; gzip; timeout 201ms; 'Deadline Exceeded'; [gap]"
    )
    pushed = ApiCall(protocol="http2")
    pushed.http2.stream_id = 2
    pushed.http2.pushed = True
    pushed.http2.parent_stream_id = 1
    assert info_text(pushed) == "stream 2; pushed on 1"
    graphql = ApiCall(protocol="graphql")
    graphql.graphql.operations = 2
    graphql.graphql.errors = 1
    graphql.graphql.first_error = "boom"
    assert info_text(graphql) == "batch of 2; 1 error: 'boom'"
    assert info_text(ApiCall(protocol="http")) == ""


def test_the_table_info_column_shows_redis_kafka_and_amqp_details() -> None:
    from trawl.render import info_text

    redis = ApiCall(protocol="redis", method="SET", path="session:1", status="ok")
    redis.redis.args.extend(["SET", "session:1", "[REDACTED]", "EX", "60", "NX"])
    redis.redis.arg_count = 6
    redis.redis.pipeline_depth = 16
    redis.redis.resp_version = 3
    assert info_text(redis) == "session:1 [REDACTED] EX 60 …; pipelined 16; RESP3"
    kafka = ApiCall(protocol="kafka", method="Produce", path="orders", status="NONE")
    kafka.kafka.api_version = 9
    kafka.kafka.correlation_id = 41
    kafka.kafka.record_count = 3
    kafka.kafka.record_bytes = 210
    kafka.kafka.compression = "gzip"
    kafka.kafka.one_way = True
    assert info_text(kafka) == "v9 corr 41; 3 records 210B; gzip; acks=0"
    amqp = ApiCall(protocol="amqp", method="queue.declare", path="missing", status="404")
    amqp.amqp.channel = 1
    amqp.amqp.response_method = "channel.close"
    amqp.amqp.reply_text = "NOT_FOUND - no queue 'missing'"
    assert info_text(amqp) == "ch 1; -> channel.close; \"NOT_FOUND - no queue 'missing'\""
