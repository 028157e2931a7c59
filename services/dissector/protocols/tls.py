"""TLS handshake metadata from the TCP byte stream, sans-IO: one `tls` call per handshake.

Records are reassembled from any chunking, handshake messages from any number of records (a
ClientHello may span records, one record may carry several messages). From the ClientHello:
SNI, ALPN, offered versions (supported_versions, else the legacy version), offered cipher
suites (IANA names for the common ones, hex otherwise; GREASE values left out) and the FoxIO
JA4 fingerprint; from the ServerHello: the negotiated version and cipher; from TLS <= 1.2
handshakes: whether the server sent a CertificateRequest (note `certificate-requested`) and
whether the client answered with a non-empty Certificate (`client_certificate`, i.e. mTLS).
A plaintext alert during the handshake ends it: `status` is the alert ("unknown_ca"), outcome
`error`, and a note says which side sent it.

When the call is emitted, and what TLS 1.3 hides:
- TLS 1.3: everything after the ServerHello is encrypted (certificates, CertificateRequest,
  the client's Certificate, alerts about them), so the call is emitted at the ServerHello and
  `client_certificate` is always false: a TLS 1.3 mTLS handshake is not visible on the wire.
  A failure after the ServerHello (a rejected certificate) shows up only as the connection
  closing; TLS 1.3 calls are `ok` once the ServerHello arrived.
- TLS <= 1.2: the call is emitted once both sides sent ChangeCipherSpec (full or abbreviated
  handshake), at a fatal alert, or when the flow ends / times out. A handshake that got a
  ServerHello but not both ChangeCipherSpecs keeps outcome `ok` (the server did answer, and a
  capture that simply ended there is common) with the note `handshake-incomplete`.
- A ClientHello without any answer becomes `no_response` after
  `ParserLimits.request_timeout_ns` (`expire`) or at `finish`.
After the handshake the parser stops looking at the flow (the rest is encrypted).

Roles come from the messages, not the flow's direction: the side that sent the ClientHello is
the call's `src`. Bytes that are not TLS records before any hello raise `ProtocolError`; a flow
whose capture starts after the handshake (application data first) is ignored quietly. Bytes
that stop parsing after a hello end the call with the note `malformed-record`.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from trawl.dissector.calls import finish_call, new_call
from trawl.dissector.protocols.base import (
    Direction,
    FlowInfo,
    NotAtBoundary,
    ParserLimits,
    ProtocolError,
    ProtocolSpec,
    StreamParser,
)
from trawl.v1.calls_pb2 import ApiCall, Endpoint, Outcome

PROTOCOL = "tls"
TLS_PORTS = frozenset({443, 8443})

CONTENT_CHANGE_CIPHER_SPEC = 20
CONTENT_ALERT = 21
CONTENT_HANDSHAKE = 22
CONTENT_APPLICATION_DATA = 23
CONTENT_HEARTBEAT = 24
_CONTENT_TYPES = frozenset(range(20, 25))

HANDSHAKE_CLIENT_HELLO = 1
HANDSHAKE_SERVER_HELLO = 2
HANDSHAKE_CERTIFICATE = 11
HANDSHAKE_CERTIFICATE_REQUEST = 13

EXT_SERVER_NAME = 0x0000
EXT_SIGNATURE_ALGORITHMS = 0x000D
EXT_ALPN = 0x0010
EXT_SUPPORTED_VERSIONS = 0x002B

# RFC 8446 5.1: a record is at most 2^14 bytes plus 2048 of protection expansion.
MAX_RECORD_LENGTH = 2**14 + 2048
# A handshake message longer than this (a huge certificate chain) ends parsing of the flow.
MAX_HANDSHAKE_MESSAGE = 256 * 1024
# Bound on the lists one call carries.
MAX_LISTED = 128
MAX_SNI_LENGTH = 255

_RECORD_HEADER = struct.Struct("!BHH")
# RFC 8446 4.1.3: a ServerHello with this random is a HelloRetryRequest.
HELLO_RETRY_REQUEST_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")

VERSION_NAMES = {
    0x0002: "SSL 2.0",
    0x0300: "SSL 3.0",
    0x0301: "TLS 1.0",
    0x0302: "TLS 1.1",
    0x0303: "TLS 1.2",
    0x0304: "TLS 1.3",
}
_JA4_VERSIONS = {
    0x0002: "s2",
    0x0300: "s3",
    0x0301: "10",
    0x0302: "11",
    0x0303: "12",
    0x0304: "13",
    0xFEFF: "d1",
    0xFEFD: "d2",
    0xFEFC: "d3",
}

CIPHER_NAMES = {
    0x0004: "TLS_RSA_WITH_RC4_128_MD5",
    0x0005: "TLS_RSA_WITH_RC4_128_SHA",
    0x000A: "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    0x002F: "TLS_RSA_WITH_AES_128_CBC_SHA",
    0x0033: "TLS_DHE_RSA_WITH_AES_128_CBC_SHA",
    0x0035: "TLS_RSA_WITH_AES_256_CBC_SHA",
    0x0039: "TLS_DHE_RSA_WITH_AES_256_CBC_SHA",
    0x003C: "TLS_RSA_WITH_AES_128_CBC_SHA256",
    0x003D: "TLS_RSA_WITH_AES_256_CBC_SHA256",
    0x0067: "TLS_DHE_RSA_WITH_AES_128_CBC_SHA256",
    0x006B: "TLS_DHE_RSA_WITH_AES_256_CBC_SHA256",
    0x009C: "TLS_RSA_WITH_AES_128_GCM_SHA256",
    0x009D: "TLS_RSA_WITH_AES_256_GCM_SHA384",
    0x009E: "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256",
    0x009F: "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
    0x00FF: "TLS_EMPTY_RENEGOTIATION_INFO_SCSV",
    0x1301: "TLS_AES_128_GCM_SHA256",
    0x1302: "TLS_AES_256_GCM_SHA384",
    0x1303: "TLS_CHACHA20_POLY1305_SHA256",
    0x1304: "TLS_AES_128_CCM_SHA256",
    0x1305: "TLS_AES_128_CCM_8_SHA256",
    0x5600: "TLS_FALLBACK_SCSV",
    0xC009: "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    0xC00A: "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    0xC013: "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    0xC014: "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    0xC023: "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    0xC024: "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384",
    0xC027: "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
    0xC028: "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384",
    0xC02B: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    0xC02C: "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    0xC02F: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    0xC030: "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    0xC09C: "TLS_RSA_WITH_AES_128_CCM",
    0xC09D: "TLS_RSA_WITH_AES_256_CCM",
    0xC09E: "TLS_DHE_RSA_WITH_AES_128_CCM",
    0xC09F: "TLS_DHE_RSA_WITH_AES_256_CCM",
    0xC0AC: "TLS_ECDHE_ECDSA_WITH_AES_128_CCM",
    0xC0AD: "TLS_ECDHE_ECDSA_WITH_AES_256_CCM",
    0xC0AE: "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8",
    0xC0AF: "TLS_ECDHE_ECDSA_WITH_AES_256_CCM_8",
    0xCCA8: "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCA9: "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCAA: "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
}

ALERT_NAMES = {
    0: "close_notify",
    10: "unexpected_message",
    20: "bad_record_mac",
    21: "decryption_failed",
    22: "record_overflow",
    30: "decompression_failure",
    40: "handshake_failure",
    41: "no_certificate",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    47: "illegal_parameter",
    48: "unknown_ca",
    49: "access_denied",
    50: "decode_error",
    51: "decrypt_error",
    60: "export_restriction",
    70: "protocol_version",
    71: "insufficient_security",
    80: "internal_error",
    86: "inappropriate_fallback",
    90: "user_canceled",
    100: "no_renegotiation",
    109: "missing_extension",
    110: "unsupported_extension",
    111: "certificate_unobtainable",
    112: "unrecognized_name",
    113: "bad_certificate_status_response",
    114: "bad_certificate_hash_value",
    115: "unknown_psk_identity",
    116: "certificate_required",
    120: "no_application_protocol",
}
ALERT_FATAL = 2


def is_grease(value: int) -> bool:
    """RFC 8701 GREASE values: 0x0a0a, 0x1a1a, ..., 0xfafa."""
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


def version_name(version: int) -> str:
    if version in VERSION_NAMES:
        return VERSION_NAMES[version]
    if version >> 8 == 0x7F:
        return f"TLS 1.3 (draft {version & 0xFF})"
    return f"0x{version:04x}"


def cipher_name(cipher: int) -> str:
    return CIPHER_NAMES.get(cipher, f"0x{cipher:04x}")


def alert_name(description: int) -> str:
    return ALERT_NAMES.get(description, f"alert-{description}")


class _Reader:
    """Bounds-checked reads over one handshake message; any overrun is a ProtocolError."""

    __slots__ = ("data", "position")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def take(self, size: int) -> bytes:
        end = self.position + size
        if end > len(self.data):
            raise ProtocolError("TLS handshake message field runs past its end")
        chunk = self.data[self.position : end]
        self.position = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u24(self) -> int:
        return int.from_bytes(self.take(3), "big")

    def vector(self, length_size: int) -> bytes:
        length = int.from_bytes(self.take(length_size), "big")
        return self.take(length)

    @property
    def remaining(self) -> int:
        return len(self.data) - self.position


def _u16_list(data: bytes) -> list[int]:
    if len(data) % 2:
        raise ProtocolError("TLS list of 16-bit values has an odd length")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


@dataclass(slots=True)
class ClientHello:
    legacy_version: int
    ciphers: list[int]
    extensions: list[int]
    sni: str | None = None
    alpn: list[bytes] = field(default_factory=list)
    supported_versions: list[int] = field(default_factory=list)
    signature_algorithms: list[int] = field(default_factory=list)


def parse_client_hello(body: bytes) -> ClientHello:
    reader = _Reader(body)
    legacy_version = reader.u16()
    reader.take(32)  # random
    reader.vector(1)  # legacy_session_id
    ciphers = _u16_list(reader.vector(2))
    reader.vector(1)  # legacy_compression_methods
    hello = ClientHello(legacy_version, ciphers, [])
    if reader.remaining == 0:
        return hello
    extensions = _Reader(reader.vector(2))
    while extensions.remaining:
        extension_type = extensions.u16()
        data = _Reader(extensions.vector(2))
        hello.extensions.append(extension_type)
        if extension_type == EXT_SERVER_NAME and data.remaining:
            names = _Reader(data.vector(2))
            while names.remaining:
                name_type = names.u8()
                name = names.vector(2)
                if name_type == 0 and hello.sni is None:
                    hello.sni = name[:MAX_SNI_LENGTH].decode("utf-8", errors="replace")
            if hello.sni is None:
                hello.sni = ""
        elif extension_type == EXT_SERVER_NAME:
            hello.sni = ""
        elif extension_type == EXT_ALPN and data.remaining:
            protocols = _Reader(data.vector(2))
            while protocols.remaining:
                hello.alpn.append(protocols.vector(1))
        elif extension_type == EXT_SUPPORTED_VERSIONS and data.remaining:
            hello.supported_versions = _u16_list(data.vector(1))
        elif extension_type == EXT_SIGNATURE_ALGORITHMS and data.remaining:
            hello.signature_algorithms = _u16_list(data.vector(2))
    return hello


@dataclass(frozen=True, slots=True)
class ServerHello:
    version: int
    cipher: int
    hello_retry: bool


def parse_server_hello(body: bytes) -> ServerHello:
    reader = _Reader(body)
    version = reader.u16()
    random = reader.take(32)
    reader.vector(1)  # legacy_session_id_echo
    cipher = reader.u16()
    reader.u8()  # legacy_compression_method
    if reader.remaining:
        extensions = _Reader(reader.vector(2))
        while extensions.remaining:
            extension_type = extensions.u16()
            data = extensions.vector(2)
            if extension_type == EXT_SUPPORTED_VERSIONS and len(data) == 2:
                version = int.from_bytes(data, "big")
    return ServerHello(version, cipher, random == HELLO_RETRY_REQUEST_RANDOM)


def _sha256_12(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _is_alphanumeric(byte: int) -> bool:
    return 0x30 <= byte <= 0x39 or 0x41 <= byte <= 0x5A or 0x61 <= byte <= 0x7A


def _ja4_alpn(first: bytes) -> str:
    if not first:
        return "00"
    if _is_alphanumeric(first[0]) and _is_alphanumeric(first[-1]):
        return chr(first[0]) + chr(first[-1])
    hexed = first.hex()
    return hexed[0] + hexed[-1]


def ja4(hello: ClientHello, transport: str = "t") -> str:
    """The FoxIO JA4 fingerprint of a ClientHello (JA4.md: `t13d1516h2_8daaf6152771_e5627efa2ab1`)."""
    versions = [v for v in hello.supported_versions if not is_grease(v)]
    version = max(versions) if versions else hello.legacy_version
    ciphers = [c for c in hello.ciphers if not is_grease(c)]
    extensions = [e for e in hello.extensions if not is_grease(e)]
    part_a = (
        f"{transport}{_JA4_VERSIONS.get(version, '00')}{'d' if EXT_SERVER_NAME in extensions else 'i'}"
        f"{min(len(ciphers), 99):02d}{min(len(extensions), 99):02d}{_ja4_alpn(hello.alpn[0] if hello.alpn else b'')}"
    )
    part_b = _sha256_12(",".join(sorted(f"{c:04x}" for c in ciphers))) if ciphers else "000000000000"
    hashed_extensions = sorted(f"{e:04x}" for e in extensions if e not in (EXT_SERVER_NAME, EXT_ALPN))
    signatures = [f"{s:04x}" for s in hello.signature_algorithms if not is_grease(s)]
    if hashed_extensions:
        text = ",".join(hashed_extensions) + ("_" + ",".join(signatures) if signatures else "")
        part_c = _sha256_12(text)
    else:
        part_c = "000000000000"
    return f"{part_a}_{part_b}_{part_c}"


@dataclass(slots=True)
class _Side:
    """Reassembly state of one direction."""

    records: bytearray = field(default_factory=bytearray)
    record_ts: int = 0
    handshake: bytearray = field(default_factory=bytearray)
    handshake_ts: int = 0
    encrypted: bool = False  # sent ChangeCipherSpec (or TLS 1.3 after the ServerHello)
    ignored: bool = False  # not parsed any more: capture gap, or a capture that began mid-stream


@dataclass(frozen=True, slots=True)
class TlsState:
    """A TLS connection at one of its two exchange boundaries: before its first record (nothing
    buffered, no hello seen), or after its handshake call was reported (`done`: the rest of the
    connection is encrypted and makes no call). No compiled lane takes TLS yet; a lane that did
    would supply `done`."""

    done: bool


class TlsStreamParser:
    """One TCP connection's TLS handshake."""

    def __init__(self, flow: FlowInfo, limits: ParserLimits) -> None:
        self._flow = flow
        self._limits = limits
        self._sides = (_Side(), _Side())
        self._call: ApiCall | None = None
        self._client: Direction | None = None
        self._server_hello_ts: int | None = None
        self._version = 0
        self._hello_seen = False
        self._done = False

    # -- state at an exchange boundary (base.Snapshotting) ---------------------------------

    def snapshot(self) -> TlsState:
        """See TlsState; NotAtBoundary while a handshake is under way or bytes are buffered."""
        if self._done:
            return TlsState(done=True)
        if self._hello_seen or self._call is not None:
            raise NotAtBoundary("TLS: a handshake is under way")
        if any(side.records or side.handshake or side.ignored for side in self._sides):
            raise NotAtBoundary("TLS: a record is being read")
        return TlsState(done=False)

    def restore(self, state: TlsState) -> None:
        """Continue from `state`: a fresh connection, or one whose handshake was reported."""
        self._sides = (_Side(), _Side())
        self._call = None
        self._client = None
        self._server_hello_ts = None
        self._version = 0
        self._hello_seen = state.done
        self._done = state.done

    # -- StreamParser --------------------------------------------------------------------

    def feed(self, direction: Direction, data: bytes, ts_ns: int) -> list[ApiCall]:
        side = self._sides[direction]
        if self._done or side.ignored or not data:
            return []
        if not side.records:
            side.record_ts = ts_ns
        side.records += data
        calls: list[ApiCall] = []
        while not self._done and not side.ignored and len(side.records) >= _RECORD_HEADER.size:
            content_type, version, length = _RECORD_HEADER.unpack_from(side.records)
            if content_type not in _CONTENT_TYPES or version >> 8 != 3 or length > MAX_RECORD_LENGTH:
                calls.extend(self._broken(f"TLS record header {bytes(side.records[:5]).hex()} is not valid"))
                break
            if len(side.records) < _RECORD_HEADER.size + length:
                break
            fragment = bytes(side.records[_RECORD_HEADER.size : _RECORD_HEADER.size + length])
            record_ts = side.record_ts
            del side.records[: _RECORD_HEADER.size + length]
            side.record_ts = ts_ns
            calls.extend(self._record(direction, content_type, fragment, record_ts))
        return calls

    def gap(self, direction: Direction, size: int, ts_ns: int) -> list[ApiCall]:
        side = self._sides[direction]
        side.ignored = True
        side.records.clear()
        side.handshake.clear()
        if self._call is not None and "capture-gap" not in self._call.notes:
            self._call.notes.append("capture-gap")
        return []

    def expire(self, now_ns: int) -> list[ApiCall]:
        if self._done or self._call is None:
            return []
        if now_ns - self._call.request.ts < self._limits.request_timeout_ns:
            return []
        return self._emit_pending()

    def finish(self, ts_ns: int) -> list[ApiCall]:
        if self._done or self._call is None:
            self._done = True
            return []
        return self._emit_pending()

    # -- records and handshake messages --------------------------------------------------

    def _broken(self, reason: str) -> list[ApiCall]:
        if not self._hello_seen:
            self._done = True
            raise ProtocolError(reason)
        if self._call is None:
            self._done = True
            return []
        self._call.notes.append("malformed-record")
        return self._emit_pending()

    def _record(self, direction: Direction, content_type: int, fragment: bytes, ts_ns: int) -> list[ApiCall]:
        side = self._sides[direction]
        if content_type == CONTENT_CHANGE_CIPHER_SPEC:
            side.encrypted = True
            return self._check_complete()
        if side.encrypted:
            return []
        if content_type == CONTENT_ALERT:
            return self._alert(direction, fragment, ts_ns)
        if content_type != CONTENT_HANDSHAKE:
            if not self._hello_seen:
                side.ignored = True  # the capture began after this side's handshake
            return []
        if not side.handshake:
            side.handshake_ts = ts_ns
        side.handshake += fragment
        calls: list[ApiCall] = []
        while len(side.handshake) >= 4 and not self._done and not side.encrypted:
            message_type = side.handshake[0]
            length = int.from_bytes(side.handshake[1:4], "big")
            if length > MAX_HANDSHAKE_MESSAGE:
                if self._call is not None:
                    self._call.notes.append("handshake-too-large")
                calls.extend(self._broken(f"TLS handshake message of {length} bytes"))
                break
            if len(side.handshake) < 4 + length:
                break
            body = bytes(side.handshake[4 : 4 + length])
            message_ts = side.handshake_ts
            del side.handshake[: 4 + length]
            side.handshake_ts = ts_ns
            calls.extend(self._message(direction, message_type, body, message_ts))
        return calls

    def _message(self, direction: Direction, message_type: int, body: bytes, ts_ns: int) -> list[ApiCall]:
        if message_type == HANDSHAKE_CLIENT_HELLO:
            return self._client_hello(direction, body, ts_ns)
        if message_type == HANDSHAKE_SERVER_HELLO:
            return self._server_hello(direction, body, ts_ns)
        if not self._hello_seen:
            # The middle of a handshake whose hellos were not captured: nothing to report.
            self._sides[direction].ignored = True
            return []
        if self._call is None:
            return []
        if message_type == HANDSHAKE_CERTIFICATE_REQUEST and direction is not self._client:
            if "certificate-requested" not in self._call.notes:
                self._call.notes.append("certificate-requested")
        elif message_type == HANDSHAKE_CERTIFICATE and direction is self._client:
            reader = _Reader(body)
            try:
                self._call.tls.client_certificate = reader.u24() > 0
            except ProtocolError:
                return self._broken("TLS client Certificate message cut short")
        return []

    def _new_call(self, client: Direction, ts_ns: int) -> ApiCall:
        call = new_call(self._flow, PROTOCOL, ts_ns, 0)
        call.method = "handshake"
        if client is Direction.SERVER_TO_CLIENT:
            src = Endpoint()
            src.CopyFrom(call.src)
            call.src.CopyFrom(call.dst)
            call.dst.CopyFrom(src)
        self._client = client
        return call

    def _client_hello(self, direction: Direction, body: bytes, ts_ns: int) -> list[ApiCall]:
        if self._call is not None and self._client is direction:
            # The second ClientHello after a HelloRetryRequest: the first one is the fingerprint.
            return []
        try:
            hello = parse_client_hello(body)
        except ProtocolError as error:
            if self._call is None:
                self._done = True
                raise ProtocolError(f"malformed ClientHello: {error}") from error
            return self._broken("malformed ClientHello")
        self._hello_seen = True
        if self._call is None:
            self._call = self._new_call(direction, ts_ns)
        call = self._call
        call.request.size = len(body) + 4
        call.request.end_ts = ts_ns
        detail = call.tls
        detail.sni = hello.sni or ""
        call.path = detail.sni
        detail.alpn.extend(protocol.decode("utf-8", errors="replace") for protocol in hello.alpn[:MAX_LISTED])
        offered = [v for v in hello.supported_versions if not is_grease(v)] or [hello.legacy_version]
        detail.offered_versions.extend(version_name(v) for v in offered[:MAX_LISTED])
        detail.offered_ciphers.extend(cipher_name(c) for c in hello.ciphers if not is_grease(c))
        del detail.offered_ciphers[MAX_LISTED:]
        detail.ja4 = ja4(hello)
        return []

    def _server_hello(self, direction: Direction, body: bytes, ts_ns: int) -> list[ApiCall]:
        try:
            hello = parse_server_hello(body)
        except ProtocolError as error:
            if not self._hello_seen:
                self._done = True
                raise ProtocolError(f"malformed ServerHello: {error}") from error
            return self._broken("malformed ServerHello")
        self._hello_seen = True
        if self._call is None:
            self._call = self._new_call(direction.reverse, ts_ns)
            self._call.notes.append("client-hello-not-seen")
        call = self._call
        if hello.hello_retry:
            if "hello-retry-request" not in call.notes:
                call.notes.append("hello-retry-request")
            return []
        self._version = hello.version
        self._server_hello_ts = ts_ns
        call.tls.version = version_name(hello.version)
        call.tls.cipher = cipher_name(hello.cipher)
        call.status = call.tls.version
        call.response.size = len(body) + 4
        call.response.end_ts = ts_ns
        if hello.version == 0x0304 or hello.version >> 8 == 0x7F:
            for side in self._sides:
                side.encrypted = True
            return self._emit(Outcome.OUTCOME_OK)
        return []

    def _alert(self, direction: Direction, fragment: bytes, ts_ns: int) -> list[ApiCall]:
        if len(fragment) < 2:
            return self._broken("TLS alert shorter than 2 bytes")
        level, description = fragment[0], fragment[1]
        name = alert_name(description)
        if self._call is None:
            if not self._hello_seen:
                self._sides[direction].ignored = True
            return []
        sender = "client" if direction is self._client else "server"
        if level != ALERT_FATAL:
            self._call.notes.append(f"{sender}-alert-warning-{name}")
            return []
        self._call.tls.alert = name
        self._call.status = name
        self._call.notes.append(f"alert-from-{sender}")
        if self._server_hello_ts is None:
            self._server_hello_ts = ts_ns
        self._call.response.end_ts = ts_ns
        return self._emit(Outcome.OUTCOME_ERROR)

    def _check_complete(self) -> list[ApiCall]:
        if self._call is not None and self._server_hello_ts is not None and all(s.encrypted for s in self._sides):
            return self._emit(Outcome.OUTCOME_OK)
        return []

    def _emit_pending(self) -> list[ApiCall]:
        """The flow ended, timed out or broke before the handshake completed."""
        assert self._call is not None
        if self._server_hello_ts is None:
            return self._emit(Outcome.OUTCOME_NO_RESPONSE)
        if "handshake-incomplete" not in self._call.notes:
            self._call.notes.append("handshake-incomplete")
        return self._emit(Outcome.OUTCOME_OK)

    def _emit(self, outcome: int) -> list[ApiCall]:
        call = self._call
        assert call is not None
        self._done = True
        for side in self._sides:
            side.records.clear()
            side.handshake.clear()
        if outcome == Outcome.OUTCOME_NO_RESPONSE:
            return [finish_call(call, None, error=False)]
        assert self._server_hello_ts is not None
        if "client-hello-not-seen" in call.notes:
            call.request.ts = self._server_hello_ts
        return [finish_call(call, self._server_hello_ts, error=outcome == Outcome.OUTCOME_ERROR)]


