"""The alerter service: enriched calls from TRAWL_ENRICHED -> rules -> alerts and webhooks.

Calls come from a durable pull consumer (replicas with the same consumer name share them).
Each alert is published on trawl.v1.alerts.<rule> (stream TRAWL_ALERTS, Nats-Msg-Id = alert
id) before the call is acked, so an alert is stored at least once; its actions (webhooks,
recordings, InfluxDB, Elasticsearch, S3: trawl.alerter.actions) run in the background, at most
webhook.max_in_flight per target, and an action that fails for good lands on
trawl.v1.alerts._dead.<rule> in the same stream.

With a finite input, the enricher announces `drained` with the stream sequence of its last
call; once this alerter has processed that sequence (or the consumer has nothing left) and
its actions have finished, it announces `trawl.v1.control.drained.alerter.<node>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import nats.errors
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from trawl.alerter.action_record import nats_request
from trawl.alerter.actions import ActionSender, DeliveryFailure, dead_letter_headers
from trawl.alerter.config import AlerterSettings
from trawl.alerter.delivery import LazySession
from trawl.alerter.logic import Alerter
from trawl.alerter.pull import BatchPuller, Delivery, open_consumer
from trawl.alerter.rules import Action
from trawl.alerter.windows import WindowStoreError
from trawl.bus import MSG_ID_HEADER, PREFIX, STREAM_ALERTS, STREAM_ENRICHED, alerts_subject, token
from trawl.dedup import RecentIds
from trawl.logs import get_logger
from trawl.service import ServiceContext, main_for
from trawl.v1 import alerts_pb2, calls_pb2, control_pb2

log = get_logger(__name__)

ENRICHER_DRAINED = f"{PREFIX}.control.drained.enricher.>"
FETCH_TIMEOUT_S = 1.0


def dead_letter_subject(rule: str) -> str:
    return f"{PREFIX}.alerts._dead.{token(rule)}"


class _Drain:
    """The enricher's announced last sequence, until this alerter has processed it."""

    def __init__(self) -> None:
        self.required: int | None = None
        self.processed = 0

    def announce(self, sequence: int) -> None:
        self.required = max(self.required or 0, sequence)

    def satisfied(self) -> bool:
        return self.required is not None and self.processed >= self.required


