"""DNS over UDP and TCP: every query paired with its response, sans-IO.

Messages are decoded with dnspython (`dns.message.from_wire`); a message dnspython rejects
(a record cut by the snap length, an odd TSIG) still pairs on its header and question, which
this module reads itself, with a `malformed-records` note. Only a message whose header or
question cannot be read is a `ProtocolError`.

Pairing, within one flow: a query waits under (id, question) until the response with the same
id and question (names compared case-insensitively, so 0x20 case randomisation pairs) comes
back; a response without a question section (some FORMERR/REFUSED answers) pairs with the
oldest pending query of that id. Whether a message is a query or a response comes from its QR
bit, not from the flow's direction, so a flow whose first captured packet was a response still
pairs, and the call's `src` is always the side that asked. A response with no pending query
(its query was not captured, or already timed out) is still reported, with the note
`no-request-seen`; a repeated query (a client retransmission) counts into the pending one
(note `retransmitted`).

A second response to a query already answered (a server retransmission, or two answers to a
retransmitted query; Wireshark marks it `dns.retransmit_response`) is not a second call. The
first call left when the first response came (holding every answered call back for a window
would delay every DNS call and the compiled lane's too, for a rare event), so the duplicate
cannot be noted on it: it is counted instead (`dns_duplicate_responses` in the dissector's
counters, added when the flow ends). A flow remembers its last `ANSWERED_REMEMBERED` answered
questions, each for `ParserLimits.request_timeout_ns`; a response to an older one is reported
as `no-request-seen`, as before.

mDNS (RFC 6762, port 5353 on either side): the top bit of a question's QCLASS asks for a
unicast response and the top bit of a record's CLASS is the cache-flush bit; neither is part
of the class. Both are cleared before the message is read (the question pairs as class IN) and
noted on the call (`unicast-response`, `cache-flush`), where Wireshark shows the same flags.

Outcome: NOERROR and NXDOMAIN are `ok`: NXDOMAIN is a valid, authoritative answer ("no such
name"), and in Kubernetes every lookup of a short name walks the search path and collects
several NXDOMAINs before it succeeds, so counting them as errors would drown real failures;
the rcode stays in `status` for rules that care. Every other rcode (SERVFAIL, REFUSED,
FORMERR, NOTIMP, ...) is an `error`. A query without a response becomes `no_response` after
`ParserLimits.request_timeout_ns` (`expire`) or when the flow ends (`finish`).

Over TCP each message carries a 2-byte length prefix; messages may span segments or share
them. After a capture gap the direction is resynchronised at the first chunk that starts
with a plausible length-prefixed header.

Speed: dnspython builds an object per name, rdata and rrset and cost about 100 µs a
transaction, ten times an HTTP exchange in `bench/dissect.py`. The everyday message (a QUERY
with one question, IN-class A, AAAA, CNAME, NS, PTR or SOA records, at most an EDNS OPT record
whose options dnspython keeps as opaque bytes; also MX and SRV) is therefore read by `_parse_common` here, with
dnspython's own rules (name compression, lengths, rrset merging, TTLs, extended rcode) and
its text forms; anything else, or anything that rule-set would reject, goes to dnspython as
before. tests/unit/test_dns_fast_path.py checks the two agree on generated and mutated
messages.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import dns.edns
import dns.ipv6
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype

from trawl.dissector.calls import finish_call, new_call
from trawl.dissector.protocols.base import (
    DatagramParser,
    Direction,
    FlowInfo,
    NotAtBoundary,
    ParserLimits,
    ProtocolError,
    ProtocolSpec,
    StreamParser,
)
from trawl.v1.calls_pb2 import ApiCall, DnsAnswer, Endpoint

PROTOCOL = "dns"
MDNS_PORT = 5353
DNS_PORTS = frozenset({53, MDNS_PORT})
# Answered questions a flow remembers, to tell a duplicate response from one whose query was not
# seen; the compiled lane remembers as many (DNS_ANSWERED in _express.c).
ANSWERED_REMEMBERED = 16
# NetBIOS name service speaks the DNS message format but is not DNS: its plausible headers are not ours.
NOT_DNS_PORTS = frozenset({137})
HEADER_SIZE = 12
# Bounds on what one call carries: answers kept and characters of one answer's data.
MAX_ANSWERS = 64
MAX_ANSWER_DATA = 512
# Rcodes that are answers, not failures (see the module docstring for NXDOMAIN).
OK_RCODES = frozenset({"NOERROR", "NXDOMAIN"})
# Opcodes seen in real traffic: QUERY, IQUERY, STATUS, NOTIFY, UPDATE, DSO.
_PLAUSIBLE_OPCODES = frozenset({0, 1, 2, 4, 5, 6})
# Classes a real question carries: IN, CH, HS, NONE, ANY (mDNS sets the top bit for unicast replies).
_PLAUSIBLE_CLASSES = frozenset({1, 3, 4, 254, 255})
_MAX_PROBE_COUNT = 256
_MAX_POINTER_JUMPS = 32

_HEADER = struct.Struct("!HHHHHH")
_QTYPE_QCLASS = struct.Struct("!HH")


@dataclass(frozen=True, slots=True)
class DnsQuestion:
    name: str  # presentation form without the trailing dot; "." for the root
    qtype: int
    qclass: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.name.lower(), self.qtype, self.qclass)

    @property
    def type_name(self) -> str:
        return _type_text(self.qtype)


_TYPE_TEXT: dict[int, str] = {}
_RCODE_TEXT: dict[int, str] = {}


def _type_text(rdtype: int) -> str:
    text = _TYPE_TEXT.get(rdtype)
    if text is None:
        text = _TYPE_TEXT[rdtype] = dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rdtype))
    return text


def _rcode_text(value: int) -> str:
    text = _RCODE_TEXT.get(value)
    if text is None:
        text = _RCODE_TEXT[value] = dns.rcode.to_text(dns.rcode.Rcode.make(value))
    return text


@dataclass(slots=True)
class DnsMessage:
    """What pairing needs from one DNS message."""

    id: int
    is_response: bool
    opcode: int
    rcode: str
    truncated: bool
    question: DnsQuestion | None
    answers: list[DnsAnswer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _read_name(wire: bytes, offset: int) -> tuple[str, int]:
    """Read a (possibly compressed) domain name; returns its presentation form and the offset
    just past it in the original position. Raises ProtocolError on anything malformed."""
    labels: list[bytes] = []
    end: int | None = None
    jumps = 0
    position = offset
    total = 0
    while True:
        if position >= len(wire):
            raise ProtocolError("DNS name runs past the end of the message")
        length = wire[position]
        if length & 0xC0 == 0xC0:
            if position + 1 >= len(wire):
                raise ProtocolError("DNS compression pointer cut short")
            target = ((length & 0x3F) << 8) | wire[position + 1]
            if end is None:
                end = position + 2
            jumps += 1
            if jumps > _MAX_POINTER_JUMPS or target >= position:
                raise ProtocolError("DNS compression pointer loops or points forward")
            position = target
            continue
        if length & 0xC0:
            raise ProtocolError(f"DNS label type {length >> 6} is not supported")
        position += 1
        if length == 0:
            break
        if position + length > len(wire):
            raise ProtocolError("DNS label runs past the end of the message")
        total += length + 1
        if total > 255:
            raise ProtocolError("DNS name longer than 255 bytes")
        labels.append(wire[position : position + length])
        position += length
    return _owner_text(labels), end if end is not None else position


# Bytes a label may hold and print as they are; any other byte is escaped.
_PLAIN_LABEL_BYTES = bytes(byte for byte in range(0x21, 0x7F) if chr(byte) not in '."\\()@$;')


def _label_text(label: bytes) -> str:
    """A label in master-file form, as dnspython would print it (escapes for odd bytes)."""
    if not label.translate(None, _PLAIN_LABEL_BYTES):
        return label.decode("ascii")
    out = []
    for byte in label:
        char = chr(byte)
        if char in '."\\()@$;':
            out.append("\\" + char)
        elif 0x21 <= byte <= 0x7E:
            out.append(char)
        else:
            out.append(f"\\{byte:03d}")
    return "".join(out)


def _read_header_and_question(wire: bytes) -> tuple[tuple[int, int, int, int, int, int], DnsQuestion | None]:
    if len(wire) < HEADER_SIZE:
        raise ProtocolError(f"DNS message of {len(wire)} bytes is shorter than its header")
    header = _HEADER.unpack_from(wire)
    question = None
    if header[2] > 0:
        name, offset = _read_name(wire, HEADER_SIZE)
        if offset + 4 > len(wire):
            raise ProtocolError("DNS question cut short")
        qtype, qclass = _QTYPE_QCLASS.unpack_from(wire, offset)
        question = DnsQuestion(name, qtype, qclass)
    return header, question


def _question_from_dnspython(message: dns.message.Message) -> DnsQuestion | None:
    if not message.question:
        return None
    rrset = message.question[0]
    return DnsQuestion(_name_text(rrset.name), int(rrset.rdtype), int(rrset.rdclass))


def _name_text(name: dns.name.Name) -> str:
    if name == dns.name.root:
        return "."
    return name.to_text(omit_final_dot=True)


_RR_HEADER = struct.Struct("!HHIH")
_OPTION_HEADER = struct.Struct("!HH")
_SOA_NUMBERS = struct.Struct("!IIIII")
TYPE_A, TYPE_NS, TYPE_CNAME, TYPE_SOA, TYPE_PTR, TYPE_MX, TYPE_AAAA, TYPE_SRV, TYPE_OPT = 1, 2, 5, 6, 12, 15, 28, 33, 41
_TARGET_TYPES = frozenset({TYPE_NS, TYPE_CNAME, TYPE_PTR})
# Types whose rdata holds a name: two records are equal by dnspython's rules for names.
_NAMED_TYPES = frozenset({TYPE_NS, TYPE_CNAME, TYPE_PTR, TYPE_MX, TYPE_SRV})
_MX_PREFERENCE = struct.Struct("!H")
_SRV_NUMBERS = struct.Struct("!HHH")
_SINGLETON_TYPES = frozenset({TYPE_CNAME, TYPE_SOA})
CLASS_IN = 1
ANSWER_SECTION, ADDITIONAL_SECTION = 1, 3
_MAX_POINTER_CHAIN = 16  # dns.name.MAX_COMPRESSION_POINTER_CHAIN
_OPAQUE_OPTIONS: dict[int, bool] = {}  # EDNS option code -> dnspython keeps it as bytes (GenericOption)


class _Uncommon(Exception):
    """The message is outside what `_parse_common` reads: dnspython decides."""


def _wire_name(wire: bytes, position: int, end: int) -> tuple[list[bytes], int]:
    """A name as `dns.name.from_wire_parser` reads it (pointers strictly backwards, each target
    before the previous one and ending before it, at most 16 hops, 255 bytes); returns its
    labels and the offset after it. Raises _Uncommon where dnspython would raise."""
    labels: list[bytes] = []
    start = biggest = furthest = position
    total = 1
    hops = 0
    while True:
        if position >= end:
            raise _Uncommon
        count = wire[position]
        position += 1
        if count == 0:
            break
        if count < 64:
            stop = position + count
            if stop > end:
                raise _Uncommon
            labels.append(wire[position:stop])
            total += count + 1
            position = stop
        elif count >= 192:
            if position >= end:
                raise _Uncommon
            target = ((count & 0x3F) << 8) | wire[position]
            position += 1
            hops += 1
            if target >= biggest or hops > _MAX_POINTER_CHAIN or start > end:
                raise _Uncommon
            biggest = target
            end = start  # the target must end before this part of the name begins
            if position > furthest:
                furthest = position
            position = start = target
        else:
            raise _Uncommon
    if position > furthest:
        furthest = position
    if total > 255:
        raise _Uncommon
    return labels, furthest


def _owner_text(labels: list[bytes]) -> str:
    """Presentation form without the final dot ("." for the root), as dnspython prints it."""
    if not labels:
        return "."
    if not b"".join(labels).translate(None, _PLAIN_LABEL_BYTES):
        return b".".join(labels).decode("ascii")  # no byte to escape in any label (the common name)
    return ".".join([_label_text(label) for label in labels])


def _target_text(labels: list[bytes]) -> str:
    return _owner_text(labels) + "." if labels else "."


def type_text(rdtype: int) -> str:
    """A record type's text form, as calls carry it ("A", "AAAA", "TYPE65280"...)."""
    return _type_text(rdtype)


