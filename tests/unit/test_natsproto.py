"""The sans-IO side of the collector's publish connection: what the server sends, what the client sends."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trawl.collector.natsproto import (
    Err,
    Info,
    NatsProtocolError,
    Ok,
    Ping,
    Pong,
    ServerOp,
    ServerReader,
    connect_command,
    pub_line,
)

INFO_LINE = b'INFO {"server_id":"X","max_payload":1048576,"headers":true}\r\n'


def test_a_greeting_and_the_control_operations() -> None:
    reader = ServerReader()
    ops = reader.feed(INFO_LINE + b"PING\r\nPONG\r\n+OK\r\n-ERR 'Authorization Violation'\r\n")
    assert ops == [
        Info({"server_id": "X", "max_payload": 1048576, "headers": True}),
        Ping(),
        Pong(),
        Ok(),
        Err("Authorization Violation"),
    ]
    info = ops[0]
    assert isinstance(info, Info)
    assert info.max_payload == 1 << 20 and info.headers and not info.tls_required


def test_operations_are_case_insensitive_and_a_line_may_end_in_a_bare_newline() -> None:
    assert ServerReader().feed(b"ping\npong\r\n") == [Ping(), Pong()]


def test_a_partial_line_waits_for_its_end() -> None:
    reader = ServerReader()
    assert reader.feed(b"PI") == []
    assert reader.feed(b"NG\r") == []
    assert reader.feed(b"\n") == [Ping()]


def test_a_missing_or_odd_max_payload_means_the_servers_default() -> None:
    assert Info({}).max_payload == 1 << 20
    assert Info({"max_payload": "lots"}).max_payload == 1 << 20
    assert Info({"max_payload": 8 << 20}).max_payload == 8 << 20


@pytest.mark.parametrize(
    "line",
    [b"MSG a.b 1 3\r\n", b"INFO not-json\r\n", b"INFO [1,2]\r\n", b"PING now\r\n", b"\r\n", b"HELLO\r\n"],
)
def test_what_a_publisher_never_expects_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(NatsProtocolError):
        ServerReader().feed(line)


def test_a_line_without_an_end_is_bounded() -> None:
    reader = ServerReader(max_line=1024)
    with pytest.raises(NatsProtocolError, match="longer than 1024"):
        reader.feed(b"INFO {" + b"x" * 2000)


def test_connect_carries_the_credentials_it_is_given_and_no_others() -> None:
    plain = json.loads(connect_command("c", "1")[len(b"CONNECT ") :])
    assert plain["verbose"] is False and plain["headers"] is True and plain["name"] == "c"
    assert not {"user", "pass", "auth_token"} & plain.keys()
    login = json.loads(connect_command("c", "1", user="u", password="p")[len(b"CONNECT ") :])
    assert (login["user"], login["pass"]) == ("u", "p")
    token = json.loads(connect_command("c", "1", auth_token="t")[len(b"CONNECT ") :])
    assert token["auth_token"] == "t"
    assert connect_command("c", "1").endswith(b"\r\n")


def test_pub_line() -> None:
    assert pub_line("trawl.v1.packets.n.0", 12) == b"PUB trawl.v1.packets.n.0 12\r\n"


@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes_give_operations_or_the_protocol_error(data: bytes) -> None:
    reader = ServerReader(max_line=512)
    try:
        ops = reader.feed(data)
    except NatsProtocolError:
        return
    assert all(isinstance(op, Info | Ping | Pong | Ok | Err) for op in ops)


SERVER_LINES = st.lists(
    st.sampled_from([INFO_LINE, b"PING\r\n", b"PONG\r\n", b"+OK\r\n", b"-ERR 'Stale Connection'\r\n"]), max_size=12
)


@given(SERVER_LINES, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_any_split_of_the_stream_gives_the_same_operations(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(lines)
    whole = ServerReader().feed(stream)
    reader = ServerReader()
    pieces: list[ServerOp] = []
    start = 0
    for cut in sorted(min(cut, len(stream)) for cut in cuts):
        pieces += reader.feed(stream[start:cut])
        start = cut
    pieces += reader.feed(stream[start:])
    assert pieces == whole
    assert len(whole) == len(lines)
