"""What every service's `main` shares: load config, log, connect the bus, serve /metrics and
health, stop cleanly on SIGTERM/SIGINT.

A service module provides `async def serve(ctx: ServiceContext) -> None`: it subscribes,
calls `await ctx.ready()`, and returns once `ctx.stopping` is set (or its finite input is
done), after which the runner drains the bus. The domain logic stays in plain classes that
tests drive without a bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from trawl.bus import Bus, control_subject
from trawl.config import ServiceSettings
from trawl.errors import UserError
from trawl.logs import configure_logging, get_logger
from trawl.metrics import Registry
from trawl.v1 import control_pb2

if TYPE_CHECKING:
    from aiohttp import web

log = get_logger(__name__)

SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


@dataclass
class ServiceContext(Generic[SettingsT]):
    name: str
    settings: SettingsT
    bus: Bus
    metrics: Registry = field(default_factory=Registry)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    is_ready: bool = False
    # Lines /readyz adds to its answer (the state of what the service depends on beside NATS,
    # e.g. the enricher's Kubernetes watch); they inform, the status code stays the service's.
    status_lines: list[Callable[[], str]] = field(default_factory=list)
    _counters_stream: bool = False

    async def ready(self) -> None:
        """Mark the service ready (/readyz) and announce it on trawl.v1.control.ready.<service>.<node>."""
        self.is_ready = True
        await self.bus.publish(control_subject("ready", self.name, self.settings.node), b"")
        await self.bus.nc.flush()
        log.info("service_ready", service=self.name, node=self.settings.node)

    async def publish_counters(self) -> None:
        """This service's counters and gauges (its Registry) on trawl.v1.control.metrics.<service>.<node>,
        as JSON (trawl.metrics.Registry.snapshot_json), kept by the stream TRAWL_COUNTERS (the
        last one per service and node), for the enricher's OTLP metrics export:
        the collector and the dissector have no exporter of their own. Published every
        COUNTERS_INTERVAL_S, when a finite input is drained and when the service stops, so the
        last figures of a short run reach the export too; a lost one is replaced by the next."""
        try:
            if not self._counters_stream:
                await self.bus.ensure_counters_stream()  # kept there for an enricher that starts later
                self._counters_stream = True
            payload = self.metrics.snapshot_json(service=self.name, node=self.settings.node)
            await self.bus.publish(control_subject("metrics", self.name, self.settings.node), payload)
        except Exception as exc:  # the counters are also on /metrics: never stop a service over them
            log.debug("counters_not_published", error=str(exc) or type(exc).__name__)

    async def drained(self, emitted: int, last_stream_sequence: int = 0, files: list[str] | None = None) -> None:
        """Announce that a finite input has been fully processed by this service."""
        message = control_pb2.Drained(
            service=self.name,
            node=self.settings.node,
            emitted=emitted,
            last_stream_sequence=last_stream_sequence,
            files=files or [],
        )
        await self.publish_counters()  # before Drained: the enricher exports once it has all
        await self.bus.publish(control_subject("drained", self.name, self.settings.node), message.SerializeToString())
        await self.bus.nc.flush()
        log.info("service_drained", service=self.name, emitted=emitted, files=files or [])


# How often a service publishes its counters for the OTLP metrics export (ServiceContext.publish_counters).
COUNTERS_INTERVAL_S = 5.0


async def _publish_counters_periodically(ctx: ServiceContext[SettingsT]) -> None:
    while True:
        await asyncio.sleep(COUNTERS_INTERVAL_S)
        await ctx.publish_counters()


async def _start_http(ctx: ServiceContext[SettingsT], port: int) -> web.AppRunner:
    # Imported only when the port is set: aiohttp costs a quarter of a second at start.
    from aiohttp import web
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    async def metrics(_: web.Request) -> web.Response:
        # The Prometheus text format as prometheus_client writes it (escaping, numbers, the
        # counters' _total), from the service's Registry (a custom collector).
        return web.Response(body=generate_latest(ctx.metrics), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        ok = ctx.bus.nc.is_connected
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "nats disconnected\n")

    async def readyz(_: web.Request) -> web.Response:
        ok = ctx.is_ready and ctx.bus.nc.is_connected
        text = "ready\n" if ok else "not ready\n"
        text += "".join(f"{line()}\n" for line in ctx.status_lines)
        return web.Response(status=200 if ok else 503, text=text)

    app = web.Application()
    app.add_routes([web.get("/metrics", metrics), web.get("/healthz", healthz), web.get("/readyz", readyz)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "0.0.0.0", port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    log.info("http_listening", port=bound)
    return runner


async def run_service(
    name: str,
    settings: SettingsT,
    serve: Callable[[ServiceContext[SettingsT]], Awaitable[None]],
    config_file: Path | None = None,
) -> None:
    # `config_file` only names where nats.servers is set, in the message of an unreachable NATS.
    bus = await Bus.connect(settings.nats, name=f"trawl-{name}-{settings.node}", config_file=config_file)
    ctx = ServiceContext(name=name, settings=settings, bus=bus)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ctx.stopping.set)
    runner = await _start_http(ctx, settings.http_port) if settings.http_port is not None else None
    counters = asyncio.create_task(_publish_counters_periodically(ctx))
    try:
        await serve(ctx)
    finally:
        counters.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await counters
        if not bus.nc.is_closed:
            await ctx.publish_counters()
        await bus.close()
        if runner is not None:
            await runner.cleanup()
        log.info("service_stopped", service=name)


def main_for(
    name: str,
    settings_cls: type[SettingsT],
    serve: Callable[[ServiceContext[SettingsT]], Awaitable[None]],
    config_file: Path | None,
    **overrides: object,
) -> int:
    """The synchronous entry `trawl <service>` calls: exit 0, or 2 with one line for a UserError."""
    try:
        settings = settings_cls.load(config_file, **overrides)
        configure_logging(settings.log_level, settings.log_format, service=name)
        asyncio.run(run_service(name, settings, serve, config_file))
    except UserError as exc:
        print(f"trawl {name}: {exc}", file=sys.stderr)  # noqa: T201 - the one line a user reads
        return exc.exit_code
    return 0
