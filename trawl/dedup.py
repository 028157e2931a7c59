"""Remembering the calls a consumer already handled, so a redelivery is handled once.

JetStream delivers at least once: a consumer that dies (or a NATS server that restarts) before
an ack gets the message again, and a dissector that takes a shard over re-derives the calls its
predecessor published after its last checkpoint (with the same ids, `calls.call_id`). The
streams drop a re-published id inside their duplicate window (Nats-Msg-Id), but a consumer that
already read the first copy must also skip the second: the enricher (TRAWL_CALLS) and the
alerter (TRAWL_ENRICHED) keep the ids they handled last in a `RecentIds`.
"""

from __future__ import annotations


class RecentIds:
    """The last `capacity` ids seen, oldest forgotten first; O(1) per id.

    A dict keeps insertion order, so the oldest id is its first key: no second structure and
    no sort. `capacity` bounds memory (about 100 bytes an id); it should cover the calls of
    one redelivery window (ack wait, or a checkpoint interval) at the peak call rate.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._ids: dict[str, None] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, call_id: object) -> bool:
        return call_id in self._ids

    def first_time(self, call_id: str) -> bool:
        """True the first time `call_id` is seen (and remember it); False for a repeat."""
        ids = self._ids
        if call_id in ids:
            return False
        ids[call_id] = None
        if len(ids) > self.capacity:
            del ids[next(iter(ids))]
        return True