def rcode_text(value: int) -> str:
    """An (extended) rcode's text form, as calls carry it ("NOERROR", "NXDOMAIN", "BADVERS"...)."""
    return _rcode_text(value)


def edns_option_is_opaque(code: int) -> bool:
    """dnspython keeps this EDNS option as opaque bytes (`_parse_common` reads only those)."""
    opaque = _OPAQUE_OPTIONS.get(code)
    if opaque is None:
        # dnspython looks the class up by the number itself (any int, not only OptionType members).
        option_type = cast("dns.edns.OptionType", code)
        opaque = _OPAQUE_OPTIONS[code] = dns.edns.get_option_class(option_type) is dns.edns.GenericOption
    return opaque


def _check_options(wire: bytes, position: int, end: int) -> None:
    while position < end:
        if position + 4 > end:
            raise _Uncommon
        code, length = _OPTION_HEADER.unpack_from(wire, position)
        position += 4 + length
        if position > end:
            raise _Uncommon
        if not edns_option_is_opaque(code):
            raise _Uncommon  # an option dnspython decodes (and may refuse)


def _parse_common(wire: bytes, ident: int, flags: int, counts: tuple[int, int, int]) -> DnsMessage:
    """The everyday message, read as dnspython reads it (see the module docstring)."""
    size = len(wire)
    labels, position = _wire_name(wire, HEADER_SIZE, size)
    if position + 4 > size:
        raise _Uncommon
    qtype, qclass = _QTYPE_QCLASS.unpack_from(wire, position)
    position += 4
    is_response = bool(flags & 0x8000)
    # Answer rrsets as dnspython merges them: key -> [owner, type, ttl, {raw rdata: text}].
    rrsets: dict[tuple[object, ...], list[Any]] = {}
    ednsflags = 0
    opt_seen = False
    for section, count in enumerate(counts, start=ANSWER_SECTION):
        for _ in range(count):
            owner, position = _wire_name(wire, position, size)
            if position + 10 > size:
                raise _Uncommon
            rdtype, rdclass, ttl, rdlen = _RR_HEADER.unpack_from(wire, position)
            position += 10
            rdata_end = position + rdlen
            if rdata_end > size:
                raise _Uncommon
            if rdtype == TYPE_OPT:
                if section != ADDITIONAL_SECTION or opt_seen or owner:
                    raise _Uncommon
                opt_seen = True
                _check_options(wire, position, rdata_end)
                ednsflags = ttl
                position = rdata_end
                continue
            if rdclass != CLASS_IN:
                raise _Uncommon
            if rdtype == TYPE_A:
                if rdlen != 4:
                    raise _Uncommon
                data = socket.inet_ntoa(wire[position:rdata_end])
            elif rdtype == TYPE_AAAA:
                if rdlen != 16:
                    raise _Uncommon
                data = dns.ipv6.inet_ntoa(wire[position:rdata_end])
            elif rdtype in _TARGET_TYPES:
                target, after = _wire_name(wire, position, rdata_end)
                if after != rdata_end:
                    raise _Uncommon
                data = _target_text(target)
            elif rdtype == TYPE_MX:
                if rdlen < 3:
                    raise _Uncommon
                target, after = _wire_name(wire, position + 2, rdata_end)
                if after != rdata_end:
                    raise _Uncommon
                data = f"{_MX_PREFERENCE.unpack_from(wire, position)[0]} {_target_text(target)}"
            elif rdtype == TYPE_SRV:
                if rdlen < 7:
                    raise _Uncommon
                target, after = _wire_name(wire, position + 6, rdata_end)
                if after != rdata_end:
                    raise _Uncommon
                priority, weight, port = _SRV_NUMBERS.unpack_from(wire, position)
                data = f"{priority} {weight} {port} {_target_text(target)}"
            elif rdtype == TYPE_SOA:
                mname, after = _wire_name(wire, position, rdata_end)
                rname, after = _wire_name(wire, after, rdata_end)
                if after + 20 != rdata_end:
                    raise _Uncommon
                numbers = " ".join(map(str, _SOA_NUMBERS.unpack_from(wire, after)))
                data = f"{_target_text(mname)} {_target_text(rname)} {numbers}"
            else:
                raise _Uncommon
            raw = wire[position:rdata_end]
            position = rdata_end
            if section != ANSWER_SECTION or not is_response:
                continue
            if ttl > 0x7FFFFFFF:
                ttl = 0
            key = (tuple([label.lower() for label in owner]), rdtype)
            rrset = rrsets.get(key)
            if rrset is None:
                rrsets[key] = [owner, rdtype, ttl, {raw: data}]
                continue
            if ttl < rrset[2]:
                rrset[2] = ttl
            datas = rrset[3]
            if rdtype in _SINGLETON_TYPES:
                rrset[3] = {raw: data}  # a singleton type keeps the last record
            elif rdtype in _NAMED_TYPES:
                raise _Uncommon  # equality of names inside rdata: dnspython's rules
            elif raw not in datas:
                datas[raw] = data
    message = DnsMessage(
        id=ident,
        is_response=is_response,
        opcode=0,
        rcode=_rcode_text((flags & 0xF) | ((ednsflags >> 20) & 0xFF0)),
        truncated=bool(flags & 0x0200),
        question=DnsQuestion(_owner_text(labels), qtype, qclass),
    )
    answers = message.answers
    for owner, rdtype, ttl, datas in rrsets.values():
        owner_text = _owner_text(owner)
        type_name = _type_text(rdtype)
        for data in datas.values():
            if len(answers) >= MAX_ANSWERS:
                message.notes.append("answers-truncated")
                return message
            answers.append(DnsAnswer(name=owner_text, type=type_name, ttl=ttl, data=data[:MAX_ANSWER_DATA]))
    return message


