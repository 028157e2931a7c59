"""HTTP/1.0 and HTTP/1.1 (sans-IO): requests paired with responses in order.

What it covers: keep-alive and pipelining (responses pair with requests first in, first
out), Content-Length, chunked bodies with trailers, close-delimited response bodies, HEAD and
1xx/204/304 responses without a body, `100-continue` (the interim response is noted on the
call, not paired), CONNECT (a 2xx answer turns the connection into a tunnel: parsing stops),
`Upgrade` (a 101 answer is reported with HttpDetail.upgrade and parsing stops; for `h2c` the
call carries the note "h2c" since the rest of the stream is HTTP/2), bodies bounded by
`ParserLimits.max_body_bytes` and decoded for display when gzip/deflate (br and zstd when the
`brotli` / `zstandard` modules are importable; a body in any other coding, or one that does not
decode, is dropped with the note "body-not-decoded", since it could not be redacted), W3C
`traceparent`/`tracestate` and B3 headers copied into the call's trace fields.

Outcome: a status >= 500 is an error; a 4xx is `ok` with its status, because the exchange
worked and the server answered as designed (a 404 is an answer, not a fault of the
transport or the server); consumers filter on `status` for client errors. A request that
never got an answer is `no_response` after `request_timeout_ns` or when the flow ends.

Sizes: `request.size` / `response.size` are the bytes of the message on the wire (head plus
body as framed, chunk lines included; interim 1xx responses count toward the response).

How it uses llhttp: the message head (start line and headers) of every message is found by
its blank line and validated and split by `httptools` (llhttp); the body is framed here.
httptools does not expose llhttp's error position nor a way to tell a response parser that
its request was HEAD or CONNECT (llhttp's F_SKIPBODY), so feeding it whole streams would lose
the byte offsets needed for wire sizes, for resynchronising after a gap and for HEAD
responses; framing a body by Content-Length or chunk sizes is a few lines.

Errors: a `ProtocolError` never quotes the bytes it refused (they may hold a secret and the
message is logged); it names what was wrong and how long it was.

Gaps: inside a Content-Length or chunk body the hole only shortens the body (the call gets
the note "gap"); anywhere else the direction resynchronises at the next request line (or
status line) and the affected calls carry the note "gap". Reassembly anomalies the engine
reports with their stream offset (`mark`: a conflicting overlap) become a note on the call
whose message holds that byte.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import httptools

from trawl.dissector.calls import finish_call, new_call
from trawl.dissector.protocols import graphql
from trawl.dissector.protocols.base import (
    Direction,
    FlowInfo,
    NotAtBoundary,
    ParserLimits,
    ProtocolError,
    ProtocolSpec,
)
from trawl.dissector.protocols.trace import trace_context
from trawl.v1.calls_pb2 import ApiCall, Message, Outcome

HTTP_PORTS = frozenset({80, 591, 3128, 8000, 8008, 8080, 8081, 8088, 8888, 9000, 9080})

METHODS = (
    b"GET|HEAD|POST|PUT|DELETE|CONNECT|OPTIONS|TRACE|PATCH|PROPFIND|PROPPATCH|MKCOL|COPY|MOVE|LOCK|UNLOCK"
    b"|SEARCH|REPORT|PURGE|LINK|UNLINK|MKCALENDAR|SUBSCRIBE|UNSUBSCRIBE|NOTIFY|M-SEARCH|ACL|BIND|REBIND|UNBIND"
)
REQUEST_LINE = re.compile(rb"(?:" + METHODS + rb") [^ \r\n]+ HTTP/1\.[01]\r\n")
REQUEST_START = re.compile(rb"(?:" + METHODS + rb") [^ \r\n]")
# A request or status line anywhere, for resynchronising after a gap or a mid-stream start:
# what precedes it may be anything (a keep-alive byte, the tail of a body ending in a letter).
REQUEST_RESYNC = re.compile(rb"((?:" + METHODS + rb") [^ \r\n]+ HTTP/1\.[01]\r\n)")
STATUS_LINE = re.compile(rb"HTTP/1\.[01] [1-9]\d\d[ \r]")
STATUS_RESYNC = re.compile(rb"(HTTP/1\.[01] [1-9]\d\d[ \r])")
TOKEN_START = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")

MAX_LINE = 8192  # a request/status line or a chunk-size line longer than this is not HTTP

# Reader states.
STRAY_TERMINATOR = b"0\r\n\r\n"
HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILER, CLOSE, RESYNC, WAIT, STOP = range(10)


def probe(client: bytes, server: bytes, flow: FlowInfo) -> int:
    """3: a complete request or status line; 2: a method and a target, or one found after
    some leading bytes (a capture that started mid-stream); 1: an HTTP port; 0: not HTTP."""
    score = 0
    if client:
        if REQUEST_LINE.match(client):
            return 3
        if REQUEST_START.match(client) or REQUEST_RESYNC.search(client, 0, 4096):
            score = 2
    if server:
        if STATUS_LINE.match(server):
            return 3
        if score < 2 and STATUS_RESYNC.search(server, 0, 4096):
            score = 2
    if not score and flow.server_port in HTTP_PORTS:
        score = 1
    return score


class _HeadSink:
    """Collects what llhttp reports about one message head."""

    __slots__ = ("headers", "reason", "url")

    def __init__(self) -> None:
        self.url = b""
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))


def _lenient(parser: Any) -> Any:
    # A passive observer sees what real peers accept: tolerate odd header bytes and
    # Content-Length next to Transfer-Encoding (the latter wins, as RFC 9112 says).
    parser.set_dangerous_leniencies(lenient_headers=True, lenient_chunked_length=True)
    return parser


def _parse_head(head: bytes, request: bool) -> tuple[Any, _HeadSink]:
    sink = _HeadSink()
    parser = _lenient(httptools.HttpRequestParser(sink) if request else httptools.HttpResponseParser(sink))
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # Upgrade / CONNECT: the head is complete, what follows is decided by the response
    except httptools.HttpParserError as exc:
        if str(exc).startswith("Pause on CONNECT/Upgrade"):
            # llhttp pauses after any 101 head; httptools calls it an upgrade only with
            # `Connection: upgrade`. The head is complete either way.
            return parser, sink
        kind = "request" if request else "response"
        raise ProtocolError(f"invalid HTTP/1 {kind} head: {exc}") from None
    return parser, sink


class _Exchange:
    """One request and, once it comes, its response."""

    __slots__ = ("call", "connect", "emitted", "head", "late", "request_done", "upgrade")

    def __init__(self, call: ApiCall, head: bool, connect: bool, upgrade: bool) -> None:
        self.call = call
        self.head = head
        self.connect = connect
        self.upgrade = upgrade
        self.request_done = False
        self.emitted = False
        self.late = False  # a response to a request already reported as no_response: framed, not emitted


class _Reader:
    """Framing state of one direction."""

    __slots__ = (
        "body",
        "body_size",
        "buf",
        "encoding",
        "exchange",
        "head_started",
        "interim",
        "marks",
        "msg_start",
        "msg_ts",
        "offset",
        "remaining",
        "spans",
        "state",
        "stray_terminator",
        "trailer_bytes",
        "wire",
    )

    def __init__(self) -> None:
        self.buf = b""
        self.state = HEAD
        # A response to HEAD said "chunked": some servers then send the empty body's "0\r\n\r\n"
        # anyway (its body has no bytes, RFC 9112 section 6.3); skipped once, counted.
        self.stray_terminator = False
        self.remaining = 0
        self.msg_ts = 0
        self.head_started = False
        self.wire = 0
        self.body = bytearray()
        self.body_size = 0
        self.encoding = ""
        self.trailer_bytes = 0
        self.exchange: _Exchange | None = None
        # Stream offsets, to place reassembly anomalies (`mark`) on the message holding the bytes.
        self.offset = 0  # offset of buf[0] in this direction's stream
        self.msg_start = 0  # offset of the current message's first byte
        self.interim = 0  # bytes of 1xx responses counted in `wire` but before `msg_start`
        self.marks: list[tuple[int, str]] = []  # anomalies at offsets not yet framed
        self.spans: deque[tuple[int, int, _Exchange]] = deque(maxlen=64)  # recent messages

    def start_body(self) -> None:
        self.body = bytearray()
        self.body_size = 0


def _decoders() -> dict[str, Callable[[bytes, int], bytes]]:
    def gzip(data: bytes, limit: int) -> bytes:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, limit)

    def deflate(data: bytes, limit: int) -> bytes:
        try:
            return zlib.decompressobj().decompress(data, limit)
        except zlib.error:
            return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, limit)

    table: dict[str, Callable[[bytes, int], bytes]] = {"gzip": gzip, "x-gzip": gzip, "deflate": deflate}
    try:
        import brotli

        # Bounded output like zlib's max_length: a small body must not inflate without limit.
        def br(data: bytes, limit: int) -> bytes:
            return bytes(brotli.Decompressor().process(data, output_buffer_limit=max(1, limit)))[:limit]

        table["br"] = br
    except ImportError:
        pass
    try:
        import zstandard

        def zstd(data: bytes, limit: int) -> bytes:
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
                return bytes(reader.read(limit))

        table["zstd"] = zstd
    except ImportError:
        pass
    return table


DECODERS = _decoders()


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


# Header name -> (as text, lower-cased): the same few dozen names recur on every message.
_NAMES: dict[bytes, tuple[str, bytes]] = {}


def _collect_headers(raw: list[tuple[bytes, bytes]], message: Message) -> dict[bytes, bytes]:
    """Add the headers to the message (as sent) and return them keyed by lower-case name
    (repeated headers joined with ", ")."""
    headers: dict[bytes, bytes] = {}
    add = message.headers.add
    names = _NAMES
    for name, value in raw:
        entry = names.get(name)
        if entry is None:
            entry = (name.decode("utf-8", "replace"), name.lower())
            if len(names) < 4096:
                names[name] = entry
        text, lower = entry
        previous = headers.get(lower)
        headers[lower] = value if previous is None else previous + b", " + value
        add(name=text, value=value.decode("utf-8", "replace"))
    return headers


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A server accepted `Upgrade: h2c` (101): the rest of the connection is HTTP/2, and the
    engine gives it to the HTTP/2 parser. The upgrade request is HTTP/2 stream 1, whose
    response comes as HTTP/2 (RFC 7540 section 3.2): `request_headers` are its headers as
    HTTP/2 would carry them (pseudo-headers first, connection-specific ones left out)."""

    request_headers: list[tuple[bytes, bytes]]
    request_ts_ns: int
    request_end_ts_ns: int
    request_size: int
    # The client's SETTINGS, from the HTTP2-Settings header (base64url), when it decoded.
    settings: bytes | None
    # Bytes each side sent after the HTTP/1 messages (the client's preface, the server's first frames).
    client_rest: bytes
    server_rest: bytes


