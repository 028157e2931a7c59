"""gRPC over HTTP/2: the layer the HTTP/2 parser (protocols/http2.py) calls for a stream whose
request content-type is gRPC. Pure functions and small classes, no HTTP/2 state of its own.

How the HTTP/2 parser uses it, per stream:

    if is_grpc(content_type):                        # request HEADERS
        request = MessageStream(message_encoding(request_headers), limits.max_body_bytes)
        response = MessageStream(message_encoding(response_headers), limits.max_body_bytes)
        request.feed(data) / response.feed(data)     # each DATA payload, in order, any split
        request.finish(); response.finish()          # END_STREAM, reset or the flow's end
        trace_context(call, request_headers)         # traceparent / B3 first (protocols/trace.py)
        apply(call, request_headers, response_headers, trailers, request, response, descriptors,
              response_seen)
        if the stream was reset: reset_outcome(call, error_code, by_client, request_ts, reset_ts,
                                               call.grpc.timeout_ns)

`apply` fills the summary triple the gRPC way (method POST, path /package.Service/Method,
status = grpc-status) and GrpcDetail; the HTTP/2 parser keeps what is HTTP/2's (timestamps,
sizes, headers, Http2Stream) and must set `call.http2.response_end_stream` before `apply`.

Scope: `application/grpc` with any `+codec` subtype (`+proto`, `+json`...). gRPC-Web
(`application/grpc-web*`) is not gRPC here: its trailers travel inside the body (a frame with
flag 0x80) and `-text` base64-encodes the whole body, so it needs its own message layer; until
it has one it stays an ordinary HTTP call (`is_grpc` answers False).

Message framing (5-byte prefix: compressed flag, 32-bit length) is read here by hand: grpcio
has no public API to frame bytes it did not receive itself. Compressed messages are inflated
with zlib (gzip; deflate as zlib or raw deflate, both seen in the wild) or `zstandard` (zstd),
only for the first message of each direction and never past `max_body_bytes`. snappy is not
decoded: no snappy module is in the dependency set, and two incompatible snappy framings (raw
block, framed stream) are used by the projects that register a "snappy" gRPC compressor; such
a message is noted "grpc-compressed-unknown-encoding".

Call type: from the descriptor set when it names the method; otherwise inferred from the message
counts (request <= 1 and response <= 1: unary; request > 1 and response <= 1: client_streaming;
request <= 1 and response > 1: server_streaming; both > 1: bidi_streaming; no message either way:
""). The inference only sees what was sent: a streaming call that sent one message (or was
cancelled after one) reads as unary, and a stream cut by the capture's end reads as smaller.

Speed (50,000 grpcio unary calls on one connection, bench/dissect.py's capture, the HTTP/2
parser fed as TCP delivered it, python 3.11): `MessageStream.feed` reads whole messages at the
start of a piece without its byte-by-byte state (a unary call's message is one DATA payload), and
`split_path`, `is_grpc`, `codec` and the grpc-status parse remember their answers for the few
values a connection repeats; with protobuf.py's encoder kept and one-byte varints read inline,
the parser went from 83 to 74 us per call. The first messages' JSON text (protobuf.py,
`schemaless_json_text`) is now the largest single cost of a unary call, about 3.1 us each.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import io
import json
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import unquote

from trawl.dissector.protobuf import DescriptorSet, schemaless_json_text, to_json_text
from trawl.dissector.protocols.base import NotAtBoundary
from trawl.v1.calls_pb2 import ApiCall, Outcome

GRPC_CONTENT_TYPE = "application/grpc"
PREFIX_SIZE = 5
PREFIX = struct.Struct(">BL")  # compressed flag, message length
# grpc-core, grpc-go and grpc-java take message lengths as signed 32-bit: larger is not gRPC.
MAX_MESSAGE_LENGTH = (1 << 31) - 1

STATUS_NAMES: dict[int, str] = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
INTERNAL = 13

# The status a gRPC client reports when a response has no grpc-status, by HTTP status
# (grpc/doc/http-grpc-status-mapping.md); any other status is UNKNOWN.
HTTP_TO_STATUS = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
# The status a gRPC client reports for a stream reset with each HTTP/2 error code
# (grpc/doc/PROTOCOL-HTTP2.md, "Errors"); codes not listed are INTERNAL.
RESET_TO_STATUS = {"REFUSED_STREAM": 14, "CANCEL": 1, "ENHANCE_YOUR_CALM": 8, "INADEQUATE_SECURITY": 7}

TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
# What makes a :path not a method's: whitespace (as str.isspace, checked on every code point), a
# query or a fragment.
NOT_IN_PATH = re.compile(r"[\s?#]")
# The pure functions below answer for the few distinct values a connection repeats (its paths,
# its content-types, its grpc-status values): they remember that many answers, for values no
# longer than MEMO_LENGTH (a header value may be kilobytes long: memory stays small).
MEMO = 1024
MEMO_LENGTH = 256
TIMEOUT_UNITS_NS = {"H": 3_600_000_000_000, "M": 60_000_000_000, "S": 1_000_000_000, "m": 1_000_000, "u": 1_000, "n": 1}

_Key = TypeVar("_Key", str, bytes)
_Answer = TypeVar("_Answer")
_MISSING = object()


def _remembered(function: Callable[[_Key], _Answer]) -> Callable[[_Key], _Answer]:
    """`function` (pure, of one str or bytes) with its answers for values of at most MEMO_LENGTH
    remembered, at most MEMO of them (all forgotten when full)."""
    answers: dict[_Key, _Answer] = {}

    @functools.wraps(function)
    def remembered(value: _Key) -> _Answer:
        answer = answers.get(value, _MISSING)
        if answer is _MISSING:
            answer = function(value)
            if len(value) <= MEMO_LENGTH:
                if len(answers) >= MEMO:
                    answers.clear()
                answers[value] = answer
        return answer  # type: ignore[return-value]

    return remembered


OUTCOMES = {
    0: Outcome.OUTCOME_OK,
    CANCELLED: Outcome.OUTCOME_CANCELLED,
    DEADLINE_EXCEEDED: Outcome.OUTCOME_DEADLINE_EXCEEDED,
}


@_remembered
def is_grpc(content_type: str) -> bool:
    """application/grpc, optionally with a codec subtype (+proto, +json, ...) and parameters;
    not gRPC-Web (see the module docstring)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == GRPC_CONTENT_TYPE or (media.startswith("application/grpc+") and len(media) > 17)


