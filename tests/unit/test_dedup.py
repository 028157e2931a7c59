"""RecentIds: a redelivered id is seen once, and only the last `capacity` ids are remembered."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trawl.dedup import RecentIds


def test_a_repeat_is_refused_and_the_oldest_is_forgotten_first() -> None:
    recent = RecentIds(3)
    assert [recent.first_time(i) for i in ("a", "b", "a", "c")] == [True, True, False, True]
    assert recent.first_time("d")  # "a" leaves: the oldest
    assert "a" not in recent and {"b", "c", "d"} <= {i for i in "abcd" if i in recent}
    assert len(recent) == 3
    assert recent.first_time("a")  # forgotten, so new again
    assert "b" not in recent


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        RecentIds(0)


@given(capacity=st.integers(1, 8), ids=st.lists(st.sampled_from("abcdefghijkl"), max_size=200))
def test_as_a_window_of_the_last_distinct_ids(capacity: int, ids: list[str]) -> None:
    """The same answers as a plain model: a FIFO of the distinct ids remembered, a repeat of a
    remembered id refused (and not moved to the back)."""
    recent = RecentIds(capacity)
    window: deque[str] = deque()
    for call_id in ids:
        expected = call_id not in window
        if expected:
            window.append(call_id)
            if len(window) > capacity:
                window.popleft()
        assert recent.first_time(call_id) is expected
        assert len(recent) == len(window)
        assert all(remembered in recent for remembered in window)


@given(
    capacity=st.integers(1, 8),
    batches=st.lists(st.lists(st.sampled_from("abcdefghijkl"), max_size=12), max_size=20),
)
def test_remembering_a_batch_is_first_time_for_each_of_its_ids(capacity: int, batches: list[list[str]]) -> None:
    """The alerter remembers a batch's ids at once, after its alerts are stored: ids it checked
    were not remembered, each once. The window is the one first_time leaves, id after id."""
    batched, one_by_one = RecentIds(capacity), RecentIds(capacity)
    for drawn in batches:
        batch = [call_id for call_id in dict.fromkeys(drawn) if call_id not in batched]
        batched.remember(batch)
        assert all(one_by_one.first_time(call_id) for call_id in batch)
        assert len(batched) == len(one_by_one) <= capacity
        assert [i for i in "abcdefghijkl" if i in batched] == [i for i in "abcdefghijkl" if i in one_by_one]
