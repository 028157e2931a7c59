"""TLS plaintext capture: eBPF uprobes on OpenSSL, chunks published as `TlsChunkBatch`es.

The eBPF program (`bpf/tls_openssl.c`) is compiled by bcc at start. bcc is Debian's
`python3-bpfcc` (the PyPI package named `bcc` is an unrelated library): it is imported as
installed for Debian's python3, from /usr/lib/python3/dist-packages, and only that package is
taken from there (`import_bcc`), so the virtualenv's other packages are not shadowed by
Debian's copies. bcc needs the kernel's headers (`/lib/modules/<release>/build`) and tracefs.

Threads: bcc's ring buffer poll blocks, so one thread (`TlsTracer`, owned by `TlsCapture`)
polls it, resolves each chunk's (pid, fd) to its TCP connection (`tls_sockets`) and rescans
for TLS libraries (`tls_targets`); it hands finished `TlsChunk`s to the event loop, which
batches them and publishes on `trawl.v1.tls.<node>` (core NATS, sequenced from 1).

Direction and endpoints: a chunk's `src` is the side that wrote the bytes and `dst` the side
that read them, as in a packet (the writing process's SSL_write is EGRESS with src = its own
end; a reading process's SSL_read is INGRESS with dst = its own end). The dissector orients
client and server from the content.

Loss: every chunk that does not reach a batch is counted by reason (the kernel ring was full,
the table of calls in flight was full, the buffer could not be read, no TCP socket for the fd,
the queue toward NATS was full, a publish failed); `lost_chunks` of each batch is the running
total since the collector started, so a receiver counts what it missed from any later batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import ipaddress
import json
import os
import platform
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from trawl.bus import control_subject, tls_subject
from trawl.collector.capabilities import (
    CAP_NET_RAW,
    effective_capabilities,
    missing_capabilities,
    required_capabilities,
)
from trawl.collector.tls_go import READ, REGISTER_ABI, STACK_ABI, WRITE
from trawl.collector.tls_settings import TlsUprobeSettings
from trawl.collector.tls_sockets import Endpoints, SocketResolver
from trawl.collector.tls_targets import LibraryKey, TlsLibrary, comm, pids, pod_name, pod_uid, scan, scan_process
from trawl.logs import get_logger
from trawl.metrics import Registry
from trawl.v1.packets_pb2 import Direction, TlsChunk, TlsChunkBatch

log = get_logger(__name__)

# bpf/ of the repository, through the package's bpf link (an installed package holds a copy).
BPF_SOURCE = Path(__file__).resolve().parent / "bpf" / "tls_openssl.c"
DEBIAN_DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")
STATUS_SUBJECT = control_subject("tls", "status")

# struct chunk's header in bpf/tls_openssl.c (struct tuple inside it).
HEADER = struct.Struct("<QQIIIIIIBBBBHHH2x16s16s16s")
AF_INET = 2
KIND_DATA, KIND_CLOSE, KIND_EXEC = 0, 1, 2
FD_UNKNOWN = 0xFFFFFFFF
# The slots of the program's `lost` array, in order.
KERNEL_LOSS = ("ring_full", "ring_full_bytes", "calls_table_full", "read_fault", "truncated_bytes")
# (symbol, entry program, return program); the _ex forms give the count through a pointer.
PROBES = (
    ("SSL_read", "enter_read", "leave_plain"),
    ("SSL_write", "enter_write", "leave_plain"),
    ("SSL_read_ex", "enter_read_ex", "leave_ex"),
    ("SSL_write_ex", "enter_write_ex", "leave_ex"),
)
# Go's crypto/tls, by calling convention: (function, entry program); every RET of each runs
# the ABI's GO_LEAVE program.
GO_PROBES = {
    REGISTER_ABI: {WRITE: "enter_go_write", READ: "enter_go_read"},
    STACK_ABI: {WRITE: "enter_go_write_stack", READ: "enter_go_read_stack"},
}
GO_LEAVE = {REGISTER_ABI: "leave_go", STACK_ABI: "leave_go_stack"}
# The program's LIBRARY_* values, as TlsChunk.library names them.
LIBRARIES = {0: "openssl", 1: "go"}
# The reader's timer: at most this long between a chunk and its reading.
POLL_MS = 20
# How long poll holds a chunk back for an older one still to come (a writer's chunk is sent
# when its call returns, which can be after the peer's answer was read).
REORDER_NS = 50_000_000
# A new program maps its libraries after exec: look at it after these delays.
EXEC_RESCAN_DELAYS_S = (0.05, 0.25, 1.0, 3.0)


TRACEFS_ROOTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def _ip_text(family: int, raw: bytes) -> str:
    """An address of the program's tuple as text; IPv4-mapped IPv6 as IPv4, as its packets carry it."""
    if family == AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    address = ipaddress.IPv6Address(raw)
    return str(address.ipv4_mapped or address)


