"""HTTP/2 (sans-IO): every stream of a connection paired into one call.

What it covers: prior knowledge (the client preface, then frames) and h2c (`start_upgraded`,
called by whoever saw the HTTP/1.1 `Upgrade: h2c` and its 101); HEADERS and CONTINUATION,
DATA, trailers (a second HEADERS with END_STREAM), RST_STREAM, GOAWAY, PUSH_PROMISE (the
promised stream is a call of its own, `http2.pushed`, its request headers taken from the
PUSH_PROMISE), SETTINGS (header table and frame sizes), padding and the PRIORITY flag; PING,
WINDOW_UPDATE, PRIORITY and extension frames are skipped. Interim responses (1xx other than
101) are noted on the call, as HTTP/1 does, not taken for the response.

A call is made when both sides ended the stream (END_STREAM), or at a RST_STREAM (outcome
error, `http2.reset_error` / `reset_by`, unless the response had already ended: RFC 9113
section 8.1 lets a server reset a request it no longer needs after a complete answer), when a
GOAWAY refuses the stream (its id above the sender's last stream id: outcome error,
`http2.goaway_error`), after `request_timeout_ns` without an answer (`no_response`, note
"timeout"), or when the flow ends (a stream with a response is complete with the note
"truncated", one without is `no_response`). Calls leave in completion order; ids hash a
per-connection ordinal given in the order requests start. A status >= 500 is an error, as in
HTTP/1. Sizes are frame bytes on the wire (9-byte headers included) of the stream's HEADERS,
CONTINUATION and DATA frames (a pushed request: its PUSH_PROMISE); bodies are DATA payloads,
bounded by `max_body_bytes` and decoded for display with HTTP/1's decoders.

Frames: the 9-byte frame header is read with one struct call. HEADERS and CONTINUATION, once
complete in the buffer, are read here too (pad length, priority fields, fragment, with
hyperframe's checks: a stream id, 5 priority bytes, padding shorter than the rest): they come
with every call, and a hyperframe Frame object per frame (its flag set, its parse) cost about a
sixth of the parser's time on a connection of small unary gRPC calls. The rare whole-body frames
(PUSH_PROMISE, SETTINGS, RST_STREAM, GOAWAY) are parsed by `hyperframe`. DATA is not buffered:
its payload is handed on as it arrives (a 4 MiB gRPC frame costs no 4 MiB buffer), so the DATA
path reads the pad length itself, and a DATA frame wholly in the buffer is read at once without
the reader's state machine; PING, WINDOW_UPDATE, PRIORITY and extension frames are skipped
unread (their length checked). A frame longer than the receiver's SETTINGS_MAX_FRAME_SIZE (RFC 9113 section 4.2:
the sender learnt it before sending, so the capture saw it first) means the framing is lost:
ProtocolError. A frame that is malformed but framed (a SETTINGS length not a multiple of 6, a
PING of 7 bytes, padding longer than the frame, a stream id where none belongs) is counted
(`http2_malformed_frames`), noted on its stream, and skipped.

Which setting applies where: each side's SETTINGS describe what it receives. The client's
SETTINGS_MAX_FRAME_SIZE bounds server -> client frames, and its SETTINGS_HEADER_TABLE_SIZE
bounds the table of the decoder that reads server -> client header blocks (the server's encoder
writes for it); the server's, the other way. A larger setting raises that decoder's allowed
table size at once; a smaller one is never enforced on the decoder, because blocks the encoder
sent before it saw the SETTINGS may still be on their way past the capture point (the table
itself only changes through the encoder's dynamic table size updates, which hpack reads).

HPACK: decoded by the `hpack` library, one Decoder per direction. After a gap (or a capture
that starts mid-connection) the dynamic table is unknown. hpack's Decoder raises on an index
it does not hold, so the table is given placeholders instead: it is cleared and filled with
entries (b"", b"") of 32 bytes (the smallest an entry can be) up to its size. Entries inserted
from then on (literal with incremental indexing) go in front of them exactly as the peer's
table does, and evict the placeholders first, oldest first, as the peer evicts the unknown
entries; because a placeholder is as small as an entry can be, there are always at least as
many placeholders as unknown entries the peer still holds, so an index decodes either to an
entry seen since the gap (exactly right) or to a placeholder (reported, never guessed). A field
whose name decodes empty is such a reference (an empty name is not a valid field name): it is
shown as "[unknown]" (the value too when that is also from a placeholder) with the call note
"hpack-unknown-entry", and is left out of the header dict the call's fields come from. The
table is thus rebuilt as the peer inserts, and blocks decode fully once every index they use is
one seen since. A block that hpack refuses anyway (a corrupt block, an index past the
placeholders because the table was larger than we knew, a decoded list over the bound) loses
that stream's headers (note "hpack-error", counted) and the direction's table becomes unknown
again the same way, since hpack may have applied part of the block.

Repeated blocks: a header block that leaves the table unchanged (only indexed fields and
literals without indexing, typical of a connection's second and later responses and trailers)
decodes to the same fields while the table is unchanged, so each direction keeps the last few
such blocks and their fields, valid while the table's newest entry (held, so compared by
identity), its entry count and size are those it was decoded with. A remembered block also
carries what a stream takes from it (the fields as shown, the dict by lower-case name), worked
out once; the call's header fields go into the record as protobuf bytes remembered per field
(`_header_wire`), one MergeFromString per message.

Gaps: a hole inside a DATA payload or its padding only shortens the body (note "gap"); anywhere
else the direction resynchronises on a chain of plausible frame headers (known type, defined
flags only, reserved bit clear, stream id and length fitting the type and direction, length
within the max frame size): three headers in a row, or a chain that ends exactly at the end of
the bytes received (two frames, or one frame that starts where a segment starts). Streams open
at the gap get the note "gap"; streams whose request HEADERS were never seen are not invented:
their frames are counted (`http2_unknown_stream_frames`) and ignored. A client HEADERS on an
unseen stream opens a call only if it carries `:method` (so trailers of a stream opened before
the cut are not taken for a request).

Bounds per connection (ParserLimits): open streams <= max_pending_requests (more are counted,
`http2_streams_over_limit`, and ignored); a header block over max_header_bytes (encoded) loses
its headers (note "headers-too-large", `http2_header_blocks_over_limit`) but is still decoded
so that the table stays right, up to HARD_BLOCK_FACTOR times that (past it the block is not
kept and the table becomes unknown); decoded header lists are bounded by hpack's
max_header_list_size (HARD_BLOCK_FACTOR x max_header_bytes); the dynamic table by TABLE_CAP;
bodies kept <= max_body_bytes per message.

Hooks for the layers above (gRPC, GraphQL): every call is built by `Http2Parser._complete`
from an `H2Stream` (headers as lists and dicts, trailers, DATA kept per direction and counted,
timestamps, END_STREAM flags, reset and GOAWAY codes); the call's protocol is chosen there and
only there. `H2Stream.on_data(direction, payload)` sees every DATA payload in order, split
anywhere (a streamed frame arrives in pieces), and passes it to `H2Stream.data_sink` when one is
set (a gRPC message reader); `Http2Parser._request_started(stream)` runs once a stream's request
headers are known (the place to attach one).

Speed: the common case, gRPC calls with the proto codec on a connection opened by prior
knowledge, takes the compiled lane (services/dissector/_express_h2.h: about 5 us per call, 40x
this path), which gives connections back to this parser at frame boundaries, streams open or
not (`Http2State.streams`); this path stays the reference it is held to. Figures of this path
(this shared 2-core machine, python 3.11, best of 5, the parser alone fed the bytes as TCP
delivered them, calls built). 50,000 grpcio unary calls on one connection (the capture of
bench/dissect.py --grpc): 39 us per call, about 25,000 calls/s (98 us before the work listed
below); the whole dissection stage there (Dissector.feed, bench/dissect.py) 62 us per call,
about 16,000 calls/s (128 before), and `trawl analyze --json` of that capture 3.7 s (8.6
before; tshark -Y grpc -T fields 5.6 s). 1000 GETs with small JSON answers on one h2-made
connection: 20 us per call (36 before). h2_hypercorn_httpx.pcap, five calls whose blocks are all
new: 104 us per call, most of it hpack's decoding of new blocks (14 us for an 8-field block of
indexed fields, 38 us for a first block of literals). What paid, on the gRPC capture: HEADERS,
CONTINUATION and whole DATA frames read without hyperframe objects or the reader's state
machine (98 -> 83 us); the gRPC layer's shortcuts (grpc.py, protobuf.py: 83 -> 74, later 50 ->
49 and 40.5 -> 39.7); a remembered block carrying a stream's dict and list and the record's
header bytes (74 -> 60, later 49 -> 48); fewer steps building the record (60 -> 50); a HEADERS
frame straight to its decoding (48 -> 46); no reference cycle per gRPC stream (46 -> 40.5: the
garbage collector's whole share, the time is the same with it disabled); header lists joined
only when needed (39.7 -> 38.9). Where the rest goes (py-spy): the first messages as JSON text
about 15%, new_call and finish_call (calls.py) about 8%, then a flat spread of frame and block
reading, stream and message-reader set-up and the record's fields.
"""

from __future__ import annotations

import contextlib
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from hpack import Decoder, HPACKError, OversizedHeaderListError
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import Frame, GoAwayFrame, PushPromiseFrame, RstStreamFrame, SettingsFrame

from trawl.dissector.calls import finish_call, new_call
from trawl.dissector.protocols import graphql, grpc
from trawl.dissector.protocols.base import (
    Direction,
    FlowInfo,
    NotAtBoundary,
    ParserLimits,
    ProtocolError,
    ProtocolSpec,
)
from trawl.dissector.protocols.http1 import DECODERS
from trawl.dissector.protocols.trace import trace_context
from trawl.v1.calls_pb2 import ApiCall, Message, Outcome

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# gRPC's customary ports (50051 and neighbours from its examples, 6565 grpc-spring-boot, 8980 and
# 9095 in common deployments) and 8443/9443 h2c sidecars are hints only: content decides first.
H2_PORTS = frozenset({50051, 50052, 50053, 50054, 50055, 6565, 8980, 9095})

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT

FRAME_HEADER = struct.Struct(">HBBBL")  # length (24 bits as 16 + 8), type, flags, R + stream id
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x01
END_HEADERS = 0x04
PADDED = 0x08
PRIORITY_FLAG = 0x20
DEFINED_FLAGS = (0x09, 0x2D, 0, 0, 0x01, 0x0C, 0x01, 0, 0, 0x04)
FIXED_LENGTH = {PRIORITY: 5, RST_STREAM: 4, PING: 8, WINDOW_UPDATE: 4}
DEFAULT_MAX_FRAME = 1 << 14
LARGEST_FRAME = (1 << 24) - 1
DEFAULT_TABLE_SIZE = 4096
TABLE_CAP = 64 * 1024  # the most dynamic table a decoder keeps (memory bound)
PLACEHOLDER_SIZE = 32  # RFC 7541 section 4.1: an entry costs its name, its value and 32 bytes
HARD_BLOCK_FACTOR = 4  # blocks up to this many times max_header_bytes are still fed to HPACK
MAX_CONTROL_FRAME = 64 * 1024  # SETTINGS, RST_STREAM, GOAWAY bodies larger are skipped
RESYNC_WINDOW = 64 * 1024  # bytes a resynchronisation may hold while a chain completes
REPEAT_CACHE = 4  # repeated header blocks remembered per direction...
REPEAT_BLOCK = 1024  # ...if no longer than this
# A remembered block's fields get what a stream takes from them worked out (`_Fields`, about
# three times their size) up to this many bytes of names and values; larger ones are taken field
# by field each time (a short block may index table entries of kilobytes).
REPEAT_FIELDS = 16 * 1024
MAX_FIELDS = 1024  # header fields kept per stream and list (request, response, trailers)
MAX_INTERIM = 8  # 1xx responses kept per stream

SETTINGS_HEADER_TABLE_SIZE = SettingsFrame.HEADER_TABLE_SIZE
SETTINGS_MAX_FRAME_SIZE = SettingsFrame.MAX_FRAME_SIZE

ERROR_CODES = (
    "NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT", "STREAM_CLOSED",
    "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR", "CONNECT_ERROR", "ENHANCE_YOUR_CALM",
    "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED",
)  # fmt: skip

UNKNOWN = b"[unknown]"
TRACE_HEADERS = (b"traceparent", b"b3", b"x-b3-traceid")

# A frame header a resynchronisation may start on: length < 16640, type 0-9, flags within the
# union of defined flags, reserved bit clear. Checked in C by `re`; `_plausible` decides.
CANDIDATE = re.compile(rb"\x00[\x00-\x40][\x00-\xff][\x00-\x09][\x00-\x2d][\x00-\x7f]", re.DOTALL)

# Reader states.
PREFACE_WAIT, HEADER, DATA_PAYLOAD, SKIP, RESYNC = range(5)

# How a stream ended (`Http2Parser._complete`).
ENDED, RESET, REFUSED, FLOW_END, TIMEOUT = range(5)


def error_name(code: int) -> str:
    """RFC 9113 section 7 name of an error code, or its hex value when not one of them."""
    return ERROR_CODES[code] if 0 <= code < len(ERROR_CODES) else f"0x{code:x}"


def _plausible(buf: bytes, pos: int, direction: Direction, bound: int) -> int:
    """Bytes of the frame whose header is at `pos` if that header could be a real one from this
    direction, else -1 (see the module docstring, Gaps)."""
    high, low, kind, flags, stream_id = FRAME_HEADER.unpack_from(buf, pos)
    length: int = (high << 8) | low
    if kind > CONTINUATION or length > bound or stream_id & 0x80000000 or flags & ~DEFINED_FLAGS[kind]:
        return -1
    if kind in (SETTINGS, PING, GOAWAY):
        if stream_id:
            return -1
    elif kind != WINDOW_UPDATE and not stream_id:
        return -1
    fixed = FIXED_LENGTH.get(kind)
    if fixed is not None and length != fixed:
        return -1
    if kind == SETTINGS and (length % 6 or (flags & ACK and length)):
        return -1
    if kind == GOAWAY and length < 8:
        return -1
    if kind == PUSH_PROMISE and (direction == C2S or length < 4 or not stream_id & 1):
        return -1
    if direction == C2S and kind in (DATA, HEADERS, CONTINUATION) and not stream_id & 1:
        return -1
    if flags & PADDED and kind in (DATA, HEADERS, PUSH_PROMISE) and length < 1:
        return -1
    if kind == HEADERS and flags & PRIORITY_FLAG and length < 5:
        return -1
    return 9 + length


def _chain(buf: bytes, start: int, direction: Direction, bound: int, aligned: bool) -> int:
    """1: a chain of plausible frame headers starts at `start` (three in a row, or frames that
    end exactly at the end of `buf`: two, or one when `aligned`, i.e. `start` is where a segment
    began); 0: not a chain; -1: plausible so far, more bytes needed."""
    pos = start
    size = len(buf)
    frames = 0
    while frames < 3:
        if pos == size and frames:
            return 1 if frames >= 2 or aligned else -1
        if pos + 9 > size:
            return -1 if pos - start <= RESYNC_WINDOW else 0
        step = _plausible(buf, pos, direction, bound)
        if step < 0:
            return 0
        pos += step
        frames += 1
    return 1


def _chain_anywhere(data: bytes, direction: Direction) -> bool:
    """A chain of three plausible frame headers within the first 4 KiB (a capture that began
    mid-stream)."""
    limit = min(len(data), 4096)
    match = CANDIDATE.search(data, 0, limit)
    while match is not None:
        at = match.start()
        if _chain(data, at, direction, DEFAULT_MAX_FRAME, aligned=False) == 1:
            return True
        match = CANDIDATE.search(data, at + 1, limit)
    return False


def probe(client: bytes, server: bytes, flow: FlowInfo) -> int:
    """3: the client preface; 2: the start of the preface, or frame headers that chain from the
    start of either direction (a server's SETTINGS first), or a chain of three within the first
    bytes (a capture that began mid-stream); 1: a gRPC/h2c port; 0: not HTTP/2."""
    if client.startswith(PREFACE):
        return 3
    if len(client) >= 3 and PREFACE.startswith(client[:24]):
        return 2
    for data, direction in ((client, C2S), (server, S2C)):
        if len(data) < 9:
            continue
        if _chain(data, 0, direction, DEFAULT_MAX_FRAME, aligned=False) == 1:
            return 2
        # A lone frame filling the first segment: only the server's opening SETTINGS.
        if data[3] == SETTINGS and _plausible(data, 0, direction, DEFAULT_MAX_FRAME) == len(data):
            return 2
        if _chain_anywhere(data, direction):
            return 2
    return 1 if flow.server_port in H2_PORTS else 0


class H2Stream:
    """One stream: what its call is built from (`Http2Parser._complete`).

    Headers are kept as decoded (`request_headers`, `response_headers`, pseudo-headers
    included, in order; a field from an unknown HPACK entry reads b"[unknown]") and as dicts
    keyed by lower-case name with repeated fields joined by ", " (`request`, `response`,
    `trailers`; unknown fields left out). `bodies[direction]` holds the DATA payload bytes kept
    (up to max_body_bytes), `data_bytes[direction]` counts all of them. Timestamps are of the
    stream's first and last frame per direction (0: none yet).
    """

    __slots__ = (
        "bodies",
        "data_bytes",
        "data_sink",
        "end_stream",
        "first_ts",
        "frames",
        "goaway_code",
        "grpc",
        "header_bytes",
        "header_wire",
        "interim",
        "last_ts",
        "max_body",
        "notes",
        "ordinal",
        "padding",
        "parent_stream_id",
        "pushed",
        "request",
        "request_headers",
        "request_trailer_headers",
        "reset_by",
        "reset_code",
        "response",
        "response_headers",
        "response_started",
        "stream_id",
        "trailer_headers",
        "trailers",
        "trailers_seen",
        "upgraded",
        "wire",
    )

    def __init__(self, stream_id: int, ordinal: int, request_ts_ns: int, max_body: int) -> None:
        self.stream_id = stream_id
        self.ordinal = ordinal
        self.max_body = max_body
        self.request_headers: list[tuple[bytes, bytes]] = []
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.trailer_headers: list[tuple[bytes, bytes]] = []  # the response's trailers
        self.request_trailer_headers: list[tuple[bytes, bytes]] = []
        self.request: dict[bytes, bytes] = {}
        self.response: dict[bytes, bytes] = {}
        self.trailers: dict[bytes, bytes] = {}
        self.bodies = (bytearray(), bytearray())
        self.data_bytes = [0, 0]
        self.first_ts = [request_ts_ns, 0]
        self.last_ts = [request_ts_ns, 0]
        self.wire = [0, 0]  # frame bytes on the wire, 9-byte headers included
        # Per direction, the record's header entries as protobuf bytes, the remembered blocks
        # taken whole (`_Fields.wire`) one after the other; None once a block was taken field by
        # field.
        self.header_wire: list[bytes | None] = [b"", b""]
        self.frames = [0, 0]  # HEADERS, CONTINUATION and DATA frames
        self.header_bytes = [0, 0]  # HPACK block bytes, trailers included
        self.end_stream = [False, False]
        self.response_started = False  # a final response's HEADERS came (even if its fields were lost)
        self.trailers_seen = False  # a second response HEADERS came (even if its fields were lost)
        self.interim: list[bytes] = []  # :status of 1xx responses
        self.padding = 0
        self.notes: list[str] = []
        self.pushed = False
        self.parent_stream_id = 0
        self.upgraded = False
        self.reset_code: int | None = None
        self.reset_by = ""  # "client" or "server"
        self.goaway_code: int | None = None
        # Every DATA payload piece of both directions, in order (a gRPC message reader).
        self.data_sink: Callable[[Direction, bytes], None] | None = None
        # A gRPC call: each direction's message reader (the response's made at its first DATA,
        # once the response headers have said its grpc-encoding).
        self.grpc: list[grpc.MessageStream | None] | None = None

    def on_data(self, direction: Direction, payload: bytes) -> None:
        """A piece of DATA payload (padding removed) of this stream, in order."""
        self.data_bytes[direction] += len(payload)
        body = self.bodies[direction]
        room = self.max_body - len(body)
        if room > 0:
            body += payload if len(payload) <= room else payload[:room]
        if self.data_sink is not None:
            self.data_sink(direction, payload)

    def note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)