@_remembered
def codec(content_type: str) -> str:
    """The message codec of a gRPC content-type: "proto" (also for plain application/grpc),
    "json", or the subtype as written."""
    media = content_type.split(";", 1)[0].strip().lower()
    _, plus, subtype = media.partition("+")
    return subtype if plus else "proto"


@_remembered
def split_path(path: str) -> tuple[str, str]:
    """The :path "/pkg.Service/Method" -> ("pkg.Service", "Method"); anything else ("", "")."""
    if not path.startswith("/"):
        return "", ""
    service, slash, method = path[1:].partition("/")
    if not slash or not service or not method or "/" in method or NOT_IN_PATH.search(path):
        return "", ""
    return service, method


def parse_timeout(value: str) -> int | None:
    """grpc-timeout ("100m", "5S", at most 8 digits and one unit of H M S m u n) in nanoseconds;
    None when malformed."""
    found = TIMEOUT.fullmatch(value.strip())
    if found is None:
        return None
    return int(found[1]) * TIMEOUT_UNITS_NS[found[2]]


def status_message(value: str) -> str:
    """grpc-message percent-decoded as UTF-8; an invalid escape stays as written and invalid
    UTF-8 becomes U+FFFD (the spec asks receivers never to fail on it)."""
    return unquote(value, encoding="utf-8", errors="replace") if "%" in value else value


