"""Shard ownership without a bus: the plan each replica follows, simulated over rounds until it
settles, and the engine ending the flows of one shard only."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import scaled
from tests.unit.dissector_builders import Conversation, batch
from tests.unit.dissector_builders import settings as dissector_settings
from trawl.dissector.engine import Dissector
from trawl.dissector.shards import Plan, parse_lease, plan, released_value, targets
from trawl.v1.calls_pb2 import Outcome


def test_targets_split_evenly_and_give_the_remainder_to_the_members_that_hold_most() -> None:
    assert targets(4, ["a", "b"], {}) == {"a": 2, "b": 2}
    # b holds 3 now: b keeps the extra shard, so only one shard moves when c joins.
    assert targets(4, ["a", "b", "c"], {0: "a", 1: "b", 2: "b", 3: "b"}) == {"b": 2, "a": 1, "c": 1}
    assert targets(2, ["a", "b", "c"], {}) == {"a": 1, "b": 1, "c": 0}
    assert sum(targets(7, ["x", "y", "z"], {}).values()) == 7
    assert targets(3, [], {}) == {}


def test_a_lone_replica_claims_every_shard() -> None:
    assert plan("a", 4, ["a"], {}) == Plan(release=[], claim=[0, 1, 2, 3])


def test_a_joining_replica_gets_its_share_from_the_owner_above_target() -> None:
    owners = {0: "a", 1: "a", 2: "a", 3: "a"}
    assert plan("a", 4, ["a", "b"], owners) == Plan(release=[2, 3], claim=[])
    assert plan("b", 4, ["a", "b"], owners) == Plan(release=[], claim=[])  # nothing free yet
    assert plan("b", 4, ["a", "b"], {0: "a", 1: "a"}) == Plan(release=[], claim=[2, 3])


def test_no_release_while_free_shards_can_fill_the_short_members() -> None:
    owners = {0: "a", 1: "a", 2: "a"}
    # b needs 2; shard 3 is free, so a releases only one.
    assert plan("a", 4, ["a", "b"], owners) == Plan(release=[2], claim=[])
    # Balanced: nothing moves.
    assert plan("a", 4, ["a", "b"], {0: "a", 1: "b", 2: "a", 3: "b"}) == Plan(release=[], claim=[])


def test_a_dead_owners_shards_are_claimed_once_its_lease_is_gone() -> None:
    # b's leases expired (shards 2, 3 free) and so did its heartbeat: a takes all.
    assert plan("a", 4, ["a"], {0: "a", 1: "a"}) == Plan(release=[], claim=[2, 3])
    # b's heartbeat is still there but its leases are gone: a claims within its target only...
    assert plan("a", 4, ["a", "b"], {0: "a", 1: "a"}) == Plan(release=[], claim=[])
    # ...until the shards have stayed free for a whole round.
    assert plan("a", 4, ["a", "b"], {0: "a", 1: "a"}, free_before=frozenset({2, 3})) == Plan(release=[], claim=[2, 3])


def test_leases_of_shards_that_do_not_exist_are_ignored() -> None:
    assert plan("a", 2, ["a"], {5: "b"}) == Plan(release=[], claim=[0, 1])


def test_lease_values_say_who_owns_or_where_the_last_owner_stopped() -> None:
    assert parse_lease(b"dissector-7") == ("dissector-7", {})
    assert parse_lease(released_value("r1", {"node-a": 41, "node-b": 7})) == (None, {"node-a": 41, "node-b": 7})
    # A free marker that is not what we write still frees the shard.
    assert parse_lease(b"{not json") == (None, {})
    assert parse_lease(b'{"sequences": [1, 2]}') == (None, {})


def _settle(shards: int, members: list[str], owners: dict[int, str], rounds: int = 12) -> dict[int, str]:
    """Every member plays its plan in turn against the shared leases (create: first one wins)."""
    free_before: dict[str, frozenset[int]] = {member: frozenset() for member in members}
    for _ in range(rounds):
        for member in members:
            decided = plan(member, shards, members, owners, free_before[member])
            free_before[member] = frozenset(shard for shard in range(shards) if shard not in owners)
            for shard in decided.release:
                assert owners.pop(shard) == member
            for shard in decided.claim:
                owners.setdefault(shard, member)
    return owners


@settings(max_examples=scaled(200), deadline=None)
@given(
    shards=st.integers(1, 16),
    before=st.integers(1, 5),
    after=st.integers(1, 5),
)
def test_rounds_settle_on_one_owner_per_shard_and_a_fair_split(shards: int, before: int, after: int) -> None:
    first = [f"r{index}" for index in range(before)]
    owners = _settle(shards, first, {})
    # Replicas come and go (the last ones of the first group die, their leases expire).
    second = [f"r{index}" for index in range(after)]
    owners = {shard: owner for shard, owner in owners.items() if owner in second}
    owners = _settle(shards, second, owners)
    assert sorted(owners) == list(range(shards))
    counts = [sum(1 for owner in owners.values() if owner == member) for member in second]
    assert max(counts) - min(counts) <= 1
    # Settled means settled: another round changes nothing.
    assert _settle(shards, second, dict(owners), rounds=1) == owners


@pytest.mark.parametrize("shard_to_end", [0, 1])
def test_finish_of_one_shard_ends_only_that_shards_flows(shard_to_end: int) -> None:
    engine = Dissector(dissector_settings(), "n1")
    requests = {
        0: Conversation(client_port=40000).handshake().client_sends(b"GET /zero HTTP/1.1\r\n\r\n"),
        1: Conversation(client_port=40001).handshake().client_sends(b"GET /one HTTP/1.1\r\n\r\n"),
    }
    for shard, conversation in requests.items():
        assert engine.feed(batch(conversation.frames, shard=shard)) == []
    assert engine.counters["tcp_flows_active"] == 2
    (call,) = [call for call in engine.finish(shard=shard_to_end) if call.protocol == "http"]
    assert call.path == ("/zero" if shard_to_end == 0 else "/one")
    assert call.outcome == Outcome.OUTCOME_NO_RESPONSE and call.shard == shard_to_end
    assert engine.counters["tcp_flows_active"] == 1
    assert engine.finish(node="another-node") == []
    (other,) = [call for call in engine.finish() if call.protocol == "http"]
    assert other.shard == 1 - shard_to_end


def test_finish_of_a_node_ends_its_icmp_state_and_a_shard_does_not() -> None:
    from tests.unit.dissector_builders import ethernet, ip_packet

    echo_request = b"\x08\x00\x00\x00\x12\x34\x00\x01" + b"ping"
    frame = ethernet(ip_packet("10.0.0.1", "10.0.0.2", 1, echo_request))
    engine = Dissector(dissector_settings(), "n1")
    assert engine.feed(batch([(1_700_000_000_000_000_000, frame)], shard=2)) == []
    assert engine.finish(node="n1", shard=2) == []  # ICMP spans shards: it waits
    (call,) = engine.finish(node="n1")
    assert call.protocol == "icmp" and call.outcome == Outcome.OUTCOME_NO_RESPONSE


@settings(deadline=None)
@given(st.binary(max_size=64) | st.builds(lambda depth: b'{"sequences": ' + b"[" * depth, st.integers(0, 5000)))
def test_any_lease_value_parses_to_an_owner_or_a_free_shard(value: bytes) -> None:
    owner, sequences = parse_lease(value)
    assert (owner is None) == value.startswith(b"{")
    assert all(isinstance(sequence, int) for sequence in sequences.values())
