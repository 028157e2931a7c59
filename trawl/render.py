"""How calls are shown to a person or a script: NDJSON (the public interface: protobuf's JSON
mapping with proto field names) or a readable table, row by row as calls arrive.

`call_to_json` does not go through `json_format.MessageToDict` and `json.dumps`: those walk
every field in Python with a dozen checks each, then walk the result again, and cost about
60 µs per call, more than dissecting it (measured with bench/dissect.py). Two encoders
replace them, both giving the same bytes (tests/unit/test_render_json.py checks each against
json_format + json.dumps on the fixtures and on generated calls):

- trawl._calljson (trawl/_calljson.c, built by `pip install -e .`): reads the serialized call
  with a schema made here from the descriptors and writes the JSON text, about 0.7 µs a call;
  given serialized calls (bytes, as `trawl analyze` keeps them from the dissector on) it needs
  no object at all. It answers None for what it does not cover (maps, unknown fields), which
  then takes:
- the Python encoder: each message type planned once from its descriptor (JSON key and a text
  encoder per field), then a walk of `ListFields()` (the field set and order json_format
  walks), strings escaped by json's own `encode_basestring_ascii`; about 18 µs a call. Types
  it does not plan for (well-known types, floats, extensions) go to json_format.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import Any, BinaryIO, TextIO

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from trawl.v1.calls_pb2 import ApiCall, Endpoint, Outcome

OUTCOME_WORDS = {
    Outcome.OUTCOME_UNSPECIFIED: "",
    Outcome.OUTCOME_OK: "ok",
    Outcome.OUTCOME_ERROR: "error",
    Outcome.OUTCOME_NO_RESPONSE: "no_response",
    Outcome.OUTCOME_CANCELLED: "cancelled",
    Outcome.OUTCOME_DEADLINE_EXCEEDED: "deadline_exceeded",
}

_Encode = Callable[[Any], str]
_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_INT32_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_SFIXED32,
    }
)
# Per field descriptor: (`"key":`, encoder of the field's value as JSON text).
_FIELDS: dict[FieldDescriptor, tuple[str, _Encode]] = {}
# Per message type: does the planned walk cover it (else json_format does the message)?
_PLANNED: dict[Descriptor, bool] = {}


def _message_json(message: Message) -> str:
    """JSON text of one message, as json.dumps(MessageToDict(message, preserving_proto_field_name=True))."""
    descriptor: Descriptor = message.DESCRIPTOR  # type: ignore[assignment]
    planned = _PLANNED.get(descriptor)
    if planned is None:
        planned = _plan_message(descriptor)
    if not planned:
        return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True), separators=(",", ":"))
    fields = _FIELDS
    parts = []
    for field, value in message.ListFields():
        key, encode = fields[field]
        parts.append(key + encode(value))
    return "{" + ",".join(parts) + "}"


def _plan_message(descriptor: Descriptor) -> bool:
    """Plan every field of a message type; False when json_format must do it."""
    planned = descriptor.full_name.split(".")[0] != "google" and not descriptor.extension_ranges
    plans: dict[FieldDescriptor, tuple[str, _Encode]] = {}
    for field in descriptor.fields:
        if not planned:
            break
        key = encode_basestring_ascii(field.name) + ":"
        entry = field.message_type if field.type == FieldDescriptor.TYPE_MESSAGE else None
        if entry is not None and entry.GetOptions().map_entry:
            key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
            planned, encode = _value_encoder(value_field)
            plans[field] = (key, _map_encoder(key_field, encode))
        else:
            planned, encode = _value_encoder(field)
            plans[field] = (key, _repeated_encoder(encode) if field.is_repeated else encode)
    if planned:
        _FIELDS.update(plans)
    _PLANNED[descriptor] = planned
    return planned


def _value_encoder(field: FieldDescriptor) -> tuple[bool, _Encode]:
    """(planned, how one value of this field becomes JSON text)."""
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return True, encode_basestring_ascii
    if kind in _INT32_TYPES:
        return True, str
    if kind == FieldDescriptor.TYPE_BOOL:
        return True, _bool_json
    if kind in _INT64_TYPES:
        return True, _quoted_int
    if kind == FieldDescriptor.TYPE_BYTES:
        return True, _base64_json
    if kind == FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type
        assert enum is not None
        if enum.full_name == "google.protobuf.NullValue" or any(
            value.GetOptions().ListFields() for value in enum.values
        ):
            return False, str  # null and enum values with a JSON name option: json_format's rules
        names = {value.number: encode_basestring_ascii(value.name) for value in enum.values}
        return True, lambda number: names.get(number) or str(number)  # an open enum's unknown value: the number
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return True, _message_json
    return False, str  # float and double: json_format's rules for NaN, infinities and float32 precision


def _bool_json(value: bool) -> str:
    return "true" if value else "false"


def _quoted_int(value: int) -> str:
    return f'"{value}"'


def _base64_json(value: bytes) -> str:
    return '"' + base64.b64encode(value).decode("ascii") + '"'


def _repeated_encoder(encode: _Encode) -> _Encode:
    return lambda values: "[" + ",".join([encode(value) for value in values]) + "]"


def _map_encoder(key_field: FieldDescriptor, encode: _Encode) -> _Encode:
    def key_text(key: Any) -> str:
        if key_field.type == FieldDescriptor.TYPE_BOOL:
            return '"true"' if key else '"false"'
        return encode_basestring_ascii(str(key))

    return lambda mapping: "{" + ",".join([key_text(key) + ":" + encode(mapping[key]) for key in mapping]) + "}"


# The compiled encoder's kinds (trawl/_calljson.c); a field of any other kind is left out of its
# schema, so a message holding one takes the Python path.
_NATIVE_KINDS = {
    FieldDescriptor.TYPE_STRING: 1,
    FieldDescriptor.TYPE_BYTES: 2,
    FieldDescriptor.TYPE_BOOL: 3,
    FieldDescriptor.TYPE_INT32: 4,
    FieldDescriptor.TYPE_UINT32: 5,
    FieldDescriptor.TYPE_INT64: 6,
    FieldDescriptor.TYPE_UINT64: 7,
    FieldDescriptor.TYPE_ENUM: 8,
    FieldDescriptor.TYPE_MESSAGE: 9,
}
_NATIVE_MAX_FIELD_NUMBER = 64


def _native_schema(root: Descriptor) -> tuple[tuple[tuple[int, str, int, int, int, dict[int, str] | None], ...], ...]:
    """The message types reachable from `root` (index 0), each as its fields:
    (number, `"key":`, kind, repeated, index of the nested type, enum value -> JSON text)."""
    order = [root]
    index = {root: 0}
    schema = []
    position = 0
    while position < len(order):
        descriptor = order[position]
        position += 1
        fields = []
        for field in descriptor.fields:
            kind = _NATIVE_KINDS.get(field.type)
            nested = field.message_type
            if kind is None or field.number > _NATIVE_MAX_FIELD_NUMBER:
                continue
            if nested is not None and (nested.GetOptions().map_entry or nested.full_name.startswith("google.")):
                continue  # maps (their order) and well-known types: the Python path
            names = None
            if field.type == FieldDescriptor.TYPE_ENUM:
                planned, _ = _value_encoder(field)
                if not planned:
                    continue
                assert field.enum_type is not None
                names = {value.number: encode_basestring_ascii(value.name) for value in field.enum_type.values}
            nested_index = 0
            if nested is not None:
                if nested not in index:
                    index[nested] = len(order)
                    order.append(nested)
                nested_index = index[nested]
            key = encode_basestring_ascii(field.name) + ":"
            fields.append((field.number, key, kind, int(field.is_repeated), nested_index, names))
        schema.append(tuple(fields))
    return tuple(schema)


try:
    from trawl import _calljson

    _NATIVE: _calljson.Encoder | None = _calljson.Encoder(_native_schema(ApiCall.DESCRIPTOR))
except ImportError:  # not compiled (a checkout without `pip install -e .`): the Python encoder alone
    _NATIVE = None


def call_to_json(call: ApiCall | bytes) -> str:
    """One NDJSON line (without the newline): protobuf's JSON mapping, proto field names. A call
    may be given serialized (bytes): the compiled encoder reads those as they are."""
    if _NATIVE is not None:
        text: str | None = _NATIVE.encode(call if type(call) is bytes else call.SerializeToString())  # type: ignore[union-attr]
        if text is not None:
            return text
    return _any_json(call)


def _any_json(call: Message | bytes) -> str:
    """The Python encoder, for a call or a serialized one."""
    return _message_json(ApiCall.FromString(call) if type(call) is bytes else call)  # type: ignore[arg-type]


def calls_to_json_lines(calls: Sequence[ApiCall | bytes]) -> bytes:
    """NDJSON of many calls (each line ends with a newline), as bytes ready for a binary stream:
    one compiled call for the whole batch, so the per-call cost is the encoder's alone. Calls
    may be serialized ones (bytes), which the compiled encoder reads without objects."""
    if _NATIVE is not None:
        return _NATIVE.encode_lines(calls, _any_json)
    return "".join([_any_json(call) + "\n" for call in calls]).encode("ascii")


class JsonLinesWriter:
    """NDJSON of batches of calls on a binary stream: per batch, one compiled call writing into a
    buffer kept from batch to batch, and one write. A fresh megabyte-sized result per batch cost
    about 0.5 us a call in page faults (the kernel zeroing new pages) on large captures."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self._buffer = bytearray()

    def write(self, calls: Sequence[ApiCall | bytes]) -> None:
        """NDJSON of `calls`: objects, or serialized calls (bytes), or both."""
        if _NATIVE is None:
            self.out.write(calls_to_json_lines(calls))
            return
        size = _NATIVE.encode_lines_into(calls, _any_json, self._buffer)
        with memoryview(self._buffer) as view:
            self.out.write(view[:size])


