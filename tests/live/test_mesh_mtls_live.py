"""Mutual TLS between two pods of a mesh, live (root): network namespaces standing in for pods,
a TLS server in one that asks for a client certificate (both ends hold certificates of one CA,
as a mesh's sidecars do), clients in two others, the host side of the server's veth captured by
the collector, dissected and enriched by the services over a real NATS server. The snapshot
gives the server and one client an Istio sidecar: that client's handshakes come out noted
mesh-mtls, the other client's (a pod outside the mesh) do not."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import needs_root
from tests.live.netlab import NetLab, Pod
from tests.live.test_live_capture import assert_no_loss, live_settings, pipeline, wait_until
from trawl.embedded import EmbeddedNats

pytestmark = [needs_root(), pytest.mark.root, pytest.mark.timeout(120)]

HANDSHAKES = 6
PORT = 8443

SERVER = """
import socket, ssl, sys
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[2] + "/workload.crt", sys.argv[2] + "/workload.key")
context.load_verify_locations(sys.argv[2] + "/ca.crt")
context.verify_mode = ssl.CERT_REQUIRED
listener = socket.create_server((sys.argv[1], int(sys.argv[3])))
while True:
    connection, _ = listener.accept()
    try:
        with context.wrap_socket(connection, server_side=True) as tls:
            tls.sendall(b"pong:" + tls.recv(64))
    except (ssl.SSLError, OSError):
        connection.close()
"""

CLIENT = """
import socket, ssl, sys
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False  # a mesh checks the peer's identity in its certificate, not a host name
context.load_cert_chain(sys.argv[2] + "/workload.crt", sys.argv[2] + "/workload.key")
context.load_verify_locations(sys.argv[2] + "/ca.crt")
ok = 0
for _ in range(int(sys.argv[4])):
    with socket.create_connection((sys.argv[1], int(sys.argv[3])), timeout=5) as raw, context.wrap_socket(raw) as tls:
        tls.sendall(b"ping")
        ok += tls.recv(64) == b"pong:ping"
print(ok)
"""


def openssl(*arguments: str, cwd: Path) -> None:
    subprocess.run(["openssl", *arguments], cwd=cwd, check=True, timeout=30, capture_output=True)


@pytest.fixture
def certificates(tmp_path: Path) -> Path:
    """ca.crt, and workload.crt/.key signed by it (what a mesh's CA gives every sidecar)."""
    for name in ("ca", "workload"):
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=tmp_path)
    openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=mesh CA", "-days", "2", "-out", "ca.crt",
            cwd=tmp_path)  # fmt: skip
    openssl("req", "-new", "-key", "workload.key", "-subj", "/CN=workload", "-out", "workload.csr", cwd=tmp_path)
    (tmp_path / "workload.ext").write_text("extendedKeyUsage=serverAuth,clientAuth\n")
    openssl("x509", "-req", "-in", "workload.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "workload.ext", "-out", "workload.crt", cwd=tmp_path)  # fmt: skip
    return tmp_path


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(state_dir=tmp_path_factory.mktemp("nats-mesh")) as server:
        yield server


@pytest.fixture
def lab() -> Iterator[NetLab]:
    with NetLab(subnet="10.213.11") as network:
        yield network


def snapshot(path: Path, pods: list[tuple[Pod, bool]]) -> Path:
    """The pods as `kubectl get pods -o json` lists them; those marked True run an Istio sidecar."""
    items: list[dict[str, Any]] = []
    for pod, meshed in pods:
        containers = [{"name": "app", "image": "shop/app:1"}]
        if meshed:
            containers.append({"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.22.0"})
        items.append(
            {
                "kind": "Pod",
                "metadata": {"name": pod.name, "namespace": pod.namespace},
                "spec": {"nodeName": "lab", "containers": containers},
                "status": {"podIP": pod.ip, "phase": "Running"},
            }
        )
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    return path


async def test_handshakes_between_two_meshed_pods_are_noted_mesh_mtls(
    lab: NetLab, nats: EmbeddedNats, certificates: Path, tmp_path: Path
) -> None:
    server = lab.add_pod("checkout", "shop", 2)
    meshed = lab.add_pod("frontend", "shop", 3)
    outside = lab.add_pod("legacy", "shop", 4)
    lab.spawn(server.netns, sys.executable, "-c", SERVER, server.ip, str(certificates), str(PORT))
    probe = f"import socket; socket.create_connection(({server.ip!r}, {PORT}), timeout=0.5).close()"
    await wait_until(lambda: lab.exec(server.netns, sys.executable, "-c", probe, check=False).returncode == 0)
    identity = snapshot(tmp_path / "pods.json", [(server, True), (meshed, True), (outside, False)])
    live = live_settings(interfaces=[server.host_if], filter=f"tcp port {PORT}")
    node = f"n{lab.tag}t"
    async with pipeline(nats.url, node, live, identity) as run:
        for client in (meshed, outside):
            answer = await asyncio.to_thread(
                lab.exec, client.netns, sys.executable, "-c", CLIENT, server.ip, str(certificates), str(PORT),
                str(HANDSHAKES),
            )  # fmt: skip
            assert answer.stdout.strip() == str(HANDSHAKES)
        await wait_until(lambda: sum(call.protocol == "tls" for call in run.calls) >= 2 * HANDSHAKES, 20)
        await asyncio.sleep(0.5)  # any extra call arrives too
    tls = [call for call in run.calls if call.protocol == "tls"]
    assert len(tls) == 2 * HANDSHAKES
    assert {call.dst.pod for call in tls} == {"checkout"}
    noted = sorted((call.src.pod, "mesh-mtls" in call.notes, call.src.mesh, call.dst.mesh) for call in tls)
    expected = [("frontend", True, "istio", "istio")] * HANDSHAKES + [("legacy", False, "", "istio")] * HANDSHAKES
    assert noted == sorted(expected)
    assert_no_loss(run.capture)
