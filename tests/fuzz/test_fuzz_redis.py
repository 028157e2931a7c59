"""Property tests of the Redis parser: well-formed conversations (commands as RESP arrays or
inline, replies of every RESP2 and RESP3 type) give the same calls however the bytes are cut;
any bytes give calls or ProtocolError, nothing else; pending commands stay bounded."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trawl.dissector.protocols.base import Direction, FlowInfo, ParserLimits, ProtocolError
from trawl.dissector.protocols.redis import RedisParser
from trawl.v1.calls_pb2 import ApiCall

C, S = Direction.CLIENT_TO_SERVER, Direction.SERVER_TO_CLIENT
FLOW = FlowInfo("tcp", "10.0.0.1", 40000, "10.0.0.2", 6379)
LIMITS = ParserLimits(max_body_bytes=1024, max_pending_requests=8)
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
CRLF = b"\r\n"

line_text = st.binary(max_size=12).map(lambda raw: raw.replace(b"\r", b"").replace(b"\n", b""))
bulk = st.binary(max_size=24).map(lambda raw: b"$%d\r\n%s\r\n" % (len(raw), raw))
scalars = st.one_of(
    line_text.map(lambda text: b"+" + text + CRLF),
    line_text.map(lambda text: b"-ERR " + text + CRLF),
    st.integers(-(2**40), 2**40).map(lambda number: b":%d\r\n" % number),
    bulk,
    st.sampled_from([b"$-1\r\n", b"*-1\r\n", b"_\r\n", b",1.5\r\n", b"#t\r\n", b"(12345678901234567890\r\n"]),
    st.binary(max_size=10).map(lambda raw: b"=%d\r\ntxt:%s\r\n" % (len(raw) + 4, raw)),
)


def _aggregate(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    arrays = st.builds(
        lambda kind, items: kind + b"%d\r\n" % len(items) + b"".join(items),
        st.sampled_from([b"*", b"~"]),
        st.lists(children, max_size=4),
    )
    # Map keys are scalars: hiredis cannot make a dict keyed by a list (tests/unit/test_redis.py).
    maps = st.lists(st.tuples(scalars, children), max_size=3).map(
        lambda pairs: b"%%%d\r\n" % len(pairs) + b"".join(key + value for key, value in pairs)
    )
    return arrays | maps


replies = st.recursive(scalars, _aggregate, max_leaves=8)
pushes = st.builds(
    lambda kind, items: b">%d\r\n" % (len(items) + 1) + b"$%d\r\n%s\r\n" % (len(kind), kind) + b"".join(items),
    st.sampled_from([b"message", b"invalidate", b"subscribe"]),
    st.lists(bulk, max_size=3),
)
words = st.sampled_from([b"GET", b"SET", b"lpush", b"HGETALL", b"PING", b"EXISTS", b"MULTI", b"EXEC", b"SELECT"])
args = st.lists(st.binary(max_size=20), max_size=4)


def _command(word: bytes, rest: list[bytes], inline: bool) -> bytes:
    if inline:
        plain = [arg for arg in (arg.translate(None, b" \t\r\n\"'\x00") for arg in rest) if arg]
        return b" ".join([word, *plain]) + CRLF
    items = [word, *rest]
    return b"*%d\r\n" % len(items) + b"".join(b"$%d\r\n%s\r\n" % (len(item), item) for item in items)


commands = st.builds(_command, words, args, st.booleans())
exchanges = st.lists(st.tuples(commands, st.lists(replies | pushes, min_size=0, max_size=2)), max_size=12)


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[start:end] for start, end in itertools.pairwise(points) if end > start]


def _view(calls: list[ApiCall]) -> list[tuple[object, ...]]:
    """What a call says, timestamps aside (they follow the chunking)."""
    return [
        (
            call.method,
            call.path,
            call.status,
            call.outcome,
            call.request.size,
            call.response.size,
            tuple(call.redis.args),
            call.redis.reply_type,
            call.redis.db,
            call.redis.one_way,
            tuple(call.notes),
        )
        for call in calls
    ]


def _run(chunks: list[tuple[Direction, bytes]]) -> list[ApiCall]:
    parser = RedisParser(FLOW, LIMITS)
    calls: list[ApiCall] = []
    for index, (direction, data) in enumerate(chunks):
        calls += parser.feed(direction, data, index)
        assert len(parser.pending) <= LIMITS.max_pending_requests
        assert len(parser.held) <= LIMITS.max_pending_requests
    return calls + parser.finish(len(chunks))


@FUZZ
@given(exchanges, st.lists(st.integers(0, 10**6), max_size=8), st.lists(st.integers(0, 10**6), max_size=8))
def test_the_same_bytes_cut_anywhere_give_the_same_calls(
    talk: list[tuple[bytes, list[bytes]]], client_cuts: list[int], server_cuts: list[int]
) -> None:
    client = b"".join(command for command, _ in talk)
    server = b"".join(b"".join(answer) for _, answer in talk)
    whole = _run([(C, client), (S, server)] if client and server else [(C, client)] if client else [])
    pieces = [(C, piece) for piece in _cut(client, client_cuts)] + [(S, piece) for piece in _cut(server, server_cuts)]
    assert _view(_run(pieces)) == _view(whole)


@FUZZ
@given(exchanges, st.lists(st.integers(0, 10**6), max_size=6))
def test_alternating_exchanges_cut_anywhere_give_the_same_calls(
    talk: list[tuple[bytes, list[bytes]]], cuts: list[int]
) -> None:
    whole: list[tuple[Direction, bytes]] = []
    pieces: list[tuple[Direction, bytes]] = []
    for command, answer in talk:
        whole.append((C, command))
        pieces += [(C, piece) for piece in _cut(command, cuts)]
        reply = b"".join(answer)
        if reply:
            whole.append((S, reply))
            pieces += [(S, piece) for piece in _cut(reply, cuts)]
    assert _view(_run(pieces)) == _view(_run(whole))


@FUZZ
@given(
    st.lists(
        st.tuples(st.booleans(), st.binary(max_size=60) | commands | replies | pushes, st.integers(0, 3)), max_size=20
    )
)
def test_any_bytes_give_calls_or_protocol_error(steps: list[tuple[bool, bytes, int]]) -> None:
    parser = RedisParser(FLOW, LIMITS)
    try:
        for index, (to_server, data, gap) in enumerate(steps):
            direction = C if to_server else S
            for call in parser.feed(direction, data, index):
                assert call.protocol == "redis" and call.id
            if gap == 3:
                parser.gap(direction, 10, index)
            assert len(parser.pending) <= LIMITS.max_pending_requests
        parser.expire(10**15)
        parser.finish(len(steps))
    except ProtocolError:
        pass
