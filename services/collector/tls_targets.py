"""Which TLS libraries the processes of this machine run: a scan of /proc/*/maps.

A uprobe is placed on a file (inode) at an offset, and fires in every process that maps that
file, so each library is hooked once, whoever maps it; the scan gives each library file (by
device and inode) with the processes that map it. A process in another mount namespace (a
container) maps files of its own root: they are reached through `/proc/<pid>/root`.

Dynamically linked OpenSSL (and BoringSSL builds named libssl) is found by name, and so is
grpcio's extension, which carries BoringSSL statically linked: it is tried like the others and,
its SSL functions not being exported, reported as not hooked with that reason. Each
process's executable is looked at too: a Go program with crypto/tls linked in is a target of
its own (`tls_go`: where to hook it is read from the file, stripped or not), and so is an
executable with OpenSSL or BoringSSL linked in that defines SSL_read/SSL_write itself (hooked
by those symbols, as a libssl is; version "static").
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from trawl.collector.tls_go import GoBinaries, GoBinary, StaticSsl

LIBSSL = re.compile(r"/libssl\.so(?:\.([0-9][0-9.]*))?$")
# The pod UID in a kubelet cgroup path: ".../kubepods-burstable-pod<uid>.slice/..." (systemd
# driver, dashes as underscores) or ".../kubepods/burstable/pod<uid>/..." (cgroupfs driver).
POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
# grpcio's Cython extension: BoringSSL linked in statically.
GRPCIO = re.compile(r"/cygrpc\.[^/]*\.so$")


@dataclass(slots=True)
class TlsLibrary:
    """One library file and the processes that map it."""

    path: str  # as the first process that maps it names it, inside its own root
    reachable: str  # the path this process opens it by (through /proc/<pid>/root)
    library: str  # "openssl", "boringssl" (grpcio's, linked in), or "go" (crypto/tls)
    # From the file name: "3", "1.1" ("" when the name carries none); "grpcio" for grpcio's;
    # Go's version for a Go program ("go1.19.8").
    # "static" for OpenSSL linked into an executable.
    version: str
    pids: set[int] = field(default_factory=set)
    go: GoBinary | None = None  # where to hook a Go program


# Executables already looked at (most are not Go): shared by every scan of this process.
GO_BINARIES = GoBinaries()


LibraryKey = tuple[int, int]  # (st_dev, st_ino)


def libssl_paths(maps_text: str) -> set[str]:
    """Paths of libssl files mapped executable in a /proc/<pid>/maps text."""
    found: set[str] = set()
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or "x" not in fields[1]:
            continue
        path = fields[5].strip()
        if path.endswith(" (deleted)"):
            continue  # replaced on disk: its inode is no longer reachable by name
        if LIBSSL.search(path) or GRPCIO.search(path):
            found.add(path)
    return found


def scan_process(proc: Path, pid: int, libraries: dict[LibraryKey, TlsLibrary]) -> None:
    """Add the TLS libraries process `pid` maps to `libraries`."""
    base = proc / str(pid)
    try:
        maps_text = (base / "maps").read_text()
    except OSError:
        return  # gone, or not ours to read
    for path in libssl_paths(maps_text):
        reachable = f"{base}/root{path}"
        try:
            stat = os.stat(reachable)
        except OSError:
            continue
        key = (stat.st_dev, stat.st_ino)
        library = libraries.get(key)
        if library is None:
            match = LIBSSL.search(path)
            if match:
                library = TlsLibrary(path, reachable, "openssl", match.group(1) or "")
            else:
                library = TlsLibrary(path, reachable, "boringssl", "grpcio")
            libraries[key] = library
        library.pids.add(pid)
    _scan_executable(base, pid, libraries)


def _scan_executable(base: Path, pid: int, libraries: dict[LibraryKey, TlsLibrary]) -> None:
    """Add the process's executable when it is a Go program with crypto/tls, or has OpenSSL
    (or BoringSSL) linked in with its SSL functions in its own symbol table."""
    exe = f"{base}/exe"
    try:
        stat = os.stat(exe)
        path = os.readlink(exe)
    except OSError:
        return  # a kernel thread, gone, or not ours to read
    if path.endswith(" (deleted)"):
        return  # replaced on disk
    key = (stat.st_dev, stat.st_ino)
    library = libraries.get(key)
    if library is None:
        found = GO_BINARIES.lookup(exe, stat)
        if found is None:
            return
        # /proc/<pid>/exe reaches the file whatever mount namespace the process is in.
        if isinstance(found, StaticSsl):
            library = TlsLibrary(path, exe, "openssl", "static")
        else:
            library = TlsLibrary(path, exe, "go", found.version, go=found)
        libraries[key] = library
    library.pids.add(pid)


def pids(proc: Path = Path("/proc")) -> set[int]:
    try:
        return {int(name) for name in os.listdir(proc) if name.isdigit()}
    except OSError:
        return set()


def scan(proc: Path = Path("/proc"), exclude: frozenset[int] = frozenset()) -> dict[LibraryKey, TlsLibrary]:
    """Every TLS library mapped on this machine, with its processes."""
    libraries: dict[LibraryKey, TlsLibrary] = {}
    for pid in sorted(pids(proc) - exclude):
        scan_process(proc, pid, libraries)
    return libraries


def comm(proc: Path, pid: int) -> str:
    try:
        return (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def pod_uid(proc: Path, pid: int) -> str:
    """The UID of the Kubernetes pod a process runs in, from its cgroup; "" outside any pod."""
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError:
        return ""
    match = POD_UID.search(text)
    return match.group(1).replace("_", "-") if match else ""


def pod_name(proc: Path, pid: int) -> str:
    """The name of the pod a process runs in; "" outside any pod or when it cannot be read.

    The kubelet gives each container the pod's hostname as /etc/hostname, which is the pod's
    name unless the pod sets spec.hostname (then that is shown); it is read through
    /proc/<pid>/root, so the collector needs no access to the API server nor kubelet's files."""
    if not pod_uid(proc, pid):
        return ""
    try:
        with open(proc / str(pid) / "root" / "etc" / "hostname", "rb") as file:
            text = file.read(256)
    except OSError:
        return ""
    name = text.decode("utf-8", "replace").strip()
    # A DNS-1123 name; anything else is not what the kubelet wrote.
    return name if re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", name) else ""