class _Block:
    """A header block being gathered: HEADERS or PUSH_PROMISE, then CONTINUATIONs."""

    __slots__ = (
        "end_stream",
        "fragments",
        "frames",
        "kept",
        "kind",
        "padding",
        "promised",
        "size",
        "stream_id",
        "ts",
        "wire",
    )

    def __init__(self, kind: int, stream_id: int, promised: int, end_stream: bool, ts_ns: int) -> None:
        self.kind = kind
        self.stream_id = stream_id
        self.promised = promised
        self.end_stream = end_stream
        self.ts = ts_ns
        self.fragments: list[bytes] = []
        self.size = 0
        self.kept = True  # False once past the hard bound: the block is not decodable any more
        self.frames = 0
        self.wire = 0
        self.padding = 0


class _Reader:
    """Framing state of one direction."""

    __slots__ = (
        "aligned",
        "block",
        "buf",
        "cache",
        "cache_state",
        "decoder",
        "flags",
        "kind",
        "limit_known",
        "max_frame",
        "pad",
        "remaining",
        "state",
        "stream",
        "stream_id",
    )

    def __init__(self, state: int, max_header_list: int) -> None:
        self.buf = b""
        self.state = state
        self.aligned = True  # buf[0] is where a segment began (for resynchronising)
        self.remaining = 0  # DATA payload or skipped bytes left in the current frame
        self.pad = 0  # DATA padding after the payload
        self.kind = 0
        self.flags = 0
        self.stream_id = 0
        self.stream: H2Stream | None = None  # the DATA frame's stream
        self.block: _Block | None = None
        # The receiver's SETTINGS_MAX_FRAME_SIZE; enforced only while known (not after a
        # capture began mid-connection, until a SETTINGS says).
        self.max_frame = DEFAULT_MAX_FRAME
        self.limit_known = True
        # The decoder of this direction's header blocks, and its repeated blocks.
        self.decoder = Decoder(max_header_list_size=max_header_list)
        self.decoder.max_allowed_table_size = DEFAULT_TABLE_SIZE
        self.cache: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self.cache_state: tuple[object, int, int] = (None, -1, -1)


Fields = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class Http2StreamState:
    """A stream open at a frame boundary (both directions between frames), as `Http2State`
    carries it: what H2Stream holds for a request (not pushed, not upgraded, no interim
    response, no note, no reset or GOAWAY code). Pairs are (client -> server, server ->
    client). `request_headers`, `response_headers` and `trailer_headers` are the fields as
    decoded (the response's empty until `response_started`, the trailers' until
    `trailers_seen`); `bodies` the DATA payload kept; `messages` each direction's gRPC message
    reader (grpc.MessageState) when `is_grpc`, None where the stream has none (not gRPC, or no response DATA
    yet: the response's reader is made at its first DATA, from the response's grpc-encoding)."""

    stream_id: int
    ordinal: int
    request_headers: Fields
    response_headers: Fields
    trailer_headers: Fields
    response_started: bool
    trailers_seen: bool
    end_stream: tuple[bool, bool]
    bodies: tuple[bytes, bytes]
    data_bytes: tuple[int, int]
    first_ts: tuple[int, int]
    last_ts: tuple[int, int]
    wire: tuple[int, int]
    frames: tuple[int, int]
    header_bytes: tuple[int, int]
    is_grpc: bool
    messages: tuple[grpc.MessageState | None, grpc.MessageState | None]


@dataclass(frozen=True, slots=True)
class Http2State:
    """An HTTP/2 connection at a frame boundary: nothing buffered, no header block half
    gathered, both directions between frames (the client's preface read); streams may be open
    (`streams`, in the order they opened).

    What a compiled lane must supply:
    - `ordinal`: how many calls the connection has begun (each call id hashes its ordinal);
    - `tables`: each direction's HPACK dynamic table (client -> server blocks, then server ->
      client), entries newest first as (name, value); (b"", b"") entries are placeholders for
      entries a gap hid (see the module docstring, HPACK);
    - `table_sizes`: each of those tables' current maximum size (from the encoder's last
      dynamic table size update), and `allowed_table_sizes` the most each may grow to (from
      the receiver's SETTINGS_HEADER_TABLE_SIZE, never below 4096);
    - `max_frame_sizes`: the largest frame each direction may carry (the receiver's
      SETTINGS_MAX_FRAME_SIZE), None where unknown (a capture begun mid-connection);
    - `settings`: the SETTINGS seen from each side (client, then server) as (identifier,
      value) pairs, the later value of a repeated identifier;
    - `last_stream_ids`: the highest stream id the client opened, and the server promised;
      `ids_uncertain`: a gap hid some of the client's HEADERS (so a new stream id whose fields
      were lost may be trailers of a stream never seen, and opens no call);
    - `goaways`: the GOAWAY each side sent as (last stream id, error code), or None;
    - `streams`: the streams open (Http2StreamState), oldest first.
    """

    ordinal: int
    tables: tuple[tuple[tuple[bytes, bytes], ...], tuple[tuple[bytes, bytes], ...]]
    table_sizes: tuple[int, int]
    allowed_table_sizes: tuple[int, int]
    max_frame_sizes: tuple[int | None, int | None]
    settings: tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]
    last_stream_ids: tuple[int, int]
    ids_uncertain: bool
    goaways: tuple[tuple[int, int] | None, tuple[int, int] | None]
    streams: tuple[Http2StreamState, ...] = ()


# Header name -> (as text, lower-cased): the same few dozen names recur on every block.
_NAMES: dict[bytes, tuple[str, bytes]] = {}


def _name(name: bytes) -> tuple[str, bytes]:
    entry = _NAMES.get(name)
    if entry is None:
        entry = (name.decode("utf-8", "replace"), name.lower())
        if len(_NAMES) < 4096:
            _NAMES[name] = entry
    return entry


class _Fields(list[tuple[bytes, bytes]]):
    """A remembered header block's fields (module docstring, Repeated blocks), with what a
    stream takes from them worked out once: the fields as shown (placeholders as "[unknown]"),
    the dict by lower-case name, whether a placeholder was among them."""

    __slots__ = ("has_method", "shown", "status", "table", "unknown", "wire")

    def __init__(self, fields: list[tuple[bytes, bytes]]) -> None:
        super().__init__(fields)
        self.shown: list[tuple[bytes, bytes]] = []
        self.table: dict[bytes, bytes] = {}
        self.unknown = False
        self.has_method = any(name == b":method" for name, _ in fields)
        self.status = _status_field(fields)
        self.wire: bytes | None = None  # the shown fields as Message.headers bytes, once asked for
        for name, value in fields:
            if not name:
                self.unknown = True
                self.shown.append((UNKNOWN, value or UNKNOWN))
                continue
            lower = _name(name)[1]
            self.shown.append((name, value))
            previous = self.table.get(lower)
            self.table[lower] = value if previous is None else previous + b", " + value


def _status_field(fields: list[tuple[bytes, bytes]]) -> bytes:
    """The first :status field's value, b"" without one."""
    for name, value in fields:
        if name == b":status":
            return value
    return b""


# Message.headers entries as protobuf wire bytes (field 4, a Header of name 1 and value 2, text
# as the fields decode), per (name, value) field up to HEADER_WIRE_FIELD bytes: a call's header
# fields are a few dozen distinct ones repeated call after call, and one MergeFromString of their
# bytes costs less than a `headers.add` per field.
_HEADER_WIRE: dict[tuple[bytes, bytes], bytes] = {}
HEADER_WIRE_FIELD = 256
HEADER_WIRE_ENTRIES = 4096


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _header_wire(field: tuple[bytes, bytes]) -> bytes:
    name, value = field
    name_text = _name(name)[0].encode()
    value_text = value.decode("utf-8", "replace").encode()
    entry = b""
    if name_text:  # proto3: an empty string is not written
        entry += b"\x0a" + _varint(len(name_text)) + name_text
    if value_text:
        entry += b"\x12" + _varint(len(value_text)) + value_text
    wire = b"\x22" + _varint(len(entry)) + entry
    if len(name) + len(value) <= HEADER_WIRE_FIELD:
        if len(_HEADER_WIRE) >= HEADER_WIRE_ENTRIES:
            _HEADER_WIRE.clear()
        _HEADER_WIRE[field] = wire
    return wire


