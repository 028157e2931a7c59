"""Redis (RESP2 and RESP3, sans-IO): commands paired with their replies in order.

Framing stands on hiredis (`hiredis.Reader`, the C parser redis-py uses): every RESP message of
either direction is decoded by it, RESP3 types included (maps, sets, doubles, booleans, big
numbers, verbatim strings, push frames). What hiredis does not read is written here, with the
reason: inline commands (`PING\\r\\n`, what `redis-cli` and telnet users send; the server treats
any client message not starting with `*` as one, split on blanks and quotes as redis-server's
`sdssplitargs` does, approximated with `shlex`), and the choice between the two by the message's
first byte, which is how redis-server itself chooses.

Message sizes. hiredis gives values, not byte offsets, and `Reader.len()` counts bytes already
consumed (its buffer is compacted only past 1 KiB), so the wire size of each message is measured
by what hiredis accepts, never by reading RESP lengths here:
- at a message boundary, the rest of the chunk is fed whole; if hiredis returns one message and
  `has_data()` is false, that message is exactly the rest of the chunk (the everyday case: one
  command or one reply per TCP segment);
- when it holds several messages (pipelining): a scalar reply's type byte (at the offset the
  previous sizes give) and its value fix its encoding (`$` + length + bytes, `+` + text, `:` +
  digits, `_`...), so such replies are sized one after the other; for the rest, when the
  least RESP encodings of their values (a command as an array of bulk strings, which is all
  redis-server runs; a reply's simple string, plain integer...) add up to the bytes hiredis
  consumed: no message can be shorter than its least encoding, so each is exactly that;
- otherwise (a bulk reply that could have been a simple string, a double, an error, a chunk
  that ends inside a message) a fresh reader is fed the chunk line by line, up
  to each `\\n`: every RESP message ends with `\\r\\n`, so the first line after which hiredis
  returns a message is its last, and the bytes fed since the previous one are its size. This
  costs a C call per line (about 0.5 us) where the whole chunk costs 0.2 us per message; it is
  exact for any RESP hiredis reads, where re-encoding a value would guess (`+OK` and `$2 OK` decode
  alike). hiredis accepts only canonical lengths and integers (no sign, no leading zero), so
  the least encoding differs from another only in the types it chose.
A message is held whole by hiredis until it ends; one longer than `1024 * max_body_bytes`
(64 MiB by default) ends the parse of the flow (a `ProtocolError`, which the dissector counts
and logs), the bound on memory.

Pairing (in order, as Redis answers one client):
- pipelining: replies pair first in, first out; `pipeline_depth` is how many commands were
  outstanding when a command was sent;
- pub/sub: after SUBSCRIBE / PSUBSCRIBE / SSUBSCRIBE, `message`, `pmessage` and `smessage`
  arrays are one-way calls (`one_way`, `from_server`; method MESSAGE..., path the channel), and
  each (un)subscribe confirmation belongs to the command that asked for it (one per channel:
  the first answers the call, the others are absorbed; UNSUBSCRIBE without channels absorbs
  confirmations until another message comes). The subscription counts in the confirmations
  say when the connection leaves subscribed mode (RESP2). RESP3 push frames (`>`) are never
  replies: confirmations pair as above, anything else (messages, `invalidate` of client-side
  caching) is a one-way call;
- MULTI/EXEC: a command queued inside a transaction is answered `+QUEUED`; its call is held
  until EXEC, whose array gives each queued command its real result (status, outcome, note
  `queued`); EXEC's nil (a WATCHed key changed) gives them status `nil` and the note
  `transaction-aborted`, an EXECABORT error or a DISCARD the note `transaction-discarded`;
- blocking commands (BLPOP, BRPOP, BLMOVE, BZPOPMIN, XREAD/XREADGROUP, WAIT..., from the
  `blocking` flag of redis-server's own command table) may wait forever: neither they nor the
  commands behind them time out (`expire`); only the end of the flow reports them unanswered;
- CLIENT REPLY OFF / SKIP: commands the server will not answer are one-way calls at once
  (`one_way`, note `no-reply`);
- MONITOR's feed lines are counted (`redis_monitor_lines`), not reported; after SYNC/PSYNC
  the connection carries a replication stream (an RDB file is not RESP) and parsing stops.
A command reported `no_response` by `expire` stays in the queue as a placeholder, so its late
reply is skipped (`redis_late_replies`) instead of answering the next command. Pending commands
(and transaction commands held for EXEC) are bounded by `ParserLimits.max_pending_requests`:
past it the oldest is reported `no_response` with the note `pending-limit`
(`redis_pending_limit`), and calls paired until the queue next empties carry that note. A reply
with nothing pending is counted (`redis_unpaired_replies`). These counts reach the dissector's
counters when the flow ends.

Summary triple: `method` = the command in upper case, two words for container commands
(`CLIENT SETNAME`, `CONFIG GET`, `XINFO STREAM`); `path` = the first key, found with the key
specs of redis-server's `COMMAND` reply (redis_commands.py, generated), or the channel of
pub/sub commands; `status` = `ok`, `nil` or the error's prefix (`ERR`, `WRONGTYPE`, `MOVED`...),
and an error reply is an `error` outcome. RedisDetail: the arguments (at most MAX_ARGS, each at
most MAX_ARG_BYTES, as text; note `args-truncated`), the db (from SELECT, 0 by default, reset by
RESET), the RESP version (3 after a successful `HELLO 3`), the reply's RESP type.

Secrets: credentials are only ever in `RedisDetail.args` (no message body is kept), which
`redact_args` (called by the dissector's Redactor) redacts: AUTH, HELLO's AUTH clause,
MIGRATE's AUTH/AUTH2, CONFIG SET of password parameters, ACL SETUSER password rules. A
`ProtocolError` never quotes the stream.

Gaps: the direction with the hole resynchronises at the next chunk that starts like a message
(a command array or a known inline command; a reply type byte), pending commands are reported
`no_response` with the note `capture-gap`, and calls paired until the queue next empties carry
that note (which reply answers which command is uncertain across a hole).
"""