def _looks_like_hello(data: bytes, handshake_type: int) -> bool:
    return (
        len(data) >= 6
        and data[0] == CONTENT_HANDSHAKE
        and data[1] == 3
        and data[2] <= 4
        and data[5] == handshake_type
        and int.from_bytes(data[3:5], "big") <= MAX_RECORD_LENGTH
    )


def _looks_like_record(data: bytes) -> bool:
    return (
        len(data) >= 5
        and data[0] in _CONTENT_TYPES
        and data[1] == 3
        and data[2] <= 4
        and int.from_bytes(data[3:5], "big") <= MAX_RECORD_LENGTH
    )


def probe(client_first: bytes, server_first: bytes, flow: FlowInfo) -> int:
    """3 for a ClientHello record (either direction: the engine may have the roles reversed),
    2 for a ServerHello or any other TLS record (a capture that began mid-stream), 1 for a TLS
    port with no bytes yet, 0 otherwise."""
    if _looks_like_hello(client_first, HANDSHAKE_CLIENT_HELLO) or _looks_like_hello(
        server_first, HANDSHAKE_CLIENT_HELLO
    ):
        return 3
    seen = [data for data in (client_first, server_first) if data]
    if seen and all(_looks_like_record(data) for data in seen):
        return 2
    if not seen and (flow.server_port in TLS_PORTS or flow.client_port in TLS_PORTS):
        return 1
    return 0


def new_stream(flow: FlowInfo, limits: ParserLimits) -> StreamParser:
    return TlsStreamParser(flow, limits)


SPEC = ProtocolSpec(name=PROTOCOL, transport="tcp", probe=probe, new_stream=new_stream, ports=TLS_PORTS, probe_bytes=6)

__all__ = [
    "SPEC",
    "ClientHello",
    "ServerHello",
    "TlsState",
    "TlsStreamParser",
    "cipher_name",
    "is_grease",
    "ja4",
    "parse_client_hello",
    "parse_server_hello",
    "probe",
    "version_name",
]