_MDNS_CLASS_BIT = 0x8000


def _clear_mdns_class_bits(wire: bytes) -> tuple[bytes, list[str]]:
    """The message with the mDNS bits cleared from every question's QCLASS (unicast-response)
    and every record's CLASS (cache-flush; the OPT record's CLASS is a size, left alone), and
    the notes for the bits found. A message too damaged to walk is returned as it is: reading
    it will say what is wrong."""
    if len(wire) < HEADER_SIZE:
        return wire, []
    counts = _HEADER.unpack_from(wire)[2:]
    copy: bytearray | None = None
    notes: list[str] = []
    position = HEADER_SIZE
    try:
        for section, count in enumerate(counts):
            for _ in range(count):
                _name, position = _read_name(wire, position)
                if section == 0:
                    if position + 4 > len(wire):
                        return wire, []
                    class_at = position + 2
                    position += 4
                    note = "unicast-response"
                else:
                    if position + 10 > len(wire):
                        return wire, []
                    rdtype = (wire[position] << 8) | wire[position + 1]
                    class_at = position + 2
                    position += 10 + ((wire[position + 8] << 8) | wire[position + 9])
                    if rdtype == TYPE_OPT:
                        continue
                    note = "cache-flush"
                if wire[class_at] & 0x80:
                    if copy is None:
                        copy = bytearray(wire)
                    copy[class_at] &= 0x7F
                    if note not in notes:
                        notes.append(note)
    except ProtocolError:
        return wire, []
    return (wire if copy is None else bytes(copy)), notes


