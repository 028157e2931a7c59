"""Classic pcap records: the payload format of `PacketBatch` and the recorder's files.

A record is a 16-byte little-endian header (ts_sec, ts_frac, incl_len, orig_len) followed by
incl_len bytes; ts_frac is microseconds, or nanoseconds in files with the nanosecond magic.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

RECORD_HEADER = struct.Struct("<IIII")
GLOBAL_HEADER = struct.Struct("<IHHiIII")
MAGIC_US = 0xA1B2C3D4
MAGIC_NS = 0xA1B23C4D

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276


class Record(NamedTuple):
    ts_ns: int
    data: bytes
    orig_len: int


def pack_record(ts_ns: int, data: bytes, orig_len: int | None = None, nanosecond: bool = True) -> bytes:
    seconds, frac_ns = divmod(ts_ns, 1_000_000_000)
    frac = frac_ns if nanosecond else frac_ns // 1000
    length = len(data)
    return RECORD_HEADER.pack(seconds, frac, length, length if orig_len is None else orig_len) + data


def iter_records(payload: bytes, nanosecond: bool) -> Iterator[Record]:
    """Walk a batch payload; raises ValueError on a record that runs past the end."""
    scale = 1 if nanosecond else 1000
    offset = 0
    end = len(payload)
    unpack = RECORD_HEADER.unpack_from
    while offset < end:
        if offset + 16 > end:
            raise ValueError(f"truncated pcap record header at offset {offset}")
        seconds, frac, incl, orig = unpack(payload, offset)
        offset += 16
        if offset + incl > end:
            raise ValueError(f"pcap record at offset {offset - 16} claims {incl} bytes, {end - offset} remain")
        yield Record(seconds * 1_000_000_000 + frac * scale, payload[offset : offset + incl], orig)
        offset += incl


def global_header(link_type: int, snaplen: int = 262144, nanosecond: bool = False) -> bytes:
    return GLOBAL_HEADER.pack(MAGIC_NS if nanosecond else MAGIC_US, 2, 4, 0, 0, snaplen, link_type)
