"""AMQP 0-9-1 (sans-IO): RabbitMQ's protocol, methods paired per channel, messages one-way.

Three parts, as the style guide asks for a protocol with rich framing:

- framing (`_Reader`): one per direction; splits the byte stream into frames (7-byte header:
  type, channel, size; payload; the frame-end octet 0xCE). Method and content-header frames are
  decoded by `pamqp` (`pamqp.frame.unmarshal`, the maintained AMQP codec RabbitMQ's Python
  clients use); body frames are opaque bytes and are streamed here, never buffered whole, so a
  large message costs at most `max_body_bytes`. Framing is hand-written only because pamqp
  decodes one complete frame at a time: finding where a frame ends, bounding its size and
  resynchronising after a capture gap are not its job.
- pairing (`AmqpParser`): a synchronous method (`queue.declare`, `basic.consume`,
  `connection.start`, `channel.close`...) waits for its `-ok` (pamqp's `valid_responses`) from
  the other side on the same channel; the broker's requests (`connection.start`, `tune`,
  `secure`, a broker-initiated `channel.close`, `basic.cancel`) are paired the same way. A
  synchronous method sent with `nowait` is one-way.
- record building (`_start_call` and friends): one `ApiCall` per pair or per one-way method.

What becomes a call:
- a pair: `method` = the request (`queue.declare`), the detail's `response_method` the answer
  (`queue.declare-ok`, `basic.get-empty`, or the `channel.close` that refused it);
- one-way messages: `basic.publish`, `basic.deliver`, `basic.return` (with their content: the
  content header's properties and the body frames, reassembled, kept up to `max_body_bytes`),
  `basic.ack`, `basic.nack`, `basic.reject`, `basic.recover-async`, `connection.blocked` /
  `unblocked`. Their content is the call's `request` (the message that was sent), and
  `detail.from_server` says it went broker -> client (`basic.deliver`, `basic.return`, and a
  `basic.ack`/`basic.nack` from the broker, which is a publisher confirm). A one-way call has
  no response and its outcome is decided at once; `detail.one_way` is set.
- `basic.get`'s `get-ok` carries its message in the call's `response`.
- heartbeats are counted (`amqp_heartbeats`), not reported.

Summary triple: `method` = `class.method` in the specification's spelling (`basic.publish`,
`queue.declare-ok`); `path` = `exchange/routing-key` for publish, deliver and return (the
default exchange is the empty name, so `/orders`), the queue for queue methods, `basic.get`
and `basic.consume`, the exchange for exchange methods, the virtual host for
`connection.open`; `status` = `ok`, or the reply code of the `connection.close` /
`channel.close` that answered (`404`), or of a `basic.return` (`312`), or `nack` for a
publish the broker refused. Outcome: a reply code other than 200 is an error (a close with 200
is a normal close), so is a `basic.return` and a broker's `basic.nack`.

Errors: a broker that closes a channel (or the connection) answers the request pending on it:
that request becomes an error call with the close's reply code and text, then the close itself
is a call paired with its `close-ok`.

Credentials: `connection.start-ok`'s `response` (PLAIN's "\\0user\\0password", AMQPLAIN's
LOGIN/PASSWORD table), `connection.secure` / `secure-ok` and `connection.update-secret` are
never put on a call: the detail says only `[REDACTED]` and the mechanism.

Bounds: pending requests per connection (`max_pending_requests`; the oldest becomes
`no_response` with the note "pending-limit", counted `amqp_pending_limit`); frames larger than
the negotiated `frame_max` are counted (`amqp_frames_over_frame_max`); a method or content
header frame larger than `MAX_BUFFERED_FRAME` is skipped, counted (`amqp_frames_too_large`);
a frame that claims more than `HARD_FRAME_MAX` means framing is lost (`ProtocolError`), as does
a wrong frame-end octet or an unknown frame type. A frame pamqp cannot decode is counted
(`amqp_malformed_frames`) and skipped: its length was known, so the framing is kept. Header
tables are kept up to `MAX_HEADERS` entries of `MAX_VALUE` characters.

Gaps: a hole inside a body frame only shortens the body (note "gap"); anywhere else the
direction resynchronises at the next plausible frame (a known frame type, a known method,
the frame-end octet where the size says), counted `amqp_resyncs`.
"""

from __future__ import annotations

import datetime
import operator
import re
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any

from pamqp import commands, frame, header
from pamqp.base import Frame