def parse_message(wire: bytes, *, mdns: bool = False) -> DnsMessage:
    """Decode one DNS message (without any TCP length prefix); `mdns`: an mDNS message, whose
    class fields carry the unicast-response and cache-flush bits (see the module docstring)."""
    if mdns:
        wire, flags = _clear_mdns_class_bits(wire)
        if flags:
            message = parse_message(wire)
            message.notes.extend(flags)
            return message
    if len(wire) >= HEADER_SIZE:
        ident, flags, questions, answers, authority, additional = _HEADER.unpack_from(wire)
        if questions == 1 and not flags & 0x7800:  # one question, opcode QUERY
            try:
                return _parse_common(wire, ident, flags, (answers, authority, additional))
            except _Uncommon:
                pass
    return _parse_with_dnspython(wire)


def _parse_with_dnspython(wire: bytes) -> DnsMessage:
    header, question = _read_header_and_question(wire)
    ident, flags = header[0], header[1]
    is_response = bool(flags & 0x8000)
    opcode = (flags >> 11) & 0xF
    truncated = bool(flags & 0x0200)
    try:
        decoded = dns.message.from_wire(wire, ignore_trailing=True, one_rr_per_rrset=False)
    except Exception:  # dnspython raises many types for hostile input; the header above is enough to pair
        rcode = dns.rcode.to_text(dns.rcode.Rcode.make(flags & 0xF))
        message = DnsMessage(ident, is_response, opcode, rcode, truncated, question)
        message.notes.append("malformed-records")
        return message
    message = DnsMessage(
        id=ident,
        is_response=is_response,
        opcode=opcode,
        rcode=dns.rcode.to_text(decoded.rcode()),
        truncated=truncated,
        question=_question_from_dnspython(decoded) or question,
    )
    if is_response:
        message.answers = _answers(decoded, message.notes)
    return message