def endpoint_label(endpoint: Endpoint) -> str:
    """`workload.namespace` when known, else `ip:port`."""
    if endpoint.workload:
        return f"{endpoint.workload}.{endpoint.namespace}" if endpoint.namespace else endpoint.workload
    if endpoint.name and endpoint.name != endpoint.ip:
        return endpoint.name
    host = f"[{endpoint.ip}]" if ":" in endpoint.ip else endpoint.ip
    return f"{host}:{endpoint.port}" if endpoint.port else host


class TableWriter:
    """Fixed-width rows; columns chosen for an SRE scanning an incident."""

    COLUMNS = (
        ("time", 15),
        ("proto", 8),
        ("source", 28),
        ("destination", 28),
        ("method", 16),  # AMQP class.method, Kafka API names, two-word Redis commands
        ("path", 36),
        ("status", 9),
        ("ms", 9),
        ("outcome", 17),
        ("info", 60),
    )

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.rows = 0

    def _line(self, cells: list[str]) -> str:
        parts = []
        for (_, width), cell in zip(self.COLUMNS, cells, strict=True):
            text = cell if len(cell) <= width else cell[: width - 1] + "…"
            parts.append(text.ljust(width))
        return " ".join(parts).rstrip()

    def header(self) -> None:
        self.out.write(self._line([name.upper() for name, _ in self.COLUMNS]) + "\n")

    def write(self, call: ApiCall) -> None:
        if self.rows == 0:
            self.header()
        self.rows += 1
        when = (
            datetime.fromtimestamp(call.request.ts / 1e9, tz=UTC).strftime("%H:%M:%S.%f")[:-3]
            if call.request.ts
            else ""
        )
        elapsed = f"{call.elapsed_ns / 1e6:.3f}" if call.elapsed_ns else ""
        self.out.write(
            self._line(
                [
                    when,
                    call.protocol,
                    endpoint_label(call.src),
                    endpoint_label(call.dst),
                    call.method,
                    call.path,
                    call.status,
                    elapsed,
                    OUTCOME_WORDS.get(call.outcome, ""),
                    info_text(call),
                ]
            )
            + "\n"
        )
        self.out.flush()