from trawl.dissector.calls import OUTCOME_ERROR, OUTCOME_OK, finish_call, new_call
from trawl.dissector.protocols.base import (
    Direction,
    FlowInfo,
    NotAtBoundary,
    ParserLimits,
    ProtocolError,
    ProtocolSpec,
)
from trawl.dissector.protocols.trace import trace_context
from trawl.v1.calls_pb2 import AmqpDetail, ApiCall, Message

AMQP_PORTS = frozenset({5672})
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_TYPES = frozenset({FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT})
FRAME_END = 0xCE
FRAME_HEAD = struct.Struct(">BHI")
METHOD_INDEX = struct.Struct(">I")

# No broker negotiates frames this large; a size beyond it is misframed bytes, not a frame.
HARD_FRAME_MAX = 16 * 1024 * 1024
# Method and content-header frames are decoded whole, so buffered: this is the most one may take.
MAX_BUFFERED_FRAME = 1024 * 1024
# A resynchronisation accepts a frame no larger than this (the end octet must be in view).
RESYNC_FRAME_MAX = 128 * 1024
MAX_HEADERS = 64
MAX_VALUE = 1024
REDACTED = "[REDACTED]"
REPLY_SUCCESS = 200
STREAM_BODY, STREAM_SKIP = 1, 2


def _spec_name(pamqp_name: str) -> tuple[str, str]:
    """pamqp's "Queue.DeclareOk" -> ("queue", "declare-ok"), the specification's spelling."""
    klass, method = pamqp_name.split(".")
    return klass.lower(), re.sub(r"(?<!^)([A-Z])", r"-\1", method).lower()


# Method index (class id << 16 | method id) -> (class, method, "class.method", pamqp class).
METHODS: dict[int, tuple[str, str, str, type[Frame]]] = {}
_cls: type[Frame]
for _index, _cls in commands.INDEX_MAPPING.items():
    _klass, _method = _spec_name(_cls.name)
    METHODS[_index] = (_klass, _method, f"{_klass}.{_method}", _cls)
# pamqp name -> "class.method", and every name that answers some request.
SPEC_NAMES = {cls.name: full for _, _, full, cls in METHODS.values()}
RESPONSES = frozenset(name for _, _, _, cls in METHODS.values() for name in cls.valid_responses)
# Methods followed by a content header and body frames.
CONTENT_METHODS = frozenset({"Basic.Publish", "Basic.Deliver", "Basic.Return", "Basic.GetOk"})
# The basic properties as the specification names them (pamqp's attribute -> AMQP name).
PROPERTY_NAMES = {
    "content_type": "content-type",
    "content_encoding": "content-encoding",
    "delivery_mode": "delivery-mode",
    "priority": "priority",
    "correlation_id": "correlation-id",
    "reply_to": "reply-to",
    "expiration": "expiration",
    "message_id": "message-id",
    "timestamp": "timestamp",
    "message_type": "type",
    "user_id": "user-id",
    "app_id": "app-id",
    "cluster_id": "cluster-id",
}
# In one C call (getattr per property cost a tenth of a publish's time).
PROPERTY_VALUES = operator.attrgetter(*PROPERTY_NAMES)
PROPERTY_LABELS = tuple(PROPERTY_NAMES.values())
TRACE_HEADERS = frozenset({"traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid"})
# Client and server properties worth keeping from connection.start / start-ok.
PEER_PROPERTIES = ("product", "version", "platform", "connection_name", "cluster_name")


def probe(client: bytes, server: bytes, flow: FlowInfo) -> int:
    """3: the 0-9-1 protocol header; 2: a whole method frame of a known method, or a heartbeat
    (a capture that started mid-connection); 1: port 5672; 0: not AMQP 0-9-1."""
    if client.startswith(PROTOCOL_HEADER):
        return 3
    if _plausible_frame(client) or _plausible_frame(server):
        return 2
    return 1 if flow.server_port in AMQP_PORTS else 0


def _plausible_frame(data: bytes) -> bool:
    if len(data) < 8:
        return False
    kind, channel, size = FRAME_HEAD.unpack_from(data)
    size = int(size)
    if kind == FRAME_HEARTBEAT:
        return size == 0 and channel == 0 and data[7] == FRAME_END
    if kind != FRAME_METHOD or size < 4 or size > RESYNC_FRAME_MAX or len(data) < 11:
        return False
    if METHOD_INDEX.unpack_from(data, 7)[0] not in METHODS:
        return False
    return len(data) < 8 + size or data[7 + size] == FRAME_END


