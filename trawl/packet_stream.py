"""Reading packet batches from the in-memory stream TRAWL_PACKETS, where a reader's checkpoint
says, and counting what aged out of the window before it was read.

The collectors publish packet batches on core NATS (no ack on their hot path) and the stream
keeps them for `packet_retention` (`trawl.bus.Bus.ensure_packet_stream`). The dissector
(`trawl.dissector.resume`) and the recorder (`trawl.recorder.main`) read it through a durable
pull consumer each, which they re-create at their own checkpoint when they start, so a
restart or a shard handover resumes exactly where the last reader stopped. Batches that left
the window unread show as gaps in each collector node's batch sequence, and `packets_before`
gives the packets they carried (`LossCounter`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from trawl.bus import STREAM_PACKETS, raise_if_cancelled
from trawl.errors import ConfigError
from trawl.logs import get_logger

log = get_logger(__name__)

STOP_TIMEOUT_S = 5.0


@dataclass
class LossCounter:
    """Batches and packets missing from each batch sequence a reader follows (keyed by the
    collector node, or node and shard)."""

    sequences: dict[str, int] = field(default_factory=dict)
    packets: dict[str, int] = field(default_factory=dict)

    def observe(self, source: str, sequence: int, packets_before: int, packet_count: int) -> tuple[int, int]:
        """(lost batches, lost packets) before this batch; a lower sequence is a restarted
        collector (its sequence starts again at 1) and counts nothing."""
        last = self.sequences.get(source)
        expected_packets = self.packets.get(source)
        self.sequences[source] = sequence
        self.packets[source] = packets_before + packet_count
        if last is None or sequence <= last + 1:
            return 0, 0
        lost_packets = packets_before - expected_packets if expected_packets is not None else 0
        return sequence - last - 1, max(0, lost_packets)


# handler(data, stream sequence, stored at (ns)): one packet batch as the stream holds it.
Handler = Callable[[bytes, int, int], Awaitable[None]]


class PacketReader:
    """One durable pull consumer of TRAWL_PACKETS, re-created where its reader's checkpoint says.

    `start` deletes the durable consumer `durable` (a predecessor's deliveries that were never
    acked would otherwise come back only after the ack wait, out of order) and makes it again
    at the position asked. The stream keeps order, and so does one puller. After a bus failure
    it goes on after the last batch handled (`_reopen`).
    """

    def __init__(
        self,
        js: JetStreamContext,
        durable: str,
        filter_subject: str,
        handler: Handler,
        ensure_stream: Callable[[], Awaitable[None]],
        fetch_batch: int = 64,
    ) -> None:
        self.js = js
        self.ensure_stream = ensure_stream
        self.durable = durable
        self.filter_subject = filter_subject
        self.handler = handler
        self.fetch_batch = fetch_batch
        self.subscription: JetStreamContext.PullSubscription | None = None
        self.task: asyncio.Task[None] | None = None
        self.last_stream_seq = 0  # of the last batch handed to the handler
        self._to_ack: object | None = None  # the last message handled (AckPolicy.ALL)
        self.stream_created: datetime | None = None  # tells a re-created stream (NATS restarted) from ours
        self._stopping = False

    @property
    def stream_id(self) -> str:
        """Which incarnation of the stream this reader reads (its creation time): a position
        (a stream sequence) only means something in the stream it was taken in."""
        return self.stream_created.isoformat() if self.stream_created else ""

    async def start(
        self, start_time: datetime | None = None, start_seq: int | None = None, stream_id: str = ""
    ) -> None:
        """Read from the first batch stored at or after `start_time`, or from stream sequence
        `start_seq`, or (neither) from the start of the window; a position taken in another
        incarnation of the stream than today's (`stream_id`: a NATS server that restarted lost
        the in-memory stream) means nothing here, and reading starts at the window's start. The
        consumer is made by the reading task, which retries until the bus lets it (the stream is
        ensured first: after a restart of the server it is gone until someone makes it again)."""
        self.task = asyncio.create_task(self._run(start_time, start_seq, stream_id), name=f"packets:{self.durable}")

    async def _open(
        self, policy: DeliverPolicy, start_time: datetime | None = None, start_seq: int | None = None
    ) -> None:
        with contextlib.suppress(NotFoundError):
            await self.js.delete_consumer(STREAM_PACKETS, self.durable)
        config = ConsumerConfig(
            durable_name=self.durable,
            deliver_policy=policy,
            opt_start_time=start_time,
            opt_start_seq=start_seq,
            ack_policy=AckPolicy.ALL,
            ack_wait=120,
            max_ack_pending=-1,
            filter_subject=self.filter_subject,
        )
        await self.js.add_consumer(STREAM_PACKETS, config)
        self.stream_created = (await self.js.stream_info(STREAM_PACKETS)).created
        self.subscription = await self.js.pull_subscribe_bind(durable=self.durable, stream=STREAM_PACKETS)

    async def _first_open(self, start_time: datetime | None, start_seq: int | None, stream_id: str) -> None:
        await self.ensure_stream()
        created = (await self.js.stream_info(STREAM_PACKETS)).created
        if stream_id and created is not None and stream_id != created.isoformat():
            log.warning("packet_stream_replaced", durable=self.durable, was=stream_id, now=created.isoformat())
            start_time = start_seq = None
        if start_time is not None:
            await self._open(DeliverPolicy.BY_START_TIME, start_time=start_time)
        elif start_seq is not None:
            await self._open(DeliverPolicy.BY_START_SEQUENCE, start_seq=start_seq)
        else:
            await self._open(DeliverPolicy.ALL)

    async def _run(self, start_time: datetime | None, start_seq: int | None, stream_id: str) -> None:
        failures = 0
        opened = False
        # Not `while True`: nats-py turns a cancellation inside next_msg into ConnectionClosedError
        # when the connection is closed, so a cancel alone may not end this loop.
        while not self._stopping:
            raise_if_cancelled()
            subscription = self.subscription
            try:
                if not opened:
                    await self._first_open(start_time, start_seq, stream_id)
                    opened = True
                    continue
                if subscription is None:
                    await self._reopen()
                    continue
                messages = await subscription.fetch(self.fetch_batch, timeout=1.0)
                failures = 0
            except (TimeoutError, NatsTimeoutError):
                continue
            except (NatsError, OSError, ConfigError) as exc:
                # NATS restarted (an in-memory stream and its consumers are gone) or is away:
                # go on after the last batch handled; the sequences count what did not survive.
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning("packet_reader_failed", durable=self.durable, error=str(exc) or type(exc).__name__)
                self.subscription = None
                await asyncio.sleep(min(2.0, 0.2 * failures))
                continue
            for message in messages:
                metadata = message.metadata
                stream_seq = metadata.sequence.stream
                self.last_stream_seq = stream_seq
                await self.handler(message.data, stream_seq, int(metadata.timestamp.timestamp() * 1e9))
                self._to_ack = message

    async def _reopen(self) -> None:
        """After a bus failure: the batches after the last one handled; from the stream's start
        when the stream is new (a restarted server's in-memory stream numbers from 1 again)."""
        await self.ensure_stream()  # gone with a restarted server: the collectors' batches need it
        info = await self.js.stream_info(STREAM_PACKETS)
        if info.created == self.stream_created:
            await self._open(DeliverPolicy.BY_START_SEQUENCE, start_seq=self.last_stream_seq + 1)
        else:
            self.last_stream_seq = 0
            await self._open(DeliverPolicy.ALL)
        log.info("packet_reader_reopened", durable=self.durable, after=self.last_stream_seq)

    async def ack(self) -> None:
        """Ack every batch handled so far (call after the checkpoint that covers them is saved)."""
        message, self._to_ack = self._to_ack, None
        if message is not None:
            with contextlib.suppress(NatsError, OSError):
                await message.ack()  # type: ignore[attr-defined]

    async def stop(self) -> None:
        self._stopping = True
        if self.task is not None:
            self.task.cancel()
            done, _ = await asyncio.wait({self.task}, timeout=STOP_TIMEOUT_S)
            if not done:  # a library swallowed the cancel: the flag ends the loop at its next turn
                log.warning("packet_reader_stop_slow", durable=self.durable)
            self.task = None
        if self.subscription is not None:
            with contextlib.suppress(Exception):
                await self.subscription.unsubscribe()
            self.subscription = None
