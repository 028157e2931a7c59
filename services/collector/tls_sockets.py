"""Which TCP connection a process's file descriptor is: /proc/<pid>/fd and /proc/<pid>/net/tcp{,6}.

A TLS chunk from the uprobes names (pid, fd); the dissector needs the connection's two ends.
`/proc/<pid>/fd/<fd>` links to `socket:[<inode>]`, and the process's own network namespace's
`/proc/<pid>/net/tcp` and `tcp6` list each socket's inode with its local and remote address,
so a process in a container is resolved in its namespace, with the addresses its packets carry.
An answer is kept per (pid, fd) until the fd is closed (the uprobes report the close) or the
process is gone; a fd that is not a TCP socket is remembered as such, so it costs one look.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

# /proc/net/tcp state of a listening socket.
TCP_LISTEN = 0x0A


@dataclass(frozen=True, slots=True)
class Endpoints:
    """One TCP connection as a process sees it."""

    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int


def hex_address(text: str) -> tuple[str, int]:
    """An `ADDR:PORT` of /proc/net/tcp{,6} as (ip text, port).

    The address is the kernel's in-memory bytes printed as 32-bit words in host order
    (little-endian here); an IPv4-mapped IPv6 address is given as IPv4, as its packets carry it.
    """
    address, _, port = text.partition(":")
    if len(address) not in (8, 32) or not port:
        raise ValueError(f"not an ADDR:PORT of /proc/net/tcp: {text!r}")
    raw = b"".join(int(address[i : i + 8], 16).to_bytes(4, "little") for i in range(0, len(address), 8))
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    if len(raw) == 4:
        ip = ipaddress.IPv4Address(raw)
    else:
        ip6 = ipaddress.IPv6Address(raw)
        ip = ip6.ipv4_mapped or ip6
    return str(ip), int(port, 16)


def parse_proc_net_tcp(text: str) -> dict[int, tuple[Endpoints, int]]:
    """inode -> (endpoints, state) of each socket line of a /proc/net/tcp or tcp6 text."""
    sockets: dict[int, tuple[Endpoints, int]] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            local_ip, local_port = hex_address(fields[1])
            remote_ip, remote_port = hex_address(fields[2])
            state = int(fields[3], 16)
            inode = int(fields[9])
        except ValueError:
            continue
        if inode:
            sockets[inode] = (Endpoints(local_ip, local_port, remote_ip, remote_port), state)
    return sockets


def socket_inode(link: str) -> int | None:
    """The inode of a `socket:[<inode>]` fd link; None for anything else."""
    if link.startswith("socket:[") and link.endswith("]"):
        try:
            return int(link[8:-1])
        except ValueError:
            return None
    return None


class SocketResolver:
    """(pid, fd) -> Endpoints, cached until the fd is closed or the process ends."""

    def __init__(self, proc: Path = Path("/proc"), max_entries: int = 65536) -> None:
        self.proc = proc
        self.max_entries = max_entries
        self._cache: dict[tuple[int, int], Endpoints | None] = {}
        self.lookups = 0

    def resolve(self, pid: int, fd: int) -> Endpoints | None:
        key = (pid, fd)
        if key in self._cache:
            return self._cache[key]
        endpoints = self._lookup(pid, fd)
        if len(self._cache) >= self.max_entries:
            self._cache.clear()  # refills as chunks come; bounded memory first
        self._cache[key] = endpoints
        return endpoints

    def forget(self, pid: int, fd: int) -> None:
        self._cache.pop((pid, fd), None)

    def forget_pids(self, alive: set[int]) -> None:
        """Drop what belongs to processes no longer in `alive`."""
        for key in [key for key in self._cache if key[0] not in alive]:
            del self._cache[key]

    def _lookup(self, pid: int, fd: int) -> Endpoints | None:
        self.lookups += 1
        base = self.proc / str(pid)
        try:
            inode = socket_inode(os.readlink(base / "fd" / str(fd)))
        except OSError:
            return None
        if inode is None:
            return None
        for table in ("tcp", "tcp6"):
            try:
                text = (base / "net" / table).read_text()
            except OSError:
                continue
            found = parse_proc_net_tcp(text).get(inode)
            if found is not None:
                return found[0]
        return None