def _text(value: Any) -> str:
    """A table value as text, bounded (bytes as UTF-8, nested tables and arrays as Python shows them)."""
    if isinstance(value, bytes):
        text = value.decode("utf-8", "replace")
    elif isinstance(value, str):
        text = value
    elif isinstance(value, datetime.datetime):
        text = value.isoformat()  # AMQP timestamps are POSIX seconds; pamqp gives them in UTC
    else:
        text = str(value)
    return text[:MAX_VALUE]


class _Content:
    """A message being assembled from a content method, its content header and body frames."""

    __slots__ = ("body", "call", "expected", "message", "received", "report", "wire")

    def __init__(self, call: ApiCall, message: Message, wire: int, report: bool = True) -> None:
        self.call = call
        self.message = message
        self.report = report  # False: the late answer of a call already reported, framed only
        self.expected = -1  # body size from the content header; -1 until it came
        self.received = 0
        self.body = bytearray()
        self.wire = wire


class _Pending:
    """A synchronous request waiting for its answer."""

    __slots__ = ("answers", "call", "channel", "direction", "emitted")

    def __init__(self, call: ApiCall, direction: Direction, channel: int, answers: frozenset[str]) -> None:
        self.call = call
        self.direction = direction
        self.channel = channel
        self.answers = answers
        self.emitted = False  # reported as no_response (timeout): kept in line so a late answer pairs with it


class _Reader:
    """Framing state of one direction."""

    __slots__ = ("buf", "buf_ts", "end_due", "left", "offset", "resync", "started", "stream_channel", "streaming")

    def __init__(self) -> None:
        self.buf = b""
        self.buf_ts = 0  # when the first byte of `buf` arrived
        self.offset = 0  # stream offset of buf[0]
        self.started = False  # past the protocol header's place (the stream's first bytes)
        # A frame read piece by piece instead of whole: a body frame (STREAM_BODY) or one too
        # large to decode (STREAM_SKIP); `left` payload bytes to come, then its frame-end octet.
        self.streaming = 0
        self.stream_channel = 0
        self.left = 0
        self.end_due = False
        self.resync = False

    def idle(self) -> bool:
        return not (self.buf or self.streaming or self.resync)


@dataclass(frozen=True, slots=True)
class AmqpState:
    """An AMQP connection between exchanges: no request pending, no message being assembled,
    both directions between frames with nothing buffered.

    - `ordinal`: calls begun on the connection (each call id hashes its ordinal);
    - `offsets`: (client -> server, server -> client) stream offsets of the next byte;
    - `frame_max`: the negotiated frame size (0 before tune / tune-ok);
    - `consumers`: (consumer tag, queue) of the consumers basic.consume-ok confirmed, so a later
      basic.deliver names its queue;
    - `confirm_channels`: channels in publisher-confirm mode (confirm.select).
    """

    ordinal: int
    offsets: tuple[int, int]
    frame_max: int = 0
    consumers: tuple[tuple[str, str], ...] = ()
    confirm_channels: tuple[int, ...] = ()


