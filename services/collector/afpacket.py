"""AF_PACKET capture through a TPACKET_V3 memory-mapped ring.

One `PacketRing` is one packet socket bound to one interface, with its own RX ring of
`block_count` blocks of `block_size` bytes. The kernel fills a block with frames and hands it
over when it is full or `retire_timeout_ms` after its first frame; `drain()` takes every ready
block in one call and returns them as classic pcap records (nanosecond timestamps), ready to
be a `PacketBatch.records`. The conversion is the compiled `_ring.drain` (see _ring.c); the
pure-Python `drain_blocks_py` below does the same and is used only when the extension was not
built, which is logged once because it cannot keep up with line rate.

Link layer: a socket on one Ethernet (or loopback) device is SOCK_RAW and yields
LINKTYPE_ETHERNET records; a "cooked" socket (SOCK_DGRAM: the `any` device, a set of pod
interfaces, or a device without an Ethernet header) yields LINKTYPE_LINUX_SLL2 records whose
header carries the interface index, packet type and link-layer source address.

Shards: N sockets on the same device joined into one PACKET_FANOUT group with
PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG. The kernel's fanout hash is the symmetric
flow hash, so both directions of a flow land on the same socket, i.e. the same shard; with
the same N on every device, a flow seen on two devices also lands on the same shard index.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from trawl.collector.bpf_filter import FilterProgram
from trawl.errors import ConfigError
from trawl.logs import get_logger
from trawl.pcap import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL2

log = get_logger(__name__)

DrainFunction = Callable[[mmap.mmap, int, int, int, int, bool], tuple[bytes, int, int, int]]


def _load_compiled() -> DrainFunction | None:
    try:
        from trawl.collector._ring import drain
    except ImportError:  # pragma: no cover - when the C extension was not built
        return None
    return drain


compiled_drain = _load_compiled()

SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_FANOUT = 18
TPACKET_V3 = 2
PACKET_FANOUT_HASH = 0
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000
PACKET_FANOUT_FLAG_DEFRAG = 0x8000
ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
SIOCGIFHWADDR = 0x8927
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
TP_STATUS_USER = 1
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
CLONE_NEWNET = 0x40000000

TPACKET3_HDR = struct.Struct("=IIIIIIHHIIH")  # tpacket3_hdr up to the variant (hv1)
SOCKADDR_LL = struct.Struct("=HHiHBB8s")
FRAME_SOCKADDR_OFFSET = 48  # TPACKET_ALIGN(sizeof(struct tpacket3_hdr))
BLOCK_DESC = struct.Struct("=IIIIII")  # version, offset_to_priv, block_status, num_pkts, offset_to_first_pkt, blk_len
RECORD_HEADER = struct.Struct("<IIII")
TPACKET_STATS_V3 = struct.Struct("=III")
TPACKET_REQ3 = struct.Struct("=IIIIIII")


@dataclass(frozen=True)
class RingGeometry:
    """The shape of one socket's RX ring; memory per socket = block_size * block_count."""

    block_size: int = 1 << 20
    block_count: int = 64
    frame_size: int = 2048
    retire_timeout_ms: int = 50

    def validate(self) -> None:
        page = mmap.PAGESIZE
        if self.block_size <= 0 or self.block_size % page:
            raise ConfigError(f"ring.block_size {self.block_size} must be a positive multiple of the page size {page}")
        if self.frame_size < 128 or self.frame_size % 16 or self.frame_size > self.block_size:
            raise ConfigError(
                f"ring.frame_size {self.frame_size} must be a multiple of 16, at least 128 and at most block_size"
            )
        if self.block_count <= 0:
            raise ConfigError("ring.block_count must be at least 1")


@dataclass
class KernelCounters:
    """PACKET_STATISTICS summed since the socket opened (the kernel resets them on each read)."""

    packets: int = 0
    drops: int = 0
    freeze_count: int = 0

    def add(self, other: KernelCounters) -> None:
        self.packets += other.packets
        self.drops += other.drops
        self.freeze_count += other.freeze_count


@dataclass(frozen=True)
class Drained:
    records: bytes
    packets: int
    blocks: int