def _answers(message: dns.message.Message, notes: list[str]) -> list[DnsAnswer]:
    answers: list[DnsAnswer] = []
    for rrset in message.answer:
        owner = _name_text(rrset.name)
        type_name = dns.rdatatype.to_text(rrset.rdtype)
        for rdata in rrset:
            if len(answers) >= MAX_ANSWERS:
                notes.append("answers-truncated")
                return answers
            try:
                data = rdata.to_text()
            except Exception:  # a record dnspython decoded but cannot print: keep its place
                data = ""
            answers.append(DnsAnswer(name=owner, type=type_name, ttl=rrset.ttl, data=data[:MAX_ANSWER_DATA]))
    return answers


def plausible_message(data: bytes, *, partial: bool = False) -> bool:
    """A DNS header with sane counts and, when the bytes hold it, a well-formed first question.
    `partial`: the bytes may be only the start of the message (a TCP probe)."""
    if len(data) < HEADER_SIZE:
        return False
    _ident, flags, qd, an, ns, ar = _HEADER.unpack_from(data)
    if (flags >> 11) & 0xF not in _PLAUSIBLE_OPCODES or flags & 0x0040:
        return False
    counts = (qd, an, ns, ar)
    if max(counts) > _MAX_PROBE_COUNT or sum(counts) == 0:
        return False
    if not flags & 0x8000 and flags & 0xF:
        return False  # a query carries no rcode
    if qd == 0:
        return bool(flags & 0x8000) or (flags >> 11) & 0xF != 0
    try:
        _name, offset = _read_name(data, HEADER_SIZE)
    except ProtocolError:
        # A name cut by the end of a partial probe is still plausible; a malformed one is not.
        return partial and _name_cut_short(data)
    if offset + 4 > len(data):
        return partial
    _qtype, qclass = _QTYPE_QCLASS.unpack_from(data, offset)
    return qclass & 0x7FFF in _PLAUSIBLE_CLASSES


