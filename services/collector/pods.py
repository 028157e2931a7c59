"""Pod interfaces: find the host side of every pod's network and follow them as pods come and go.

Every CNI plugin joins a pod's network namespace to the host with a veth pair (or an
equivalent) whose host end is named by the plugin: `veth*` (bridge/ptp plugins, flannel,
kindnet), `cali*` (Calico), `lxc*` (Cilium); a bridge such as `cni0` carries the same packets
again and is only captured when its name is configured. The watcher subscribes to the kernel's
link events (rtnetlink RTMGRP_LINK through pyroute2) before it lists the links, so an interface
that appears while the list is read is not missed, and reports each matching interface once
when it appears and once when it goes.

Pod loopback: a pod's `lo` is inside its network namespace, where a sidecar and its app talk
in plaintext; `netns_path` names the namespace to enter (see afpacket.network_namespace), and
`pod_address` reads the pod's own address there, which ties what `lo` carries to the pod
(trawl.collector.loopback).
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import socket
import struct
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pyroute2 import AsyncIPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl import RTMGRP_LINK  # type: ignore[import-untyped]

from trawl.collector.afpacket import network_namespace
from trawl.errors import ConfigError
from trawl.logs import get_logger

log = get_logger(__name__)

DEFAULT_POD_INTERFACE_PATTERNS = ("veth*", "cali*", "lxc*")
NETNS_DIR = Path("/run/netns")


@dataclass(frozen=True)
class InterfaceEvent:
    kind: Literal["added", "removed"]
    name: str
    ifindex: int


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def netns_path(name_or_path: str) -> Path:
    """`ip netns` name (under /run/netns) or a path such as /proc/<pid>/ns/net."""
    path = Path(name_or_path) if "/" in name_or_path else NETNS_DIR / name_or_path
    if not path.exists():
        raise ConfigError(f"network namespace {name_or_path!r} not found at {path}")
    return path


SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's (primary) IPv4 address
_IF_INET6_GLOBAL_SCOPE = "00"  # /proc/net/if_inet6's scope column: global


def pod_address(netns: Path) -> str:
    """The pod's own address in network namespace `netns`: the first global address of its
    interfaces other than `lo`, IPv4 before IPv6 (either of a dual-stack pod's podIPs names
    the pod); "" when it has none (not a pod's namespace, or its network is not set up yet).
    Read with an ioctl and procfs from inside the namespace: no netlink client, whose sync
    flavour cannot run inside the collector's event loop."""
    ipv4: list[tuple[int, str]] = []
    with network_namespace(netns):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # opened inside: asks there
            for index, name in socket.if_nameindex():
                request = struct.pack("256s", name.encode()[:15])
                try:
                    answer = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, request)
                except OSError:  # no IPv4 address on it
                    continue
                address = socket.inet_ntoa(answer[20:24])
                if name != "lo" and not address.startswith(("127.", "169.254.")):
                    ipv4.append((index, address))
        # This thread's view of procfs: the namespace it is in now.
        inet6 = Path("/proc/thread-self/net/if_inet6").read_text() if socket.has_ipv6 else ""
    if ipv4:
        return min(ipv4)[1]
    ipv6: list[tuple[int, str]] = []
    for line in inet6.splitlines():
        fields = line.split()
        if len(fields) == 6 and fields[3] == _IF_INET6_GLOBAL_SCOPE and fields[5] != "lo":
            ipv6.append((int(fields[1], 16), socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[0]))))
    return min(ipv6)[1] if ipv6 else ""


class PodInterfaceWatcher:
    """`async for event in watcher.events(): ...` yields every matching interface present at
    start as `added`, then additions and removals as the kernel reports them."""

    def __init__(self, patterns: Iterable[str] = DEFAULT_POD_INTERFACE_PATTERNS) -> None:
        self.patterns = tuple(patterns)
        self.present: dict[int, str] = {}
        self._events: AsyncIPRoute | None = None

    async def events(self) -> AsyncIterator[InterfaceEvent]:
        self._events = AsyncIPRoute()
        try:
            await self._events.bind(groups=RTMGRP_LINK)
            async with AsyncIPRoute() as lister:
                current = [
                    (link.get("index"), link.get_attr("IFLA_IFNAME")) async for link in await lister.link("dump")
                ]
            for index, name in current:
                for event in self._update("RTM_NEWLINK", index, name):
                    yield event
            while True:
                async for message in self._events.get():
                    for event in self._on_message(message):
                        yield event
        finally:
            self.close()

    def _on_message(self, message: Any) -> list[InterfaceEvent]:
        kind = message.get("event")
        if kind not in ("RTM_NEWLINK", "RTM_DELLINK"):
            return []
        return self._update(kind, message.get("index"), message.get_attr("IFLA_IFNAME"))

    def _update(self, kind: str, index: object, name: object) -> list[InterfaceEvent]:
        if not isinstance(index, int) or not isinstance(name, str):
            return []
        out: list[InterfaceEvent] = []
        known = self.present.get(index)
        wanted = kind == "RTM_NEWLINK" and matches(name, self.patterns)
        if known is not None and (not wanted or known != name):
            del self.present[index]
            out.append(InterfaceEvent("removed", known, index))
        if wanted and index not in self.present:
            self.present[index] = name
            out.append(InterfaceEvent("added", name, index))
        return out

    def close(self) -> None:
        if self._events is not None:
            with contextlib.suppress(Exception):
                self._events.close()
            self._events = None
