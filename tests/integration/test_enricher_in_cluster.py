"""The enricher's in-cluster configuration (a pod's service account: KUBERNETES_SERVICE_HOST and
_PORT, the token and ca.crt files) through the real `kubernetes` client's loader, against the
stand-in kube-apiserver (tests/kube_apiserver.py: not Kubernetes, it speaks the list/watch
protocol; see its docstring). The stand-in speaks plain HTTP, and in a pod the client only
speaks HTTPS to the service address, so a TLS terminator of this file stands in front of it
with a server certificate signed by a throwaway CA (the `openssl` CLI): the client must trust
that CA from ca.crt, and must send the token file's token, which the terminator records."""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes.config import incluster_config

from tests.integration.test_k8s_watch import SEED, now_identity
from tests.kube_apiserver import KubeApiServer
from trawl.enricher.config import EnricherSettings
from trawl.enricher.identity import IdentityMap
from trawl.enricher.logic import start_kube_watch
from trawl.metrics import Registry

TOKEN = "sa-token-for-the-enricher"  # a test token, no secret


def openssl(*arguments: str, cwd: Path) -> None:
    subprocess.run(["openssl", *arguments], cwd=cwd, check=True, timeout=30, capture_output=True)


def certificate_authority(directory: Path, name: str) -> None:
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=directory)
    openssl(
        "req", "-x509", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-days", "2", "-out", f"{name}.crt",
        cwd=directory,
    )  # fmt: skip


def server_certificate(directory: Path, ca: str) -> None:
    """server.crt for the address the in-cluster client dials (127.0.0.1), signed by `ca`."""
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "server.key", cwd=directory)
    openssl("req", "-new", "-key", "server.key", "-subj", "/CN=kubernetes", "-out", "server.csr", cwd=directory)
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:kubernetes.default.svc\n")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-days", "2", "-extfile", "san.ext", "-out", "server.crt", cwd=directory,
    )  # fmt: skip


class TlsTerminator:
    """TLS in front of a plain TCP port: each connection decrypted and relayed both ways; what
    clients send is kept, to read the requests' headers."""

    def __init__(self, backend_port: int, context: ssl.SSLContext) -> None:
        self.backend_port = backend_port
        self.context = context
        self.received = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            client = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()  # a client that does not trust the certificate ends here
            return
        backend = socket.create_connection(("127.0.0.1", self.backend_port))
        with self._lock:
            self._sockets += [client, backend]
        threading.Thread(target=self._pump, args=(backend, client, False), daemon=True).start()
        self._pump(client, backend, True)

    def _pump(self, source: socket.socket, target: socket.socket, keep: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if keep:
                    with self._lock:
                        self.received += data
                target.sendall(data)
        for end in (source, target):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def authorizations(self) -> set[tuple[str, str]]:
        """(scheme in lower case, credentials) of every request's Authorization header."""
        with self._lock:
            text = self.received.decode("latin-1")
        found = re.findall(r"\r\nauthorization: *(\S+) +([^\r\n]*)\r\n", text, flags=re.IGNORECASE)
        return {(scheme.lower(), credentials) for scheme, credentials in found}

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for end in self._sockets:
                with contextlib.suppress(OSError):
                    end.close()


@pytest.fixture
def service_account(tmp_path: Path) -> Path:
    """A pod's /var/run/secrets/kubernetes.io/serviceaccount: token and ca.crt (the CA `ca`)."""
    certificate_authority(tmp_path, "ca")
    certificate_authority(tmp_path, "other-ca")
    server_certificate(tmp_path, "ca")
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(TOKEN)
    (account / "ca.crt").write_bytes((tmp_path / "ca.crt").read_bytes())
    return account


@pytest.fixture
def in_cluster(service_account: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TlsTerminator]:
    """The environment of a pod whose API server is the stand-in behind TLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(service_account.parent / "server.crt", service_account.parent / "server.key")
    with KubeApiServer(SEED) as api:
        terminator = TlsTerminator(int(api.url.rsplit(":", 1)[1]), context)
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(terminator.port))
        monkeypatch.delenv("KUBECONFIG", raising=False)
        # Where the client's loader reads them in a pod; here, the test's files.
        monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(service_account / "token"))
        monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(service_account / "ca.crt"))
        try:
            yield terminator
        finally:
            terminator.close()


def test_the_enricher_in_a_pod_watches_with_its_service_account(in_cluster: TlsTerminator) -> None:
    settings = EnricherSettings(kube_watch=True, cluster="stand-in", kube_backoff_max_s=0.5)
    watcher = start_kube_watch(settings, IdentityMap.empty(), Registry())
    assert watcher is not None
    try:
        assert watcher.server == f"https://127.0.0.1:{in_cluster.port}"
        assert watcher.wait_synced(15)
        cart = now_identity(watcher, "10.8.0.11")
        assert cart is not None and (cart.workload, cart.workload_kind) == ("cart", "Deployment")
    finally:
        watcher.stop()
    assert in_cluster.authorizations() == {("bearer", TOKEN)}


def test_a_ca_that_did_not_sign_the_servers_certificate_is_refused(
    in_cluster: TlsTerminator, service_account: Path
) -> None:
    (service_account / "ca.crt").write_bytes((service_account.parent / "other-ca.crt").read_bytes())
    settings = EnricherSettings(kube_watch=True, kube_backoff_max_s=0.5, kube_request_timeout_s=2)
    watcher = start_kube_watch(settings, IdentityMap.empty(), Registry())
    assert watcher is not None
    try:
        assert not watcher.wait_synced(3)
        state = watcher.states["Pod"]
        assert (state.failing, "CERTIFICATE_VERIFY_FAILED" in state.error) == ("untrusted", True)
        assert "ca.crt" in state.fix
        assert "untrusted" in watcher.status_line()
    finally:
        watcher.stop()
    assert in_cluster.authorizations() == set()  # nothing was said to an unverified server
