"""A batch from a durable pull consumer without nats-py's work per message.

nats-py's `PullSubscription.fetch` waits for each message of a batch with `next_msg`, which makes
an asyncio task, a `wait_for` timeout and a uuid per message (33 us of the alerter's CPU a call,
measured over a real nats-server, where the ten rules take about 4), and its parser builds a
Msg with its headers parsed for each. Here a batch is one pull request to the consumer, whose
deliveries come to one inbox read by trawl.bus's batching parser (`subscribe_reply_batches`):
a reply subject, a status and a payload per message, in lists, no Msg. Acks and naks are
written as one piece per batch (`Bus.publish_raw`).

A fetch asks for a batch with a request that expires after LINGER_S: the server sends what the
consumer has, and what comes until the batch is full or the request expires (a 408); with
nothing by then it asks again, until `wait_s` has passed. Messages that come after a fetch gave
up (a late answer to an expired request, a reconnect) are kept and returned by the next fetch,
so none is left unacked by mistake: each is still the consumer's delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import NamedTuple

import nats.errors
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import DEFAULT_PREFIX, AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError, NotFoundError

from trawl.bus import STREAM_SUBJECTS, Bus
from trawl.logs import get_logger

log = get_logger(__name__)

# A wait beyond the request's own expiry, for the server's 408 to come back.
EXPIRY_GRACE_S = 0.5
# How long a pull request waits for its batch to fill. Returning at once with what the consumer
# has cost more than the rules when the alerter kept up: in trawl up it fetched a call or two at
# a time, a pull request, a socket write and a wakeup of nats-server each. Alerts wait this
# much longer at most.
LINGER_S = 0.05
# 404 no messages, 408 request expired, 409 too many waiting requests or a leader change: the
# request is over. 100 is an idle heartbeat (none is asked for). Others (503 no responders: the
# consumer or its stream is gone) are errors.
_ENDS = frozenset({b"404", b"408", b"409"})


class PullError(nats.errors.Error):
    """The consumer answered a pull request with an error (it or its stream is gone, no JetStream)."""


class Delivery(NamedTuple):
    """One message the consumer delivered: the subject to ack it on, and its payload."""

    reply: bytes
    data: bytes

    @property
    def stream_sequence(self) -> int:
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>, or
        # with <domain>.<account hash> after ACK and a token at the end (nats-server 2.10+).
        tokens = self.reply.split(b".")
        return int(tokens[5] if len(tokens) == 9 else tokens[7])


class BatchPuller:
    """Pull requests on `$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>`, answered on one inbox."""

    def __init__(self, bus: Bus, stream: str, durable: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.bus = bus
        self.subject = f"{prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.inbox = ""
        self._subscription: Subscription | None = None
        self._messages: list[Delivery] = []
        self._wanted = 0
        self._answered = asyncio.Event()  # the current request is full, or the server ended it
        self._error = b""

    async def start(self) -> BatchPuller:
        self.inbox = self.bus.nc.new_inbox()
        # nats-py resubscribes it after a reconnect.
        self._subscription = await self.bus.subscribe_reply_batches(self.inbox, self._arrived)
        return self

    async def stop(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None

    def _arrived(self, messages: list[tuple[bytes, bytes, bytes]]) -> None:
        # On the connection's reading: append, no await.
        for reply, status, data in messages:
            if not status:
                self._messages.append(Delivery(reply, data))
            elif status in _ENDS:
                self._answered.set()
            elif status != b"100":
                self._error = status
                self._answered.set()
        if len(self._messages) >= self._wanted:
            self._answered.set()

    async def fetch(self, batch: int, wait_s: float, stop: asyncio.Event | None = None) -> list[Delivery]:
        """Up to `batch` messages: those there now and those that come within LINGER_S after
        (a request that expires then); nats.errors.TimeoutError when none came within `wait_s`,
        or at once when `stop` is set (a service told to stop does not wait out `wait_s`)."""
        if self._messages:
            return self._take(batch)
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            linger = min(LINGER_S, max(0.001, deadline - asyncio.get_running_loop().time()))
            await self._request(batch, {"batch": batch, "expires": int(linger * 1e9)}, linger + EXPIRY_GRACE_S)
            if self._messages:
                return self._take(batch)
            if asyncio.get_running_loop().time() >= deadline or (stop is not None and stop.is_set()):
                raise nats.errors.TimeoutError

    async def _request(self, batch: int, request: dict[str, object], wait_s: float) -> None:
        self._answered.clear()
        self._wanted = batch
        self._error = b""
        await self.bus.nc.publish(self.subject, json.dumps(request).encode(), reply=self.inbox)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._answered.wait(), wait_s)
        error, self._error = self._error, b""
        if error and not self._messages:
            raise PullError(f"pull request on {self.subject}: status {error.decode(errors='replace')}")

    def _take(self, batch: int) -> list[Delivery]:
        taken, self._messages = self._messages[:batch], self._messages[batch:]
        return taken

    async def ack(self, deliveries: list[Delivery]) -> None:
        """Ack these (with AckPolicy.ALL, the last one acks every one before it): one write."""
        if deliveries:
            await self.bus.publish_raw(b"".join(b"PUB %s 0\r\n\r\n" % d.reply for d in deliveries))

    async def nak(self, deliveries: list[Delivery], delay_s: float | None = None) -> None:
        """Redeliver these (after `delay_s`), as Msg.nak does: one write."""
        payload = b"-NAK" if delay_s is None else b"-NAK " + json.dumps({"delay": int(delay_s * 1e9)}).encode()
        if deliveries:
            command = b"%d\r\n%s\r\n" % (len(payload), payload)
            await self.bus.publish_raw(b"".join(b"PUB %s %s" % (d.reply, command) for d in deliveries))


async def open_consumer(js: JetStreamContext, stream: str, durable: str, ack_all: bool) -> None:
    """The durable consumer with the ack policy asked for: made when missing, and made again when
    it exists with the other policy (a consumer's ack policy cannot be changed in place), from
    the first call its acks had not covered; the calls delivered past that and not acked come
    again (their alerts have the same ids: JetStream stores them once). Replicas switching at
    once may both re-create it: the second one starts where the first one's acks ended."""
    policy = AckPolicy.ALL if ack_all else AckPolicy.EXPLICIT
    start_seq = None
    try:
        info = await js.consumer_info(stream, durable)
    except NotFoundError:
        info = None
    if info is not None:
        if info.config.ack_policy == policy:
            return
        start_seq = (info.ack_floor.stream_seq if info.ack_floor is not None else 0) or 0
        await js.delete_consumer(stream, durable)
        log.info("alerter_consumer_recreated", durable=durable, ack_policy=policy.value, after_stream_seq=start_seq)
    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=policy,
        ack_wait=30,
        max_ack_pending=10_000,
        deliver_policy=DeliverPolicy.ALL if start_seq is None else DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=None if start_seq is None else start_seq + 1,
        filter_subject=STREAM_SUBJECTS[stream][0],
    )
    with contextlib.suppress(BadRequestError):  # another replica made it meanwhile
        await js.add_consumer(stream, config)
