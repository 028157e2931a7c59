"""Reading capture files for replay: classic pcap (either byte order, micro- or nanosecond
timestamps) and pcapng (section/interface/enhanced/simple packet blocks).

Both readers are written with `struct` rather than through dpkt because replay must hand
records on exactly (dpkt reports timestamps as floats, which loses nanoseconds) and because
a truncated file must yield every whole record before it and then say where it broke.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from trawl.errors import InputError
from trawl.pcap import MAGIC_NS, MAGIC_US

PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_IDB = 0x00000001
PCAPNG_SPB = 0x00000003
PCAPNG_EPB = 0x00000006
PCAPNG_OBSOLETE_PB = 0x00000002
BYTE_ORDER_MAGIC = 0x1A2B3C4D
IF_TSRESOL = 9
MAX_RECORD = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class CapturedPacket:
    ts_ns: int
    data: bytes
    orig_len: int
    link_type: int
    snaplen: int
    interface: str


class CaptureFile:
    """Iterate the packets of a pcap or pcapng file; `InputError` names the file and offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as handle:
                head = handle.read(4)
        except OSError as exc:
            raise InputError(f"cannot read capture: {exc.strerror}", path=path) from None
        if len(head) < 4:
            raise InputError("not a pcap or pcapng file: shorter than a file header", path=path)
        magic_le = struct.unpack("<I", head)[0]
        magic_be = struct.unpack(">I", head)[0]
        if magic_le == PCAPNG_SHB:
            self.format = "pcapng"
        elif MAGIC_US in (magic_le, magic_be) or MAGIC_NS in (magic_le, magic_be):
            self.format = "pcap"
        else:
            raise InputError(f"not a pcap or pcapng file (starts with 0x{head.hex()})", path=path)
        self.nanosecond = MAGIC_NS in (magic_le, magic_be)

    def packets(self) -> Iterator[CapturedPacket]:
        with self.path.open("rb") as handle:
            if self.format == "pcap":
                yield from self._pcap(handle)
            else:
                yield from self._pcapng(handle)

    def _truncated(self, offset: int, what: str) -> InputError:
        return InputError(f"truncated capture: {what} at byte offset {offset}", path=self.path)

    def _pcap(self, handle: BinaryIO) -> Iterator[CapturedPacket]:
        header = handle.read(24)
        if len(header) < 24:
            raise self._truncated(0, "file header cut short")
        order = "<" if struct.unpack("<I", header[:4])[0] in (MAGIC_US, MAGIC_NS) else ">"
        _, _, _, _, _, snaplen, link_type = struct.unpack(order + "IHHiIII", header)
        link_type &= 0x0FFFFFFF  # the top bits carry FCS information
        scale = 1 if self.nanosecond else 1000
        record = struct.Struct(order + "IIII")
        offset = 24
        while True:
            head = handle.read(16)
            if not head:
                return
            if len(head) < 16:
                raise self._truncated(offset, "record header cut short")
            seconds, frac, incl, orig = record.unpack(head)
            if incl > MAX_RECORD:
                raise InputError(f"corrupt capture: record at byte offset {offset} claims {incl} bytes", path=self.path)
            data = handle.read(incl)
            if len(data) < incl:
                raise self._truncated(offset, f"record of {incl} bytes has only {len(data)}")
            yield CapturedPacket(seconds * 1_000_000_000 + frac * scale, data, orig, link_type, snaplen, "")
            offset += 16 + incl

    def _pcapng(self, handle: BinaryIO) -> Iterator[CapturedPacket]:
        order = "<"
        interfaces: list[tuple[int, int, int, str]] = []  # link_type, snaplen, ticks per second, name
        offset = 0
        while True:
            head = handle.read(8)
            if not head:
                return
            if len(head) < 8:
                raise self._truncated(offset, "block header cut short")
            block_type = struct.unpack(order + "I", head[:4])[0]
            if block_type == PCAPNG_SHB:
                bom = handle.read(4)
                if len(bom) < 4:
                    raise self._truncated(offset, "section header cut short")
                order = "<" if struct.unpack("<I", bom)[0] == BYTE_ORDER_MAGIC else ">"
                length = struct.unpack(order + "I", head[4:])[0]
                body = bom + handle.read(max(0, length - 12))
                interfaces = []
            else:
                length = struct.unpack(order + "I", head[4:])[0]
                if length < 12 or length % 4 or length > MAX_RECORD:
                    raise InputError(f"corrupt pcapng block length {length} at byte offset {offset}", path=self.path)
                body = handle.read(length - 8)
            if len(body) < length - 8:
                raise self._truncated(offset, f"block of {length} bytes cut short")
            content = body[:-4]
            if block_type == PCAPNG_IDB:
                link_type, _, snaplen = struct.unpack_from(order + "HHI", content)
                tsresol, name = _idb_options(content[8:], order)
                interfaces.append((link_type, snaplen, tsresol, name))
            elif block_type in (PCAPNG_EPB, PCAPNG_OBSOLETE_PB):
                if block_type == PCAPNG_EPB:
                    if_id, ts_high, ts_low, caplen, orig = struct.unpack_from(order + "IIIII", content)
                else:
                    if_id, _drops, ts_high, ts_low, caplen, orig = struct.unpack_from(order + "HHIIII", content)
                if if_id >= len(interfaces) or 20 + caplen > len(content):
                    raise InputError(f"corrupt pcapng packet block at byte offset {offset}", path=self.path)
                link_type, snaplen, ticks, name = interfaces[if_id]
                ts = (ts_high << 32) | ts_low
                ts_ns = ts * 1_000_000_000 // ticks
                yield CapturedPacket(ts_ns, bytes(content[20 : 20 + caplen]), orig, link_type, snaplen, name)
            elif block_type == PCAPNG_SPB:
                if not interfaces:
                    raise InputError(f"pcapng simple packet block before any interface at {offset}", path=self.path)
                orig = struct.unpack_from(order + "I", content)[0]
                link_type, snaplen, _, name = interfaces[0]
                caplen = min(orig, snaplen or orig, len(content) - 4)
                yield CapturedPacket(0, bytes(content[4 : 4 + caplen]), orig, link_type, snaplen, name)
            offset += length


def _idb_options(options: bytes, order: str) -> tuple[int, str]:
    """Ticks per second (if_tsresol, default microseconds) and if_name of an interface block."""
    ticks = 1_000_000
    name = ""
    pos = 0
    while pos + 4 <= len(options):
        code, length = struct.unpack_from(order + "HH", options, pos)
        value = options[pos + 4 : pos + 4 + length]
        if code == 0:
            break
        if code == IF_TSRESOL and value:
            resol = value[0]
            ticks = 2 ** (resol & 0x7F) if resol & 0x80 else 10 ** (resol & 0x7F)
        elif code == 2:
            name = value.decode("utf-8", "replace")
        pos += 4 + length + (-length % 4)
    return ticks, name
