"""The pod interface watcher against the kernel's real link events (root)."""

from __future__ import annotations

import asyncio
import secrets
import subprocess

import pytest

from tests.conftest import needs_root
from trawl.collector.pods import InterfaceEvent, PodInterfaceWatcher, matches, netns_path
from trawl.errors import ConfigError

pytestmark = [needs_root(), pytest.mark.root, pytest.mark.timeout(60)]


def test_patterns_and_namespace_paths() -> None:
    assert matches("cali12ab", ["veth*", "cali*"])
    assert not matches("eth0", ["veth*", "cali*", "lxc*"])
    with pytest.raises(ConfigError, match="not found"):
        netns_path("no-such-namespace-xyz")


def test_renames_and_removals_are_reported_once() -> None:
    watcher = PodInterfaceWatcher(["veth*"])
    assert watcher._update("RTM_NEWLINK", 7, "tmp0") == []
    assert watcher._update("RTM_NEWLINK", 7, "veth7") == [InterfaceEvent("added", "veth7", 7)]
    assert watcher._update("RTM_NEWLINK", 7, "veth7") == []  # a state change of a known link
    assert watcher._update("RTM_NEWLINK", 7, "other") == [InterfaceEvent("removed", "veth7", 7)]
    watcher._update("RTM_NEWLINK", 7, "veth7")
    assert watcher._update("RTM_DELLINK", 7, "veth7") == [InterfaceEvent("removed", "veth7", 7)]


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


async def test_links_present_at_start_then_added_and_deleted() -> None:
    tag = secrets.token_hex(3)
    first, second = f"twp{tag}a", f"twp{tag}b"
    await asyncio.to_thread(ip, "link", "add", first, "type", "veth", "peer", "name", f"twq{tag}a")
    watcher = PodInterfaceWatcher([f"twp{tag}*"])
    seen: list[tuple[str, str]] = []

    async def follow() -> None:
        async for event in watcher.events():
            seen.append((event.kind, event.name))
            if event.kind == "added" and event.name == first:
                await asyncio.to_thread(ip, "link", "add", second, "type", "veth", "peer", "name", f"twq{tag}b")
            elif event.kind == "added" and event.name == second:
                await asyncio.to_thread(ip, "link", "del", second)
            elif event.kind == "removed":
                return

    try:
        await asyncio.wait_for(follow(), 10)
    finally:
        watcher.close()
        for name in (first, second):
            await asyncio.to_thread(ip, "link", "del", name, check=False)
    assert seen == [("added", first), ("added", second), ("removed", second)]