async def serve(ctx: ServiceContext[AlerterSettings]) -> None:
    settings = ctx.settings
    bus = ctx.bus
    window_store = None
    if settings.redis is not None:  # redis-py is imported only then
        from trawl.alerter.window_store import shared_windows

        window_store = shared_windows(settings.redis)
    alerter = Alerter(settings.rules, ctx.metrics, window_store=window_store)
    rules_by_name = {rule.name: rule for rule in settings.rules}
    alerts_sent = 0
    undecodable = ctx.metrics.counter("trawl_alerter_undecodable_total", "Stream messages that were not an ApiCall")
    publish_failures = ctx.metrics.counter("trawl_alerter_publish_failures_total", "Alerts not stored (retried)")
    duplicates = ctx.metrics.counter(
        "trawl_alerter_duplicate_calls_total", "Calls not evaluated again: a call with the same id was evaluated"
    )
    recent = RecentIds(settings.recent_call_ids)
    await bus.ensure_stream(STREAM_ENRICHED, settings.streams)
    if window_store is not None:
        created = (await bus.js.stream_info(STREAM_ENRICHED)).created
        window_store.stream_id = created.isoformat() if created else ""
    await bus.ensure_stream(STREAM_ALERTS, settings.streams)
    # One alerter (windows in process) acks a batch by its last call (AckPolicy.ALL); replicas
    # sharing windows through Redis share the consumer, and ack each call: an ack-all would
    # also ack the calls another replica holds and has not stored the alerts of.
    ack_all = settings.redis is None
    await open_consumer(bus.js, STREAM_ENRICHED, settings.consumer, ack_all)
    pull = await bus.pull(STREAM_ENRICHED, durable=settings.consumer)
    # Batches without nats-py's task per message (trawl.alerter.pull); `pull` stays for consumer_info.
    puller = await BatchPuller(bus, STREAM_ENRICHED, settings.consumer).start()
    window_store_failures = ctx.metrics.counter(
        "trawl_alerter_window_store_failures_total",
        "Batches sent back (nak) because Redis, which holds the shared windows, refused or was away",
    )
    window_store_down = False
    drain = _Drain()

    async def on_enricher_drained(msg: Msg) -> None:
        try:
            announced = control_pb2.Drained.FromString(msg.data)
        except DecodeError:
            log.warning("alerter_bad_drained", subject=msg.subject)
            return
        drain.announce(announced.last_stream_sequence)
        wake.set()  # a fetch waiting for calls that will not come ends now, not at its timeout

    async def publish_dead(failure: DeliveryFailure) -> None:
        headers = dead_letter_headers(failure, MSG_ID_HEADER)
        await bus.js.publish(
            dead_letter_subject(failure.alert.rule), failure.alert.SerializeToString(), headers=headers
        )

    deliveries: set[asyncio.Task[None]] = set()
    dead_letters_lost = ctx.metrics.counter(
        "trawl_alerter_dead_letters_unpublished_total", "Dead letters NATS did not take (logged), per rule"
    )

    async def deliver(sender: ActionSender, alert: alerts_pb2.Alert, action: Action) -> None:
        try:
            await sender.deliver(alert, action)
        except Exception:  # a dead letter that cannot be published is logged; the loop goes on
            dead_letters_lost.inc(rule=alert.rule)
            log.exception("dead_letter_failed", rule=alert.rule, alert_id=alert.id, action=action.kind)

    async def publish(sender: ActionSender, alerts: list[alerts_pb2.Alert]) -> bool:
        """Store each alert and start its actions; False (the unsent ones forgotten) when NATS refused one."""
        nonlocal alerts_sent
        for index, alert in enumerate(alerts):
            try:
                await bus.publish_durable(alerts_subject(alert.rule), alert.SerializeToString(), msg_id=alert.id)
            except Exception as exc:
                publish_failures.inc()
                for unsent in alerts[index:]:
                    alerter.forget(unsent)
                log.warning("alert_publish_failed", rule=alert.rule, error=str(exc))
                return False
            alerts_sent += 1
            # Never waits: each target's bound is kept by the sender, which dead-letters the overflow.
            for action in rules_by_name[alert.rule].actions:
                task = asyncio.create_task(deliver(sender, alert, action))
                deliveries.add(task)
                task.add_done_callback(deliveries.discard)
        return True

    async def handle_batch(sender: ActionSender, messages: list[Delivery]) -> None:
        """Evaluate a fetched batch, store all its alerts, then ack its calls: an alert is stored
        before its call is acked. When NATS (or the windows' Redis) refuses, the batch is nak'd
        and comes back; its alerts are made again with the same ids, which JetStream stores once."""
        nonlocal window_store_down
        evaluated: list[Delivery] = []  # evaluated now (the others: undecodable, evaluated before, failed)
        failed: set[int] = set()  # positions of calls whose evaluation raised
        ids: set[str] = set()
        alerts: list[alerts_pb2.Alert] = []
        for position, msg in enumerate(messages):
            try:
                call = calls_pb2.ApiCall.FromString(msg.data)
            except DecodeError:
                undecodable.inc()
                log.warning("alerter_undecodable", reply=msg.reply.decode(errors="replace"))
                continue
            call_id = call.id
            if call_id and (call_id in recent or call_id in ids):
                duplicates.inc()
                continue
            try:
                alerts += alerter.evaluate(call, msg.stream_sequence if window_store is not None else 0)
            except Exception:  # nothing in one call may stop the alerter
                # Explicit acks leave it to come back; an ack-all acks it with the batch.
                log.exception("alerter_call_failed", call_id=call_id)
                failed.add(position)
                continue
            evaluated.append(msg)
            if call_id:
                ids.add(call_id)
        try:
            alerts += alerter.flush()  # windows shared through Redis: the batch's observations at once
            stored = await publish(sender, alerts)
        except WindowStoreError as exc:
            for alert in alerts:
                alerter.forget(alert)
            window_store_failures.inc()
            if not window_store_down:  # once per outage, not once per batch
                log.warning("alerter_window_store_failed", error=str(exc), calls_sent_back=len(evaluated))
            window_store_down = True
            stored = False
        if not stored:
            # NATS away or slow: the batch comes back, its alerts made again. An ack-all of a later
            # call would ack these too: they come back at once, before any later call (a
            # consumer redelivers first), and this alerter waits a second before it fetches.
            with contextlib.suppress(Exception):
                await puller.nak(evaluated if not ack_all else messages, 1.0 if not ack_all else None)
            if ack_all:
                await asyncio.sleep(1.0)
                return
            nakd = {id(msg) for msg in evaluated}
            failed.update(position for position, msg in enumerate(messages) if id(msg) in nakd)
        else:
            if window_store_down and alerter.shared is not None:
                log.info("alerter_window_store_recovered")
            window_store_down = False
            alerter.announced(alerts)
            recent.remember(ids)  # once its alerts are stored: a nak'd call is evaluated again
        with contextlib.suppress(Exception):
            if ack_all:
                await puller.ack(messages[-1:])  # AckPolicy.ALL: the batch's last call acks it all
            else:
                await puller.ack([msg for position, msg in enumerate(messages) if position not in failed])
        if stored:
            drain.processed = max(drain.processed, messages[-1].stream_sequence)

    async def idle_consumer_done() -> bool:
        """Nothing pending for the consumer and the announced sequence already delivered."""
        try:
            info = await pull.consumer_info()
        except Exception as exc:  # a transient NATS error: check again on the next idle round
            log.debug("consumer_info_failed", error=str(exc))
            return False
        return (
            drain.required is not None
            and info.num_pending == 0
            and (info.num_ack_pending or 0) == 0
            and info.delivered is not None
            and (info.delivered.stream_seq or 0) >= drain.required
        )

    # Ends a fetch early: set on stopping, and when the enricher announces the end of its input
    # (a fetch would otherwise wait out FETCH_TIMEOUT_S before the drain is seen: up to a second
    # added to every `trawl up --pcap` with rules).
    wake = asyncio.Event()
    stopping_watch = asyncio.create_task(ctx.stopping.wait())
    stopping_watch.add_done_callback(lambda _: wake.set())
    await bus.subscribe(ENRICHER_DRAINED, on_enricher_drained)
    session = LazySession()
    try:
        sender = ActionSender(
            session, settings.webhook, settings.actions, publish_dead, ctx.metrics, request=nats_request(bus.nc)
        )
        await ctx.ready()
        while not ctx.stopping.is_set():
            try:
                messages = await puller.fetch(settings.fetch_batch, FETCH_TIMEOUT_S, wake)
            except nats.errors.TimeoutError:
                messages = []
                # No call for a while: windowed rules' groups still resolve as their windows drain.
                with contextlib.suppress(WindowStoreError):  # Redis away: the next idle round sweeps
                    swept = alerter.sweep_idle(time.time())
                    if await publish(sender, swept):
                        alerter.announced(swept)
            except Exception as exc:  # connection trouble: nats-py reconnects; wait and fetch again
                log.warning("alerter_fetch_failed", error=str(exc))
                messages = []
                await asyncio.sleep(0.5)
            if messages:
                await handle_batch(sender, messages)
            if drain.required is not None and (drain.satisfied() or (not messages and await idle_consumer_done())):
                if deliveries:
                    await asyncio.wait(set(deliveries))
                drain.required = None
                await ctx.drained(emitted=alerts_sent)
                if not ctx.stopping.is_set():
                    wake.clear()
        # SIGTERM: the deliveries already started finish (each is bounded by its retries).
        if deliveries:
            await asyncio.wait(set(deliveries))
    finally:
        await session.close()
    stopping_watch.cancel()
    # A pull subscription left to the connection's drain holds it until the drain timeout.
    await puller.stop()
    with contextlib.suppress(Exception):
        await pull.unsubscribe()


def main(config_file: Path | None, rules_file: Path | None = None) -> int:
    return main_for("alerter", AlerterSettings, serve, config_file, rules_file=rules_file)