def trace_bin(value: bytes) -> tuple[str, str] | None:
    """(trace id, span id) in hex from a grpc-trace-bin header value (base64 as carried in
    HTTP/2, padding optional) in OpenCensus's binary format: version 0, then fields by id (0:
    16-byte trace id, 1: 8-byte span id, 2: 1-byte options) until the end or the first unknown
    id. None when malformed, when an id is missing, or when an id is all zeros."""
    text = value.strip()
    if not text or len(text) > 256:
        return None
    try:
        raw = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    if not raw or raw[0] != 0:
        return None
    sizes = {0: 16, 1: 8, 2: 1}
    found: dict[int, bytes] = {}
    offset = 1
    while offset < len(raw):
        field_id = raw[offset]
        size = sizes.get(field_id)
        if size is None:
            break  # a field of a later version: the ones before it stand
        if offset + 1 + size > len(raw):
            return None
        found[field_id] = raw[offset + 1 : offset + 1 + size]
        offset += 1 + size
    trace_id, span_id = found.get(0), found.get(1)
    if trace_id is None or span_id is None or not any(trace_id) or not any(span_id):
        return None
    return trace_id.hex(), span_id.hex()


def message_encoding(headers: dict[bytes, bytes]) -> str:
    """grpc-encoding of a headers block, lower-cased; "" for none or identity."""
    raw = headers.get(b"grpc-encoding")
    if raw is None:
        return ""
    value = raw.decode("latin-1").strip().lower()
    return "" if value == "identity" else value


# -- messages ----------------------------------------------------------------------------------------


class _Collector:
    """The first message's bytes, at most `limit` of them after decompression."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.out = bytearray()
        self.truncated = False
        self.failed = False

    def feed(self, chunk: memoryview) -> None:
        room = self.limit - len(self.out)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(0, room)]
        self.out += chunk

    def result(self) -> bytes | None:
        return bytes(self.out)


class _Inflate(_Collector):
    """gzip or deflate, inflated as it arrives: the compressed bytes are never kept, and the
    output stops one byte past the limit (which tells a cut from an exact fit)."""

    def __init__(self, limit: int, wbits: int | None) -> None:
        super().__init__(limit)
        self.wbits = wbits  # None: deflate, zlib-wrapped or raw, decided by the first two bytes
        self.head = bytearray()
        self.inflater: zlib._Decompress | None = None if wbits is None else zlib.decompressobj(wbits)

    def feed(self, chunk: memoryview) -> None:
        if self.failed or self.truncated:
            return
        if self.inflater is None:
            self.head += chunk
            if len(self.head) < 2:
                return
            header = (self.head[0] << 8) | self.head[1]
            zlib_wrapped = self.head[0] & 0x0F == 8 and header % 31 == 0
            self.inflater = zlib.decompressobj(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)
            chunk = memoryview(bytes(self.head))
            self.head.clear()
        try:
            out = self.inflater.decompress(chunk, self.limit - len(self.out) + 1)
        except zlib.error:
            self.failed = True
            return
        self.out += out
        if len(self.out) > self.limit:
            del self.out[self.limit :]
            self.truncated = True

    def result(self) -> bytes | None:
        if self.failed:
            return None
        if self.truncated:
            return bytes(self.out)
        if self.inflater is None:  # fewer than two bytes: not deflate
            self.failed = True
            return None
        if not self.inflater.eof:
            with contextlib.suppress(zlib.error):
                self.out += self.inflater.flush()
            if not self.inflater.eof:
                self.failed = True
                return None
        return bytes(self.out[: self.limit])


class _Zstd(_Collector):
    """zstd: the compressed bytes are kept, then read back through a bounded reader (the
    zstandard module has no push decompressor with an output bound). They are kept up to
    zstd's worst-case size of `limit` bytes (ZSTD_compressBound: + 1/256, + the frame header), so
    a message that fits the limit decompresses whole; a longer one is cut anyway."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.compressed = _Collector(limit + limit // 128 + 1024)

    def feed(self, chunk: memoryview) -> None:
        self.compressed.feed(chunk)

    def result(self) -> bytes | None:
        import zstandard

        try:
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(self.compressed.out)) as reader:
                out = reader.read(self.limit + 1)
        except zstandard.ZstdError:
            self.failed = True
            return None
        if len(out) > self.limit or self.compressed.truncated:
            self.truncated = True
        return bytes(out[: self.limit])