def _name_cut_short(data: bytes) -> bool:
    position = HEADER_SIZE
    while position < len(data):
        length = data[position]
        if length == 0 or length & 0xC0:
            return False
        position += 1 + length
    return True


@dataclass(slots=True)
class _Pending:
    call: ApiCall
    message_id: int


_Key = tuple[int, tuple[str, int, int] | None]


@dataclass(frozen=True, slots=True)
class AnsweredQuery:
    """A question a flow saw answered: its id, its question (`name` in lower case, as pairing
    compares it; None for a query without a question) and when the answer came."""

    id: int
    question: tuple[str, int, int] | None
    ts_ns: int


@dataclass(frozen=True, slots=True)
class DnsState:
    """A DNS flow between transactions: no query pending, no message half read.

    What a compiled lane must supply:
    - `ordinal`: how many calls the flow has begun (each call id hashes its ordinal);
    - `answered`: the last questions answered (at most ANSWERED_REMEMBERED, oldest first), so
      that a duplicate response is counted, not reported as a call;
    - `gap_seen`: (DNS over TCP) a capture gap was seen, noted on calls left unanswered.
    """

    ordinal: int
    answered: tuple[AnsweredQuery, ...] = ()
    gap_seen: bool = False


class DnsTransactions:
    """Query/response pairing for one flow; shared by the UDP and TCP parsers."""

    def __init__(self, flow: FlowInfo, limits: ParserLimits, *, length_prefix: int = 0) -> None:
        self._flow = flow
        self._limits = limits
        self._length_prefix = length_prefix
        self._mdns = MDNS_PORT in (flow.server_port, flow.client_port)
        self._pending: dict[_Key, _Pending] = {}
        self._answered: dict[_Key, int] = {}  # question -> when answered, oldest first
        self._ordinal = 0
        self.gap_seen = False
        self.duplicate_responses = 0

    def snapshot(self) -> DnsState:
        if self._pending:
            raise NotAtBoundary("DNS: a query is pending")
        answered = tuple(AnsweredQuery(ident, question, ts) for (ident, question), ts in self._answered.items())
        return DnsState(self._ordinal, answered, self.gap_seen)

    def restore(self, state: DnsState) -> None:
        self._pending.clear()
        self._ordinal = state.ordinal
        self._answered = {(query.id, query.question): query.ts_ns for query in state.answered}
        self.gap_seen = state.gap_seen

    def message(self, direction: Direction, wire: bytes, ts_ns: int) -> list[ApiCall]:
        parsed = parse_message(wire, mdns=self._mdns)
        size = len(wire) + self._length_prefix
        if parsed.is_response:
            return self._response(direction, parsed, size, ts_ns)
        return self._query(direction, parsed, size, ts_ns)

    def _new_call(self, asker_direction: Direction, ts_ns: int) -> ApiCall:
        call = new_call(self._flow, PROTOCOL, ts_ns, self._ordinal)
        self._ordinal += 1
        if asker_direction is Direction.SERVER_TO_CLIENT:
            _swap_endpoints(call)
        return call

    def _query(self, direction: Direction, query: DnsMessage, size: int, ts_ns: int) -> list[ApiCall]:
        key = (query.id, query.question.key if query.question else None)
        pending = self._pending.get(key)
        if pending is not None:
            if "retransmitted" not in pending.call.notes:
                pending.call.notes.append("retransmitted")
            return []
        emitted: list[ApiCall] = []
        if len(self._pending) >= self._limits.max_pending_requests:
            _key, oldest = next(iter(self._pending.items()))
            del self._pending[_key]
            oldest.call.notes.append("pending-limit")
            emitted.append(finish_call(oldest.call, None, error=False))
        call = self._new_call(direction, ts_ns)
        _describe(call, query)
        call.request.size = size
        call.request.end_ts = ts_ns
        call.dns.id = query.id
        call.notes.extend(query.notes)
        self._pending[key] = _Pending(call, query.id)
        return emitted

    def _response(self, direction: Direction, response: DnsMessage, size: int, ts_ns: int) -> list[ApiCall]:
        taken = self._take_pending(response)
        if taken is None:
            if self._answered_before(response, ts_ns):
                self.duplicate_responses += 1
                return []
            call = self._new_call(direction.reverse, ts_ns)
            _describe(call, response)
            call.dns.id = response.id
            call.notes.append("no-request-seen")
        else:
            key, pending = taken
            call = pending.call
            self._answered.pop(key, None)
            self._answered[key] = ts_ns
            if len(self._answered) > ANSWERED_REMEMBERED:
                del self._answered[next(iter(self._answered))]
        call.status = response.rcode
        call.dns.rcode = response.rcode
        call.dns.truncated = response.truncated
        call.dns.answers.extend(response.answers)
        call.notes.extend(note for note in response.notes if note not in call.notes)
        call.response.size = size
        call.response.end_ts = ts_ns
        return [finish_call(call, ts_ns, error=response.rcode not in OK_RCODES)]

    def _take_pending(self, response: DnsMessage) -> tuple[_Key, _Pending] | None:
        if response.question is not None:
            key: _Key = (response.id, response.question.key)
            pending = self._pending.pop(key, None)
            return None if pending is None else (key, pending)
        for key, pending in self._pending.items():
            if pending.message_id == response.id:
                del self._pending[key]
                return key, pending
        return None

    def _answered_before(self, response: DnsMessage, ts_ns: int) -> bool:
        """The response repeats an answer given within the request timeout."""
        deadline = ts_ns - self._limits.request_timeout_ns
        if response.question is not None:
            answered = self._answered.get((response.id, response.question.key))
            return answered is not None and answered >= deadline
        return any(ident == response.id and ts >= deadline for (ident, _question), ts in self._answered.items())

    def expire(self, now_ns: int) -> list[ApiCall]:
        expired: list[ApiCall] = []
        deadline = now_ns - self._limits.request_timeout_ns
        while self._pending:
            key, pending = next(iter(self._pending.items()))
            if pending.call.request.ts > deadline:
                break
            del self._pending[key]
            expired.append(self._unanswered(pending))
        return expired

    def finish(self) -> list[ApiCall]:
        unanswered = [self._unanswered(pending) for pending in self._pending.values()]
        self._pending.clear()
        return unanswered

    def _unanswered(self, pending: _Pending) -> ApiCall:
        if self.gap_seen:
            pending.call.notes.append("capture-gap")
        return finish_call(pending.call, None, error=False)


