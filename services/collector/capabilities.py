"""Which Linux capabilities live capture needs, checked once at start from /proc/self/status.

Without them the first socket call would fail with a bare EPERM deep in the setup; the
collector instead names every missing capability, what it is for and how to grant it.
"""

from __future__ import annotations

from pathlib import Path

from trawl.errors import ConfigError

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_SYS_ADMIN = 21
CAP_BPF = 39

NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_NET_RAW: "CAP_NET_RAW", CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_BPF: "CAP_BPF"}


def effective_capabilities(status_text: str) -> int:
    """The CapEff bit mask of a /proc/<pid>/status text."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split(":", 1)[1].strip(), 16)
    raise ValueError("no CapEff line in the process status")


def required_capabilities(pod_loopback: bool, tls_uprobes: bool = False) -> dict[int, str]:
    """Capability -> why live capture needs it."""
    needed = {CAP_NET_RAW: "open AF_PACKET sockets"}
    if pod_loopback:
        needed[CAP_SYS_ADMIN] = "enter pod network namespaces (setns)"
    if tls_uprobes:
        needed[CAP_BPF] = "load eBPF programs"
        needed[CAP_SYS_ADMIN] = "attach uprobes"
    return needed


def missing_capabilities(effective: int, needed: dict[int, str]) -> list[str]:
    return [f"{NAMES[cap]} ({why})" for cap, why in sorted(needed.items()) if not effective >> cap & 1]


def check_capabilities(needed: dict[int, str], status_path: Path = Path("/proc/self/status")) -> None:
    """ConfigError, one line, naming each missing capability."""
    effective = effective_capabilities(status_path.read_text())
    missing = missing_capabilities(effective, needed)
    if missing:
        raise ConfigError(
            "live capture is missing capabilities: "
            + ", ".join(missing)
            + "; run as root or grant them (securityContext.capabilities.add, or setcap on the interpreter)"
        )
