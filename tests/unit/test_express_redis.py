"""The compiled lane's Redis part (_express_redis.h) against the Python path (protocols/redis.py):
the same packets must give the same calls (every field, ids included) and the same counters.

The conversations are RESP2 as redis-server and its clients write it (commands as arrays of
bulk strings, pipelined; every reply type), over TCP segments cut at various sizes, in batches
cut at random places, mixed with what gives a flow back to Python mid-way: commands that change
how the connection is read (SELECT, MULTI/EXEC, SUBSCRIBE, CLIENT REPLY, HELLO 3), credentials
(AUTH), inline commands, RESP3 replies, a length written with a leading zero (which the lane's
libhiredis accepts and hiredis-py refuses), keys the Redactor reads as URLs, non-ASCII and long
arguments, replies with nothing pending, a connection closed with commands pending.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import scaled
from tests.unit.dissector_builders import Conversation
from tests.unit.test_express_differential import Frames, assert_same, capture_frames

ASCII = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789:_-", min_size=0, max_size=12)


def command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args)


def bulk(value: bytes | None) -> bytes:
    return b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value)


def reply(kind: int, word: str) -> bytes:
    """One RESP2 reply of each type (and nesting) redis-server writes."""
    text = word.encode()
    return (
        b"+OK\r\n",
        b"-ERR unknown command '%s'\r\n" % text,
        b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        b":%d\r\n" % (len(word) * 37 - 100),
        bulk(text),
        bulk(None),
        b"*-1\r\n",
        b"*0\r\n",
        b"*2\r\n" + bulk(text) + b":5\r\n",
        b"*2\r\n*1\r\n" + bulk(text) + b"*0\r\n",
        bulk(b"line\r\nbreak"),
        b"-\r\n",
    )[kind % 12]


# What gives a flow back: (client bytes, server bytes).
ODD: list[tuple[bytes, bytes]] = [
    (command(b"SELECT", b"2"), b"+OK\r\n"),
    (command(b"AUTH", b"s3cr3t"), b"+OK\r\n"),
    (command(b"MULTI"), b"+OK\r\n"),
    (command(b"SUBSCRIBE", b"news"), b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"),
    (command(b"CLIENT", b"REPLY", b"SKIP"), b""),
    (command(b"HELLO", b"3"), b"%1\r\n$6\r\nserver\r\n$5\r\nredis\r\n"),
    (b"PING\r\n", b"+PONG\r\n"),
    (command(b"GET", b"k"), b"_\r\n"),
    (command(b"GET", b"k"), b"$05\r\nhello\r\n"),
    (b"*2\r\n$3\r\nGET\r\n$01\r\nk\r\n", b"$-1\r\n"),
    (command(b"GET", b"user@example"), bulk(b"x")),
    (command(b"SET", b"caf\xc3\xa9", b"1"), b"+OK\r\n"),
    (command(b"SET", b"k", b"v" * 200), b"+OK\r\n"),
    (command(*[b"MSET"] + [b"k%d" % i for i in range(20)]), b"+OK\r\n"),
    (b"", b"+OK\r\n"),
    (command(b"CONFIG", b"SET", b"requirepass", b"pw"), b"+OK\r\n"),
    (command(b"CONFIG", b"GET", b"save"), b"*2\r\n$4\r\nsave\r\n$0\r\n\r\n"),
    (command(b"OBJECT"), b"-ERR wrong number of arguments for 'object' command\r\n"),
]


@st.composite
def redis_traffic(draw: st.DrawFn) -> Frames:
    frames: Frames = []
    for index in range(draw(st.integers(1, 3))):
        talk = Conversation(
            client=f"10.5.0.{index + 1}", server="10.6.0.1", client_port=43000 + index, server_port=6379
        )
        talk.now += index * 5_000
        talk.handshake()
        segment = draw(st.sampled_from([3, 17, 64, 1400]))
        first = True
        for _ in range(draw(st.integers(1, 8))):
            depth = draw(st.integers(1, 6))
            requests: list[bytes] = []
            answers: list[bytes] = []
            for _ in range(depth):
                if draw(st.integers(0, 9)) == 0 and not first:
                    client_bytes, server_bytes = ODD[draw(st.integers(0, len(ODD) - 1))]
                else:
                    key, value = draw(ASCII), draw(ASCII)
                    verb = draw(st.sampled_from([b"GET", b"SET", b"INCR", b"LPUSH", b"LRANGE", b"DEL", b"PING"]))
                    args: tuple[Any, ...] = {
                        b"SET": (b"SET", key.encode(), value.encode()),
                        b"LPUSH": (b"LPUSH", key.encode(), value.encode()),
                        b"LRANGE": (b"LRANGE", key.encode(), b"0", b"-1"),
                        b"PING": (b"PING",),
                    }.get(verb, (verb, key.encode()))
                    client_bytes = command(*args)
                    server_bytes = reply(draw(st.integers(0, 11)), value)
                first = False
                requests.append(client_bytes)
                answers.append(server_bytes)
            # The first segment holds a whole command start: a cut one is the lane's at once, and
            # covered by the committed captures.
            talk.client_sends(b"".join(requests), max(segment, 40) if len(talk.frames) == 3 else segment)
            if draw(st.booleans()) or len(talk.frames) > 40:
                talk.server_sends(b"".join(answers), segment)
        if draw(st.booleans()):
            talk.close()
        frames += talk.frames
    frames.sort(key=lambda frame: frame[0])
    return frames


@given(traffic=redis_traffic(), data=st.data())
@settings(max_examples=scaled(80), deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_generated_redis_traffic_gives_the_same_calls(traffic: Frames, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(traffic)), max_size=6))
    assert_same(traffic, cuts=cuts)


def test_pipelined_benchmark_traffic_is_made_by_the_lane() -> None:
    """redis-benchmark's pipelined SET/GET (the committed recording): every call made in C,
    identical to Python's; the connections go back only at the end of input."""
    from pathlib import Path

    frames, link_type = capture_frames(Path(__file__).resolve().parent.parent / "fixtures/redis/benchmark.pcap")
    dissector = assert_same(frames, cuts=range(41, len(frames), 41), link_type=link_type)
    counters: dict[str, Any] = dissector.lane.counters  # type: ignore[union-attr]
    assert counters["calls_redis"] >= 700
    demotions = {name for name, value in counters.items() if name.startswith("express_demotions_") and value}
    assert demotions <= {"express_demotions", "express_demotions_finish", "express_demotions_not_http"}


def test_a_segment_python_refuses_whole_is_replayed_whole() -> None:
    """Two replies in one segment, the second malformed (`$05`): hiredis-py refuses the segment
    whole, so Python never pairs the first reply either (the commands end with the note
    parse-error). The lane, which read the first reply before the error, must not have sent its
    call: a packet's calls leave only once the whole packet is taken."""
    talk = Conversation(client="10.5.0.9", server="10.6.0.1", client_port=43100, server_port=6379)
    talk.handshake()
    talk.client_sends(command(b"GET", b"") + command(b"GET", b"k"))
    talk.server_sends(b"+OK\r\n$05\r\nhello\r\n")
    dissector = assert_same(talk.frames)
    counters: dict[str, Any] = dissector.lane.counters  # type: ignore[union-attr]
    assert counters.get("calls_redis", 0) == 0
    assert counters["express_demotions_redis"] == 1
