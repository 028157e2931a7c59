"""tcpdump-style filter expressions compiled by libpcap into classic BPF for the kernel.

libpcap's own compiler is used through ctypes (`pcap_open_dead` + `pcap_compile`), so the
expression language and its error messages are exactly tcpdump's. The program is attached to
the packet sockets with SO_ATTACH_FILTER, which replaces the previous program atomically: a
socket never runs unfiltered while the filter changes, and a failed compile leaves the old
program in force.

Cooked sockets (SOCK_DGRAM, LINKTYPE_LINUX_SLL2 records) hand the filter packets that start at
the network header, while libpcap compiles for a 20-byte SLL2 header in front of it. As libpcap
does for its own cooked captures, loads past the header are shifted down by 20 bytes and loads
of SLL2 header fields become the kernel's ancillary loads (protocol, interface index, hardware
type, packet type).

On loopback every packet passes a packet socket twice (once sent, once received); like
libpcap, the program drops the sent copy there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import threading
from dataclasses import dataclass

from trawl.errors import ConfigError
from trawl.pcap import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL2

# Classic BPF opcodes (linux/bpf_common.h, linux/filter.h).
BPF_LD = 0x00
BPF_LDX = 0x01
BPF_RET = 0x06
BPF_JMP = 0x05
BPF_W = 0x00
BPF_H = 0x08
BPF_B = 0x10
BPF_ABS = 0x20
BPF_IND = 0x40
BPF_MSH = 0xA0
BPF_JEQ = 0x10
BPF_K = 0x00
SKF_AD_OFF = 0xFFFFF000  # -0x1000 as an unsigned 32-bit offset
SKF_AD_PROTOCOL = 0
SKF_AD_PKTTYPE = 4
SKF_AD_IFINDEX = 8
SKF_AD_HATYPE = 28
PACKET_OUTGOING = 4
SLL2_HEADER_LEN = 20
BPF_MAXINSNS = 4096
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF

# SLL2 header field offset -> the kernel's ancillary load that yields the same value.
_SLL2_FIELDS = {0: SKF_AD_PROTOCOL, 4: SKF_AD_IFINDEX, 8: SKF_AD_HATYPE, 10: SKF_AD_PKTTYPE}

Instruction = tuple[int, int, int, int]  # code, jt, jf, k


class _BpfInsn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_BpfInsn))]


class _Libpcap:
    """The few libpcap calls the compiler needs; loaded on first use."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("pcap") or "libpcap.so.0.8"
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            raise ConfigError(
                "libpcap is not installed (apt-get install libpcap0.8): needed to compile filters"
            ) from None
        lib.pcap_open_dead.restype = ctypes.c_void_p
        lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.pcap_compile.restype = ctypes.c_int
        lib.pcap_compile.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(_BpfProgram),
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_uint32,
        ]
        lib.pcap_geterr.restype = ctypes.c_char_p
        lib.pcap_geterr.argtypes = [ctypes.c_void_p]
        lib.pcap_freecode.restype = None
        lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
        lib.pcap_close.restype = None
        lib.pcap_close.argtypes = [ctypes.c_void_p]
        self.lib = lib
        # pcap_compile is not re-entrant in every libpcap release.
        self.lock = threading.Lock()

    def compile(self, expression: str, link_type: int, snaplen: int) -> list[Instruction]:
        with self.lock:
            handle = self.lib.pcap_open_dead(link_type, snaplen)
            if not handle:
                raise ConfigError(f"libpcap cannot compile for link type {link_type}")
            program = _BpfProgram()
            try:
                if self.lib.pcap_compile(handle, ctypes.byref(program), expression.encode(), 1, PCAP_NETMASK_UNKNOWN):
                    message = (self.lib.pcap_geterr(handle) or b"syntax error").decode(errors="replace")
                    raise ConfigError(f"bad filter {expression!r}: {message}")
                try:
                    return [
                        (insn.code, insn.jt, insn.jf, insn.k)
                        for insn in (program.bf_insns[i] for i in range(program.bf_len))
                    ]
                finally:
                    self.lib.pcap_freecode(ctypes.byref(program))
            finally:
                self.lib.pcap_close(handle)


