"""The record action against the real recorder service over a real nats-server: the alert asks on
trawl.v1.control.record as `trawl record start` does, and the recording holds the alert's flow
from `lookback` before the alert's call on (from the recorder's look-back), read back packet for
packet.
No recorder is retried then dead-lettered; a recorder's refusal is final."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import nats
from aiohttp import web

from tests.action_sender import RecordingSender
from tests.integration.test_recorder_recordings import publish, start_recorder, until
from tests.unit.test_recorder_recordings import POD_A, SECOND, T0, read_back, traffic
from trawl.alerter.action_record import nats_request
from trawl.alerter.action_types import RecordAction, WebhookAction
from trawl.alerter.actions import ActionSender, DeliveryFailure
from trawl.alerter.config import ActionSettings, WebhookSettings
from trawl.bus import control_subject
from trawl.recorder.control import RECORD_SUBJECT
from trawl.v1 import alerts_pb2, calls_pb2, control_pb2


def make_alert() -> alerts_pb2.Alert:
    return alerts_pb2.Alert(
        id="ab12",
        rule="errors",
        severity=alerts_pb2.SEVERITY_CRITICAL,
        summary="HTTP 503 from pod-a",
        fired_at=T0 + 59 * SECOND,
        call=calls_pb2.ApiCall(
            id="c1",
            request=calls_pb2.Message(ts=T0 + 59 * SECOND),
            src=calls_pb2.Endpoint(ip=POD_A[0], port=40058),
            dst=calls_pb2.Endpoint(ip=POD_A[1], port=80, namespace="shop", pod="pod-a"),
        ),
    )


class Sender(RecordingSender):
    def __init__(self, client: nats.NATS, retries: int = 2) -> None:
        super().__init__(ActionSettings(retries=retries, backoff_s=0.5), request=nats_request(client))


async def ask(client: nats.NATS, control: control_pb2.RecordControl) -> control_pb2.RecordReply:
    reply = await client.request(RECORD_SUBJECT, control.SerializeToString(), timeout=10)
    return control_pb2.RecordReply.FromString(reply.data)


async def test_an_alert_starts_a_recording_of_its_flow_with_the_packets_before_it(
    nats_url: str, tmp_path: Path
) -> None:
    client = await nats.connect(nats_url)
    ready = await client.subscribe(control_subject("ready", "recorder", "rec-1"))
    ctx, task = await start_recorder(nats_url, tmp_path / "rec")
    written = lambda: ctx.metrics.snapshot().get("trawl_recorder_packets_total", 0)  # noqa: E731
    try:
        await ready.next_msg(timeout=10)
        before, after = traffic(0, 60), traffic(60, 20)
        sequence = await publish(client, before, 1)
        await until(lambda: written() == 60, "the first 60 packets")
        sender = Sender(client)
        action = RecordAction(filter="tcp port 80", duration_s=600, lookback_s=10)
        assert await sender.deliver(make_alert(), action)
        assert sender.dead == []
        assert sender.metrics.counter("trawl_alerter_recordings_started_total", "").get(rule="errors") == 1
        await publish(client, after, sequence)
        await until(lambda: written() == 80, "the next 20 packets")
        [recording] = (await ask(client, control_pb2.RecordControl(list=True))).recordings
        assert recording.request.requested_by == "alerter:errors"
        assert recording.request.reason == "alert ab12 fired 2023-11-14T22:14:19.000000000Z: HTTP 503 from pod-a"
        assert recording.expression == f"(ip host {POD_A[0]} or ip host {POD_A[1]}) and (tcp port 80)"
        # Of the recorder's 30 s, the 10 s before the alert's call: pod A's packets at 50..58 s.
        assert recording.request.since_ns == T0 + 49 * SECOND
        assert recording.lookback_packets == 5
        stopped = await ask(client, control_pb2.RecordControl(stop=recording.id))
        assert stopped.error == ""
        [path] = [Path(p) for p in (await ask(client, control_pb2.RecordControl(get=recording.id))).recordings[0].files]
    finally:
        ctx.stopping.set()
        await task
        await ctx.bus.close()
        await client.close()
    expected = [(ts // 1000, frame) for ts, frame, pod_a in before + after if pod_a and ts >= T0 + 49 * SECOND]
    assert len(expected) == 15
    assert read_back(path) == expected


async def test_no_recorder_is_retried_then_dead_lettered(nats_url: str) -> None:
    client = await nats.connect(nats_url)
    try:
        sender = Sender(client, retries=2)
        assert not await sender.deliver(make_alert(), RecordAction())
    finally:
        await client.close()
    [failure] = sender.dead
    assert failure.reason == f"no recorder answers on {RECORD_SUBJECT}"
    assert failure.attempts == 3
    assert sender.sleeps == [0.5, 1.0]
    assert sender.metrics.counter("trawl_alerter_dead_letters_total", "").get(rule="errors") == 1


async def test_a_refusal_is_final_and_a_resolve_records_nothing(nats_url: str, tmp_path: Path) -> None:
    client = await nats.connect(nats_url)
    ready = await client.subscribe(control_subject("ready", "recorder", "rec-1"))
    ctx, task = await start_recorder(nats_url, tmp_path / "rec")
    try:
        await ready.next_msg(timeout=10)
        sender = Sender(client)
        # By pod, but this recorder has no identity snapshot to find pods' addresses in.
        assert not await sender.deliver(make_alert(), RecordAction(scope="pods"))
        [failure] = sender.dead
        assert failure.reason.startswith("the recorder refused: a scope by namespace or pod needs the pods' addresses")
        assert failure.attempts == 1
        resolve = make_alert()
        resolve.resolved = True
        assert await sender.deliver(resolve, RecordAction())
        assert list((await ask(client, control_pb2.RecordControl(list=True))).recordings) == []
    finally:
        ctx.stopping.set()
        await task
        await ctx.bus.close()
        await client.close()


async def test_the_alerts_other_actions_name_its_recording(nats_url: str, tmp_path: Path) -> None:
    """Started as the service starts them (the record action first, all at once): the webhook
    gets the alert with the recording's id as a label; with no recorder, without it."""
    bodies: list[dict[str, object]] = []

    async def hook(request: web.Request) -> web.Response:
        bodies.append(json.loads(await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    webhook = WebhookAction(f"http://127.0.0.1:{runner.addresses[0][1]}/hook", "json")
    client = await nats.connect(nats_url)
    dead: list[DeliveryFailure] = []

    async def dead_letter(failure: DeliveryFailure) -> None:
        dead.append(failure)

    async def deliver_both(alert: alerts_pb2.Alert) -> list[bool]:
        async with aiohttp.ClientSession() as session:
            sender = ActionSender(
                lambda: session,
                WebhookSettings(),
                ActionSettings(retries=0),
                dead_letter,
                request=nats_request(client),
            )
            tasks = [asyncio.create_task(sender.deliver(alert, action)) for action in (RecordAction(), webhook)]
            return list(await asyncio.gather(*tasks))

    try:
        # No recorder: the recording is dead-lettered, the webhook goes without the label.
        assert await deliver_both(make_alert()) == [False, True]
        assert "recording_id" not in bodies[0].get("labels", {})  # type: ignore[operator]
        assert [failure.action.kind for failure in dead] == ["record"]

        ready = await client.subscribe(control_subject("ready", "recorder", "rec-1"))
        ctx, task = await start_recorder(nats_url, tmp_path / "rec")
        try:
            await ready.next_msg(timeout=10)
            assert await deliver_both(make_alert()) == [True, True]
            [recording] = (await ask(client, control_pb2.RecordControl(list=True))).recordings
        finally:
            ctx.stopping.set()
            await task
            await ctx.bus.close()
    finally:
        await client.close()
        await runner.cleanup()
    assert bodies[1]["labels"] == {"recording_id": recording.id}
    assert bodies[1]["id"] == "ab12"
