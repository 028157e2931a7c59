"""A throwaway network for live tests: network namespaces standing in for pods, each joined to
the host by a veth pair whose host end is plugged into a bridge of the test's own (the layout
of the bridge CNI plugin). Addresses exist only inside the namespaces; the host ends and the
bridge carry none, so nothing on the host routes or answers. Every name carries a random tag,
so tests running side by side do not meet, and `close()` removes all of it."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType


def sh(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=timeout)


@dataclass
class Pod:
    name: str
    namespace: str  # the Kubernetes namespace it stands for
    netns: str
    host_if: str
    ip: str


@dataclass
class NetLab:
    subnet: str = "10.213.7"
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    pods: list[Pod] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _netns: list[str] = field(default_factory=list)
    _links: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bridge = f"twb{self.tag}"
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        sh("ip", "link", "set", self.bridge, "up")

    @property
    def host_prefix(self) -> str:
        """Host-side interface names start with this (the pod interface pattern of the tests)."""
        return f"twv{self.tag}"

    def add_pod(self, name: str, namespace: str, host_index: int, host_if: str | None = None) -> Pod:
        netns = f"tw{self.tag}{name}"[:30]
        host_if = host_if or f"{self.host_prefix}{len(self.pods)}"
        ip = f"{self.subnet}.{host_index}"
        sh("ip", "netns", "add", netns)
        self._netns.append(netns)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns)
        self._links.append(host_if)
        sh("ip", "link", "set", host_if, "master", self.bridge)
        sh("ip", "link", "set", host_if, "up")
        self.exec(netns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        self.exec(netns, "ip", "link", "set", "eth0", "up")
        self.exec(netns, "ip", "link", "set", "lo", "up")
        pod = Pod(name, namespace, netns, host_if, ip)
        self.pods.append(pod)
        return pod

    def exec(self, netns: str, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", netns, *args, timeout=timeout, check=check)

    def spawn(self, netns: str, *args: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            ["ip", "netns", "exec", netns, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.processes.append(process)
        return process

    def http_server(self, pod: Pod, port: int = 8080, bind: str | None = None) -> None:
        """Python's http.server in the pod; returns once it accepts connections."""
        self.spawn(pod.netns, sys.executable, "-m", "http.server", "--bind", bind or pod.ip, str(port))
        probe = f"import socket; socket.create_connection(({bind or pod.ip!r}, {port}), timeout=0.5).close()"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.exec(pod.netns, sys.executable, "-c", probe, timeout=5, check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"http.server in {pod.netns} did not start")

    def http_requests(self, client: Pod, target: str, count: int, port: int = 8080) -> int:
        """`count` GETs from the client pod, one connection each; returns how many got a 200."""
        script = (
            "import urllib.request\n"
            "ok = 0\n"
            f"for i in range({count}):\n"
            f"    with urllib.request.urlopen('http://{target}:{port}/?n=' + str(i), timeout=5) as r:\n"
            "        r.read(); ok += r.status == 200\n"
            "print(ok)\n"
        )
        return int(self.exec(client.netns, sys.executable, "-c", script, timeout=60).stdout.strip() or 0)

    def snapshot(self, path: Path) -> Path:
        """A `kubectl get pods -A -o json` look-alike naming the pods and their IPs."""
        items = [
            {
                "kind": "Pod",
                "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": {"app": pod.name}},
                "spec": {"nodeName": "lab"},
                "status": {"podIP": pod.ip, "podIPs": [{"ip": pod.ip}], "phase": "Running"},
            }
            for pod in self.pods
        ]
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
        return path

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for link in reversed(self._links):
            sh("ip", "link", "del", link, check=False)
        for netns in self._netns:
            sh("ip", "netns", "del", netns, check=False)

    def __enter__(self) -> NetLab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