def _size(count: int) -> str:
    return f"{count}B" if count < 10_000 else f"{count >> 10}KiB"


def info_text(call: ApiCall) -> str:
    """What Wireshark's Info column would add to the summary triple: the HTTP/2 stream and what
    happened to it, gRPC messages and status message, GraphQL errors, Redis arguments, Kafka
    versions and record batches, AMQP channels and answers, the dissector's notes."""
    parts: list[str] = []
    if call.HasField("http2"):
        stream = call.http2
        parts.append(f"stream {stream.stream_id}")
        if stream.pushed:
            parts.append(f"pushed on {stream.parent_stream_id}")
        if stream.reset_error:
            parts.append(f"RST_STREAM {stream.reset_error} by {stream.reset_by}")
        if stream.goaway_error:
            parts.append(f"GOAWAY {stream.goaway_error}")
    detail = call.WhichOneof("detail")
    if detail == "grpc":
        grpc = call.grpc
        parts.append(
            f"msgs {grpc.request_messages}/{grpc.response_messages} "
            f"{_size(grpc.request_message_bytes)}/{_size(grpc.response_message_bytes)}"
        )
        if grpc.request_encoding or grpc.response_encoding:
            parts.append(grpc.request_encoding or grpc.response_encoding)
        if grpc.timeout_ns:
            parts.append(f"timeout {grpc.timeout_ns / 1e6:g}ms")
        if grpc.status_message:
            parts.append(repr(grpc.status_message))
    elif detail == "graphql":
        graphql = call.graphql
        if graphql.operations > 1:
            parts.append(f"batch of {graphql.operations}")
        if graphql.persisted_query_hash:
            parts.append(f"persisted {graphql.persisted_query_hash[:12]}")
        if graphql.errors:
            parts.append(f"{graphql.errors} error{'s' if graphql.errors > 1 else ''}: {graphql.first_error!r}")
    elif detail == "redis":
        redis = call.redis
        if redis.from_server:
            parts.append("push")
        if len(redis.args) > 1:
            parts.append(" ".join(redis.args[1:5]) + (" …" if redis.arg_count > 5 else ""))
        if redis.pipeline_depth > 1:
            parts.append(f"pipelined {redis.pipeline_depth}")
        if redis.resp_version == 3:
            parts.append("RESP3")
    elif detail == "kafka":
        kafka = call.kafka
        parts.append(f"v{kafka.api_version} corr {kafka.correlation_id}")
        if kafka.record_count:
            parts.append(f"{kafka.record_count} records {_size(kafka.record_bytes)}")
        if kafka.compression and kafka.compression != "none":
            parts.append(kafka.compression)
        if kafka.one_way:
            parts.append("acks=0")
        if kafka.group_id:
            parts.append(f"group {kafka.group_id}")
    elif detail == "amqp":
        amqp = call.amqp
        parts.append(f"ch {amqp.channel}")
        if amqp.response_method:
            parts.append(f"-> {amqp.response_method}")
        if amqp.routing_key:
            parts.append(f"key {amqp.routing_key}")
        if amqp.reply_text:
            parts.append(repr(amqp.reply_text))
        body = call.request.body_size or call.response.body_size
        if body:
            parts.append(_size(body))
    if call.notes:
        parts.append("[" + ", ".join(call.notes) + "]")
    return "; ".join(parts)
