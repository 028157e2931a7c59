"""`trawl analyze --identity` on TLS between pods of a service mesh: the real CLI on a capture
made from the committed TLS handshakes (tls_handshakes.pcap, real OpenSSL handshakes on
loopback) moved onto pod addresses, with a snapshot whose pods run Istio and Linkerd sidecars.
The handshake between two Istio pods is noted mesh-mtls in the table and in the JSON (the
compiled splicer's path); the same handshake to a pod outside any mesh is not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.packet import Packet
from scapy.utils import rdpcap, wrpcap

from tests.conftest import FIXTURES
from tests.unit.test_enricher_mesh import DOCUMENT
from tests.unit.test_enricher_mesh import IP as POD_IP

# The first handshake of the fixture (TLS 1.3: a client certificate travels encrypted, so the
# mark comes from who the two ends are, not from the handshake).
CLIENT_PORT, SERVER_PORT = 52474, 43969


def _handshake_between(client: str, server: str, port_offset: int) -> list[Packet]:
    packets: list[Packet] = []
    for packet in rdpcap(str(FIXTURES / "tls_handshakes.pcap")):
        if TCP not in packet or {packet[TCP].sport, packet[TCP].dport} != {CLIENT_PORT, SERVER_PORT}:
            continue
        moved = packet.copy()
        from_client = moved[TCP].sport == CLIENT_PORT
        moved[IP].src, moved[IP].dst = (client, server) if from_client else (server, client)
        if from_client:
            moved[TCP].sport += port_offset
        else:
            moved[TCP].dport += port_offset
        del moved[IP].chksum, moved[TCP].chksum  # recomputed for the new addresses
        moved.time = packet.time
        packets.append(moved)
    return packets


def analyze(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "trawl", "analyze", *args], capture_output=True, text=True, timeout=120, check=True
    ).stdout


def test_tls_between_two_istio_pods_is_shown_as_the_meshs_mtls(tmp_path: Path) -> None:
    capture = tmp_path / "mesh.pcap"
    meshed = _handshake_between(POD_IP["frontend"], POD_IP["checkout"], 0)
    outside = _handshake_between(POD_IP["frontend"], POD_IP["plain"], 1)
    assert meshed and len(meshed) == len(outside)
    wrpcap(str(capture), sorted([*meshed, *outside], key=lambda packet: float(packet.time)))
    snapshot = tmp_path / "pods.json"
    snapshot.write_text(json.dumps(DOCUMENT))

    calls = [json.loads(line) for line in analyze("--json", "--identity", str(snapshot), str(capture)).splitlines()]
    tls = {call["dst"]["pod"]: call for call in calls if call["protocol"] == "tls"}
    assert set(tls) == {"checkout", "plain"}
    assert tls["checkout"]["notes"] == ["mesh-mtls"]
    assert (tls["checkout"]["src"]["mesh"], tls["checkout"]["dst"]["mesh"]) == ("istio", "istio")
    assert "notes" not in tls["plain"] and "mesh" not in tls["plain"]["dst"]

    rows = [line for line in analyze("--identity", str(snapshot), str(capture)).splitlines() if " tls " in line]
    assert len(rows) == 2
    assert sorted(("[mesh-mtls]" in row, "checkout.shop" in row) for row in rows) == [(False, False), (True, True)]
