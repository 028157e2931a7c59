"""Pod interfaces: find the host side of every pod's network and follow them as pods come and go.

Every CNI plugin joins a pod's network namespace to the host with a veth pair (or an
equivalent) whose host end is named by the plugin: `veth*` (bridge/ptp plugins, flannel,
kindnet), `cali*` (Calico), `lxc*` (Cilium); a bridge such as `cni0` carries the same packets
again and is only captured when its name is configured. The watcher subscribes to the kernel's
link events (rtnetlink RTMGRP_LINK through pyroute2) before it lists the links, so an interface
that appears while the list is read is not missed, and reports each matching interface once
when it appears and once when it goes.

Pod loopback: a pod's `lo` is inside its network namespace, where a sidecar and its app talk
in plaintext; `netns_path` names the namespace to enter (see afpacket.network_namespace).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pyroute2 import AsyncIPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl import RTMGRP_LINK  # type: ignore[import-untyped]

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