def _describe(call: ApiCall, message: DnsMessage) -> None:
    if message.question is not None:
        call.method = message.question.type_name
        call.path = message.question.name
    else:
        call.method = dns.opcode.to_text(dns.opcode.Opcode.make(message.opcode))


def _swap_endpoints(call: ApiCall) -> None:
    src = Endpoint()
    src.CopyFrom(call.src)
    call.src.CopyFrom(call.dst)
    call.dst.CopyFrom(src)


class DnsDatagramParser:
    """DNS over UDP: one message per datagram."""

    def __init__(self, flow: FlowInfo, limits: ParserLimits) -> None:
        self._transactions = DnsTransactions(flow, limits)

    def feed_datagram(self, direction: Direction, data: bytes, ts_ns: int) -> list[ApiCall]:
        return self._transactions.message(direction, data, ts_ns)

    @property
    def counts(self) -> dict[str, int]:
        """What the flow counted without making a call (added to the dissector's counters when
        the flow ends)."""
        return _counts(self._transactions)

    def snapshot(self) -> DnsState:
        """The flow's state with no query pending (see DnsState); NotAtBoundary otherwise."""
        return self._transactions.snapshot()

    def restore(self, state: DnsState) -> None:
        """Continue from `state`; queries pending here are forgotten."""
        self._transactions.restore(state)

    def expire(self, now_ns: int) -> list[ApiCall]:
        return self._transactions.expire(now_ns)

    def finish(self, ts_ns: int) -> list[ApiCall]:
        return self._transactions.finish()


