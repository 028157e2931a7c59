"""Protobuf messages as JSON-ready values: with a schema (a `protoc --descriptor_set_out` file) or
without one (the wire format alone), for showing the first gRPC message of each direction.

With a schema, `DescriptorSet` stands on google.protobuf: a private `DescriptorPool` per set (the
default pool belongs to the process's own generated code), `message_factory.GetMessageClass`
and `json_format.MessageToDict` with the proto field names, so the output is what protobuf's
JSON mapping gives (int64 as strings, bytes as base64, enums by name, defaults omitted).

Without one, `decode_schemaless` reads the wire format by hand: protobuf has no public API for
a message without a descriptor (Python's `UnknownFieldSet` needs a parsed message and gives no
nesting). It does what `protoc --decode_raw` and Wireshark's protobuf dissector do, with one
difference in order: a length-delimited value that is printable UTF-8 is shown as a string
before trying it as a nested message (Wireshark's order; `protoc --decode_raw` tries the
message first, so it shows the text "hi" as `{13: 105}`).

Schemaless output, by wire type (keys are field numbers as strings, in order of first
appearance; a field seen more than once becomes a list of its values, packed repeated fields
are one length-delimited value and show as bytes):

- varint: the unsigned 64-bit value (a negative int32/int64 shows as 2**64 - n, as protoc does);
- fixed64 / fixed32: the unsigned little-endian value;
- length-delimited: "" when empty; a string when the bytes are UTF-8 whose characters are all
  printable (or tab, CR, LF); a nested object when they parse completely as a message and the
  depth allows; else `{"@bytes": "<base64>"}`;
- group (deprecated wire types 3/4): a nested object.

A message that does not parse to its end keeps the fields read so far and puts the rest under
`"@undecoded": "<base64>"` (input that is not protobuf at all is `{"@undecoded": ...}` alone):
the marker keys start with "@" so they cannot collide with field numbers. Work is bounded: at
most `max_fields` field reads in all (failed attempts at nesting included), at most `max_depth`
levels.

Speed: the first message of each direction of every gRPC call is shown as JSON text. The
reader writes that text as it reads the wire format (`schemaless_json_text`: each value's text,
then the object's), rather than building a dict for the json module to encode, and
`decode_schemaless` is that text read back, so there is one reader. One-byte varints (keys of
fields 1-15, small values and lengths) are read inline. On the 50,000 grpcio calls of
bench/dissect.py's capture a first message (two or three fields) took 4.4 us to decode and
write as a dict, 3.1 us written directly (string fields read in the field loop, the keys of
fields 0-63 prepared once). `to_json_text` writes plain values (dicts with string
keys, lists, strings, ints) itself, the json module's exact text without the encoder it sets up
per call (1.0 us instead of 1.6 for a small dict).
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError, Message

from trawl.errors import ConfigError

BYTES_MARKER = "@bytes"
UNDECODED_MARKER = "@undecoded"
TRUNCATED_MARKER = "@truncated"
MAX_FIELD_NUMBER = (1 << 29) - 1
UINT64 = (1 << 64) - 1
_FIXED32 = struct.Struct("<I")
_FIXED64 = struct.Struct("<Q")
_TEXT_CONTROLS = frozenset("\t\n\r")


# -- schemaless ------------------------------------------------------------------------------------


class _Stop(Exception):
    """The bytes do not go on as a message (or the field budget ran out) at this offset."""


class _Budget:
    """Field reads left (a dataclass costs about twice as much to make, once per message)."""

    __slots__ = ("fields",)

    def __init__(self, fields: int) -> None:
        self.fields = fields


def decode_schemaless(data: bytes, max_depth: int = 8, max_fields: int = 512) -> object:
    """The wire format of `data` as a dict keyed by field number (see the module docstring);
    never raises. It is `schemaless_json_text`'s text read back (the text holds only objects,
    lists, strings and integers, so nothing is lost): one reader of the wire format."""
    return json.loads(_schemaless_text(data, max_depth, max_fields))


def schemaless_json_text(data: bytes, max_chars: int, max_depth: int = 8, max_fields: int = 512) -> str:
    """`to_json_text(decode_schemaless(data, max_depth, max_fields), max_chars)`, written while
    the wire format is read (no dict to build and encode): the same text."""
    text = _schemaless_text(data, max_depth, max_fields)
    if len(text) <= max_chars:
        return text
    return to_json_text(json.loads(text), max_chars)


def _schemaless_text(data: bytes, max_depth: int, max_fields: int) -> str:
    data = bytes(data)
    budget = _Budget(max(0, max_fields))
    values: dict[int, str | list[str]] = {}
    offset = _fields(data, 0, len(data), 1, max(1, max_depth), budget, values, None)
    text = _object(values)
    if offset < len(data):
        rest = f'"{UNDECODED_MARKER}":"{base64.b64encode(data[offset:]).decode("ascii")}"}}'
        text = text[:-1] + ("," + rest if values else rest)
    return text


# '"n":' for the field numbers most messages use.
_KEYS = tuple(f'"{number}":' for number in range(64))


def _object(values: dict[int, str | list[str]]) -> str:
    """A message's fields (JSON texts by field number) as a JSON object: a field seen more than
    once is the list of its values."""
    keys = _KEYS
    parts = []
    for number, value in values.items():
        key = keys[number] if number < 64 else f'"{number}":'
        parts.append(key + value if type(value) is str else key + "[" + ",".join(value) + "]")
    return "{" + ",".join(parts) + "}"


def _fields(
    data: bytes,
    offset: int,
    end: int,
    depth: int,
    max_depth: int,
    budget: _Budget,
    values: dict[int, str | list[str]],
    group: int | None,
) -> int:
    """Read fields from `offset` into `values` (each value as JSON text) until `end` (or the
    end-group of `group`); return where reading stopped: `end` (after the end group for a group)
    when all parsed, earlier when the next field is not valid."""
    while offset < end:
        start = offset
        try:
            if budget.fields <= 0:
                raise _Stop
            budget.fields -= 1
            # One-byte varints (keys of fields 1-15, small values and lengths) are read inline.
            key = data[offset]
            if key < 0x80:
                offset += 1
            else:
                key, offset = _varint(data, offset, end)
            number, wire_type = key >> 3, key & 7
            if number == 0 or number > MAX_FIELD_NUMBER:
                raise _Stop
            value: str
            if wire_type == 2:
                if offset < end and data[offset] < 0x80:
                    size = data[offset]
                    offset += 1
                else:
                    size, offset = _varint(data, offset, end)
                if size > end - offset:
                    raise _Stop
                if size:
                    # Read here, not in a function: most length-delimited fields are strings.
                    stop = offset + size
                    raw = data[offset:stop]
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        text = None
                    if text is not None and (
                        text.isprintable() or all(ch.isprintable() or ch in _TEXT_CONTROLS for ch in text)
                    ):
                        value = encode_basestring(text)
                    else:
                        value = _nested_or_bytes(data, raw, offset, stop, depth, max_depth, budget)
                else:
                    value = '""'
                offset += size
            elif wire_type == 0:
                if offset < end and data[offset] < 0x80:
                    value = str(data[offset])
                    offset += 1
                else:
                    number_value, offset = _varint(data, offset, end)
                    value = str(number_value)
            elif wire_type == 1:
                if offset + 8 > end:
                    raise _Stop
                value = str(_FIXED64.unpack_from(data, offset)[0])
                offset += 8
            elif wire_type == 5:
                if offset + 4 > end:
                    raise _Stop
                value = str(_FIXED32.unpack_from(data, offset)[0])
                offset += 4
            elif wire_type == 3:
                if depth >= max_depth:
                    raise _Stop
                nested: dict[int, str | list[str]] = {}
                offset = _fields(data, offset, end, depth + 1, max_depth, budget, nested, number)
                value = _object(nested)
            elif wire_type == 4:
                if group != number:
                    raise _Stop
                return offset
            else:
                raise _Stop
        except _Stop:
            return start
        previous = values.get(number)
        if previous is None:
            values[number] = value
        elif type(previous) is list:
            previous.append(value)
        else:
            values[number] = [previous, value]  # type: ignore[list-item]
    if group is not None:
        raise _Stop  # the group never ended: the caller's field is not valid
    return offset


def _varint(data: bytes, offset: int, end: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if offset >= end or shift > 63:
            raise _Stop
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & UINT64, offset
        shift += 7


def _nested_or_bytes(data: bytes, raw: bytes, start: int, end: int, depth: int, max_depth: int, budget: _Budget) -> str:
    """A length-delimited value `raw` (= data[start:end]) that is not text: a nested message
    when it parses as one to its end and the depth allows, else its bytes."""
    if depth < max_depth:
        nested: dict[int, str | list[str]] = {}
        try:
            stop = _fields(data, start, end, depth + 1, max_depth, budget, nested, None)
        except _Stop:
            stop = start
        if stop == end and nested:
            return _object(nested)
    return f'{{"{BYTES_MARKER}":"{base64.b64encode(raw).decode("ascii")}"}}'


# -- JSON text -------------------------------------------------------------------------------------


def to_json_text(value: object, max_chars: int) -> str:
    """`value` as compact JSON text of at most `max_chars` characters, always valid JSON.

    When the whole text is longer, the structure is written as far as it fits (a long string
    is cut and ends with "…") and closed; the object where it stopped gets `"@truncated": true`
    (a list gets the element "@truncated"). "" when not even that fits (max_chars < 20) or the
    value is not JSON-serialisable. Non-finite floats are written as the strings "NaN",
    "Infinity", "-Infinity" (protobuf's JSON mapping)."""
    try:
        text = _plain_json(value)
    except _NotPlain:
        try:
            text = _COMPACT.encode(value)
        except ValueError:
            text = None
        except TypeError:
            return ""
    if text is not None and len(text) <= max_chars:
        return text
    writer = _BoundedWriter(max_chars)
    try:
        writer.value(value)
    except _Full:
        pass
    except TypeError:
        return ""
    return writer.text()


# json.dumps with these arguments builds this encoder on every call (a few microseconds).
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class _NotPlain(Exception):
    """A value `_plain_json` leaves to the json module."""


def _plain_json(value: object) -> str:
    """The text `_COMPACT` gives for what decode_schemaless makes (dicts with string keys,
    lists, strings, ints: about half the json module's time for a small message, which sets up an
    encoder per call); anything else (subclasses included) raises _NotPlain."""
    kind = type(value)
    if kind is str and isinstance(value, str):
        return encode_basestring(value)
    if kind is int and isinstance(value, int):
        return int.__repr__(value)
    if kind is dict and isinstance(value, dict):
        parts = []
        for key, item in value.items():
            if type(key) is not str:
                raise _NotPlain
            parts.append(encode_basestring(key) + ":" + _plain_json(item))
        return "{" + ",".join(parts) + "}"
    if kind is list and isinstance(value, list):
        return "[" + ",".join([_plain_json(item) for item in value]) + "]"
    raise _NotPlain


class _Full(Exception):
    """The budget of characters is spent; what was written is closed by `text()`."""


class _BoundedWriter:
    """Writes JSON token by token; every write keeps room for the closing brackets and the
    truncation marker, so `text()` can always close what is open."""

    MARK_OBJECT = f',"{TRUNCATED_MARKER}":true'
    MARK_LIST = f',"{TRUNCATED_MARKER}"'

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.parts: list[str] = []
        self.used = 0
        self.open: list[str] = []  # "}" or "]" of each open container, innermost last
        self.empty: list[bool] = []  # per open container: no element written yet

    def _room(self) -> int:
        # The closing brackets plus the longest marker (with its comma) must always fit.
        return self.max_chars - self.used - len(self.open) - len(self.MARK_OBJECT)

    def _put(self, token: str, opens: str = "") -> None:
        """Write `token` (an element, with its comma and key) and open `opens` if given."""
        if len(token) + len(opens) > self._room():
            raise _Full
        self.parts.append(token)
        self.used += len(token)
        if self.empty:
            self.empty[-1] = False
        if opens:
            self.open.append(opens)
            self.empty.append(True)

    def value(self, value: object, prefix: str = "") -> None:
        if isinstance(value, dict):
            self._put(prefix + "{", "}")
            for key, item in value.items():
                if not isinstance(key, str):
                    raise TypeError("JSON object keys must be strings")
                self.value(item, ("" if self.empty[-1] else ",") + json.dumps(key, ensure_ascii=False) + ":")
            self._close()
        elif isinstance(value, list | tuple):
            self._put(prefix + "[", "]")
            for item in value:
                self.value(item, "" if self.empty[-1] else ",")
            self._close()
        elif isinstance(value, str):
            self._string(prefix, value)
        else:
            self._put(prefix + _scalar(value))

    def _string(self, prefix: str, item: str) -> None:
        """The string whole, or as much of it as fits ending with "…" and then _Full (escapes
        make the encoded length grow faster than the characters: search the longest cut)."""
        whole = prefix + json.dumps(item, ensure_ascii=False)
        if len(whole) <= self._room():
            self._put(whole)
            return
        room = self._room()
        low, high = 0, len(item) - 1
        best = None
        while low <= high:
            middle = (low + high) // 2
            token = prefix + json.dumps(item[:middle] + "…", ensure_ascii=False)
            if len(token) <= room:
                best = token
                low = middle + 1
            else:
                high = middle - 1
        if best is not None:
            self._put(best)
        raise _Full

    def _close(self) -> None:
        self.parts.append(self.open.pop())
        self.used += 1
        self.empty.pop()

    def text(self) -> str:
        """What was written, the marker in the innermost open container, every container closed."""
        parts = list(self.parts)
        if self.open:
            mark = self.MARK_OBJECT if self.open[-1] == "}" else self.MARK_LIST
            parts.append(mark[1:] if self.empty[-1] else mark)
            parts.extend(reversed(self.open))
        return "".join(parts)


def _scalar(value: object) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return '"NaN"' if math.isnan(value) else ('"Infinity"' if value > 0 else '"-Infinity"')
    if value is None or isinstance(value, bool | int | float | str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bytes | bytearray):
        return json.dumps({BYTES_MARKER: base64.b64encode(value).decode("ascii")})
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


# -- with a schema ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MethodInfo:
    """One RPC of a service: message types by full name (no leading dot) and streaming flags."""

    input_type: str
    output_type: str
    client_streaming: bool
    server_streaming: bool

    @property
    def call_type(self) -> str:
        if self.client_streaming and self.server_streaming:
            return "bidi_streaming"
        if self.client_streaming:
            return "client_streaming"
        if self.server_streaming:
            return "server_streaming"
        return "unary"


def _well_known_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """google/protobuf/*.proto as shipped with the protobuf package: a set built without
    --include_imports still resolves Timestamp, Duration, Any, Struct, wrappers..."""
    from google.protobuf import (
        any_pb2,
        api_pb2,
        duration_pb2,
        empty_pb2,
        field_mask_pb2,
        source_context_pb2,
        struct_pb2,
        timestamp_pb2,
        type_pb2,
        wrappers_pb2,
    )

    modules = (
        any_pb2, api_pb2, descriptor_pb2, duration_pb2, empty_pb2, field_mask_pb2, source_context_pb2,
        struct_pb2, timestamp_pb2, type_pb2, wrappers_pb2,
    )  # fmt: skip
    files = {}
    for module in modules:
        proto = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        files[proto.name] = proto
    return files


@dataclass
class DescriptorSet:
    """Message types and services of one or more `protoc --descriptor_set_out` files.

    A set built without `--include_imports` still loads: the well-known types come from the
    protobuf package; an import that is nowhere is listed in `missing` (with the files that
    import it), and the fields whose types it held are read as bytes (enums as int32), so the
    rest of each message still decodes. `problems` says what could not be loaded at all."""

    pool: descriptor_pool.DescriptorPool
    methods: dict[tuple[str, str], MethodInfo]
    missing: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    _classes: dict[str, type[Message] | None] = field(default_factory=dict)

    @classmethod
    def load(cls, paths: Sequence[Path]) -> DescriptorSet:
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        for path in paths:
            for proto in _read_set(Path(path)):
                files.setdefault(proto.name, proto)
        return cls.from_files(files.values())

    @classmethod
    def from_files(cls, protos: Iterable[descriptor_pb2.FileDescriptorProto]) -> DescriptorSet:
        files = {proto.name: proto for proto in protos}
        well_known = _well_known_files()
        missing: dict[str, list[str]] = {}
        for name, proto in list(files.items()):
            for dependency in proto.dependency:
                if dependency in files:
                    continue
                if dependency in well_known:
                    files[dependency] = well_known[dependency]
                else:
                    missing.setdefault(dependency, []).append(name)
        # Pull in the well-known files' own dependencies (api.proto imports source_context...).
        for name in list(files):
            for dependency in files[name].dependency:
                if dependency not in files and dependency in well_known:
                    files[dependency] = well_known[dependency]
        known_types = {full_name: kind for proto in files.values() for full_name, kind in _declared_types(proto)}
        methods: dict[tuple[str, str], MethodInfo] = {}
        for proto in files.values():
            for service in proto.service:
                service_name = f"{proto.package}.{service.name}" if proto.package else service.name
                for method in service.method:
                    methods.setdefault(
                        (service_name, method.name),
                        MethodInfo(
                            input_type=method.input_type.lstrip("."),
                            output_type=method.output_type.lstrip("."),
                            client_streaming=method.client_streaming,
                            server_streaming=method.server_streaming,
                        ),
                    )
        pool = descriptor_pool.DescriptorPool()
        problems: list[str] = []
        added: set[str] = set()
        failed: set[str] = set()

        def add(name: str, chain: tuple[str, ...]) -> bool:
            if name in added:
                return True
            if name in failed or name in chain:
                return False
            proto = files[name]
            usable = _without_unresolved(proto, files, known_types)
            for dependency in usable.dependency:
                if not add(dependency, (*chain, name)):
                    failed.add(name)
                    problems.append(f"{name}: not loaded, its import {dependency} could not be loaded")
                    return False
            try:
                pool.Add(usable)
            except Exception as error:  # upb's TypeError, the Python pool's various errors
                failed.add(name)
                problems.append(f"{name}: not loaded: {error}")
                return False
            added.add(name)
            return True

        for name in files:
            add(name, ())
        return cls(pool=pool, methods=methods, missing=missing, problems=problems)

    def method(self, service: str, name: str) -> MethodInfo | None:
        return self.methods.get((service, name))

    def message_class(self, type_name: str) -> type[Message] | None:
        name = type_name.lstrip(".")
        if name in self._classes:
            return self._classes[name]
        try:
            descriptor = self.pool.FindMessageTypeByName(name)
            message_class: type[Message] | None = message_factory.GetMessageClass(descriptor)
        except (KeyError, TypeError):
            message_class = None
        self._classes[name] = message_class
        return message_class

    def decode(self, type_name: str, data: bytes) -> object | None:
        """The message as protobuf's JSON mapping (proto field names); None when the type is
        unknown or the bytes do not parse as it."""
        message_class = self.message_class(type_name)
        if message_class is None:
            return None
        try:
            message = message_class.FromString(bytes(data))
            return json_format.MessageToDict(message, preserving_proto_field_name=True, descriptor_pool=self.pool)
        except (DecodeError, RecursionError):
            return None
        except Exception:  # json_format's TypeError/KeyError for an Any of an unknown type
            return None

    def warnings(self) -> list[str]:
        """One line per missing import and per file not loaded, naming the fix."""
        lines = [
            f"{dependency} (imported by {', '.join(sorted(importers))}) is not in the descriptor set: "
            "fields of its types show as bytes; build the set with protoc --include_imports"
            for dependency, importers in sorted(self.missing.items())
        ]
        return lines + list(self.problems)


def _read_set(path: Path) -> list[descriptor_pb2.FileDescriptorProto]:
    fix = (
        "give a FileDescriptorSet written by `protoc --include_imports --descriptor_set_out=FILE.desc "
        "your.proto` (or buf build -o FILE.desc)"
    )
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read the descriptor set: {error.strerror or error}", path=path) from error
    try:
        descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(data)
    except DecodeError as error:
        raise ConfigError(f"not a protobuf descriptor set ({error}); {fix}", path=path) from error
    # Protobuf parsing is lenient (any bytes that happen to be valid wire format parse), so a
    # set must also look like one: at least one file, each named.
    if not descriptor_set.file or any(not proto.name for proto in descriptor_set.file):
        raise ConfigError(f"not a protobuf descriptor set (no named .proto files in it); {fix}", path=path)
    return list(descriptor_set.file)


def _declared_types(proto: descriptor_pb2.FileDescriptorProto) -> Iterable[tuple[str, str]]:
    """(".full.Name", "message" | "enum") of every type the file declares."""
    prefix = f".{proto.package}" if proto.package else ""
    for enum in proto.enum_type:
        yield f"{prefix}.{enum.name}", "enum"
    stack = [(prefix, message) for message in proto.message_type]
    while stack:
        scope, message = stack.pop()
        name = f"{scope}.{message.name}"
        yield name, "message"
        for enum in message.enum_type:
            yield f"{name}.{enum.name}", "enum"
        stack.extend((name, nested) for nested in message.nested_type)


def _without_unresolved(
    proto: descriptor_pb2.FileDescriptorProto,
    files: dict[str, descriptor_pb2.FileDescriptorProto],
    known_types: dict[str, str],
) -> descriptor_pb2.FileDescriptorProto:
    """`proto` made loadable without the imports that are not in `files`: those imports dropped,
    fields of types nobody declares read as bytes (enums as int32, the same varint on the wire),
    extensions of unknown messages and methods of unknown types dropped (the method table is
    built from the original). The file itself when nothing is missing."""
    if all(dependency in files for dependency in proto.dependency):
        return proto
    usable = descriptor_pb2.FileDescriptorProto()
    usable.CopyFrom(proto)
    kept = [dependency for dependency in proto.dependency if dependency in files]
    public = [proto.dependency[index] for index in proto.public_dependency if proto.dependency[index] in files]
    weak = [proto.dependency[index] for index in proto.weak_dependency if proto.dependency[index] in files]
    del usable.dependency[:]
    usable.dependency.extend(kept)
    del usable.public_dependency[:]
    usable.public_dependency.extend(kept.index(name) for name in public)
    del usable.weak_dependency[:]
    usable.weak_dependency.extend(kept.index(name) for name in weak)

    def fix_fields(fields: Any) -> None:
        for item in fields:
            if item.type_name.startswith(".") and item.type_name not in known_types:
                if item.type == descriptor_pb2.FieldDescriptorProto.TYPE_ENUM:
                    item.type = descriptor_pb2.FieldDescriptorProto.TYPE_INT32
                else:
                    item.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
                item.ClearField("type_name")
                item.ClearField("default_value")

    def known_extensions(extensions: Any) -> None:
        keep = [item for item in extensions if not item.extendee.startswith(".") or item.extendee in known_types]
        fix_fields(keep)
        copies = [descriptor_pb2.FieldDescriptorProto() for _ in keep]
        for copy, item in zip(copies, keep, strict=True):
            copy.CopyFrom(item)
        del extensions[:]
        extensions.extend(copies)

    known_extensions(usable.extension)
    stack = list(usable.message_type)
    while stack:
        message = stack.pop()
        fix_fields(message.field)
        known_extensions(message.extension)
        stack.extend(message.nested_type)
    for service in usable.service:
        methods = [
            method
            for method in service.method
            if method.input_type in known_types and method.output_type in known_types
        ]
        copies = [descriptor_pb2.MethodDescriptorProto() for _ in methods]
        for copy, method in zip(copies, methods, strict=True):
            copy.CopyFrom(method)
        del service.method[:]
        service.method.extend(copies)
    return usable
