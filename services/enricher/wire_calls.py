"""CallBatches and ApiCalls read as bytes, for the enricher's hot path (DESIGN.md: calls stay
bytes from the dissector to the output).

The enricher needs of each call only its id (deduplication, Nats-Msg-Id) and, once enriched,
its protocol and destination's namespace and workload (the subject it is published on); of the
batch, its node, shard, end-of-input flag and losses. Parsing a CallBatch of 500 calls into
ApiCall objects, enriching them and serializing each again cost some 30 us a call; walking the
few fields needed here costs about one. Wire format: https://protobuf.dev/programming-guides/encoding/
(fields are read whatever their order; unknown fields are skipped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trawl.bus import enriched_subject

# Wire types.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
# Subjects remembered, by (protocol, destination) bytes; emptied when full.
MAX_SUBJECTS = 65_536


class WireError(ValueError):
    """The bytes are not the protobuf message they should be."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _skip(data: bytes, pos: int, wire_type: int) -> int:
    if wire_type == _VARINT:
        return _varint(data, pos)[1]
    if wire_type == _LEN:
        length, pos = _varint(data, pos)
        return pos + length
    if wire_type == _I64:
        return pos + 8
    if wire_type == _I32:
        return pos + 4
    raise WireError(f"unsupported wire type {wire_type}")


@dataclass
class CallBatchParts:
    """A CallBatch's fields, its calls as the bytes of each ApiCall."""

    node: str = ""
    shard: int = 0
    sequence: int = 0
    calls: list[bytes] = field(default_factory=list)
    end_of_input: bool = False
    lost_packet_batches: int = 0


def split_call_batch(data: bytes) -> CallBatchParts:
    """`CallBatch.FromString(data)` without an ApiCall object; WireError when it is not one."""
    parts = CallBatchParts()
    calls = parts.calls
    pos = 0
    size = len(data)
    while pos < size:
        tag = data[pos]
        if tag == 0x22:  # calls (4, length-delimited): the common case first
            length = data[pos + 1] if pos + 1 < size else 0x80
            if length < 0x80:
                start = pos + 2
            else:
                length, start = _varint(data, pos + 1)
            end = start + length
            if end > size:
                raise WireError("a call runs past the end of the batch")
            calls.append(data[start:end])
            pos = end
            continue
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 1 and wire_type == _LEN:
            length, pos = _varint(data, pos)
            parts.node = data[pos : pos + length].decode("utf-8", "replace")
            pos += length
        elif number in (2, 3, 5, 6) and wire_type == _VARINT:
            value, pos = _varint(data, pos)
            if number == 2:
                parts.shard = value
            elif number == 3:
                parts.sequence = value
            elif number == 5:
                parts.end_of_input = bool(value)
            else:
                parts.lost_packet_batches = value
        elif number == 0:
            raise WireError("field number 0")
        else:
            pos = _skip(data, pos, wire_type)
        if pos > size:
            raise WireError("a field runs past the end of the batch")
    return parts


def call_id(call: bytes) -> str:
    """ApiCall.id (field 1), which the dissector and the splicer write first; found anywhere."""
    if len(call) > 1 and call[0] == 0x0A and call[1] < 0x80 and 2 + call[1] <= len(call):
        return call[2 : 2 + call[1]].decode("utf-8", "replace")
    found = _fields(call, {1})
    return found.get(1, b"").decode("utf-8", "replace")


def _fields(data: bytes, wanted: set[int]) -> dict[int, bytes]:
    """The last value of each length-delimited field in `wanted` (protobuf's rule for a singular field)."""
    found: dict[int, bytes] = {}
    pos = 0
    size = len(data)
    while pos < size:
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _LEN:
            length, pos = _varint(data, pos)
            if number in wanted:
                found[number] = data[pos : pos + length]
            pos += length
        else:
            pos = _skip(data, pos, wire_type)
    if pos > size:
        raise WireError("a field runs past the end of the call")
    return found


class EnrichedSubjects:
    """`enriched_subject(protocol, dst.namespace, dst.workload)` of enriched ApiCall bytes:
    protocol is field 2 and dst field 7 of ApiCall, namespace 4 and workload 6 of Endpoint. The
    walk stops after field 7: every serializer Trawl runs (protobuf's, the splicer, the
    dissector's lane) writes fields in number order, and fields 1 to 7 are all length-delimited.
    The subject is remembered by the protocol's and destination's bytes (a workload's calls
    share them)."""

    def __init__(self) -> None:
        self._known: dict[tuple[bytes, bytes], str] = {}

    def __call__(self, call: bytes) -> str:
        try:
            protocol, destination = self._fields(call)
        except (IndexError, WireError):  # cut short (no serializer writes that): the catch-all subject
            protocol = destination = b""
        subject = self._known.get((protocol, destination))
        if subject is None:
            if len(self._known) >= MAX_SUBJECTS:
                self._known.clear()
            endpoint = _fields(destination, {4, 6}) if destination else {}
            subject = self._known[(protocol, destination)] = enriched_subject(
                protocol.decode("utf-8", "replace") or "_",
                endpoint.get(4, b"").decode("utf-8", "replace") or "_",
                endpoint.get(6, b"").decode("utf-8", "replace") or "_",
            )
        return subject

    @staticmethod
    def _fields(call: bytes) -> tuple[bytes, bytes]:
        protocol = destination = b""
        pos = 0
        size = len(call)
        while pos < size:
            key = call[pos]
            if key & 7 != _LEN or key > 0x3F:  # not one of fields 1-7 (length-delimited): past them
                break
            length = call[pos + 1]
            if length < 0x80:
                start = pos + 2
            else:
                length, start = _varint(call, pos + 1)
            pos = start + length
            if key == 0x12:
                protocol = call[start:pos]
            elif key == 0x3A:
                destination = call[start:pos]
                break
        if pos > size:
            raise WireError("a field runs past the end of the call")
        return protocol, destination
