"""Windowed rules' groups in Redis (trawl.alerter.window_store) against a real redis-server:
judged as the in-process windows judge the same calls (hypothesis, any batch boundaries and
sweeps), one firing and one resolution when two replicas share the calls of a group, an alert
decided but not stored announced again by another replica, bounded groups, and Redis away."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import needs_binary, scaled
from tests.fixtures.redis.make_redis_fixtures import server
from tests.fixtures.tcpdump_capture import free_port
from tests.unit.test_alerter_windows import ERROR_RATIO_RULE, T0, alerter, http, run, steady_then_burst_then_steady
from trawl.alerter.config import AlerterSettings
from trawl.alerter.logic import Alerter
from trawl.alerter.rules import parse_rules
from trawl.alerter.window_store import SharedWindows, decode_state, encode_state
from trawl.alerter.windows import (
    SECOND_NS,
    Observation,
    Transition,
    Windows,
    WindowSpec,
    WindowStoreError,
    parse_aggregate,
)
from trawl.errors import ConfigError
from trawl.metrics import Registry
from trawl.v1 import alerts_pb2
from trawl.v1.calls_pb2 import Outcome

pytestmark = [needs_binary("redis-server")]


@pytest.fixture(scope="module")
def redis_client() -> Iterator[redis.Redis]:
    """One redis-server for these tests (no persistence); each test keys under its own prefix."""
    port = free_port()
    with server(port):
        client = redis.Redis(port=port)
        yield client
        client.close()


def shared(client: redis.Redis, **options: object) -> SharedWindows:
    return SharedWindows(client, f"test:{uuid.uuid4().hex}", **options)  # type: ignore[arg-type]


def spec(aggregate: str, window_s: float = 10, min_calls: int = 1, for_s: float = 0) -> WindowSpec:
    parsed = parse_aggregate(aggregate)
    assert not isinstance(parsed, str)
    return WindowSpec(window_s, parsed, min_calls, for_s)


SPECS = {
    "errors": spec("error_ratio > 0.3", 10, min_calls=3),
    "slow": spec("p90(elapsed) > 50ms", 5, min_calls=2, for_s=2),
    "busy": spec("count >= 4", 3),
}


def render(transition: Transition) -> alerts_pb2.Alert:
    firing = f"{transition.firing_since_ns}{'/resolved' if transition.resolved else ''}"
    return alerts_pb2.Alert(
        id=f"{transition.rule}/{transition.group}/{firing}", rule=transition.rule, group=transition.group
    )


@st.composite
def steps(draw: st.DrawFn) -> list[tuple[str, list[Observation] | int]]:
    """Batches of observations (calls a little out of order too) and sweeps between them."""
    out: list[tuple[str, list[Observation] | int]] = []
    now = T0
    for _ in range(draw(st.integers(1, 25))):
        if draw(st.integers(0, 4)) == 0:
            now += draw(st.sampled_from([0, SECOND_NS // 2, 2 * SECOND_NS, 7 * SECOND_NS]))
            out.append(("sweep", now))
            continue
        batch = []
        for _ in range(draw(st.integers(1, 12))):
            now += draw(st.sampled_from([0, 10_000_000, 300_000_000, SECOND_NS, 4 * SECOND_NS]))
            late = draw(st.sampled_from([0, 0, 0, 1_500_000_000]))  # an older call, after newer ones
            rule = draw(st.sampled_from(sorted(SPECS)))
            batch.append(
                Observation(
                    rule,
                    SPECS[rule],
                    draw(st.sampled_from(["a", "b", "ü/c"])),
                    now - late,
                    draw(st.sampled_from([1_000_000, 20_000_000, 80_000_000, 400_000_000])),
                    draw(st.sampled_from([Outcome.OUTCOME_OK, Outcome.OUTCOME_OK, Outcome.OUTCOME_ERROR])),
                )
            )
        out.append(("batch", batch))
    return out


@given(script=steps())
@settings(max_examples=scaled(80), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_redis_windows_judge_as_the_in_process_windows(
    redis_client: redis.Redis, script: list[tuple[str, list[Observation] | int]]
) -> None:
    """The same calls, batch by batch, and the same sweeps: the same transitions in the same
    order (sweeps: the same set), the same group states, and groups forgotten alike."""
    local = Windows()
    store = shared(redis_client)
    for kind, value in script:
        if kind == "sweep":
            assert isinstance(value, int)
            expected = local.sweep(SPECS, value)
            found = [transition for transition, _ in store.sweep(SPECS, value, render)]
            assert sorted(found, key=repr) == sorted(expected, key=repr)
            continue
        assert isinstance(value, list)
        expected = [t for o in value if (t := local.observe(o.rule, o.spec, o.group, o.ts_ns, o.elapsed_ns, o.outcome))]
        decided = store.observe_batch(value, render)
        assert [transition for transition, _ in decided] == expected
        assert [alert.id for _, alert in decided] == [render(t).id for t in expected]
    remote = {}
    for member in redis_client.zrange(store.due_key, 0, -1):
        rule, group = json.loads(member)
        blob = redis_client.get(store._key(member.decode()))
        assert blob is not None
        remote[(rule, group)] = encode_state(decode_state(blob, SPECS[rule].window_s))
    assert remote == {key: encode_state(state) for key, state in local.groups.items()}


def test_alerter_flushing_each_call_matches_in_process(redis_client: redis.Redis) -> None:
    """Through Alerter (flush after each call): the same alerts, ids, values and summaries."""
    calls = steady_then_burst_then_steady() + [http(60 + index, "503", workload="payments") for index in range(8)]
    expected = run(alerter(ERROR_RATIO_RULE), calls)
    target = Alerter(
        parse_rules(ERROR_RATIO_RULE, "rules.yaml", {}),
        Registry(),
        clock=lambda: 0.0,
        window_store=shared(redis_client),
    )
    found = []
    for call in calls:
        found += target.evaluate(call)
        found += target.flush()
        target.announced(found)
    found += target.sweep(T0 + 200 * SECOND_NS)
    expected += alerter(ERROR_RATIO_RULE).sweep(T0 + 200 * SECOND_NS)  # a fresh one has nothing to resolve
    assert [alert.resolved for alert in expected] == [False, True, False]
    assert [(a.id, a.resolved, a.value, a.window_calls, a.summary) for a in found[: len(expected)]] == [
        (a.id, a.resolved, a.value, a.window_calls, a.summary) for a in expected
    ]
    # The payments group resolves once the sweep passes its window.
    assert [(a.group, a.resolved) for a in found[len(expected) :]] == [("payments", True)]


def test_two_replicas_sharing_a_group_fire_once_and_resolve_once(redis_client: redis.Redis) -> None:
    """A burst of errors whose calls are split between two replicas, each judging its batches in
    its own thread at the same time: one firing and one resolution between them, and every
    call counted once in the shared window."""
    rules = parse_rules(ERROR_RATIO_RULE, "rules.yaml", {})
    prefix = f"test:{uuid.uuid4().hex}"
    replicas = [
        Alerter(rules, Registry(), clock=lambda: 0.0, window_store=SharedWindows(redis_client, prefix))
        for _ in range(2)
    ]
    calls = [http(index * 0.01) for index in range(600)]  # 6 s of 200s
    # 3 s of 503s: the ratio over the 10 s window rises to 0.3 and falls with no call-by-call
    # wiggle near 0.2 (where two replicas' interleaving could flip it back and forth)
    calls += [http(6 + index * 0.01, "503") for index in range(300)]
    calls += [http(9 + index * 0.01) for index in range(1600)]  # 16 s of 200s
    halves = [calls[0::2], calls[1::2]]
    alerts: list[list[alerts_pb2.Alert]] = [[], []]

    # Batch by batch together, as two consumers of one stream go (a barrier per round): both in
    # their transactions at once, neither more than a batch ahead of the other in the calls' time.
    rounds = threading.Barrier(2)

    def replica(index: int) -> None:
        target, mine = replicas[index], halves[index]
        for start in range(0, len(mine), 16):
            rounds.wait()
            for call in mine[start : start + 16]:
                alerts[index].extend(target.evaluate(call))
            alerts[index].extend(target.flush())
            target.announced(alerts[index])

    threads = [threading.Thread(target=replica, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = sorted(alerts[0] + alerts[1], key=lambda alert: alert.resolved)
    assert [alert.resolved for alert in every] == [False, True]
    assert every[0].fired_at == every[1].fired_at
    assert every[0].value > 0.2
    # Each call is in the shared window once: at the end the window (10 s) holds exactly the last
    # 10 s of calls, whichever replica took them.
    state_key = replicas[0].shared._key('["checkout-errors","checkout"]')  # type: ignore[union-attr]
    blob = redis_client.get(state_key)
    assert blob is not None
    state = decode_state(blob, 10)
    newest = max(call.request.ts for call in calls)
    oldest = (newest - 10 * SECOND_NS) // SECOND_NS
    assert state.window.stats(newest).count == sum(1 for call in calls if call.request.ts // SECOND_NS > oldest)


def test_an_alert_its_replica_did_not_store_is_announced_again_by_another(redis_client: redis.Redis) -> None:
    clock = [1000.0]
    prefix = f"test:{uuid.uuid4().hex}"
    first = SharedWindows(redis_client, prefix, claim_s=5, clock=lambda: clock[0])
    second = SharedWindows(redis_client, prefix, claim_s=5, clock=lambda: clock[0])
    burst = [Observation("errors", SPECS["errors"], "a", T0 + i, 1, Outcome.OUTCOME_ERROR) for i in range(3)]
    decided = first.observe_batch(burst, render)
    assert [t.resolved for t, _ in decided] == [False]
    # The first replica dies before storing it: within its claim nobody takes it, after it one does.
    assert second.unannounced() == []
    clock[0] += 6
    again = second.unannounced()
    assert [alert.id for alert in again] == [decided[0][1].id]
    assert second.unannounced() == []  # claimed again by the second
    second.announced(alert.id for alert in again)
    clock[0] += 60
    assert second.unannounced() == []
    # One stored in time is never announced again.
    later = first.observe_batch(
        [Observation("busy", SPECS["busy"], "b", T0 + i, 1, Outcome.OUTCOME_OK) for i in range(4)], render
    )
    first.announced(alert.id for _, alert in later)
    clock[0] += 60
    assert second.unannounced() == []


def test_groups_are_capped_the_overflow_counted_and_the_state_expires(redis_client: redis.Redis) -> None:
    store = shared(redis_client, max_groups=2)
    observations = [Observation("busy", SPECS["busy"], name, T0, 1, Outcome.OUTCOME_OK) for name in "abcd"]
    store.observe_batch(observations, render)
    assert store.overflow == 2
    assert store.groups == 2
    ttl = redis_client.ttl(store._key('["busy","a"]'))
    assert 0 < ttl <= 2 * 3 + 60


def test_redis_away_is_a_window_store_error() -> None:
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2)
    store = SharedWindows(client, "test:away")
    observation = Observation("busy", SPECS["busy"], "a", T0, 1, Outcome.OUTCOME_OK)
    with pytest.raises(WindowStoreError):
        store.observe_batch([observation], render)
    with pytest.raises(WindowStoreError):
        store.sweep(SPECS, T0, render)
    target = Alerter(parse_rules(ERROR_RATIO_RULE, "rules.yaml", {}), Registry(), window_store=store)
    target.evaluate(http(1, "503"))
    with pytest.raises(WindowStoreError):
        target.flush()


def test_a_bad_redis_setting_names_the_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "trawl.yaml"
    config.write_text("alerter:\n  redis:\n    url: http://cache:6379\n")
    with pytest.raises(ConfigError, match=r"trawl\.yaml:3: redis\.url: .*redis\|rediss\|unix"):
        AlerterSettings.load(config)
    config.write_text("alerter:\n  redis:\n    url: redis://cache:6379/0\n    claim_s: 0\n")
    with pytest.raises(ConfigError, match=r"trawl\.yaml:4: redis\.claim_s"):
        AlerterSettings.load(config)
    config.write_text("alerter:\n  redis:\n    url: redis://cache:6379/0\n")
    loaded = AlerterSettings.load(config).redis
    assert loaded is not None and loaded.key_prefix == "trawl:alerter"


def test_a_call_redelivered_after_its_batch_was_judged_is_not_counted_again(redis_client: redis.Redis) -> None:
    """A replica killed between its transaction and its ack: the calls come again (to it or to
    another) with the same stream sequences, and stay out of the windows."""
    prefix = f"test:{uuid.uuid4().hex}"
    first, second = SharedWindows(redis_client, prefix), SharedWindows(redis_client, prefix)
    first.stream_id = second.stream_id = "2026-12-05T00:00:00"
    batch = [
        Observation("busy", SPECS["busy"], "a", T0 + index, 1, Outcome.OUTCOME_OK, sequence=100 + index)
        for index in range(3)
    ]
    assert first.observe_batch(batch, render) == []  # 3 calls: count >= 4 does not hold
    assert second.observe_batch(batch, render) == []  # the same 3 again: still 3
    blob = redis_client.get(first._key('["busy","a"]'))
    assert blob is not None and decode_state(blob, 3).window.stats(T0 + 3).count == 3
    # One more call (a new sequence) makes 4; sequences of another incarnation of the stream
    # (made again, numbering from 1) are new calls however they are numbered.
    more = Observation("busy", SPECS["busy"], "a", T0 + 3, 1, Outcome.OUTCOME_OK, sequence=103)
    assert [t.resolved for t, _ in second.observe_batch([more], render)] == [False]
    second.stream_id = "2026-12-05T01:00:00"
    second.observe_batch(batch[:1], render)
    blob = redis_client.get(first._key('["busy","a"]'))
    assert blob is not None and decode_state(blob, 3).window.stats(T0 + 3).count == 5


def test_a_replica_that_saw_no_call_resolves_what_another_fired(redis_client: redis.Redis) -> None:
    """The replica that fired dies; one started after it sees no call at all: it takes the newest
    call time from Redis and, as the clock goes on, resolves the group once its window drained."""
    wall = [100.0]
    prefix = f"test:{uuid.uuid4().hex}"
    rules = parse_rules(ERROR_RATIO_RULE, "rules.yaml", {})

    def replica() -> Alerter:
        store = SharedWindows(redis_client, prefix, clock=lambda: wall[0])
        return Alerter(rules, Registry(), clock=lambda: wall[0], window_store=store)

    first = replica()
    fired = []
    for index in range(8):
        fired += first.evaluate(http(index * 0.25, "503"))
    fired += first.flush()
    first.announced(fired)
    assert [alert.resolved for alert in fired] == [False]
    later = replica()
    wall[0] += 3
    assert later.sweep_idle(wall[0]) == []  # 3 s after the newest call: the 10 s window still holds
    wall[0] += 20
    resolved = later.sweep_idle(wall[0])
    assert [(alert.resolved, alert.fired_at) for alert in resolved] == [(True, fired[0].fired_at)]


COOLDOWN_RULE = """rules:
  - name: server-errors
    condition: 'call.protocol == "http" && int(call.status) >= 500'
    group_by: 'call.dst.workload'
    cooldown: 60s