from __future__ import annotations

import contextlib
import re
import shlex
from collections import deque
from collections.abc import MutableSequence
from dataclasses import dataclass
from typing import Any

import hiredis

from trawl.dissector.calls import OUTCOME_ERROR, OUTCOME_OK, finish_call, new_call
from trawl.dissector.protocols.base import (
    Direction,
    FlowInfo,
    NotAtBoundary,
    ParserLimits,
    ProtocolError,
    ProtocolSpec,
    StreamParser,
)
from trawl.dissector.protocols.redis_commands import COMMANDS, CONTAINERS, KeySpec
from trawl.v1.calls_pb2 import ApiCall

PROTOCOL = "redis"
REDIS_PORTS = frozenset({6379, 26379})
# Line protocols whose commands and `+OK` replies look like inline Redis (FTP, SMTP, POP3, NNTP, IMAP, ManageSieve).
TEXT_PROTOCOL_PORTS = frozenset({21, 25, 110, 119, 143, 465, 587, 993, 995, 4190})
MAX_ARGS = 16  # arguments kept per call (the command name included)
MAX_ARG_BYTES = 128  # bytes of one argument kept (as text)
MAX_INLINE = 64 * 1024  # redis-server's PROTO_INLINE_MAX_SIZE: a longer inline line is refused
REDACTED = "[REDACTED]"

