"""trawl up's DrainedRelay: the enricher's drained announcement told again to an alerter that
became ready after it (the collector starts with the alerter, so a small file may be drained
before the alerter subscribed), and to nothing else."""

from __future__ import annotations

from trawl.up import DrainedRelay
from trawl.v1.control_pb2 import Drained

SUBJECT = "trawl.v1.control.drained.enricher.node-a"
PAYLOAD = Drained(service="enricher", emitted=6, last_stream_sequence=6).SerializeToString()


def test_an_alerter_ready_after_the_enricher_drained_is_told_again() -> None:
    relay = DrainedRelay()
    relay.drained("dissector", "trawl.v1.control.drained.dissector.node-a", b"d")
    relay.drained("enricher", SUBJECT, PAYLOAD)
    assert relay.ready("recorder") is None
    assert relay.ready("alerter") == (SUBJECT, PAYLOAD)


def test_an_alerter_ready_first_hears_the_announcement_itself() -> None:
    relay = DrainedRelay()
    assert relay.ready("alerter") is None  # subscribed before the enricher drained: nothing to repeat
    relay.drained("enricher", SUBJECT, PAYLOAD)
    assert relay.ready("enricher") is None


def test_the_last_announcement_is_the_one_repeated() -> None:
    relay = DrainedRelay()
    relay.drained("enricher", SUBJECT, b"first")
    relay.drained("enricher", SUBJECT, PAYLOAD)
    assert relay.ready("alerter") == (SUBJECT, PAYLOAD)