"""


def test_a_per_call_cooldown_is_shared_by_replicas_and_outlives_a_restart(redis_client: redis.Redis) -> None:
    """A per-call rule with a cooldown, its calls split between two replicas batch by batch: one
    alert a group a cooldown (in the calls' time) between them, as one alerter gives; a replica
    started afresh (a restart: no memory of its own) keeps to the cooldown another started."""
    rules = parse_rules(COOLDOWN_RULE, "rules.yaml", {})
    prefix = f"test:{uuid.uuid4().hex}"

    metrics = Registry()

    def replica() -> Alerter:
        return Alerter(rules, metrics, clock=lambda: 0.0, window_store=SharedWindows(redis_client, prefix))

    # 503s from two workloads every 2 s for 150 s: in one alerter, each fires at 0, 60 and 120 s.
    calls = [http(second, "503", workload) for second in range(0, 150, 2) for workload in ("checkout", "cart")]
    single = Alerter(rules, Registry(), clock=lambda: 0.0)
    expected = [(alert.group, alert.call.request.ts) for call in calls for alert in single.evaluate(call)]
    assert len(expected) == 6

    replicas = [replica(), replica()]
    fired: list[alerts_pb2.Alert] = []
    for start in range(0, len(calls), 8):  # batches of 8, taken in turn by the two replicas
        target = replicas[(start // 8) % 2]
        for call in calls[start : start + 8]:
            fired += target.evaluate(call)
        fired += target.flush()
    assert sorted((alert.group, alert.call.request.ts) for alert in fired) == sorted(expected)
    suppressed = metrics.counter("trawl_alerter_suppressed_total", "").get(rule="server-errors")
    assert suppressed == len(calls) - len(expected)

    restarted = replica()
    assert restarted.evaluate(http(150, "503", "checkout")) == []
    assert restarted.flush() == []  # checkout fired at 120 s: held until 180 s
    late = restarted.evaluate(http(181, "503", "checkout"))
    late += restarted.flush()
    assert [alert.group for alert in late] == ["checkout"]


def test_a_cooldown_claim_made_again_is_granted_to_the_same_alert(redis_client: redis.Redis) -> None:
    """A batch sent back (NATS refused its alerts) is judged again: its alert, made again with the
    same id, still holds the claim it made; and Redis away is a WindowStoreError that leaves the
    replica's own cooldown as it was, so the batch's alert is made again when it comes back."""
    rules = parse_rules(COOLDOWN_RULE, "rules.yaml", {})
    prefix = f"test:{uuid.uuid4().hex}"
    first = Alerter(rules, Registry(), clock=lambda: 0.0, window_store=SharedWindows(redis_client, prefix))
    call = http(10, "503")
    assert first.evaluate(call) == []  # waits for the claim
    (alert,) = first.flush()
    first.forget(alert)  # not stored: the batch comes back
    first.evaluate(call)
    assert [again.id for again in first.flush()] == [alert.id]

    other = http(20, "503", "cart")
    away = Alerter(rules, Registry(), clock=lambda: 0.0, window_store=SharedWindows(redis.Redis(port=1), prefix))
    away.evaluate(other)
    with pytest.raises(WindowStoreError):
        away.flush()
    away.shared = SharedWindows(redis_client, prefix)  # Redis is back: the batch comes again
    away.evaluate(other)
    assert [again.group for again in away.flush()] == ["cart"]
