"""The compiled lane's schemaless protobuf -> JSON text (`_express.schemaless_json`, written in
services/dissector/_pbjson.h) against the reference, protobuf.py's `_schemaless_text`: the same
text byte for byte and its length in code points, on arbitrary bytes, on generated wire-format
messages (nesting, groups, repeated fields, strings of every kind of character, invalid UTF-8,
long varints, cut-off tails), under small depth and field budgets; and one example per rule,
whose expected text pins both implementations.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import scaled
from trawl.dissector._express import schemaless_json
from trawl.dissector.protobuf import _schemaless_text

MAX_FIELD_NUMBER = (1 << 29) - 1


def check(data: bytes, max_depth: int = 8, max_fields: int = 512) -> str:
    """Both implementations agree on `data`; returns the text."""
    expected = _schemaless_text(data, max_depth, max_fields)
    text, chars = schemaless_json(data, max_depth, max_fields)
    assert text == expected, (data, max_depth, max_fields)
    assert chars == len(expected)
    return text


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def ld(number: int, payload: bytes) -> bytes:
    return key(number, 2) + varint(len(payload)) + payload


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- generated wire format ---------------------------------------------------------------------------

# Field numbers: one-byte keys (1-15), either side of 64 (the C spots repeats of numbers below 64
# in a bitmap, of the others by sorting), the largest allowed.
numbers = st.one_of(st.integers(1, 6), st.sampled_from([15, 16, 63, 64, 65, 127, 128, 1000, MAX_FIELD_NUMBER]))


@st.composite
def varint_bytes(draw: st.DrawFn) -> bytes:
    """A varint as encoders write it, padded with redundant continuation bytes (up to 12 bytes in
    all: the reader takes at most 10), or with bits past the 64th in its tenth byte."""
    value = draw(st.one_of(st.integers(0, 300), st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 70) - 1)))
    raw = bytearray(varint(value))
    padding = draw(st.integers(0, 12 - len(raw))) if len(raw) < 12 and draw(st.booleans()) else 0
    if padding:
        raw[-1] |= 0x80
        raw.extend(b"\x80" * (padding - 1) + b"\x00")
    return bytes(raw)


# Characters of every class the text rule tells apart: printable ASCII and the two JSON escapes,
# tab/LF/CR, other controls and DEL, printable non-ASCII (2-, 3- and 4-byte UTF-8), separators
# and format characters (not printable), private use, unassigned, the last code point.
special_characters = st.sampled_from(
    [
        *' "\\/az~\t\n\r\x00\x01\x08\x0b\x0c\x1f\x7f\x80\x85\xa0\xad\xe9\u0378\u200b\u2028\u3000\ue000\ufeff\uffff',
        *("\U0001f600", "\U000e0001", "\U0010ffff", "\u4e2d", "\u0600"),
    ]
)
printable = st.one_of(st.sampled_from('"\\\t\n\r'), st.characters(codec="utf-8").filter(lambda ch: ch.isprintable()))
text_payloads = st.one_of(
    # Text (each character printable, or tab/LF/CR): a JSON string, escaped where it must be.
    st.text(printable, min_size=1, max_size=12).map(lambda text: text.encode()),
    st.text(st.characters(codec="utf-8"), max_size=12).map(lambda text: text.encode()),
    st.text(st.one_of(special_characters, st.characters(max_codepoint=0x7F)), max_size=12).map(
        lambda text: text.encode()
    ),
    # Lone surrogates as UTF-8 would spell them (the strict decoder refuses them).
    st.text(st.characters(categories=["Cs", "Lu", "Nd"]), max_size=6).map(
        lambda text: text.encode("utf-8", "surrogatepass")
    ),
)
# Byte sequences a strict UTF-8 decoder must refuse (or accept at the edges), spliced into text.
utf8_edges = st.sampled_from(
    [
        b"\xc0\x80", b"\xc1\xbf", b"\xc2\x80", b"\xc2", b"\xdf\xbf", b"\xe0\x80\x80", b"\xe0\x9f\xbf",
        b"\xe0\xa0\x80", b"\xed\x9f\xbf", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xee\x80\x80", b"\xef\xbf\xbf",
        b"\xef\xbf", b"\xf0\x8f\xbf\xbf", b"\xf0\x90\x80\x80", b"\xf4\x8f\xbf\xbf", b"\xf4\x90\x80\x80",
        b"\xf5\x80\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xff", b"\x80", b"\xbf", b"\xe2\x80", b"\xe2\x80\xa8",
    ]
)  # fmt: skip
byte_payloads = st.one_of(
    text_payloads,
    st.lists(st.one_of(text_payloads, utf8_edges), min_size=1, max_size=4).map(b"".join),
    st.binary(max_size=16),
)
# A field that stops the reader: number 0 or past 2**29-1, a stray end-group, the invalid wire
# types 6 and 7, a length past the end.
bad_fields = st.one_of(
    st.tuples(st.sampled_from([0, MAX_FIELD_NUMBER + 1, (1 << 61) - 1]), st.integers(0, 5)).map(
        lambda item: key(*item)
    ),
    st.tuples(numbers, st.sampled_from([4, 6, 7])).map(lambda item: key(*item)),
    st.tuples(numbers, st.binary(max_size=3)).map(lambda item: key(item[0], 2) + varint(len(item[1]) + 2) + item[1]),
)
leaf_fields = st.one_of(
    st.tuples(numbers, varint_bytes()).map(lambda item: key(item[0], 0) + item[1]),
    st.tuples(numbers, st.binary(min_size=8, max_size=8)).map(lambda item: key(item[0], 1) + item[1]),
    st.tuples(numbers, st.binary(min_size=4, max_size=4)).map(lambda item: key(item[0], 5) + item[1]),
    st.tuples(numbers, byte_payloads).map(lambda item: ld(*item)),
    st.tuples(numbers, text_payloads).map(lambda item: ld(*item)),
    st.tuples(numbers, st.just(b"")).map(lambda item: ld(*item)),
    bad_fields,
)


def fields(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """One field whose nested messages and groups hold fields drawn from `children` (a group ended
    by its own number mostly; by another one, or never, sometimes)."""
    body = st.lists(children, max_size=4).map(b"".join)
    nested = st.tuples(numbers, body).map(lambda item: ld(*item))
    ends = st.sampled_from(["same", "same", "same", "other", "none"])
    group = st.tuples(numbers, body, ends).map(
        lambda item: (
            key(item[0], 3) + item[1] + {"same": key(item[0], 4), "other": key(item[0] + 1, 4), "none": b""}[item[2]]
        )
    )
    return st.one_of(nested, group, leaf_fields)


any_field = st.recursive(leaf_fields, fields, max_leaves=12)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """A message of a few fields (a field number often repeated: the list rule); sometimes cut
    short, or followed by bytes that may not parse."""
    data = b"".join(draw(st.lists(any_field, max_size=8)))
    damage = draw(st.sampled_from(["none", "none", "none", "none", "tail", "cut"]))
    if damage == "tail":
        data += draw(st.binary(min_size=1, max_size=4))
    elif damage == "cut" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    return data


depths = st.one_of(st.just(8), st.integers(-1, 4))
budgets = st.one_of(st.just(512), st.integers(-1, 24))


@settings(max_examples=scaled(300))
@given(data=st.binary(max_size=64), max_depth=depths, max_fields=budgets)
def test_arbitrary_bytes(data: bytes, max_depth: int, max_fields: int) -> None:
    check(data, max_depth, max_fields)


@settings(max_examples=scaled(300))
@given(data=messages())
def test_generated_messages(data: bytes) -> None:
    check(data)


@settings(max_examples=scaled(300))
@given(data=messages(), max_depth=depths, max_fields=budgets)
def test_generated_messages_small_limits(data: bytes, max_depth: int, max_fields: int) -> None:
    check(data, max_depth, max_fields)


@settings(max_examples=scaled(100))
@given(
    order=st.lists(
        st.one_of(st.integers(1, 5), st.sampled_from([64, 100, MAX_FIELD_NUMBER])), min_size=60, max_size=150
    )
)
def test_many_fields_with_repeats(order: list[int]) -> None:
    """More fields in one message than the C groups by a quadratic scan (64): the sort path."""
    data = b"".join(key(number, 0) + varint(index) for index, number in enumerate(order))
    check(data)
    check(ld(1, data) + ld(1, data[:7]), max_fields=10_000)


# -- one example per rule -----------------------------------------------------------------------------

EXAMPLES = [
    pytest.param(b"", 8, 512, "{}", id="empty"),
    pytest.param(b"\n\x07order-1\x10\x01", 8, 512, '{"1":"order-1","2":1}', id="string-and-varint"),
    # Keys in order of first appearance, a repeated field as the list of its values.
    pytest.param(b"\x10\x01\x08\x02\x10\x03\x08\x04\x18\x05", 8, 512, '{"2":[1,3],"1":[2,4],"3":5}', id="repeated"),
    pytest.param(key(1000, 0) + b"\x01" + key(64, 0) + b"\x02" + key(1000, 0) + b"\x03", 8, 512,
                 '{"1000":[1,3],"64":2}', id="large-numbers"),
    pytest.param(key(MAX_FIELD_NUMBER, 0) + b"\x00", 8, 512, f'{{"{MAX_FIELD_NUMBER}":0}}', id="largest-number"),
    pytest.param(key(1, 0) + b"\x01" + key(MAX_FIELD_NUMBER + 1, 0) + b"\x00", 8, 512,
                 '{"1":1,"@undecoded":"' + b64(key(MAX_FIELD_NUMBER + 1, 0) + b"\x00") + '"}', id="number-too-large"),
    pytest.param(b"\x00\x01", 8, 512, '{"@undecoded":"AAE="}', id="number-zero"),
    # Varints: unsigned 64-bit; ten bytes at most, bits past the 64th dropped.
    pytest.param(b"\x08" + varint((1 << 64) - 1), 8, 512, '{"1":18446744073709551615}', id="varint-max"),
    pytest.param(b"\x08" + b"\xff" * 9 + b"\x7f", 8, 512, '{"1":18446744073709551615}',
                 id="varint-10th-byte-high-bits"),
    pytest.param(b"\x08" + b"\x80" * 9 + b"\x00", 8, 512, '{"1":0}', id="varint-padded-to-10"),
    pytest.param(b"\x08" + b"\x80" * 10 + b"\x00", 8, 512, '{"@undecoded":"CICAgICAgICAgIAA"}', id="varint-11-bytes"),
    pytest.param(b"\x08\x80", 8, 512, '{"@undecoded":"CIA="}', id="varint-cut"),
    pytest.param(b"\x09\x01\x02\x03\x04\x05\x06\x07\x08\x15\xff\xff\xff\xff", 8, 512,
                 '{"1":578437695752307201,"2":4294967295}', id="fixed64-fixed32"),
    pytest.param(b"\x09\x01\x02", 8, 512, '{"@undecoded":"CQEC"}', id="fixed64-cut"),
    pytest.param(b"\x0e\x01", 8, 512, '{"@undecoded":"DgE="}', id="wire-type-6"),
    # Length-delimited: empty, text, escapes, not printable, invalid UTF-8, nested, bytes.
    pytest.param(b"\x0a\x00", 8, 512, '{"1":""}', id="empty-string"),
    pytest.param(ld(1, 'a"b\\c\td\ne\rf/é中😀'.encode()), 8, 512, '{"1":"a\\"b\\\\c\\td\\ne\\rf/é中😀"}', id="escapes"),
    pytest.param(ld(1, b"a\x00b"), 8, 512, '{"1":{"@bytes":"YQBi"}}', id="control-is-bytes"),
    pytest.param(ld(1, b"a\x0cb"), 8, 512, '{"1":{"@bytes":"YQxi"}}', id="form-feed-is-bytes"),
    pytest.param(ld(1, "a\u00a0b".encode()), 8, 512, '{"1":{"@bytes":"YcKgYg=="}}', id="nbsp-not-printable"),
    pytest.param(ld(1, "a\u2028".encode()), 8, 512, '{"1":{"@bytes":"YeKAqA=="}}', id="line-separator"),
    pytest.param(ld(1, b"\xed\xa0\x80"), 8, 512, '{"1":{"@bytes":"7aCA"}}', id="surrogate"),
    pytest.param(ld(1, b"\xc0\xaf"), 8, 512, '{"1":{"@bytes":"wK8="}}', id="overlong"),
    pytest.param(ld(1, b"\xf4\x90\x80\x80"), 8, 512, '{"1":{"@bytes":"9JCAgA=="}}', id="above-10ffff"),
    pytest.param(ld(1, "\U0010ffff".encode()), 8, 512, '{"1":{"@bytes":"9I+/vw=="}}', id="noncharacter"),
    pytest.param(ld(1, b"hi"), 8, 512, '{"1":"hi"}', id="text-before-message"),
    pytest.param(ld(1, b"\x08\x96\x01"), 8, 512, '{"1":{"1":150}}', id="nested"),
    pytest.param(ld(1, b"\x08\x96\x01"), 1, 512, '{"1":{"@bytes":"CJYB"}}', id="nested-too-deep"),
    pytest.param(ld(1, b"\x08\x96\x01\xff"), 8, 512, '{"1":{"@bytes":"CJYB/w=="}}', id="nested-not-to-its-end"),
    pytest.param(ld(1, b"\x0a\x05"), 8, 512, '{"1":{"@bytes":"CgU="}}', id="nested-length-past-end"),
    pytest.param(b"\x0a\x05ab", 8, 512, '{"@undecoded":"CgVhYg=="}', id="length-past-end"),
    # Groups: a nested object; ended by its own number only; too deep; never ended.
    pytest.param(b"\x0b\x08\x01\x0c\x10\x02", 8, 512, '{"1":{"1":1},"2":2}', id="group"),
    pytest.param(b"\x0b\x0c", 8, 512, '{"1":{}}', id="empty-group"),
    pytest.param(b"\x0b\x08\x01\x14", 8, 512, '{"1":{"1":1},"@undecoded":"FA=="}', id="group-other-end"),
    pytest.param(b"\x0b\x08\x01", 8, 512, '{"@undecoded":"CwgB"}', id="group-never-ended"),
    pytest.param(b"\x0b\x0c", 1, 512, '{"@undecoded":"Cww="}', id="group-too-deep"),
    pytest.param(b"\x0c", 8, 512, '{"@undecoded":"DA=="}', id="stray-end-group"),
    pytest.param(ld(2, b"\x0b\x08\x01\x0c"), 8, 512, '{"2":{"1":{"1":1}}}', id="group-in-nested"),
    # A group that stops early returns what it read; its caller goes on from there.
    pytest.param(b"\x1b\x0b\x08\x01\x1c\x1c", 8, 512, '{"3":{"1":{"1":1}},"@undecoded":"HA=="}',
                 id="group-ends-caller"),
    # The field budget: every read counts, failed nesting attempts included.
    pytest.param(b"\x08\x01\x10\x02", 8, 1, '{"1":1,"@undecoded":"EAI="}', id="budget"),
    pytest.param(b"\x08\x01", 8, 0, '{"@undecoded":"CAE="}', id="no-budget"),
    pytest.param(b"\x08\x01", 8, -5, '{"@undecoded":"CAE="}', id="negative-budget"),
    pytest.param(ld(1, b"\x08\x01\x10\x02") + b"\x18\x03", 8, 2,
                 '{"1":{"@bytes":"CAEQAg=="},"@undecoded":"GAM="}', id="budget-spent-nesting"),
    pytest.param(ld(1, b"\x08\x01\x10\x02") + b"\x18\x03", 8, 4, '{"1":{"1":1,"2":2},"3":3}', id="budget-enough"),
    pytest.param(ld(1, b"\x08\x01"), 0, 512, '{"1":{"@bytes":"CAE="}}', id="depth-zero-is-one"),
    pytest.param(b"\xff\xff", 8, 512, '{"@undecoded":"//8="}', id="not-protobuf"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "max_depth", "max_fields", "expected"), EXAMPLES)
def test_examples(data: bytes, max_depth: int, max_fields: int, expected: str) -> None:
    assert check(data, max_depth, max_fields) == expected


def test_defaults() -> None:
    assert schemaless_json(b"\x08\x01") == ('{"1":1}', 7)


def test_deep_nesting_is_not_c_recursion() -> None:
    """Nesting is a heap stack in C, not recursion: depth is bounded by max_depth alone, and a
    hundred thousand levels (far past Python's recursion limit) come out whole."""
    levels = 100_000
    data = b"\x0b" * levels + b"\x08\x01" + b"\x0c" * levels
    text, chars = schemaless_json(data, levels + 1, 10 * levels)
    assert text == '{"1":' * levels + '{"1":1}' + "}" * levels
    assert chars == len(text)
    # Within the reference's reach, the two still agree, group and length-delimited nesting alike.
    message = b"\x08\x01"
    for _ in range(60):
        message = ld(2, message)
    check(message, 100)
    check(b"\x0b" * 60 + b"\x08\x01" + b"\x0c" * 60, 100, 1000)
