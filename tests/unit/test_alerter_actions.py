"""Webhook delivery against a real aiohttp server on loopback: signature, Slack body, retries, dead letter."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from trawl.alerter.actions import SIGNATURE_HEADER, DeliveryFailure, WebhookSender
from trawl.alerter.config import WebhookSettings
from trawl.alerter.rules import WebhookAction
from trawl.metrics import Registry
from trawl.v1 import alerts_pb2, calls_pb2


@dataclass
class Receiver:
    """A webhook endpoint that answers with the queued statuses (then 200) and keeps what it got."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    app = web.Application()
    app.router.add_post("/hook", state.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}/hook"
    yield state
    await runner.cleanup()


def make_alert() -> alerts_pb2.Alert:
    return alerts_pb2.Alert(
        id="a1",
        rule="server-errors",
        severity=alerts_pb2.SEVERITY_CRITICAL,
        summary="HTTP 503 from payments",
        fired_at=1_700_000_000_000_000_000,
        group="checkout -> payments",
        call=calls_pb2.ApiCall(id="c1", protocol="http", status="503", elapsed_ns=5),
    )


class Sender:
    def __init__(self, **settings: object) -> None:
        self.dead: list[DeliveryFailure] = []
        self.sleeps: list[float] = []
        self.metrics = Registry()
        self.settings = WebhookSettings.model_validate({"timeout_s": 2.0, "backoff_s": 0.25, **settings})

    async def record_dead(self, failure: DeliveryFailure) -> None:
        self.dead.append(failure)

    async def record_sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    async def deliver(self, action: WebhookAction, alert: alerts_pb2.Alert | None = None) -> bool:
        async with aiohttp.ClientSession() as session:
            sender = WebhookSender(
                lambda: session, self.settings, self.record_dead, self.metrics, sleep=self.record_sleep
            )
            return await sender.deliver(alert or make_alert(), action)


async def test_signed_json_alert_is_delivered(receiver: Receiver) -> None:
    sender = Sender()
    assert await sender.deliver(WebhookAction(url=receiver.url, format="json", secret=b"topsecret"))
    [(headers, body)] = receiver.requests
    expected = "sha256=" + hmac.new(b"topsecret", body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers[SIGNATURE_HEADER], expected)
    assert headers["Content-Type"] == "application/json"
    document = json.loads(body)
    assert document["rule"] == "server-errors"
    assert document["severity"] == "SEVERITY_CRITICAL"
    assert document["fired_at"] == "1700000000000000000"
    assert document["call"]["elapsed_ns"] == "5"  # protobuf JSON mapping, proto field names
    assert sender.dead == []
    assert sender.metrics.counter("trawl_alerter_webhooks_delivered_total", "").get(rule="server-errors") == 1


async def test_unsigned_unless_a_secret_is_configured(receiver: Receiver) -> None:
    assert await Sender().deliver(WebhookAction(url=receiver.url, format="json"))
    assert await Sender(hmac_secret=SecretStr("fallback")).deliver(WebhookAction(url=receiver.url, format="json"))
    (plain, _), (signed, body) = receiver.requests
    assert SIGNATURE_HEADER not in plain
    assert signed[SIGNATURE_HEADER] == "sha256=" + hmac.new(b"fallback", body, hashlib.sha256).hexdigest()


async def test_slack_format(receiver: Receiver) -> None:
    assert await Sender().deliver(WebhookAction(url=receiver.url, format="slack"))
    [(_, body)] = receiver.requests
    assert json.loads(body) == {"text": "[CRITICAL] server-errors [checkout -> payments]: HTTP 503 from payments"}


async def test_retries_with_backoff_then_delivers(receiver: Receiver) -> None:
    receiver.statuses = [500, 503, 429]
    sender = Sender(retries=3)
    assert await sender.deliver(WebhookAction(url=receiver.url, format="json"))
    assert len(receiver.requests) == 4
    assert sender.sleeps == [0.25, 0.5, 1.0]
    assert len({body for _, body in receiver.requests}) == 1
    assert sender.dead == []


async def test_server_errors_exhaust_retries_into_the_dead_letter(receiver: Receiver) -> None:
    receiver.statuses = [500] * 10
    sender = Sender(retries=2, backoff_max_s=0.3)
    assert not await sender.deliver(WebhookAction(url=receiver.url, format="json"))
    assert len(receiver.requests) == 3
    assert sender.sleeps == [0.25, 0.3]
    [failure] = sender.dead
    assert failure.reason == "HTTP 500"
    assert failure.attempts == 3
    assert failure.alert.id == "a1"
    assert sender.metrics.counter("trawl_alerter_dead_letters_total", "").get(rule="server-errors") == 1


async def test_a_rejection_is_not_retried(receiver: Receiver) -> None:
    receiver.statuses = [400]
    sender = Sender(retries=5)
    assert not await sender.deliver(WebhookAction(url=receiver.url, format="json"))
    assert len(receiver.requests) == 1
    assert [f.reason for f in sender.dead] == ["HTTP 400"]


async def test_unreachable_endpoint_is_retried_then_dead_lettered(unused_tcp_port: int) -> None:
    sender = Sender(retries=1)
    action = WebhookAction(url=f"http://127.0.0.1:{unused_tcp_port}/hook", format="json")
    assert not await sender.deliver(action)
    [failure] = sender.dead
    assert failure.attempts == 2
    assert "ClientConnectorError" in failure.reason
