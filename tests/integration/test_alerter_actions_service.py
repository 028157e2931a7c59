"""Action targets that are down or stuck, through the alerter service over a real nats-server: rule
evaluation goes on (every alert is stored while the stuck target still holds its requests), and
every action not carried out is counted and lands as a dead letter in TRAWL_ALERTS."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
from aiohttp import web
from nats.js import JetStreamContext

from trawl.alerter.config import AlerterSettings
from trawl.alerter.main import dead_letter_subject, serve
from trawl.bus import STREAM_ALERTS, Bus, alerts_subject, control_subject, enriched_subject
from trawl.service import ServiceContext
from trawl.v1 import alerts_pb2, calls_pb2, control_pb2

ALERTS = 20
BOUND = 3

RULES = """\
rules:
  - name: errors
    condition: 'call.status == "503"'
    actions:
      - influxdb: {{url: "{influx}", db: trawl}}
      - record: {{duration: 1m}}
"""


async def eventually(condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 20.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if await condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def stored(js: JetStreamContext, subject: str) -> int:
    info = await js.stream_info(STREAM_ALERTS, subjects_filter=subject)
    return int((info.state.subjects or {}).get(subject, 0))


async def test_a_stuck_target_and_a_missing_recorder_hold_no_evaluation_and_lose_nothing(
    nats_url: str, tmp_path: Path
) -> None:
    release = asyncio.Event()
    held: list[bytes] = []

    async def write(request: web.Request) -> web.Response:
        held.append(await request.read())
        await release.wait()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/write", write)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES.format(influx=f"http://127.0.0.1:{runner.addresses[0][1]}"))

    run = uuid.uuid4().hex[:8]
    settings = AlerterSettings.load(
        None,
        node=f"al-{run}",
        rules_file=rules_file,
        consumer=f"alerter-{run}",
        nats={"servers": [nats_url]},
        webhook={"max_in_flight": BOUND},
        actions={"retries": 1, "backoff_s": 0.05, "timeout_s": 60},
    )
    client = await nats.connect(nats_url)
    js = client.jetstream()
    ready = await client.subscribe(control_subject("ready", "alerter", f"al-{run}"))
    drained = await client.subscribe(control_subject("drained", "alerter", f"al-{run}"))
    bus = await Bus.connect(settings.nats, "test-alerter")
    ctx = ServiceContext(name="alerter", settings=settings, bus=bus)
    task = asyncio.create_task(serve(ctx))
    counter = lambda name, **labels: ctx.metrics.counter(name, "").get(**labels)  # noqa: E731
    try:
        await ready.next_msg(timeout=10)
        last = 0
        for index in range(ALERTS):
            call = calls_pb2.ApiCall(
                id=f"{run}-{index}",
                protocol="http",
                status="503",
                src=calls_pb2.Endpoint(ip="10.0.0.1"),
                dst=calls_pb2.Endpoint(ip="10.0.0.2"),
                request=calls_pb2.Message(ts=1_700_000_000_000_000_000 + index),
            )
            ack = await js.publish(
                enriched_subject("http", "shop", run), call.SerializeToString(), headers={"Nats-Msg-Id": call.id}
            )
            last = ack.seq

        # Every alert is stored while the stuck target still holds BOUND requests: evaluation went on.
        await eventually(lambda: _equals(stored(js, alerts_subject("errors")), ALERTS), "every alert stored")
        await eventually(lambda: _true(len(held) == BOUND), "the stuck target's requests")
        # The rest of its deliveries, and every recording (no recorder answers), are dead letters.
        dead = ALERTS - BOUND + ALERTS
        await eventually(lambda: _equals(stored(js, dead_letter_subject("errors")), dead), "the dead letters")
        assert len(held) == BOUND
        assert counter("trawl_alerter_actions_overflow_total", rule="errors", action="influxdb") == ALERTS - BOUND
        assert counter("trawl_alerter_actions_failed_total", rule="errors", action="influxdb") == ALERTS - BOUND
        # Each recording failed after its retry, or at once when BOUND were already being retried.
        assert counter("trawl_alerter_actions_failed_total", rule="errors", action="record") == ALERTS
        record_overflow = counter("trawl_alerter_actions_overflow_total", rule="errors", action="record")
        assert counter("trawl_alerter_action_retries_total", rule="errors", action="record") == ALERTS - record_overflow
        assert counter("trawl_alerter_dead_letters_total", rule="errors") == dead
        assert ctx.metrics.gauge("trawl_alerter_actions_in_flight", "").get() == BOUND

        # Released, the held deliveries arrive; the input's end is announced once they did.
        release.set()
        announcement = control_pb2.Drained(service="enricher", node="e1", emitted=ALERTS, last_stream_sequence=last)
        await client.publish(control_subject("drained", "enricher", "e1"), announcement.SerializeToString())
        done = control_pb2.Drained.FromString((await drained.next_msg(timeout=20)).data)
        assert done.emitted == ALERTS
        assert counter("trawl_alerter_actions_delivered_total", rule="errors", action="influxdb") == BOUND
        assert ctx.metrics.gauge("trawl_alerter_actions_in_flight", "").get() == 0

        # Each dead letter is the alert, with why, which action and after how many attempts.
        consumer = await js.pull_subscribe(dead_letter_subject("errors"), durable=f"dead-{run}", stream=STREAM_ALERTS)
        letters = await consumer.fetch(dead, timeout=10)
        kinds: dict[str, int] = {}
        for letter in letters:
            assert letter.headers is not None
            kinds[letter.headers["Trawl-Action"]] = kinds.get(letter.headers["Trawl-Action"], 0) + 1
            alert = alerts_pb2.Alert.FromString(letter.data)
            assert alert.rule == "errors"
            reason, attempts = letter.headers["Trawl-Failure"], letter.headers["Trawl-Attempts"]
            if letter.headers["Trawl-Action"] == "record":
                assert (reason, attempts) in {
                    ("no recorder answers on trawl.v1.control.record", "2"),
                    (f"overflow: {BOUND} deliveries to recorder in progress", "0"),
                }
            else:
                assert reason.startswith(f"overflow: {BOUND} deliveries to http://127.0.0.1:")
                assert attempts == "0"
                assert letter.headers["Trawl-Target"].startswith("http://127.0.0.1:")
        assert kinds == {"record": ALERTS, "influxdb": ALERTS - BOUND}
    finally:
        release.set()
        ctx.stopping.set()
        await asyncio.wait_for(task, 20)
        await bus.close()
        await client.close()
        await runner.cleanup()


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _true(value: bool) -> bool:
    return value