_libpcap: _Libpcap | None = None


def _pcap() -> _Libpcap:
    global _libpcap
    if _libpcap is None:
        _libpcap = _Libpcap()
    return _libpcap


@dataclass(frozen=True)
class FilterProgram:
    """A classic BPF program for one kind of socket, ready for SO_ATTACH_FILTER."""

    expression: str
    instructions: tuple[Instruction, ...]

    def sock_fprog(self) -> bytes:
        """`struct sock_fprog` bytes; the instruction array lives as long as this object."""
        array = self._array()
        return struct.pack("HxxxxxxQ", len(self.instructions), ctypes.addressof(array))

    def _array(self) -> ctypes.Array[_BpfInsn]:
        cached = self.__dict__.get("_insns")
        if cached is None:
            cached = (_BpfInsn * len(self.instructions))(*(_BpfInsn(*insn) for insn in self.instructions))
            object.__setattr__(self, "_insns", cached)
        array: ctypes.Array[_BpfInsn] = cached
        return array

    def accepts_nothing(self) -> bool:
        return self.instructions == ((BPF_RET | BPF_K, 0, 0, 0),)


def reject_all(reason: str = "scope selects no address") -> FilterProgram:
    return FilterProgram(f"<{reason}>", ((BPF_RET | BPF_K, 0, 0, 0),))


def compile_filter(
    expression: str, *, cooked: bool, snaplen: int = 262144, loopback_ifindex: int | None = None
) -> FilterProgram:
    """Compile for a cooked (SLL2) or Ethernet socket; ConfigError carries libpcap's message.

    `loopback_ifindex`: drop the sent copy of packets on that interface (the loopback device;
    on a socket bound to lo itself, pass its index too).
    """
    link_type = LINKTYPE_LINUX_SLL2 if cooked else LINKTYPE_ETHERNET
    instructions = _pcap().compile(expression, link_type, snaplen)
    if cooked:
        instructions = [_uncook(insn, expression) for insn in instructions]
    if loopback_ifindex is not None:
        instructions = _skip_loopback_outgoing(loopback_ifindex) + instructions
    if len(instructions) > BPF_MAXINSNS:
        raise ConfigError(
            f"filter compiles to {len(instructions)} BPF instructions, more than the kernel's {BPF_MAXINSNS}: "
            "narrow the scope or simplify the expression"
        )
    return FilterProgram(expression, tuple(instructions))


def _uncook(insn: Instruction, expression: str) -> Instruction:
    code, jt, jf, k = insn
    klass = code & 0x07
    mode = code & 0xE0
    if klass not in (BPF_LD, BPF_LDX) or mode not in (BPF_ABS, BPF_IND, BPF_MSH):
        return insn
    if k >= SLL2_HEADER_LEN:
        return (code, jt, jf, k - SLL2_HEADER_LEN)
    if mode == BPF_ABS and k in _SLL2_FIELDS:
        return (code, jt, jf, SKF_AD_OFF + _SLL2_FIELDS[k])
    raise ConfigError(
        f"filter {expression!r} reads link-layer bytes a cooked capture does not have; "
        "capture on one Ethernet interface to filter on them"
    )


def _skip_loopback_outgoing(ifindex: int) -> list[Instruction]:
    # if ifindex == lo and pkttype == OUTGOING: return 0, else fall through to the user's program.
    return [
        (BPF_LD | BPF_W | BPF_ABS, 0, 0, SKF_AD_OFF + SKF_AD_IFINDEX),
        (BPF_JMP | BPF_JEQ | BPF_K, 0, 3, ifindex),
        (BPF_LD | BPF_B | BPF_ABS, 0, 0, SKF_AD_OFF + SKF_AD_PKTTYPE),
        (BPF_JMP | BPF_JEQ | BPF_K, 0, 1, PACKET_OUTGOING),
        (BPF_RET | BPF_K, 0, 0, 0),
    ]