def drain_blocks_py(
    ring: mmap.mmap, block_size: int, block_count: int, start: int, max_blocks: int, cooked: bool
) -> tuple[bytes, int, int, int]:
    """Pure-Python equivalent of `_ring.drain` (same arguments and result), for when the
    extension is missing. It costs microseconds per packet."""
    view = memoryview(ring)
    parts: list[bytes] = []
    packets = 0
    taken = 0
    while taken < max_blocks and taken < block_count:
        base = ((start + taken) % block_count) * block_size
        _, _, status, count, offset, _ = BLOCK_DESC.unpack_from(view, base)
        if not status & TP_STATUS_USER:
            break
        for _ in range(count):
            if offset + FRAME_SOCKADDR_OFFSET + SOCKADDR_LL.size > block_size:
                break
            frame = base + offset
            next_offset, sec, nsec, snaplen, length, tp_status, mac, _net, _hash, tci, tpid = TPACKET3_HDR.unpack_from(
                view, frame
            )
            if mac + snaplen > block_size - offset:
                break
            data = bytes(view[frame + mac : frame + mac + snaplen])
            tci &= 0xFFFF
            vlan = bool(tp_status & TP_STATUS_VLAN_VALID or tci)
            tag_type = tpid if tp_status & TP_STATUS_VLAN_TPID_VALID and tpid else 0x8100
            if cooked:
                _family, protocol, ifindex, hatype, pkttype, halen, addr = SOCKADDR_LL.unpack_from(
                    view, frame + FRAME_SOCKADDR_OFFSET
                )
                halen = min(halen, 8)
                wire_protocol = struct.pack("=H", protocol)
                header = (
                    (struct.pack(">H", tag_type) if vlan else wire_protocol)
                    + b"\0\0"
                    + struct.pack(">IHBB", ifindex & 0xFFFFFFFF, hatype, pkttype, halen)
                    + addr[:halen].ljust(8, b"\0")
                )
                if vlan:
                    header += struct.pack(">H", tci) + wire_protocol
                data = header + data
                extra = len(header)
            elif vlan and snaplen >= 12:
                data = data[:12] + struct.pack(">HH", tag_type, tci) + data[12:]
                extra = 4
            else:
                extra = 0
            parts.append(RECORD_HEADER.pack(sec, nsec, len(data), length + extra) + data)
            packets += 1
            if next_offset == 0 or next_offset < mac + snaplen:  # the last frame, or an offset inside this one
                break
            offset += next_offset
        struct.pack_into("=I", view, base + 8, 0)
        taken += 1
    view.release()
    return b"".join(parts), packets, (start + taken) % block_count, taken


_warned_fallback = False


def _drain_function() -> DrainFunction:
    global _warned_fallback
    if compiled_drain is not None:
        return compiled_drain
    if not _warned_fallback:
        _warned_fallback = True
        log.warning("ring_extension_missing", hint="pip install -e . builds trawl.collector._ring; using pure Python")
    return drain_blocks_py


def hardware_type(interface: str) -> int:
    """The ARPHRD_* type of an interface in the current network namespace."""
    request = struct.pack("16s16x", interface.encode()[:15])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            answer = fcntl.ioctl(probe.fileno(), SIOCGIFHWADDR, request)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise ConfigError(f"no interface named {interface!r} (see `ip link`)") from None
            raise ConfigError(f"interface {interface!r}: {exc.strerror}") from None
    family: int = struct.unpack_from("=H", answer, 16)[0]
    return family


def has_ethernet_header(interface: str) -> bool:
    return hardware_type(interface) in (ARPHRD_ETHER, ARPHRD_LOOPBACK)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@contextlib.contextmanager
def network_namespace(path: Path | None) -> Iterator[None]:
    """Run the body with this thread in another network namespace (`/run/netns/NAME`,
    `/proc/PID/ns/net`), then come back. Sockets created inside stay in that namespace."""
    if path is None:
        yield
        return
    try:
        target = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"network namespace {path}: {exc.strerror}") from None
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise ConfigError(f"cannot enter network namespace {path}: {os.strerror(err)} (needs CAP_SYS_ADMIN)")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - returning home cannot fail as root
                raise OSError(ctypes.get_errno(), "cannot return to the collector's network namespace")
    finally:
        os.close(target)
        os.close(own)