_STAR, _PUSH, _ATTRIBUTE, _STATUS = 0x2A, 0x3E, 0x7C, 0x2B
_BULK, _INTEGER, _NULL, _BOOLEAN = 0x24, 0x3A, 0x5F, 0x23
TYPE_NAMES = {
    ord("+"): "simple",
    ord("-"): "error",
    ord(":"): "integer",
    ord("$"): "bulk",
    ord("*"): "array",
    ord("_"): "nil",
    ord("%"): "map",
    ord("~"): "set",
    ord(","): "double",
    ord("#"): "boolean",
    ord("("): "big_number",
    ord("="): "verbatim",
    ord(">"): "push",
}
_REPLY_START = frozenset(TYPE_NAMES) | {_ATTRIBUTE}
_COMMAND_ARRAY = re.compile(rb"\*[1-9][0-9]{0,6}\r\n\$[0-9]")
_COMMAND_ARRAY_PREFIX = re.compile(rb"\*(?:[1-9][0-9]{0,6}(?:\r(?:\n\$?)?)?)?")
_HTTP_LINE = re.compile(rb"[A-Z]+ [^ \r\n]+ HTTP/[0-9]")
_INLINE_WORD = re.compile(rb"([A-Za-z][A-Za-z_|-]{1,31})( |\r?\n)")
_CONFIRMATIONS = frozenset(
    {b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe", b"punsubscribe", b"sunsubscribe"}
)
_SHARD_CONFIRMATIONS = frozenset({b"ssubscribe", b"sunsubscribe"})
_MESSAGES = frozenset({b"message", b"pmessage", b"smessage"})
_PUBSUB_COMMANDS = frozenset(name.decode().upper() for name in _CONFIRMATIONS)
_CHANNEL_COMMANDS = _PUBSUB_COMMANDS | {"PUBLISH"}
_REPLICATION = frozenset({"SYNC", "PSYNC"})
# Password parameters of CONFIG SET and the ACL rules that carry a password or its hash.
_SECRET_CONFIG = frozenset({"REQUIREPASS", "MASTERAUTH", "TLS-KEY-FILE-PASS", "TLS-CLIENT-KEY-FILE-PASS"})
_SECRET_ACL_RULE = (">", "<", "#", "!")


def redact_args(args: MutableSequence[str]) -> None:
    """Replace the credentials in a command's arguments (RedisDetail.args) by REDACTED: every
    argument of AUTH; the user and password after HELLO's AUTH; the password after MIGRATE's
    AUTH and the user and password after its AUTH2; the value of CONFIG SET's password
    parameters; the passwords and hashes of ACL SETUSER rules (`>pw` -> `>[REDACTED]`)."""
    if len(args) < 2:
        return
    name = args[0].upper()
    if name == "AUTH":
        for index in range(1, len(args)):
            args[index] = REDACTED
    elif name in ("HELLO", "MIGRATE"):
        for index in range(1, len(args)):
            word = args[index].upper()
            taken = 2 if word == "AUTH2" or (word == "AUTH" and name == "HELLO") else 1 if word == "AUTH" else 0
            for secret in range(index + 1, min(index + 1 + taken, len(args))):
                args[secret] = REDACTED
    elif name == "CONFIG" and args[1].upper() == "SET":
        for index in range(2, len(args) - 1, 2):
            if args[index].upper() in _SECRET_CONFIG:
                args[index + 1] = REDACTED
    elif name == "ACL" and args[1].upper() == "SETUSER":
        for index in range(3, len(args)):
            if args[index].startswith(_SECRET_ACL_RULE):
                args[index] = args[index][0] + REDACTED


# Commands the compiled lane leaves to this parser (its `lane_rule`): what changes how the
# connection is read (the db, the RESP version, transactions, pub/sub, replies turned off, a
# monitor or replication stream) and what carries credentials in its arguments.
LANE_REFUSED = frozenset(
    {
        "AUTH", "HELLO", "MIGRATE", "SELECT", "RESET", "MULTI", "EXEC", "DISCARD", "MONITOR", "SYNC", "PSYNC",
        "QUIT", *_PUBSUB_COMMANDS, "CONFIG SET", "ACL SETUSER", "CLIENT REPLY",
    }
)  # fmt: skip
LANE_CONTAINER = -2
LANE_REFUSE = -1


def lane_rule(method: str) -> int:
    """How the compiled lane (_express_redis.h) may take a command, asked once per distinct
    `method` (upper case): LANE_CONTAINER when it is a container command's name alone (the lane
    asks again with "NAME SUB", or "NAME " when no subcommand was sent); LANE_REFUSE when this
    parser must see it (LANE_REFUSED, or a first key its key specs find other than at a fixed
    index); else where its first key is, as `first_key` would find it for this command (the
    argument index, or 0 for none)."""
    alone = method.endswith(" ")
    method = method.rstrip(" ")
    name = method.split(" ", 1)[0]
    if " " not in method and not alone and name in CONTAINERS:
        return LANE_CONTAINER
    if name in LANE_REFUSED or method in LANE_REFUSED:
        return LANE_REFUSE
    entry = COMMANDS.get(method) or COMMANDS.get(name)
    specs = entry[1] if entry is not None else ()
    if specs:
        begin, where, _startfrom, find, _keynumidx, _firstkey = specs[0]
        if len(specs) == 1 and begin == "index" and find == "range" and isinstance(where, int):
            return where
        return LANE_REFUSE
    return 1 if name in _CHANNEL_COMMANDS else 0


def _text(value: object) -> str:
    """An argument (or a pushed message's element) as bounded text; nested arrays as `[a, b]`."""
    if isinstance(value, bytes):
        return value[:MAX_ARG_BYTES].decode("utf-8", "replace")
    if isinstance(value, list):
        return ("[" + ", ".join(_text(item) for item in value[:MAX_ARGS]) + "]")[:MAX_ARG_BYTES]
    return str(value)[:MAX_ARG_BYTES]


def _upper(value: object) -> str:
    return value.decode("latin-1").upper() if isinstance(value, bytes) else str(value).upper()


def first_key(args: list[bytes], specs: tuple[KeySpec, ...]) -> bytes | None:
    """The first key of a command, by redis-server's key specs (index or keyword search, then a
    range or a key count), the empty key skipped (MIGRATE's "" before KEYS)."""
    argc = len(args)
    if len(specs) == 1:
        begin, where, _startfrom, find, _keynumidx, _firstkey = specs[0]
        if begin == "index" and find == "range":  # most commands: the key at a fixed place
            assert isinstance(where, int)
            return args[where] if where < argc and args[where] else None
    found: int | None = None
    for begin, where, startfrom, find, keynumidx, firstkey in specs:
        if begin == "index":
            assert isinstance(where, int)
            start = where
        else:
            keyword = str(where).encode()
            start = -1
            positions = range(startfrom, argc) if startfrom >= 0 else range(argc + startfrom, 0, -1)
            for position in positions:
                if 0 < position < argc and args[position].upper() == keyword:
                    start = position + 1
                    break
            if start < 0:
                continue
        if find == "keynum":
            count_at = start + keynumidx
            if count_at >= argc:
                continue
            try:
                count = int(args[count_at])
            except ValueError:
                continue
            if count <= 0:
                continue
            start += firstkey
        if start < argc and args[start] and (found is None or start < found):
            found = start
    return None if found is None else args[found]


def _error_prefix(error: object) -> str:
    """An error reply's code: its first word (`ERR`, `WRONGTYPE`, `MOVED`...)."""
    return str(error).split(" ", 1)[0] or "ERR"


def _split_inline(line: bytes) -> list[bytes]:
    """An inline command's arguments, as redis-server's sdssplitargs splits them (blanks,
    double and single quotes); shlex stands for it, plain blanks when the quotes do not close."""
    if b'"' not in line and b"'" not in line:
        return line.split()
    try:
        return [word.encode("latin-1") for word in shlex.split(line.decode("latin-1"))]
    except ValueError:
        return line.split()


def _digits(number: int) -> int:
    return len(str(number))


def _least_command(value: Any) -> int | None:
    """The size of a command as an array of bulk strings, the least encoding redis-server runs
    (it refuses any other element type in a command array and closes the connection)."""
    if type(value) is not list or not value:
        return None
    size = 3 + len(str(len(value)))
    for item in value:
        if type(item) is not bytes:
            return None
        length = len(item)
        size += 5 + len(str(length)) + length
    return size


def _exact_reply(first: int, value: Any) -> int | None:
    """The size of a scalar reply whose type byte fixes its encoding; None for any other."""
    kind = type(value)
    if first == _BULK:
        if kind is bytes:
            return 5 + len(str(len(value))) + len(value)
        return 5 if value is None else None  # `$-1`
    if first == _STATUS:
        return 3 + len(value) if kind is bytes else None
    if first == _INTEGER:
        return 3 + len(str(value)) if kind is int else None
    if first == _NULL:
        return 3
    if first == _STAR and value is None:
        return 5  # `*-1`
    if first == _BOOLEAN:
        return 4
    return None


def _least_reply(value: Any) -> int | None:
    """The least RESP encoding of a reply value (bytes as a simple string when they can be
    one, integers in plain digits, nil as RESP3's `_`); None for values whose least encoding
    is not plain (doubles, errors, which hiredis has decoded)."""
    kind = type(value)
    if kind is bytes:
        if b"\r" in value or b"\n" in value:
            return 5 + _digits(len(value)) + len(value)
        return 3 + len(value)
    if kind is int:
        return 3 + len(str(value))
    if value is None:
        return 3
    if kind is bool:
        return 4
    if kind is list or kind is hiredis.PushNotification:
        size = 3 + _digits(len(value))
        for item in value:
            part = _least_reply(item)
            if part is None:
                return None
            size += part
        return size
    if kind is dict:
        size = 3 + _digits(len(value))
        for key, item in value.items():
            key_part, item_part = _least_reply(key), _least_reply(item)
            if key_part is None or item_part is None:
                return None
            size += key_part + item_part
        return size
    return None


# A framed message: (value, first byte, size on the wire, first chunk's ts, last chunk's ts).
_Frame = tuple[Any, int, int, int, int]
_INLINE = -2  # `first` of a client message being read as an inline line


class _Side:
    """The framing state of one direction (see "Message sizes" in the module docstring)."""

    __slots__ = ("client", "first", "line", "lost", "max_message", "reader", "resyncing", "size", "ts")

    def __init__(self, client: bool, max_message: int) -> None:
        self.client = client
        self.max_message = max_message
        self.reset()
        self.lost = False

    def reset(self) -> None:
        self.reader = hiredis.Reader()
        self.size = 0  # bytes of the message being read; 0 at a boundary
        self.first = -1
        self.ts = 0
        self.line = bytearray()  # an inline command being read
        self.resyncing = False

    @property
    def at_boundary(self) -> bool:
        return self.size == 0 and not self.lost

    def read(self, data: bytes, ts_ns: int, out: list[_Frame]) -> None:
        if self.lost:
            if not self._plausible_start(data):
                return
            self.lost = False
            self.resyncing = True
        try:
            self._read(data, ts_ns, out)
        except (hiredis.ProtocolError, TypeError, ValueError) as exc:
            # TypeError: a RESP3 map whose key is an aggregate, which hiredis cannot make a dict of.
            if not self.resyncing:
                raise ProtocolError(f"Redis: hiredis refused the stream ({type(exc).__name__})") from None
            self.reset()  # the chunk only looked like a message start: keep looking
            self.lost = True

    def _plausible_start(self, data: bytes) -> bool:
        if self.client:
            if _COMMAND_ARRAY.match(data):
                return True
            word = _INLINE_WORD.match(data)
            return word is not None and word.group(1).upper().decode() in COMMANDS
        return bool(data) and data[0] in _REPLY_START

    def _read(self, data: bytes, ts_ns: int, out: list[_Frame]) -> None:
        end = len(data)
        position = 0
        stepping = False
        while position < end:
            if self.size == 0:
                first = data[position]
                self.ts = ts_ns
                if self.client and first != _STAR:
                    self.first = _INLINE
                    position = self._inline(data, position, ts_ns, out)
                    continue
                self.first = first
                if not stepping:
                    reader = self.reader
                    reader.feed(data, position, end - position)
                    value = reader.gets()
                    if value is False:
                        self._grow(end - position)
                        return
                    if not reader.has_data():
                        out.append((value, first, end - position, ts_ns, ts_ns))
                        self.resyncing = False
                        return
                    position = self._whole_messages(value, data, position, ts_ns, out)
                    if position == end:
                        return
                    # The rest is not provably sized at once: measure each message by stepping.
                    self.reader = hiredis.Reader()
                    stepping = True
                    continue
            elif self.first == _INLINE:
                position = self._inline(data, position, ts_ns, out)
                continue
            position = self._step(data, position, ts_ns, out)

    def _whole_messages(self, value: Any, data: bytes, position: int, ts_ns: int, out: list[_Frame]) -> int:
        """The chunk from `position` holds several messages, `value` the first: frame those whose
        size is certain without stepping (see "Message sizes" in the module docstring) and return
        the offset after the last one framed; the caller steps from there with a fresh reader."""
        reader = self.reader
        values = [value]
        complete = True
        try:
            while (value := reader.gets()) is not False:
                values.append(value)
        except (hiredis.ProtocolError, TypeError, ValueError):
            complete = False  # e.g. an inline command after a RESP one: stepping reads it
        complete = complete and not reader.has_data()  # else the chunk ends inside a message
        if not self.client:
            # A scalar reply's type byte and value fix its encoding (hiredis takes only canonical
            # lengths and integers): sized one after the other while they are such.
            for index, item in enumerate(values):
                size = _exact_reply(data[position], item)
                if size is None:
                    values = values[index:]
                    break
                out.append((item, data[position], size, ts_ns, ts_ns))
                position += size
            else:
                self.resyncing = False
                return position
        if not complete:
            return position
        least = _least_command if self.client else _least_reply
        sizes = []
        total = 0
        for item in values:
            size = least(item)
            if size is None:
                return position
            sizes.append(size)
            total += size
        if total != len(data) - position:
            return position
        for item, size in zip(values, sizes, strict=True):
            out.append((item, data[position], size, ts_ns, ts_ns))
            position += size
        self.resyncing = False
        return position

    def _grow(self, size: int) -> None:
        self.size += size
        if self.size > self.max_message:
            raise ProtocolError(f"Redis message longer than {self.max_message} bytes")

    def _step(self, data: bytes, position: int, ts_ns: int, out: list[_Frame]) -> int:
        """Feed line by line until the current message ends (its end returned) or the chunk does."""
        reader = self.reader
        find = data.find
        end = len(data)
        while position < end:
            line_end = find(b"\n", position) + 1
            if line_end == 0:
                reader.feed(data, position, end - position)
                self._grow(end - position)
                return end
            reader.feed(data, position, line_end - position)
            self._grow(line_end - position)
            position = line_end
            value = reader.gets()
            if value is not False:
                out.append((value, self.first, self.size, self.ts, ts_ns))
                self.size = 0
                self.resyncing = False
                return position
        return position

    def _inline(self, data: bytes, position: int, ts_ns: int, out: list[_Frame]) -> int:
        line_end = data.find(b"\n", position) + 1
        if line_end == 0:
            self.line += data[position:]
            self._grow(len(data) - position)
            if len(self.line) > MAX_INLINE:
                raise ProtocolError(f"Redis inline command longer than {MAX_INLINE} bytes")
            return len(data)
        self.line += data[position:line_end]
        self._grow(line_end - position)
        args = _split_inline(bytes(self.line))
        if args:  # an empty line is no command (redis-server skips it)
            out.append((args, _INLINE, self.size, self.ts, ts_ns))
        self.line = bytearray()
        self.size = 0
        self.resyncing = False
        return line_end


class _Pending:
    """A command waiting for its reply."""

    __slots__ = ("answered", "blocking", "call", "confirmations", "name", "previous_db", "protover", "queued")

    def __init__(self, call: ApiCall, name: str, blocking: bool, queued: bool) -> None:
        self.call: ApiCall | None = call  # None: already reported; its reply is skipped
        self.name = name
        self.blocking = blocking
        self.queued = queued
        self.answered = False
        self.confirmations = 0  # pub/sub confirmations still expected; -1: until another message
        self.previous_db = -1  # SELECT: the db before it, restored if it fails
        self.protover = 0  # HELLO: the protocol version it asked for


@dataclass(frozen=True, slots=True)
class RedisState:
    """A Redis connection between exchanges: no command pending or queued in a transaction, no
    message half read, no gap being resynchronised.

    What a compiled lane must supply:
    - `ordinal`: how many calls the connection has begun (each call id hashes its ordinal);
    - `db`: the selected database; `resp_version`: 2, or 3 after HELLO 3;
    - `reply_off`: CLIENT REPLY OFF is in force; `skip_next`: CLIENT REPLY SKIP was sent and the
      next command gets no reply;
    - `in_multi`: MULTI was sent and EXEC/DISCARD not yet;
    - `subscriptions`, `shard_subscriptions`: the counts the last pub/sub confirmations gave
      (either non-zero: RESP2 subscribed mode);
    - `monitor`: MONITOR answered, its feed lines are expected;
    - `stopped`: a replication stream follows (after SYNC/PSYNC): nothing more is parsed.
    """

    ordinal: int
    db: int = 0
    resp_version: int = 2
    reply_off: bool = False
    skip_next: bool = False
    in_multi: bool = False
    subscriptions: int = 0
    shard_subscriptions: int = 0
    monitor: bool = False
    stopped: bool = False


class RedisParser:
    """One Redis connection (both directions); see the module docstring for the rules."""

    def __init__(self, flow: FlowInfo, limits: ParserLimits) -> None:
        self.flow = flow
        self.limits = limits
        max_message = 1024 * max(limits.max_body_bytes, 1024)
        self.sides = (_Side(True, max_message), _Side(False, max_message))
        self.counts: dict[str, int] = {}  # what it counted without making calls (engine._parser_counts)
        self.pending: deque[_Pending] = deque()
        self.held: list[ApiCall] = []  # queued in a transaction, answered QUEUED, waiting for EXEC
        self.out: list[ApiCall] = []
        self.attribute_bytes = 0  # a RESP3 attribute frame's bytes, counted into the next reply
        self.uncertain = ""  # a note for calls paired until the queue empties (after a gap or the limit)
        self._apply(RedisState(ordinal=0))

    def _apply(self, state: RedisState) -> None:
        self.ordinal = state.ordinal
        self.db = state.db
        self.resp_version = state.resp_version
        self.reply_off = state.reply_off
        self.skip_next = state.skip_next
        self.in_multi = state.in_multi
        self.subscriptions = state.subscriptions
        self.shard_subscriptions = state.shard_subscriptions
        self.monitor = state.monitor
        self.stopped = state.stopped

    # -- state at an exchange boundary (base.Snapshotting) ---------------------------------------

    def snapshot(self) -> RedisState:
        """The connection's state between exchanges; NotAtBoundary in the middle of one."""
        if self.pending or self.held or self.out or self.uncertain or self.attribute_bytes:
            raise NotAtBoundary("Redis: a command is pending")
        if not all(side.at_boundary for side in self.sides):
            raise NotAtBoundary("Redis: a message is being read")
        return RedisState(
            ordinal=self.ordinal,
            db=self.db,
            resp_version=self.resp_version,
            reply_off=self.reply_off,
            skip_next=self.skip_next,
            in_multi=self.in_multi,
            subscriptions=self.subscriptions,
            shard_subscriptions=self.shard_subscriptions,
            monitor=self.monitor,
            stopped=self.stopped,
        )

    def restore(self, state: RedisState) -> None:
        """Continue from `state` at a message boundary of both directions."""
        for side in self.sides:
            side.reset()
            side.lost = False
        self.pending.clear()
        self.held = []
        self.out = []
        self.attribute_bytes = 0
        self.uncertain = ""
        self._apply(state)

    # -- the StreamParser interface -----------------------------------------------------------

    def feed(self, direction: Direction, data: bytes, ts_ns: int) -> list[ApiCall]:
        if self.stopped or not data:
            return []
        frames: list[_Frame] = []
        self.sides[direction].read(data, ts_ns, frames)
        if direction is Direction.CLIENT_TO_SERVER:
            for frame in frames:
                self._command(frame)
        else:
            for frame in frames:
                self._reply(frame)
        out, self.out = self.out, []
        return out

    def gap(self, direction: Direction, size: int, ts_ns: int) -> list[ApiCall]:
        side = self.sides[direction]
        side.reset()
        side.lost = True
        self._flush("capture-gap")
        self.uncertain = "capture-gap"
        out, self.out = self.out, []
        return out

    def expire(self, now_ns: int) -> list[ApiCall]:
        """Commands older than the timeout become `no_response` (placeholders stay queued for
        their late replies); a blocking command, and every command behind it, waits."""
        deadline = now_ns - self.limits.request_timeout_ns
        for entry in self.pending:
            if entry.blocking:
                break
            call = entry.call
            if call is None:
                continue
            if call.request.ts > deadline:
                break
            entry.call = None
            self.out.append(finish_call(call, None, error=False))
        out, self.out = self.out, []
        return out

    def finish(self, ts_ns: int) -> list[ApiCall]:
        self._flush("")
        out, self.out = self.out, []
        return out

    # -- commands ----------------------------------------------------------------------------

    def _count(self, name: str, by: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + by

    def _flush(self, note: str) -> None:
        """Report every pending and held command unanswered (the flow ended, or a gap)."""
        for entry in self.pending:
            if entry.call is not None:
                if note:
                    entry.call.notes.append(note)
                self.out.append(finish_call(entry.call, None, error=False))
        self.pending.clear()
        for call in self.held:
            call.notes.append("no-exec-seen")
            self.out.append(call)
        self.held = []

    def _command(self, frame: _Frame) -> None:
        value, first, size, start_ts, end_ts = frame
        if not isinstance(value, list) or not value:
            return  # `*0` / `*-1`: redis-server runs nothing and answers nothing
        args: list[bytes] = [item if type(item) is bytes else str(item).encode() for item in value]
        name = args[0][:MAX_ARG_BYTES].decode("latin-1").upper()
        method = name
        if name in CONTAINERS and len(args) > 1:
            method = name + " " + args[1][:MAX_ARG_BYTES].decode("latin-1").upper()
        entry = COMMANDS.get(method) or COMMANDS.get(name)
        blocking, specs = entry if entry is not None else (False, ())
        call = new_call(self.flow, PROTOCOL, start_ts, self.ordinal)
        self.ordinal += 1
        call.method = method
        key = first_key(args, specs) if specs else None
        if key is None and name in _CHANNEL_COMMANDS and len(args) > 1:
            key = args[1]
        if key is not None:
            call.path = _text(key)
        request = call.request
        request.size = size
        request.end_ts = end_ts
        detail = call.redis
        kept = args[:MAX_ARGS]
        detail.args.extend([arg[:MAX_ARG_BYTES].decode("utf-8", "replace") for arg in kept])
        if len(args) > MAX_ARGS or max(map(len, kept)) > MAX_ARG_BYTES:
            call.notes.append("args-truncated")
        if first == _INLINE:
            call.notes.append("inline")
        detail.arg_count = len(args)
        detail.db = self.db
        detail.resp_version = self.resp_version
        queue = self.pending
        if queue:  # only the head can be an answered pub/sub command absorbing confirmations
            detail.pipeline_depth = len(queue) - 1 if queue[0].answered else len(queue)

        pending = _Pending(call, name, blocking, self.in_multi and name not in ("EXEC", "DISCARD", "MULTI"))
        if name == "MULTI":
            self.in_multi = True
        elif name in ("EXEC", "DISCARD"):
            self.in_multi = False
        elif name == "SELECT" and len(args) > 1:
            pending.previous_db = self.db
            with contextlib.suppress(ValueError):
                self.db = int(args[1])
        elif name == "HELLO" and len(args) > 1:
            with contextlib.suppress(ValueError):
                pending.protover = int(args[1])
        elif name in _PUBSUB_COMMANDS:
            pending.confirmations = len(args) - 1 if len(args) > 1 else -1
        expects_reply = not self.reply_off
        if self.skip_next:
            expects_reply = False
            self.skip_next = False
        if method == "CLIENT REPLY" and len(args) > 2:
            mode = args[2].upper()
            if mode == b"OFF":
                self.reply_off, expects_reply = True, False
            elif mode == b"SKIP":
                self.skip_next, expects_reply = True, False
            elif mode == b"ON":
                self.reply_off, expects_reply = False, True
        if not expects_reply:
            detail.one_way = True
            call.notes.append("no-reply")
            finish_call(call, None, error=False)
            call.outcome = OUTCOME_OK
            self.out.append(call)
            return

        if len(self.pending) >= self.limits.max_pending_requests:
            self._count("redis_pending_limit")
            oldest = self.pending.popleft()
            if oldest.call is not None:
                oldest.call.notes.append("pending-limit")
                self.out.append(finish_call(oldest.call, None, error=False))
            self.uncertain = "pending-limit"
        self.pending.append(pending)

    # -- replies -----------------------------------------------------------------------------

    def _reply(self, frame: _Frame) -> None:
        if self.stopped:
            return  # a replication stream follows SYNC/PSYNC's answer
        value, first, size, start_ts, end_ts = frame
        if first == _ATTRIBUTE:
            self.attribute_bytes += size  # RESP3 attributes describe the reply that follows
            return
        kind = value[0].lower() if isinstance(value, list) and value and isinstance(value[0], bytes) else None
        head = self._head(kind)
        # RESP3 pushes are never replies; in RESP2, the subscription counts say subscribed mode.
        pubsub = first == _PUSH or (self.resp_version == 2 and bool(self.subscriptions or self.shard_subscriptions))
        if kind in _CONFIRMATIONS and (pubsub or (head is not None and head.name == _upper(kind))):
            self._confirmation(kind, value, frame, head)
            return
        if (kind in _MESSAGES and pubsub) or first == _PUSH:
            self._pushed(kind or b"push", value, frame)
            return
        if self.monitor and first == _STATUS and value[:1].isdigit():
            self._count("redis_monitor_lines")
            return
        if not self.pending:
            self._count("redis_unpaired_replies")
            return
        entry = self.pending.popleft()
        if not self.pending and self.uncertain:
            note, self.uncertain = self.uncertain, ""
        else:
            note = self.uncertain
        call = entry.call
        if call is None:
            self._count("redis_late_replies")
            return
        if note:
            call.notes.append(note)
        error = self._answer(call, value, first, size + self.attribute_bytes, start_ts, end_ts)
        self.attribute_bytes = 0
        self._effects(entry, value, error)
        if entry.queued and not error and value == b"QUEUED":
            call.notes.append("queued")
            if len(self.held) >= self.limits.max_pending_requests:
                self._count("redis_pending_limit")
                self.out.append(self.held.pop(0))
            self.held.append(call)
            return
        if entry.name == "EXEC":
            self._exec(value, error)
        elif entry.name == "DISCARD":
            self._release("transaction-discarded")
        self.out.append(call)

    def _head(self, kind: bytes | None) -> _Pending | None:
        """The pending pub/sub command at the head of the queue, if any; an UNSUBSCRIBE without
        channels that was answered leaves the queue when a message of another kind comes."""
        while self.pending:
            head = self.pending[0]
            if head.name not in _PUBSUB_COMMANDS:
                return None
            if head.answered and head.confirmations < 0 and kind != head.name.lower().encode():
                self.pending.popleft()
                continue
            return head
        return None

    def _answer(self, call: ApiCall, value: Any, first: int, size: int, start_ts: int, end_ts: int) -> bool:
        error = isinstance(value, hiredis.ReplyError)
        if value is None:
            call.status = "nil"
            call.redis.reply_type = "nil"
        else:
            call.status = _error_prefix(value) if error else "ok"
            call.redis.reply_type = TYPE_NAMES.get(first, "")
        response = call.response
        response.size = size
        response.end_ts = end_ts
        finish_call(call, start_ts, error=error)
        return error

    def _effects(self, entry: _Pending, value: Any, error: bool) -> None:
        name = entry.name
        if name == "SELECT" and error and entry.previous_db >= 0:
            self.db = entry.previous_db
        elif name == "HELLO" and not error and entry.protover in (2, 3):
            self.resp_version = entry.protover
        elif name == "RESET" and not error:
            self._apply(RedisState(ordinal=self.ordinal))
            self._release("transaction-discarded")
        elif name == "MONITOR" and not error:
            self.monitor = True
        elif name in _REPLICATION and not error:
            self.stopped = True
            self._count("redis_replication_streams")

    def _exec(self, value: Any, error: bool) -> None:
        held, self.held = self.held, []
        if error:
            status = _error_prefix(value)
            for call in held:
                call.status = status
                call.outcome = OUTCOME_ERROR
                call.notes.append("transaction-discarded")
        elif value is None:
            for call in held:
                call.status = "nil"
                call.notes.append("transaction-aborted")
        elif isinstance(value, list):
            for call, result in zip(held, value, strict=False):
                if isinstance(result, hiredis.ReplyError):
                    call.status = _error_prefix(result)
                    call.outcome = OUTCOME_ERROR
                else:
                    call.status = "nil" if result is None else "ok"
            if len(held) != len(value):
                for call in held:
                    call.notes.append("exec-count-mismatch")
        self.out.extend(held)

    def _release(self, note: str) -> None:
        for call in self.held:
            call.notes.append(note)
        self.out.extend(self.held)
        self.held = []

    def _confirmation(self, kind: bytes, value: list[Any], frame: _Frame, head: _Pending | None) -> None:
        count = value[2] if len(value) > 2 and isinstance(value[2], int) else 0
        if kind in _SHARD_CONFIRMATIONS:
            self.shard_subscriptions = count
        else:
            self.subscriptions = count
        if head is None or head.name != kind.decode().upper():
            self._count("redis_unpaired_replies")
            return
        if not head.answered:
            head.answered = True
            call = head.call
            if call is not None:
                _value, first, size, start_ts, end_ts = frame
                self._answer(call, value, first, size + self.attribute_bytes, start_ts, end_ts)
                self.attribute_bytes = 0
                if self.uncertain:
                    call.notes.append(self.uncertain)
                self.out.append(call)
                head.call = None  # reported: the end of the flow must not report it again
        if head.confirmations > 0:
            head.confirmations -= 1
            if head.confirmations == 0:
                self.pending.popleft()
                if not self.pending:
                    self.uncertain = ""

    def _pushed(self, kind: bytes, value: Any, frame: _Frame) -> None:
        """A message the server pushed (pub/sub, RESP3 push): a one-way call, server -> client."""
        _value, first, size, start_ts, end_ts = frame
        call = new_call(self.flow, PROTOCOL, start_ts, self.ordinal)
        self.ordinal += 1
        call.method = kind.decode("latin-1").upper()
        items = list(value) if isinstance(value, list) else [value]
        channel = items[2] if kind == b"pmessage" and len(items) > 2 else items[1] if len(items) > 1 else None
        if isinstance(channel, list):
            channel = channel[0] if channel else None  # `invalidate`: the keys
        if channel is not None:
            call.path = _text(channel)
        call.status = "ok"
        call.request.size = size + self.attribute_bytes
        self.attribute_bytes = 0
        call.request.end_ts = end_ts
        detail = call.redis
        detail.args.extend([_text(item) for item in items[:MAX_ARGS]])
        detail.arg_count = len(items)
        detail.db = self.db
        detail.resp_version = self.resp_version
        detail.reply_type = TYPE_NAMES.get(first, "")
        detail.one_way = True
        detail.from_server = True
        finish_call(call, None, error=False)
        call.outcome = OUTCOME_OK
        self.out.append(call)


def probe(client: bytes, server: bytes, flow: FlowInfo) -> int:
    """3: the client sent a RESP array of bulk strings (`*<n>\\r\\n$<len>`); 2: a known command
    inline (`PING\\r\\n`) answered in RESP or on a Redis port; 1: a Redis port; 0: not Redis."""
    port = flow.server_port in REDIS_PORTS
    if client:
        if _COMMAND_ARRAY.match(client):
            return 3
        if _COMMAND_ARRAY_PREFIX.fullmatch(client):
            return 2 if port else 0  # cut short by the end of the flow before the probe window
        word = _INLINE_WORD.match(client)
        if flow.server_port in TEXT_PROTOCOL_PORTS:
            return 0  # `QUIT`, `AUTH PLAIN` answered `+OK`: POP3, SMTP, FTP... speak like inline Redis
        if word is not None and word.group(1).upper().decode() in COMMANDS and not _HTTP_LINE.match(client):
            if port or (server[:1] and server[0] in _REPLY_START):
                return 2
            return 0
        return 0
    return 1 if port else 0


def new_stream(flow: FlowInfo, limits: ParserLimits) -> StreamParser:
    return RedisParser(flow, limits)


SPEC = ProtocolSpec(
    name=PROTOCOL, transport="tcp", probe=probe, new_stream=new_stream, ports=REDIS_PORTS, probe_bytes=8
)

__all__ = ["SPEC", "RedisParser", "RedisState", "first_key", "lane_rule", "probe", "redact_args"]