def h2c_request_headers(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The HTTP/1.1 request that carried `Upgrade: h2c` as stream 1's request headers for
    `Http2Parser.start_upgraded`: :method, :path, :scheme (http), :authority (from Host), then
    its fields as sent (names lower-cased, as HTTP/2 writes them)."""
    fields: list[tuple[bytes, bytes]] = [(b":method", method), (b":path", target), (b":scheme", b"http")]
    rest: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        lower = name.lower()
        if lower == b"host":
            fields.append((b":authority", value))
        rest.append((lower, value))
    return fields + rest


class Http2Parser:
    """One HTTP/2 connection (both directions); see the module docstring for the rules."""

    def __init__(self, flow: FlowInfo, limits: ParserLimits) -> None:
        self.flow = flow
        self.limits = limits
        self.hard_block = HARD_BLOCK_FACTOR * limits.max_header_bytes
        self.readers = (_Reader(PREFACE_WAIT, self.hard_block), _Reader(HEADER, self.hard_block))
        self.streams: dict[int, H2Stream] = {}
        self.ordinal = 0
        self.last_ids = [0, 0]  # highest stream id opened by the client, promised by the server
        self.settings: list[dict[int, int]] = [{}, {}]  # what each side sent
        self.ids_uncertain = False
        self.goaways: list[tuple[int, int] | None] = [None, None]
        self.counts: dict[str, int] = {}  # what it counted without making calls (engine._parser_counts)
        self.out: list[ApiCall] = []

    # -- state at an exchange boundary (base.Snapshotting) ---------------------------------------

    def snapshot(self) -> Http2State:
        """The connection's state at a frame boundary; NotAtBoundary while bytes are held, a
        call waits to be taken, or an open stream is one Http2StreamState does not describe."""
        if self.out:
            raise NotAtBoundary("HTTP/2: a call waits to be taken")
        for reader in self.readers:
            if reader.buf or reader.block is not None or reader.state != HEADER:
                raise NotAtBoundary("HTTP/2: a frame is being read")
        client, server = self.readers
        return Http2State(
            ordinal=self.ordinal,
            tables=(
                tuple(client.decoder.header_table.dynamic_entries),
                tuple(server.decoder.header_table.dynamic_entries),
            ),
            table_sizes=(client.decoder.header_table.maxsize, server.decoder.header_table.maxsize),
            allowed_table_sizes=(client.decoder.max_allowed_table_size, server.decoder.max_allowed_table_size),
            max_frame_sizes=(
                client.max_frame if client.limit_known else None,
                server.max_frame if server.limit_known else None,
            ),
            settings=(tuple(self.settings[0].items()), tuple(self.settings[1].items())),
            last_stream_ids=(self.last_ids[0], self.last_ids[1]),
            ids_uncertain=self.ids_uncertain,
            goaways=(self.goaways[0], self.goaways[1]),
            streams=tuple(_stream_state(stream) for stream in self.streams.values()),
        )

    def restore(self, state: Http2State) -> None:
        """Continue from `state` (the client's preface already read)."""
        self.streams = {}
        self.out = []
        self.ordinal = state.ordinal
        self.readers = (_Reader(HEADER, self.hard_block), _Reader(HEADER, self.hard_block))
        for reader, entries, size, allowed, max_frame in zip(
            self.readers, state.tables, state.table_sizes, state.allowed_table_sizes, state.max_frame_sizes, strict=True
        ):
            decoder = reader.decoder
            decoder.max_allowed_table_size = min(allowed, TABLE_CAP)
            decoder.header_table.maxsize = min(size, TABLE_CAP)
            for name, value in reversed(entries):
                decoder.header_table.add(name, value)
            reader.limit_known = max_frame is not None
            reader.max_frame = DEFAULT_MAX_FRAME if max_frame is None else max_frame
        self.settings = [dict(state.settings[0]), dict(state.settings[1])]
        self.last_ids = [state.last_stream_ids[0], state.last_stream_ids[1]]
        self.ids_uncertain = state.ids_uncertain
        self.goaways = [state.goaways[0], state.goaways[1]]
        for stream_state in state.streams:
            self.streams[stream_state.stream_id] = self._restored_stream(stream_state)

    def _restored_stream(self, state: Http2StreamState) -> H2Stream:
        stream = H2Stream(state.stream_id, state.ordinal, state.first_ts[C2S], self.limits.max_body_bytes)
        self._take_headers(stream, list(state.request_headers), C2S, trailers=False)
        if state.response_started:
            stream.response_started = True
            self._take_headers(stream, list(state.response_headers), S2C, trailers=False)
        if state.trailers_seen:
            stream.trailers_seen = True
            self._take_headers(stream, list(state.trailer_headers), S2C, trailers=True)
        for direction in (C2S, S2C):
            stream.end_stream[direction] = state.end_stream[direction]
            stream.bodies[direction][:] = state.bodies[direction]
            stream.data_bytes[direction] = state.data_bytes[direction]
            stream.first_ts[direction] = state.first_ts[direction]
            stream.last_ts[direction] = state.last_ts[direction]
            stream.wire[direction] = state.wire[direction]
            stream.frames[direction] = state.frames[direction]
            stream.header_bytes[direction] = state.header_bytes[direction]
        if state.is_grpc:
            self._request_started(stream, state.messages)
        return stream

    # -- h2c -------------------------------------------------------------------------------------

    def start_upgraded(
        self,
        request_headers: list[tuple[bytes, bytes]],
        request_ts_ns: int,
        request_end_ts_ns: int,
        request_size: int,
        settings_payload: bytes | None,
    ) -> None:
        """The connection was upgraded from HTTP/1.1 (`Upgrade: h2c`, answered 101): stream 1
        is that request, sent with END_STREAM (RFC 7540 section 3.2), so the server's HTTP/2
        response on stream 1 completes it. `request_headers` as `h2c_request_headers` makes
        them; `request_size` the HTTP/1.1 request's bytes; `settings_payload` the decoded
        HTTP2-Settings header (the client's SETTINGS). The client's bytes from here start with
        the preface, the server's with its SETTINGS."""
        if settings_payload is not None:
            frame = SettingsFrame(0)
            try:
                frame.parse_body(memoryview(settings_payload))
            except HyperframeError:
                self._count("http2_malformed_frames")
            else:
                self._apply_settings(C2S, frame.settings)
        stream = H2Stream(1, self.ordinal, request_ts_ns, self.limits.max_body_bytes)
        self.ordinal += 1
        stream.upgraded = True
        stream.note("h2c-upgrade")
        stream.last_ts[C2S] = request_end_ts_ns
        stream.wire[C2S] = request_size
        stream.end_stream[C2S] = True
        self._take_headers(stream, request_headers, C2S, trailers=False)
        self.streams[1] = stream
        self.last_ids[C2S] = max(self.last_ids[C2S], 1)
        self._request_started(stream)

    # -- the StreamParser interface -----------------------------------------------------------

    def feed(self, direction: Direction, data: bytes, ts_ns: int) -> list[ApiCall]:
        reader = self.readers[direction]
        if type(data) is not bytes:
            data = bytes(data)  # slices of the buffer are hashed (the repeated-block memory)
        if reader.buf:
            reader.buf += data
        else:
            reader.buf = data
        self._run(direction, reader, ts_ns)
        return self._take()

    def gap(self, direction: Direction, size: int, ts_ns: int) -> list[ApiCall]:
        reader = self.readers[direction]
        if (
            size > 0
            and not reader.buf
            and reader.state in (DATA_PAYLOAD, SKIP)
            and size <= reader.remaining + reader.pad
        ):
            # Inside a DATA payload, its padding, or a skipped frame: the framing survives.
            stream = reader.stream
            if reader.state == DATA_PAYLOAD:
                payload = min(size, reader.remaining)
                reader.remaining -= payload
                reader.pad -= size - payload
                if stream is not None:
                    stream.data_bytes[direction] += payload
                    stream.note("gap")
                    stream.data_sink = None  # a message reader cannot go on over a hole
            else:
                reader.remaining -= size
            if reader.state == DATA_PAYLOAD and reader.remaining == 0:
                reader.state = SKIP
                reader.remaining = reader.pad
                reader.pad = 0
            if reader.state == SKIP and reader.remaining == 0:
                self._frame_done(direction, reader, ts_ns)
            return self._take()
        if size > 0:
            for stream in self.streams.values():
                stream.note("gap")
                stream.data_sink = None
        block = reader.block
        if block is not None:
            reader.block = None
            stream = self.streams.get(block.stream_id)
            if stream is not None:
                stream.note("gap")
        reader.buf = b""
        reader.stream = None
        reader.state = RESYNC
        reader.aligned = True
        reader.remaining = reader.pad = 0
        self._forget_table(reader)
        if direction == C2S:
            self.ids_uncertain = True
        if size == 0 and not self.settings[direction.reverse]:
            # A capture that began mid-connection: the receiver's settings were never seen.
            reader.limit_known = False
        return self._take()

    def expire(self, now_ns: int) -> list[ApiCall]:
        timeout = self.limits.request_timeout_ns
        stale = [
            stream
            for stream in self.streams.values()
            if stream.end_stream[C2S] and not stream.response_started and now_ns - stream.first_ts[C2S] > timeout
        ]
        for stream in stale:
            stream.note("timeout")
            self._complete(stream, TIMEOUT, now_ns)
        return self._take()

    def finish(self, ts_ns: int) -> list[ApiCall]:
        for direction, reader in zip((C2S, S2C), self.readers, strict=True):
            self._last_resync(direction, reader, ts_ns)
        for stream in list(self.streams.values()):
            self._complete(stream, FLOW_END, ts_ns)
        for reader in self.readers:
            reader.buf = b""
            reader.block = None
            reader.stream = None
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

    def _count(self, name: str, amount: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + amount

    def _run(self, direction: Direction, reader: _Reader, ts_ns: int) -> None:
        buf = reader.buf
        size = len(buf)
        pos = 0
        unpack = FRAME_HEADER.unpack_from
        view: memoryview | None = None
        while pos < size:
            state = reader.state
            if state == HEADER:
                if size - pos < 9:
                    break
                high, low, kind, flags, stream_id = unpack(buf, pos)
                length = (high << 8) | low
                stream_id &= 0x7FFFFFFF
                if length > reader.max_frame and (reader.limit_known or length > LARGEST_FRAME):
                    raise ProtocolError(f"HTTP/2 frame of {length} bytes over the max frame size {reader.max_frame}")
                if reader.block is not None and kind != CONTINUATION:
                    self._block_broken(direction, reader)
                if kind == DATA:
                    pad = 0
                    if flags & PADDED:
                        if length and size - pos < 10:
                            break
                        pad = buf[pos + 9] if length else 256
                        if pad >= length:
                            # Padding as long as the frame: framed, but not a DATA frame to read.
                            self._malformed(stream_id)
                            pos += 9
                            reader.kind = -1
                            reader.remaining = length
                            reader.state = SKIP if length else HEADER
                            continue
                        pos += 1
                        length -= 1 + pad
                    pos += 9
                    end = pos + length
                    if end + pad > size:
                        self._data_start(direction, reader, stream_id, flags, length, pad, ts_ns)
                        continue
                    # The whole frame is here (the usual case): read at once, no reader state.
                    stream = self._data_frame(direction, stream_id, flags, length, pad, ts_ns)
                    if stream is not None:
                        if length:
                            stream.on_data(direction, buf[pos:end] if pos or end < size else buf)
                        if flags & END_STREAM and self.streams.get(stream_id) is stream:
                            self._end_stream(stream, direction, ts_ns)
                    pos = end + pad
                elif kind in (HEADERS, CONTINUATION, PUSH_PROMISE, SETTINGS, RST_STREAM, GOAWAY):
                    bound = self.hard_block if kind in (HEADERS, CONTINUATION, PUSH_PROMISE) else MAX_CONTROL_FRAME
                    if length > bound:
                        # Too large to hold: skipped, and what it carried is lost.
                        pos += 9
                        self._oversized(direction, reader, kind, flags, stream_id, length, ts_ns)
                        continue
                    end = pos + 9 + length
                    if end > size:
                        break
                    if kind in (HEADERS, CONTINUATION):
                        self._block_frame(direction, reader, buf, pos + 9, end, kind, flags, stream_id, ts_ns)
                    else:
                        if view is None:
                            view = memoryview(buf)
                        self._frame(direction, reader, view[pos : pos + 9], view[pos + 9 : end], kind, stream_id, ts_ns)
                    pos = end
                else:
                    fixed = FIXED_LENGTH.get(kind)
                    if fixed is not None and length != fixed:
                        self._malformed(stream_id)
                    pos += 9
                    if pos + length <= size:
                        # Skipped whole (WINDOW_UPDATE, PING...): nothing to finish for these kinds.
                        pos += length
                        continue
                    reader.kind = kind
                    reader.remaining = length
                    reader.state = SKIP
            elif state == DATA_PAYLOAD:
                take = reader.remaining
                if take > size - pos:
                    take = size - pos
                stream = reader.stream
                if stream is not None:
                    stream.on_data(direction, buf[pos : pos + take] if pos or take < size else buf)
                pos += take
                reader.remaining -= take
                if reader.remaining == 0:
                    reader.state = SKIP
                    reader.remaining = reader.pad
                    reader.pad = 0
                    if reader.remaining == 0:
                        reader.state = HEADER
                        self._frame_done(direction, reader, ts_ns)
            elif state == SKIP:
                take = reader.remaining
                if take > size - pos:
                    take = size - pos
                pos += take
                reader.remaining -= take
                if reader.remaining == 0:
                    reader.state = HEADER
                    self._frame_done(direction, reader, ts_ns)
            elif state == PREFACE_WAIT:
                have = buf[pos : pos + len(PREFACE)]
                if not PREFACE.startswith(have):
                    raise ProtocolError(f"not an HTTP/2 client preface ({len(have)} bytes)")
                if len(have) < len(PREFACE):
                    break
                pos += len(PREFACE)
                reader.state = HEADER
            else:  # RESYNC
                pos = self._resync(direction, reader, buf, pos)
                if reader.state == RESYNC:
                    break
        reader.buf = buf[pos:] if pos < size else b""
        if reader.state == RESYNC and len(reader.buf) > RESYNC_WINDOW + 9:
            reader.buf = reader.buf[-8:]
            reader.aligned = False

    def _resync(self, direction: Direction, reader: _Reader, buf: bytes, pos: int) -> int:
        """Look for a chain of frame headers from `pos`; returns where reading goes on (the
        state is HEADER once found, else still RESYNC with the bytes that could start one)."""
        size = len(buf)
        aligned = reader.aligned and pos == 0
        if aligned and direction == C2S:
            have = buf[: len(PREFACE)]
            if PREFACE.startswith(have):
                if len(have) < len(PREFACE):
                    return pos  # wait: it may be the preface, the connection's start
                # The preface: the connection starts here after all, every table is empty.
                reader.state = HEADER
                for side in self.readers:
                    if side.state == RESYNC or side is reader:
                        self._known_empty_table(side)
                return pos + len(PREFACE)
        bound = reader.max_frame if reader.limit_known else DEFAULT_MAX_FRAME
        at = pos
        # Of the candidates whose chain is complete, the one with most frames on streams known to
        # be open wins (the earliest of equals; a candidate that is a frame boundary of an earlier
        # chain is that chain): a false header just before a real one can frame itself onto the
        # real chain. While none is complete, the bytes from the first candidate that may still
        # become one are kept (a false candidate declaring a long frame must not hold up a real
        # chain after it).
        waiting = -1
        best = -1
        best_score = -1
        on_chains: set[int] = set()
        while True:
            match = CANDIDATE.search(buf, at)
            if match is None:
                break
            at = match.start()
            if at in on_chains:
                at += 1
                continue
            found = _chain(buf, at, direction, bound, aligned and at == 0)
            if found == 1:
                score = self._known_streams(buf, at, on_chains)
                if score > best_score:
                    best, best_score = at, score
            elif found < 0 and waiting < 0:
                waiting = at
            at += 1
        if best >= 0:
            reader.state = HEADER
            self._count("http2_resyncs")
            if best:
                reader.aligned = False
            return best
        if waiting != 0:
            reader.aligned = False
        return waiting if waiting >= 0 else max(pos, size - 8)

    def _last_resync(self, direction: Direction, reader: _Reader, ts_ns: int) -> None:
        """At the flow's end, bytes still waiting for a chain of frames get a last look: when
        they start where a segment started, with a frame on a stream known to be open, and every
        frame header in them is plausible up to where the capture stops (the last frame cut
        short), they are read. A capture of a few packets (one request, the start of its answer)
        has no three frames in a row to offer."""
        buf = reader.buf
        if reader.state != RESYNC or not reader.aligned or len(buf) < 9:
            return
        bound = reader.max_frame if reader.limit_known else DEFAULT_MAX_FRAME
        step = _plausible(buf, 0, direction, bound)
        if step < 0 or FRAME_HEADER.unpack_from(buf, 0)[4] not in self.streams:
            return
        pos = step
        while pos + 9 <= len(buf):
            step = _plausible(buf, pos, direction, bound)
            if step < 0:
                return
            pos += step
        reader.state = HEADER
        self._count("http2_resyncs")
        self._run(direction, reader, ts_ns)

    def _known_streams(self, buf: bytes, at: int, on_chains: set[int]) -> int:
        """How many of the first three frames from `at` are on an open stream; adds the frame
        boundaries of the chain from `at` to `on_chains`."""
        known = 0
        size = len(buf)
        frames = 0
        while at + 9 <= size:
            high, low, _, _, stream_id = FRAME_HEADER.unpack_from(buf, at)
            if frames < 3 and stream_id in self.streams:
                known += 1
            frames += 1
            at += 9 + ((high << 8) | low)
            on_chains.add(at)
        return known

    def _data_frame(
        self, direction: Direction, stream_id: int, flags: int, length: int, pad: int, ts_ns: int
    ) -> H2Stream | None:
        """A DATA frame's header: its stream's frame, wire and padding accounting; None (counted)
        for a stream not open (or stream 0, which DATA may not use)."""
        stream = self.streams.get(stream_id) if stream_id else None
        if stream is None:
            self._count("http2_unknown_stream_frames" if stream_id else "http2_malformed_frames")
            return None
        stream.frames[direction] += 1
        stream.wire[direction] += 9 + length + (1 + pad if flags & PADDED else 0)
        stream.padding += pad
        if not stream.first_ts[direction]:
            stream.first_ts[direction] = ts_ns
        stream.last_ts[direction] = ts_ns
        return stream

    def _data_start(
        self, direction: Direction, reader: _Reader, stream_id: int, flags: int, length: int, pad: int, ts_ns: int
    ) -> None:
        stream = self._data_frame(direction, stream_id, flags, length, pad, ts_ns)
        reader.stream = stream
        reader.kind = DATA
        reader.flags = flags
        reader.stream_id = stream_id
        reader.pad = pad
        reader.remaining = length
        reader.state = DATA_PAYLOAD
        if length == 0:
            reader.state = SKIP
            reader.remaining = pad
            reader.pad = 0
            if pad == 0:
                reader.state = HEADER
                self._frame_done(direction, reader, ts_ns)

    def _frame_done(self, direction: Direction, reader: _Reader, ts_ns: int) -> None:
        """The last byte of a streamed or skipped frame went by."""
        kind = reader.kind
        if kind == DATA:
            stream = reader.stream
            reader.stream = None
            if stream is not None:
                stream.last_ts[direction] = ts_ns
                if reader.flags & END_STREAM and self.streams.get(stream.stream_id) is stream:
                    self._end_stream(stream, direction, ts_ns)
        elif kind in (HEADERS, CONTINUATION, PUSH_PROMISE):
            block = reader.block
            if block is not None and reader.flags & END_HEADERS:
                reader.block = None
                self._header_block(direction, reader, block, ts_ns)

    def _oversized(
        self, direction: Direction, reader: _Reader, kind: int, flags: int, stream_id: int, length: int, ts_ns: int
    ) -> None:
        """A frame too large to hold is skipped; a header block it belonged to is lost (but its
        END_STREAM and END_HEADERS still count, read from the frame header)."""
        reader.kind = kind
        reader.flags = flags
        reader.stream_id = stream_id
        reader.remaining = length
        reader.state = SKIP
        if kind in (HEADERS, PUSH_PROMISE) or (kind == CONTINUATION and reader.block is not None):
            block = reader.block
            if block is None:
                block = reader.block = _Block(kind, stream_id, 0, bool(flags & END_STREAM), ts_ns)
            block.kept = False
            block.fragments = []
            block.frames += 1
            block.wire += 9 + length
            block.size += length
        else:
            self._count("http2_oversized_frames")
            self._malformed(stream_id)

    def _malformed(self, stream_id: int) -> None:
        self._count("http2_malformed_frames")
        stream = self.streams.get(stream_id) if stream_id else None
        if stream is not None:
            stream.note("malformed-frame")

    def _block_frame(
        self,
        direction: Direction,
        reader: _Reader,
        buf: bytes,
        start: int,
        end: int,
        kind: int,
        flags: int,
        stream_id: int,
        ts_ns: int,
    ) -> None:
        """A whole HEADERS or CONTINUATION frame, its body `buf[start:end]`, read here rather
        than by hyperframe (module docstring, Frames): the same checks, and the same fragment,
        as hyperframe's HeadersFrame and ContinuationFrame give."""
        if not stream_id:
            self._malformed(stream_id)
            self._block_broken(direction, reader, stream_id)
            return
        length = end - start
        if kind == CONTINUATION:
            pending = reader.block
            if pending is None:
                # After a resynchronisation: its block's start is gone.
                self._count("http2_unknown_stream_frames")
                return
            if pending.stream_id != stream_id:
                self._malformed(stream_id)
                self._block_broken(direction, reader)
                return
            self._fragment(direction, reader, pending, buf[start:end], length, bool(flags & END_HEADERS), ts_ns)
            return
        pad = 0
        if flags & PADDED:
            if not length:
                self._malformed(stream_id)
                self._block_broken(direction, reader, stream_id)
                return
            pad = buf[start]
            start += 1
        # hyperframe's rules: the priority fields need 5 bytes; the padding must be shorter than
        # what follows the pad length (priority fields included); the fragment is what lies
        # between, empty when they overlap.
        if (flags & PRIORITY_FLAG and end - start < 5) or (pad and pad >= end - start):
            self._malformed(stream_id)
            self._block_broken(direction, reader, stream_id)
            return
        fragment = buf[start + 5 if flags & PRIORITY_FLAG else start : end - pad]
        block = _Block(HEADERS, stream_id, 0, bool(flags & END_STREAM), ts_ns)
        block.padding = pad
        if flags & END_HEADERS:
            # The whole block in this frame (the usual case): what _fragment would do, within the
            # hard bound since the frame is (the reader skips larger ones).
            block.frames = 1
            block.wire = 9 + length
            block.size = len(fragment)
            block.fragments.append(fragment)
            self._header_block(direction, reader, block, ts_ns)
            return
        self._fragment(direction, reader, block, fragment, length, False, ts_ns)

    def _frame(
        self,
        direction: Direction,
        reader: _Reader,
        header: memoryview,
        body: memoryview,
        kind: int,
        stream_id: int,
        ts_ns: int,
    ) -> None:
        """A whole PUSH_PROMISE, SETTINGS, RST_STREAM or GOAWAY frame (rare: parsed by hyperframe)."""
        try:
            frame, _ = Frame.parse_frame_header(header)
            frame.parse_body(body)
        except HyperframeError:
            self._malformed(stream_id)
            if kind == PUSH_PROMISE:
                self._block_broken(direction, reader, stream_id)
            return
        if kind == PUSH_PROMISE:
            assert isinstance(frame, PushPromiseFrame)
            if direction == C2S:
                self._malformed(stream_id)
                self._block_broken(direction, reader, stream_id, frame.data)
                return
            block = _Block(PUSH_PROMISE, stream_id, frame.promised_stream_id, True, ts_ns)
            block.padding = frame.pad_length
            self._fragment(direction, reader, block, frame.data, len(body), bool(header[4] & END_HEADERS), ts_ns)
        elif kind == SETTINGS:
            assert isinstance(frame, SettingsFrame)
            if not header[4] & ACK:
                self._apply_settings(direction, frame.settings)
        elif kind == RST_STREAM:
            assert isinstance(frame, RstStreamFrame)
            stream = self.streams.get(stream_id)
            if stream is None:
                self._count("http2_unknown_stream_frames")
                return
            stream.reset_code = frame.error_code
            stream.reset_by = "client" if direction == C2S else "server"
            self._complete(stream, RESET, ts_ns)
        else:
            assert isinstance(frame, GoAwayFrame)
            self._goaway(direction, frame.last_stream_id, frame.error_code, ts_ns)

    def _fragment(
        self, direction: Direction, reader: _Reader, block: _Block, fragment: bytes, length: int, last: bool, ts_ns: int
    ) -> None:
        block.frames += 1
        block.wire += 9 + length
        block.size += len(fragment)
        if block.kept:
            if block.size > self.hard_block:
                block.kept = False
                block.fragments = []
            else:
                block.fragments.append(fragment)
        if last:
            reader.block = None
            self._header_block(direction, reader, block, ts_ns)
        else:
            reader.block = block

    def _block_broken(
        self, direction: Direction, reader: _Reader, stream_id: int = 0, fragment: bytes | None = None
    ) -> None:
        """A header block that cannot be completed (a frame of another kind came before its
        END_HEADERS, or a malformed frame held part of it): its fields are lost, and the table,
        which HPACK would have updated from it, is unknown from here."""
        block = reader.block
        reader.block = None
        if block is not None:
            stream_id = block.stream_id
        self._count("http2_hpack_errors")
        stream = self.streams.get(stream_id) if stream_id else None
        if stream is not None:
            stream.note("hpack-error")
        self._forget_table(reader)

    # -- header blocks -------------------------------------------------------------------------

    def _decode(self, reader: _Reader, block: bytes) -> list[tuple[bytes, bytes]]:
        """hpack's decoding, with the direction's repeated blocks remembered (module docstring)."""
        table = reader.decoder.header_table
        entries = table.dynamic_entries
        newest = entries[0] if entries else None
        count = len(entries)
        size = table.maxsize
        cached = reader.cache_state
        if newest is cached[0] and count == cached[1] and size == cached[2]:
            fields = reader.cache.get(block)
            if fields is not None:
                return fields
        else:
            reader.cache.clear()
            reader.cache_state = (newest, count, size)
        fields = cast(list[tuple[bytes, bytes]], reader.decoder.decode(block, raw=True))
        if (
            len(block) <= REPEAT_BLOCK
            and (entries[0] if entries else None) is newest
            and len(entries) == count
            and table.maxsize == size
        ):
            if len(reader.cache) >= REPEAT_CACHE:
                reader.cache.clear()
            if sum(len(name) + len(value) for name, value in fields) <= REPEAT_FIELDS:
                fields = _Fields(fields)
            reader.cache[block] = fields
        return fields

    def _header_block(self, direction: Direction, reader: _Reader, block: _Block, ts_ns: int) -> None:
        """A complete header block: decode it and give it to its stream."""
        fields: list[tuple[bytes, bytes]] | None = None
        note = ""
        if not block.kept:
            self._count("http2_header_blocks_over_limit")
            note = "headers-too-large"
            self._forget_table(reader)
        else:
            data = block.fragments[0] if len(block.fragments) == 1 else b"".join(block.fragments)
            try:
                fields = self._decode(reader, data)
            except OversizedHeaderListError:
                self._count("http2_header_blocks_over_limit")
                note = "headers-too-large"
                self._forget_table(reader)
            except (HPACKError, IndexError, ValueError):
                # hpack may have applied part of the block to its table: the table is unknown.
                self._count("http2_hpack_errors")
                note = "hpack-error"
                self._forget_table(reader)
            else:
                if block.size > self.limits.max_header_bytes:
                    self._count("http2_header_blocks_over_limit")
                    note = "headers-too-large"
                    fields = None
        if direction == C2S:
            self._client_block(block, fields, note, ts_ns)
        elif block.kind == PUSH_PROMISE:
            self._push_promise(block, fields, note, ts_ns)
        else:
            self._server_block(block, fields, note, ts_ns)

    def _client_block(self, block: _Block, fields: list[tuple[bytes, bytes]] | None, note: str, ts_ns: int) -> None:
        stream_id = block.stream_id
        stream = self.streams.get(stream_id)
        if stream is None:
            last = self.last_ids[C2S]
            if not stream_id & 1 or stream_id <= last:
                self._count("http2_unknown_stream_frames")
                return
            self.last_ids[C2S] = stream_id
            if fields is None:
                # Lost fields on a new odd id: a request for sure on a connection seen from its
                # start (only HEADERS opens a stream); after a cut it may be trailers.
                if self.ids_uncertain:
                    self._count("http2_unknown_stream_frames")
                    return
            elif not (
                fields.has_method if isinstance(fields, _Fields) else any(name == b":method" for name, _ in fields)
            ):
                self._count("http2_unknown_stream_frames")
                return
            opened = self._open_stream(stream_id, block, fields, note, ts_ns, pushed_on=0)
            if opened is None or opened.goaway_code is not None:
                return
            stream = opened
        else:
            self._account(stream, C2S, block, ts_ns)
            if note:
                stream.note(note)
            if fields is not None:
                self._take_headers(stream, fields, C2S, trailers=True)
        if block.end_stream:
            self._end_stream(stream, C2S, ts_ns)

    def _push_promise(self, block: _Block, fields: list[tuple[bytes, bytes]] | None, note: str, ts_ns: int) -> None:
        promised = block.promised
        parent = self.streams.get(block.stream_id)
        if promised <= self.last_ids[S2C] or promised in self.streams:
            self._count("http2_unknown_stream_frames")
            return
        self.last_ids[S2C] = promised
        if parent is None and fields is None:
            self._count("http2_unknown_stream_frames")
            return
        self._open_stream(promised, block, fields, note, ts_ns, pushed_on=block.stream_id)

    def _open_stream(
        self,
        stream_id: int,
        block: _Block,
        fields: list[tuple[bytes, bytes]] | None,
        note: str,
        ts_ns: int,
        pushed_on: int,
    ) -> H2Stream | None:
        """A new stream from a request's HEADERS, or (`pushed_on`: its parent) a PUSH_PROMISE;
        None past the open-stream limit. A stream above the last id of the receiver's GOAWAY is
        refused at once (its goaway_code set)."""
        if len(self.streams) >= self.limits.max_pending_requests:
            self._count("http2_streams_over_limit")
            return None
        stream = H2Stream(stream_id, self.ordinal, block.ts, self.limits.max_body_bytes)
        self.ordinal += 1
        if pushed_on:
            stream.pushed = True
            stream.parent_stream_id = pushed_on
        self._account(stream, C2S, block, ts_ns)
        if pushed_on:
            stream.end_stream[C2S] = True  # a promised request has no body
        if note:
            stream.note(note)
        if fields is not None:
            self._take_headers(stream, fields, C2S, trailers=False)
        self.streams[stream_id] = stream
        self._request_started(stream)
        # The GOAWAY that refuses it is the one from the side that would have answered.
        goaway = self.goaways[C2S if pushed_on else S2C]
        if goaway is not None and stream_id > goaway[0]:
            stream.goaway_code = goaway[1]
            self._complete(stream, REFUSED, ts_ns)
        return stream

    def _server_block(self, block: _Block, fields: list[tuple[bytes, bytes]] | None, note: str, ts_ns: int) -> None:
        stream = self.streams.get(block.stream_id)
        if stream is None:
            self._count("http2_unknown_stream_frames")
            return
        self._account(stream, S2C, block, ts_ns)
        if note:
            stream.note(note)
        if not stream.response_started:
            status = b""
            if fields is not None:
                status = fields.status if isinstance(fields, _Fields) else _status_field(fields)
            if len(status) == 3 and status[:1] == b"1" and status != b"101" and not block.end_stream:
                # An interim response (100 Continue, 103 Early Hints): noted, not the answer.
                if len(stream.interim) < MAX_INTERIM:
                    stream.interim.append(status)
                stream.note("100-continue" if status == b"100" else "interim")
                return
            stream.response_started = True
            if fields is not None:
                self._take_headers(stream, fields, S2C, trailers=False)
        else:
            stream.trailers_seen = True
            if fields is not None:
                self._take_headers(stream, fields, S2C, trailers=True)
        if block.end_stream:
            self._end_stream(stream, S2C, ts_ns)

    def _account(self, stream: H2Stream, direction: Direction, block: _Block, ts_ns: int) -> None:
        stream.frames[direction] += block.frames
        stream.wire[direction] += block.wire
        stream.header_bytes[direction] += block.size
        stream.padding += block.padding
        if not stream.first_ts[direction]:
            stream.first_ts[direction] = block.ts
        stream.last_ts[direction] = ts_ns

    def _take_headers(
        self, stream: H2Stream, fields: list[tuple[bytes, bytes]], direction: Direction, trailers: bool
    ) -> None:
        """Fields of a block into the stream's lists and dicts; an empty name is an HPACK
        placeholder (module docstring), shown as "[unknown]"."""
        if direction == C2S:
            listing = stream.request_trailer_headers if trailers else stream.request_headers
            table = stream.request
        elif trailers:
            listing, table = stream.trailer_headers, stream.trailers
        else:
            listing, table = stream.response_headers, stream.response
        if not listing and not table and isinstance(fields, _Fields) and len(fields) <= MAX_FIELDS:
            # A remembered block into an empty list and dict (the usual case): worked out already.
            if fields.unknown:
                stream.note("hpack-unknown-entry")
            listing.extend(fields.shown)
            table.update(fields.table)
            taken = stream.header_wire[direction]
            if taken is not None:
                wire = fields.wire
                if wire is None:
                    known = _HEADER_WIRE
                    wire = fields.wire = b"".join([known.get(field) or _header_wire(field) for field in fields.shown])
                stream.header_wire[direction] = taken + wire  # b"" + wire is wire itself
            return
        stream.header_wire[direction] = None
        if len(listing) + len(fields) > MAX_FIELDS:
            # Endless trailers or 1xx blocks on one stream: what fits is kept.
            stream.note("headers-dropped")
            self._count("http2_header_fields_dropped", len(listing) + len(fields) - MAX_FIELDS)
            fields = fields[: max(0, MAX_FIELDS - len(listing))]
        names = _NAMES
        for name, value in fields:
            if not name:
                stream.note("hpack-unknown-entry")
                listing.append((UNKNOWN, value or UNKNOWN))
                continue
            entry = names.get(name)
            lower = entry[1] if entry is not None else _name(name)[1]
            listing.append((name, value))
            previous = table.get(lower)
            table[lower] = value if previous is None else previous + b", " + value

    # -- connection-level frames -----------------------------------------------------------------

    def _apply_settings(self, direction: Direction, settings: dict[int, int]) -> None:
        """SETTINGS sent in `direction`: they describe what the sender receives (module
        docstring, Which setting applies where)."""
        self.settings[direction].update(settings)
        toward_sender = self.readers[direction.reverse]
        size = settings.get(SETTINGS_MAX_FRAME_SIZE)
        if size is not None and DEFAULT_MAX_FRAME <= size <= LARGEST_FRAME:
            toward_sender.max_frame = size
            toward_sender.limit_known = True
        size = settings.get(SETTINGS_HEADER_TABLE_SIZE)
        if size is not None:
            decoder = toward_sender.decoder
            decoder.max_allowed_table_size = max(decoder.max_allowed_table_size, min(size, TABLE_CAP))

    def _goaway(self, direction: Direction, last_stream_id: int, error_code: int, ts_ns: int) -> None:
        """GOAWAY sent in `direction`: streams the other side opened above `last_stream_id`
        were not and will not be processed."""
        self.goaways[direction] = (last_stream_id, error_code)
        peer_parity = 1 if direction == S2C else 0  # client streams are odd, pushed ones even
        refused = [
            stream
            for stream_id, stream in self.streams.items()
            if stream_id > last_stream_id and stream_id & 1 == peer_parity
        ]
        for stream in refused:
            stream.goaway_code = error_code
            self._complete(stream, REFUSED, ts_ns)

    def _end_stream(self, stream: H2Stream, direction: Direction, ts_ns: int) -> None:
        end_stream = stream.end_stream
        end_stream[direction] = True
        if end_stream[1 - direction]:
            self._complete(stream, ENDED, ts_ns)

    def _forget_table(self, reader: _Reader) -> None:
        """The direction's dynamic table is unknown from here: placeholders fill it (module
        docstring, HPACK)."""
        table = reader.decoder.header_table
        size = table.maxsize
        table.maxsize = 0  # clears it
        table.maxsize = size
        for _ in range(size // PLACEHOLDER_SIZE):
            table.add(b"", b"")
        reader.cache.clear()
        reader.cache_state = (None, -1, -1)

    def _known_empty_table(self, reader: _Reader) -> None:
        decoder = reader.decoder
        decoder.header_table.maxsize = 0
        decoder.header_table.maxsize = DEFAULT_TABLE_SIZE
        reader.cache.clear()
        reader.cache_state = (None, -1, -1)

    # -- calls ---------------------------------------------------------------------------------

    def _request_started(
        self,
        stream: H2Stream,
        restored: tuple[grpc.MessageState | None, grpc.MessageState | None] | None = None,
    ) -> None:
        """A stream's request headers are known (HEADERS, PUSH_PROMISE or the h2c upgrade): a
        gRPC request (its content-type) gets a message reader per direction on its DATA.
        `restored`: the readers' states of a stream restored open (Http2StreamState.messages)."""
        content_type = stream.request.get(b"content-type")
        if content_type is None or stream.pushed or not grpc.is_grpc(content_type.decode("latin-1")):
            return
        max_body = self.limits.max_body_bytes
        readers: list[grpc.MessageStream | None] = [
            grpc.MessageStream(grpc.message_encoding(stream.request), max_body),
            None,
        ]
        if restored is not None:
            for direction, message_state in ((C2S, restored[0]), (S2C, restored[1])):
                if message_state is None:
                    continue
                headers = stream.request if direction == C2S else stream.response
                reader = readers[direction] = grpc.MessageStream(grpc.message_encoding(headers), max_body)
                reader.restore(message_state)
        stream.grpc = readers
        # The response's dict, not the stream: a closure holding the stream would make a cycle
        # (stream -> data_sink -> stream) that only the garbage collector frees, and every call
        # would wait for it (the dict is filled in place, never replaced).
        response = stream.response

        def feed(direction: Direction, payload: bytes) -> None:
            reader = readers[direction]
            if reader is None:
                reader = readers[direction] = grpc.MessageStream(grpc.message_encoding(response), max_body)
            reader.feed(payload)

        stream.data_sink = feed

    def _complete(self, stream: H2Stream, end: int, ts_ns: int) -> None:
        """The stream is over (`end`: ENDED, RESET, REFUSED, FLOW_END or TIMEOUT): its call."""
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        if stream.grpc is None and not stream.pushed and _grpc_answer(stream):
            self._late_grpc(stream)
        protocol = "http2" if stream.grpc is None else "grpc"  # the one place a call's protocol is chosen
        call = new_call(self.flow, protocol, stream.first_ts[C2S], stream.ordinal)
        request, response = stream.request, stream.response
        status_text = response.get(b":status", b"")
        status = int(status_text) if status_text.isdigit() and len(status_text) == 3 else 0
        if stream.grpc is None:  # grpc.apply sets these three its own way
            value = request.get(b":method")
            if value is not None:
                call.method = value.decode("latin-1")
            value = request.get(b":path")
            if value is not None:
                call.path = value.decode("utf-8", "replace")
            if status_text:
                call.status = status_text.decode("latin-1")
        detail = call.http
        detail.version = "2"
        value = request.get(b":authority") or request.get(b"host")
        if value is not None:
            detail.host = value.decode("utf-8", "replace")
        value = request.get(b"user-agent")
        if value is not None:
            detail.user_agent = value.decode("utf-8", "replace")
        value = request.get(b"content-type")
        if value is not None:
            detail.request_content_type = value.decode("utf-8", "replace")
        value = response.get(b"content-type")
        if value is not None:
            detail.response_content_type = value.decode("utf-8", "replace")
        response_coding = _coding(response)
        if response_coding:
            detail.content_encoding = response_coding
        for name in TRACE_HEADERS:
            if name in request:
                trace_context(call, request)
                break
        self._fill_message(
            call, call.request, stream, C2S, (stream.request_headers, stream.request_trailer_headers), _coding(request)
        )
        if stream.first_ts[S2C]:
            self._fill_message(
                call, call.response, stream, S2C, (stream.response_headers, stream.trailer_headers), response_coding
            )
        for status_value in stream.interim:
            call.response.headers.add(name=":status", value=status_value.decode("latin-1"))
        h2 = call.http2
        h2.stream_id = stream.stream_id  # never 0: the detail is present
        # Zeros and False are proto3's defaults: left unset, the record is the same.
        if stream.pushed:
            h2.pushed = True
            h2.parent_stream_id = stream.parent_stream_id
        if stream.reset_code is not None:
            h2.reset_error = error_name(stream.reset_code)
            h2.reset_by = stream.reset_by
        if stream.goaway_code is not None:
            h2.goaway_error = error_name(stream.goaway_code)
        end_stream, frames, header_bytes = stream.end_stream, stream.frames, stream.header_bytes
        if end_stream[C2S]:
            h2.request_end_stream = True
        if end_stream[S2C]:
            h2.response_end_stream = True
        h2.request_frames = frames[C2S]
        if frames[S2C]:
            h2.response_frames = frames[S2C]
        h2.request_header_bytes = header_bytes[C2S]
        if header_bytes[S2C]:
            h2.response_header_bytes = header_bytes[S2C]
        if stream.trailers_seen:
            h2.trailers = True
        if stream.padding:
            h2.padding = stream.padding
        if stream.upgraded:
            h2.upgraded = True
        response_ts = stream.first_ts[S2C] if stream.response_started else None
        if end == ENDED or (end == RESET and stream.end_stream[S2C] and stream.response_started):
            finish_call(call, response_ts, error=status >= 500)
        elif end in (RESET, REFUSED):
            if end == REFUSED:
                stream.note("refused")
            if response_ts is not None:
                finish_call(call, response_ts, error=True)
            else:
                call.outcome = Outcome.OUTCOME_ERROR
                call.elapsed_ns = max(0, ts_ns - stream.first_ts[C2S])
        elif end == FLOW_END and response_ts is not None:
            stream.note("truncated")
            finish_call(call, response_ts, error=status >= 500)
        else:
            finish_call(call, None, error=False)
        call.notes.extend(stream.notes)
        if stream.grpc is not None:
            self._grpc(call, stream, end, ts_ns)
        elif call.request.body or "?" in call.path:
            graphql.from_http(call, status)
        self.out.append(call)

    def _late_grpc(self, stream: H2Stream) -> None:
        """The request's content-type was not read (an HPACK entry from before a mid-connection
        start) but the answer is gRPC's: its messages are read from the DATA kept, and counted
        as far as that goes."""
        max_body = self.limits.max_body_bytes
        readers: list[grpc.MessageStream | None] = [
            grpc.MessageStream(grpc.message_encoding(stream.request), max_body),
            grpc.MessageStream(grpc.message_encoding(stream.response), max_body),
        ]
        for direction in (C2S, S2C):
            cast(grpc.MessageStream, readers[direction]).feed(bytes(stream.bodies[direction]))
        stream.grpc = readers
        stream.note("grpc-from-response")
        if any(stream.data_bytes[direction] > len(stream.bodies[direction]) for direction in (C2S, S2C)):
            stream.note("grpc-messages-counted-in-kept-body")

    def _grpc(self, call: ApiCall, stream: H2Stream, end: int, ts_ns: int) -> None:
        """The gRPC layer on a finished stream: status, messages, outcome (protocols/grpc.py)."""
        readers = cast(list[grpc.MessageStream | None], stream.grpc)
        max_body = self.limits.max_body_bytes
        request = readers[C2S] or grpc.MessageStream(grpc.message_encoding(stream.request), max_body)
        response = readers[S2C] or grpc.MessageStream(grpc.message_encoding(stream.response), max_body)
        if end == ENDED:
            request.finish()
            response.finish()
        grpc.apply(
            call,
            stream.request,
            stream.response,
            stream.trailers,
            request,
            response,
            self.limits.grpc_descriptors,
            stream.response_started,
        )
        if stream.reset_code is not None:
            grpc.reset_outcome(
                call,
                error_name(stream.reset_code),
                stream.reset_by == "client",
                stream.first_ts[C2S],
                ts_ns,
                call.grpc.timeout_ns,
            )
        # Compressed messages in a body cannot be redacted: that body is not published (the
        # first message, decompressed and decoded, is in the GrpcDetail).
        if not request.compressed and not response.compressed:
            return
        for message, compressed in ((call.request, request.compressed), (call.response, response.compressed)):
            if compressed and message.body:
                message.body_truncated = message.body_size
                message.body = b""
                if "body-not-decoded" not in call.notes:
                    call.notes.append("body-not-decoded")

    def _fill_message(
        self,
        call: ApiCall,
        message: Message,
        stream: H2Stream,
        direction: Direction,
        header_lists: tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]],
        encoding: str,
    ) -> None:
        """`header_lists`: the headers and the trailers, in that order."""
        message.ts = stream.first_ts[direction]
        message.end_ts = stream.last_ts[direction]
        message.size = stream.wire[direction]
        taken = stream.header_wire[direction]
        if taken is not None:
            if taken:
                message.MergeFromString(taken)
        elif header_lists[0] or header_lists[1]:
            known = _HEADER_WIRE
            message.MergeFromString(
                b"".join([known.get(field) or _header_wire(field) for fields in header_lists for field in fields])
            )
        body_size = stream.data_bytes[direction]
        message.body_size = body_size
        kept = bytes(stream.bodies[direction])
        message.body_truncated = body_size - len(kept)
        if kept and encoding and encoding != "identity":
            decoded = None
            decoder = DECODERS.get(encoding)
            if decoder is not None:
                with contextlib.suppress(Exception):  # a corrupt body is treated as an unknown coding
                    decoded = decoder(kept, self.limits.max_body_bytes)
            if decoded is None:
                # What cannot be decoded cannot be redacted: the body is not published.
                message.body_truncated = body_size
                stream.note("body-not-decoded")
                return
            kept = decoded
        message.body = kept


def _stream_state(stream: H2Stream) -> Http2StreamState:
    """An open stream's state (Http2Parser.snapshot); NotAtBoundary for what the state does not
    describe."""
    if (
        stream.pushed
        or stream.upgraded
        or stream.interim
        or stream.notes
        or stream.padding
        or stream.reset_code is not None
        or stream.goaway_code is not None
        or stream.request_trailer_headers
    ):
        raise NotAtBoundary("HTTP/2: an open stream a Http2StreamState does not describe")
    messages: tuple[grpc.MessageState | None, grpc.MessageState | None] = (None, None)
    if stream.grpc is not None:
        request, response = stream.grpc
        messages = (
            request.snapshot() if request is not None else None,
            response.snapshot() if response is not None else None,
        )
    return Http2StreamState(
        stream_id=stream.stream_id,
        ordinal=stream.ordinal,
        request_headers=tuple(stream.request_headers),
        response_headers=tuple(stream.response_headers),
        trailer_headers=tuple(stream.trailer_headers),
        response_started=stream.response_started,
        trailers_seen=stream.trailers_seen,
        end_stream=(stream.end_stream[C2S], stream.end_stream[S2C]),
        bodies=(bytes(stream.bodies[C2S]), bytes(stream.bodies[S2C])),
        data_bytes=(stream.data_bytes[C2S], stream.data_bytes[S2C]),
        first_ts=(stream.first_ts[C2S], stream.first_ts[S2C]),
        last_ts=(stream.last_ts[C2S], stream.last_ts[S2C]),
        wire=(stream.wire[C2S], stream.wire[S2C]),
        frames=(stream.frames[C2S], stream.frames[S2C]),
        header_bytes=(stream.header_bytes[C2S], stream.header_bytes[S2C]),
        is_grpc=stream.grpc is not None,
        messages=messages,
    )


def _grpc_answer(stream: H2Stream) -> bool:
    """The response says gRPC (its content-type, or a grpc-status) though the request's
    content-type was not read."""
    content_type = stream.response.get(b"content-type")
    if content_type is not None and grpc.is_grpc(content_type.decode("latin-1")):
        return True
    return b"grpc-status" in stream.trailers or b"grpc-status" in stream.response


def _coding(headers: dict[bytes, bytes]) -> str:
    value = headers.get(b"content-encoding")
    return value.decode("latin-1").strip().lower() if value else ""


def new_stream(flow: FlowInfo, limits: ParserLimits) -> Http2Parser:
    return Http2Parser(flow, limits)


SPEC = ProtocolSpec(
    name="http2", transport="tcp", probe=probe, new_stream=new_stream, ports=H2_PORTS, probe_bytes=len(PREFACE)
)

__all__ = [
    "SPEC",
    "H2Stream",
    "Http2Parser",
    "Http2State",
    "Http2StreamState",
    "error_name",
    "h2c_request_headers",
    "probe",
]