class PacketRing:
    """One AF_PACKET socket with a TPACKET_V3 RX ring, bound to one interface (or `any`)."""

    def __init__(
        self,
        interface: str,
        geometry: RingGeometry,
        *,
        cooked: bool,
        netns: Path | None = None,
    ) -> None:
        geometry.validate()
        self.interface = interface
        self.geometry = geometry
        self.cooked = cooked
        self.netns = netns
        self.link_type = LINKTYPE_LINUX_SLL2 if cooked else LINKTYPE_ETHERNET
        self.counters = KernelCounters()
        self._next_block = 0
        self._drain = _drain_function()
        with network_namespace(netns):
            self.ifindex = 0 if interface == "any" else _ifindex(interface)
            kind = socket.SOCK_DGRAM if cooked else socket.SOCK_RAW
            # Protocol 0: the socket receives nothing until bind(), so no packet passes before the filter is set.
            self.sock = socket.socket(socket.AF_PACKET, kind, 0)
        try:
            self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            frames = geometry.block_size // geometry.frame_size * geometry.block_count
            request = TPACKET_REQ3.pack(
                geometry.block_size,
                geometry.block_count,
                geometry.frame_size,
                frames,
                geometry.retire_timeout_ms,
                0,
                0,
            )
            self.sock.setsockopt(SOL_PACKET, PACKET_RX_RING, request)
            self.ring = mmap.mmap(
                self.sock.fileno(),
                geometry.block_size * geometry.block_count,
                mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except OSError as exc:
            self.sock.close()
            raise ConfigError(
                f"cannot set up a {geometry.block_count} x {geometry.block_size} byte ring on {interface}: "
                f"{exc.strerror}"
            ) from None
        self.bound = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def set_filter(self, program: FilterProgram) -> None:
        """Attach a classic BPF program; the kernel replaces the previous one atomically."""
        # `program` stays referenced during the call: the sock_fprog bytes point into its instruction array.
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, program.sock_fprog())
        except OSError as exc:
            raise ConfigError(f"the kernel refused filter {program.expression!r}: {exc.strerror}") from None

    def bind(self) -> None:
        """Start receiving (call after set_filter)."""
        # Through libc: Python's AF_PACKET address takes an interface name, and `any` is ifindex 0, which has none.
        address = SOCKADDR_LL.pack(socket.AF_PACKET, socket.htons(ETH_P_ALL), self.ifindex, 0, 0, 0, b"")
        if _libc.bind(self.sock.fileno(), address, len(address)) != 0:
            reason = os.strerror(ctypes.get_errno())
            raise ConfigError(f"cannot bind a packet socket to {self.interface}: {reason}")
        self.bound = True

    def join_fanout(self, group_id: int | None) -> int:
        """Join (group_id) or create (None) a hash fanout group on this device; returns the group id."""
        flags = PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG
        # The first socket asks the kernel for an unused group id; the others join it.
        value = (flags | PACKET_FANOUT_FLAG_UNIQUEID) << 16 if group_id is None else (flags << 16) | group_id
        try:
            self.sock.setsockopt(SOL_PACKET, PACKET_FANOUT, struct.pack("=I", value))
        except OSError as exc:
            raise ConfigError(f"cannot join a fanout group on {self.interface}: {exc.strerror}") from None
        if group_id is None:
            group_id = self.sock.getsockopt(SOL_PACKET, PACKET_FANOUT) & 0xFFFF
        return group_id

    def drain(self, max_blocks: int | None = None) -> Drained:
        """Every ready block (at most max_blocks) as pcap records; the blocks go back to the kernel."""
        limit = self.geometry.block_count if max_blocks is None else max_blocks
        records, packets, self._next_block, blocks = self._drain(
            self.ring, self.geometry.block_size, self.geometry.block_count, self._next_block, limit, self.cooked
        )
        return Drained(records, packets, blocks)

    def pending_error(self) -> int:
        """The socket's pending error (ENETDOWN once its interface is gone), 0 if none."""
        error: int = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return error

    def read_statistics(self) -> KernelCounters:
        """Fold the kernel's counters since the last read into `counters` and return the totals."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, TPACKET_STATS_V3.size)
        packets, drops, freeze = TPACKET_STATS_V3.unpack(raw)
        self.counters.add(KernelCounters(packets, drops, freeze))
        return self.counters

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.ring.close()
        self.sock.close()


def _ifindex(interface: str) -> int:
    try:
        return socket.if_nametoindex(interface)
    except OSError:
        raise ConfigError(f"no interface named {interface!r} (see `ip link`)") from None


@dataclass
class FanoutSet:
    """N rings on one device, one per shard, sharing a hash fanout group."""

    interface: str
    rings: list[PacketRing]
    group_id: int | None

    @classmethod
    def open(
        cls,
        interface: str,
        shards: int,
        geometry: RingGeometry,
        *,
        cooked: bool,
        program: FilterProgram,
        netns: Path | None = None,
    ) -> FanoutSet:
        rings: list[PacketRing] = []
        group_id: int | None = None
        try:
            for _ in range(shards):
                ring = PacketRing(interface, geometry, cooked=cooked, netns=netns)
                rings.append(ring)
                ring.set_filter(program)
                ring.bind()
                if shards > 1:
                    group_id = ring.join_fanout(group_id)
        except BaseException:
            for ring in rings:
                ring.close()
            raise
        return cls(interface, rings, group_id)

    def set_filter(self, program: FilterProgram) -> None:
        for ring in self.rings:
            ring.set_filter(program)

    def close(self) -> None:
        for ring in self.rings:
            ring.close()
