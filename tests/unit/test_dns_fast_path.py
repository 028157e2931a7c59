"""The hand-read path for everyday DNS messages gives exactly what dnspython gives.

Messages are built with dnspython (its own encoder and name compression) from generated
records of the types the fast path reads and of some it leaves to dnspython, then sometimes
damaged; whenever `_parse_common` accepts one, its result must equal `_parse_with_dnspython`'s.
"""

from __future__ import annotations

import contextlib
import random

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import scaled
from tests.fuzz.test_fuzz_dns import UDP_MESSAGES
from trawl.dissector.protocols import dns as dns_protocol
from trawl.dissector.protocols.base import ProtocolError

FAST = settings(max_examples=scaled(500), deadline=None, suppress_health_check=[HealthCheck.too_slow])

labels = st.one_of(
    st.sampled_from(["svc", "Default", "cluster", "local", "a-b", "x_y", "WWW"]),
    st.binary(min_size=1, max_size=8).map(lambda raw: raw.decode("latin-1")),
)
names = st.lists(labels, min_size=0, max_size=4).map(lambda parts: dns.name.Name([*map(str.encode, parts), b""]))
rdata_text = {
    "A": st.tuples(*[st.integers(0, 255)] * 4).map(lambda parts: ".".join(map(str, parts))),
    "AAAA": st.sampled_from(["::1", "fd00::7", "2001:db8::ff00:42:8329", "::ffff:10.0.0.1", "1:0:0:2::3"]),
    "CNAME": names.map(str),
    "NS": names.map(str),
    "PTR": names.map(str),
    "SOA": st.tuples(names, names, st.integers(0, 2**32 - 1)).map(
        lambda v: f"{v[0]} {v[1]} {v[2]} 7200 900 1209600 30"
    ),
    "MX": names.map(lambda name: f"10 {name}"),
    "SRV": names.map(lambda name: f"0 5 8080 {name}"),
    "TXT": st.text(alphabet='abc "\\', max_size=8).map(
        lambda text: '"' + text.replace("\\", "").replace('"', "") + '"'
    ),
}


@st.composite
def records(draw: st.DrawFn) -> list[dns.rrset.RRset]:
    """Records of one owner and type: one rrset, or one rrset per record (dnspython merges those
    when it reads them back, with its rules for TTLs, duplicates and singleton types)."""
    kind = draw(st.sampled_from(sorted(rdata_text)))
    ttl = draw(st.one_of(st.integers(0, 3600), st.integers(2**31 - 2, 2**32 - 1)))
    owner = draw(names)
    rdclass = draw(st.sampled_from([dns.rdataclass.IN, dns.rdataclass.IN, dns.rdataclass.CH]))
    split = draw(st.booleans())
    rrsets = [dns.rrset.RRset(owner, rdclass, dns.rdatatype.from_text(kind))]
    for text in draw(st.lists(rdata_text[kind], min_size=1, max_size=3)):
        if split and rrsets[-1]:
            rrsets.append(dns.rrset.RRset(owner, rdclass, rrsets[0].rdtype))
        with contextlib.suppress(Exception):  # CH-class A records have another format: skip those
            rrsets[-1].add(dns.rdata.from_text(rdclass, rrsets[0].rdtype, text), ttl + len(rrsets))
    return [rrset for rrset in rrsets if rrset]


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    rdtype = draw(st.sampled_from(["A", "AAAA", "SRV", "PTR", "OPT", "TYPE999"]))
    query = dns.message.make_query(draw(names), rdtype, id=draw(st.integers(0, 0xFFFF)))
    if draw(st.booleans()):
        options = draw(
            st.lists(
                st.sampled_from(
                    [
                        dns.edns.GenericOption(65001, b"\x01\x02"),
                        dns.edns.ECSOption("10.0.0.0", 8),
                        dns.edns.NSIDOption(b""),
                    ]
                ),
                max_size=2,
            )
        )
        query.use_edns(0, options=options, payload=1232)
    message: dns.message.Message = query
    if draw(st.booleans()):
        message = dns.message.make_response(query)
        message.set_rcode(dns.rcode.Rcode.make(draw(st.sampled_from([0, 2, 3, 5, 16, 23]))))
        for section in (message.answer, message.authority, message.additional):
            for rrsets in draw(st.lists(records(), max_size=3)):
                section.extend(rrsets)
    # dnspython shuffles each rrset's records as it writes them: with the global random module,
    # seeded here (and restored after) so that an example is reproducible.
    state = random.getstate()
    random.seed(draw(st.integers(0, 2**32)))
    try:
        wire = message.to_wire(max_size=65535)
    except Exception:  # an extended rcode without EDNS cannot be written
        return b""
    finally:
        random.setstate(state)
    if draw(st.booleans()):
        # One label in another case: names compare case-insensitively when rrsets merge.
        wire = wire.replace(b"\x03svc", b"\x03SVC", 1)
    damaged = bytearray(wire)
    for _ in range(draw(st.integers(0, 2))):
        damaged[draw(st.integers(0, len(damaged) - 1))] = draw(st.integers(0, 255))
    return bytes(damaged[: draw(st.integers(0, len(damaged)))] if draw(st.booleans()) else damaged)


def fast(wire: bytes) -> dns_protocol.DnsMessage | None:
    header = dns_protocol._HEADER.unpack_from(wire)
    if header[2] != 1 or header[1] & 0x7800:
        return None
    try:
        return dns_protocol._parse_common(wire, header[0], header[1], header[3:])
    except dns_protocol._Uncommon:
        return None


def assert_agrees(wire: bytes) -> bool:
    """True when the fast path took the message (and then it agreed with dnspython)."""
    if len(wire) < dns_protocol.HEADER_SIZE:
        return False
    quick = fast(wire)
    if quick is None:
        return False
    try:
        slow = dns_protocol._parse_with_dnspython(wire)
    except ProtocolError as exc:
        raise AssertionError(f"fast path accepted what the general path refuses: {exc}") from None
    assert quick == slow
    return True


@FAST
@given(messages())
def test_generated_messages_agree_with_dnspython(wire: bytes) -> None:
    assert_agrees(wire)


@FAST
@given(st.binary(min_size=12, max_size=200))
def test_arbitrary_bytes_agree_with_dnspython(wire: bytes) -> None:
    assert_agrees(wire)


def test_everyday_messages_take_the_fast_path() -> None:
    with_txt = dns.rdatatype.TXT
    taken = [
        assert_agrees(wire)
        for wire in UDP_MESSAGES
        if not any(rrset.rdtype == with_txt for rrset in dns.message.from_wire(wire).answer)
    ]
    assert len(taken) > 20 and all(taken)
    query = dns.message.make_query("api.default.svc.cluster.local", "A", use_edns=0)
    response = dns.message.make_response(query)
    owner = "api.default.svc.cluster.local."
    response.answer.append(dns.rrset.from_text(owner, 30, "IN", "A", "10.0.0.1", "10.0.0.2"))
    response.authority.append(
        dns.rrset.from_text(
            "cluster.local.", 30, "IN", "SOA", "ns.dns.cluster.local. hostmaster.cluster.local. 1 2 3 4 5"
        )
    )
    for message in (query, response):
        assert assert_agrees(message.to_wire())
    parsed = dns_protocol.parse_message(response.to_wire())
    assert sorted((a.name, a.type, a.ttl, a.data) for a in parsed.answers) == [
        ("api.default.svc.cluster.local", "A", 30, "10.0.0.1"),
        ("api.default.svc.cluster.local", "A", 30, "10.0.0.2"),
    ]
