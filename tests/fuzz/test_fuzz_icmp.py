"""Hypothesis: any ICMP/ICMPv6 bytes give calls or ProtocolError, never another exception, and
the tracker keeps working after an error."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import scaled
from trawl.dissector.protocols.base import ParserLimits, ProtocolError
from trawl.dissector.protocols.icmp import IcmpTracker

FAST = settings(max_examples=scaled(400), deadline=None)
INTERESTING_TYPES = [0, 3, 4, 5, 8, 11, 12, 1, 2, 128, 129, 135]
packets = st.tuples(
    st.sampled_from(["10.0.0.1", "10.0.0.2", "fd00::1"]),
    st.sampled_from(["10.0.0.1", "10.0.0.2", "fd00::2"]),
    st.one_of(
        st.binary(max_size=120),
        st.builds(lambda t, rest: bytes([t]) + rest, st.sampled_from(INTERESTING_TYPES), st.binary(max_size=120)),
        # An error message quoting a plausible IPv4 or IPv6 header with random contents.
        st.builds(
            lambda t, v, rest: bytes([t, 0, 0, 0, 0, 0, 0, 0, v]) + rest,
            st.sampled_from([1, 2, 3, 11]),
            st.sampled_from([0x45, 0x4F, 0x60, 0x41]),
            st.binary(max_size=80),
        ),
    ),
    st.booleans(),
)


@FAST
@given(st.lists(packets, max_size=12))
def test_arbitrary_packets(stream: list[tuple[str, str, bytes, bool]]) -> None:
    tracker = IcmpTracker("n1", ParserLimits(request_timeout_ns=5), max_pending=4)
    for ts, (src, dst, icmp, is_v6) in enumerate(stream):
        try:
            calls = tracker.feed_packet(src, dst, icmp, ts, is_v6)
        except ProtocolError:
            continue
        for call in calls:
            assert call.protocol == "icmp"
            assert call.method
        tracker.expire(ts)
    tracker.finish()
    assert tracker.finish() == []