def _zstd_available() -> bool:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


DECOMPRESSORS: dict[str, Callable[[int], _Collector]] = {
    "gzip": lambda limit: _Inflate(limit, 16 + zlib.MAX_WBITS),
    "x-gzip": lambda limit: _Inflate(limit, 16 + zlib.MAX_WBITS),
    "deflate": lambda limit: _Inflate(limit, None),
}
if _zstd_available():
    DECOMPRESSORS["zstd"] = _Zstd


@dataclass(frozen=True, slots=True)
class MessageState:
    """A MessageStream of uncompressed messages between two pieces of DATA (base.Snapshotting):
    - `messages`, `message_bytes`: the whole messages counted so far;
    - `first_message`: the first message once whole (None before);
    - `prefix`: a message prefix cut short by the piece's end (0 to 4 bytes);
    - `length`, `remaining`: the message being read (its length, and its bytes still to come;
      `remaining` 0 between messages);
    - `collected`: that message's bytes so far when it is the first one (None otherwise)."""

    messages: int
    message_bytes: int
    first_message: bytes | None
    prefix: bytes = b""
    length: int = 0
    remaining: int = 0
    collected: bytes | None = None


class MessageStream:
    """One direction's gRPC messages, from the DATA payloads in order (split anywhere).

    Counts every message; keeps only the first one (decompressed, at most `max_body_bytes`) and
    skips the bytes of the others. A malformed prefix (flag other than 0/1, a length over 2**31-1)
    adds a note and stops the parsing of this direction; nothing raises. Notes:
    grpc-bad-prefix, grpc-impossible-length, grpc-incomplete-message (the stream ended inside a
    message), grpc-compressed-unknown-encoding, grpc-compressed-without-encoding (the flag set
    without a grpc-encoding), grpc-decompress-failed, grpc-message-truncated (the first message,
    after decompression, is longer than max_body_bytes)."""

    __slots__ = (
        "_collector",
        "_flag",
        "_in_message",
        "_length",
        "_prefix",
        "_remaining",
        "compressed",
        "encoding",
        "finished",
        "first_message",
        "first_truncated",
        "max_body_bytes",
        "message_bytes",
        "messages",
        "notes",
        "stopped",
    )

    def __init__(self, encoding: str, max_body_bytes: int) -> None:
        encoding = encoding.strip().lower()
        self.encoding = "" if encoding == "identity" else encoding
        self.max_body_bytes = max(0, max_body_bytes)
        self.messages = 0
        self.message_bytes = 0
        self.compressed = 0
        self.first_message: bytes | None = None
        self.first_truncated = False
        self.notes: list[str] = []
        self.stopped = False
        self.finished = False
        self._prefix = bytearray()
        self._in_message = False
        self._flag = 0
        self._length = 0
        self._remaining = 0
        self._collector: _Collector | None = None

    def feed(self, data: bytes) -> None:
        if self.stopped or self.finished:
            return
        position, size = 0, len(data)
        if not self._in_message and not self._prefix:
            # The usual piece: whole messages from its start (a unary call's one message in its
            # DATA frame), read without the byte-by-byte state below. A message that goes on past
            # this piece, or a compressed first message, is left to it.
            while size - position >= PREFIX_SIZE:
                flag, length = PREFIX.unpack_from(data, position)
                if flag > 1:
                    self._stop("grpc-bad-prefix")
                    return
                if length > MAX_MESSAGE_LENGTH:
                    self._stop("grpc-impossible-length")
                    return
                start = position + PREFIX_SIZE
                if length > size - start:
                    break
                first = self.messages == 0 and self.first_message is None
                if first and flag:
                    break
                if first:
                    limit = self.max_body_bytes
                    self.first_message = bytes(data[start : start + min(length, limit)])
                    if length > limit:
                        self.first_truncated = True
                        self._note("grpc-message-truncated")
                self.messages += 1
                self.message_bytes += length
                if flag:
                    self.compressed += 1
                position = start + length
            if position == size:
                return
        view = memoryview(data)
        while position < size:
            if not self._in_message:
                take = min(PREFIX_SIZE - len(self._prefix), size - position)
                self._prefix += view[position : position + take]
                position += take
                if len(self._prefix) < PREFIX_SIZE:
                    return
                if not self._start_message():
                    return
                if self._remaining == 0:
                    self._end_message()
                continue
            take = min(self._remaining, size - position)
            if self._collector is not None:
                self._collector.feed(view[position : position + take])
            position += take
            self._remaining -= take
            if self._remaining == 0:
                self._end_message()

    def snapshot(self) -> MessageState:
        """The state between two pieces; NotAtBoundary for what a MessageState does not hold
        (compressed messages, notes, a stopped or finished stream, a first message over the bound)."""
        if self.compressed or self.notes or self.stopped or self.finished or self._flag or self.first_truncated:
            raise NotAtBoundary("gRPC: a message stream a MessageState does not describe")
        collector = self._collector
        if collector is not None and (type(collector) is not _Collector or collector.truncated):
            raise NotAtBoundary("gRPC: the first message is being decompressed")
        return MessageState(
            messages=self.messages,
            message_bytes=self.message_bytes,
            first_message=self.first_message,
            prefix=bytes(self._prefix),
            length=self._length if self._in_message else 0,
            remaining=self._remaining if self._in_message else 0,
            collected=bytes(collector.out) if collector is not None else None,
        )

    def restore(self, state: MessageState) -> None:
        """Continue from `state` (of a stream of the same encoding and bound)."""
        self.messages = state.messages
        self.message_bytes = state.message_bytes
        self.first_message = state.first_message
        self._prefix = bytearray(state.prefix)
        self._in_message = state.remaining > 0
        self._flag = 0
        self._length = state.length if self._in_message else 0
        self._remaining = state.remaining
        self._collector = None
        if state.collected is not None and self._in_message:
            self._collector = _Collector(self.max_body_bytes)
            self._collector.out += state.collected

    def finish(self) -> None:
        """The stream ended: a message cut short is noted (and not counted)."""
        if self.finished:
            return
        self.finished = True
        if not self.stopped and (self._in_message or self._prefix):
            self._note("grpc-incomplete-message")
        self._collector = None
        self._prefix.clear()

    def _start_message(self) -> bool:
        flag = self._prefix[0]
        length = int.from_bytes(self._prefix[1:PREFIX_SIZE], "big")
        self._prefix.clear()
        if flag > 1:
            return self._stop("grpc-bad-prefix")
        if length > MAX_MESSAGE_LENGTH:
            return self._stop("grpc-impossible-length")
        self._flag, self._length, self._remaining = flag, length, length
        self._in_message = True
        if self.messages == 0 and self.first_message is None:
            self._collector = self._first_collector(flag)
        return True

    def _first_collector(self, flag: int) -> _Collector | None:
        if not flag:
            return _Collector(self.max_body_bytes)
        if not self.encoding:
            self._note("grpc-compressed-without-encoding")
            return None
        factory = DECOMPRESSORS.get(self.encoding)
        if factory is None:
            self._note("grpc-compressed-unknown-encoding")
            return None
        return factory(self.max_body_bytes)

    def _end_message(self) -> None:
        self._in_message = False
        self.messages += 1
        self.message_bytes += self._length
        if self._flag:
            self.compressed += 1
        collector, self._collector = self._collector, None
        if collector is None:
            return
        if self._flag and self._length == 0:
            # Nothing to inflate: grpc-core and grpc-go hand an empty compressed message on as empty.
            self.first_message = b""
            return
        message = collector.result()
        if message is None:
            self._note("grpc-decompress-failed")
            return
        self.first_message = message
        if collector.truncated:
            self.first_truncated = True
            self._note("grpc-message-truncated")

    def _stop(self, note: str) -> bool:
        self.stopped = True
        self._in_message = False
        self._collector = None
        self._note(note)
        return False

    def _note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)