# Headers that belong to the HTTP/1.1 connection, not to the request (RFC 9113 section 8.2.2).
_CONNECTION_HEADERS = frozenset(
    {"connection", "upgrade", "http2-settings", "keep-alive", "proxy-connection", "transfer-encoding", "host"}
)


def _upgrade_request(call: ApiCall) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """The HTTP/1.1 request of an h2c upgrade as HTTP/2 headers, and its HTTP2-Settings payload."""
    host = ""
    settings: bytes | None = None
    regular: list[tuple[bytes, bytes]] = []
    for header in call.request.headers:
        name = header.name.lower()
        if name == "host":
            host = header.value
        elif name == "http2-settings":
            with contextlib.suppress(ValueError):
                value = header.value.strip()
                settings = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        if name not in _CONNECTION_HEADERS:
            regular.append((name.encode("latin-1", "replace"), header.value.encode("utf-8", "replace")))
    pseudo = [
        (b":method", call.method.encode("latin-1", "replace")),
        (b":path", call.path.encode("utf-8", "replace")),
        (b":scheme", b"http"),
        (b":authority", host.encode("utf-8", "replace")),
    ]
    return pseudo + regular, settings


@dataclass(frozen=True, slots=True)
class Http1State:
    """An HTTP/1 connection between exchanges: every request answered (or reported), both
    directions at the start of a message with nothing buffered, no gap being resynchronised.

    What a compiled lane must supply:
    - `ordinal`: how many calls the connection has begun (each call id hashes its ordinal);
    - `offsets`: (client -> server, server -> client) stream offsets of the next byte, counted
      from each direction's first byte (offset 0), which place reassembly anomalies (`mark`).
    """

    ordinal: int
    offsets: tuple[int, int]


