"""An ActionSender for action tests against real peers: its dead letters and backoff waits are
kept instead of published and slept (so retries are seen, not waited for), its counters read
back from its own Registry."""

from __future__ import annotations

import aiohttp

from trawl.alerter.action_record import Request
from trawl.alerter.action_types import Action
from trawl.alerter.actions import ActionSender, DeliveryFailure
from trawl.alerter.config import ActionSettings, WebhookSettings
from trawl.metrics import Registry
from trawl.v1 import alerts_pb2


class RecordingSender:
    def __init__(self, settings: ActionSettings, request: Request | None = None) -> None:
        self.settings = settings
        self.request = request
        self.dead: list[DeliveryFailure] = []
        self.sleeps: list[float] = []
        self.metrics = Registry()

    async def record_dead(self, failure: DeliveryFailure) -> None:
        self.dead.append(failure)

    async def record_sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    async def deliver(self, alert: alerts_pb2.Alert, action: Action) -> bool:
        async with aiohttp.ClientSession() as session:
            sender = ActionSender(
                lambda: session,
                WebhookSettings(),
                self.settings,
                self.record_dead,
                self.metrics,
                request=self.request,
                sleep=self.record_sleep,
            )
            return await sender.deliver(alert, action)

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.counter(name, "").get(**labels)
