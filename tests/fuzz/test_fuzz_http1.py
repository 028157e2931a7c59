"""Property tests of the HTTP/1 parser: any bytes give calls or ProtocolError, chunking does not
change the result, memory stays bounded."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trawl.dissector.protocols.base import Direction, FlowInfo, ParserLimits, ProtocolError
from trawl.dissector.protocols.http1 import Http1Parser
from trawl.v1.calls_pb2 import ApiCall

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT
FLOW = FlowInfo("tcp", "10.0.0.1", 40000, "10.0.0.2", 80)
LIMITS = ParserLimits(max_body_bytes=256, max_header_bytes=2048, max_pending_requests=16)
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

http_like = st.lists(
    st.sampled_from(
        [
            b"GET / HTTP/1.1\r\n",
            b"HTTP/1.1 200 OK\r\n",
            b"Content-Length: 5\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Upgrade: websocket\r\nConnection: upgrade\r\n",
            b"\r\n",
            b"5\r\nhello\r\n",
            b"0\r\n\r\n",
            b"HEAD /h HTTP/1.0\r\n",
            b"CONNECT a:1 HTTP/1.1\r\n",
            b"HTTP/1.1 101 Switching\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"\x00\xff",
            b"ffffffffffffffffffff\r\n",
            b"Content-Length: -1\r\n",
        ]
    )
    | st.binary(max_size=40),
    max_size=30,
).map(b"".join)


def _drive(steps: list[tuple[Direction, bytes]], gaps: list[int] | None = None) -> list[ApiCall]:
    parser = Http1Parser(FLOW, LIMITS)
    calls: list[ApiCall] = []
    try:
        for index, (direction, data) in enumerate(steps):
            calls += parser.feed(direction, data, index)
            if gaps and index < len(gaps) and gaps[index]:
                calls += parser.gap(direction, gaps[index], index)
        calls += parser.expire(10**12)
        calls += parser.finish(len(steps))
    except ProtocolError:
        pass
    return calls


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([C2S, S2C]), st.binary(max_size=300)), max_size=12))
def test_arbitrary_bytes_give_calls_or_protocol_error(steps: list[tuple[Direction, bytes]]) -> None:
    _drive(steps)


@FUZZ
@given(
    st.lists(st.tuples(st.sampled_from([C2S, S2C]), http_like), max_size=12),
    st.lists(st.integers(min_value=0, max_value=50), max_size=12),
)
def test_http_like_bytes_and_gaps_give_calls_or_protocol_error(
    steps: list[tuple[Direction, bytes]], gaps: list[int]
) -> None:
    for call in _drive(steps, gaps):
        assert len(call.request.body) <= LIMITS.max_body_bytes
        assert len(call.response.body) <= LIMITS.max_body_bytes


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A valid keep-alive conversation: requests with Content-Length or chunked bodies and their responses."""
    requests, responses = [], []
    for index in range(draw(st.integers(min_value=1, max_value=5))):
        body = draw(st.binary(max_size=300))
        method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD"]))
        if draw(st.booleans()) and body:
            chunks = b"".join(
                b"%x\r\n%s\r\n" % (len(body[i : i + 50]), body[i : i + 50]) for i in range(0, len(body), 50)
            )
            requests.append(
                b"%s /%d HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n%s0\r\n\r\n" % (method, index, chunks)
            )
        else:
            requests.append(b"%s /%d HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (method, index, len(body), body))
        status = draw(st.sampled_from([200, 201, 204, 304, 404, 500]))
        reply = draw(st.binary(max_size=300))
        if method == b"HEAD" or status in (204, 304):
            responses.append(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n" % (status, len(reply)))
        else:
            responses.append(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(reply), reply))
    return b"".join(requests), b"".join(responses)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def _view(calls: list[ApiCall]) -> list[tuple[object, ...]]:
    return [
        (
            call.method,
            call.path,
            call.status,
            call.outcome,
            call.request.body,
            call.response.body,
            call.request.size,
            call.response.size,
            tuple(call.notes),
        )
        for call in calls
    ]


@FUZZ
@given(exchanges(), st.lists(st.integers(min_value=0), max_size=20), st.lists(st.integers(min_value=0), max_size=20))
def test_chunking_does_not_change_the_calls(
    conversation: tuple[bytes, bytes], request_cuts: list[int], response_cuts: list[int]
) -> None:
    requests, responses = conversation
    whole = _drive([(C2S, requests), (S2C, responses)])
    pieces = [(C2S, piece) for piece in _split(requests, request_cuts)]
    pieces += [(S2C, piece) for piece in _split(responses, response_cuts)]
    assert _view(_drive(pieces)) == _view(whole)
    assert len(whole) == requests.count(b" HTTP/1.1\r\n")
