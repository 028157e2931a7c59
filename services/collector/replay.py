"""Reading capture files for replay: classic pcap (either byte order, micro- or nanosecond
timestamps) and pcapng (section/interface/enhanced/simple packet blocks).

Both readers are written with `struct` rather than through dpkt because replay must hand
records on exactly (dpkt reports timestamps as floats, which loses nanoseconds) and because
a truncated file must yield every whole record before it and then say where it broke.

`CaptureFile.batches` is what replay and `trawl analyze` use: the body of a little-endian
classic pcap file already is a run of `PacketBatch.records` (16-byte little-endian headers),
so it is read in big chunks and cut at record boundaries found by the compiled `_pcapfile.walk`
(a few ns a record; the per-packet path costs about 2 us a packet). Big-endian pcap and
pcapng files are converted packet by packet.

Link types are read as libpcap reads them (`trawl.pcap.normalise_link_type`: the historical raw-IP
values 12 and 14 become LINKTYPE_RAW), and a packet of a link type the dissector cannot decode is
a `LinkTypeError` naming it, raised where it is met: for a classic pcap file (one link type) and
for a pcapng file whose first packet has it, when the `CaptureFile` is made, so the CLI and the
collector's replay fail at start instead of reporting nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import BinaryIO

from trawl.errors import InputError
from trawl.pcap import (
    DECODED_LINK_TYPES,
    MAGIC_NS,
    MAGIC_US,
    RECORD_HEADER,
    link_type_text,
    normalise_link_type,
    pack_record,
)
from trawl.v1.packets_pb2 import PacketBatch

PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_IDB = 0x00000001
PCAPNG_SPB = 0x00000003
PCAPNG_EPB = 0x00000006
PCAPNG_OBSOLETE_PB = 0x00000002
BYTE_ORDER_MAGIC = 0x1A2B3C4D
IF_TSRESOL = 9
MAX_RECORD = 256 * 1024 * 1024
# Bytes asked of the file per read (at least two batches): big enough that the per-read Python is
# nothing per packet; 4 MiB reads measured 50% slower than these, the buffer leaving the CPU caches.
READ_SIZE = 512 << 10
MAX_RECORD_TS_NS = (1 << 32) * 1_000_000_000  # a record header holds 32-bit seconds

_Bytes = bytes | bytearray | memoryview


class LinkTypeError(InputError):
    """Packets of a link type the dissector cannot decode: reading on would report nothing."""

    def __init__(self, link_type: int, path: Path) -> None:
        self.link_type = link_type
        super().__init__(
            f"link type {link_type_text(link_type)} is not one Trawl decodes"
            " (it reads Ethernet, Linux cooked SLL and SLL2, raw IP, BSD loopback/null)",
            path=path,
        )


@dataclass(frozen=True, slots=True)
class CapturedPacket:
    ts_ns: int
    data: bytes
    orig_len: int
    link_type: int
    snaplen: int
    interface: str


@dataclass(frozen=True, slots=True)
class RecordBatch:
    """Whole packets of one link type and interface, as `PacketBatch.records` (little-endian pcap
    records; nanosecond or microsecond fractions as `nanosecond` says)."""

    records: bytes
    packet_count: int
    link_type: int
    snaplen: int
    interface: str
    nanosecond: bool
    first_ts_ns: int
    last_ts_ns: int

    def message(self, *, node: str, shard: int, sequence: int, source: str) -> PacketBatch:
        return PacketBatch(
            node=node,
            interface=self.interface,
            link_type=self.link_type,
            snaplen=self.snaplen,
            shard=shard,
            sequence=sequence,
            packet_count=self.packet_count,
            records=self.records,
            nanosecond=self.nanosecond,
            source=source,
        )


def walk_records_python(buffer: _Bytes, start: int, max_packets: int, max_bytes: int) -> tuple[int, int, int]:
    """`_pcapfile.walk` in Python (same arguments and result), for a checkout that was not compiled."""
    size = len(buffer)
    end = last = start
    count = 0
    while count < max_packets and end - start < max_bytes and size - end >= 16:
        incl = int.from_bytes(buffer[end + 8 : end + 12], "little")
        if incl > MAX_RECORD or size - end - 16 < incl:
            break
        last = end
        end += 16 + incl
        count += 1
    return count, end, last


try:
    from trawl.collector import _pcapfile
except ImportError:  # not compiled: correct, about 0.5 us a packet slower
    walk_records: Callable[[_Bytes, int, int, int], tuple[int, int, int]] = walk_records_python
else:
    walk_records = _pcapfile.walk


class CaptureFile:
    """Iterate the packets of a pcap or pcapng file; `InputError` names the file and offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as handle:
                header = handle.read(24)
        except OSError as exc:
            raise InputError(f"cannot read capture: {exc.strerror}", path=path) from None
        head = header[:4]
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
        if self.format == "pcap" and len(header) == 24:
            # A short header is reported where the packets are read (after nothing).
            self._check_link_type(struct.unpack("<I" if magic_le in (MAGIC_US, MAGIC_NS) else ">I", header[20:])[0])
        elif self.format == "pcapng":
            self._check_first_pcapng_packet()

    def _check_link_type(self, raw_link_type: int) -> int:
        """The normalised link type of a header field; `LinkTypeError` if the dissector cannot decode it."""
        link_type = normalise_link_type(raw_link_type)
        if link_type not in DECODED_LINK_TYPES:
            raise LinkTypeError(link_type, self.path)
        return link_type

    def _check_first_pcapng_packet(self) -> None:
        """Read up to the first packet so that its link type is checked now; damage before it is
        reported where the packets are read, as for any damage."""
        try:
            with self.path.open("rb") as handle:
                next(self._pcapng(handle), None)
        except LinkTypeError:
            raise
        except InputError:
            pass

    def packets(self) -> Iterator[CapturedPacket]:
        with self.path.open("rb") as handle:
            if self.format == "pcap":
                yield from self._pcap(handle)
            else:
                yield from self._pcapng(handle)

    def batches(self, max_packets: int = 4096, max_bytes: int = 1 << 20) -> Iterator[RecordBatch]:
        """The file's packets in batches closed at `max_packets` packets or once they reach
        `max_bytes` (as ShardBatcher closes them), and at a change of link type or interface.
        A damaged file yields every whole packet before the damage, then raises InputError."""
        if max_packets < 1 or max_bytes < 1:
            raise ValueError("max_packets and max_bytes must be positive")
        with self.path.open("rb") as handle:
            if self.format == "pcap":
                header = handle.read(24)
                if len(header) < 24:
                    raise self._truncated(0, "file header cut short")
                if struct.unpack("<I", header[:4])[0] in (MAGIC_US, MAGIC_NS):
                    yield from self._pcap_batches(handle, header, max_packets, max_bytes)
                    return
            handle.seek(0)
            source = self._pcap(handle) if self.format == "pcap" else self._pcapng(handle)
            yield from self._converted_batches(source, max_packets, max_bytes)

    def _pcap_batches(
        self, handle: BufferedReader, header: bytes, max_packets: int, max_bytes: int
    ) -> Iterator[RecordBatch]:
        """A little-endian classic pcap body, cut at record boundaries without touching the records."""
        _, _, _, _, _, snaplen, raw_link_type = struct.unpack("<IHHiIII", header)
        link_type = self._check_link_type(raw_link_type)
        nanosecond = self.nanosecond
        scale = 1 if nanosecond else 1000
        unpack = RECORD_HEADER.unpack_from
        walk = walk_records
        read_size = max(READ_SIZE, 2 * max_bytes)
        # Read into one reused buffer: a batch is copied once, into its own bytes, and only the start
        # of an unfinished batch moves when the buffer is refilled.
        buffer = bytearray(read_size)
        filled = 0  # bytes of `buffer` that hold file data
        pos = 0  # where the next batch starts in `buffer`
        base = 24  # file offset of buffer[0]
        eof = False
        while True:
            data = memoryview(buffer)[:filled]
            count, end, last = walk(data, pos, max_packets, max_bytes)
            full = count >= max_packets or end - pos >= max_bytes
            corrupt = not full and filled - end >= 16 and unpack(data, end)[2] > MAX_RECORD
            if count and (full or corrupt or eof):
                first_seconds, first_frac, _, _ = unpack(data, pos)
                last_seconds, last_frac, _, _ = unpack(data, last)
                yield RecordBatch(
                    data[pos:end].tobytes(),
                    count,
                    link_type,
                    snaplen,
                    "",
                    nanosecond,
                    first_seconds * 1_000_000_000 + first_frac * scale,
                    last_seconds * 1_000_000_000 + last_frac * scale,
                )
                pos = end
                if full:
                    data.release()
                    continue
            if corrupt:
                incl = unpack(data, end)[2]
                raise InputError(
                    f"corrupt capture: record at byte offset {base + end} claims {incl} bytes", path=self.path
                )
            if eof:
                left = filled - end
                if left == 0:
                    return
                if left < 16:
                    raise self._truncated(base + end, "record header cut short")
                incl = unpack(data, end)[2]
                raise self._truncated(base + end, f"record of {incl} bytes has only {left - 16}")
            # The batch needs bytes past the buffer: move its start to the front and read on (at least
            # the whole of a record bigger than the buffer).
            rest = filled - pos
            wanted = read_size
            if count == 0 and rest >= 16:
                wanted = max(wanted, 16 + unpack(data, pos)[2] - rest)
            data.release()
            if pos:
                buffer[:rest] = buffer[pos:filled]
            if len(buffer) < rest + wanted:
                buffer.extend(bytes(rest + wanted - len(buffer)))
            with memoryview(buffer) as view:
                got = handle.readinto(view[rest : rest + wanted])
            eof = not got
            base += pos
            filled = rest + got
            pos = 0

    def _converted_batches(
        self, packets: Iterator[CapturedPacket], max_packets: int, max_bytes: int
    ) -> Iterator[RecordBatch]:
        """Packets re-packed as little-endian records (big-endian pcap, pcapng), batched like ShardBatcher does."""
        nanosecond = self.format == "pcapng" or self.nanosecond
        parts: list[bytes] = []
        size = 0
        first_ts = last_ts = 0
        link_type, snaplen, interface = -1, 0, ""

        def cut() -> RecordBatch:
            return RecordBatch(
                b"".join(parts), len(parts), link_type, snaplen, interface, nanosecond, first_ts, last_ts
            )

        number = 0
        try:
            for packet in packets:
                number += 1
                if not 0 <= packet.ts_ns < MAX_RECORD_TS_NS or packet.orig_len > 0xFFFFFFFF:
                    raise InputError(
                        f"packet {number}: timestamp or length outside what a pcap record can hold", path=self.path
                    )
                if parts and (packet.link_type != link_type or packet.interface != interface):
                    yield cut()
                    parts, size = [], 0
                link_type, snaplen, interface = packet.link_type, packet.snaplen, packet.interface
                if not parts:
                    first_ts = packet.ts_ns
                last_ts = packet.ts_ns
                record = pack_record(packet.ts_ns, packet.data, packet.orig_len, nanosecond)
                parts.append(record)
                size += len(record)
                if len(parts) >= max_packets or size >= max_bytes:
                    yield cut()
                    parts, size = [], 0
        except InputError:
            if parts:  # damage ends the file: what was whole before it still goes out
                yield cut()
            raise
        if parts:
            yield cut()

    def _truncated(self, offset: int, what: str) -> InputError:
        return InputError(f"truncated capture: {what} at byte offset {offset}", path=self.path)

    def _pcap(self, handle: BinaryIO) -> Iterator[CapturedPacket]:
        header = handle.read(24)
        if len(header) < 24:
            raise self._truncated(0, "file header cut short")
        order = "<" if struct.unpack("<I", header[:4])[0] in (MAGIC_US, MAGIC_NS) else ">"
        _, _, _, _, _, snaplen, raw_link_type = struct.unpack(order + "IHHiIII", header)
        link_type = self._check_link_type(raw_link_type)
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
            try:
                packet = self._pcapng_block(block_type, body[:-4], order, interfaces, offset)
            except struct.error:  # a block too short for its own fixed fields
                raise InputError(f"corrupt pcapng block at byte offset {offset}", path=self.path) from None
            if packet is not None:
                yield packet
            offset += length

    def _pcapng_block(
        self, block_type: int, content: bytes, order: str, interfaces: list[tuple[int, int, int, str]], offset: int
    ) -> CapturedPacket | None:
        """One block's packet (None for other blocks); an interface block adds to `interfaces`."""
        if block_type == PCAPNG_IDB:
            link_type, _, snaplen = struct.unpack_from(order + "HHI", content)
            tsresol, name = _idb_options(content[8:], order)
            interfaces.append((normalise_link_type(link_type), snaplen, tsresol, name))
        elif block_type in (PCAPNG_EPB, PCAPNG_OBSOLETE_PB):
            if block_type == PCAPNG_EPB:
                if_id, ts_high, ts_low, caplen, orig = struct.unpack_from(order + "IIIII", content)
            else:
                if_id, _drops, ts_high, ts_low, caplen, orig = struct.unpack_from(order + "HHIIII", content)
            if if_id >= len(interfaces) or 20 + caplen > len(content):
                raise InputError(f"corrupt pcapng packet block at byte offset {offset}", path=self.path)
            link_type, snaplen, ticks, name = interfaces[if_id]
            if link_type not in DECODED_LINK_TYPES:
                raise LinkTypeError(link_type, self.path)
            ts = (ts_high << 32) | ts_low
            return CapturedPacket(
                ts * 1_000_000_000 // ticks, bytes(content[20 : 20 + caplen]), orig, link_type, snaplen, name
            )
        elif block_type == PCAPNG_SPB:
            if not interfaces:
                raise InputError(f"pcapng simple packet block before any interface at {offset}", path=self.path)
            orig = struct.unpack_from(order + "I", content)[0]
            link_type, snaplen, _, name = interfaces[0]
            if link_type not in DECODED_LINK_TYPES:
                raise LinkTypeError(link_type, self.path)
            caplen = min(orig, snaplen or orig, len(content) - 4)
            return CapturedPacket(0, bytes(content[4 : 4 + caplen]), orig, link_type, snaplen, name)
        return None


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
