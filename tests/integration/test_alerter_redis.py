"""Alerter processes (`python -m trawl alerter`, what a container runs) sharing one durable
consumer and windowed rules' state in a real redis-server, over a real nats-server: a burst of
5xx answers whose calls they split between them fires once and resolves once, with one of the
two killed with SIGKILL while the group is firing and a third started then. With in-process windows each replica
would judge its own half of the burst (over the threshold too) and alert on its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
import redis
from nats.aio.msg import Msg

from tests.conftest import ROOT, needs_binary
from tests.fixtures.redis.make_redis_fixtures import server
from tests.fixtures.tcpdump_capture import free_port
from trawl.alerter.config import AlerterSettings
from trawl.alerter.main import serve
from trawl.bus import Bus, control_subject, enriched_subject
from trawl.service import ServiceContext
from trawl.v1 import alerts_pb2, calls_pb2

pytestmark = [needs_binary("redis-server")]

RULES = """rules:
  - name: payment-errors
    condition: 'call.protocol == "http"'
    group_by: 'call.dst.workload'
    window: 2s
    aggregate: 'error_ratio > 0.3'
    min_calls: 10
"""
T0 = 1_800_000_000_000_000_000  # the calls' own time: only their spacing matters


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    port = free_port()
    with server(port):
        yield f"redis://127.0.0.1:{port}/0"


def start_alerter(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "trawl", "alerter", "--config", str(config)],
            stdout=output, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip


def call(run: str, index: int) -> calls_pb2.ApiCall:
    error = index % 2 == 1
    made = calls_pb2.ApiCall(
        id=f"{run}-{index}",
        protocol="http",
        method="POST",
        path="/pay",
        status="503" if error else "200",
        outcome=calls_pb2.OUTCOME_ERROR if error else calls_pb2.OUTCOME_OK,
        elapsed_ns=2_000_000,
    )
    made.request.ts = T0 + index * 5_000_000  # 200 calls a second
    made.dst.workload = "payments"
    return made


async def test_two_replicas_one_killed_fire_once_and_resolve_once(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    processes: dict[str, subprocess.Popen[bytes]] = {}
    client = await nats.connect(nats_url)
    js = client.jetstream()
    seen: list[alerts_pb2.Alert] = []

    async def on_alert(msg: Msg) -> None:
        seen.append(alerts_pb2.Alert.FromString(msg.data))

    await client.subscribe("trawl.v1.alerts.payment-errors", cb=on_alert)
    evaluated: dict[str, float] = {}  # calls each replica evaluated, from the counters it publishes

    async def on_counters(msg: Msg) -> None:
        snapshot = json.loads(msg.data)
        for family in snapshot["families"]:
            if family["name"] == "trawl_alerter_calls_total":
                evaluated[snapshot["node"]] = sum(value for _, value in family["values"])

    await client.subscribe("trawl.v1.control.metrics.alerter.>", cb=on_counters)
    readies = {}

    def configure(name: str) -> Path:
        config = tmp_path / f"{name}.yaml"
        document = {
            "node": f"{name}-{run}",
            "log_format": "json",
            "nats": {"servers": [nats_url]},
            "alerter": {
                "rules_file": str(rules),
                "consumer": f"alerter-{run}",
                "fetch_batch": 10,  # small batches: every replica takes part of every burst
                "redis": {"url": redis_url, "key_prefix": f"test:{run}", "claim_s": 2},
            },
        }
        config.write_text(json.dumps(document))
        return config

    try:
        for name in ("a", "b"):
            config = configure(name)
            readies[name] = await client.subscribe(control_subject("ready", "alerter", f"{name}-{run}"))
            processes[name] = start_alerter(config, tmp_path / f"{name}.log")
        for ready in readies.values():
            await ready.next_msg(timeout=30)

        async def publish(indexes: range) -> None:
            for start in range(indexes.start, indexes.stop, 20):
                for index in range(start, min(start + 20, indexes.stop)):
                    made = call(run, index)
                    subject = enriched_subject("http", "shop", "payments")
                    await js.publish(subject, made.SerializeToString(), headers={"Nats-Msg-Id": made.id})
                await asyncio.sleep(0.05)

        await publish(range(0, 200))  # 1 s of calls, half of them 503s
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.1)
        assert [alert.resolved for alert in seen] == [False]
        # Mid-window, the group firing: one replica killed; the other goes on with the burst, and
        # a third, started now with nothing in memory, takes its share: neither fires again.
        processes["a"].send_signal(signal.SIGKILL)
        processes["a"].wait(10)
        ready = await client.subscribe(control_subject("ready", "alerter", f"c-{run}"))
        processes["c"] = start_alerter(configure("c"), tmp_path / "c.log")
        await ready.next_msg(timeout=30)
        await publish(range(200, 400))
        for _ in range(300):
            if any(alert.resolved for alert in seen):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(3)  # time for a second firing or resolution, if one were coming
        assert [alert.resolved for alert in seen] == [False, True]
        fired, resolved = seen
        assert fired.group == resolved.group == "payments"
        assert fired.fired_at == resolved.fired_at
        assert fired.value > 0.3 and fired.window_calls >= 10
        assert resolved.resolved_at > fired.fired_at
        # The resolution was judged on the calls after the kill too: the window the survivor
        # judged at its last call held the 2 s of calls before it, from both replicas' halves.
        keys = redis.Redis.from_url(redis_url)
        assert keys.hlen(f"test:{run}:outbox") == 0  # every decided alert stored
        keys.close()
        # Each replica judged part of the calls: the windows were shared, not each one's own.
        for name in ("b", "c"):
            processes[name].send_signal(signal.SIGTERM)
            processes[name].wait(20)
        await client.flush()
        for _ in range(50):
            if {f"b-{run}", f"c-{run}"} <= set(evaluated):
                break
            await asyncio.sleep(0.1)
        assert evaluated[f"b-{run}"] > 0 and evaluated[f"c-{run}"] > 0
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(20)
        await client.close()


async def test_redis_away_sends_the_batch_back_and_nothing_is_lost(nats_url: str, tmp_path: Path) -> None:
    """Redis down when the calls come: the alerter naks them (counted), alerts nothing, and once a
    redis-server listens the redelivered calls fire the rule, once."""
    run = uuid.uuid4().hex[:8]
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("window: 2s", "window: 1m").replace("min_calls: 10", "min_calls: 4"))
    port = free_port()
    settings = AlerterSettings.load(
        None,
        node=f"al-{run}",
        rules_file=rules,
        consumer=f"alerter-{run}",
        nats={"servers": [nats_url]},
        redis={"url": f"redis://127.0.0.1:{port}/0", "key_prefix": f"test:{run}", "timeout_s": 0.3},
    )
    client = await nats.connect(nats_url)
    js = client.jetstream()
    seen: list[alerts_pb2.Alert] = []

    async def on_alert(msg: Msg) -> None:
        seen.append(alerts_pb2.Alert.FromString(msg.data))

    await client.subscribe("trawl.v1.alerts.payment-errors", cb=on_alert)
    ready = await client.subscribe(control_subject("ready", "alerter", f"al-{run}"))
    bus = await Bus.connect(settings.nats, "test-alerter-redis-away")
    ctx = ServiceContext(name="alerter", settings=settings, bus=bus)
    task = asyncio.create_task(serve(ctx))
    failures = ctx.metrics.counter("trawl_alerter_window_store_failures_total", "")
    try:
        await ready.next_msg(timeout=30)
        for index in range(8):
            made = call(run, index)
            await js.publish(enriched_subject("http", "shop", "pay"), made.SerializeToString())
        for _ in range(100):
            if failures.total() >= 2:  # sent back, and again after its nak delay
                break
            await asyncio.sleep(0.1)
        assert failures.total() >= 2
        assert seen == []
        with server(port):
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)  # a second firing, if one were coming
        assert [alert.resolved for alert in seen] == [False]
        assert seen[0].window_calls >= 4  # min_calls: the redelivered calls are in the window
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
        await bus.close()
        await client.close()