class Http1Parser:
    """One HTTP/1.x connection (both directions); see the module docstring for the rules."""

    def __init__(self, flow: FlowInfo, limits: ParserLimits) -> None:
        self.flow = flow
        self.limits = limits
        self.pending: deque[_Exchange] = deque()
        self.ordinal = 0
        self.counts: dict[str, int] = {}  # what it counted without making calls (engine._parser_counts)
        self.readers = (_Reader(), _Reader())
        self.out: list[ApiCall] = []
        self.resynced = [False, False]
        self.resume_requests = False
        # Set when the server accepted an h2c upgrade: the engine hands the flow to HTTP/2.
        self.upgrade: Upgrade | None = None

    # -- state at an exchange boundary (base.Snapshotting) ---------------------------------------

    def snapshot(self) -> Http1State:
        """The connection's state between exchanges; NotAtBoundary in the middle of one."""
        if self.pending or self.out or self.resume_requests or any(self.resynced):
            raise NotAtBoundary("HTTP/1: an exchange is pending")
        for reader in self.readers:
            if reader.state != HEAD or reader.buf or reader.exchange is not None or reader.head_started or reader.marks:
                raise NotAtBoundary("HTTP/1: a message is being read")
        request_reader, response_reader = self.readers
        return Http1State(ordinal=self.ordinal, offsets=(request_reader.offset, response_reader.offset))

    def restore(self, state: Http1State) -> None:
        """Continue from `state`: what came before it is gone (it was reported by whoever held
        the connection then), so anomalies placed before its offsets find no call to note."""
        self.pending.clear()
        self.out = []
        self.resynced = [False, False]
        self.resume_requests = False
        self.ordinal = state.ordinal
        self.readers = (_Reader(), _Reader())
        for reader, offset in zip(self.readers, state.offsets, strict=True):
            reader.offset = offset

    # -- the StreamParser interface -----------------------------------------------------------

    def feed(self, direction: Direction, data: bytes, ts_ns: int) -> list[ApiCall]:
        reader = self.readers[direction]
        if reader.state == STOP:
            return []
        reader.buf = reader.buf + data if reader.buf else data
        if reader.state == WAIT and len(reader.buf) > self.limits.max_header_bytes:
            # No answer to the upgrade yet and the client keeps talking: it is not HTTP/1 any more.
            reader.state = STOP
            reader.buf = b""
            return []
        self._run(direction, ts_ns)
        return self._take()

    def gap(self, direction: Direction, size: int, ts_ns: int) -> list[ApiCall]:
        reader = self.readers[direction]
        state = reader.state
        if state == STOP:
            return []
        exchange = reader.exchange
        if state in (BODY, CHUNK_DATA) and 0 < size <= reader.remaining and not reader.buf:
            # The hole is inside a body of known length: framing survives, the body is short.
            reader.offset += size
            reader.remaining -= size
            reader.body_size += size
            reader.wire += size
            if exchange is not None:
                self._note(exchange.call, "gap")
            if state == BODY and reader.remaining == 0:
                self._message_done(direction, ts_ns)
            elif state == CHUNK_DATA and reader.remaining == 0:
                reader.state = CHUNK_CRLF
            return self._take()
        if state == CLOSE:
            reader.offset += len(reader.buf) + size
            reader.buf = b""
            reader.body_size += size
            reader.wire += size
            if exchange is not None:
                self._note(exchange.call, "gap")
            return []
        if state == WAIT:
            return []
        if exchange is not None:
            self._note(exchange.call, "gap")
            if direction == Direction.CLIENT_TO_SERVER:
                self._request_done(reader, ts_ns)
            else:
                self._response_done(reader, ts_ns)
        reader.exchange = None
        reader.offset += len(reader.buf) + size
        reader.buf = b""
        reader.head_started = False
        reader.state = RESYNC
        # A zero-size gap is a capture that started mid-stream: nothing known was lost.
        self.resynced[direction] = size > 0
        return self._take()

    def expire(self, now_ns: int) -> list[ApiCall]:
        timeout = self.limits.request_timeout_ns
        response_reader = self.readers[Direction.SERVER_TO_CLIENT]
        if response_reader.exchange is not None and response_reader.exchange.call.response.ts:
            return []  # a response is arriving: the server is answering, in order
        for exchange in self.pending:
            if exchange.emitted:
                continue
            if now_ns - exchange.call.request.ts <= timeout or not exchange.request_done:
                break
            # Reported now, but kept in line: if its response still comes, it must not be
            # paired with the next request (HTTP/1 answers in order).
            self._no_response(exchange, "timeout")
        return self._take()

    def finish(self, ts_ns: int) -> list[ApiCall]:
        request_reader, response_reader = self.readers
        if response_reader.exchange is not None and response_reader.state not in (HEAD, RESYNC, STOP, WAIT):
            if response_reader.state != CLOSE:
                self._note(response_reader.exchange.call, "truncated")
            self._response_done(response_reader, ts_ns)
        if request_reader.exchange is not None and request_reader.state not in (HEAD, RESYNC, STOP, WAIT):
            self._note(request_reader.exchange.call, "truncated")
            self._request_done(request_reader, ts_ns)
        while self.pending:
            self._no_response(self.pending.popleft(), "")
        for reader in self.readers:
            reader.state = STOP
            reader.buf = b""
        return self._take()

    # -- framing -------------------------------------------------------------------------------

    def _take(self) -> list[ApiCall]:
        """The calls made since the last take, in a list the caller owns (never `self.out`
        itself, which a caller's `+=` would then change)."""
        out = self.out
        if not out:
            return []
        self.out = []
        return out

    def _run(self, direction: Direction, ts_ns: int) -> None:
        reader = self.readers[direction]
        request = direction == Direction.CLIENT_TO_SERVER
        buf = reader.buf
        pos = 0
        size = len(buf)
        while pos < size:
            state = reader.state
            if state == HEAD:
                while buf.startswith(b"\r\n", pos):
                    pos += 2  # stray CRLF between messages (RFC 9112 section 2.2)
                if pos >= size:
                    break
                if reader.stray_terminator and not reader.head_started:
                    if STRAY_TERMINATOR.startswith(buf[pos : pos + len(STRAY_TERMINATOR)]):
                        if size - pos < len(STRAY_TERMINATOR):
                            break  # wait for the rest of it
                        pos += len(STRAY_TERMINATOR)
                        counted = self.counts.get("http_stray_chunk_terminators", 0)
                        self.counts["http_stray_chunk_terminators"] = counted + 1
                    reader.stray_terminator = False
                    continue
                if not reader.head_started:
                    reader.head_started = True
                    reader.msg_ts = ts_ns
                    reader.msg_start = reader.offset + pos
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    self._check_partial_head(buf, pos, request)
                    break
                reader.head_started = False
                head = buf[pos : end + 4]
                pos = end + 4
                if request:
                    self._request_head(reader, head, reader.msg_ts, ts_ns)
                else:
                    self._response_head(reader, head, reader.msg_ts, ts_ns)
                    if self.resume_requests:
                        # An upgrade was refused: the requests held back can now be parsed.
                        self.resume_requests = False
                        self._run(Direction.CLIENT_TO_SERVER, ts_ns)
            elif state == BODY:
                take = min(reader.remaining, size - pos)
                self._body(reader, buf[pos : pos + take])
                pos += take
                reader.wire += take
                reader.remaining -= take
                if reader.remaining == 0:
                    self._message_done(direction, ts_ns)
            elif state == CHUNK_SIZE:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if size - pos > MAX_LINE:
                        raise ProtocolError("chunk-size line too long")
                    break
                line = buf[pos:end].split(b";", 1)[0].strip()
                try:
                    chunk = int(line, 16)
                except ValueError:
                    raise ProtocolError(f"invalid chunk size ({len(line)} bytes)") from None
                if chunk < 0 or not line.isalnum():
                    raise ProtocolError(f"invalid chunk size ({len(line)} bytes)")
                reader.wire += end + 2 - pos
                pos = end + 2
                if chunk == 0:
                    reader.state = TRAILER
                    reader.trailer_bytes = 0
                else:
                    reader.state = CHUNK_DATA
                    reader.remaining = chunk
            elif state == CHUNK_DATA:
                take = min(reader.remaining, size - pos)
                self._body(reader, buf[pos : pos + take])
                pos += take
                reader.wire += take
                reader.remaining -= take
                if reader.remaining == 0:
                    reader.state = CHUNK_CRLF
            elif state == CHUNK_CRLF:
                if size - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ProtocolError("chunk data not followed by CRLF")
                pos += 2
                reader.wire += 2
                reader.state = CHUNK_SIZE
            elif state == TRAILER:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if reader.trailer_bytes + size - pos > self.limits.max_header_bytes:
                        raise ProtocolError("trailer section too long")
                    break
                line = buf[pos:end]
                reader.wire += end + 2 - pos
                reader.trailer_bytes += end + 2 - pos
                pos = end + 2
                if not line:
                    self._message_done(direction, ts_ns)
                else:
                    name, sep, value = line.partition(b":")
                    if not sep or not name:
                        raise ProtocolError("invalid trailer line")
                    if reader.exchange is not None:
                        message = reader.exchange.call.request if request else reader.exchange.call.response
                        message.headers.add(name=_text(name.strip()), value=_text(value.strip()))
            elif state == CLOSE:
                self._body(reader, buf[pos:])
                reader.wire += size - pos
                pos = size
            elif state == RESYNC:
                pattern = REQUEST_RESYNC if request else STATUS_RESYNC
                found = pattern.search(buf, pos)
                if found is None:
                    newline = buf.rfind(b"\n", pos)
                    if newline >= 0:
                        pos = newline + 1
                    if size - pos > MAX_LINE:
                        pos = size - MAX_LINE  # keep what could still begin a start line
                    break
                pos = found.start(1)
                reader.state = HEAD
            elif state in (WAIT, STOP):
                break
        reader.offset += pos
        reader.buf = buf[pos:] if pos < size else b""
        if reader.state == STOP:
            if self.upgrade is not None and not request:
                self.upgrade = replace(self.upgrade, server_rest=reader.buf)
            reader.buf = b""

    def _check_partial_head(self, buf: bytes, pos: int, request: bool) -> None:
        """Fail early on bytes that cannot start a message, and bound an endless head."""
        if buf[pos] not in TOKEN_START:
            raise ProtocolError(f"not an HTTP/1 {'request' if request else 'response'}: first byte 0x{buf[pos]:02x}")
        pending = len(buf) - pos
        if pending > self.limits.max_header_bytes:
            raise ProtocolError(f"message head longer than {self.limits.max_header_bytes} bytes")
        line_end = buf.find(b"\r\n", pos, pos + MAX_LINE)
        if line_end < 0:
            if pending > MAX_LINE:
                raise ProtocolError("start line too long")
            return
        line = buf[pos : line_end + 2]
        if request and not REQUEST_LINE.match(line):
            raise ProtocolError(f"invalid request line ({len(line)} bytes)")
        if not request and not STATUS_LINE.match(line):
            raise ProtocolError(f"invalid status line ({len(line)} bytes)")

    def _body(self, reader: _Reader, chunk: bytes) -> None:
        reader.body_size += len(chunk)
        room = self.limits.max_body_bytes - len(reader.body)
        if room > 0:
            reader.body += chunk[:room]

    # -- requests ------------------------------------------------------------------------------

    def _request_head(self, reader: _Reader, head: bytes, start_ns: int, ts_ns: int) -> None:
        parser, sink = _parse_head(head, request=True)
        method = parser.get_method()
        call = new_call(self.flow, "http", start_ns, self.ordinal)
        self.ordinal += 1
        call.method = method.decode("latin-1")
        call.path = sink.url.decode("utf-8", "replace")
        headers = _collect_headers(sink.headers, call.request)
        detail = call.http
        detail.version = parser.get_http_version()
        value = headers.get(b"host")
        if value is not None:
            detail.host = value.decode("utf-8", "replace")
        value = headers.get(b"user-agent")
        if value is not None:
            detail.user_agent = value.decode("utf-8", "replace")
        value = headers.get(b"content-type")
        if value is not None:
            detail.request_content_type = value.decode("utf-8", "replace")
        if b"traceparent" in headers or b"b3" in headers or b"x-b3-traceid" in headers:
            trace_context(call, headers)
        if self.resynced[Direction.CLIENT_TO_SERVER]:
            self._note(call, "gap")
            self.resynced[Direction.CLIENT_TO_SERVER] = False
        upgrade = method == b"CONNECT" or (
            b"upgrade" in headers and b"upgrade" in headers.get(b"connection", b"").lower()
        )
        exchange = _Exchange(call, head=method == b"HEAD", connect=method == b"CONNECT", upgrade=upgrade)
        if len(self.pending) >= self.limits.max_pending_requests:
            self._no_response(self.pending.popleft(), "pending-limit")
        self.pending.append(exchange)
        reader.exchange = exchange
        reader.wire = len(head)
        reader.interim = 0
        reader.start_body()
        reader.encoding = _coding(headers)
        if _chunked(headers):
            detail.chunked_request = True
            reader.state = CHUNK_SIZE
        else:
            length = _content_length(headers)
            if length:
                reader.state = BODY
                reader.remaining = length
            else:
                self._request_done(reader, ts_ns)

    def _request_done(self, reader: _Reader, ts_ns: int) -> None:
        exchange = reader.exchange
        reader.exchange = None
        reader.state = HEAD
        if exchange is None:
            return
        exchange.request_done = True
        self._settle_marks(reader, exchange)
        if exchange.upgrade and not exchange.emitted:
            reader.state = WAIT  # what follows depends on whether the server accepts
        if exchange.emitted:
            return
        self._fill_message(exchange.call, exchange.call.request, reader, ts_ns)

    # -- responses -----------------------------------------------------------------------------

    def _response_head(self, reader: _Reader, head: bytes, start_ns: int, ts_ns: int) -> None:
        parser, sink = _parse_head(head, request=False)
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # Interim response (100 Continue, 103 Early Hints): noted, not paired.
            if self.pending and not self.pending[0].emitted:
                call = self.pending[0].call
                self._note(call, f"{status}-{'continue' if status == 100 else 'interim'}")
                call.response.size += len(head)
            return
        exchange = self.pending.popleft() if self.pending else None
        if exchange is not None and exchange.emitted:
            # Its request was already reported (timed out): frame this response, report nothing.
            late = _Exchange(ApiCall(), head=exchange.head, connect=exchange.connect, upgrade=exchange.upgrade)
            late.late = True
            exchange = late
        if exchange is None:
            call = new_call(self.flow, "http", start_ns, self.ordinal)
            self.ordinal += 1
            self._note(call, "response without request")
            exchange = _Exchange(call, head=False, connect=False, upgrade=False)
            exchange.request_done = True
        call = exchange.call
        call.status = str(status)
        message = call.response
        message.ts = start_ns
        headers = _collect_headers(sink.headers, message)
        detail = call.http
        if not detail.version:
            detail.version = parser.get_http_version()
        detail.reason = sink.reason.decode("utf-8", "replace")
        value = headers.get(b"content-type")
        if value is not None:
            detail.response_content_type = value.decode("utf-8", "replace")
        encoding = _coding(headers)
        if encoding:
            detail.content_encoding = encoding
        if self.resynced[Direction.SERVER_TO_CLIENT]:
            self._note(call, "gap")
            self.resynced[Direction.SERVER_TO_CLIENT] = False
        reader.exchange = exchange
        reader.interim = message.size  # interim responses, already counted
        reader.wire = len(head) + message.size
        reader.start_body()
        reader.encoding = encoding
        request_reader = self.readers[Direction.CLIENT_TO_SERVER]
        if status == 101 or (exchange.connect and 200 <= status < 300):
            protocol = _text(headers.get(b"upgrade", b"")).strip()
            detail.upgrade = protocol or ("tunnel" if exchange.connect else "")
            h2c = status == 101 and protocol.lower() == "h2c"
            if h2c:
                self._note(call, "h2c")
                headers_h2, settings = _upgrade_request(call)
                self.upgrade = Upgrade(
                    request_headers=headers_h2,
                    request_ts_ns=call.request.ts,
                    request_end_ts_ns=call.request.end_ts or call.request.ts,
                    request_size=call.request.size,
                    settings=settings,
                    client_rest=request_reader.buf,
                    server_rest=b"",  # set by _run: the bytes after this head
                )
            self._response_done(reader, ts_ns)
            for side in self.readers:
                side.state = STOP
                if side is not reader:
                    side.buf = b""
            return
        if request_reader.state == WAIT and request_reader.exchange is None:
            request_reader.state = HEAD  # the upgrade was refused: keep reading HTTP/1
            self.resume_requests = bool(request_reader.buf)
        if exchange.head or status in (204, 304):
            reader.stray_terminator = exchange.head and _chunked(headers)
            self._response_done(reader, ts_ns)
        elif _chunked(headers):
            detail.chunked_response = True
            reader.state = CHUNK_SIZE
        else:
            length = _content_length(headers)
            if length is None:
                reader.state = CLOSE
            elif length:
                reader.state = BODY
                reader.remaining = length
            else:
                self._response_done(reader, ts_ns)

    def _response_done(self, reader: _Reader, ts_ns: int) -> None:
        exchange = reader.exchange
        reader.exchange = None
        if reader.state != STOP:
            reader.state = HEAD
        if exchange is None:
            return
        self._settle_marks(reader, exchange)
        call = exchange.call
        status = int(call.status) if call.status.isdigit() else 0
        response_ts = call.response.ts
        self._fill_message(call, call.response, reader, ts_ns)
        finish_call(call, response_ts, error=status >= 500)
        if not call.request.ts:
            call.request.ts = response_ts
        exchange.emitted = True
        if not exchange.late:
            if call.request.body or "?" in call.path:
                graphql.from_http(call, status)
            self.out.append(call)

    # -- reassembly anomalies -----------------------------------------------------------------

    def mark(self, direction: Direction, offset: int, note: str) -> None:
        """The engine reports an anomaly at `offset` of a direction's stream (a conflicting
        overlap): the call whose message holds that byte carries `note`."""
        reader = self.readers[direction]
        for start, end, exchange in reversed(reader.spans):
            if start <= offset < end:
                if not exchange.emitted:
                    self._note(exchange.call, note)
                return
        if len(reader.marks) < 64:
            reader.marks.append((offset, note))

    def _settle_marks(self, reader: _Reader, exchange: _Exchange) -> None:
        """A message is complete: give it the anomalies that fell within its bytes."""
        start = reader.msg_start
        end = start + reader.wire - reader.interim
        if reader.marks:
            later = []
            for offset, note in reader.marks:
                if start <= offset < end:
                    if not exchange.emitted:
                        self._note(exchange.call, note)
                elif offset >= end:
                    later.append((offset, note))
            reader.marks = later
        reader.spans.append((start, end, exchange))

    # -- shared --------------------------------------------------------------------------------

    def _message_done(self, direction: Direction, ts_ns: int) -> None:
        reader = self.readers[direction]
        if direction == Direction.CLIENT_TO_SERVER:
            self._request_done(reader, ts_ns)
        else:
            self._response_done(reader, ts_ns)

    def _fill_message(self, call: ApiCall, message: Message, reader: _Reader, ts_ns: int) -> None:
        message.end_ts = ts_ns
        message.size = reader.wire
        message.body_size = reader.body_size
        kept = bytes(reader.body)
        message.body_truncated = reader.body_size - len(kept)
        if kept and reader.encoding and reader.encoding != "identity":
            decoded = None
            decoder = DECODERS.get(reader.encoding)
            if decoder is not None:
                with contextlib.suppress(Exception):  # a corrupt body is treated as an unknown coding
                    decoded = decoder(kept, self.limits.max_body_bytes)
            if decoded is None:
                # What cannot be decoded cannot be redacted: the body is not published.
                message.body_truncated = reader.body_size
                self._note(call, "body-not-decoded")
                return
            kept = decoded
        message.body = kept

    def _no_response(self, exchange: _Exchange, note: str) -> None:
        if exchange.emitted:
            return
        call = exchange.call
        if note:
            self._note(call, note)
        if not exchange.request_done:
            reader = self.readers[Direction.CLIENT_TO_SERVER]
            if reader.exchange is exchange:
                self._fill_message(call, call.request, reader, reader.msg_ts)
        finish_call(call, None, error=False)
        exchange.emitted = True
        if call.request.body or "?" in call.path:
            graphql.from_http(call, 0)
        self.out.append(call)

    @staticmethod
    def _note(call: ApiCall, note: str) -> None:
        if note not in call.notes:
            call.notes.append(note)


def _coding(headers: dict[bytes, bytes]) -> str:
    value = headers.get(b"content-encoding")
    return value.decode("latin-1").strip().lower() if value else ""


def _chunked(headers: dict[bytes, bytes]) -> bool:
    value = headers.get(b"transfer-encoding")
    return value is not None and b"chunked" in value.lower()


def _content_length(headers: dict[bytes, bytes]) -> int | None:
    value = headers.get(b"content-length")
    if value is None:
        return None
    # llhttp already refused conflicting values; a repeated identical value is "N, N".
    first = value.split(b",")[0].strip()
    if not first.isdigit():
        raise ProtocolError(f"invalid Content-Length ({len(value)} bytes)")
    return int(first)


def new_stream(flow: FlowInfo, limits: ParserLimits) -> Http1Parser:
    return Http1Parser(flow, limits)


SPEC = ProtocolSpec(name="http", transport="tcp", probe=probe, new_stream=new_stream, ports=HTTP_PORTS, probe_bytes=16)

__all__ = ["SPEC", "Http1Parser", "Http1State", "Outcome", "probe"]
