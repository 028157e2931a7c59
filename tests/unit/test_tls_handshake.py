"""TLS handshake parser: real Python `ssl` handshakes (tests/fixtures/tls_handshakes.pcap), the
JA4 examples of FoxIO's specification, fragmented handshakes and the TLS 1.3 limits."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.protocol_replay import tcp_connections, tls_calls
from trawl.dissector.protocols.base import Direction, FlowInfo, ParserLimits, ProtocolError
from trawl.dissector.protocols.tls import (
    HELLO_RETRY_REQUEST_RANDOM,
    SPEC,
    ClientHello,
    TlsStreamParser,
    ja4,
    parse_client_hello,
    probe,
)
from trawl.v1.calls_pb2 import ApiCall, Outcome

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FLOW = FlowInfo("tcp", "10.0.0.1", 50000, "10.0.0.2", 443, node="n1")
OK, ERROR, NO_RESPONSE = Outcome.OUTCOME_OK, Outcome.OUTCOME_ERROR, Outcome.OUTCOME_NO_RESPONSE
C2S, S2C = Direction.CLIENT_TO_SERVER, Direction.SERVER_TO_CLIENT

# The example of FoxIO's JA4 specification (technical_details/JA4.md).
SPEC_CIPHERS = [0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, 0xC013, 0xC014, 0x009C, 0x009D,
                0x002F, 0x0035]  # fmt: skip
SPEC_EXTENSIONS = [0x001B, 0x0000, 0x0033, 0x0010, 0x4469, 0x0017, 0x002D, 0x000D, 0x0005, 0x0023, 0x0012, 0x002B,
                   0xFF01, 0x000B, 0x000A, 0x0015]  # fmt: skip
SPEC_SIGNATURES = [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601]


def extension(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


def vector(length_size: int, body: bytes) -> bytes:
    return len(body).to_bytes(length_size, "big") + body


def client_hello_body(
    *,
    sni: str | None = "api.example.test",
    alpn: tuple[bytes, ...] = (b"h2", b"http/1.1"),
    versions: tuple[int, ...] = (0x0A0A, 0x0304, 0x0303),
    ciphers: tuple[int, ...] = (0x3A3A, 0x1301, 0x1302, 0xC02F),
    signatures: tuple[int, ...] = (0x0403, 0x0804),
    padding: int = 0,
) -> bytes:
    extensions = extension(0x1A1A, b"")
    if sni is not None:
        name = sni.encode()
        extensions += extension(0x0000, vector(2, b"\x00" + vector(2, name)))
    if alpn:
        extensions += extension(0x0010, vector(2, b"".join(vector(1, p) for p in alpn)))
    if versions:
        extensions += extension(0x002B, vector(1, b"".join(struct.pack("!H", v) for v in versions)))
    if signatures:
        extensions += extension(0x000D, vector(2, b"".join(struct.pack("!H", s) for s in signatures)))
    extensions += extension(0x000A, vector(2, b"\x00\x1d\x00\x17"))
    if padding:
        extensions += extension(0x0015, bytes(padding))
    cipher_bytes = b"".join(struct.pack("!H", c) for c in ciphers)
    return (
        b"\x03\x03" + bytes(32) + vector(1, bytes(32)) + vector(2, cipher_bytes) + b"\x01\x00" + vector(2, extensions)
    )


def handshake(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + len(body).to_bytes(3, "big") + body


def records(content_type: int, payload: bytes, size: int = 2**14) -> bytes:
    """`payload` cut into records of at most `size` bytes (handshake fragmentation)."""
    out = b""
    for start in range(0, len(payload), size):
        chunk = payload[start : start + size]
        out += struct.pack("!BHH", content_type, 0x0303, len(chunk)) + chunk
    return out


def server_hello_body(version: int = 0x0304, cipher: int = 0x1301, random: bytes = bytes(32)) -> bytes:
    extensions = extension(0x002B, struct.pack("!H", version)) if version == 0x0304 else b""
    return b"\x03\x03" + random + vector(1, b"") + struct.pack("!H", cipher) + b"\x00" + vector(2, extensions)


def summary(call: ApiCall) -> tuple[str, str, str, int]:
    return (call.method, call.path, call.status, call.outcome)


def test_fixture_handshakes() -> None:
    calls = tls_calls(FIXTURES / "tls_handshakes.pcap")
    by_sni = {call.path: call for call in calls}
    assert [summary(call) for call in calls] == [
        ("handshake", "tls13.trawl.test", "TLS 1.3", OK),
        ("handshake", "mtls12.trawl.test", "TLS 1.2", OK),
        ("handshake", "optional12.trawl.test", "TLS 1.2", OK),
        ("handshake", "badca12.trawl.test", "unknown_ca", ERROR),
        ("handshake", "old12.trawl.test", "protocol_version", ERROR),
        ("handshake", "mtls13.trawl.test", "TLS 1.3", OK),
        ("handshake", "", "TLS 1.2", OK),
    ]
    tls13 = by_sni["tls13.trawl.test"].tls
    assert (tls13.version, tls13.cipher) == ("TLS 1.3", "TLS_AES_256_GCM_SHA384")
    assert list(tls13.alpn) == ["h2", "http/1.1"]
    assert list(tls13.offered_versions) == ["TLS 1.3", "TLS 1.2"]
    assert tls13.offered_ciphers[:3] == [
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
        "TLS_AES_128_GCM_SHA256",
    ]
    assert tls13.ja4.startswith("t13d")
    assert tls13.ja4[6:10] == "12h2"
    mtls = by_sni["mtls12.trawl.test"]
    assert mtls.tls.client_certificate
    assert mtls.notes == ["certificate-requested"]
    optional = by_sni["optional12.trawl.test"]
    assert not optional.tls.client_certificate
    assert optional.notes == ["certificate-requested"]
    assert by_sni["badca12.trawl.test"].tls.alert == "unknown_ca"
    assert by_sni["badca12.trawl.test"].notes == ["alert-from-client"]
    old = by_sni["old12.trawl.test"]
    assert (old.tls.alert, old.tls.version, list(old.notes)) == ("protocol_version", "", ["alert-from-server"])
    # TLS 1.3 encrypts the client's Certificate: mTLS there is not visible (documented limit).
    assert not by_sni["mtls13.trawl.test"].tls.client_certificate
    assert by_sni[""].tls.ja4.startswith("t12i1507h1_")
    for call in calls:
        assert call.protocol == "tls"
        assert call.elapsed_ns > 0
        assert call.dst.port != 0
        assert call.src.port > call.dst.port or call.dst.port > 1024


def test_fixture_streams_in_any_chunking_give_the_same_calls() -> None:
    connections = tcp_connections(FIXTURES / "tls_handshakes.pcap")
    assert len(connections) == 7
    for segments in connections:
        whole = TlsStreamParser(FLOW, ParserLimits())
        expected = [c for direction, data, _ts in segments for c in whole.feed(direction, data, 5)] + whole.finish(6)
        split = TlsStreamParser(FLOW, ParserLimits())
        got = [
            c for d, data, _ts in segments for i in range(0, len(data), 7) for c in split.feed(d, data[i : i + 7], 5)
        ]
        got += split.finish(6)
        assert [c.SerializeToString() for c in got] == [c.SerializeToString() for c in expected]
        assert expected


def test_ja4_matches_the_specification_example() -> None:
    hello = ClientHello(
        legacy_version=0x0303,
        ciphers=[0x0A0A, *SPEC_CIPHERS],
        extensions=[0x0A0A, *SPEC_EXTENSIONS],
        sni="example.com",
        alpn=[b"h2", b"http/1.1"],
        supported_versions=[0x5A5A, 0x0304, 0x0303],
        signature_algorithms=SPEC_SIGNATURES,
    )
    assert ja4(hello) == "t13d1516h2_8daaf6152771_e5627efa2ab1"
    hello.signature_algorithms = []
    assert ja4(hello).endswith("_6d807ffa2a79")


@pytest.mark.parametrize(
    ("first_alpn", "expected"),
    [(b"h2", "h2"), (b"http/1.1", "h1"), (b"h", "hh"), (b"", "00"), (b"\xab", "ab"), (b"\xab\xcd", "ad"),
     (b"0\xab", "3b"), (b"01\xab\xcd", "3d"), (b"0\xab\xcd1", "01")],
)  # fmt: skip
def test_ja4_alpn_characters(first_alpn: bytes, expected: str) -> None:
    hello = ClientHello(0x0303, [0x1301], [0x0010], alpn=[first_alpn])
    assert ja4(hello)[8:10] == expected


def test_ja4_without_extensions_or_ciphers() -> None:
    assert ja4(ClientHello(0x0301, [], [])) == "t10i000000_000000000000_000000000000"
    assert ja4(ClientHello(0x0300, [0x002F], [])).startswith("ts3i010000_")
    assert ja4(ClientHello(0x9999, [0x002F], [0x0000, 0x0010])).endswith("_000000000000")


def test_client_hello_parsing_ignores_grease() -> None:
    hello = parse_client_hello(client_hello_body())
    assert hello.sni == "api.example.test"
    assert hello.alpn == [b"h2", b"http/1.1"]
    assert ja4(hello).startswith("t13d0305h2_")  # 3 ciphers, 5 extensions once GREASE is out


def test_fragmented_client_hello_across_records_and_segments() -> None:
    hello = handshake(1, client_hello_body(padding=3000))
    stream = records(22, hello, size=700)
    parser = TlsStreamParser(FLOW, ParserLimits())
    for start in range(0, len(stream), 333):
        assert parser.feed(C2S, stream[start : start + 333], 1_000) == []
    server = records(22, handshake(2, server_hello_body()))
    [call] = parser.feed(S2C, server, 4_000)
    assert summary(call) == ("handshake", "api.example.test", "TLS 1.3", OK)
    assert call.elapsed_ns == 3_000
    assert call.tls.offered_ciphers[:2] == ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"]
    assert call.tls.ja4.startswith("t13d0306h2_")
    assert parser.feed(S2C, records(23, b"encrypted"), 5_000) == []
    assert parser.finish(6_000) == []


def test_several_handshake_messages_in_one_record_tls12_mtls() -> None:
    parser = TlsStreamParser(FLOW, ParserLimits())
    parser.feed(C2S, records(22, handshake(1, client_hello_body(versions=()))), 1)
    flight = (
        handshake(2, server_hello_body(0x0303, 0xC02F)) + handshake(11, b"\x00\x00\x03abc") + handshake(13, b"\x01\x01")
    )
    assert parser.feed(S2C, records(22, flight + handshake(14, b"")), 2) == []
    assert parser.feed(C2S, records(22, handshake(11, b"\x00\x00\x03\x00\x00\x00") + handshake(16, b"k")), 3) == []
    assert parser.feed(C2S, records(20, b"\x01") + records(22, b"encrypted finished"), 3) == []
    [call] = parser.feed(S2C, records(20, b"\x01"), 4)
    assert summary(call) == ("handshake", "api.example.test", "TLS 1.2", OK)
    assert (call.tls.cipher, call.tls.client_certificate, list(call.notes)) == (
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", True, ["certificate-requested"],
    )  # fmt: skip
    assert list(call.tls.offered_versions) == ["TLS 1.2"]


def test_hello_retry_request_waits_for_the_real_server_hello() -> None:
    parser = TlsStreamParser(FLOW, ParserLimits())
    parser.feed(C2S, records(22, handshake(1, client_hello_body())), 1)
    assert parser.feed(S2C, records(22, handshake(2, server_hello_body(random=HELLO_RETRY_REQUEST_RANDOM))), 2) == []
    assert parser.feed(C2S, records(22, handshake(1, client_hello_body(sni="second.example.test"))), 3) == []
    [call] = parser.feed(S2C, records(22, handshake(2, server_hello_body(cipher=0x1303))), 4)
    assert (call.path, call.tls.cipher, list(call.notes)) == (
        "api.example.test", "TLS_CHACHA20_POLY1305_SHA256", ["hello-retry-request"],
    )  # fmt: skip


def test_roles_come_from_the_hello_not_the_flow_direction() -> None:
    parser = TlsStreamParser(FLOW, ParserLimits())
    parser.feed(S2C, records(22, handshake(1, client_hello_body())), 1)
    [call] = parser.feed(C2S, records(22, handshake(2, server_hello_body())), 2)
    assert (call.src.ip, call.src.port, call.dst.ip, call.dst.port) == ("10.0.0.2", 443, "10.0.0.1", 50000)


def test_server_hello_alone_when_the_client_side_was_not_captured() -> None:
    parser = TlsStreamParser(FLOW, ParserLimits())
    [call] = parser.feed(S2C, records(22, handshake(2, server_hello_body())), 9)
    assert call.notes == ["client-hello-not-seen"]
    assert (call.status, call.outcome, call.elapsed_ns, call.request.ts) == ("TLS 1.3", OK, 0, 9)


def test_unanswered_client_hello_expires() -> None:
    parser = TlsStreamParser(FLOW, ParserLimits(request_timeout_ns=1_000))
    parser.feed(C2S, records(22, handshake(1, client_hello_body())), 100)
    assert parser.expire(1_099) == []
    [call] = parser.expire(1_100)
    assert (call.status, call.outcome) == ("", NO_RESPONSE)
    assert parser.finish(2_000) == []


def test_incomplete_tls12_handshake_at_finish() -> None:
    parser = TlsStreamParser(FLOW, ParserLimits())
    parser.feed(C2S, records(22, handshake(1, client_hello_body(versions=()))), 1)
    parser.feed(S2C, records(22, handshake(2, server_hello_body(0x0303, 0xC02F))), 2)
    [call] = parser.finish(3)
    assert (call.status, call.outcome, list(call.notes)) == ("TLS 1.2", OK, ["handshake-incomplete"])


def test_warning_alert_is_a_note_fatal_alert_ends_the_handshake() -> None:
    parser = TlsStreamParser(FLOW, ParserLimits())
    parser.feed(C2S, records(22, handshake(1, client_hello_body())), 1)
    assert parser.feed(S2C, records(21, b"\x01\x70"), 2) == []
    [call] = parser.feed(S2C, records(21, b"\x02\x28"), 3)
    assert (call.status, call.outcome, call.tls.alert) == ("handshake_failure", ERROR, "handshake_failure")
    assert list(call.notes) == ["server-alert-warning-unrecognized_name", "alert-from-server"]


def test_not_tls_before_any_hello_is_a_protocol_error_mid_stream_is_ignored() -> None:
    with pytest.raises(ProtocolError):
        TlsStreamParser(FLOW, ParserLimits()).feed(C2S, b"GET / HTTP/1.1\r\n\r\n", 1)
    with pytest.raises(ProtocolError):
        TlsStreamParser(FLOW, ParserLimits()).feed(C2S, records(22, handshake(1, b"\x03\x03short")), 1)
    mid_stream = TlsStreamParser(FLOW, ParserLimits())
    assert mid_stream.feed(C2S, records(23, b"opaque application data"), 1) == []
    assert mid_stream.feed(S2C, records(23, b"more"), 2) == []
    assert mid_stream.finish(3) == []


def test_garbage_after_the_client_hello_ends_the_call() -> None:
    parser = TlsStreamParser(FLOW, ParserLimits())
    parser.feed(C2S, records(22, handshake(1, client_hello_body())), 1)
    [call] = parser.feed(S2C, b"HTTP/1.1 400 Bad Request\r\n\r\n", 2)
    assert (call.outcome, list(call.notes)) == (NO_RESPONSE, ["malformed-record"])


def test_probe() -> None:
    hello = records(22, handshake(1, client_hello_body()))
    assert probe(hello[:6], b"", FLOW) == 3
    assert probe(b"", hello, FLOW) == 3
    assert probe(b"", records(22, handshake(2, server_hello_body())), FLOW) == 2
    assert probe(records(23, b"x"), b"", FLOW) == 2
    assert probe(b"GET / HTTP/1.1\r\n", b"", FLOW) == 0
    assert probe(b"", b"", FLOW) == 1
    assert probe(b"", b"", FlowInfo("tcp", "10.0.0.1", 1, "10.0.0.2", 2)) == 0
    assert SPEC.name == "tls"
    assert SPEC.new_stream is not None
