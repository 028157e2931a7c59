"""The Redis parser on conversations written out byte for byte: pairing (pipelines, pub/sub,
MULTI/EXEC, blocking commands, CLIENT REPLY), message sizes, the summary triple, redaction,
limits, gaps, snapshot/restore and the probe. The recorded conversations are in
test_redis_fixtures.py and test_redis_oracle.py."""

from __future__ import annotations

import pytest

from trawl.dissector.config import DEFAULT_REDACT_FIELDS, DEFAULT_REDACT_HEADERS
from trawl.dissector.protocols import redis
from trawl.dissector.protocols.base import Direction, FlowInfo, NotAtBoundary, ParserLimits, ProtocolError
from trawl.dissector.redact import REDACTED, Redactor
from trawl.v1.calls_pb2 import ApiCall, Outcome

C, S = Direction.CLIENT_TO_SERVER, Direction.SERVER_TO_CLIENT
FLOW = FlowInfo("tcp", "10.0.0.1", 40000, "10.0.0.2", 6379, node="n1")
OK, ERROR, NO_RESPONSE = Outcome.OUTCOME_OK, Outcome.OUTCOME_ERROR, Outcome.OUTCOME_NO_RESPONSE


def command(*args: str | bytes) -> bytes:
    """A command as every RESP client encodes it (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class Conversation:
    def __init__(self, limits: ParserLimits | None = None) -> None:
        self.parser = redis.RedisParser(FLOW, limits or ParserLimits())
        self.calls: list[ApiCall] = []
        self.ts = 1_000_000_000

    def client(self, data: bytes) -> Conversation:
        self.ts += 1000
        self.calls += self.parser.feed(C, data, self.ts)
        return self

    def server(self, data: bytes) -> Conversation:
        self.ts += 1000
        self.calls += self.parser.feed(S, data, self.ts)
        return self

    def finish(self) -> list[ApiCall]:
        self.calls += self.parser.finish(self.ts)
        return self.calls

    def summary(self) -> list[tuple[str, str, str]]:
        return [(call.method, call.path, call.status) for call in self.calls]


def test_one_command_one_reply_gives_the_summary_triple_and_sizes() -> None:
    request = command("SET", "user:1", "alice")
    talk = Conversation().client(request).server(b"+OK\r\n")
    (call,) = talk.calls
    assert (call.protocol, call.method, call.path, call.status, call.outcome) == ("redis", "SET", "user:1", "ok", OK)
    assert (call.request.size, call.response.size) == (len(request), 5)
    assert list(call.redis.args) == ["SET", "user:1", "alice"]
    assert (call.redis.db, call.redis.resp_version, call.redis.reply_type, call.redis.arg_count) == (0, 2, "simple", 3)
    assert call.elapsed_ns == 1000


def test_nil_error_prefixes_and_reply_types() -> None:
    talk = Conversation()
    talk.client(command("GET", "missing") + command("LPUSH", "user:1", "x") + command("GET", "x", "y"))
    talk.server(b"$-1\r\n-WRONGTYPE Operation against a key holding the wrong kind of value\r\n")
    talk.server(b"-ERR wrong number of arguments for 'get' command\r\n")
    assert talk.summary() == [("GET", "missing", "nil"), ("LPUSH", "user:1", "WRONGTYPE"), ("GET", "x", "ERR")]
    assert [call.outcome for call in talk.calls] == [OK, ERROR, ERROR]
    assert [call.redis.reply_type for call in talk.calls] == ["nil", "error", "error"]
    talk = Conversation().client(command("GET", "k")).server(b"-MOVED 3999 10.0.0.3:6379\r\n")
    assert talk.calls[0].status == "MOVED"


def test_pipelined_commands_pair_in_order_with_each_message_size() -> None:
    requests = [command("SET", f"p:{index}", "x" * index) for index in range(5)]
    replies = [b"+OK\r\n", b":12\r\n", b"$3\r\nabc\r\n", b"*2\r\n$1\r\na\r\n$2\r\nbc\r\n", b"$0\r\n\r\n"]
    talk = Conversation().client(b"".join(requests)).server(b"".join(replies))
    assert [call.path for call in talk.calls] == [f"p:{index}" for index in range(5)]
    assert [call.request.size for call in talk.calls] == [len(r) for r in requests]
    assert [call.response.size for call in talk.calls] == [len(r) for r in replies]
    assert [call.redis.pipeline_depth for call in talk.calls] == [0, 1, 2, 3, 4]
    assert [call.redis.reply_type for call in talk.calls] == ["simple", "integer", "bulk", "array", "bulk"]


def test_a_message_cut_anywhere_gives_the_same_calls() -> None:
    requests = command("SET", "k", "a\r\nb") + command("GET", "k") + b"PING\r\n"
    replies = b"+OK\r\n$4\r\na\r\nb\r\n+PONG\r\n"
    whole = Conversation().client(requests).server(replies)
    for cut in range(1, len(requests)):
        talk = Conversation().client(requests[:cut]).client(requests[cut:])
        for at in range(0, len(replies), 3):
            talk.server(replies[at : at + 3])
        assert [(c.method, c.path, c.status, c.request.size, c.response.size) for c in talk.calls] == [
            (c.method, c.path, c.status, c.request.size, c.response.size) for c in whole.calls
        ]


def test_inline_commands_with_quotes_and_empty_lines() -> None:
    talk = Conversation().client(b'SET inline "two words"\r\n\r\nget inline\n').server(b"+OK\r\n$9\r\ntwo words\r\n")
    assert talk.summary() == [("SET", "inline", "ok"), ("GET", "inline", "ok")]
    assert list(talk.calls[0].redis.args) == ["SET", "inline", "two words"]
    assert [call.request.size for call in talk.calls] == [24, 11]


def test_container_commands_are_two_words_and_first_keys_follow_key_specs() -> None:
    talk = Conversation()
    for args in (
        ("CLIENT", "setname", "app"),
        ("CONFIG", "GET", "maxmemory"),
        ("XINFO", "STREAM", "orders"),
        ("OBJECT", "ENCODING", "user:1"),
        ("EVAL", "return 1", "2", "first", "second"),
        ("EVAL", "return 1", "0"),
        ("XREAD", "COUNT", "2", "STREAMS", "s1", "s2", "0", "0"),
        ("MIGRATE", "h", "6379", "", "0", "100", "KEYS", "k1", "k2"),
        ("ZUNIONSTORE", "dest", "2", "a", "b"),
        ("PUBLISH", "news", "hi"),
        ("PING",),
    ):
        talk.client(command(*args)).server(b"+OK\r\n")
    assert [(call.method, call.path) for call in talk.calls] == [
        ("CLIENT SETNAME", ""),
        ("CONFIG GET", ""),
        ("XINFO STREAM", "orders"),
        ("OBJECT ENCODING", "user:1"),
        ("EVAL", "first"),
        ("EVAL", ""),
        ("XREAD", "s1"),
        ("MIGRATE", "k1"),
        ("ZUNIONSTORE", "dest"),
        ("PUBLISH", "news"),
        ("PING", ""),
    ]


def test_select_sets_the_db_and_a_failed_select_does_not() -> None:
    talk = Conversation()
    talk.client(command("SELECT", "3") + command("GET", "a")).server(b"+OK\r\n$-1\r\n")
    talk.client(command("SELECT", "99")).server(b"-ERR DB index is out of range\r\n")
    talk.client(command("GET", "b")).server(b"$-1\r\n")
    assert [call.redis.db for call in talk.calls] == [0, 3, 3, 3]


def test_resp3_after_hello_3_with_maps_sets_doubles_and_push_frames() -> None:
    talk = Conversation()
    talk.client(command("HELLO", "3")).server(b"%1\r\n$6\r\nserver\r\n$5\r\nredis\r\n")
    talk.client(command("HGETALL", "h")).server(b"%1\r\n+a\r\n:1\r\n")
    talk.client(command("SMEMBERS", "s")).server(b"~1\r\n+a\r\n")
    talk.client(command("ZSCORE", "z", "a")).server(b",1.5\r\n")
    talk.client(command("GET", "none")).server(b"_\r\n")
    # A push frame between a command and its reply is not the reply.
    talk.client(command("GET", "k"))
    talk.server(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n$1\r\nv\r\n")
    methods = [(call.method, call.status, call.redis.reply_type, call.redis.resp_version) for call in talk.calls]
    assert methods == [
        ("HELLO", "ok", "map", 2),
        ("HGETALL", "ok", "map", 3),
        ("SMEMBERS", "ok", "set", 3),
        ("ZSCORE", "ok", "double", 3),
        ("GET", "nil", "nil", 3),
        ("INVALIDATE", "ok", "push", 3),
        ("GET", "ok", "bulk", 3),
    ]
    pushed = talk.calls[5]
    assert pushed.path == "k" and pushed.redis.one_way and pushed.redis.from_server and pushed.outcome == OK
    assert pushed.response.size == 0 and pushed.request.size == 32


def test_resp3_attributes_count_into_the_next_reply() -> None:
    talk = Conversation().client(command("GET", "k")).server(b"|1\r\n+ttl\r\n:3\r\n$1\r\nv\r\n")
    (call,) = talk.calls
    assert (call.status, call.response.size) == ("ok", 21)


def test_pubsub_resp2_confirmations_messages_and_leaving_subscribed_mode() -> None:
    talk = Conversation()
    talk.client(command("SUBSCRIBE", "orders", "payments"))
    talk.server(b"*3\r\n$9\r\nsubscribe\r\n$6\r\norders\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$8\r\npayments\r\n:2\r\n")
    talk.server(b"*3\r\n$7\r\nmessage\r\n$6\r\norders\r\n$7\r\norder 1\r\n")
    talk.client(command("PSUBSCRIBE", "audit.*"))
    talk.server(b"*3\r\n$10\r\npsubscribe\r\n$7\r\naudit.*\r\n:3\r\n")
    talk.server(b"*4\r\n$8\r\npmessage\r\n$7\r\naudit.*\r\n$11\r\naudit.login\r\n$5\r\nalice\r\n")
    talk.client(command("PING")).server(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
    talk.client(command("UNSUBSCRIBE"))
    talk.server(
        b"*3\r\n$11\r\nunsubscribe\r\n$6\r\norders\r\n:2\r\n*3\r\n$11\r\nunsubscribe\r\n$8\r\npayments\r\n:1\r\n"
    )
    talk.client(command("PUNSUBSCRIBE")).server(b"*3\r\n$12\r\npunsubscribe\r\n$7\r\naudit.*\r\n:0\r\n")
    # Out of subscribed mode, an array that starts with "message" is an ordinary reply.
    talk.client(command("LRANGE", "l", "0", "-1")).server(b"*2\r\n$7\r\nmessage\r\n$1\r\nx\r\n")
    talk.finish()
    assert talk.summary() == [
        ("SUBSCRIBE", "orders", "ok"),
        ("MESSAGE", "orders", "ok"),
        ("PSUBSCRIBE", "audit.*", "ok"),
        ("PMESSAGE", "audit.login", "ok"),
        ("PING", "", "ok"),
        ("UNSUBSCRIBE", "", "ok"),
        ("PUNSUBSCRIBE", "", "ok"),
        ("LRANGE", "l", "ok"),
    ]
    assert [call.redis.one_way for call in talk.calls] == [False, True, False, True, False, False, False, False]
    assert talk.parser.counts == {}


def test_pubsub_resp3_pushes_are_never_replies() -> None:
    talk = Conversation()
    talk.client(command("HELLO", "3")).server(b"%0\r\n")
    talk.client(command("SUBSCRIBE", "news")).server(b">3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n")
    talk.client(command("GET", "k"))
    talk.server(b">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n$1\r\nv\r\n")
    assert talk.summary() == [
        ("HELLO", "", "ok"),
        ("SUBSCRIBE", "news", "ok"),
        ("MESSAGE", "news", "ok"),
        ("GET", "k", "ok"),
    ]


def test_multi_exec_gives_queued_commands_their_real_results() -> None:
    talk = Conversation()
    talk.client(command("MULTI") + command("SET", "t", "1") + command("LPUSH", "t", "x") + command("GET", "t"))
    talk.client(command("EXEC"))
    talk.server(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n")
    assert talk.summary() == [("MULTI", "", "ok")]  # queued calls wait for EXEC
    talk.server(b"*3\r\n+OK\r\n-WRONGTYPE Operation against a key\r\n$1\r\n1\r\n")
    assert talk.summary() == [
        ("MULTI", "", "ok"),
        ("SET", "t", "ok"),
        ("LPUSH", "t", "WRONGTYPE"),
        ("GET", "t", "ok"),
        ("EXEC", "", "ok"),
    ]
    assert [call.outcome for call in talk.calls] == [OK, OK, ERROR, OK, OK]
    assert all("queued" in call.notes for call in talk.calls[1:4])
    assert talk.calls[1].response.size == len(b"+QUEUED\r\n")


def test_aborted_discarded_and_refused_transactions() -> None:
    talk = Conversation()
    talk.client(command("MULTI") + command("SET", "w", "1") + command("EXEC")).server(b"+OK\r\n+QUEUED\r\n*-1\r\n")
    assert [(c.method, c.status) for c in talk.calls] == [("MULTI", "ok"), ("SET", "nil"), ("EXEC", "nil")]
    assert "transaction-aborted" in talk.calls[1].notes
    talk = Conversation()
    talk.client(command("MULTI") + command("SET", "d", "1") + command("DISCARD")).server(b"+OK\r\n+QUEUED\r\n+OK\r\n")
    assert "transaction-discarded" in talk.calls[1].notes and talk.calls[2].method == "DISCARD"
    talk = Conversation()
    talk.client(command("MULTI") + command("NOPE") + command("SET", "a", "1") + command("EXEC"))
    talk.server(b"+OK\r\n-ERR unknown command 'NOPE'\r\n+QUEUED\r\n-EXECABORT Transaction discarded\r\n")
    assert [(c.method, c.status) for c in talk.calls] == [
        ("MULTI", "ok"),
        ("NOPE", "ERR"),
        ("SET", "EXECABORT"),
        ("EXEC", "EXECABORT"),
    ]


def test_blocking_commands_and_those_behind_them_do_not_time_out() -> None:
    limits = ParserLimits(request_timeout_ns=1_000)
    talk = Conversation(limits)
    talk.client(command("BLPOP", "jobs", "0") + command("GET", "after"))
    assert talk.parser.expire(talk.ts + 10_000_000) == []
    talk.server(b"*2\r\n$4\r\njobs\r\n$1\r\nj\r\n$-1\r\n")
    assert talk.summary() == [("BLPOP", "jobs", "ok"), ("GET", "after", "nil")]
    # A pending BLPOP at the end of the flow is reported unanswered.
    talk = Conversation(limits).client(command("XREAD", "BLOCK", "0", "STREAMS", "s", "$"))
    assert talk.parser.expire(talk.ts + 10_000_000) == []
    assert [call.outcome for call in talk.finish()] == [NO_RESPONSE]


def test_an_expired_command_keeps_its_place_for_its_late_reply() -> None:
    talk = Conversation(ParserLimits(request_timeout_ns=1_000))
    talk.client(command("GET", "slow"))
    expired = talk.parser.expire(talk.ts + 5_000)
    assert [(call.path, call.outcome) for call in expired] == [("slow", NO_RESPONSE)]
    talk.client(command("GET", "next")).server(b"$4\r\nlate\r\n$4\r\nnext\r\n")
    assert [call.path for call in talk.calls] == ["next"]
    assert talk.parser.counts == {"redis_late_replies": 1}


def test_client_reply_off_and_skip_make_one_way_calls() -> None:
    talk = Conversation()
    talk.client(command("CLIENT", "REPLY", "OFF") + command("SET", "a", "1") + command("CLIENT", "REPLY", "ON"))
    talk.client(command("CLIENT", "REPLY", "SKIP") + command("SET", "b", "2") + command("GET", "b"))
    talk.server(b"+OK\r\n$1\r\n2\r\n")
    one_way = [(call.method, call.redis.one_way) for call in talk.calls]
    assert one_way == [
        ("CLIENT REPLY", True),
        ("SET", True),
        ("CLIENT REPLY", True),
        ("SET", True),
        ("CLIENT REPLY", False),
        ("GET", False),
    ]
    assert all(call.outcome == OK for call in talk.calls)
    assert talk.calls[-1].status == "ok" and talk.calls[-1].response.size == 7


def test_monitor_lines_are_counted_and_psync_stops_parsing() -> None:
    talk = Conversation().client(command("MONITOR")).server(b"+OK\r\n")
    talk.server(b'+1733370000.123456 [0 127.0.0.1:5000] "get" "k"\r\n')
    talk.client(command("QUIT")).server(b"+OK\r\n")
    assert talk.summary() == [("MONITOR", "", "ok"), ("QUIT", "", "ok")]
    assert talk.parser.counts == {"redis_monitor_lines": 1}
    talk = Conversation().client(command("PSYNC", "?", "-1")).server(b"+FULLRESYNC abc 0\r\n$5\r\nREDIS")
    talk.server(b"0011\xfa not RESP at all")
    assert talk.summary() == [("PSYNC", "", "ok")]


def test_credentials_never_leave_the_dissector() -> None:
    redactor = Redactor(DEFAULT_REDACT_HEADERS, DEFAULT_REDACT_FIELDS)
    talk = Conversation()
    for args in (
        ("AUTH", "s3cret"),
        ("AUTH", "alice", "s3cret"),
        ("HELLO", "3", "AUTH", "alice", "s3cret", "SETNAME", "app"),
        ("MIGRATE", "h", "6379", "k", "0", "100", "AUTH", "s3cret"),
        ("MIGRATE", "h", "6379", "", "0", "100", "AUTH2", "alice", "s3cret", "KEYS", "k"),
        ("CONFIG", "SET", "maxmemory", "1mb", "requirepass", "s3cret"),
        ("ACL", "SETUSER", "alice", "on", ">s3cret", "#" + "a" * 64, "~*"),
    ):
        talk.client(command(*args)).server(b"+OK\r\n")
    calls = [redactor.apply(call) for call in talk.calls]
    assert [list(call.redis.args) for call in calls] == [
        ["AUTH", REDACTED],
        ["AUTH", REDACTED, REDACTED],
        ["HELLO", "3", "AUTH", REDACTED, REDACTED, "SETNAME", "app"],
        ["MIGRATE", "h", "6379", "k", "0", "100", "AUTH", REDACTED],
        ["MIGRATE", "h", "6379", "", "0", "100", "AUTH2", REDACTED, REDACTED, "KEYS", "k"],
        ["CONFIG", "SET", "maxmemory", "1mb", "requirepass", REDACTED],
        ["ACL", "SETUSER", "alice", "on", ">" + REDACTED, "#" + REDACTED, "~*"],
    ]
    for call in calls:
        assert b"s3cret" not in call.SerializeToString()


def test_arguments_are_bounded_in_count_and_length() -> None:
    talk = Conversation().client(command("MSET", *(["k", "v" * 1000] * 20))).server(b"+OK\r\n")
    (call,) = talk.calls
    assert len(call.redis.args) == redis.MAX_ARGS and call.redis.arg_count == 41
    assert max(len(arg) for arg in call.redis.args) == redis.MAX_ARG_BYTES
    assert "args-truncated" in call.notes and not call.request.body


def test_pending_commands_are_bounded_and_counted() -> None:
    talk = Conversation(ParserLimits(max_pending_requests=4))
    talk.client(b"".join(command("GET", f"k{index}") for index in range(6)))
    assert [(call.path, call.outcome) for call in talk.calls] == [("k0", NO_RESPONSE), ("k1", NO_RESPONSE)]
    assert all("pending-limit" in call.notes for call in talk.calls)
    assert talk.parser.counts == {"redis_pending_limit": 2}
    assert len(talk.parser.pending) == 4


def test_malformed_streams_raise_protocol_error_without_quoting_them() -> None:
    talk = Conversation().client(command("GET", "k"))
    with pytest.raises(ProtocolError) as refused:
        talk.server(b"?secret-bytes\r\n")
    assert "secret" not in str(refused.value)
    with pytest.raises(ProtocolError):
        Conversation().client(b"x" * (redis.MAX_INLINE + 1))
    with pytest.raises(ProtocolError):  # RESP3 allows a map keyed by an array; hiredis cannot build it
        Conversation().client(command("HGETALL", "h")).server(b"%1\r\n*1\r\n:1\r\n+v\r\n")
    with pytest.raises(ProtocolError):
        Conversation(ParserLimits(max_body_bytes=1024)).client(b"*1\r\n$9999999\r\n" + b"x" * 1_100_000)


def test_a_gap_reports_pending_commands_and_resynchronises() -> None:
    talk = Conversation()
    talk.client(command("GET", "before"))
    talk.calls += talk.parser.gap(S, 100, talk.ts)
    assert [(call.path, call.outcome, list(call.notes)) for call in talk.calls] == [
        ("before", NO_RESPONSE, ["capture-gap"])
    ]
    talk.server(b"tail of a lost reply\r\n")  # not a message start: skipped
    talk.client(command("GET", "after")).server(b"$1\r\nv\r\n")
    assert [(call.path, call.status, list(call.notes)) for call in talk.calls[1:]] == [("after", "ok", ["capture-gap"])]
    talk.client(command("GET", "later")).server(b"$1\r\nv\r\n")
    assert list(talk.calls[-1].notes) == []


def test_snapshot_and_restore_at_an_exchange_boundary() -> None:
    talk = Conversation()
    talk.client(command("SELECT", "4")).server(b"+OK\r\n")
    talk.client(command("HELLO", "3")).server(b"%0\r\n")
    talk.client(command("CLIENT", "REPLY", "OFF"))
    talk.client(command("GET", "half")[:5])
    with pytest.raises(NotAtBoundary):
        talk.parser.snapshot()
    talk.client(command("GET", "half")[5:])
    state = talk.parser.snapshot()
    assert (state.ordinal, state.db, state.resp_version, state.reply_off) == (4, 4, 3, True)
    fresh = redis.RedisParser(FLOW, ParserLimits())
    fresh.restore(state)
    calls = fresh.feed(C, command("CLIENT", "REPLY", "ON"), 5) + fresh.feed(S, b"+OK\r\n", 6)
    calls += fresh.feed(C, command("GET", "k"), 7) + fresh.feed(S, b"_\r\n", 8)
    assert [(call.method, call.redis.db, call.redis.resp_version, call.status) for call in calls] == [
        ("CLIENT REPLY", 4, 3, "ok"),
        ("GET", 4, 3, "nil"),
    ]
    pending = Conversation().client(command("GET", "k"))
    with pytest.raises(NotAtBoundary):
        pending.parser.snapshot()


@pytest.mark.parametrize(
    ("client", "server", "port", "score"),
    [
        (command("GET", "k"), b"", 7000, 3),
        (b"*2\r\n", b"", 6379, 2),
        (b"PING\r\n", b"+PONG\r\n", 7000, 2),
        (b"PING\r\n", b"", 6379, 2),
        (b"PING\r\n", b"", 7000, 0),
        (b"AUTH PLAIN\r\n", b"+OK POP3 ready\r\n", 110, 0),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"", 6379, 0),
        (b"\x16\x03\x01\x02\x00", b"", 6379, 0),
        (b"", b"+OK\r\n", 6379, 1),
        (b"", b"", 7000, 0),
    ],
)
def test_probe(client: bytes, server: bytes, port: int, score: int) -> None:
    flow = FlowInfo("tcp", "10.0.0.1", 40000, "10.0.0.2", port)
    assert redis.probe(client, server, flow) == score