class DnsStreamParser:
    """DNS over TCP: 2-byte length-prefixed messages, in any chunking."""

    def __init__(self, flow: FlowInfo, limits: ParserLimits) -> None:
        self._transactions = DnsTransactions(flow, limits, length_prefix=2)
        self._buffers = (bytearray(), bytearray())
        self._message_ts = [0, 0]
        self._lost = [False, False]

    @property
    def counts(self) -> dict[str, int]:
        """As DnsDatagramParser.counts."""
        return _counts(self._transactions)

    def snapshot(self) -> DnsState:
        """The connection's state between messages with no query pending; NotAtBoundary
        otherwise (a message half read, or a direction resynchronising after a gap)."""
        if any(self._buffers) or any(self._lost):
            raise NotAtBoundary("DNS over TCP: a message is being read")
        return self._transactions.snapshot()

    def restore(self, state: DnsState) -> None:
        """Continue from `state` at a message boundary of both directions."""
        for buffer in self._buffers:
            buffer.clear()
        self._lost = [False, False]
        self._transactions.restore(state)

    def feed(self, direction: Direction, data: bytes, ts_ns: int) -> list[ApiCall]:
        if self._lost[direction]:
            if not _plausible_prefixed(data):
                return []
            self._lost[direction] = False
        buffer = self._buffers[direction]
        calls: list[ApiCall] = []
        position = 0
        while position < len(data):
            if not buffer:
                self._message_ts[direction] = ts_ns
            if len(buffer) < 2:
                take = 2 - len(buffer)
                buffer += data[position : position + take]
                position += take
                continue
            length = (buffer[0] << 8) | buffer[1]
            if length < HEADER_SIZE:
                raise ProtocolError(f"DNS-over-TCP length prefix {length} is shorter than a DNS header")
            take = min(len(data) - position, length + 2 - len(buffer))
            buffer += data[position : position + take]
            position += take
            if len(buffer) == length + 2:
                wire = bytes(buffer[2:])
                buffer.clear()
                calls.extend(self._transactions.message(direction, wire, self._message_ts[direction]))
        return calls

    def gap(self, direction: Direction, size: int, ts_ns: int) -> list[ApiCall]:
        self._buffers[direction].clear()
        self._lost[direction] = True
        self._transactions.gap_seen = True
        return []

    def expire(self, now_ns: int) -> list[ApiCall]:
        return self._transactions.expire(now_ns)

    def finish(self, ts_ns: int) -> list[ApiCall]:
        return self._transactions.finish()


def _counts(transactions: DnsTransactions) -> dict[str, int]:
    duplicates = transactions.duplicate_responses
    return {"dns_duplicate_responses": duplicates} if duplicates else {}


def _plausible_prefixed(data: bytes) -> bool:
    if len(data) < 2 + HEADER_SIZE:
        return False
    length = (data[0] << 8) | data[1]
    return length >= HEADER_SIZE and plausible_message(data[2 : 2 + length], partial=len(data) < 2 + length)


def _port_hint(flow: FlowInfo) -> bool:
    return flow.server_port in DNS_PORTS or flow.client_port in DNS_PORTS


def _probe(firsts: Iterable[bytes], flow: FlowInfo, plausible: Callable[[bytes], bool]) -> int:
    if flow.server_port in NOT_DNS_PORTS or flow.client_port in NOT_DNS_PORTS:
        return 0
    seen = False
    for data in firsts:
        if not data:
            continue
        seen = True
        if not plausible(data):
            return 0
    if not seen:
        return 1 if _port_hint(flow) else 0
    return 3 if _port_hint(flow) else 2


def probe_udp(client_first: bytes, server_first: bytes, flow: FlowInfo) -> int:
    """2 for a plausible DNS message (3 on a DNS port), 1 for the port alone, 0 otherwise."""
    return _probe((client_first, server_first), flow, plausible_message)


def probe_tcp(client_first: bytes, server_first: bytes, flow: FlowInfo) -> int:
    """As `probe_udp`, for length-prefixed messages that may be cut by the probe window."""
    return _probe((client_first, server_first), flow, _plausible_prefixed)


def new_datagram(flow: FlowInfo, limits: ParserLimits) -> DatagramParser:
    return DnsDatagramParser(flow, limits)


def new_stream(flow: FlowInfo, limits: ParserLimits) -> StreamParser:
    return DnsStreamParser(flow, limits)


SPEC = ProtocolSpec(name=PROTOCOL, transport="udp", probe=probe_udp, new_datagram=new_datagram, ports=DNS_PORTS)
SPEC_TCP = ProtocolSpec(
    name=PROTOCOL, transport="tcp", probe=probe_tcp, new_stream=new_stream, ports=DNS_PORTS, probe_bytes=14
)

__all__ = [
    "ANSWERED_REMEMBERED",
    "SPEC",
    "SPEC_TCP",
    "AnsweredQuery",
    "DnsDatagramParser",
    "DnsMessage",
    "DnsQuestion",
    "DnsState",
    "DnsStreamParser",
    "DnsTransactions",
    "parse_message",
    "plausible_message",
    "probe_tcp",
    "probe_udp",
]
