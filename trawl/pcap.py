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
# DLT_RAW as BSD tools and old captures wrote it into files (12 on most systems, 14 on OpenBSD)
# before LINKTYPE_RAW (101) existed; libpcap and Wireshark read both as raw IP.
LINKTYPE_RAW_HISTORICAL = frozenset({12, 14})
# The bits of the header's link-type field that are the link type (libpcap's LT_LINKTYPE); the
# others carry FCS information.
LINKTYPE_MASK = 0x03FFFFFF

# Every link type the dissector decodes (layers.PacketDecoder), historical raw IP included.
DECODED_LINK_TYPES = frozenset(
    {
        LINKTYPE_NULL,
        LINKTYPE_ETHERNET,
        LINKTYPE_RAW,
        LINKTYPE_LOOP,
        LINKTYPE_LINUX_SLL,
        LINKTYPE_IPV4,
        LINKTYPE_IPV6,
        LINKTYPE_LINUX_SLL2,
        *LINKTYPE_RAW_HISTORICAL,
    }
)

# libpcap's names (pcap_datalink_val_to_name, as tcpdump prints them) by the value a capture file
# holds, taken from libpcap 1.10 with its file-to-DLT mapping applied, plus LINKTYPE_USER0..15.
# fmt: off
LINKTYPE_NAMES: dict[int, str] = {
    0: "NULL", 1: "EN10MB", 6: "IEEE802", 7: "ARCNET", 8: "SLIP", 9: "PPP", 10: "FDDI", 50: "PPP_SERIAL",
    51: "PPP_ETHER", 99: "SYMANTEC_FIREWALL", 100: "ATM_RFC1483", 101: "RAW", 102: "SLIP_BSDOS", 103: "PPP_BSDOS",
    104: "C_HDLC", 105: "IEEE802_11", 106: "ATM_CLIP", 107: "FRELAY", 108: "LOOP", 109: "ENC", 113: "LINUX_SLL",
    114: "LTALK", 117: "PFLOG", 119: "PRISM_HEADER", 122: "IP_OVER_FC", 123: "SUNATM", 127: "IEEE802_11_RADIO",
    129: "ARCNET_LINUX", 130: "JUNIPER_MLPPP", 131: "JUNIPER_MLFR", 132: "JUNIPER_ES", 133: "JUNIPER_GGSN",
    134: "JUNIPER_MFR", 135: "JUNIPER_ATM2", 136: "JUNIPER_SERVICES", 137: "JUNIPER_ATM1",
    138: "APPLE_IP_OVER_IEEE1394", 139: "MTP2_WITH_PHDR", 140: "MTP2", 141: "MTP3", 142: "SCCP", 143: "DOCSIS",
    144: "LINUX_IRDA", 147: "USER0", 148: "USER1", 149: "USER2", 150: "USER3", 151: "USER4", 152: "USER5",
    153: "USER6", 154: "USER7", 155: "USER8", 156: "USER9", 157: "USER10", 158: "USER11", 159: "USER12",
    160: "USER13", 161: "USER14", 162: "USER15", 163: "IEEE802_11_RADIO_AVS", 164: "JUNIPER_MONITOR",
    165: "BACNET_MS_TP", 166: "PPP_PPPD", 167: "JUNIPER_PPPOE", 168: "JUNIPER_PPPOE_ATM", 169: "GPRS_LLC",
    170: "GPF_T", 171: "GPF_F", 174: "JUNIPER_PIC_PEER", 175: "ERF_ETH", 176: "ERF_POS", 177: "LINUX_LAPD",
    178: "JUNIPER_ETHER", 179: "JUNIPER_PPP", 180: "JUNIPER_FRELAY", 181: "JUNIPER_CHDLC", 182: "MFR",
    183: "JUNIPER_VP", 184: "A429", 185: "A653_ICM", 186: "USB_FREEBSD", 187: "BLUETOOTH_HCI_H4",
    188: "IEEE802_16_MAC_CPS", 189: "USB_LINUX", 190: "CAN20B", 191: "IEEE802_15_4_LINUX", 192: "PPI",
    193: "IEEE802_16_MAC_CPS_RADIO", 194: "JUNIPER_ISM", 195: "IEEE802_15_4", 196: "SITA", 197: "ERF", 198: "RAIF1",
    199: "IPMB_KONTRON", 200: "JUNIPER_ST", 201: "BLUETOOTH_HCI_H4_WITH_PHDR", 202: "AX25_KISS", 209: "IPMB_LINUX",
    215: "IEEE802_15_4_NONASK_PHY", 216: "LINUX_EVDEV", 219: "MPLS", 220: "USB_LINUX_MMAPPED", 221: "DECT",
    222: "AOS", 223: "WIHART", 224: "FC_2", 225: "FC_2_WITH_FRAME_DELIMS", 226: "IPNET", 227: "CAN_SOCKETCAN",
    228: "IPV4", 229: "IPV6", 230: "IEEE802_15_4_NOFCS", 231: "DBUS", 232: "JUNIPER_VS", 233: "JUNIPER_SRX_E2E",
    234: "JUNIPER_FIBRECHANNEL", 235: "DVB_CI", 236: "MUX27010", 237: "STANAG_5066_D_PDU", 238: "JUNIPER_ATM_CEMIC",
    239: "NFLOG", 240: "NETANALYZER", 241: "NETANALYZER_TRANSPARENT", 242: "IPOIB", 243: "MPEG_2_TS", 244: "NG40",
    245: "NFC_LLCP", 246: "PFSYNC", 247: "INFINIBAND", 248: "SCTP", 249: "USBPCAP", 250: "RTAC_SERIAL",
    251: "BLUETOOTH_LE_LL", 253: "NETLINK", 254: "BLUETOOTH_LINUX_MONITOR", 255: "BLUETOOTH_BREDR_BB",
    256: "BLUETOOTH_LE_LL_WITH_PHDR", 257: "PROFIBUS_DL", 258: "PKTAP", 259: "EPON", 260: "IPMI_HPM_2",
    261: "ZWAVE_R1_R2", 262: "ZWAVE_R3", 263: "WATTSTOPPER_DLM", 264: "ISO_14443", 265: "RDS", 266: "USB_DARWIN",
    267: "OPENFLOW", 268: "SDLC", 269: "TI_LLN_SNIFFER", 271: "VSOCK", 272: "NORDIC_BLE", 273: "DOCSIS31_XRA31",
    274: "ETHERNET_MPACKET", 275: "DISPLAYPORT_AUX", 276: "LINUX_SLL2", 278: "OPENVIZSLA", 279: "EBHSCR",
    280: "VPP_DISPATCH", 281: "DSA_TAG_BRCM", 282: "DSA_TAG_BRCM_PREPEND", 283: "IEEE802_15_4_TAP",
    284: "DSA_TAG_DSA", 285: "DSA_TAG_EDSA", 286: "ELEE", 287: "Z_WAVE_SERIAL", 288: "USB_2_0", 289: "ATSC_ALP",
}
# fmt: on


def normalise_link_type(link_type: int) -> int:
    """The link type a capture file's header (or pcapng interface) means: the FCS bits masked off
    and the historical raw-IP values read as LINKTYPE_RAW, so that everything past the reader
    (the compiled lane, the recorder's files) sees one value per link type."""
    link_type &= LINKTYPE_MASK
    return LINKTYPE_RAW if link_type in LINKTYPE_RAW_HISTORICAL else link_type


def link_type_text(link_type: int) -> str:
    """A link type as a user reads it: the number and, where libpcap knows it, its name."""
    name = LINKTYPE_NAMES.get(link_type)
    return f"{link_type} ({name})" if name else str(link_type)


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