# -- the call ------------------------------------------------------------------------------------------


def apply(
    call: ApiCall,
    request_headers: dict[bytes, bytes],
    response_headers: dict[bytes, bytes],
    trailers: dict[bytes, bytes],
    request: MessageStream,
    response: MessageStream,
    descriptors: DescriptorSet | None,
    response_seen: bool,
) -> None:
    """Fill a call the HTTP/2 parser created with protocol "grpc" (see the module docstring).

    Status: grpc-status from the trailers, or from the response headers when the response was
    Trailers-Only (`grpc.trailers_only`). Without one, `status` stays "" and `grpc.status_code`
    is what a gRPC client reports instead: the HTTP status mapped per gRPC's table when it is not
    200 (outcome error, note grpc-status-from-http); INTERNAL when the server ended the stream
    without a status (error, note grpc-status-missing); the call is `no_response` when the
    response never came or never ended (then status_code stays 0).
    """
    detail = call.grpc
    path = request_headers.get(b":path", b"").decode("latin-1")
    call.method = request_headers.get(b":method", b"POST").decode("latin-1") or "POST"
    call.path = path
    service, method = split_path(path)
    detail.service = service
    detail.method = method
    content_type = request_headers.get(b"content-type", b"").decode("latin-1")
    detail.content_type = content_type
    detail.request_encoding = message_encoding(request_headers)
    detail.response_encoding = message_encoding(response_headers)
    detail.request_messages = request.messages
    detail.response_messages = response.messages
    detail.request_message_bytes = request.message_bytes
    detail.response_message_bytes = response.message_bytes
    detail.request_compressed = request.compressed
    detail.response_compressed = response.compressed
    timeout = request_headers.get(b"grpc-timeout")
    if timeout is not None:
        timeout_ns = parse_timeout(_text(timeout))
        if timeout_ns is None:
            _note(call, "grpc-bad-timeout")
        else:
            detail.timeout_ns = timeout_ns

    method_info = descriptors.method(service, method) if descriptors is not None else None
    detail.call_type = method_info.call_type if method_info is not None else _call_type(request, response)
    message_codec = codec(content_type)
    if request.first_message is not None:
        detail.request_message = _message_text(
            request, message_codec, descriptors, method_info.input_type if method_info else None
        )
    if response.first_message is not None:
        detail.response_message = _message_text(
            response, message_codec, descriptors, method_info.output_type if method_info else None
        )
    for side, stream in (("request", request), ("response", response)):
        for note in stream.notes:
            _note(call, f"{side}-{note}")

    _status(call, response_headers, trailers, response_seen)

    if (value := request_headers.get(b"grpc-trace-bin")) is not None and not call.trace_id:
        ids = trace_bin(value)
        if ids is not None:
            call.trace_id, call.parent_span_id = ids


