"""Wireshark as the oracle for TLS handshakes: for every connection, the SNI, ALPN, offered and
negotiated version and cipher, alert and client certificate Trawl reports are what tshark
decodes, and Trawl's JA4 equals a JA4 computed here from tshark's decoding of the same
ClientHello (tshark 4.0 has no JA4 field; FoxIO's examples check the algorithm itself in
tests/unit/test_tls_handshake.py). Cipher names are checked against tshark's names.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, SHARED_PCAPS, needs_binary
from tests.protocol_replay import tcp_server_ports, tls_calls, tshark_fields
from trawl.dissector.protocols.tls import CIPHER_NAMES, VERSION_NAMES
from trawl.v1.calls_pb2 import ApiCall

pytestmark = needs_binary("tshark")

CAPTURES = [FIXTURES / "tls_handshakes.pcap", SHARED_PCAPS / "tls" / "arkime__tls-alpn-h2.pcap"]
HELLO_FIELDS = [
    "tcp.srcport", "tls.handshake.extensions_server_name", "tls.handshake.ciphersuite", "tls.handshake.extension.type",
    "tls.handshake.sig_hash_alg", "tls.handshake.extensions.supported_version", "tls.handshake.extensions_alpn_str",
    "tls.handshake.version",
]  # fmt: skip
# RFC 8446 6.2 alert descriptions the captures hold.
ALERTS = {40: "handshake_failure", 42: "bad_certificate", 48: "unknown_ca", 70: "protocol_version"}
JA4_VERSIONS = {0x0300: "s3", 0x0301: "10", 0x0302: "11", 0x0303: "12", 0x0304: "13"}


def numbers(value: str) -> list[int]:
    return [int(item, 0) for item in value.split(",") if item]


def grease(value: int) -> bool:
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


def ja4_from_tshark(row: dict[str, str]) -> str:
    ciphers = [c for c in numbers(row["tls.handshake.ciphersuite"]) if not grease(c)]
    extensions = [e for e in numbers(row["tls.handshake.extension.type"]) if not grease(e)]
    versions = [v for v in numbers(row["tls.handshake.extensions.supported_version"]) if not grease(v)]
    version = max(versions) if versions else numbers(row["tls.handshake.version"])[0]
    alpn = row["tls.handshake.extensions_alpn_str"].split(",")[0]
    alpn_chars = alpn[0] + alpn[-1] if alpn else "00"
    sni = "d" if 0 in extensions else "i"
    head = f"t{JA4_VERSIONS.get(version, '00')}{sni}{len(ciphers):02d}{len(extensions):02d}{alpn_chars}"
    cipher_text = ",".join(sorted(f"{c:04x}" for c in ciphers))
    extension_text = ",".join(sorted(f"{e:04x}" for e in extensions if e not in (0, 16)))
    signatures = [f"{s:04x}" for s in numbers(row["tls.handshake.sig_hash_alg"]) if not grease(s)]
    if signatures:
        extension_text += "_" + ",".join(signatures)
    cipher_hash = hashlib.sha256(cipher_text.encode()).hexdigest()[:12]
    extension_hash = hashlib.sha256(extension_text.encode()).hexdigest()[:12]
    return f"{head}_{cipher_hash}_{extension_hash}"


def version_text(value: int) -> str:
    return VERSION_NAMES.get(value, f"0x{value:04x}")


def decode_as(path: Path) -> list[str]:
    return [arg for port in sorted(tcp_server_ports(path)) for arg in ("-d", f"tcp.port=={port},tls")]


def calls_by_client_port(path: Path) -> dict[int, ApiCall]:
    calls = tls_calls(path)
    by_port = {call.src.port: call for call in calls}
    assert len(by_port) == len(calls)
    return by_port


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_client_hellos_match_tshark(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is not present")
    ours = calls_by_client_port(path)
    rows = [
        dict(zip(HELLO_FIELDS, row, strict=False))
        for row in tshark_fields(path, "tls.handshake.type == 1", HELLO_FIELDS, *decode_as(path))
    ]
    assert sorted(int(row["tcp.srcport"]) for row in rows) == sorted(ours)
    for row in rows:
        call = ours[int(row["tcp.srcport"])]
        detail = call.tls
        assert detail.sni == row["tls.handshake.extensions_server_name"]
        assert ",".join(detail.alpn) == row["tls.handshake.extensions_alpn_str"]
        offered = [v for v in numbers(row["tls.handshake.extensions.supported_version"]) if not grease(v)]
        assert list(detail.offered_versions) == [
            version_text(v) for v in offered or numbers(row["tls.handshake.version"])
        ]
        ciphers = [c for c in numbers(row["tls.handshake.ciphersuite"]) if not grease(c)]
        assert list(detail.offered_ciphers) == [CIPHER_NAMES.get(c, f"0x{c:04x}") for c in ciphers]
        assert detail.ja4 == ja4_from_tshark(row)


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_server_answers_match_tshark(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is not present")
    ours = calls_by_client_port(path)
    fields = ["tcp.srcport", "tcp.dstport", "tls.handshake.type", "tls.handshake.ciphersuite",
              "tls.handshake.extensions.supported_version", "tls.handshake.version", "tls.alert_message.desc",
              "tls.handshake.certificates_length"]  # fmt: skip
    display_filter = "tls.handshake.type == 2 or tls.handshake.type == 11 or tls.alert_message"
    seen_server_hello: set[int] = set()
    client_certificate: dict[int, bool] = {}
    alerts = 0
    for row in tshark_fields(path, display_filter, fields, *decode_as(path)):
        sport, dport, kinds, cipher, selected, legacy, alert, certificates_length = row
        kind_list = numbers(kinds)
        if int(sport) in ours:  # client -> server
            call = ours[int(sport)]
            if 11 in kind_list:
                client_certificate[int(sport)] = any(int(n) > 0 for n in certificates_length.split(",") if n)
        else:  # server -> client
            call = ours[int(dport)]
            if 2 in kind_list:
                seen_server_hello.add(int(dport))
                version = numbers(selected)[0] if selected else numbers(legacy)[0]
                assert call.tls.version == version_text(version)
                assert call.tls.cipher == CIPHER_NAMES.get(numbers(cipher)[0], cipher)
        if alert:
            assert call.tls.alert == ALERTS[int(alert)]
            alerts += 1
    for port, call in ours.items():
        assert bool(call.tls.version) == (port in seen_server_hello)
        assert call.tls.client_certificate == client_certificate.get(port, False)
    if path.name == "tls_handshakes.pcap":
        assert alerts == 2
        assert sum(client_certificate.values()) == 1


def test_cipher_names_agree_with_tshark() -> None:
    """Every cipher name Trawl knows that appears in a capture is tshark's name for that code."""
    checked = 0
    for path in CAPTURES:
        if not path.exists():
            continue
        text = subprocess.run(
            ["tshark", "-n", "-r", str(path), *decode_as(path), "-Y", "tls.handshake.type == 1", "-V"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        for name, code in re.findall(r"Cipher Suite: (TLS_\w+) \(0x([0-9a-f]{4})\)", text):
            if int(code, 16) in CIPHER_NAMES:
                assert CIPHER_NAMES[int(code, 16)] == name
                checked += 1
    assert checked >= 20