class TlsUnavailable(Exception):
    """BPF cannot be used here; the message says why and what to do."""


def import_bcc() -> ModuleType:
    """Debian's bcc module, without putting the rest of Debian's dist-packages on sys.path."""
    if "bcc" in sys.modules:
        return sys.modules["bcc"]
    init = DEBIAN_DIST_PACKAGES / "bcc" / "__init__.py"
    if not init.exists():
        raise TlsUnavailable("bcc is not installed: apt-get install python3-bpfcc (never PyPI's 'bcc')")
    spec = importlib.util.spec_from_file_location("bcc", init, submodule_search_locations=[str(init.parent)])
    if spec is None or spec.loader is None:
        raise TlsUnavailable(f"cannot import bcc from {init}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bcc"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # libbcc.so missing or of another version: say so, do not crash
        del sys.modules["bcc"]
        raise TlsUnavailable(f"bcc does not load: {exc}") from exc
    return module


def prepare_tracefs() -> None:
    """bcc attaches tracepoints through tracefs: mount it where the kernel offers it and it is
    not mounted yet (a container's /sys often lacks it). bcc reads the path at import."""
    tracing = Path("/sys/kernel/tracing")
    if (tracing / "events").is_dir() or Path("/sys/kernel/debug/tracing/events").is_dir():
        return
    result = subprocess.run(
        ["mount", "-t", "tracefs", "tracefs", str(tracing)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0 or not (tracing / "events").is_dir():
        raise TlsUnavailable(
            f"tracefs is not mounted at {tracing} and mounting it failed"
            f" ({result.stderr.strip() or result.returncode});"
            " run privileged or mount it: mount -t tracefs tracefs /sys/kernel/tracing"
        )


def check_kernel() -> None:
    """What bcc needs that can be checked before it tries: root, ring buffers, headers."""
    needed = required_capabilities(pod_loopback=False, tls_uprobes=True)
    del needed[CAP_NET_RAW]
    try:
        missing = missing_capabilities(effective_capabilities(Path("/proc/self/status").read_text()), needed)
    except (OSError, ValueError) as exc:
        raise TlsUnavailable(f"no permission: cannot read this process's capabilities ({exc})") from exc
    if missing:
        raise TlsUnavailable(
            "no permission: missing " + ", ".join(missing) + "; run the collector privileged (or as root)"
        )
    release = platform.release()
    numbers = [int(part) for part in release.split("-")[0].split(".")[:2] if part.isdigit()]
    if len(numbers) == 2 and tuple(numbers) < (5, 8):
        raise TlsUnavailable(f"kernel too old: {release} has no BPF ring buffer (5.8 or later)")
    build = Path("/lib/modules") / release / "build"
    if not (build / "include").is_dir() and not Path("/sys/kernel/kheaders.tar.xz").exists():
        raise TlsUnavailable(
            f"kernel headers missing: {build} does not exist; install linux-headers-amd64 and point"
            f" {build} and .../source at /usr/src/linux-headers-*-amd64 and -common (make system-deps does)"
        )


def availability() -> str | None:
    """None when eBPF uprobes can be loaded here, else why not."""
    try:
        check_kernel()
        prepare_tracefs()
        import_bcc()
    except TlsUnavailable as exc:
        return str(exc)
    return None


@dataclass(slots=True)
class RawChunk:
    """A data event as the program sent it."""

    pid: int
    tid: int
    fd: int
    ts_ns: int  # CLOCK_MONOTONIC
    direction: int
    comm: str
    data: bytes
    truncated: int
    library: str  # "openssl" or "go"
    # Resolved as the event is read, before a later close event of the same fd is: a process
    # that closes and exits right after its last call is still resolved.
    ends: Endpoints | None


@dataclass(slots=True)
class _Hook:
    library: TlsLibrary
    symbols: list[str]
    error: str
    addresses: list[int] = field(default_factory=list)  # Go: each address a uprobe is on


class TlsTracer:
    """The eBPF side: programs loaded, libraries hooked, events read. Not thread-safe: one
    thread uses it (TlsCapture's)."""

    def __init__(
        self, settings: TlsUprobeSettings, proc: Path = Path("/proc"), exclude_pids: frozenset[int] = frozenset()
    ) -> None:
        self.settings = settings
        self.proc = proc
        self.exclude = exclude_pids
        self.resolver = SocketResolver(proc)
        self.hooks: dict[LibraryKey, _Hook] = {}
        self.bpf: Any = None
        self._events: list[RawChunk] = []
        self._pending: list[RawChunk] = []  # read, held back by poll for ordering
        self._execs: list[tuple[float, int]] = []  # (due monotonic time, pid)
        self.no_tuple = 0  # chunks whose addresses came from /proc

    def load(self) -> None:
        check_kernel()
        prepare_tracefs()
        bcc = import_bcc()
        settings = self.settings
        cflags = [
            f"-DCHUNK_MAX={settings.chunk_bytes}",
            f"-DSEGMENTS_MAX={settings.chunks_per_call}",
            f"-DRING_PAGES={settings.ring_pages}",
        ]
        # The library is hooked for every process that maps it, this one too: its own TLS
        # (to NATS) is skipped in the program. Only the host's PID namespace sees it so.
        cflags.append(f"-DSELF_PID={os.getpid()}")
        if any(Path(root, "events/sock/sock_send_length").is_dir() for root in TRACEFS_ROOTS):
            cflags.append("-DHAVE_SOCK_LENGTH")
        try:
            self.bpf = bcc.BPF(src_file=str(BPF_SOURCE).encode(), cflags=cflags)
            self.bpf[b"chunks"].open_ring_buffer(self._on_event)
        except Exception as exc:  # bcc raises plain Exception for compile and load failures
            raise TlsUnavailable(f"BPF unavailable: the program did not load ({exc})") from exc

    def _on_event(self, _ctx: Any, data: Any, size: int) -> None:
        raw = ctypes.string_at(data, size)
        (
            ts_ns,
            _ssl,
            pid,
            tid,
            fd,
            length,
            _call_len,
            truncated,
            kind,
            direction,
            has_tuple,
            library,
            family,
            local_port,
            remote_port,
            local_addr,
            remote_addr,
            comm_raw,
        ) = HEADER.unpack_from(raw)
        if kind == KIND_CLOSE:
            self.resolver.forget(pid, fd)
            return
        if kind == KIND_EXEC:
            now = time.monotonic()
            self._execs.extend((now + delay, pid) for delay in EXEC_RESCAN_DELAYS_S)
            return
        comm_text = comm_raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        body = raw[HEADER.size : HEADER.size + length]
        ends: Endpoints | None
        if has_tuple:
            ends = Endpoints(_ip_text(family, local_addr), local_port, _ip_text(family, remote_addr), remote_port)
        else:
            # A connection established before the programs were loaded: its addresses from /proc.
            self.no_tuple += 1
            ends = None if fd == FD_UNKNOWN else self.resolver.resolve(pid, fd)
        self._events.append(
            RawChunk(
                pid, tid, fd, ts_ns, direction, comm_text, body, truncated, LIBRARIES.get(library, "openssl"), ends
            )
        )

    def poll(self, timeout_ms: int) -> list[RawChunk]:
        """Events of the ring (waiting at most timeout_ms for a wakeup), and due exec rescans.

        The program wakes the reader only every so many chunks: what came since is read by
        the consume after the poll's timeout."""
        self.bpf.ring_buffer_poll(timeout_ms)
        self.bpf.ring_buffer_consume()
        # In time order (a write is stamped at its entry, so its chunk can come after the
        # peer's answer to it); the youngest wait a little for an older chunk still on its way.
        events = sorted(self._pending + self._events, key=lambda event: event.ts_ns)
        self._events = []
        ripe = time.monotonic_ns() - REORDER_NS
        cut = len(events)
        while cut and events[cut - 1].ts_ns > ripe:
            cut -= 1
        events, self._pending = events[:cut], events[cut:]
        if self._execs:
            now = time.monotonic()
            due = {pid for when, pid in self._execs if when <= now}
            if due:
                self._execs = [(when, pid) for when, pid in self._execs if when > now]
                self.rescan(due)
        return events

    def drain(self) -> list[RawChunk]:
        """What `poll` still holds back, at the end."""
        self.bpf.ring_buffer_consume()
        events = sorted(self._pending + self._events, key=lambda event: event.ts_ns)
        self._pending, self._events = [], []
        return events

    def rescan(self, only: set[int] | None = None) -> None:
        """Hook TLS libraries not hooked yet; with `only`, look at those processes alone. A full
        scan also unhooks the libraries no process maps any more."""
        if only is None:
            found = scan(self.proc, self.exclude)
            for key, hook in list(self.hooks.items()):
                if key not in found:
                    self._detach(hook)
                    del self.hooks[key]
                    log.info("tls_library_unhooked", path=hook.library.path, reason="no process maps it")
            for key, hook in self.hooks.items():
                hook.library.pids = found[key].pids
            self.resolver.forget_pids(pids(self.proc))
        else:
            found = {}
            for pid in only - self.exclude:
                scan_process(self.proc, pid, found)
            for key, library in found.items():
                if key in self.hooks:
                    self.hooks[key].library.pids |= library.pids
        for key, library in found.items():
            if key not in self.hooks:
                self.hooks[key] = self._attach(library)
            hook = self.hooks[key]
            if hook.addresses:
                self._note_go_pids(library.pids)

    def _note_go_pids(self, go_pids: set[int]) -> None:
        """Processes of a hooked Go program: the program maps their sockets' fds to kernel
        sockets from now on, the TLS handshake's I/O included (the first Read after it often
        needs none, its bytes having come with the handshake's last record)."""
        table = self.bpf[b"go_pids"]
        for pid in go_pids:
            table[table.Key(pid)] = table.Leaf(1)

    def hook(self, key: LibraryKey, library: TlsLibrary) -> None:
        """Hook a library found otherwise than by a scan (a scan keeps its processes current)."""
        self.hooks[key] = self._attach(library)
        if self.hooks[key].addresses:
            self._note_go_pids(library.pids)

    def _attach(self, library: TlsLibrary) -> _Hook:
        if library.library == "go":
            return self._attach_go(library)
        hook = _Hook(library, [], "")
        path = library.reachable.encode()
        missing = []
        for symbol, entry, leave in PROBES:
            try:
                self.bpf.attach_uprobe(name=path, sym=symbol.encode(), fn_name=entry.encode())
                self.bpf.attach_uretprobe(name=path, sym=symbol.encode(), fn_name=leave.encode())
            except Exception:  # bcc: the symbol is not in this build (SSL_read_ex before 1.1.1)
                missing.append(symbol)
                continue
            hook.symbols.append(symbol)
        if not hook.symbols:
            hook.error = "no symbols: none of " + ", ".join(symbol for symbol, _, _ in PROBES) + " is exported"
            if library.library == "boringssl":
                hook.error += " (BoringSSL linked into grpcio and stripped)"
        log.info(
            "tls_library_hooked" if hook.symbols else "tls_library_not_hooked",
            path=library.path,
            version=library.version,
            symbols=hook.symbols,
            missing=missing,
            processes=len(library.pids),
        )
        return hook

    def _attach_go(self, library: TlsLibrary) -> _Hook:
        """A uprobe at the entry of (*Conn).Write and Read, and one at each of their RETs."""
        hook = _Hook(library, [], "")
        binary = library.go
        if binary is None or binary.error:
            hook.error = binary.error if binary is not None else "no symbols: crypto/tls not found"
        else:
            path = library.reachable.encode()
            entries, leave = GO_PROBES[binary.abi], GO_LEAVE[binary.abi].encode()
            try:
                for function in binary.functions:
                    self.bpf.attach_uprobe(name=path, addr=function.entry, fn_name=entries[function.name].encode())
                    hook.addresses.append(function.entry)
                    for address in function.returns:
                        self.bpf.attach_uprobe(name=path, addr=address, fn_name=leave)
                        hook.addresses.append(address)
                    hook.symbols.append(function.name)
            except Exception as exc:  # bcc: the file went away, or the kernel refused the probe
                self._detach(hook)
                hook.symbols, hook.addresses = [], []
                hook.error = f"uprobe refused: {exc}"
        log.info(
            "tls_library_hooked" if hook.symbols else "tls_library_not_hooked",
            path=library.path,
            library="go",
            version=library.version,
            abi=binary.abi if binary is not None else "",
            experiment=binary.experiment if binary is not None else "",
            symbols=hook.symbols,
            probes=len(hook.addresses),
            reason=hook.error,
            processes=len(library.pids),
        )
        return hook

    def _detach(self, hook: _Hook) -> None:
        path = hook.library.reachable.encode()
        for address in hook.addresses:
            with contextlib.suppress(Exception):
                self.bpf.detach_uprobe(name=path, addr=address)
        if hook.library.library == "go":
            return
        for symbol in hook.symbols:
            with contextlib.suppress(Exception):
                self.bpf.detach_uprobe(name=path, sym=symbol.encode())
            with contextlib.suppress(Exception):
                self.bpf.detach_uretprobe(name=path, sym=symbol.encode())

    def kernel_losses(self) -> dict[str, int]:
        values = self.bpf[b"lost"]
        return {name: int(sum(values[values.Key(slot)])) for slot, name in enumerate(KERNEL_LOSS)}

    def status(self) -> list[dict[str, Any]]:
        """One entry per process that maps a TLS library: hooked or not, and why not."""
        rows = []
        for hook in self.hooks.values():
            library = hook.library
            for pid in sorted(library.pids):
                rows.append(
                    {
                        "pid": pid,
                        "comm": comm(self.proc, pid),
                        "pod_uid": pod_uid(self.proc, pid),
                        "pod": pod_name(self.proc, pid),
                        "library": library.library,
                        "version": library.version,
                        "abi": library.go.abi if library.go is not None else "",
                        "path": library.path,
                        "hooked": bool(hook.symbols),
                        "symbols": hook.symbols,
                        "reason": hook.error,
                    }
                )
        return rows

    def close(self) -> None:
        if self.bpf is not None:
            for hook in self.hooks.values():
                self._detach(hook)
            self.bpf.cleanup()
            self.bpf = None


class TlsCapture:
    """The event loop's side: batches the tracer's chunks onto `trawl.v1.tls.<node>`."""

    def __init__(
        self,
        settings: TlsUprobeSettings,
        node: str,
        publish: Callable[[str, bytes], Any],
        metrics: Registry,
        proc: Path = Path("/proc"),
    ) -> None:
        self.settings = settings
        self.node = node
        self.publish = publish
        self.subject = tls_subject(node)
        # The collector's own TLS (to NATS) is not captured.
        self.tracer = TlsTracer(settings, proc, exclude_pids=frozenset({os.getpid()}))
        self.queue: deque[TlsChunk] = deque()
        self.wakeup = asyncio.Event()
        self.stop = threading.Event()
        self.sequence = 0
        self.lost: dict[str, int] = {}
        self.kernel_lost: dict[str, int] = {}
        self.chunks_sent = 0
        self.unavailable = ""
        self.started = False  # the programs loaded and the processes looked at, or found unusable
        self.wall_offset_ns = time.time_ns() - time.monotonic_ns()
        self._status: list[dict[str, Any]] = []
        self._exported_lost: dict[str, int] = {}
        self.metric_chunks = metrics.counter("trawl_collector_tls_chunks_total", "TLS plaintext chunks published")
        self.metric_bytes = metrics.counter("trawl_collector_tls_bytes_total", "TLS plaintext bytes published")
        self.metric_lost = metrics.counter(
            "trawl_collector_tls_lost_chunks_total", "TLS chunks lost before publishing, by reason"
        )
        self.metric_process = metrics.gauge(
            "trawl_collector_tls_hooked",
            "1 when the process's TLS library is hooked, 0 when not (see trawl tls status)",
        )
        self.metric_hooked = metrics.gauge(
            "trawl_collector_tls_processes", "Processes mapping a TLS library, by library and hooked (1) or not (0)"
        )

    # -- tracer thread -------------------------------------------------------------------------

    def _lose(self, reason: str, amount: int = 1) -> None:
        self.lost[reason] = self.lost.get(reason, 0) + amount

    def _convert(self, raw: RawChunk) -> TlsChunk | None:
        if raw.fd == FD_UNKNOWN:
            self._lose("no_fd")
            return None
        ends = raw.ends
        if ends is None:
            self._lose("no_tcp_socket")
            log.debug("tls_chunk_without_socket", pid=raw.pid, comm=raw.comm, fd=raw.fd, library=raw.library)
            return None
        ts_ns = raw.ts_ns + self.wall_offset_ns
        chunk = TlsChunk(pid=raw.pid, tid=raw.tid, comm=raw.comm, ts_ns=ts_ns, library=raw.library)
        if raw.direction == Direction.DIRECTION_EGRESS:
            chunk.src_ip, chunk.src_port, chunk.dst_ip, chunk.dst_port = (
                ends.local_ip,
                ends.local_port,
                ends.remote_ip,
                ends.remote_port,
            )
        else:
            chunk.src_ip, chunk.src_port, chunk.dst_ip, chunk.dst_port = (
                ends.remote_ip,
                ends.remote_port,
                ends.local_ip,
                ends.local_port,
            )
        chunk.direction = raw.direction  # type: ignore[assignment]
        chunk.data = raw.data
        chunk.truncated = raw.truncated
        return chunk

    def _thread(self, loop: asyncio.AbstractEventLoop) -> None:
        tracer = self.tracer
        next_scan = time.monotonic() + self.settings.scan_interval_s
        while not self.stop.is_set():
            try:
                events = tracer.poll(POLL_MS)
                chunks = [chunk for chunk in map(self._convert, events) if chunk is not None]
                if time.monotonic() >= next_scan:
                    tracer.rescan()
                    self._status = tracer.status()
                    next_scan = time.monotonic() + self.settings.scan_interval_s
                self.kernel_lost = tracer.kernel_losses()
            except Exception as exc:  # a bug here must not end the capture silently
                log.error("tls_tracer_failed", error=repr(exc), exc_info=exc)
                time.sleep(0.5)
                continue
            if chunks:
                loop.call_soon_threadsafe(self._accept, chunks)
        try:
            chunks = [chunk for chunk in map(self._convert, tracer.drain()) if chunk is not None]
        except Exception as exc:  # as above: logged, and the capture ends anyway
            log.error("tls_tracer_failed", error=repr(exc), exc_info=exc)
            return
        if chunks:
            loop.call_soon_threadsafe(self._accept, chunks)

    # -- event loop ----------------------------------------------------------------------------

    def _accept(self, chunks: list[TlsChunk]) -> None:
        room = self.settings.queue_max_chunks - len(self.queue)
        if room < len(chunks):
            self._lose("queue_full", len(chunks) - max(room, 0))
            chunks = chunks[: max(room, 0)]
        self.queue.extend(chunks)
        self.wakeup.set()

    def lost_total(self) -> int:
        kernel = self.kernel_lost
        return (
            sum(self.lost.values())
            + kernel.get("ring_full", 0)
            + kernel.get("calls_table_full", 0)
            + kernel.get("read_fault", 0)
        )

    async def _flush(self) -> None:
        settings = self.settings
        while self.queue:
            batch = TlsChunkBatch(node=self.node)
            size = 0
            while self.queue and len(batch.chunks) < settings.batch_max_chunks:
                chunk = self.queue[0]
                if batch.chunks and size + len(chunk.data) + 256 > settings.batch_max_bytes:
                    break
                self.queue.popleft()
                batch.chunks.append(chunk)
                size += len(chunk.data) + 128
            self.sequence += 1
            batch.sequence = self.sequence
            batch.lost_chunks = self.lost_total()
            try:
                await self.publish(self.subject, batch.SerializeToString())
            except Exception as exc:  # NATS away: the batch is lost, and counted
                self._lose("publish_failed", len(batch.chunks))
                log.warning("tls_publish_failed", chunks=len(batch.chunks), error=str(exc) or type(exc).__name__)
                continue
            self.chunks_sent += len(batch.chunks)
            self.metric_chunks.inc(len(batch.chunks))
            self.metric_bytes.inc(sum(len(chunk.data) for chunk in batch.chunks))

    def _export(self) -> None:
        for reason, value in {**self.lost, **self.kernel_lost}.items():
            exported = self._exported_lost.get(reason, 0)
            if value > exported:
                self.metric_lost.inc(value - exported, reason=reason)
                self._exported_lost[reason] = value
        # One series per process (and its pod), rebuilt from the last scan: ended ones go away.
        self.metric_process.values.clear()
        for row in self._status:
            self.metric_process.set(
                1 if row["hooked"] else 0,
                pid=str(row["pid"]),
                comm=row["comm"],
                pod_uid=row["pod_uid"],
                pod=row["pod"],
                library=f"{row['library']} {row['version']}".strip(),
                abi=row.get("abi", ""),
            )
        counts: dict[tuple[str, str], int] = {}
        for row in self._status:
            key = (row["library"] + row["version"], "1" if row["hooked"] else "0")
            counts[key] = counts.get(key, 0) + 1
        for (library, hooked), value in counts.items():
            self.metric_hooked.set(value, library=library, hooked=hooked)

    def status(self) -> dict[str, Any]:
        return {
            "node": self.node,
            # Until start() is through, no process list is complete: "loading", not a wrong "loaded".
            "bpf": self.unavailable or ("loaded" if self.started else "loading"),
            "processes": list(self._status),
            "chunks_published": self.chunks_sent,
            "lost": {**self.lost, **self.kernel_lost},
        }

    async def start(self, subscribe: Callable[..., Any] | None = None) -> None:
        """Load the programs and hook what runs now. BPF that cannot load raises TlsUnavailable
        with mode "on"; with "auto" it is logged and the status says why."""
        if subscribe is not None:
            await subscribe(STATUS_SUBJECT, cb=self._on_status_request)
        try:
            await asyncio.to_thread(self._load)
        except TlsUnavailable as exc:
            reason = str(exc)
            if self.settings.mode == "on":
                self.unavailable = reason
                raise
            log.warning("tls_uprobes_unavailable", reason=reason)
            # The status still names the processes that would be hooked, and why they are not:
            # the reason is published with that list, not before it (a status asked meanwhile
            # says "loading").
            self._status = await asyncio.to_thread(self._unhooked, reason)
            self.unavailable = reason
            self.started = True
            return
        self.started = True
        log.info("tls_uprobes_loaded", libraries=len(self.tracer.hooks), processes=len(self._status))

    async def pump(self, stopping: asyncio.Event) -> None:
        """Publish the chunks until `stopping`; then the rest, and unhook."""
        if self.unavailable:
            await stopping.wait()
            return
        loop = asyncio.get_running_loop()
        thread = threading.Thread(target=self._thread, args=(loop,), name="trawl-tls-uprobes", daemon=True)
        thread.start()
        age = self.settings.batch_max_age_ms / 1000
        try:
            while not stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), timeout=age)
                self.wakeup.clear()
                if self.queue and len(self.queue) < self.settings.batch_max_chunks:
                    # Let a burst gather into one batch, up to the age bound.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), timeout=age)
                await self._flush()
                self._export()
        finally:
            self.stop.set()
            await asyncio.to_thread(thread.join, 5.0)
            # What the thread handed over last is in the loop's queue of callbacks: let it run.
            await asyncio.sleep(0)
            await self._flush()
            self._export()
            self.tracer.close()
            log.info(
                "tls_capture_stopped",
                chunks=self.chunks_sent,
                batches=self.sequence,
                lost=self.lost_total(),
                lost_by_reason={**self.lost, **self.kernel_lost},
            )

    def _unhooked(self, reason: str) -> list[dict[str, Any]]:
        proc = self.tracer.proc
        return [
            {
                "pid": pid,
                "comm": comm(proc, pid),
                "pod_uid": pod_uid(proc, pid),
                "pod": pod_name(proc, pid),
                "library": library.library,
                "version": library.version,
                "abi": library.go.abi if library.go is not None else "",
                "path": library.path,
                "hooked": False,
                "symbols": [],
                "reason": reason,
            }
            for library in scan(proc, self.tracer.exclude).values()
            for pid in sorted(library.pids)
        ]

    def _load(self) -> None:
        self.tracer.load()
        self.tracer.rescan()
        self._status = self.tracer.status()

    async def _on_status_request(self, msg: Any) -> None:
        await msg.respond(json.dumps(self.status()).encode())