def reset_outcome(
    call: ApiCall, error_code: str, by_client: bool, request_ts_ns: int, reset_ts_ns: int, timeout_ns: int
) -> None:
    """The outcome of a stream ended by RST_STREAM (`error_code` by name, e.g. "CANCEL").

    A reset after the grpc-status was seen changes nothing (a server may reset with NO_ERROR
    once it has answered). Otherwise: the client's CANCEL once the grpc-timeout had elapsed is
    DEADLINE_EXCEEDED (the client's deadline timer fired: the header carries the time left,
    rounded up to its unit, so the elapsed time is allowed to fall short of it by 1% or 2 ms),
    another client CANCEL is CANCELLED, anything else is an error. `grpc.status_code` becomes
    what the client reports (DEADLINE_EXCEEDED, or per gRPC's RST_STREAM table)."""
    if call.status:
        return
    code = error_code.upper()
    if by_client and code == "CANCEL":
        elapsed = reset_ts_ns - request_ts_ns
        if timeout_ns > 0 and elapsed >= timeout_ns - max(2_000_000, timeout_ns // 100):
            call.outcome = Outcome.OUTCOME_DEADLINE_EXCEEDED
            call.grpc.status_code = DEADLINE_EXCEEDED
            return
        call.outcome = Outcome.OUTCOME_CANCELLED
        call.grpc.status_code = CANCELLED
        return
    call.outcome = Outcome.OUTCOME_ERROR
    call.grpc.status_code = RESET_TO_STATUS.get(code, INTERNAL)


def _status(
    call: ApiCall, response_headers: dict[bytes, bytes], trailers: dict[bytes, bytes], response_seen: bool
) -> None:
    detail = call.grpc
    raw = trailers.get(b"grpc-status")
    message = trailers.get(b"grpc-message")
    if raw is None and b"grpc-status" in response_headers:
        raw = response_headers[b"grpc-status"]
        message = response_headers.get(b"grpc-message")
        detail.trailers_only = True
    if message is not None:
        detail.status_message = status_message(message.decode("utf-8", "replace"))
    if raw is not None:
        status, code, outcome, valid = _grpc_status(raw)
        call.status = status
        detail.status_code = code
        call.outcome = outcome
        if not valid:
            _note(call, "grpc-bad-status")
        return
    call.status = ""
    http_status = _text(response_headers.get(b":status", b"")).strip()
    if response_seen and http_status and http_status != "200":
        call.outcome = Outcome.OUTCOME_ERROR
        # isascii: str.isdigit also takes "²" (a latin-1 byte 0xb2), which int() refuses.
        digits = http_status.isascii() and http_status.isdigit()
        detail.status_code = HTTP_TO_STATUS.get(int(http_status) if digits else 0, UNKNOWN)
        _note(call, "grpc-status-from-http")
    elif response_seen and call.HasField("http2") and call.http2.response_end_stream:
        call.outcome = Outcome.OUTCOME_ERROR
        detail.status_code = INTERNAL
        _note(call, "grpc-status-missing")
    else:
        call.outcome = Outcome.OUTCOME_NO_RESPONSE


@_remembered
def _grpc_status(raw: bytes) -> tuple[str, int, Outcome.ValueType, bool]:
    """A grpc-status value: (the call's status, grpc.status_code, outcome, whether it is a
    number); not a number is UNKNOWN with the text as written (at most 32 characters) as the
    status."""
    text = raw.decode("latin-1").strip()
    if text.isascii() and text.isdigit() and len(text) <= 10:
        code = int(text)
        return str(code), code, OUTCOMES.get(code, Outcome.OUTCOME_ERROR), True
    return text[:32], UNKNOWN, Outcome.OUTCOME_ERROR, False


def _call_type(request: MessageStream, response: MessageStream) -> str:
    sent, received = request.messages, response.messages
    if sent == 0 and received == 0:
        return ""
    if sent <= 1:
        return "unary" if received <= 1 else "server_streaming"
    return "client_streaming" if received <= 1 else "bidi_streaming"


def _message_text(
    stream: MessageStream, message_codec: str, descriptors: DescriptorSet | None, type_name: str | None
) -> str:
    """The first message as JSON text, bounded by the stream's max_body_bytes."""
    data = stream.first_message or b""
    max_chars = max(64, stream.max_body_bytes)
    value: object
    if message_codec == "json":
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            value = {"@undecoded": base64.b64encode(data).decode("ascii")}
    elif message_codec == "proto":
        decoded = None
        if descriptors is not None and type_name and not stream.first_truncated:
            decoded = descriptors.decode(type_name, data)
        if decoded is None:
            return schemaless_json_text(data, max_chars)
        value = decoded
    else:
        return ""  # a codec Trawl cannot read (thrift, flatbuffers...)
    return to_json_text(value, max_chars)


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def _note(call: ApiCall, note: str) -> None:
    if note not in call.notes:
        call.notes.append(note)
