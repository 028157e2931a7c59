"""Where live packet batches go: a NATS connection of their own (`SocketSink`, zero-copy, plain
TCP) or the service's nats-py client (`ClientSink`: TLS, credentials files, or a server that
demands TLS). Both publish core NATS on `trawl.v1.packets.<node>.<shard>`, no headers, the
same PacketBatch bytes."""

from __future__ import annotations

from typing import Protocol

from trawl.bus import Bus, packets_subject
from trawl.collector.batching import FramedBatch
from trawl.collector.publisher import NatsPublisher, TlsRequiredError
from trawl.config import NatsSettings, PacketRetention
from trawl.errors import ConfigError
from trawl.logs import get_logger

log = get_logger(__name__)


class BatchSink(Protocol):
    async def start(self) -> None: ...

    def is_connected(self) -> bool: ...

    async def publish(self, batch: FramedBatch) -> None: ...

    def try_publish(self, batch: FramedBatch) -> bool:
        """Hand the batch over now without waiting, if the sink can (False: use `publish`)."""
        ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...


class ClientSink:
    """Batches through the service's nats-py connection (joined into one bytes object)."""

    def __init__(self, bus: Bus, node: str) -> None:
        self.bus = bus
        self.node = node

    async def start(self) -> None:
        return None

    def is_connected(self) -> bool:
        return bool(self.bus.nc.is_connected)

    async def publish(self, batch: FramedBatch) -> None:
        await self.bus.publish(packets_subject(self.node, batch.shard), batch.encode())

    def try_publish(self, batch: FramedBatch) -> bool:
        return False

    async def flush(self) -> None:
        if self.bus.nc.is_connected:
            await self.bus.nc.flush()

    async def close(self) -> None:
        return None  # the service closes its own bus


class SocketSink:
    """Batches through a NatsPublisher of their own, handed to the kernel without a copy;
    falls back to the nats-py client when the server turns out to require TLS."""

    def __init__(
        self, settings: NatsSettings, name: str, bus: Bus, node: str, retention: PacketRetention | None = None
    ) -> None:
        self.node = node

        async def ensure_stream() -> None:
            if retention is None:
                return
            try:
                await bus.ensure_packet_stream(retention)
            except ConfigError as exc:
                # The server answered but will not have the stream (another stream already takes
                # these subjects, JetStream is off...): publishing beats waiting for ever.
                log.warning("packet_stream_not_ensured", error=str(exc) or type(exc).__name__)

        # After a reconnection no batch goes before the packet stream exists again: a NATS
        # server that restarted lost it (in memory), and batches sent before it is back would
        # be taken by nobody.
        self.publisher = NatsPublisher(settings, name, reconnect_wait_s=1.0, before_reconnect=ensure_stream)
        self.fallback: ClientSink | None = None
        self._bus = bus
        self._subjects: dict[int, str] = {}

    async def start(self) -> None:
        try:
            await self.publisher.connect()
        except TlsRequiredError:
            log.info("packet_publisher_fallback", reason="the NATS server requires TLS; publishing through nats-py")
            self.fallback = ClientSink(self._bus, self.node)

    def is_connected(self) -> bool:
        if self.fallback is not None:
            return self.fallback.is_connected()
        return self.publisher.is_connected

    async def publish(self, batch: FramedBatch) -> None:
        if self.fallback is not None:
            await self.fallback.publish(batch)
            return
        await self.publisher.publish(self._subject(batch.shard), batch.buffers())

    def try_publish(self, batch: FramedBatch) -> bool:
        if self.fallback is not None or not self.publisher.idle:
            return False
        return self.publisher.try_publish(self._subject(batch.shard), batch.buffers())

    def _subject(self, shard: int) -> str:
        subject = self._subjects.get(shard)
        if subject is None:
            subject = self._subjects[shard] = packets_subject(self.node, shard)
        return subject

    async def flush(self) -> None:
        if self.fallback is not None:
            await self.fallback.flush()
        elif self.publisher.is_connected:
            await self.publisher.flush()

    async def close(self) -> None:
        await self.publisher.close()


def batch_sink(
    settings: NatsSettings, name: str, bus: Bus, node: str, retention: PacketRetention | None = None
) -> BatchSink:
    """The zero-copy socket sink where the settings allow plain TCP, else the nats-py client."""
    if NatsPublisher.supports(settings):
        return SocketSink(settings, name, bus, node, retention)
    return ClientSink(bus, node)