class AmqpParser:
    """One AMQP 0-9-1 connection (both directions); see the module docstring for the rules."""

    def __init__(self, flow: FlowInfo, limits: ParserLimits) -> None:
        self.flow = flow
        self.limits = limits
        self.readers = (_Reader(), _Reader())
        self.pending: deque[_Pending] = deque()
        # (direction, channel) -> the message being assembled there.
        self.contents: dict[tuple[int, int], _Content] = {}
        self.consumers: dict[str, str] = {}
        self.confirm_channels: set[int] = set()
        self.frame_max = 0
        self.ordinal = 0
        self.counts: dict[str, int] = {}  # what it counted without making calls (engine._parser_counts)
        self.out: list[ApiCall] = []

    # -- state at an exchange boundary (base.Snapshotting) ---------------------------------------

    def snapshot(self) -> AmqpState:
        if self.out or self.contents or any(not pending.emitted for pending in self.pending):
            raise NotAtBoundary("AMQP: a request is pending or a message is being assembled")
        if not all(reader.idle() for reader in self.readers):
            raise NotAtBoundary("AMQP: a frame is being read")
        return AmqpState(
            ordinal=self.ordinal,
            offsets=(self.readers[0].offset, self.readers[1].offset),
            frame_max=self.frame_max,
            consumers=tuple(self.consumers.items()),
            confirm_channels=tuple(sorted(self.confirm_channels)),
        )

    def restore(self, state: AmqpState) -> None:
        self.readers = (_Reader(), _Reader())
        for reader, offset in zip(self.readers, state.offsets, strict=True):
            reader.offset = offset
            reader.started = offset > 0  # at offset 0 the protocol header may still come
        self.pending.clear()
        self.contents = {}
        self.out = []
        self.ordinal = state.ordinal
        self.frame_max = state.frame_max
        self.consumers = dict(state.consumers)
        self.confirm_channels = set(state.confirm_channels)

    # -- the StreamParser interface -----------------------------------------------------------

    def feed(self, direction: Direction, data: bytes, ts_ns: int) -> list[ApiCall]:
        reader = self.readers[direction]
        if reader.buf:
            reader.buf += data
        else:
            reader.buf = data
            reader.buf_ts = ts_ns
        self._run(direction, ts_ns)
        return self._take()

    def gap(self, direction: Direction, size: int, ts_ns: int) -> list[ApiCall]:
        reader = self.readers[direction]
        if reader.streaming == STREAM_BODY and not reader.buf and size < reader.left:
            # The hole is inside a body frame: framing survives, the body is short.
            reader.left -= size
            reader.offset += size
            content = self.contents.get((direction, reader.stream_channel))
            if content is not None:
                content.received += size
                content.wire += size
                _note(content.call, "gap")
            return []
        reader.offset += len(reader.buf) + size
        reader.buf = b""
        reader.streaming = reader.left = 0
        reader.end_due = False
        reader.started = True
        reader.resync = True
        # The messages this direction was assembling lost bytes: report what there is.
        for key in [key for key in self.contents if key[0] == direction]:
            content = self.contents[key]
            if size:
                _note(content.call, "gap")
            self._content_done(key, ts_ns)
        return self._take()

    def expire(self, now_ns: int) -> list[ApiCall]:
        timeout = self.limits.request_timeout_ns
        for pending in self.pending:
            if not pending.emitted and now_ns - pending.call.request.ts > timeout:
                self._no_response(pending, "timeout")
        return self._take()

    def finish(self, ts_ns: int) -> list[ApiCall]:
        for key in list(self.contents):
            _note(self.contents[key].call, "truncated")
            self._content_done(key, ts_ns)
        while self.pending:
            self._no_response(self.pending.popleft(), "")
        for reader in self.readers:
            reader.buf = b""
            reader.streaming = reader.left = 0
            reader.end_due = False
        return self._take()

    def _take(self) -> list[ApiCall]:
        """The calls completed so far; never the parser's own list (a caller may extend what it got)."""
        out = self.out
        self.out = []
        return out

    def _count(self, name: str, amount: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + amount

    # -- framing -------------------------------------------------------------------------------

    def _run(self, direction: Direction, ts_ns: int) -> None:
        reader = self.readers[direction]
        buf = reader.buf
        size = len(buf)
        pos = 0
        while pos < size:
            # The first frame in view began in an earlier segment when pos is 0.
            start_ts = reader.buf_ts if pos == 0 else ts_ns
            if reader.streaming:
                if reader.left:
                    take = min(reader.left, size - pos)
                    if reader.streaming == STREAM_BODY:
                        self._body(direction, reader.stream_channel, buf[pos : pos + take])
                    reader.left -= take
                    pos += take
                    continue
                if buf[pos] != FRAME_END:
                    raise ProtocolError(f"AMQP frame-end octet missing (0x{buf[pos]:02x})")
                pos += 1
                if reader.streaming == STREAM_BODY:
                    self._body_frame_done(direction, reader.stream_channel, ts_ns)
                reader.streaming = 0
                continue
            if reader.resync:
                found, ready = self._resync(buf, pos)
                pos = found
                if not ready:
                    break
                self._count("amqp_resyncs")
                reader.resync = False
                continue
            if not reader.started:
                if size - pos < 8 and b"AMQP".startswith(buf[pos : pos + 4]):
                    break  # perhaps the protocol header, not all here yet
                reader.started = True
                if buf.startswith(b"AMQP", pos):
                    self._protocol_header(direction, buf[pos : pos + 8], start_ts, ts_ns)
                    pos += 8
                    continue
            if size - pos < 7:
                break
            kind, channel, length = FRAME_HEAD.unpack_from(buf, pos)
            if kind not in FRAME_TYPES:
                raise ProtocolError(f"unknown AMQP frame type {kind}")
            if length > HARD_FRAME_MAX:
                raise ProtocolError(f"AMQP frame of {length} bytes: framing lost")
            if self.frame_max and length + 8 > self.frame_max:
                self._count("amqp_frames_over_frame_max")
            if kind == FRAME_BODY or (kind != FRAME_HEARTBEAT and length > MAX_BUFFERED_FRAME):
                if kind == FRAME_BODY:
                    content = self.contents.get((direction, channel))
                    if content is not None:
                        content.wire += length + 8
                    end = pos + 7 + length
                    if end < size:  # all in view (the common small message): no streaming state
                        if buf[end] != FRAME_END:
                            raise ProtocolError(f"AMQP frame-end octet missing (0x{buf[end]:02x})")
                        self._body(direction, channel, buf[pos + 7 : end])
                        self._body_frame_done(direction, channel, ts_ns)
                        pos = end + 1
                        continue
                    reader.streaming = STREAM_BODY
                else:
                    reader.streaming = STREAM_SKIP
                    self._count("amqp_frames_too_large")
                reader.stream_channel = channel
                reader.left = length
                pos += 7
                continue
            end = pos + 7 + length
            if end >= size:
                break
            if buf[end] != FRAME_END:
                raise ProtocolError(f"AMQP frame-end octet missing (0x{buf[end]:02x})")
            self._frame(direction, kind, channel, buf[pos : end + 1], start_ts, ts_ns)
            pos = end + 1
        reader.offset += pos
        if pos >= size:
            reader.buf = b""
        elif pos:
            reader.buf = buf[pos:]
            reader.buf_ts = ts_ns

    def _resync(self, buf: bytes, pos: int) -> tuple[int, bool]:
        """(offset, True) of the next plausible frame from `pos`; (offset, False) where bytes must
        be kept until more come (a candidate whose end is not in view, or the last 6 bytes)."""
        size = len(buf)
        while pos + 7 <= size:
            kind, channel, length = FRAME_HEAD.unpack_from(buf, pos)
            plausible = kind in FRAME_TYPES and length <= RESYNC_FRAME_MAX
            if plausible and kind == FRAME_HEARTBEAT:
                plausible = length == 0 and channel == 0
            if plausible and kind == FRAME_METHOD:
                if length < 4:
                    plausible = False
                elif pos + 11 > size:
                    return pos, False
                else:
                    plausible = METHOD_INDEX.unpack_from(buf, pos + 7)[0] in METHODS
            if plausible:
                end = pos + 7 + length
                if end >= size:
                    return pos, False
                if buf[end] == FRAME_END:
                    return pos, True
            pos += 1
        return pos, False

    def _frame(self, direction: Direction, kind: int, channel: int, data: bytes, start_ts: int, ts_ns: int) -> None:
        if kind == FRAME_HEARTBEAT:
            self._count("amqp_heartbeats")
            return
        try:
            _, _, value = frame.unmarshal(data)
        except Exception:
            # pamqp reads untrusted bytes: whatever it raises (UnmarshalingException, ValueError,
            # struct.error, RecursionError on deeply nested tables...) means this frame is
            # malformed; its length was known, so the frames after it are still framed.
            self._count("amqp_malformed_frames")
            return
        if isinstance(value, header.ContentHeader):
            self._content_header(direction, channel, value, len(data), ts_ns)
        elif isinstance(value, Frame):
            self._method(direction, channel, value, len(data), start_ts, ts_ns)

    def _protocol_header(self, direction: Direction, data: bytes, start_ts: int, ts_ns: int) -> None:
        if direction == Direction.CLIENT_TO_SERVER or len(data) < 8:
            return
        # The server answers a protocol header only to refuse its version (and then closes).
        call = self._start_call("connection.protocol-header", "", start_ts, direction, 8)
        call.amqp.properties["server-version"] = f"{data[5]}-{data[6]}-{data[7]}"
        call.status = "version-refused"
        self._one_way(call, error=True, ts_ns=ts_ns)

    # -- content -------------------------------------------------------------------------------

    def _content_header(
        self, direction: Direction, channel: int, value: header.ContentHeader, wire: int, ts_ns: int
    ) -> None:
        content = self.contents.get((direction, channel))
        if content is None or content.expected >= 0:
            self._count("amqp_orphan_content")
            return
        content.wire += wire
        content.expected = value.body_size
        properties = value.properties
        kept = content.call.amqp.properties
        for name, item in zip(PROPERTY_LABELS, PROPERTY_VALUES(properties), strict=True):
            if item is not None and item != "":
                kept[name] = _text(item)
        table = properties.headers
        if table:
            add = content.message.headers.add
            trace: dict[bytes, bytes] | None = None
            for index, (name, item) in enumerate(table.items()):
                if index >= MAX_HEADERS:
                    _note(content.call, "headers-truncated")
                    break
                text = _text(item)
                add(name=name[:MAX_VALUE], value=text)
                lowered = name.lower()
                if lowered in TRACE_HEADERS:
                    if trace is None:
                        trace = {}
                    trace[lowered.encode()] = text.encode("utf-8", "replace")
            if trace is not None:
                trace_context(content.call, trace)
        if value.body_size == 0:
            self._content_done((direction, channel), ts_ns)

    def _body(self, direction: Direction, channel: int, chunk: bytes) -> None:
        content = self.contents.get((direction, channel))
        if content is None or content.expected < 0:
            self._count("amqp_orphan_content")
            return
        content.received += len(chunk)
        room = self.limits.max_body_bytes - len(content.body)
        if room > 0:
            content.body += chunk[:room]

    def _body_frame_done(self, direction: Direction, channel: int, ts_ns: int) -> None:
        content = self.contents.get((direction, channel))
        if content is not None and content.expected >= 0 and content.received >= content.expected:
            self._content_done((direction, channel), ts_ns)

    def _content_done(self, key: tuple[int, int], ts_ns: int) -> None:
        content = self.contents.pop(key)
        if not content.report:
            return
        message = content.message
        call = content.call
        message.size = content.wire
        message.body_size = max(content.expected, content.received)
        message.body = bytes(content.body)
        message.body_truncated = message.body_size - len(content.body)
        message.end_ts = ts_ns
        if content.expected < 0 or content.received < content.expected:
            _note(call, "truncated-content")
            self._count("amqp_truncated_content")
        if message is call.response:
            finish_call(call, call.response.ts, error=False)
        self.out.append(call)

    # -- methods -------------------------------------------------------------------------------

    def _method(self, direction: Direction, channel: int, method: Frame, wire: int, start_ts: int, ts_ns: int) -> None:
        key = (direction, channel)
        if key in self.contents:
            # A method on a channel whose message had not ended: that message was cut short.
            self._content_done(key, ts_ns)
        name = method.name
        if name in RESPONSES:
            self._response(direction, channel, method, wire, start_ts, ts_ns)
            return
        call = self._start_call(SPEC_NAMES[name], _path(method), start_ts, direction, wire)
        detail = call.amqp
        detail.channel = channel
        self._describe(detail, method)
        if name in CONTENT_METHODS:
            # One-way, with its message still to come: reported when the body is complete.
            detail.one_way = True
            returned = name == "Basic.Return"
            if returned:
                call.status = str(detail.reply_code)
            call.outcome = OUTCOME_ERROR if returned else OUTCOME_OK
            self.contents[key] = _Content(call, call.request, wire)
            return
        if method.synchronous and not getattr(method, "nowait", False):  # nowait: no answer comes
            if name in ("Connection.Close", "Channel.Close"):
                self._close(direction, channel, method, call, ts_ns)
            self._request(call, direction, channel, method)
            return
        error = name == "Basic.Nack" and direction == Direction.SERVER_TO_CLIENT
        if error:
            call.status = "nack"
        self._one_way(call, error, ts_ns)

    def _start_call(self, full: str, path: str, start_ts: int, direction: Direction, wire: int) -> ApiCall:
        call = new_call(self.flow, "amqp", start_ts, self.ordinal)
        self.ordinal += 1
        call.method = full
        call.path = path
        call.status = "ok"
        call.request.size = wire
        detail = call.amqp
        detail.class_name, _, detail.method_name = full.partition(".")
        detail.from_server = direction == Direction.SERVER_TO_CLIENT
        return call

    def _one_way(self, call: ApiCall, error: bool, ts_ns: int) -> None:
        """Report a message that expects no answer: its outcome is known now (no elapsed time)."""
        call.amqp.one_way = True
        call.request.end_ts = ts_ns
        call.outcome = OUTCOME_ERROR if error else OUTCOME_OK
        self.out.append(call)

    def _request(self, call: ApiCall, direction: Direction, channel: int, method: Frame) -> None:
        call.request.end_ts = call.request.ts
        if len(self.pending) >= self.limits.max_pending_requests:
            self._count("amqp_pending_limit")
            oldest = self.pending.popleft()
            self._no_response(oldest, "pending-limit")
        self.pending.append(_Pending(call, direction, channel, frozenset(method.valid_responses)))

    def _response(
        self, direction: Direction, channel: int, method: Frame, wire: int, start_ts: int, ts_ns: int
    ) -> None:
        name = method.name
        asker = direction.reverse
        pending = None
        for candidate in self.pending:
            if candidate.direction == asker and candidate.channel == channel and name in candidate.answers:
                pending = candidate
                break
        if pending is None:
            self._count("amqp_responses_without_request")
            call = self._start_call(SPEC_NAMES[name], _path(method), start_ts, direction, 0)
            call.amqp.channel = channel
            call.amqp.response_method = SPEC_NAMES[name]
            _note(call, "response without request")
        else:
            self.pending.remove(pending)
            if pending.emitted:
                # Already reported as no_response; its late answer closes it (and a get-ok's
                # message is framed, not reported, rather than counted as orphan content).
                if name == "Basic.GetOk":
                    self.contents[(direction, channel)] = _Content(ApiCall(), Message(), wire, report=False)
                return
            call = pending.call
            call.amqp.response_method = SPEC_NAMES[name]
        call.response.ts = start_ts
        call.response.size = wire
        call.response.end_ts = ts_ns
        self._describe(call.amqp, method)
        if pending is not None:
            self._answered(call, method)
        if name == "Basic.GetOk":
            self.contents[(direction, channel)] = _Content(call, call.response, wire)
            return
        if name == "Channel.CloseOk":
            self._channel_gone(channel, ts_ns)
        elif name == "Connection.CloseOk":
            self._channel_gone(None, ts_ns)
        finish_call(call, start_ts, error=_is_error(call.amqp.reply_code))
        self.out.append(call)

    def _answered(self, call: ApiCall, method: Any) -> None:
        """What an answer teaches the connection (frame size, consumers, confirm mode); a queue
        the broker named (queue.declare of "") becomes the call's path."""
        name = method.name
        detail = call.amqp
        if name == "Connection.TuneOk":
            self.frame_max = method.frame_max
        elif name == "Queue.DeclareOk":
            call.path = detail.queue
        elif name == "Basic.ConsumeOk":
            if len(self.consumers) < 4096:
                self.consumers[method.consumer_tag] = detail.queue
        elif name == "Basic.CancelOk":
            self.consumers.pop(method.consumer_tag, None)
        elif name == "Confirm.SelectOk" and len(self.confirm_channels) < 65536:
            self.confirm_channels.add(detail.channel)

    def _close(self, direction: Direction, channel: int, method: Any, call: ApiCall, ts_ns: int) -> None:
        """A peer closes a channel (or, on channel 0, the connection): the requests the other side
        has pending there are answered by it, with its reply code."""
        code = method.reply_code
        call.status = str(code)
        detail = call.amqp
        detail.reply_code = code
        detail.reply_text = method.reply_text
        if method.class_id:
            failed = METHODS.get(method.class_id << 16 | method.method_id)
            if failed is not None:
                detail.properties["failed-method"] = failed[2]
        whole = method.name == "Connection.Close"
        for pending in list(self.pending):
            if pending.direction == direction or pending.emitted or not (whole or pending.channel == channel):
                continue
            self.pending.remove(pending)
            failed_call = pending.call
            failed_call.status = str(code)
            failed_call.amqp.reply_code = code
            failed_call.amqp.reply_text = method.reply_text
            failed_call.amqp.response_method = call.method
            failed_call.response.ts = call.request.ts
            failed_call.response.end_ts = ts_ns
            failed_call.response.size = call.request.size
            finish_call(failed_call, call.request.ts, error=_is_error(code))
            self.out.append(failed_call)

    def _channel_gone(self, channel: int | None, ts_ns: int) -> None:
        """A channel (None: every channel) is closed: what it still had pending has no answer."""
        if channel is None:
            self.confirm_channels.clear()
        else:
            self.confirm_channels.discard(channel)
        for pending in list(self.pending):
            if channel is None or pending.channel == channel:
                self.pending.remove(pending)
                self._no_response(pending, "channel-closed")
        for key in [key for key in self.contents if channel is None or key[1] == channel]:
            self._content_done(key, ts_ns)

    def _no_response(self, pending: _Pending, note: str) -> None:
        if pending.emitted:
            return
        pending.emitted = True
        call = pending.call
        if note:
            _note(call, note)
        finish_call(call, None, error=False)
        if _is_error(call.amqp.reply_code) and call.method in ("connection.close", "channel.close"):
            # A close for an error is the error, whether or not its close-ok was seen (a peer
            # refused at login often just drops the connection).
            call.outcome = OUTCOME_ERROR
        self.out.append(call)

    def _describe(self, detail: AmqpDetail, method: Any) -> None:
        """Copy what the detail message holds from a method's arguments."""
        fields = method.__slots__
        if "exchange" in fields and method.exchange:
            detail.exchange = method.exchange
        elif "destination" in fields and method.destination:
            detail.exchange = method.destination
        if "routing_key" in fields and method.routing_key:
            detail.routing_key = method.routing_key
        if "queue" in fields and method.queue:
            detail.queue = method.queue
        if "consumer_tag" in fields and method.consumer_tag:
            detail.consumer_tag = method.consumer_tag
            if not detail.queue:
                detail.queue = self.consumers.get(method.consumer_tag, "")
        if "delivery_tag" in fields:
            # A longlong on the wire, unsigned by the specification; pamqp reads it signed.
            detail.delivery_tag = method.delivery_tag & 0xFFFF_FFFF_FFFF_FFFF
        if "multiple" in fields:
            detail.multiple = bool(method.multiple)
        if "requeue" in fields:
            detail.requeue = bool(method.requeue)
        if "reply_code" in fields and method.reply_code and not detail.reply_code:
            detail.reply_code = method.reply_code
            detail.reply_text = method.reply_text
        name = method.name
        properties = detail.properties
        if name == "Connection.Start":
            properties["mechanisms"] = _text(method.mechanisms)
            _peer(properties, "server", method.server_properties)
        elif name == "Connection.StartOk":
            # The credentials (PLAIN's "\0user\0password", AMQPLAIN's LOGIN/PASSWORD table) are
            # never published: only that there was a response, and its mechanism.
            properties["mechanism"] = _text(method.mechanism)
            properties["response"] = REDACTED
            _peer(properties, "client", method.client_properties)
        elif name in ("Connection.Secure", "Connection.SecureOk"):
            properties["challenge" if name == "Connection.Secure" else "response"] = REDACTED
        elif name == "Connection.UpdateSecret":
            properties["new-secret"] = REDACTED
        elif name in ("Connection.Tune", "Connection.TuneOk"):
            properties["channel-max"] = str(method.channel_max)
            properties["frame-max"] = str(method.frame_max)
            properties["heartbeat"] = str(method.heartbeat)
            if name == "Connection.Tune" and not self.frame_max:
                self.frame_max = method.frame_max
        elif name in ("Queue.DeclareOk", "Basic.GetOk", "Queue.PurgeOk", "Queue.DeleteOk"):
            properties["message-count"] = str(method.message_count)
        elif name == "Basic.Qos":
            properties["prefetch-count"] = str(method.prefetch_count)
        if "nowait" in fields and method.nowait:
            properties["nowait"] = "true"


def _is_error(reply_code: int) -> bool:
    """200 is reply-success; 0 is no code at all (pika closes with 0 and "Normal shutdown")."""
    return reply_code not in (0, REPLY_SUCCESS)


def _path(method: Any) -> str:
    """The summary's path: exchange/routing-key for messages, else the queue, exchange or vhost."""
    name = method.name
    if name in CONTENT_METHODS and name != "Basic.GetOk":
        return f"{method.exchange}/{method.routing_key}"
    fields = method.__slots__
    if "queue" in fields:
        return str(method.queue)
    if "destination" in fields:
        return str(method.destination)
    if "exchange" in fields:
        return str(method.exchange)
    if name == "Connection.Open":
        return str(method.virtual_host)
    return ""


def _peer(properties: Any, side: str, table: Any) -> None:
    if isinstance(table, dict):
        for name in PEER_PROPERTIES:
            value = table.get(name)
            if value is not None:
                properties[f"{side}.{name}"] = _text(value)


def _note(call: ApiCall, note: str) -> None:
    if note not in call.notes:
        call.notes.append(note)


def new_stream(flow: FlowInfo, limits: ParserLimits) -> AmqpParser:
    return AmqpParser(flow, limits)


SPEC = ProtocolSpec(name="amqp", transport="tcp", probe=probe, new_stream=new_stream, ports=AMQP_PORTS, probe_bytes=11)

__all__ = ["SPEC", "AmqpParser", "AmqpState", "probe"]
