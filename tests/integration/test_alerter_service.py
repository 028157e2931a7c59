"""The alerter service over a real nats-server: enriched calls in, alerts stored, webhooks received."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from pathlib import Path

import nats
import pytest
from aiohttp import web

from trawl.alerter.config import AlerterSettings
from trawl.alerter.main import dead_letter_subject, main, serve
from trawl.bus import STREAM_ALERTS, Bus, alerts_subject, control_subject, enriched_subject
from trawl.service import ServiceContext
from trawl.v1 import alerts_pb2, calls_pb2, control_pb2

RULES = """\
rules:
  - name: server-errors
    condition: 'call.protocol == "http" && int(call.status) >= 500'
    severity: critical
    summary: 'HTTP {{call.status}} from {{call.dst.workload}}'
    actions:
      - webhook: {{url: "{hook}", secret_env: TRAWL_TEST_HOOK_SECRET}}
  - name: teapots
    condition: 'call.status == "418"'
    actions:
      - webhook: {{url: "{failing}", format: slack}}
"""


def enriched(call_id: str, status: str) -> calls_pb2.ApiCall:
    return calls_pb2.ApiCall(
        id=call_id,
        protocol="http",
        method="POST",
        path="/pay",
        status=status,
        src=calls_pb2.Endpoint(ip="10.0.0.1", workload="checkout", namespace="shop"),
        dst=calls_pb2.Endpoint(ip="10.0.0.2", workload="payments", namespace="shop"),
        request=calls_pb2.Message(ts=1_700_000_000_000_000_000),
    )


async def test_calls_to_alerts_webhooks_and_drained(
    nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[tuple[dict[str, str], bytes]] = []
    failing_hits: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.Response(status=204)

    async def failing(request: web.Request) -> web.Response:
        failing_hits.append(await request.read())
        return web.Response(status=500)

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_post("/failing", failing)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES.format(hook=f"{base}/hook", failing=f"{base}/failing"))
    monkeypatch.setenv("TRAWL_TEST_HOOK_SECRET", "shh")

    run = uuid.uuid4().hex[:8]
    settings = AlerterSettings.load(
        None,
        node="al-1",
        rules_file=rules_file,
        consumer=f"alerter-{run}",
        nats={"servers": [nats_url]},
        webhook={"retries": 1, "backoff_s": 0.05},
    )
    client = await nats.connect(nats_url)
    js = client.jetstream()
    ready = await client.subscribe(control_subject("ready", "alerter", "al-1"))
    drained = await client.subscribe(control_subject("drained", "alerter", "al-1"))
    bus = await Bus.connect(settings.nats, "test-alerter")
    ctx = ServiceContext(name="alerter", settings=settings, bus=bus)
    task = asyncio.create_task(serve(ctx))
    try:
        await ready.next_msg(timeout=10)
        calls = [
            enriched(f"{run}-ok", "200"),
            enriched(f"{run}-boom", "503"),
            enriched(f"{run}-tea", "418"),
            enriched(f"{run}-ok2", "204"),
        ]
        last = 0
        for call in calls:
            ack = await js.publish(
                enriched_subject("http", "shop", "payments"), call.SerializeToString(), headers={"Nats-Msg-Id": call.id}
            )
            last = ack.seq
        announcement = control_pb2.Drained(service="enricher", node="e1", emitted=4, last_stream_sequence=last)
        await client.publish(control_subject("drained", "enricher", "e1"), announcement.SerializeToString())

        done = control_pb2.Drained.FromString((await drained.next_msg(timeout=20)).data)
        assert done.service == "alerter"
        assert done.emitted == 2

        # The webhook got the 5xx alert, signed; the failing endpoint was tried twice.
        [(headers, body)] = received
        assert headers["X-Trawl-Signature"] == "sha256=" + hmac.new(b"shh", body, hashlib.sha256).hexdigest()
        document = json.loads(body)
        assert document["rule"] == "server-errors"
        assert document["summary"] == "HTTP 503 from payments"
        assert document["call"]["id"] == f"{run}-boom"
        assert len(failing_hits) == 2
        assert json.loads(failing_hits[0])["text"].startswith("[WARNING] teapots: POST /pay -> 418")

        stored = await js.get_last_msg(STREAM_ALERTS, alerts_subject("server-errors"))
        assert stored.data is not None
        alert = alerts_pb2.Alert.FromString(stored.data)
        assert alert.call.id == f"{run}-boom"
        assert stored.headers is not None
        assert stored.headers["Nats-Msg-Id"] == alert.id
        dead = await js.get_last_msg(STREAM_ALERTS, dead_letter_subject("teapots"))
        assert dead.data is not None
        assert alerts_pb2.Alert.FromString(dead.data).call.id == f"{run}-tea"
        assert dead.headers is not None
        assert dead.headers["Trawl-Failure"] == "HTTP 500"
        assert ctx.metrics.counter("trawl_alerter_dead_letters_total", "").get(rule="teapots") == 1
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
        await bus.close()
        await client.close()
        await runner.cleanup()


def test_bad_rules_file_exits_2_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], unused_tcp_port: int
) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text("rules:\n  - name: r\n    condition: 'call.status >= '\n")
    config = tmp_path / "trawl.yaml"
    config.write_text(f"nats:\n  servers: ['nats://127.0.0.1:{unused_tcp_port}']\n  connect_attempts: 1\n")
    assert main(config, rules_file=rules_file) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert err.startswith(f"trawl alerter: {rules_file}:3: rule 'r': condition is not valid CEL")


def test_rules_file_from_the_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "trawl.yaml"
    config.write_text(f"alerter:\n  rules_file: {tmp_path / 'absent.yaml'}\n")
    assert main(config) == 2
    assert "absent.yaml: cannot read rules file" in capsys.readouterr().err


async def test_drained_after_a_restart_when_the_consumer_is_already_past_the_sequence(
    nats_url: str, tmp_path: Path
) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text("rules:\n  - name: any\n    condition: 'true'\n")
    run = uuid.uuid4().hex[:8]
    settings = AlerterSettings.load(
        None, node=f"al-{run}", rules_file=rules_file, consumer=f"alerter-{run}", nats={"servers": [nats_url]}
    )
    client = await nats.connect(nats_url)
    js = client.jetstream()
    drained = await client.subscribe(control_subject("drained", "alerter", f"al-{run}"))
    try:
        for life in range(2):
            ready = await client.subscribe(control_subject("ready", "alerter", f"al-{run}"))
            bus = await Bus.connect(settings.nats, "test-alerter")
            ctx = ServiceContext(name="alerter", settings=settings, bus=bus)
            task = asyncio.create_task(serve(ctx))
            try:
                await ready.next_msg(timeout=10)
                await ready.unsubscribe()
                if life == 0:
                    call = enriched(f"{run}-1", "200")
                    subject = enriched_subject("http", "shop", run)
                    ack = await js.publish(subject, call.SerializeToString(), headers={"Nats-Msg-Id": call.id})
                # The second life processes nothing itself: its consumer already acked that sequence.
                announcement = control_pb2.Drained(service="enricher", last_stream_sequence=ack.seq)
                await client.publish(control_subject("drained", "enricher", "e1"), announcement.SerializeToString())
                done = control_pb2.Drained.FromString((await drained.next_msg(timeout=10)).data)
                # Life 0 alerts on every call in the stream (earlier tests' too), life 1 on none.
                assert done.emitted >= 1 if life == 0 else done.emitted == 0
            finally:
                ctx.stopping.set()
                await asyncio.wait_for(task, 10)
                await bus.close()
    finally:
        await client.close()


async def test_a_windowed_rule_fires_once_on_a_burst_and_resolves_when_the_calls_stop(
    nats_url: str, tmp_path: Path
) -> None:
    """A burst of 5xx answers through the service: one firing (not one per call), to the webhook
    and the stream, then, with no call coming after the burst, the resolve once the window has
    drained in wall-clock time (the idle sweep)."""
    received: list[dict[str, object]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(json.loads(await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        "rules:\n"
        "  - name: payment-errors\n"
        "    condition: 'call.protocol == \"http\"'\n"
        "    group_by: 'call.dst.workload'\n"
        "    window: 2s\n"
        "    aggregate: 'error_ratio > 0.5'\n"
        "    min_calls: 3\n"
        f"    actions: [{{webhook: {{url: 'http://127.0.0.1:{runner.addresses[0][1]}/hook'}}}}]\n"
    )
    run = uuid.uuid4().hex[:8]
    settings = AlerterSettings.load(
        None, node="al-w", rules_file=rules_file, consumer=f"alerter-{run}", nats={"servers": [nats_url]}
    )
    client = await nats.connect(nats_url)
    js = client.jetstream()
    ready = await client.subscribe(control_subject("ready", "alerter", "al-w"))
    bus = await Bus.connect(settings.nats, "test-alerter-windows")
    ctx = ServiceContext(name="alerter", settings=settings, bus=bus)
    task = asyncio.create_task(serve(ctx))
    try:
        await ready.next_msg(timeout=10)
        now_ns = 1_800_000_000_000_000_000  # the calls' own time: only their spacing matters
        for index in range(12):
            call = enriched(f"{run}-{index}", "503" if index % 4 else "200")
            call.outcome = calls_pb2.OUTCOME_ERROR if index % 4 else calls_pb2.OUTCOME_OK
            call.request.ts = now_ns + index * 50_000_000
            await js.publish(
                enriched_subject("http", "shop", "payments"), call.SerializeToString(), headers={"Nats-Msg-Id": call.id}
            )
        for _ in range(100):
            if len(received) >= 2:
                break
            await asyncio.sleep(0.1)
        assert [document.get("resolved", False) for document in received] == [False, True]
        fired, resolved = received
        assert fired["rule"] == resolved["rule"] == "payment-errors"
        assert fired["group"] == resolved["group"] == "payments"
        assert fired["fired_at"] == resolved["fired_at"]
        assert float(str(fired["value"])) > 0.5 and int(str(fired["window_calls"])) >= 3
        stored = await js.get_last_msg(STREAM_ALERTS, alerts_subject("payment-errors"))
        assert stored.data is not None
        assert alerts_pb2.Alert.FromString(stored.data).resolved
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
        await bus.close()
        await client.close()
        await runner.cleanup()
